//! A full disk under the store, on a real (small) filesystem: the engine
//! drives runs on a sled store in a tmpfs until a write meets ENOSPC, while a
//! reader keeps listing and loading runs as the API does. Whatever a reader
//! was shown, and whatever a commit acknowledged, is there after the space
//! comes back and the store is opened again; after the failed write the
//! store answers nothing it has not flushed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use evalflow_tests::disk::Tmpfs;
use evalflow_tests::{check_store, test_policy};
use evalflow_workflow::sim::InstantWorld;
use evalflow_workflow::store::{RunFilter, StoreError, all_runs};
use evalflow_workflow::{
    Engine, Input, JobOutcome, Outcome, RunId, RunSpec, SledStore, Stage, SubmissionId, SubmissionSource, TeamId,
    Timestamp, WorkflowStore,
};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// What one reader saw: the highest version of each run it was shown, and
/// how many reads the store refused.
#[derive(Default)]
struct Seen {
    versions: BTreeMap<RunId, u64>,
    refused: usize,
}

/// Lists and loads every run, again and again, until `stop`, and once more after it.
fn read_until(store: SledStore, stop: Arc<AtomicBool>) -> Seen {
    let mut seen = Seen::default();
    let mut last = false;
    while !last {
        last = stop.load(Ordering::Relaxed);
        let listed = match all_runs(&store, RunFilter::All) {
            Ok(listed) => listed,
            Err(StoreError::Stopped { .. }) => {
                seen.refused += 1;
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            Err(e) => panic!("a reader met {e}"),
        };
        for run in listed {
            match store.load(&run) {
                Ok(Some(stored)) => {
                    let version = seen.versions.entry(run).or_default();
                    *version = (*version).max(stored.run.status.version);
                }
                Ok(None) => panic!("{run} was listed, then not found"),
                Err(StoreError::Stopped { .. }) => seen.refused += 1,
                Err(e) => panic!("a reader met {e}"),
            }
        }
    }
    seen
}

fn spec(index: usize) -> RunSpec {
    RunSpec::new(
        SubmissionId::new(format!("s{index}")).unwrap(),
        TeamId::new(format!("t{}", index % 5)).unwrap(),
        Stage::Public,
        false,
        SubmissionSource::Image { uri: format!("registry/s{index}") },
        Timestamp(index as u64),
    )
}

/// One try: `free` bytes left on the store's filesystem, group sizes from `seed`.
fn fill_the_store(seed: u64, free: u64) {
    let root = tempfile::tempdir().unwrap();
    let disk = Tmpfs::mount(&root.path().join("disk"), 8 * 1024);
    let dir = root.path().join("disk/state");
    let store = SledStore::open(&dir, Default::default()).unwrap();
    disk.fill("filler", free);
    let (mut engine, _) = Engine::open(store.clone(), test_policy(), 32).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = std::thread::spawn({
        let (store, stop) = (store.clone(), stop.clone());
        move || read_until(store, stop)
    });

    let mut rng = StdRng::seed_from_u64(seed);
    let mut sizes = StdRng::seed_from_u64(rng.random());
    let mut world = InstantWorld::new(|_| match rng.random_range(0..6) {
        0 => JobOutcome::OutOfMemory { resource: evalflow_workflow::Resource::GpuMemory },
        _ => JobOutcome::Succeeded,
    });
    let mut acknowledged = BTreeMap::<RunId, u64>::new();
    let mut pending = Vec::new();
    let mut submitted = 0;
    let failure = loop {
        assert!(submitted < 200_000, "{} KiB never filled up", free / 1024);
        if pending.is_empty() {
            pending.extend((submitted..submitted + 50).map(|i| Input::Submit(spec(i))));
            submitted += 50;
        }
        let take = sizes.random_range(1..=40).min(pending.len());
        let group: Vec<Input> = pending.drain(..take).collect();
        let now = Timestamp::now();
        match engine.apply(group, now) {
            Ok(applied) => {
                for outcome in applied.outcomes {
                    if let Outcome::Recorded { run, version, .. } = outcome {
                        acknowledged.insert(run, version);
                    }
                }
                pending.extend(applied.dispatches.iter().flat_map(|d| world.answer(d, now)));
            }
            Err(e) => break e.to_string(),
        }
    };
    assert!(failure.contains("No space left on device"), "the write failed for want of space: {failure}");

    // From now on nothing is shown: the failed commit may be in sled's memory, not on disk.
    let first = acknowledged.keys().next().unwrap().clone();
    let refused = store.load(&first).unwrap_err();
    assert!(matches!(refused, StoreError::Stopped { .. }), "{refused}");
    let said = refused.to_string();
    assert!(said.contains("No space left on device") && said.contains("free space"), "{said}");
    assert!(matches!(all_runs(&store, RunFilter::All), Err(StoreError::Stopped { .. })));
    stop.store(true, Ordering::Relaxed);
    let seen = reader.join().unwrap();
    assert!(seen.refused > 0, "the reader read on after the failure");
    drop((engine, store));

    disk.unfill("filler");
    let store = SledStore::open(&dir, Default::default()).unwrap_or_else(|e| panic!("after the space came back: {e}"));
    let runs = check_store(&test_policy(), &store).unwrap_or_else(|e| panic!("the reopened store: {e}"));
    assert!(runs >= acknowledged.len());
    let reopened = |run: &RunId| store.load(run).unwrap().map_or(0, |s| s.run.status.version);
    for (run, version) in &acknowledged {
        assert!(reopened(run) >= *version, "{run}: acknowledged at version {version}, reopened at {}", reopened(run));
    }
    for (run, version) in &seen.versions {
        assert!(reopened(run) >= *version, "{run}: shown at version {version}, reopened at {}", reopened(run));
    }
    // And it takes writes again.
    let (mut engine, _) = Engine::open(store, test_policy(), 32).unwrap();
    engine.apply(vec![Input::Submit(spec(submitted + 1))], Timestamp::now()).unwrap();
    eprintln!(
        "seed {seed}, {} KiB free: {} runs acknowledged, {} shown, {} reads refused after the failure",
        free / 1024,
        acknowledged.len(),
        seen.versions.len(),
        seen.refused
    );
}

#[test]
fn a_store_that_fills_its_disk_shows_only_what_is_flushed_and_reopens_with_it() {
    for (seed, free_kib) in [(1, 700), (2, 1100), (3, 1900), (4, 2600), (5, 3300)] {
        fill_the_store(seed, free_kib * 1024);
    }
}

/// Submits `id` (it writes 0.5 for every file) with `ballast` bytes besides.
fn submit(cli: &evalflow_tests::cli::Cli, root: &std::path::Path, id: &str, ballast: usize) {
    let dir = root.join(id);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("submission.toml"), "command = [\"python3\", \"main.py\"]\n").unwrap();
    std::fs::write(dir.join("main.py"), format!("{}\nhalves()", evalflow_tests::local::PRELUDE)).unwrap();
    std::fs::write(dir.join("ballast.bin"), vec![7; ballast]).unwrap();
    cli.ok(&["submit", "--id", id, "--team", id, dir.to_str().unwrap()]);
}

