//! Writing local competitions: `evalflow init` (an empty one) and the demo's
//! sample (a synthetic test set with hidden labels and eight example
//! submissions).

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use evalflow_worker::config::CONFIG_FILE;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// The values that differ between a real local competition and the demo's.
pub struct Template {
    /// The competition's name.
    pub name: &'static str,
    /// The wall-clock limit of one job.
    pub time_limit_secs: u64,
    /// Host memory of the g4, p3 and cpu profiles, in MiB.
    pub memory_mib: [u64; 3],
    /// Jobs at once.
    pub max_concurrent_jobs: usize,
    /// Between SIGTERM and SIGKILL.
    pub kill_grace_secs: u64,
}

/// A competition for real submissions on this machine.
pub const INIT: Template = Template {
    name: "local-competition",
    time_limit_secs: 3600,
    memory_mib: [4096, 16384, 2048],
    max_concurrent_jobs: 2,
    kill_grace_secs: 30,
};

/// The demo: small limits, so that its examples meet them quickly.
pub const DEMO: Template = Template {
    name: "evalflow-demo",
    time_limit_secs: 12,
    memory_mib: [160, 1024, 256],
    max_concurrent_jobs: 3,
    kill_grace_secs: 2,
};

impl Template {
    /// The `evalflow.toml` text.
    pub fn config(&self) -> String {
        let [g4, p3, cpu] = self.memory_mib;
        format!(
            r#"# evalflow competition: see README.md for every field.

[competition]
name = "{name}"
# Binary log loss of the probability that a file is FAKE, probabilities
# clipped to [1e-15, 1 - 1e-15]: lower is better.
metric = "binary_log_loss"

# Each stage's test set (the files submissions predict, mounted read-only at
# $EVALFLOW_INPUT_DIR) and its private labels (filename,label with 1 = FAKE),
# which no submission can reach.
[stages.public]
test_set = "data/public/test"
labels = "data/public/labels.csv"

[stages.private]
test_set = "data/private/test"
labels = "data/private/labels.csv"

[policy]
time_limit_secs = {time_limit}

[policy.retry]
interruptions_max = 3
backoff_base_secs = 5
backoff_max_secs = 60
attempts_max = 8

# The placement ladder. A run starts on the cheapest profile of its ladder
# (GPU, or CPU for cpu_only submissions); out of memory, it moves to the
# cheapest profile with more of what ran out. Locally, host_memory_mib is the
# memory limit of the job's whole process tree; prices and speeds are those
# of the AWS instances each profile stands for, so costs mean something.
[[policy.profile]]
name = "g4"
host_memory_mib = {g4}
gpu_memory_mib = 15360
vcpus = 4
price_per_hour_usd = 0.526
relative_speed = 0.45

[[policy.profile]]
name = "p3"
host_memory_mib = {p3}
gpu_memory_mib = 16384
vcpus = 8
price_per_hour_usd = 3.06
relative_speed = 1.0

[[policy.profile]]
name = "cpu"
host_memory_mib = {cpu}
vcpus = 4
price_per_hour_usd = 0.199
relative_speed = 1.0
cpu_only = true

[local]
max_concurrent_jobs = {jobs}
pids_max = 128
disk_max_mib = 256
kill_grace_secs = {grace}
"#,
            name = self.name,
            time_limit = self.time_limit_secs,
            jobs = self.max_concurrent_jobs,
            grace = self.kill_grace_secs,
        )
    }
}

/// Writes an empty competition in `dir`: its config and empty stages.
pub fn init(dir: &Path, template: &Template) -> Result<()> {
    let config = dir.join(CONFIG_FILE);
    if config.exists() {
        bail!("{} exists: not overwriting it", config.display());
    }
    for stage in ["public", "private"] {
        let stage_dir = dir.join("data").join(stage);
        fs::create_dir_all(stage_dir.join("test")).with_context(|| format!("cannot create {}", stage_dir.display()))?;
        let labels = stage_dir.join("labels.csv");
        if !labels.exists() {
            fs::write(&labels, "filename,label\n").with_context(|| format!("cannot write {}", labels.display()))?;
        }
    }
    fs::write(&config, template.config()).with_context(|| format!("cannot write {}", config.display()))
}

