//! SIGKILL the engine and the workers of an AWS fleet at random points,
//! start them again, and check that every run completes with exactly one
//! Batch job per (run, attempt) in moto.

use std::collections::BTreeSet;
use std::path::Path;

use std::time::{Duration, Instant};

use evalflow_tests::aws::{AwsCompetition, Tuning};
use evalflow_tests::cli::{Cli, Process};
use evalflow_worker::views::RunView;
use evalflow_workflow::StateTag;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

const RUNS: usize = 60;
/// Kills that must land while runs are still in progress.
const KILLS_DURING_WORK: usize = 12;
/// Kills at most.
const KILLS_MAX: usize = 60;

fn block_on<F: Future>(future: F) -> F::Output {
    tokio::runtime::Runtime::new().unwrap().block_on(future)
}

fn published(cli: &Cli) -> usize {
    let runs: Vec<RunView> = cli.json(&["runs", "--json"]);
    runs.iter().filter(|r| r.state == StateTag::Published).count()
}

/// The fleet's processes: the engine, then two workers.
struct Fleet<'a> {
    cli: &'a Cli,
    logs: &'a Path,
    processes: [Process; 3],
    starts: usize,
}

impl<'a> Fleet<'a> {
    fn start(cli: &'a Cli, logs: &'a Path) -> Fleet<'a> {
        let processes = [0, 1, 2].map(|slot| Self::spawn(cli, logs, slot, 0));
        Fleet { cli, logs, processes, starts: 3 }
    }

    fn spawn(cli: &Cli, logs: &Path, slot: usize, start: usize) -> Process {
        let args: &[&str] = if slot == 0 { &["serve"] } else { &["worker"] };
        cli.spawn_logged(args, &logs.join(format!("p{slot}-{start}.log")))
    }

    /// SIGKILLs process `slot` and starts it again.
    fn kill_and_restart(&mut self, slot: usize) {
        let process = &mut self.processes[slot];
        process.kill().unwrap(); // SIGKILL
        process.wait().unwrap();
        self.starts += 1;
        self.processes[slot] = Self::spawn(self.cli, self.logs, slot, self.starts);
    }
}

#[test]
fn an_aws_fleet_killed_at_random_points_completes_every_run_with_one_job_each() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let tuning = Tuning { visibility_timeout_secs: 4, reconcile_after_secs: 1, resend_after_secs: 30 };
    let competition = block_on(AwsCompetition::create(&dir.join("c"), "crash", tuning));
    let cli = &competition.cli;
    cli.ok(&["aws", "bootstrap"]);
    block_on(competition.upload_labels());
    let mut manifest = String::new();
    for n in 0..RUNS {
        block_on(competition.stage_predictions(&format!("s{n}-public"), 1, 0.5));
        manifest.push_str(&format!(
            "{{\"id\": \"s{n}\", \"team\": \"t{n}\", \"stage\": \"public\", \"image\": \"registry.example/t{n}:1\"}}\n"
        ));
    }
    std::fs::write(dir.join("manifest.jsonl"), manifest).unwrap();
    cli.ok(&["submit", "--manifest", dir.join("manifest.jsonl").to_str().unwrap()]);

    let seed = std::env::var("EVALFLOW_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("seed {seed} (set EVALFLOW_CRASH_SEED to repeat)");
    let mut rng = StdRng::seed_from_u64(seed);
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let mut fleet = Fleet::start(cli, &logs);
    let mut kills = [0; 3];
    let mut during_work = 0;
    let started = Instant::now();
    while during_work < KILLS_DURING_WORK && kills.iter().sum::<usize>() < KILLS_MAX {
        std::thread::sleep(Duration::from_millis(rng.random_range(50..500)));
        // The engine one time in three, each worker one time in three.
        let slot = kills.iter().sum::<usize>() % 3;
        fleet.kill_and_restart(slot);
        kills[slot] += 1;
        if published(cli) < RUNS {
            during_work += 1;
        }
    }
    eprintln!(
        "{} kills (engine {}, workers {}), {during_work} while runs were in progress, in {:.1} s",
        kills.iter().sum::<usize>(),
        kills[0],
        kills[1] + kills[2],
        started.elapsed().as_secs_f64()
    );
    assert!(during_work >= KILLS_DURING_WORK, "the runs ended before enough kills landed");
    let deadline = Instant::now() + Duration::from_secs(120);
    while published(cli) < RUNS {
        if Instant::now() > deadline {
            let stuck: Vec<String> = cli
                .json::<Vec<RunView>>(&["runs", "--json"])
                .into_iter()
                .filter(|r| r.state != StateTag::Published)
                .map(|r| format!("{} {} a{}", r.id, r.state, r.attempts))
                .collect();
            let status = cli.ok(&["status"]);
            panic!("runs not published after 120 s: {stuck:?}\n{status}\nlogs in {}", logs.display());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(fleet); // kills them all

    let jobs = block_on(competition.jobs());
    let names: Vec<&str> = jobs.iter().map(|(name, _)| name.as_str()).collect();
    let unique: BTreeSet<&str> = names.iter().copied().collect();
    assert_eq!(names.len(), unique.len(), "a (run, attempt) has two Batch jobs: {names:?}");
    let expected: BTreeSet<String> = (0..RUNS).map(|n| format!("ef-s{n}-public-a1")).collect();
    assert_eq!(unique, expected.iter().map(String::as_str).collect(), "one job per run, each on its first attempt");
    let runs: Vec<RunView> = cli.json(&["runs", "--json"]);
    assert!(runs.iter().all(|r| r.attempts == 1 && r.score.is_some()), "{runs:?}");
    assert!(cli.ok(&["replay", "--all"]).contains(&format!("{RUNS} runs replayed, 0 diverge")));
}