#[test]
fn a_full_disk_under_the_jobs_pauses_launching_and_fails_no_run() {
    use evalflow_tests::cli::wait_until;
    use evalflow_tests::local::{competition, run_view, serve, wait_ended};
    use evalflow_worker::views::StatusView;
    use evalflow_workflow::StateTag;

    let root = tempfile::tempdir().unwrap();
    let cli = competition(&root.path().join("c"));
    let config = std::fs::read_to_string(cli.data_dir.join("evalflow.toml")).unwrap();
    let config = config.replace("submission_max_mib = 1", "submission_max_mib = 8\nfree_disk_min_mib = 4");
    std::fs::write(cli.data_dir.join("evalflow.toml"), config).unwrap();
    let jobs = Tmpfs::mount(&cli.data_dir.join("jobs"), 32 * 1024);
    let subs = root.path().join("subs");
    const MIB: u64 = 1024 * 1024;
    let status = || cli.json::<StatusView>(&["status", "--json"]);

    // Below the margin: nothing new launches, and status and runs say why.
    jobs.fill("filler", 2 * MIB);
    let _engine = serve(&cli);
    submit(&cli, &subs, "small", 0);
    let paused = status().paused.unwrap_or_else(|| panic!("not paused: {}", cli.ok(&["status"])));
    assert!(
        paused.contains("/jobs has 2 MiB free, less than the 4 MiB") && paused.contains("free_disk_min_mib"),
        "{paused}"
    );
    assert!(cli.ok(&["status"]).contains("launching paused (running jobs go on): the disk under"));
    std::thread::sleep(Duration::from_secs(6));
    let small = run_view(&cli, "small");
    assert_eq!(small.state, StateTag::Queued, "{small:?}");
    assert!(small.waiting.as_deref().is_some_and(|w| w.starts_with("waiting for disk space: ")), "{small:?}");
    jobs.unfill("filler");
    wait_ended(&cli, &["small"], Duration::from_secs(60));
    assert_eq!(run_view(&cli, "small").state, StateTag::Published);
    assert_eq!(status().paused, None);

    // Above the margin, but a job's copy of its submission meets a full disk:
    // it waits for room, and the engine launches nothing more meanwhile.
    jobs.fill("filler", 5 * MIB);
    submit(&cli, &subs, "big", 6 * MIB as usize);
    wait_until("the full disk pauses launching", Duration::from_secs(30), || status().paused.is_some());
    std::thread::sleep(Duration::from_secs(7)); // past a look again, and its log line on the full disk
    let big = run_view(&cli, "big");
    assert!(!big.state.is_terminal() && big.attempts == 1, "{big:?}");
    jobs.unfill("filler");
    wait_ended(&cli, &["big"], Duration::from_secs(60));
    let big = run_view(&cli, "big");
    assert_eq!((big.state, big.attempts), (StateTag::Published, 1), "{big:?}");

    // A job that runs out of disk space in the middle: the host's problem, so
    // the attempt counts as interrupted and the next waits for room.
    let program = "time.sleep(3)\nopen(os.path.join(OUT, 'big.bin'), 'wb').write(b'x' * (3 << 20))\nhalves()";
    evalflow_tests::local::submit(&cli, &subs, "writer", program);
    wait_until("the writer runs", Duration::from_secs(30), || run_view(&cli, "writer").state == StateTag::Running);
    jobs.fill("filler", 512 * 1024);
    std::thread::sleep(Duration::from_secs(8));
    assert!(status().paused.is_some());
    let writer = run_view(&cli, "writer");
    assert!(!writer.state.is_terminal(), "{writer:?}");
    jobs.unfill("filler");
    wait_ended(&cli, &["writer"], Duration::from_secs(60));
    let writer = run_view(&cli, "writer");
    assert_eq!((writer.state, writer.attempts), (StateTag::Published, 2), "{writer:?}");
    let first = writer.attempt_details[0].summary.clone().unwrap_or_default();
    assert!(first.starts_with("interrupted: the host's disk filled up while it ran: "), "{first}");
    let board = cli.ok(&["leaderboard"]);
    assert!(["small", "big", "writer"].iter().all(|id| board.contains(id)), "{board}");
}

