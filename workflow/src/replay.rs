//! Replay: rebuild a run from its history through [`step`] and compare each
//! recorded status with the one replay computes.
//!
//! A divergence means the history was not produced by this machine under
//! this policy: a bug, a corrupt store, or a configuration changed since
//! (say, a profile removed from the ladder). The error names the run and the
//! first entry where the two part.

use crate::engine::EngineError;
use crate::ids::RunId;
use crate::machine::{Disposition, Event, HistoryEntry, Run, RunState, RunStatus, TransitionError, step};
use crate::policy::Policy;
use crate::store::WorkflowStore;

/// A history that does not replay to what was recorded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ReplayError {
    /// The run has no history.
    #[error("run {run} has no history")]
    Empty {
        /// The run.
        run: RunId,
    },
    /// The first entry is not the submission.
    #[error("run {run}: entry 1 is {event}, not submitted")]
    NotSubmitted {
        /// The run.
        run: RunId,
        /// The first entry's event.
        event: &'static str,
    },
    /// Entries are missing or out of order.
    #[error("run {run}: entry {seq} follows entry {previous}")]
    Gap {
        /// The run.
        run: RunId,
        /// The entry found.
        seq: u32,
        /// The entry before it.
        previous: u32,
    },
    /// A recorded event that the machine now refuses.
    #[error("run {run} diverges at entry {seq} ({event}): it was recorded, but replay refuses it: {error}")]
    Refused {
        /// The run.
        run: RunId,
        /// The entry.
        seq: u32,
        /// Its event.
        event: &'static str,
        /// Why replay refuses it.
        error: TransitionError,
    },
    /// Replay computes another status than the one recorded.
    #[error(
        "run {run} diverges at entry {seq} ({event}): recorded {}, replay gives {}",
        summary(recorded, recorded_disposition),
        summary(replayed, replayed_disposition)
    )]
    Diverged {
        /// The run.
        run: RunId,
        /// The first entry that differs.
        seq: u32,
        /// Its event.
        event: &'static str,
        /// The status recorded.
        recorded: Box<RunStatus>,
        /// What was recorded as its effect.
        recorded_disposition: Disposition,
        /// The status replay computes.
        replayed: Box<RunStatus>,
        /// The effect replay computes.
        replayed_disposition: Disposition,
    },
    /// The store's current status is not the last entry's.
    #[error("run {run}: the stored status is not the one its history ends with")]
    StoredMismatch {
        /// The run.
        run: RunId,
    },
}

/// A status in a few words: its state, where it runs or why it failed, its version.
fn summary(status: &RunStatus, disposition: &Disposition) -> String {
    let state = &status.state;
    let detail = match (state.placement(), state) {
        (Some((attempt, profile, _)), _) => format!(" attempt {attempt} on {profile}"),
        (None, RunState::Failed { reason, .. }) => format!(" ({})", reason.kind()),
        (None, _) => String::new(),
    };
    format!("{}{detail} v{}, {disposition:?}", state.tag(), status.version)
}

/// Rebuilds a run from `history`, checking every entry on the way.
pub fn replay(policy: &Policy, run_id: &RunId, history: &[HistoryEntry]) -> Result<Run, ReplayError> {
    let Some((first, rest)) = history.split_first() else {
        return Err(ReplayError::Empty { run: run_id.clone() });
    };
    let Event::Submitted(spec) = &first.input.event else {
        return Err(ReplayError::NotSubmitted { run: run_id.clone(), event: first.input.event.kind() });
    };
    let run_id = run_id.clone();
    let mut run = Run { spec: spec.clone(), status: RunStatus::submitted(first.at) };
    compare(&run_id, first, &run.status, &Disposition::Applied)?;
    let mut previous = first.seq;
    for entry in rest {
        if entry.seq != previous + 1 {
            return Err(ReplayError::Gap { run: run_id, seq: entry.seq, previous });
        }
        let transition = step(policy, &run, &entry.input, entry.at).map_err(|error| ReplayError::Refused {
            run: run_id.clone(),
            seq: entry.seq,
            event: entry.input.event.kind(),
            error,
        })?;
        compare(&run_id, entry, &transition.status, &transition.disposition)?;
        run.status = transition.status;
        previous = entry.seq;
    }
    Ok(run)
}

/// Replays `run` from `store` and checks it against the stored status.
pub fn check(policy: &Policy, store: &impl WorkflowStore, run: &RunId) -> Result<Run, CheckError> {
    let history = store.history(run).map_err(EngineError::from)?;
    let replayed = replay(policy, run, &history)?;
    let stored = store.load(run).map_err(EngineError::from)?.map(|s| s.run);
    if stored.as_ref() != Some(&replayed) {
        return Err(ReplayError::StoredMismatch { run: run.clone() }.into());
    }
    Ok(replayed)
}

