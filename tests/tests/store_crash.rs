//! SIGKILL a process in the middle of applying events, at random points, and
//! check after each kill that no acknowledged event is lost and no
//! half-written transition is visible.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use evalflow_tests::cli::Process;
use evalflow_tests::{check_store, test_policy};
use evalflow_workflow::{RunId, SledStore, StateTag, WorkflowStore};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// Runs added whenever the writer finishes before enough kills have landed.
const RUNS_STEP: usize = 300;
const KILLS: usize = 100;

/// What the child acknowledged: per run, entry seq -> (version, state).
type Acks = BTreeMap<RunId, BTreeMap<u32, (u64, String)>>;

#[test]
fn no_acknowledged_event_is_lost_and_no_half_transition_is_seen_after_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let seed = std::env::var("EVALFLOW_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("seed {seed} (set EVALFLOW_CRASH_SEED to repeat)");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut acks = Acks::new();
    let (mut runs, mut kills) = (RUNS_STEP, 0);
    // Every round is killed, unless the writer runs out of work first: then
    // it gets more runs, so that every kill lands in the middle of real work.
    for round in 0..KILLS * 10 {
        if kills == KILLS {
            break;
        }
        let finished = run_writer(dir.path(), runs, round as u64 ^ seed, Some(rng.random_range(0..60)), &mut acks);
        if finished {
            runs += RUNS_STEP;
        } else {
            kills += 1;
        }
        verify(dir.path(), &acks);
    }
    assert_eq!(kills, KILLS);
    assert!(run_writer(dir.path(), runs, seed, None, &mut acks), "the writer finishes");
    verify(dir.path(), &acks);
    let store = SledStore::open(dir.path(), Default::default()).unwrap();
    let counts = store.counts().unwrap();
    assert_eq!(counts.total(), runs as u64);
    let ended: u64 = StateTag::ALL.iter().filter(|t| t.is_terminal()).map(|&t| counts[t]).sum();
    assert_eq!(ended, runs as u64, "every run ends in a terminal state: {counts:?}");
}

/// Runs the writer until it finishes (true) or, with `kill_after`, SIGKILLs
/// it after that many acknowledgements (false). Records what it acknowledged.
fn run_writer(dir: &std::path::Path, runs: usize, seed: u64, kill_after: Option<usize>, acks: &mut Acks) -> bool {
    let mut child = Process(
        Command::new(env!("CARGO_BIN_EXE_store-crash-writer"))
            .args([dir.to_str().unwrap(), &runs.to_string(), &seed.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let mut seen = 0;
    let mut done = false;
    for line in stdout.lines() {
        let line = line.unwrap();
        if line == "done" {
            done = true;
            break;
        }
        let [_, run, seq, version, state] = line.split(' ').collect::<Vec<_>>()[..] else { panic!("{line}") };
        let entry = (version.parse().unwrap(), state.to_owned());
        acks.entry(RunId::parse(run).unwrap()).or_default().insert(seq.parse().unwrap(), entry);
        seen += 1;
        if kill_after == Some(seen) {
            child.kill().unwrap(); // SIGKILL
            break;
        }
    }
    let status = child.wait().unwrap();
    assert!(done || !status.success(), "the writer exited without finishing: {status}");
    done
}

fn verify(dir: &std::path::Path, acks: &Acks) {
    let store = SledStore::open(dir, Default::default()).unwrap();
    check_store(&test_policy(), &store).unwrap_or_else(|e| panic!("store not whole after a kill: {e}"));
    for (run, entries) in acks {
        let history = store.history(run).unwrap();
        for (seq, (version, state)) in entries {
            let entry = history.iter().find(|e| e.seq == *seq);
            let entry = entry.unwrap_or_else(|| panic!("acknowledged entry {seq} of {run} is lost"));
            assert_eq!((entry.status.version, entry.status.state.tag().as_str()), (*version, state.as_str()));
        }
    }
}
