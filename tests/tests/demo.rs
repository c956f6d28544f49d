//! `evalflow demo` end to end: the real binary, the real sandbox, the real
//! OOM escalation from g4 to p3.

use std::collections::BTreeMap;
use std::fs;
use std::process::Command;

use evalflow_activities::leaderboard::Leaderboard;
use evalflow_tests::cli::Cli;
use evalflow_worker::views::{EventView, RunView, StatusView};
use evalflow_workflow::{Event, JobOutcome, Resource, Stage, StateTag};

fn runs(cli: &Cli) -> BTreeMap<String, RunView> {
    cli.json::<Vec<RunView>>(&["runs", "--json"]).into_iter().map(|r| (r.id.to_string(), r)).collect()
}

/// (state, last profile, attempts, failure kind) of a run.
fn outcome(run: &RunView) -> (StateTag, String, usize, Option<&str>) {
    let profile = run.profile.as_ref().map(ToString::to_string).unwrap_or_default();
    (run.state, profile, run.attempts, run.failure.as_deref())
}

#[test]
fn the_demo_evaluates_every_example_and_does_no_work_twice() {
    let dir = tempfile::tempdir().unwrap();
    let cli = Cli::new(dir.path().join("demo"));
    let report = cli.ok(&["demo"]);
    assert!(report.contains("public leaderboard") && report.contains("failures"), "{report}");

    let runs = runs(&cli);
    use StateTag::{Failed, Published};
    let expected = [
        ("good-public", (Published, "g4", 1, None)),
        ("good-private", (Published, "g4", 1, None)),
        ("baseline-public", (Published, "cpu", 1, None)),
        ("baseline-private", (Published, "cpu", 1, None)),
        ("oom-g4-public", (Published, "p3", 2, None)),
        ("oom-all-public", (Failed, "p3", 2, Some("out_of_memory"))),
        ("slow-public", (Failed, "g4", 1, Some("timed_out"))),
        ("crash-public", (Failed, "g4", 1, Some("crashed"))),
        ("bad-csv-public", (Failed, "g4", 1, Some("invalid_predictions"))),
        ("escape-public", (Published, "g4", 1, None)),
    ];
    assert_eq!(runs.len(), expected.len(), "{:?}", runs.keys());
    for (id, (state, profile, attempts, failure)) in expected {
        assert_eq!(outcome(&runs[id]), (state, profile.to_owned(), attempts, failure), "{id}");
    }
    assert!(runs["bad-csv-public"].reason.as_deref().unwrap_or_default().contains("label 1.7 is outside [0, 1]"));
    let good = runs["good-public"].score.unwrap();
    let baseline = runs["baseline-public"].score.unwrap();
    assert!((baseline - std::f64::consts::LN_2).abs() < 1e-9, "0.5 everywhere scores ln 2: {baseline}");
    assert!(good < baseline - 0.3, "the detector beats the baseline: {good}");
    assert!(runs.values().all(|r| !r.state.is_terminal() || r.cost_usd > 0.0 || r.attempts == 0));

    oom_g4_escalated(&cli);
    status_adds_up(&cli, &runs);
    tables_fit_80_columns(&cli);
    planned_from_what_ran(&cli, &runs);
    escape_got_nothing(&cli, &runs, baseline);
    score_matches_an_independent_log_loss(&cli, good);
    leaderboard_is_published(&cli);

    // Again, on the same directory: no job runs, nothing changes.
    let launches = fs::read_to_string(cli.data_dir.join("jobs/launches.log")).unwrap();
    let jobs = fs::read_dir(cli.data_dir.join("jobs")).unwrap().count();
    let histories: Vec<usize> = runs.keys().map(|id| history(&cli, id).len()).collect();
    cli.ok(&["demo"]);
    assert_eq!(fs::read_to_string(cli.data_dir.join("jobs/launches.log")).unwrap(), launches);
    assert_eq!(fs::read_dir(cli.data_dir.join("jobs")).unwrap().count(), jobs);
    assert_eq!(runs.keys().map(|id| history(&cli, id).len()).collect::<Vec<_>>(), histories);
    assert!(cli.ok(&["replay", "--all"]).contains("10 runs replayed, 0 diverge"));
}

