//! SIGKILL `evalflow demo` at random points, start it again each time, and
//! check that it ends as an uninterrupted demo does: every run in one
//! terminal state, no job launched twice, the same leaderboards.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use evalflow_activities::leaderboard::Leaderboard;
use evalflow_tests::cli::Cli;
use evalflow_worker::views::RunView;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

const KILLS: usize = 20;

/// The leaderboards as (stage, rank, team, submission, score): what must not
/// depend on interruptions (submission times do).
fn boards(cli: &Cli) -> Vec<(String, usize, String, String, String)> {
    let mut rows = Vec::new();
    for stage in ["public", "private"] {
        let board: Leaderboard = cli.json(&["leaderboard", "--stage", stage, "--json"]);
        for e in board.entries {
            rows.push((
                stage.to_owned(),
                e.rank,
                e.team.to_string(),
                e.submission.to_string(),
                format!("{:.12}", e.score),
            ));
        }
    }
    rows
}

#[test]
fn the_demo_killed_at_random_points_ends_as_an_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let reference = Cli::new(dir.path().join("reference"));
    reference.ok(&["demo"]);

    let seed = std::env::var("EVALFLOW_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("seed {seed} (set EVALFLOW_CRASH_SEED to repeat)");
    let mut rng = StdRng::seed_from_u64(seed);
    let cli = Cli::new(dir.path().join("killed"));
    let mut kills = 0;
    let started = Instant::now();
    let log = dir.path().join("demo.log");
    while kills < KILLS {
        let mut demo = cli.spawn_logged(&["demo"], &log);
        std::thread::sleep(Duration::from_millis(rng.random_range(20..450)));
        if let Some(status) = demo.try_wait().unwrap() {
            let said = std::fs::read_to_string(&log).unwrap_or_default();
            assert!(status.success(), "the demo failed after {kills} kills ({status}):\n{said}");
            break; // it finished between two kills
        }
        demo.kill().unwrap(); // SIGKILL
        demo.wait().unwrap();
        kills += 1;
    }
    eprintln!("{kills} kills in {:.1} s", started.elapsed().as_secs_f64());
    assert!(kills >= KILLS, "only {kills} kills landed before the demo finished");
    cli.ok(&["demo"]);

    let runs: Vec<RunView> = cli.json(&["runs", "--json"]);
    assert_eq!(runs.len(), 10);
    assert!(runs.iter().all(|r| r.state.is_terminal()), "{runs:?}");
    let launches = std::fs::read_to_string(cli.data_dir.join("jobs/launches.log")).unwrap();
    let mut seen = BTreeSet::new();
    for line in launches.lines() {
        let job = line.split(' ').next().unwrap();
        assert!(seen.insert(job.to_owned()), "{job} was launched twice:\n{launches}");
    }
    assert!(cli.ok(&["replay", "--all"]).contains("10 runs replayed, 0 diverge"));
    assert_eq!(boards(&cli), boards(&reference));
    let expected: Vec<(String, String)> = {
        let reference_runs: Vec<RunView> = reference.json(&["runs", "--json"]);
        reference_runs.iter().map(|r| (r.id.to_string(), format!("{}/{:?}", r.state, r.failure))).collect()
    };
    let got: Vec<(String, String)> =
        runs.iter().map(|r| (r.id.to_string(), format!("{}/{:?}", r.state, r.failure))).collect();
    assert_eq!(got, expected);
}
