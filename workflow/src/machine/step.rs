//! [`step`] itself: the pure transition function, one event at a time.

use super::commands::{Command, Termination};
use super::detail::Detail;
use super::events::{Disposition, Envelope, Event, IgnoreReason, LearnedStart};
use super::outcome::{Activity, Evidence, FailureReason, JobOutcome, JobUsage, Score};
use super::spec::RunSpec;
use super::state::{Resume, RunState, StateTag};
use super::status::{AttemptEnd, AttemptRecord, Run, RunStatus, Waiting};
use crate::ids::{Attempt, JobId, ProfileName, RunId};
use crate::policy::Policy;
use crate::time::Timestamp;

/// The result of a step.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    /// The run's status after the event (the same as before when nothing changed).
    pub status: RunStatus,
    /// What the event did.
    pub disposition: Disposition,
    /// The commands newly owed, to send once the transition is durable.
    pub commands: Vec<Command>,
}

/// A request that makes no sense in the run's state. Nothing is recorded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TransitionError {
    /// The run was submitted before with something else.
    #[error(
        "run {run} was already submitted with a different team, source or cpu_only: \
         use a new submission id, or submit exactly the same thing again"
    )]
    SubmissionConflict {
        /// The run.
        run: RunId,
    },
    /// Only queued runs can be admitted.
    #[error("run {run} is {state}, not queued: it cannot be admitted")]
    NotQueued {
        /// The run.
        run: RunId,
        /// Its state.
        state: StateTag,
    },
    /// The run has already ended.
    #[error("run {run} is already {state}: only queued, launching, running, predicted or scored runs can be cancelled")]
    NotCancellable {
        /// The run.
        run: RunId,
        /// Its state.
        state: StateTag,
    },
    /// The run has not ended.
    #[error("run {run} is {state}: only failed or cancelled runs can be retried")]
    NotRetryable {
        /// The run.
        run: RunId,
        /// Its state.
        state: StateTag,
    },
    /// The run has no score to compute again.
    #[error("run {run} is {state}: only scored or published runs can be scored again")]
    NotRescorable {
        /// The run.
        run: RunId,
        /// Its state.
        state: StateTag,
    },
}

/// Applies `input` to `run` at time `now` under `policy`.
///
/// Pure: no I/O, no clock, no randomness. The same arguments always give the
/// same result, which is what makes replay possible.
pub fn step(policy: &Policy, run: &Run, input: &Envelope, now: Timestamp) -> Result<Transition, TransitionError> {
    let machine = Step { policy, run, now };
    if let Some(expected) = input.expected_version
        && expected != run.status.version
    {
        let stale = IgnoreReason::StaleVersion { expected, actual: run.status.version };
        return Ok(match &input.event {
            Event::JobLaunched { attempt, job } => machine.unawaited_launch(*attempt, job, stale),
            _ => machine.ignore(stale),
        });
    }
    match &input.event {
        Event::Submitted(spec) => machine.submitted_again(spec),
        Event::Admitted { start } => machine.admitted(start.as_ref()),
        Event::JobLaunched { attempt, job } => Ok(machine.job_launched(*attempt, job)),
        Event::LaunchFailed { attempt, error } => Ok(machine.launch_failed(*attempt, error)),
        Event::JobWaiting { attempt, job, status, reason } => Ok(machine.job_waiting(*attempt, job, status, reason)),
        Event::JobEnded { attempt, job, outcome, usage, evidence } => {
            Ok(machine.job_ended(*attempt, job, outcome, usage, evidence))
        }
        Event::PredictionsScored { attempt, score } => Ok(machine.scored(*attempt, *score)),
        Event::PredictionsRejected { attempt, reason } => Ok(machine.rejected(*attempt, reason)),
        Event::Published { attempt } => Ok(machine.published(*attempt)),
        Event::JobTerminated { attempt, job } => Ok(machine.terminated(*attempt, job.as_ref())),
        Event::Withdrawn { attempt } => Ok(machine.withdrawn(*attempt)),
        Event::ActivityFailed { attempt, activity, error } => Ok(machine.activity_failed(*attempt, *activity, error)),
        Event::CancelRequested => machine.cancel(),
        Event::RetryRequested => machine.retry(),
        Event::RescoreRequested => machine.rescore(),
    }
}

/// One application of `step`: the inputs every handler needs.
struct Step<'a> {
    policy: &'a Policy,
    run: &'a Run,
    now: Timestamp,
}