/// Frames per synthetic clip.
const FRAMES: usize = 48;

/// Writes a stage's synthetic test set: `clips` small files, half of them
/// FAKE. A clip is a random walk; a fake one carries an alternating jitter of
/// random strength, which a detector can find but not always.
pub fn write_test_set(dir: &Path, stage: &str, clips: usize, seed: u64) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let test = dir.join("data").join(stage).join("test");
    fs::create_dir_all(&test)?;
    let mut labels = String::from("filename,label\n");
    for index in 0..clips {
        let fake = rng.random_bool(0.5);
        let jitter = if fake { rng.random_range(0.05..0.6) } else { 0.0 };
        let mut level: f64 = rng.random_range(-5.0..5.0);
        let mut frames = String::new();
        for frame in 0..FRAMES {
            level += rng.random_range(-0.5..0.5);
            let sign = if frame % 2 == 0 { 1.0 } else { -1.0 };
            let _ = writeln!(frames, "{:.4}", level + sign * jitter);
        }
        let name = format!("clip_{index:04}.txt");
        fs::write(test.join(&name), frames)?;
        let _ = writeln!(labels, "{name},{}", u8::from(fake));
    }
    fs::write(dir.join("data").join(stage).join("labels.csv"), labels)?;
    Ok(())
}

/// An example submission: its id, team, whether it is CPU-only, and its program.
pub struct Example {
    /// The submission id.
    pub id: &'static str,
    /// Its team.
    pub team: &'static str,
    /// Whether it runs on the CPU ladder.
    pub cpu_only: bool,
    /// Whether it is one of its team's final picks, re-run on the private stage.
    pub final_pick: bool,
    /// What it is for, in words.
    pub about: &'static str,
    /// How each of its runs ends, as documented: `published`, or the
    /// failure kind of a failed run.
    pub ends: &'static str,
    /// `predict.py`.
    pub program: String,
}

/// The Python that reads the clips and scores one by its jitter.
const READ_CLIPS: &str = r#"import math, os, sys
INPUT = os.environ["EVALFLOW_INPUT_DIR"]
OUTPUT = os.environ["EVALFLOW_OUTPUT_DIR"]
files = sorted(os.listdir(INPUT))

def jitter(name):
    with open(os.path.join(INPUT, name)) as f:
        x = [float(line) for line in f if line.strip()]
    d2 = [x[i + 1] - 2 * x[i] + x[i - 1] for i in range(1, len(x) - 1)]
    return sum(abs(v) for v in d2) / len(d2)

def write(probabilities):
    with open(os.path.join(OUTPUT, "submission.csv"), "w") as f:
        f.write("filename,label\n")
        for name in files:
            f.write("%s,%.6f\n" % (name, probabilities[name]))
"#;

/// The Python that predicts from the jitter: a logistic curve around `threshold`.
fn predict(scale: f64, threshold: f64) -> String {
    format!(
        "write({{n: 1 / (1 + math.exp(-{scale} * (jitter(n) - {threshold}))) for n in files}})\n\
         print('scored %d clips' % len(files))\n"
    )
}