/// `plan --from` draws its running times from the runs whose job ran to its
/// end: their last attempt's time (locally, already the reference profile's).
fn planned_from_what_ran(cli: &Cli, runs: &BTreeMap<String, RunView>) {
    let last = |r: &RunView| r.attempt_details.last().cloned();
    let secs: Vec<f64> = (runs.values().filter_map(last))
        .filter(|a| a.outcome.as_deref() == Some("succeeded"))
        .map(|a| a.running_secs.unwrap())
        .collect();
    assert_eq!(secs.len(), 7, "the published ones and bad-csv, whose predictions were refused");
    let workload = cli.data_dir.join("../workload.toml");
    let text = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/dfdc.toml")).unwrap();
    let text = text.replace("submissions = 4200", "submissions = 3000");
    let text = text.replace("[run_time]\nmean_hours = 10.0\ncv = 0.2\n", "");
    fs::write(&workload, text).unwrap();
    let plan: evalflow_workflow::plan::Plan = cli.json(&[
        "plan",
        "--workload",
        workload.to_str().unwrap(),
        "--from",
        cli.data_dir.to_str().unwrap(),
        "--json",
    ]);
    let observed = secs.iter().sum::<f64>() / secs.len() as f64 / 3600.0;
    let off = (plan.mean_run_hours - observed).abs() / observed;
    assert!(off < 0.05, "drawn {} h, observed {observed} h: {secs:?}", plan.mean_run_hours);
    // Without --from, and without [run_time], the workload is refused with the fix.
    let output = cli.run(&["plan", "--workload", workload.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&output.stderr).contains("--from DIR"), "{output:?}");
}

fn history(cli: &Cli, run: &str) -> Vec<EventView> {
    cli.json(&["history", run, "--json"])
}

/// Tables fit 80 columns, their long words wrapped; `--wide` shows each whole.
fn tables_fit_80_columns(cli: &Cli) {
    let reason = "out of host memory on p3, and no profile of its ladder has more";
    for command in [&["runs"][..], &["history", "oom-g4-public"], &["status"], &["cost"], &["leaderboard"]] {
        let said = cli.ok(command);
        let widest = said.lines().map(|l| l.chars().count()).max().unwrap();
        assert!(widest <= 80, "{command:?}: {widest} columns:\n{said}");
    }
    assert!(!cli.ok(&["runs"]).contains(reason), "wrapped");
    let wide = cli.ok(&["--wide", "runs"]);
    assert!(wide.lines().any(|l| l.contains(reason) && l.contains("oom-all-public") && l.contains("gamma")), "{wide}");
}

/// Every run ended: status's progress and cost are the runs' own, in all and per stage.
fn status_adds_up(cli: &Cli, runs: &BTreeMap<String, RunView>) {
    let status: StatusView = cli.json(&["status", "--json"]);
    let whole = &status.progress.whole;
    assert_eq!((whole.total, whole.ended, whole.running, whole.queued), (10, 10, 0, 0), "{whole:?}");
    assert_eq!((whole.eta_secs, whole.remaining_cost_usd), (Some(0), Some(0.0)), "nothing left");
    let cost: f64 = runs.values().map(|r| r.cost_usd).sum();
    assert!((whole.cost_usd - cost).abs() < 1e-12 && whole.projected_cost_usd == Some(whole.cost_usd), "{whole:?}");
    let private = &status.progress.stages[&Stage::Private];
    assert_eq!((private.total, private.ended), (2, 2));
    let said = cli.ok(&["status"]);
    assert!(said.contains("10 of 10 runs ended, 0 running, 0 queued"), "{said}");
}