#[test]
fn a_full_disk_under_a_serving_store_stops_the_engine_and_a_restart_loses_nothing() {
    use evalflow_tests::cli::wait_until;
    use evalflow_tests::local::{competition, runs, wait_ended};
    use evalflow_workflow::StateTag;

    let root = tempfile::tempdir().unwrap();
    let cli = competition(&root.path().join("c"));
    let config = std::fs::read_to_string(cli.data_dir.join("evalflow.toml")).unwrap();
    std::fs::write(
        cli.data_dir.join("evalflow.toml"),
        config.replace("files_max = 2000", "files_max = 2000\nfree_disk_min_mib = 1"),
    )
    .unwrap();
    let state = Tmpfs::mount(&cli.data_dir.join("state"), 16 * 1024);
    let subs = root.path().join("subs");
    let log = root.path().join("serve.log");
    let serve = || {
        let _ = std::fs::remove_file(cli.data_dir.join("state/engine.json"));
        let engine = cli.spawn_logged(&["serve"], &log);
        wait_until("the engine announces its API", Duration::from_secs(30), || {
            cli.data_dir.join("state/engine.json").exists()
        });
        engine
    };
    let ids: Vec<String> = (0..6).map(|i| format!("r{i}")).collect();
    let mut engine = serve();
    for id in &ids {
        evalflow_tests::local::submit(&cli, &subs, id, "time.sleep(2)\nhalves()");
    }
    wait_until("runs run", Duration::from_secs(30), || runs(&cli).iter().any(|r| r.state == StateTag::Running));
    state.fill("filler", 0);
    wait_until("the engine stops", Duration::from_secs(60), || engine.try_wait().unwrap().is_some());
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(said.contains("error: the store stopped after a write to it failed (No space left on device); "), "{said}");
    assert!(said.contains("free space") && !said.contains("panicked") && !said.contains("sled"), "{said}");

    state.unfill("filler");
    let _engine = serve();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    wait_ended(&cli, &ids, Duration::from_secs(120));
    for run in runs(&cli) {
        assert_eq!((run.state, run.attempts), (StateTag::Published, 1), "{run:?}");
    }
    let launches = std::fs::read_to_string(cli.data_dir.join("jobs/launches.log")).unwrap();
    assert_eq!(launches.lines().count(), ids.len(), "no job launched twice:\n{launches}");
}
