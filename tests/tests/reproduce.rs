//! `evalflow reproduce`: the top of the leaderboard re-run as audit runs that
//! never touch the leaderboard, each compared with its original. A
//! deterministic submission reproduces exactly; one that predicts at random
//! does not.

use std::time::Duration;

use evalflow_tests::local::{competition, runs, serve, submit, wait_ended};
use evalflow_worker::views::{EventView, ReproduceView, RunView};
use evalflow_workflow::StateTag;

#[test]
fn audits_reproduce_a_deterministic_run_and_not_a_random_one() {
    let dir = tempfile::tempdir().unwrap();
    let cli = competition(&dir.path().join("c"));
    let _engine = serve(&cli);
    let subs = dir.path().join("subs");
    let steady = "with open(CSV, 'w') as f:\n    f.write('filename,label\\n')\n    \
                  for i, n in enumerate(sorted(os.listdir(os.environ['EVALFLOW_INPUT_DIR']))):\n        \
                  f.write('%s,%.3f\\n' % (n, 0.2 + 0.6 * (i % 2)))";
    let dice = "import random\nwith open(CSV, 'w') as f:\n    f.write('filename,label\\n')\n    \
                for n in sorted(os.listdir(os.environ['EVALFLOW_INPUT_DIR'])):\n        \
                f.write('%s,%.6f\\n' % (n, random.uniform(0.3, 0.7)))";
    submit(&cli, &subs, "steady", steady);
    submit(&cli, &subs, "dice", dice);
    wait_ended(&cli, &["steady", "dice"], Duration::from_secs(60));
    let board_before = cli.ok(&["leaderboard", "--json"]);

    let report: ReproduceView = cli.json(&["reproduce", "--top", "2", "--stage", "public", "--wait", "--json"]);
    assert_eq!(report.audits.len(), 2, "{report:?}");
    let audit = |original: &str| report.audits.iter().find(|a| a.original.as_str() == original).unwrap();
    let steady = audit("steady-public");
    assert_eq!((steady.audit.as_str(), steady.verdict.as_str()), ("steady-audit1-public", "reproduced"), "{steady:?}");
    assert_eq!((steady.rows, steady.max_abs_difference, steady.score_difference), (Some(10), Some(0.0), Some(0.0)));
    let dice = audit("dice-public");
    assert_eq!(dice.verdict, "not_reproduced", "{dice:?}");
    assert!(dice.max_abs_difference.unwrap() > report.tolerance, "{dice:?}");
    assert_eq!((report.judged, report.reproduced, report.share_reproduced), (2, 1, Some(0.5)));

    assert_eq!(cli.ok(&["leaderboard", "--json"]), board_before, "audits never touch the leaderboard");
    let audit_run: RunView = runs(&cli).into_iter().find(|r| r.id.as_str() == "steady-audit1-public").unwrap();
    assert_eq!((audit_run.state, audit_run.audit_of.unwrap().as_str()), (StateTag::Published, "steady-public"));
    let history: Vec<EventView> = cli.json(&["history", "steady-audit1-public", "--json"]);
    let events: Vec<&str> = history.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(events.last(), Some(&"predictions_scored"), "scored, then done: never published: {events:?}");

    // Again, for all audits and for one run by name: reported, nothing launched again.
    let again: ReproduceView = cli.json(&["reproduce", "--json"]);
    assert_eq!(again.audits.len(), 2);
    let named: ReproduceView = cli.json(&["reproduce", "steady-public", "--json"]);
    assert_eq!((named.audits.len(), named.audits[0].verdict.as_str()), (1, "reproduced"));
    let audits: Vec<RunView> = runs(&cli).into_iter().filter(|r| r.audit_of.is_some()).collect();
    assert_eq!(audits.len(), 2, "one audit per original: {audits:?}");
    assert!(audits.iter().all(|a| a.attempts == 1), "each audit ran once: {audits:?}");

    // The audit names are evalflow's, and an unpublished run is refused with the reason.
    let taken = subs.join("steady");
    let refused = cli.fails(&["submit", "--id", "x-audit1", "--team", "x", taken.to_str().unwrap()]);
    assert!(refused.contains("ids ending in -audit<N> name evalflow's audit runs"), "{refused}");
    let refused = cli.fails(&["reproduce", "nosuch-public"]);
    assert!(refused.contains("no run nosuch-public"), "{refused}");
}
