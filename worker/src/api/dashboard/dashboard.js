// evalflow's dashboard: reads the API (the browser's cookie is its token)
// and draws what it answers, every two seconds. Everything shown is built
// as text nodes, never as HTML: run ids, teams, reasons and log lines are
// the submissions' words.
"use strict";

const REFRESH_MS = 2000;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value !== undefined && value !== null) node.setAttribute(name, String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

async function get(path) {
  const response = await fetch(path, { credentials: "same-origin", cache: "no-store" });
  if (!response.ok) {
    let words = response.statusText;
    try { words = (await response.json()).error; } catch (_) { /* not JSON */ }
    throw new Error(`${path}: ${response.status} ${words}`);
  }
  return response.json();
}

function money(usd) {
  if (usd === null || usd === undefined) return "?";
  if (usd === 0) return "$0";
  if (usd < 1) return "$" + usd.toFixed(5);
  if (usd < 100) return "$" + usd.toFixed(2);
  return "$" + usd.toFixed(0);
}

function duration(secs) {
  if (secs === null || secs === undefined) return "unknown";
  if (secs < 120) return `${secs} s`;
  if (secs < 7200) return `${Math.floor(secs / 60)} min`;
  return `${(secs / 3600).toFixed(1)} h`;
}

function eta(progress) {
  if (progress.eta_secs === 0 && progress.ended === progress.total) return "done";
  if (progress.eta_secs !== null) return duration(progress.eta_secs);
  return progress.remaining_cost_usd === null ? "not known until a run ends" : "none while launching is stopped";
}

function runLink(id) {
  return el("a", { href: "#run/" + encodeURIComponent(id), "data-run": id }, id);
}

function table(header, rows) {
  return el("table", {}, el("thead", {}, el("tr", {}, header.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows.map((cells) => el("tr", {}, cells.map((c) =>
      c instanceof Node ? el("td", {}, c) : el("td", typeof c === "number" ? { class: "num" } : {}, c))))));
}

function figure(id, value, label) {
  return el("div", { class: "figure" }, el("div", { class: "value", id }, value), el("div", { class: "label" }, label));
}

function costChart(cost) {
  const lines = cost.lines.filter((l) => l.attempts > 0);
  if (lines.length === 0) return el("p", { class: "muted" }, "no attempt has ended yet");
  const most = Math.max(...lines.map((l) => l.usd), 1e-12);
  const [width, row, label] = [640, 26, 90];
  const chart = svg("svg", { id: "cost-chart", width, height: row * lines.length + 4, role: "img" });
  lines.forEach((line, i) => {
    const bar = Math.max(1, ((width - label - 170) * line.usd) / most);
    chart.append(svg("text", { x: 0, y: i * row + 17 }, line.profile));
    chart.append(svg("rect", { x: label, y: i * row + 4, width: bar, height: row - 8, "data-profile": line.profile }));
    chart.append(svg("text", { x: label + bar + 6, y: i * row + 17 }, `${money(line.usd)} · ${line.hours.toFixed(2)} h`));
  });
  return chart;
}

async function overview() {
  const [status, failed, cost] = await Promise.all([get("/v1/status"), get("/v1/runs?state=failed"), get("/v1/cost")]);
  const stages = Object.keys(status.stages);
  const boards = await Promise.all(stages.map((stage) => get("/v1/leaderboard?stage=" + encodeURIComponent(stage))));
  document.getElementById("competition").textContent = `evalflow · ${status.competition}`;
  const share = status.total ? (100 * status.ended) / status.total : 0;
  const running = Object.entries(status.running_per_profile).map(([p, n]) => `${n} on ${p}`).join(", ");
  const progress = el("section", { id: "progress" },
    el("div", { class: "figures" },
      figure("ended", `${status.ended} / ${status.total}`, "runs ended"),
      figure("running", status.running, running ? `running (${running})` : "running"),
      figure("queued", status.queued, "queued"),
      figure("last-hour", status.ended_last_hour, "ended in the last hour"),
      figure("eta", eta(status), "ETA to the last run's end"),
      figure("cost", money(status.cost_usd), "cost so far"),
      figure("projected", money(status.projected_cost_usd), "projected total")),
    el("div", { class: "progress" }, el("div", { style: `width: ${share.toFixed(1)}%` })));
  if (status.budget) {
    const b = status.budget;
    progress.append(b.stopped ? el("p", { class: "stopped", id: "budget" }, "budget: " + b.stopped)
      : el("p", { id: "budget" }, `budget ${money(b.budget_usd)}: ${money(b.spent_usd)} spent, ${money(b.committed_usd)} committed`));
  }
  if (status.paused) progress.append(el("p", { class: "stopped" }, "launching paused: " + status.paused));
  for (const problem of status.stage_problems) {
    progress.append(el("p", { class: "stopped" }, `stage ${problem.stage} is not ready: ${problem.problem}`));
  }
  const stageRows = stages.map((stage) => {
    const p = status.stages[stage];
    return [stage, `${p.ended} / ${p.total}`, p.running, p.queued, p.ended_last_hour, eta(p), money(p.cost_usd), money(p.projected_cost_usd)];
  });
  const states = Object.entries(status.counts).filter(([, n]) => n > 0);
  const causes = new Map();
  for (const run of failed) {
    if (!causes.has(run.failure)) causes.set(run.failure, []);
    causes.get(run.failure).push(run);
  }
  const failures = [...causes.entries()].sort((a, b) => b[1].length - a[1].length).map(([cause, runs]) =>
    el("div", { class: "cause", "data-cause": cause },
      el("h3", {}, `${cause} (${runs.length})`),
      table(["run", "team", "evidence"], runs.map((run) => {
        const last = run.attempt_details[run.attempt_details.length - 1];
        const evidence = last && last.summary && last.summary !== run.reason ? last.summary : null;
        return [runLink(run.id), run.team, el("span", {}, run.reason || "", evidence ? el("div", { class: "muted" }, evidence) : null)];
      }))));
  const leaderboards = boards.map((board) => el("div", { class: "leaderboard", "data-stage": board.stage },
    el("h3", {}, `${board.stage} leaderboard (binary log loss, lower is better)`),
    board.entries.length === 0 ? el("p", { class: "muted" }, "no score published yet")
      : table(["rank", "team", "run", "score"], board.entries.map((e) =>
        [e.rank, e.team, runLink(`${e.submission}-${board.stage}`), e.score.toFixed(4)]))));
  return [
    progress,
    el("section", {}, el("h2", {}, "stages"),
      table(["stage", "ended", "running", "queued", "last hour", "ETA", "cost", "projected"], stageRows)),
    el("section", {}, el("h2", {}, "runs per state"), table(["state", "runs"], states.map(([s, n]) => [s, n]))),
    el("section", { id: "failures" }, el("h2", {}, "failures by cause"),
      failures.length ? failures : el("p", { class: "muted" }, "no run failed")),
    el("section", {}, el("h2", {}, "cost per profile"), costChart(cost)),
    el("section", { id: "leaderboards" }, el("h2", {}, "leaderboards"), leaderboards),
  ];
}

async function runPage(id) {
  const path = "/v1/runs/" + encodeURIComponent(id);
  const [run, history, log] = await Promise.all([get(path), get(path + "/history"), get(path + "/log")]);
  const facts = [
    ["state", run.state], ["team", run.team], ["stage", run.stage], ["profile", run.profile || ""],
    ["attempts", run.attempts], ["score", run.score === null ? "" : run.score.toFixed(4)],
    ["cost", money(run.cost_usd)], ["failure", run.reason || ""], ["waiting", run.waiting || ""],
  ].filter(([, value]) => value !== "");
  const attempts = run.attempt_details.map((a) =>
    [a.attempt, a.profile, a.summary || a.outcome || "running", a.running_secs === null ? "" : a.running_secs.toFixed(1), money(a.cost_usd)]);
  const output = log.output.flatMap((part) => [el("h3", {}, part.name), el("pre", { "data-part": part.name }, part.text || "(empty)")]);
  return [
    el("p", {}, el("a", { href: "#" }, "← all runs")),
    el("section", { id: "run" }, el("h2", { id: "run-id" }, run.id), table(["", ""], facts)),
    el("section", {}, el("h2", {}, "attempts"), table(["attempt", "profile", "how it ended", "ran s", "cost"], attempts)),
    el("section", { id: "history" }, el("h2", {}, "history"),
      table(["seq", "at", "event", "state after", "detail"], history.map((e) =>
        [e.seq, new Date(e.at_ms).toISOString().replace(".000Z", "Z"), e.event,
          e.placement ? `${e.state} (${e.placement})` : e.state, e.detail]))),
    el("section", { id: "log" }, el("h2", {}, log.attempt ? `output of attempt ${log.attempt}` : "output"),
      log.note ? el("p", { class: "muted" }, log.note) : null, output),
  ];
}

let timer = null;

async function draw() {
  clearTimeout(timer);
  const hash = decodeURIComponent(location.hash.replace(/^#/, ""));
  const main = document.getElementById("main");
  try {
    const parts = hash.startsWith("run/") ? await runPage(hash.slice(4)) : await overview();
    main.replaceChildren(...parts);
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (error) {
    document.getElementById("updated").textContent = "cannot reach the engine: " + error.message;
  }
  timer = setTimeout(draw, REFRESH_MS);
}

window.addEventListener("hashchange", draw);
draw();
