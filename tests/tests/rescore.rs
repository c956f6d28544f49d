//! `evalflow rescore --stage S` on a real `serve`: after the labels were
//! corrected, every published run of the stage is scored again from the
//! predictions it stored, and the leaderboard follows; no job runs again.

use std::fs;
use std::time::Duration;

use evalflow_activities::leaderboard::Leaderboard;
use evalflow_tests::cli::wait_until;
use evalflow_tests::local::{competition, run_view, runs, serve, submit, wait_ended};
use evalflow_worker::views::ActionView;
use evalflow_workflow::StateTag;

/// Predicts each file's label as the labels first said: `i % 2` for `f<i>.txt`.
const KNOWS_THE_OLD_LABELS: &str = r#"
with open(CSV, "w") as f:
    f.write("filename,label\n")
    for n in sorted(os.listdir(os.environ["EVALFLOW_INPUT_DIR"])):
        f.write("%s,%d\n" % (n, int(n[1:-4]) % 2))
"#;

#[test]
fn rescoring_a_stage_after_its_labels_were_corrected_runs_no_job_and_rebuilds_the_leaderboard() {
    let dir = tempfile::tempdir().unwrap();
    let cli = competition(&dir.path().join("competition"));
    let _engine = serve(&cli);
    let subs = dir.path().join("subs");
    submit(&cli, &subs, "knower", KNOWS_THE_OLD_LABELS);
    submit(&cli, &subs, "hedger", "halves()\n");
    wait_ended(&cli, &["knower", "hedger"], Duration::from_secs(60));
    let board: Leaderboard = cli.json(&["leaderboard", "--json"]);
    assert_eq!(board.entries[0].submission.as_str(), "knower", "{board:?}");
    let launches = fs::read_to_string(cli.data_dir.join("jobs/launches.log")).unwrap();

    // The labels were wrong: every one is the other way round.
    let labels = cli.data_dir.join("data/public/labels.csv");
    let corrected: String = fs::read_to_string(&labels)
        .unwrap()
        .lines()
        .map(|line| match line.rsplit_once(',') {
            Some((file, "0")) => format!("{file},1\n"),
            Some((file, "1")) => format!("{file},0\n"),
            _ => format!("{line}\n"),
        })
        .collect();
    fs::write(&labels, corrected).unwrap();

    let preview = cli.ok(&["rescore", "--stage", "public", "--dry-run"]);
    assert!(preview.contains("knower-public: would be scored again: then predicted"), "{preview}");
    assert_eq!(run_view(&cli, "knower").state, StateTag::Published, "a dry run changes nothing");
    let views: Vec<ActionView> = cli.json(&["rescore", "--stage", "public", "--json"]);
    assert_eq!(views.len(), 2, "{views:?}");
    assert!(views.iter().all(|v| v.accepted), "{views:?}");
    wait_until("both are published again", Duration::from_secs(60), || {
        runs(&cli).iter().all(|r| r.state == StateTag::Published)
    });

    let knower = run_view(&cli, "knower");
    assert!(knower.score.unwrap() > 30.0, "every file confidently wrong now: {knower:?}");
    assert!((run_view(&cli, "hedger").score.unwrap() - std::f64::consts::LN_2).abs() < 1e-9);
    let board: Leaderboard = cli.json(&["leaderboard", "--json"]);
    let order: Vec<&str> = board.entries.iter().map(|e| e.submission.as_str()).collect();
    assert_eq!(order, ["hedger", "knower"], "the leaderboard follows the new scores");
    assert_eq!(fs::read_to_string(cli.data_dir.join("jobs/launches.log")).unwrap(), launches, "no job ran again");
    assert_eq!(knower.attempts, 1);
    assert!(cli.ok(&["history", "knower-public"]).contains("rescore_requested"));
    assert!(cli.ok(&["replay", "--all"]).contains("2 runs replayed, 0 diverge"));
    let none = cli.ok(&["rescore", "--stage", "private"]);
    assert!(none.contains("no run matched: nothing to score again"), "{none}");
}
