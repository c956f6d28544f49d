//! What must hold after every simulation, whatever the faults did:
//!
//! - every run ends, in a terminal state; every end of a job the store has is
//!   the one the world saw, a published score is the one its predictions
//!   make, and a run failed for an activity only if a worker gave up on it;
//! - no (run, attempt) was launched twice (a launch sent again adopts);
//! - no job is left running or waiting once its run ended, and none ran to
//!   its end without the store knowing it (a job nothing would stop);
//! - every published run is on the world's leaderboard with the score the
//!   store has, nothing else is (a cancelled run is off it; a run whose
//!   publish was given up on may be, with that very score: retrying it
//!   publishes it), and no run stands published from two attempts (one
//!   withdrawn, by a cancel, does not count);
//! - every command the dispatcher let out was owed when it went out;
//! - every history replays to the stored status, and in none did an answer
//!   to a command count at another version than the one it was issued at.

use super::world::JobState;
use super::{Scenario, Simulated};
use crate::ids::RunId;
use crate::machine::{AttemptEnd, Disposition, Event, FailureReason, Resume, RunState};
use crate::replay;
use crate::store::{RunFilter, StateCounts, WorkflowStore, all_runs};

/// One thing that did not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The run it concerns.
    pub run: RunId,
    /// What went wrong, in words.
    pub problem: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.run, self.problem)
    }
}

/// The violations of `simulated`, a run of `scenario`; none when all holds.
pub fn check(scenario: &Scenario, simulated: &Simulated) -> Vec<Violation> {
    let mut found = Vec::new();
    let mut violation = |run: &RunId, problem: String| found.push(Violation { run: run.clone(), problem });
    let (store, world) = (&simulated.store, &simulated.world);
    let runs = match all_runs(store, RunFilter::All) {
        Ok(runs) => runs,
        Err(e) => {
            let run = scenario.submissions.first().map(|(spec, _)| spec.run.clone());
            violation(&run.unwrap_or_else(|| unreachable!("a scenario has runs")), format!("the store fails: {e}"));
            return found;
        }
    };
    for (spec, _) in &scenario.submissions {
        if !runs.contains(&spec.run) {
            violation(&spec.run, "was submitted but is not in the store".into());
        }
    }
    for run in &runs {
        let stored = match store.load(run) {
            Ok(Some(stored)) => stored.run,
            other => {
                violation(run, format!("cannot be loaded: {other:?}"));
                continue;
            }
        };
        let state = &stored.status.state;
        if !state.tag().is_terminal() || stored.status.is_live() {
            violation(run, format!("never ended: still {} (v{})", state.tag(), stored.status.version));
        }
        match (state, world.board.get(run)) {
            (RunState::Published { attempt, score }, Some(on_board)) if on_board != &(*attempt, *score) => {
                violation(run, format!("published attempt {attempt} but the leaderboard has {on_board:?}"))
            }
            (RunState::Published { attempt, .. }, None) => {
                violation(run, format!("published attempt {attempt} is not on the leaderboard"))
            }
            (RunState::Published { .. }, Some(_)) | (_, None) => {}
            // A publish given up on may have got through in another copy
            // whose answer was lost: the run failed resumably, and `evalflow
            // retry` publishes it again (the same result: no change).
            (RunState::Failed { resume: Some(Resume::Publish { attempt, score }), .. }, Some(on_board))
                if on_board == &(*attempt, *score) => {}
            (other, Some(on_board)) => {
                violation(run, format!("is {} but on the leaderboard as {on_board:?}", other.tag()))
            }
        }
        if let (RunState::Published { score, .. }, Some(nature)) = (state, world.nature(run))
            && score.value() != nature.score
        {
            violation(run, format!("published {} but its predictions score {}", score.value(), nature.score));
        }
        // Every end the store has is the one the world saw, and every failure
        // has a cause in the world: no score is lost to a wrong end.
        for record in &stored.status.attempts {
            let Some(AttemptEnd::Job(outcome)) = &record.end else { continue };
            let seen = world.jobs.get(&(run.clone(), record.attempt));
            let matches = seen.is_some_and(|job| {
                Some(&job.id) == record.job.as_ref()
                    && matches!(&job.state, JobState::Ended { outcome: Some(o), .. } if o == outcome)
            });
            if !matches {
                violation(
                    run,
                    format!("attempt {} ended as {outcome:?} in the store, but its job: {seen:?}", record.attempt),
                );
            }
        }
        if let RunState::Failed { reason: FailureReason::ActivityFailed { activity, .. }, .. } = state
            && !world.given_up.contains(&(run.clone(), *activity))
        {
            violation(run, format!("failed as {activity:?} was given up on, which no worker did"));
        }
        let standing = world.standing(run);
        if standing.len() > 1 {
            violation(run, format!("stands published from {} attempts: {standing:?}", standing.len()));
        }
        if let Err(e) = replay::check(&scenario.policy, store, run) {
            violation(run, format!("its history does not replay: {e}"));
        }
        // An answer to a command counts only at the version it was issued at.
        let history = store.history(run).unwrap_or_default();
        for pair in history.windows(2) {
            let (before, entry) = (&pair[0], &pair[1]);
            let counted = !matches!(entry.disposition, Disposition::Ignored(_));
            if let (Some(expected), true) = (entry.input.expected_version, counted)
                && expected != before.status.version
            {
                violation(
                    run,
                    format!(
                        "entry {} took an answer issued at v{expected} while the run was at v{}: {:?}",
                        entry.seq, before.status.version, entry.input.event
                    ),
                );
            }
        }
    }
    // The store's indexes and counts agree with the runs themselves.
    let mut counted = StateCounts::default();
    let mut live = Vec::new();
    for run in &runs {
        if let Ok(Some(stored)) = store.load(run) {
            counted[stored.run.status.state.tag()] += 1;
            if stored.run.status.is_live() {
                live.push(run.clone());
            }
        }
    }
    if let (Some(first), Ok(counts)) = (runs.first(), store.counts())
        && counts != counted
    {
        violation(first, format!("the store counts {counts:?}, but its runs are {counted:?}"));
    }
    if let (Some(first), Ok(indexed)) = (runs.first(), all_runs(store, RunFilter::Live))
        && indexed != live
    {
        violation(first, format!("the live index has {indexed:?}, but the live runs are {live:?}"));
    }
    for (run, command, version) in &simulated.unowed_sends {
        violation(run, format!("{command} was sent while the run, at v{version}, did not owe it"));
    }
    for ((run, attempt), times) in &world.made {
        if *times > 1 {
            violation(run, format!("attempt {attempt} was launched {times} times"));
        }
    }
    for ((run, attempt), job) in world.unfinished() {
        violation(run, format!("job {} of attempt {attempt} is still {:?} after the end", job.id, job.state));
    }
    for ((run, attempt), job) in &world.jobs {
        let ran_to_its_end = matches!(job.state, JobState::Ended { outcome: Some(_), .. });
        let known = store.load(run).ok().flatten().is_some_and(|stored| {
            stored.run.status.attempts.iter().any(|a| a.attempt == *attempt && a.job.as_ref() == Some(&job.id))
        });
        // A job the engine asked to stop may end by itself before the stop reaches it.
        let stopped = store.history(run).unwrap_or_default().iter().any(
            |entry| matches!(&entry.input.event, Event::JobTerminated { attempt: stopped, .. } if stopped == attempt),
        );
        if ran_to_its_end && !known && !stopped {
            violation(run, format!("job {} of attempt {attempt} ran to its end, but the store never knew it", job.id));
        }
    }
    found
}
