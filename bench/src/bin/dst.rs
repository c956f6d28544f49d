//! Deterministic simulation testing, many seeds at once, on every core:
//!
//! ```text
//! cargo run --release -p evalflow-bench --bin dst -- --seeds 10000 [--from S] [--first-failure]
//! cargo run --release -p evalflow-bench --bin dst -- --seed S      # one seed, in detail
//! ```
//!
//! Each seed is a random competition with faults (`sim::seeded`), run on
//! the real engine and dispatcher; a seed that breaks an invariant is
//! printed with how to replay it, and the run exits 1. At the end: seeds
//! per second, and what the seeds did in all. With `--first-failure` it
//! stops at the first seed that breaks one and says how many it took.

use std::process::ExitCode;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use evalflow_workflow::StateTag;
use evalflow_workflow::sim::{FaultCounts, Scenario, Simulated, Violation, check, seeded, simulate};
use evalflow_workflow::store::WorkflowStore;

/// What one seed did.
#[derive(Default)]
struct Tally {
    seeds: u64,
    runs: u64,
    steps: u64,
    ended: [u64; 3],
    faults: FaultCounts,
}

impl Tally {
    fn add(&mut self, scenario: &Scenario, simulated: &Simulated) {
        self.seeds += 1;
        self.runs += scenario.submissions.len() as u64;
        self.steps += simulated.steps;
        let counts = simulated.store.counts().unwrap_or_default();
        for (i, tag) in [StateTag::Published, StateTag::Failed, StateTag::Cancelled].into_iter().enumerate() {
            self.ended[i] += counts[tag];
        }
        self.faults += simulated.faults;
    }

    fn merge(&mut self, other: &Tally) {
        self.seeds += other.seeds;
        self.runs += other.runs;
        self.steps += other.steps;
        (0..3).for_each(|i| self.ended[i] += other.ended[i]);
        self.faults += other.faults;
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let known = ["--seeds", "--from", "--seed", "--first-failure"];
    if let Some(unknown) = args.iter().find(|a| a.starts_with("--") && !known.contains(&a.as_str())) {
        usage(&format!("unknown option {unknown}"));
    }
    let value = |flag: &str| -> Option<u64> {
        let at = args.iter().position(|a| a == flag)?;
        let text = args.get(at + 1).unwrap_or_else(|| usage(&format!("{flag} needs a number")));
        Some(text.parse().unwrap_or_else(|_| usage(&format!("{flag} {text}: not a number"))))
    };
    if let Some(seed) = value("--seed") {
        return one(seed);
    }
    let from = value("--from").unwrap_or(0);
    let count = value("--seeds").unwrap_or(10_000);
    let first_failure = args.iter().any(|a| a == "--first-failure");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (next, stop) = (AtomicU64::new(from), AtomicBool::new(false));
    let failures: Mutex<Vec<(u64, Vec<Violation>)>> = Mutex::new(Vec::new());
    let started = Instant::now();
    let tallies: Vec<Tally> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..cores)
            .map(|_| {
                scope.spawn(|| {
                    let mut tally = Tally::default();
                    while !stop.load(Ordering::Relaxed) {
                        let seed = next.fetch_add(1, Ordering::Relaxed);
                        if seed >= from + count {
                            break;
                        }
                        let seeded::Checked { scenario, simulated, violations } = seeded::run(seed);
                        if let Some(simulated) = &simulated {
                            tally.add(&scenario, simulated);
                        }
                        if !violations.is_empty() {
                            failures.lock().unwrap_or_else(|p| p.into_inner()).push((seed, violations));
                            stop.store(first_failure, Ordering::Relaxed);
                        }
                    }
                    tally
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap_or_else(|_| panic!("a simulation thread panicked"))).collect()
    });
    let secs = started.elapsed().as_secs_f64();
    let mut all = Tally::default();
    tallies.iter().for_each(|t| all.merge(t));
    let mut failures = failures.into_inner().unwrap_or_else(|p| p.into_inner());
    failures.sort_by_key(|(seed, _)| *seed);
    for (seed, violations) in &failures {
        println!("seed {seed} broke {} invariant(s):", violations.len());
        for violation in violations.iter().take(10) {
            println!("  {violation}");
        }
        println!("  replay it: cargo run --release -p evalflow-bench --bin dst -- --seed {seed}");
    }
    let [published, failed, cancelled] = all.ended;
    println!(
        "{} seeds in {secs:.1} s: {:.0} seeds/s on {cores} cores; {} runs ({published} published, {failed} failed, \
         {cancelled} cancelled), {} steps",
        all.seeds,
        all.seeds as f64 / secs,
        all.runs,
        all.steps
    );
    let f = all.faults;
    println!(
        "faults injected: {} engine crashes, {} failed flushes, {} worker crashes, {} messages lost, {} duplicated, \
         {} tries throttled, {} clock jumps",
        f.engine_crashes, f.failed_flushes, f.worker_crashes, f.dropped, f.duplicated, f.throttled, f.clock_jumps
    );
    match failures.first() {
        None => {
            println!("every invariant held");
            ExitCode::SUCCESS
        }
        Some((seed, _)) if first_failure => {
            println!("found after {} seeds (seed {seed})", seed - from + 1);
            ExitCode::FAILURE
        }
        Some(_) => {
            println!("{} of {} seeds broke an invariant", failures.len(), all.seeds);
            ExitCode::FAILURE
        }
    }
}

/// One seed, in detail: the fleet's use and every run's end.
fn one(seed: u64) -> ExitCode {
    let scenario = seeded::scenario(seed);
    let simulated = match simulate(&scenario, seed) {
        Ok(simulated) => simulated,
        Err(e) => {
            println!("seed {seed}: the engine failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    let start = scenario.submissions.iter().map(|(s, _)| s.submitted_at).min().unwrap_or_default();
    println!(
        "seed {seed}: {} runs, {} steps, the last ended at +{:.1} h; faults: {:?}",
        scenario.submissions.len(),
        simulated.steps,
        simulated.end.since(start).as_secs_f64() / 3600.0,
        simulated.faults
    );
    for (profile, (hours, peak)) in simulated.world.usage() {
        println!("  {profile}: {hours:.1} instance-hours, {peak} at most at once");
    }
    for (spec, _) in &scenario.submissions {
        if let Ok(Some(stored)) = simulated.store.load(&spec.run) {
            let status = &stored.run.status;
            let attempts: Vec<String> = status
                .attempts
                .iter()
                .map(|a| format!("{}: {}", a.profile, a.end.as_ref().map_or("-".into(), |e| format!("{e:?}"))))
                .collect();
            println!("  {} {} v{} [{}]", spec.run, status.state.tag(), status.version, attempts.join("; "));
        }
    }
    let violations = check(&scenario, &simulated);
    for violation in &violations {
        println!("  broken: {violation}");
        for entry in simulated.store.history(&violation.run).unwrap_or_default() {
            let at = entry.at.since(start).as_secs_f64();
            println!(
                "    #{} +{at:.0} s {:?} -> {} v{}",
                entry.seq,
                entry.input,
                entry.status.state.tag(),
                entry.status.version
            );
            println!("       {:?}", entry.disposition);
        }
    }
    if violations.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

fn usage(problem: &str) -> ! {
    eprintln!("error: {problem}\nusage: dst [--seeds N] [--from S] [--first-failure] | --seed S");
    std::process::exit(2)
}