impl Step<'_> {
    fn status(&self) -> &RunStatus {
        &self.run.status
    }

    fn run_id(&self) -> RunId {
        self.run.spec.run.clone()
    }

    /// Moves to `state`, after `edit` updated the bookkeeping.
    fn apply(&self, state: RunState, edit: impl FnOnce(&mut RunStatus)) -> Transition {
        let mut status = self.status().clone();
        edit(&mut status);
        status.state = state;
        status.version += 1;
        status.updated_at = self.now;
        self.finish(status, Disposition::Applied)
    }

    fn ignore(&self, reason: IgnoreReason) -> Transition {
        Transition { status: self.status().clone(), disposition: Disposition::Ignored(reason), commands: Vec::new() }
    }

    /// Computes which commands of the new outbox were not owed before.
    fn finish(&self, status: RunStatus, disposition: Disposition) -> Transition {
        let before = self.status().outbox();
        let commands = status.outbox().into_iter().filter(|c| !before.contains(c)).collect();
        Transition { status, disposition, commands }
    }

    /// The current attempt's placement, when the run waits for `attempt`'s job.
    fn awaiting(&self, attempt: Attempt) -> Option<(&ProfileName, Option<&JobId>)> {
        match self.status().state.placement() {
            Some((current, profile, job)) if current == attempt => Some((profile, job)),
            _ => None,
        }
    }

    fn submitted_again(&self, spec: &RunSpec) -> Result<Transition, TransitionError> {
        if self.run.spec.same_submission(spec) {
            Ok(self.ignore(IgnoreReason::Duplicate))
        } else {
            Err(TransitionError::SubmissionConflict { run: self.run_id() })
        }
    }

    fn admitted(&self, start: Option<&LearnedStart>) -> Result<Transition, TransitionError> {
        match &self.status().state {
            RunState::Queued => {
                let cpu_only = self.run.spec.cpu_only;
                // A profile since removed, or of the other ladder, is not learned from.
                let learned = start
                    .filter(|s| self.policy.profile(&s.profile).is_some_and(|p| p.cpu_only == cpu_only))
                    .map(|s| &s.profile);
                Ok(self.launch(learned.or(self.policy.first_profile(cpu_only).map(|p| &p.name))))
            }
            RunState::Launching { .. }
            | RunState::Running { .. }
            | RunState::Predicted { .. }
            | RunState::Scored { .. }
            | RunState::Published { .. }
            | RunState::Failed { .. }
            | RunState::Cancelled => {
                Err(TransitionError::NotQueued { run: self.run_id(), state: self.status().state.tag() })
            }
        }
    }

    /// Starts the next attempt on `profile`: its `LaunchJob` is owed from now.
    fn launch(&self, profile: Option<&ProfileName>) -> Transition {
        self.launch_after(profile, None, |_| ())
    }

    fn launch_after(
        &self,
        profile: Option<&ProfileName>,
        not_before: Option<Timestamp>,
        edit: impl FnOnce(&mut RunStatus),
    ) -> Transition {
        let Some(profile) = profile else {
            let reason = FailureReason::NoEligibleProfile { cpu_only: self.run.spec.cpu_only };
            return self.apply(RunState::Failed { reason, resume: None }, edit);
        };
        let attempt = self.status().next_attempt();
        if attempt.0 > self.policy.retry().attempts_max {
            let reason = FailureReason::AttemptsExhausted { attempts: attempt.0 - 1 };
            return self.apply(RunState::Failed { reason, resume: None }, edit);
        }
        let record = AttemptRecord {
            attempt,
            profile: profile.clone(),
            launched_at: self.now,
            job: None,
            usage: None,
            end: None,
            evidence: None,
            waiting: None,
        };
        self.apply(RunState::Launching { profile: profile.clone(), attempt, not_before }, |status| {
            edit(status);
            status.attempts.push(record);
        })
    }

    fn job_launched(&self, attempt: Attempt, job: &JobId) -> Transition {
        match (&self.status().state, self.awaiting(attempt)) {
            (RunState::Launching { profile, .. }, Some(_)) => {
                let state = RunState::Running { profile: profile.clone(), attempt, job: job.clone() };
                self.apply(state, |status| set_job(status, attempt, job))
            }
            _ => self.unawaited_launch(attempt, job, IgnoreReason::NotAwaited),
        }
    }

    /// A job reported launched that the run does not wait for. If the run
    /// already knows that job (it runs, ended, or was terminated on cancel) or
    /// owes its termination, this is a repeat. Otherwise it is an orphan, say
    /// launched just as the run was cancelled, and it must be terminated.
    fn unawaited_launch(&self, attempt: Attempt, job: &JobId, reason: IgnoreReason) -> Transition {
        let Some(record) = self.status().attempt(attempt) else {
            return self.ignore(reason);
        };
        let owed = self.status().terminations.iter().any(|t| t.attempt == attempt && t.job.as_ref() == Some(job));
        // Still launching: the report is late, not an orphan (its launch is owed again).
        let launching = matches!(self.awaiting(attempt), Some((_, None)));
        if record.job.as_ref() == Some(job) || owed || launching {
            return self.ignore(reason);
        }
        // A second job of the attempt (a launch raced another), or one the run
        // gave up on: it runs for nobody.
        let mut status = self.status().clone();
        owe_termination(&mut status, Termination { attempt, job: Some(job.clone()) });
        self.finish(status, Disposition::Ignored(IgnoreReason::OrphanJob))
    }

    fn launch_failed(&self, attempt: Attempt, error: &Detail) -> Transition {
        match (&self.status().state, self.awaiting(attempt)) {
            (RunState::Launching { .. }, Some(_)) => {
                let reason = FailureReason::CannotStart { detail: error.clone() };
                self.apply(RunState::Failed { reason, resume: None }, |status| {
                    end_attempt(status, attempt, AttemptEnd::LaunchFailed, None);
                })
            }
            _ => self.ignore(IgnoreReason::NotAwaited),
        }
    }

    fn job_ended(
        &self,
        attempt: Attempt,
        job: &JobId,
        outcome: &JobOutcome,
        usage: &JobUsage,
        evidence: &Evidence,
    ) -> Transition {
        let profile = match (&self.status().state, self.awaiting(attempt)) {
            (RunState::Launching { .. }, Some((profile, None))) => profile,
            (RunState::Running { .. }, Some((profile, Some(running)))) if running == job => profile,
            _ => return self.ignore(IgnoreReason::NotAwaited),
        };
        let record_end = |status: &mut RunStatus| {
            set_job(status, attempt, job);
            end_attempt(status, attempt, AttemptEnd::Job(outcome.clone()), Some(usage.clone()));
            if let Some(record) = status.attempt_mut(attempt) {
                record.evidence = Some(evidence.clone());
            }
        };
        let fail = |reason| self.apply(RunState::Failed { reason, resume: None }, record_end);
        match outcome {
            JobOutcome::Succeeded => {
                let state = RunState::Predicted { profile: profile.clone(), attempt, job: job.clone() };
                self.apply(state, record_end)
            }
            JobOutcome::OutOfMemory { resource } => match self.policy.escalate(profile, *resource) {
                Some(bigger) => self.launch_after(Some(&bigger.name), None, |status| {
                    record_end(status);
                    status.interruptions = 0;
                }),
                None => fail(FailureReason::OutOfMemory { resource: *resource, profile: profile.clone() }),
            },
            JobOutcome::Interrupted { .. } => {
                let interruptions = self.status().interruptions + 1;
                if interruptions > self.policy.retry().interruptions_max {
                    return fail(FailureReason::Interrupted { interruptions });
                }
                let not_before = Some(self.now.plus_secs(self.policy.backoff_secs(interruptions)));
                self.launch_after(Some(profile), not_before, |status| {
                    record_end(status);
                    status.interruptions = interruptions;
                })
            }
            JobOutcome::TimedOut => fail(FailureReason::TimedOut { profile: profile.clone() }),
            JobOutcome::Crashed { exit_code } => fail(FailureReason::Crashed { exit_code: *exit_code }),
            JobOutcome::CannotStart { detail } => fail(FailureReason::CannotStart { detail: detail.clone() }),
            JobOutcome::LimitExceeded { limit } => fail(FailureReason::LimitExceeded { limit: *limit }),
        }
    }

    /// Notes why the running attempt's job has not started; the same status
    /// and reason again change nothing.
    fn job_waiting(&self, attempt: Attempt, job: &JobId, status: &Detail, reason: &Option<Detail>) -> Transition {
        let RunState::Running { attempt: current, job: running, .. } = &self.status().state else {
            return self.ignore(IgnoreReason::NotAwaited);
        };
        if *current != attempt || running != job {
            return self.ignore(IgnoreReason::NotAwaited);
        }
        let known = self.status().attempt(attempt).and_then(|r| r.waiting.as_ref());
        if known.is_some_and(|w| w.status == *status && w.reason == *reason) {
            return self.ignore(IgnoreReason::Duplicate);
        }
        let mut status_after = self.status().clone();
        if let Some(record) = status_after.attempt_mut(attempt) {
            let since = known.filter(|w| w.status == *status).map_or(self.now, |w| w.since);
            record.waiting = Some(Waiting { status: status.clone(), reason: reason.clone(), since });
        }
        status_after.updated_at = self.now;
        self.finish(status_after, Disposition::Noted)
    }

    fn scored(&self, attempt: Attempt, score: Score) -> Transition {
        match &self.status().state {
            // An audit's score is compared with its original's, never published.
            RunState::Predicted { attempt: current, .. } if *current == attempt && self.run.spec.audit.is_some() => {
                self.apply(RunState::Published { attempt, score }, |_| ())
            }
            RunState::Predicted { attempt: current, .. } if *current == attempt => {
                self.apply(RunState::Scored { attempt, score }, |_| ())
            }
            _ => self.ignore(IgnoreReason::NotAwaited),
        }
    }

    fn rejected(&self, attempt: Attempt, reason: &Detail) -> Transition {
        match &self.status().state {
            RunState::Predicted { attempt: current, .. } if *current == attempt => {
                let reason = FailureReason::InvalidPredictions { reason: reason.clone() };
                // Scored again (a rescore), its earlier score must come off the leaderboard.
                self.apply(RunState::Failed { reason, resume: None }, owe_withdrawal(attempt))
            }
            _ => self.ignore(IgnoreReason::NotAwaited),
        }
    }

    fn published(&self, attempt: Attempt) -> Transition {
        match &self.status().state {
            RunState::Scored { attempt: current, score } if *current == attempt => {
                self.apply(RunState::Published { attempt, score: *score }, |_| ())
            }
            _ => self.ignore(IgnoreReason::NotAwaited),
        }
    }

    fn withdrawn(&self, attempt: Attempt) -> Transition {
        if !self.status().withdrawals.contains(&attempt) {
            return self.ignore(IgnoreReason::NotAwaited);
        }
        let mut status = self.status().clone();
        status.withdrawals.retain(|&a| a != attempt);
        status.updated_at = self.now;
        self.finish(status, Disposition::Acknowledged)
    }

    fn terminated(&self, attempt: Attempt, job: Option<&JobId>) -> Transition {
        let acknowledged = |t: &Termination| t.attempt == attempt && t.job.as_ref() == job;
        if !self.status().terminations.iter().any(acknowledged) {
            return self.ignore(IgnoreReason::NotAwaited);
        }
        let mut status = self.status().clone();
        status.terminations.retain(|t| !acknowledged(t));
        status.updated_at = self.now;
        self.finish(status, Disposition::Acknowledged)
    }

    fn activity_failed(&self, attempt: Attempt, activity: Activity, error: &Detail) -> Transition {
        let resume = match (&self.status().state, activity) {
            (RunState::Launching { attempt: current, .. }, Activity::Launch) if *current == attempt => None,
            (RunState::Predicted { profile, attempt: current, job }, Activity::Score) if *current == attempt => {
                Some(Resume::Score { profile: profile.clone(), attempt, job: job.clone() })
            }
            (RunState::Scored { attempt: current, score }, Activity::Publish) if *current == attempt => {
                Some(Resume::Publish { attempt, score: *score })
            }
            _ => return self.ignore(IgnoreReason::NotAwaited),
        };
        let reason = FailureReason::ActivityFailed { activity, error: error.clone() };
        self.apply(RunState::Failed { reason, resume }, |status| {
            if activity == Activity::Launch {
                // The launch may have reached the runner before it gave up:
                // whatever job it made must not run for nobody.
                end_attempt(status, attempt, AttemptEnd::LaunchFailed, None);
                owe_termination(status, Termination { attempt, job: None });
            }
        })
    }

    fn cancel(&self) -> Result<Transition, TransitionError> {
        match &self.status().state {
            RunState::Queued => Ok(self.apply(RunState::Cancelled, |_| ())),
            // Scored before (a rescore), or its publish under way and landing
            // after the cancel: its score must come off the leaderboard.
            RunState::Predicted { attempt, .. } | RunState::Scored { attempt, .. } => {
                Ok(self.apply(RunState::Cancelled, owe_withdrawal(*attempt)))
            }
            RunState::Launching { attempt, .. } => Ok(self.apply(RunState::Cancelled, cancelled(*attempt, None, None))),
            RunState::Running { attempt, job, .. } => {
                // The runner will not report this job's end to a cancelled run:
                // bill it from launch to now.
                let launched_at = self.status().attempt(*attempt).map(|r| r.launched_at);
                let usage = JobUsage { started_at: launched_at, ended_at: self.now, peak_memory_mib: None };
                Ok(self.apply(RunState::Cancelled, cancelled(*attempt, Some(job.clone()), Some(usage))))
            }
            RunState::Cancelled => Ok(self.ignore(IgnoreReason::Duplicate)),
            RunState::Published { .. } | RunState::Failed { .. } => {
                Err(TransitionError::NotCancellable { run: self.run_id(), state: self.status().state.tag() })
            }
        }
    }

    fn retry(&self) -> Result<Transition, TransitionError> {
        let reset = |status: &mut RunStatus| status.interruptions = 0;
        match &self.status().state {
            RunState::Failed { resume: Some(Resume::Score { profile, attempt, job }), .. } => {
                let state = RunState::Predicted { profile: profile.clone(), attempt: *attempt, job: job.clone() };
                Ok(self.apply(state, reset))
            }
            RunState::Failed { resume: Some(Resume::Publish { attempt, score }), .. } => {
                Ok(self.apply(RunState::Scored { attempt: *attempt, score: *score }, reset))
            }
            RunState::Failed { resume: None, .. } | RunState::Cancelled => Ok(self.apply(RunState::Queued, reset)),
            RunState::Queued
            | RunState::Launching { .. }
            | RunState::Running { .. }
            | RunState::Predicted { .. }
            | RunState::Scored { .. }
            | RunState::Published { .. } => {
                Err(TransitionError::NotRetryable { run: self.run_id(), state: self.status().state.tag() })
            }
        }
    }
}