fn oom_g4_escalated(cli: &Cli) {
    let events = history(cli, "oom-g4-public");
    let names: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(
        names,
        [
            "submitted",
            "admitted",
            "job_launched",
            "job_ended",
            "job_launched",
            "job_ended",
            "predictions_scored",
            "published"
        ]
    );
    assert_eq!(events[1].placement.as_deref(), Some("a1 on g4"));
    let Event::JobEnded { outcome, usage, .. } = &events[3].data else { panic!("{:?}", events[3]) };
    assert_eq!(*outcome, JobOutcome::OutOfMemory { resource: Resource::HostMemory });
    assert!(usage.peak_memory_mib.is_some_and(|m| m <= 160), "killed at g4's 160 MiB: {usage:?}");
    assert_eq!((events[3].state, events[3].placement.as_deref()), (StateTag::Launching, Some("a2 on p3")));
    let Event::JobEnded { outcome, usage, .. } = &events[5].data else { panic!("{:?}", events[5]) };
    assert_eq!(*outcome, JobOutcome::Succeeded);
    assert!(usage.peak_memory_mib.is_some_and(|m| m > 200), "it needed its 220 MiB: {usage:?}");
    assert_eq!(events[7].state, StateTag::Published);
}

fn escape_got_nothing(cli: &Cli, runs: &BTreeMap<String, RunView>, baseline: f64) {
    let logs = cli.ok(&["logs", "escape-public"]);
    assert!(logs.contains("labels: blocked"), "{logs}");
    for target in ["1.1.1.1:443", "127.0.0.1:22", "10.0.2.2:80"] {
        assert!(logs.contains(&format!("network {target}: blocked")), "{target}: {logs}");
    }
    assert!(!logs.contains("READ") && !logs.contains("OPEN"), "{logs}");
    assert_eq!(runs["escape-public"].score, Some(baseline), "had it read the labels, it would score near 0");
}

/// The good detector's public score, recomputed by Python from its
/// predictions file and the private labels.
fn score_matches_an_independent_log_loss(cli: &Cli, score: f64) {
    let predictions = cli.data_dir.join("jobs/ef-good-public-a1/output/submission.csv");
    let labels = cli.data_dir.join("data/public/labels.csv");
    let program = r#"
import csv, math, sys
labels = {r["filename"]: int(r["label"]) for r in csv.DictReader(open(sys.argv[2]))}
predictions = {r["filename"]: float(r["label"]) for r in csv.DictReader(open(sys.argv[1]))}
eps = 1e-15
total = 0.0
for name, y in labels.items():
    p = min(max(predictions[name], eps), 1 - eps)
    total += y * math.log(p) + (1 - y) * math.log(1 - p)
print(repr(-total / len(labels)))
"#;
    let output = Command::new("python3").arg("-c").arg(program).arg(&predictions).arg(&labels).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let independent: f64 = String::from_utf8_lossy(&output.stdout).trim().parse().unwrap();
    assert!((independent - score).abs() < 1e-9, "evalflow {score}, python {independent}");
}

fn leaderboard_is_published(cli: &Cli) {
    for stage in ["public", "private"] {
        let served: Leaderboard = cli.json(&["leaderboard", "--stage", stage, "--json"]);
        let file = fs::read(cli.data_dir.join(format!("leaderboard/{stage}.json"))).unwrap();
        let published: Leaderboard = serde_json::from_slice(&file).unwrap();
        assert_eq!(served, published, "{stage}");
        let csv = fs::read_to_string(cli.data_dir.join(format!("leaderboard/{stage}.csv"))).unwrap();
        assert_eq!(csv.lines().count(), published.entries.len() + 1);
    }
    let public: Leaderboard = cli.json(&["leaderboard", "--json"]);
    let teams: Vec<&str> = public.entries.iter().map(|e| e.team.as_str()).collect();
    assert_eq!(teams[..2], ["alpha", "beta"], "good, then oom-g4 on p3");
    assert_eq!(teams.len(), 4, "alpha, beta, baseline, mallory: {teams:?}");
}
