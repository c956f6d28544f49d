// The benchmark's shape on Restate: N invocations of a handler of 6
// durable no-op steps (`ctx.run`), at most 64 in flight, through the
// ingress of a restate-server started here on loopback and stopped at the
// end. Prints `runs/s transitions/s`.
//
// Usage: node restate_bench.mjs RUNS BASE_DIR  (from the directory where
// @restatedev/restate-server and @restatedev/restate-sdk are installed)

import { spawn } from "node:child_process";
import { createServer } from "node:net";
import * as restate from "@restatedev/restate-sdk";

const STEPS = 6;
const IN_FLIGHT = 64;
const [runs, baseDir] = [Number(process.argv[2]), process.argv[3]];

const freePort = () =>
  new Promise((resolve) => {
    const server = createServer().listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });

const bench = restate.service({
  name: "bench",
  handlers: {
    run: async (ctx, n) => {
      for (let step = 0; step < STEPS; step++) {
        await ctx.run(`step${step}`, () => step);
      }
      return n;
    },
  },
});

const [ingress, admin, fabric, endpoint] = [await freePort(), await freePort(), await freePort(), await freePort()];
restate.endpoint().bind(bench).listen(endpoint);
const server = spawn("node_modules/.bin/restate-server", ["--base-dir", baseDir, "--no-logo"], {
  env: {
    ...process.env,
    RESTATE_INGRESS__BIND_ADDRESS: `127.0.0.1:${ingress}`,
    RESTATE_ADMIN__BIND_ADDRESS: `127.0.0.1:${admin}`,
    RESTATE_BIND_ADDRESS: `127.0.0.1:${fabric}`,
    RESTATE_ADVERTISED_ADDRESS: `http://127.0.0.1:${fabric}`,
    RESTATE_LISTEN_MODE: "tcp",
    RESTATE_LOG_FILTER: "warn",
  },
  stdio: ["ignore", "ignore", "inherit"],
});

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
async function until(what, check) {
  for (let i = 0; i < 600; i++) {
    try {
      if (await check()) return;
    } catch {}
    await sleep(100);
  }
  throw new Error(`restate-server: ${what} within 60 s`);
}

try {
  await until("no admin API", async () => (await fetch(`http://127.0.0.1:${admin}/health`)).ok);
  await until("deployment not registered", async () => {
    const response = await fetch(`http://127.0.0.1:${admin}/deployments`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ uri: `http://127.0.0.1:${endpoint}` }),
    });
    return response.ok;
  });
  const invoke = async (n) => {
    const response = await fetch(`http://127.0.0.1:${ingress}/bench/run`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(n),
    });
    if (!response.ok) throw new Error(`invocation ${n}: ${response.status} ${await response.text()}`);
    await response.text();
  };
  await until("ingress not ready", async () => (await invoke(-1), true));
  const drive = async (first, count) => {
    let next = first;
    const worker = async () => {
      while (next < first + count) await invoke(next++);
    };
    await Promise.all(Array.from({ length: IN_FLIGHT }, worker));
  };
  await drive(1_000_000, Math.min(runs, 200)); // warm up
  const start = performance.now();
  await drive(0, runs);
  const secs = (performance.now() - start) / 1000;
  console.log(`${(runs / secs).toFixed(1)} ${((runs * STEPS) / secs).toFixed(1)}`);
} finally {
  server.kill("SIGTERM");
  await new Promise((r) => server.once("exit", r));
  process.exit(0);
}
