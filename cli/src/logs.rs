//! `evalflow logs`: how a run's job ended and the end of its output, read
//! from its job directory.

use std::fs;

use anyhow::{Result, bail};
use evalflow_activities::local::job::{JobPaths, tail};
use evalflow_worker::config::Config;
use evalflow_workflow::{Attempt, RunId, job_name};

/// Prints the job of `run`'s `attempt` (the latest when `None`).
pub fn print(config: &Config, run: &RunId, attempt: Option<u32>) -> Result<()> {
    let attempt = match attempt {
        Some(n) => Attempt(n),
        None => latest_attempt(config, run)?,
    };
    let paths = JobPaths::new(&config.jobs_dir(), &job_name(run, attempt));
    if !paths.dir().exists() {
        bail!("run {run} has no job for attempt {attempt} in {}", config.jobs_dir().display());
    }
    println!("job {} ({})", job_name(run, attempt), paths.dir().display());
    match paths.read_status()? {
        Some(status) => {
            println!("ended: {}", evalflow_worker::views::outcome_words(&status.outcome));
            if let Some(note) = &status.note {
                println!("note: {note}");
            }
            if let Some(peak) = status.usage.peak_memory_mib {
                println!("peak memory: {peak} MiB");
            }
        }
        None if paths.supervised()? => println!("running"),
        None => println!("not running, and no status: its supervisor is gone"),
    }
    println!("--- stdout (last 4 KiB) ---\n{}", tail(&paths.stdout()));
    println!("--- stderr (last 4 KiB) ---\n{}", tail(&paths.stderr()));
    Ok(())
}

fn latest_attempt(config: &Config, run: &RunId) -> Result<Attempt> {
    let prefix = format!("{}-a", job_name(run, Attempt(0)).trim_end_matches("-a0"));
    let mut latest = None;
    if let Ok(entries) = fs::read_dir(config.jobs_dir()) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(n) = name.strip_prefix(&prefix).and_then(|n| n.parse::<u32>().ok()) {
                latest = latest.max(Some(n));
            }
        }
    }
    match latest {
        Some(n) => Ok(Attempt(n)),
        None => bail!("run {run} has no job yet in {}", config.jobs_dir().display()),
    }
}