/// The demo's eight examples.
pub fn examples(labels_path: &Path) -> Vec<Example> {
    let hog = |mib: u64| {
        format!(
            "{READ_CLIPS}\nblock = bytearray({mib} * 1024 * 1024)\nfor i in range(0, len(block), 4096):\n    block[i] = 1\n\
             print('holding {mib} MiB')\n{}",
            predict(8.0, 0.5)
        )
    };
    vec![
        Example {
            id: "good",
            team: "alpha",
            cpu_only: false,
            final_pick: true,
            about: "a real, if simple, detector",
            ends: "published",
            program: format!("{READ_CLIPS}\n{}", predict(20.0, 0.45)),
        },
        Example {
            id: "baseline",
            team: "baseline",
            cpu_only: true,
            final_pick: true,
            about: "0.5 everywhere, on the CPU ladder",
            ends: "published",
            program: format!("{READ_CLIPS}\nwrite({{n: 0.5 for n in files}})\n"),
        },
        Example {
            id: "oom-g4",
            team: "beta",
            cpu_only: false,
            final_pick: false,
            about: "needs 220 MiB: more than g4 has, fits p3",
            ends: "published",
            program: hog(220),
        },
        Example {
            id: "oom-all",
            team: "gamma",
            cpu_only: false,
            final_pick: false,
            about: "needs 1.5 GiB: fits nowhere",
            ends: "out_of_memory",
            program: hog(1536),
        },
        Example {
            id: "slow",
            team: "delta",
            cpu_only: false,
            final_pick: false,
            about: "runs past the time limit",
            ends: "timed_out",
            program: "import time\ntime.sleep(3600)\n".into(),
        },
        Example {
            id: "crash",
            team: "epsilon",
            cpu_only: false,
            final_pick: false,
            about: "raises an exception",
            ends: "crashed",
            program: "raise RuntimeError('model weights not found')\n".into(),
        },
        Example {
            id: "bad-csv",
            team: "zeta",
            cpu_only: false,
            final_pick: false,
            about: "writes a probability of 1.7",
            ends: "invalid_predictions",
            program: format!("{READ_CLIPS}\np = {{n: 0.5 for n in files}}\np[files[3]] = 1.7\nwrite(p)\n"),
        },
        Example {
            id: "escape",
            team: "mallory",
            cpu_only: false,
            final_pick: false,
            about: "tries to reach the network and read the labels",
            ends: "published",
            program: escape(labels_path),
        },
    ]
}

/// A submission that tries to leave its sandbox. Had it read the labels, it
/// would predict them exactly and top the leaderboard with a log loss near 0.
fn escape(labels_path: &Path) -> String {
    format!(
        r#"{READ_CLIPS}
import socket
LABELS = {labels:?}
stolen = None
try:
    with open(LABELS) as f:
        stolen = dict(line.strip().split(",") for line in f.readlines()[1:])
    print("labels: READ", file=sys.stderr)
except OSError as e:
    print("labels: blocked (%s)" % e.strerror, file=sys.stderr)
for host, port in [("1.1.1.1", 443), ("127.0.0.1", 22), ("10.0.2.2", 80)]:
    try:
        socket.create_connection((host, port), timeout=2).close()
        print("network %s:%d: OPEN" % (host, port), file=sys.stderr)
    except OSError as e:
        print("network %s:%d: blocked (%s)" % (host, port, e), file=sys.stderr)
if stolen:
    write({{n: float(stolen[n]) for n in files}})
else:
    write({{n: 0.5 for n in files}})
"#,
        labels = labels_path.display().to_string()
    )
}

/// Writes the demo's sample competition in `dir`, unless it is there already.
/// Returns the example submissions' directories.
pub fn write_demo(dir: &Path) -> Result<Vec<(Example, PathBuf)>> {
    // evalflow.toml is written last: a demo killed while writing its
    // competition writes all of it again next time.
    let fresh = !dir.join(CONFIG_FILE).exists();
    if fresh {
        write_test_set(dir, "public", 300, 7)?;
        write_test_set(dir, "private", 200, 8)?;
    }
    let labels = std::path::absolute(dir.join("data/public/labels.csv"))?;
    let mut written = Vec::new();
    for example in examples(&labels) {
        let path = dir.join("examples").join(example.id);
        if fresh || !path.exists() {
            fs::create_dir_all(&path)?;
            let manifest = format!(
                "# {}\ncommand = [\"python3\", \"predict.py\"]\ncpu_only = {}\n",
                example.about, example.cpu_only
            );
            fs::write(path.join("submission.toml"), manifest)?;
            fs::write(path.join("predict.py"), &example.program)?;
        }
        written.push((example, path));
    }
    if fresh {
        init(dir, &DEMO)?;
    }
    Ok(written)
}
