//! The organizer's view on a real `serve` with real sandboxed jobs: status
//! tells progress, ETA and cost, and a budget stops new launches (running
//! jobs finish, the rest stay queued with the reason), holds across a
//! restart, and resumes when raised, by `evalflow reload` or a restart,
//! with nothing lost, failed or launched twice.

use std::fs;
use std::path::Path;
use std::time::Duration;

use evalflow_tests::cli::{Cli, wait_until};
use evalflow_tests::local::{competition, runs, serve, submit};
use evalflow_worker::views::StatusView;
use evalflow_workflow::StateTag;

const RUNS: usize = 10;

fn set_budget(cli: &Cli, usd: f64) {
    let path = cli.data_dir.join("evalflow.toml");
    let config = fs::read_to_string(&path).unwrap();
    let config: String = config.lines().filter(|l| !l.starts_with("budget_usd")).map(|l| format!("{l}\n")).collect();
    fs::write(&path, config.replace("[policy]\n", &format!("[policy]\nbudget_usd = {usd}\n"))).unwrap();
}

fn status(cli: &Cli) -> StatusView {
    cli.json(&["status", "--json"])
}

fn published(cli: &Cli) -> usize {
    runs(cli).iter().filter(|r| r.state == StateTag::Published).count()
}

/// Waits until the budget stops launching and no job runs; returns the status then.
fn stopped(cli: &Cli) -> StatusView {
    let mut last = None;
    wait_until("the budget stops launching and the running jobs end", Duration::from_secs(120), || {
        let now = status(cli);
        let stops = now.budget.as_ref().is_some_and(|b| b.allowance.admits == Some(0));
        let idle = now.progress.whole.running == 0 && now.counts.values().sum::<u64>() == RUNS as u64;
        last = Some(now);
        stops && idle
    });
    last.unwrap()
}

fn submit_all(cli: &Cli, root: &Path) {
    for n in 0..RUNS {
        submit(cli, root, &format!("s{n}"), "time.sleep(2)\nhalves()\n");
    }
}

#[test]
fn a_budget_stops_launches_and_resumes_when_raised_with_nothing_lost() {
    let dir = tempfile::tempdir().unwrap();
    let cli = competition(&dir.path().join("competition"));
    // A run here costs about $0.0007 (2 s on a g4 at $0.526 an hour, at 0.45 of a P3's speed).
    set_budget(&cli, 0.003);
    let engine = serve(&cli);
    submit_all(&cli, &dir.path().join("subs"));

    let first = stopped(&cli);
    let whole = &first.progress.whole;
    let budget = first.budget.as_ref().unwrap();
    let ended = published(&cli);
    assert!((1..RUNS).contains(&ended), "some ran, not all: {ended}");
    assert_eq!((whole.queued, whole.ended), ((RUNS - ended) as u64, ended as u64), "nothing failed: {first:?}");
    assert!(whole.cost_usd <= 0.003 * 1.5, "the budget is kept (within one run's misestimate): {whole:?}");
    assert_eq!(whole.eta_secs, None, "stopped, the last run's end cannot be foreseen");
    assert!(whole.projected_cost_usd.unwrap() > whole.cost_usd, "the queued runs are projected: {whole:?}");
    assert!(budget.stopped.as_deref().unwrap().contains("raise [policy] budget_usd"), "{budget:?}");
    let said = cli.ok(&["status"]);
    assert!(said.contains("budget: the budget of $0.00300 "), "{said}");
    let queued = runs(&cli).into_iter().find(|r| r.state == StateTag::Queued).unwrap();
    assert!(
        queued.waiting.as_deref().unwrap().starts_with("waiting for the budget: the budget of $0.00300"),
        "{queued:?}"
    );

    // Restarted with the same budget, the engine launches nothing more.
    drop(engine);
    let engine = serve(&cli);
    std::thread::sleep(Duration::from_secs(3));
    let again = status(&cli);
    assert_eq!((again.progress.whole.running, published(&cli)), (0, ended), "{again:?}");

    // Raised and reloaded: more runs launch, until the new budget stops them.
    set_budget(&cli, 0.005);
    let said = cli.ok(&["reload"]);
    assert!(said.contains("budget: $0.00500 (was $0.00300)"), "{said}");
    wait_until("more runs are published", Duration::from_secs(120), || published(&cli) > ended);

    // Raised with the engine stopped, and restarted: every run ends.
    drop(engine);
    set_budget(&cli, 1.0);
    let _engine = serve(&cli);
    wait_until("every run is published", Duration::from_secs(180), || published(&cli) == RUNS);
    for run in runs(&cli) {
        assert_eq!(run.attempts, 1, "launched once, none lost or launched twice: {run:?}");
    }
    let done = status(&cli);
    let whole = &done.progress.whole;
    assert_eq!((whole.ended, whole.eta_secs, whole.remaining_cost_usd), (RUNS as u64, Some(0), Some(0.0)));
    assert_eq!(whole.ended_last_hour, RUNS as u64);
    assert_eq!(done.budget.unwrap().stopped, None);
}
