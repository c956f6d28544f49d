//! The same shape on the peers a user would pick instead: DBOS (Python, on
//! SQLite) and Restate (its server and TypeScript SDK), each a workflow of
//! 6 durable no-op steps per run. `scripts/bench` installs them under
//! `target/bench/peers/` and names that directory with `--peers`; each
//! script prints `runs/s transitions/s` and stops what it started.

use std::path::Path;
use std::process::Command;

use crate::Error;

/// A peer's figures.
pub struct Peer {
    /// Its name.
    pub name: &'static str,
    /// Runs per second.
    pub runs_per_sec: f64,
    /// Durable steps per second.
    pub transitions_per_sec: f64,
}

/// Runs the two peers installed in `dir`, `runs` runs each (DBOS a tenth:
/// it is two orders of magnitude slower).
pub fn measure(dir: &Path, runs: usize) -> Result<Vec<Peer>, Error> {
    let scratch = crate::scratch()?;
    let dbos_runs = (runs / 10).max(100);
    let mut dbos = Command::new(dir.join("dbos/bin/python"));
    dbos.arg(dir.join("dbos_bench.py"))
        .args([dbos_runs.to_string(), scratch.path().join("dbos.sqlite").display().to_string()])
        .current_dir(dir);
    let mut restate = Command::new(dir.join("node_modules/.bin/node"));
    restate
        .arg(dir.join("restate_bench.mjs"))
        .args([runs.to_string(), scratch.path().join("restate").display().to_string()])
        .env("RESTATE_LOGGING", "WARN")
        .current_dir(dir);
    Ok(vec![figures("DBOS (SQLite)", &mut dbos)?, figures("Restate", &mut restate)?])
}

fn figures(name: &'static str, command: &mut Command) -> Result<Peer, Error> {
    let output = command.stderr(std::process::Stdio::null()).output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let last = text.lines().last().unwrap_or_default();
    let figures: Vec<f64> = last.split_whitespace().filter_map(|f| f.parse().ok()).collect();
    match (output.status.success(), figures.as_slice()) {
        (true, &[runs_per_sec, transitions_per_sec]) => Ok(Peer { name, runs_per_sec, transitions_per_sec }),
        _ => Err(format!("{name}'s benchmark failed ({}): {text}", output.status).into()),
    }
}
