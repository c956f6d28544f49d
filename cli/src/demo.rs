//! `evalflow demo`: a sample competition evaluated end to end on this
//! machine, with live progress, then the leaderboards, the failures and the
//! cost. Run again on the same directory, it does no work twice; interrupted
//! and run again, it finishes with the same result.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use evalflow_activities::local::sandbox::{Isolation, check_reachable};
use evalflow_worker::config::Config;
use evalflow_worker::datadir::lock::{LockState, lock_for_engine};
use evalflow_worker::datadir::submit::{SubmissionRequest, prepare};
use evalflow_worker::node::{Mode, Node, NodeOptions};
use evalflow_worker::views::RunView;
use evalflow_workflow::{RunId, Stage, StateTag, SubmissionId, TeamId, Timestamp};
use indicatif::{ProgressBar, ProgressStyle};

use crate::backend::{LOCK_WAIT, supervisor};
use crate::{competition, output, signals};

/// How often progress is redrawn.
const PROGRESS_POLL: Duration = Duration::from_millis(250);

/// Where the demo goes without `--data-dir`: `evalflow-demo/` here, unless
/// job sandboxes cannot reach it (a clone under `/root`, run as root): then
/// `/var/tmp/evalflow-demo`, said in one line.
pub fn default_dir() -> PathBuf {
    let here = PathBuf::from("evalflow-demo");
    let cwd = std::env::current_dir().unwrap_or_default();
    match check_reachable(&cwd) {
        Ok(()) => here,
        Err(e) => {
            let elsewhere = PathBuf::from("/var/tmp/evalflow-demo");
            eprintln!("{e}\nso the demo goes to {} instead", elsewhere.display());
            elsewhere
        }
    }
}

/// Runs the demo in `data_dir`.
pub async fn run(data_dir: &Path, isolation: Isolation) -> Result<ExitCode> {
    let examples = competition::write_demo(data_dir)?;
    let lock = match lock_for_engine(data_dir, LOCK_WAIT)? {
        LockState::Acquired(lock) => lock,
        LockState::HeldBy(Some(info)) => bail!(
            "{} is served by an engine (pid {}) at {}: stop it first, or watch it with `evalflow --data-dir {} status`",
            data_dir.display(),
            info.pid,
            info.api,
            data_dir.display()
        ),
        LockState::HeldBy(None) => bail!(
            "{} is in use by another evalflow command that did not finish in {} s",
            data_dir.display(),
            LOCK_WAIT.as_secs()
        ),
    };
    let config = Config::load(data_dir)?;
    let now = Timestamp::now();
    let mut specs = Vec::new();
    for (example, path) in &examples {
        let stages: &[Stage] = if example.final_pick { &[Stage::Public, Stage::Private] } else { &[Stage::Public] };
        for stage in stages {
            let request = SubmissionRequest {
                id: SubmissionId::new(example.id)?,
                team: TeamId::new(example.team)?,
                stage: *stage,
                path: Some(path.clone()),
                image: None,
                cpu_only: false,
            };
            specs.push(prepare(&config, &request, now)?);
        }
    }
    let runs: Vec<RunId> = specs.iter().map(|s| s.run.clone()).collect();
    println!("evalflow demo: {} runs of {} example submissions in {}", runs.len(), examples.len(), data_dir.display());
    let options = NodeOptions { isolation, supervisor: supervisor()?, mode: Mode::Engine, runner: None };
    let node = Node::start(config, lock, options).await?;
    // Runs submitted by an earlier demo are not submitted again.
    let known: Vec<RunId> = node.runs(None, None, None).await?.into_iter().map(|r| r.id).collect();
    specs.retain(|spec| !known.contains(&spec.run));
    if let Some(refused) = node.submit(specs).await?.into_iter().find(|a| !a.accepted) {
        bail!("{}: {}", refused.run, refused.message);
    }
    let started = Instant::now();
    let finished = tokio::select! {
        result = progress(&node, &runs) => { result?; true }
        _ = signals::shutdown() => false,
    };
    if !finished {
        node.shutdown().await?;
        eprintln!(
            "interrupted: running jobs go on; run `evalflow demo --data-dir {}` again to finish",
            data_dir.display()
        );
        return Ok(ExitCode::from(130));
    }
    println!("{} runs ended in {:.1} s\n", runs.len(), started.elapsed().as_secs_f64());
    report(&node, &runs).await?;
    let astray = astray(&node, &examples).await?;
    node.shutdown().await?;
    if !astray.is_empty() {
        eprintln!(
            "\nthese runs did not end as the examples document, so this machine does not run evalflow as it should:"
        );
        for line in &astray {
            eprintln!("  {line}");
        }
        eprintln!("read their logs (`evalflow --data-dir {} logs RUN`) and the host checks above", data_dir.display());
        return Ok(ExitCode::FAILURE);
    }
    println!(
        "\ndata, jobs and logs are in {}: try `evalflow --data-dir {} history oom-g4-public`",
        data_dir.display(),
        data_dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Shows counts per state and an ETA until every run in `runs` has ended.
async fn progress(node: &Node, runs: &[RunId]) -> Result<()> {
    let bar = ProgressBar::new(runs.len() as u64);
    bar.set_style(ProgressStyle::with_template(
        "{spinner} {elapsed:>4} [{bar:30}] {pos}/{len} ended  {msg}  ETA {eta}",
    )?);
    loop {
        let views = node.runs(None, None, None).await?;
        let mine: Vec<&RunView> = views.iter().filter(|v| runs.contains(&v.id)).collect();
        let mut counts: BTreeMap<StateTag, usize> = BTreeMap::new();
        for view in &mine {
            *counts.entry(view.state).or_default() += 1;
        }
        let ended = mine.iter().filter(|v| v.state.is_terminal()).count();
        let words: Vec<String> = counts.iter().map(|(state, n)| format!("{n} {state}")).collect();
        bar.set_position(ended as u64);
        bar.set_message(words.join(" · "));
        if ended == runs.len() {
            bar.finish_and_clear();
            return Ok(());
        }
        if node.stopped() {
            bail!("the engine stopped: see the errors above");
        }
        tokio::time::sleep(PROGRESS_POLL).await;
    }
}

/// The runs of the examples that did not end as documented, in words.
async fn astray(node: &Node, examples: &[(competition::Example, PathBuf)]) -> Result<Vec<String>> {
    let views = node.runs(None, None, None).await?;
    let mut astray = Vec::new();
    for (example, _) in examples {
        for view in views.iter().filter(|v| v.submission.as_str() == example.id) {
            let ended = match view.state {
                StateTag::Published => "published".to_owned(),
                _ => view.failure.clone().unwrap_or_else(|| view.state.to_string()),
            };
            if ended != example.ends {
                let reason = view.reason.as_deref().unwrap_or_default();
                astray.push(format!("{}: {ended} ({reason}), documented: {}", view.id, example.ends));
            }
        }
    }
    Ok(astray)
}

async fn report(node: &Node, runs: &[RunId]) -> Result<()> {
    for stage in Stage::ALL {
        output::leaderboard(&node.leaderboard(stage).await?);
        println!();
    }
    let views: Vec<RunView> = node.runs(None, None, None).await?.into_iter().filter(|v| runs.contains(&v.id)).collect();
    output::runs(&views);
    println!();
    output::failures(&views);
    println!();
    output::cost(&node.cost().await?);
    Ok(())
}
