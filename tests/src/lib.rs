//! Helpers shared by evalflow's integration tests.

pub mod aws;
pub mod browser;
pub mod cli;
pub mod disk;
pub mod local;
pub mod moto;

use std::collections::BTreeSet;

use evalflow_workflow::store::{RunFilter, all_runs};
use evalflow_workflow::{Policy, StateTag, WorkflowStore, replay};

/// The ladder the store-level tests run on.
pub const TEST_POLICY: &str = r#"
    time_limit_secs = 600
    [retry]
    interruptions_max = 2
    backoff_base_secs = 0
    backoff_max_secs = 0
    attempts_max = 8
    [[profile]]
    name = "g4"
    host_memory_mib = 100
    gpu_memory_mib = 100
    vcpus = 1
    price_per_hour_usd = 0.5
    [[profile]]
    name = "p3"
    host_memory_mib = 400
    gpu_memory_mib = 160
    vcpus = 4
    price_per_hour_usd = 3.0
"#;

/// The policy of [`TEST_POLICY`].
pub fn test_policy() -> Policy {
    Policy::from_toml(TEST_POLICY).unwrap_or_else(|e| panic!("{e}"))
}

/// Checks that a store is whole: every history replays to the stored status
/// with no gap, the counters count what is stored, and the live and terminal
/// indexes list exactly the runs they should. Returns the number of runs.
pub fn check_store(policy: &Policy, store: &impl WorkflowStore) -> Result<usize, String> {
    let runs = all_runs(store, RunFilter::All).map_err(|e| e.to_string())?;
    let mut live = BTreeSet::new();
    let mut by_state = std::collections::BTreeMap::<StateTag, BTreeSet<_>>::new();
    for run in &runs {
        let replayed = replay::check(policy, store, run).map_err(|e| e.to_string())?;
        if replayed.status.is_live() {
            live.insert(run.clone());
        }
        by_state.entry(replayed.status.state.tag()).or_default().insert(run.clone());
    }
    let counts = store.counts().map_err(|e| e.to_string())?;
    for tag in StateTag::ALL {
        let actual = by_state.get(&tag).map_or(0, BTreeSet::len) as u64;
        if counts[tag] != actual {
            return Err(format!("counter of {tag} says {}, the store holds {actual}", counts[tag]));
        }
        if tag.is_terminal() {
            let indexed: BTreeSet<_> =
                all_runs(store, RunFilter::Terminal(tag)).map_err(|e| e.to_string())?.into_iter().collect();
            if indexed != by_state.get(&tag).cloned().unwrap_or_default() {
                return Err(format!("the {tag} index lists {indexed:?}"));
            }
        }
    }
    let indexed: BTreeSet<_> = all_runs(store, RunFilter::Live).map_err(|e| e.to_string())?.into_iter().collect();
    if indexed != live {
        return Err(format!("the live index lists {} runs, {} are live", indexed.len(), live.len()));
    }
    Ok(runs.len())
}