/// Why a stored run could not be checked.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The history does not replay.
    #[error(transparent)]
    Replay(#[from] ReplayError),
    /// The store could not be read.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

fn compare(
    run: &RunId,
    entry: &HistoryEntry,
    status: &RunStatus,
    disposition: &Disposition,
) -> Result<(), ReplayError> {
    if entry.status == *status && entry.disposition == *disposition {
        return Ok(());
    }
    Err(ReplayError::Diverged {
        run: run.clone(),
        seq: entry.seq,
        event: entry.input.event.kind(),
        recorded: Box::new(entry.status.clone()),
        recorded_disposition: entry.disposition.clone(),
        replayed: Box::new(status.clone()),
        replayed_disposition: disposition.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Engine, Input};
    use crate::ids::{Stage, SubmissionId, TeamId};
    use crate::machine::JobOutcome;
    use crate::machine::{RunSpec, StateTag, SubmissionSource};
    use crate::policy::Resource;
    use crate::sim::InstantWorld;
    use crate::store::MemoryStore;
    use crate::time::Timestamp;

    /// A run escalated from g4 to p3 on GPU OOM, then published.
    fn escalated_run() -> (MemoryStore, RunId) {
        let policy = crate::policy::tests::case_policy();
        let (mut engine, _) = Engine::open(MemoryStore::new(), policy, 4).unwrap();
        let spec = RunSpec::new(
            SubmissionId::new("oom-g4").unwrap(),
            TeamId::new("t").unwrap(),
            Stage::Public,
            false,
            SubmissionSource::Image { uri: "img".into() },
            Timestamp(0),
        );
        let run = spec.run.clone();
        let mut launches = 0;
        let mut world = InstantWorld::new(|_| {
            launches += 1;
            if launches == 1 {
                JobOutcome::OutOfMemory { resource: Resource::GpuMemory }
            } else {
                JobOutcome::Succeeded
            }
        });
        let mut inputs = vec![Input::Submit(spec)];
        while !inputs.is_empty() {
            let applied = engine.apply(inputs, Timestamp(1)).unwrap();
            inputs = applied.dispatches.iter().flat_map(|d| world.answer(d, Timestamp(1))).collect();
        }
        (engine.into_store(), run)
    }

    #[test]
    fn a_stored_history_replays_to_the_stored_status() {
        let (store, run) = escalated_run();
        let replayed = check(&crate::policy::tests::case_policy(), &store, &run).unwrap();
        assert_eq!(replayed.status.state.tag(), StateTag::Published);
        assert_eq!(replayed.status.attempts.len(), 2);
    }

    fn replay_with(policy_text: &str) -> ReplayError {
        let (store, run) = escalated_run();
        let policy = Policy::from_toml(policy_text).unwrap();
        replay(&policy, &run, &store.history(&run).unwrap()).unwrap_err()
    }

    #[test]
    fn a_changed_ladder_diverges_at_the_first_entry_it_decides_differently() {
        let case = crate::policy::tests::CASE_POLICY;
        // p3 with no more GPU memory than g4: the OOM on g4 is the top of the ladder.
        let err = replay_with(&case.replace("gpu_memory_mib = 16000", "gpu_memory_mib = 15000"));
        let ReplayError::Diverged { seq, event, .. } = &err else { panic!("{err}") };
        assert_eq!((*seq, *event), (4, "job_ended"));
        assert_eq!(
            err.to_string(),
            "run oom-g4-public diverges at entry 4 (job_ended): recorded launching attempt 2 on p3 v4, Applied, \
             replay gives failed (out_of_memory) v4, Applied"
        );
        // p3 renamed: the escalation goes to the same machine under another name.
        let err = replay_with(&case.replace("name = \"p3\"", "name = \"v100\""));
        assert!(
            err.to_string().ends_with(
                "recorded launching attempt 2 on p3 v4, Applied, replay gives launching attempt 2 on v100 v4, Applied"
            ),
            "{err}"
        );
    }

    #[test]
    fn a_gap_in_the_history_is_named() {
        let (store, run) = escalated_run();
        let mut history = store.history(&run).unwrap();
        history.remove(2);
        let err = replay(&crate::policy::tests::case_policy(), &run, &history).unwrap_err();
        assert_eq!(err, ReplayError::Gap { run, seq: 4, previous: 2 });
    }
}