impl Step<'_> {
    /// Back to its predictions, to be scored and published again.
    fn rescore(&self) -> Result<Transition, TransitionError> {
        let not_rescorable = || TransitionError::NotRescorable { run: self.run_id(), state: self.status().state.tag() };
        let attempt = match &self.status().state {
            RunState::Scored { attempt, .. } | RunState::Published { attempt, .. } => *attempt,
            _ => return Err(not_rescorable()),
        };
        let record = self.status().attempt(attempt).ok_or_else(not_rescorable)?;
        let job = record.job.clone().ok_or_else(not_rescorable)?;
        Ok(self.apply(RunState::Predicted { profile: record.profile.clone(), attempt, job }, |_| ()))
    }
}

/// Owes the withdrawal of `attempt`'s score from the leaderboard.
fn owe_withdrawal(attempt: Attempt) -> impl FnOnce(&mut RunStatus) {
    move |status| {
        if !status.withdrawals.contains(&attempt) {
            status.withdrawals.push(attempt);
        }
    }
}

/// Ends `attempt` as cancelled and owes the termination of its job.
fn cancelled(attempt: Attempt, job: Option<JobId>, usage: Option<JobUsage>) -> impl FnOnce(&mut RunStatus) {
    move |status| {
        end_attempt(status, attempt, AttemptEnd::Cancelled, usage);
        owe_termination(status, Termination { attempt, job });
    }
}

/// Owes `termination`, in place of one it covers: the same job's, or a
/// termination by name of its attempt (which it makes precise).
fn owe_termination(status: &mut RunStatus, termination: Termination) {
    status
        .terminations
        .retain(|t| !(t.attempt == termination.attempt && (t.job.is_none() || t.job == termination.job)));
    status.terminations.push(termination);
}

/// Records the job of `attempt` (the runner may report it only at its end).
fn set_job(status: &mut RunStatus, attempt: Attempt, job: &JobId) {
    if let Some(record) = status.attempt_mut(attempt) {
        record.job = Some(job.clone());
    }
}

fn end_attempt(status: &mut RunStatus, attempt: Attempt, end: AttemptEnd, usage: Option<JobUsage>) {
    if let Some(record) = status.attempt_mut(attempt) {
        record.end = Some(end);
        record.usage = usage;
    }
}
