//! The run state machine: a pure function from (run, event, now) to the next
//! status and the commands it owes.
//!
//! ```text
//! (new)     --(Submitted)------------------------> Queued  (the same submission again is ignored)
//! Queued    --(Admitted{start})-----------------> Launching{start, or the ladder's cheapest}  [LaunchJob]
//!                                                  | Failed{NoEligibleProfile | AttemptsExhausted}
//! Launching --(JobLaunched{job})-----------------> Running{job}
//! Launching --(LaunchFailed{error})--------------> Failed{CannotStart}
//! Launching --(JobEnded)-------------------------> as from Running (the end overtook the launch report)
//! Running   --(JobEnded{Succeeded})--------------> Predicted                                  [ScorePredictions]
//! Running   --(JobEnded{OutOfMemory{r}})---------> Launching{cheapest profile with more r}    [LaunchJob]
//!                                                  | Failed{OutOfMemory} at the top of the ladder
//! Running   --(JobEnded{Interrupted})------------> Launching{same profile, after backoff}     [LaunchJob]
//!                                                  | Failed{Interrupted} after interruptions_max in a row
//! Running   --(JobEnded{TimedOut|Crashed|CannotStart|LimitExceeded})--> Failed{the same reason}
//! Predicted --(PredictionsScored{score})---------> Scored{score}                              [Publish]
//!                                                  | Published, for an audit run (never on the leaderboard)
//! Predicted --(PredictionsRejected{reason})------> Failed{InvalidPredictions}
//! Scored    --(Published)------------------------> Published
//! Launching | Predicted | Scored --(ActivityFailed)--> Failed{ActivityFailed}, resumable [TerminateJob by name after a launch]
//! Queued | Launching | Running | Predicted | Scored --(CancelRequested)--> Cancelled  [TerminateJob if a job may run; Withdraw from Scored]
//! Failed | Cancelled --(RetryRequested)----------> Queued, or back to Predicted | Scored to resume an activity
//! Running   --(JobWaiting{status, reason})-------> unchanged; why its job has not started (or that it has) is noted
//! any       --(JobTerminated{attempt, job})------> unchanged; the owed TerminateJob is acknowledged
//! any       --(Withdrawn{attempt})---------------> unchanged; the owed Withdraw is acknowledged
//! any       --(JobLaunched of a job the run does not hold)--> unchanged  [TerminateJob of that job]
//! Published | Failed | Cancelled --(any other event)--> unchanged (ignored)
//! ```
//!
//! Every launch (first placement, OOM escalation, relaunch after an
//! interruption, retry) takes the next attempt number, so `(run, attempt)`
//! names one job for ever. Events that answer a command carry the version the
//! command was issued at; any other version is stale and changes nothing.
//! Late or repeated worker events are recorded as ignored; operator requests
//! that make no sense in the current state are errors for the caller.

use serde::{Deserialize, Serialize};

use crate::ids::{Attempt, JobId, ProfileName, RunId};
use crate::policy::{Policy, Resource};
use crate::run::{
    AttemptEnd, AttemptRecord, Detail, Disposition, Envelope, Evidence, IgnoreReason, JobUsage, Run, RunSpec,
    RunStatus, StateTag, Termination, Waiting,
};
use crate::time::Timestamp;

/// A score on a leaderboard metric (binary log loss here: lower is better).
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Serialize, Deserialize)]
pub struct Score(f64);

impl Score {
    /// A finite score; `None` for NaN or infinities.
    pub fn new(value: f64) -> Option<Score> {
        value.is_finite().then_some(Score(value))
    }

    /// The score's value.
    pub fn value(self) -> f64 {
        self.0
    }
}

/// Where a run is. Each variant carries exactly the data that state has.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Waiting for a launch slot.
    Queued,
    /// A job is being launched on `profile`.
    Launching {
        /// The profile it is placed on.
        profile: ProfileName,
        /// This launch's number.
        attempt: Attempt,
        /// Not before this time (backoff after an interruption).
        not_before: Option<Timestamp>,
    },
    /// The job runs.
    Running {
        /// The profile it runs on.
        profile: ProfileName,
        /// This launch's number.
        attempt: Attempt,
        /// The runner's id for the job.
        job: JobId,
    },
    /// The job ended and wrote predictions, to be scored.
    Predicted {
        /// The profile it ran on.
        profile: ProfileName,
        /// The attempt that produced the predictions.
        attempt: Attempt,
        /// The job that produced them.
        job: JobId,
    },
    /// The predictions were scored; the score is to be published.
    Scored {
        /// The attempt that produced the predictions.
        attempt: Attempt,
        /// The score.
        score: Score,
    },
    /// The score is final: on the leaderboard (an audit run's only in its audit).
    Published {
        /// The attempt that produced the predictions.
        attempt: Attempt,
        /// The score.
        score: Score,
    },
    /// The run ended without a score.
    Failed {
        /// Why.
        reason: FailureReason,
        /// Where a retry resumes, when the failure was in an activity after the job.
        resume: Option<Resume>,
    },
    /// An operator stopped the run.
    Cancelled,
}

impl RunState {
    /// The state without its data.
    pub fn tag(&self) -> StateTag {
        match self {
            RunState::Queued => StateTag::Queued,
            RunState::Launching { .. } => StateTag::Launching,
            RunState::Running { .. } => StateTag::Running,
            RunState::Predicted { .. } => StateTag::Predicted,
            RunState::Scored { .. } => StateTag::Scored,
            RunState::Published { .. } => StateTag::Published,
            RunState::Failed { .. } => StateTag::Failed,
            RunState::Cancelled => StateTag::Cancelled,
        }
    }

    /// The command this state owes until it is left.
    pub fn command(&self) -> Option<Command> {
        match self {
            RunState::Launching { profile, attempt, not_before } => {
                Some(Command::LaunchJob { attempt: *attempt, profile: profile.clone(), not_before: *not_before })
            }
            RunState::Predicted { attempt, job, .. } => {
                Some(Command::ScorePredictions { attempt: *attempt, job: job.clone() })
            }
            RunState::Scored { attempt, score } => Some(Command::Publish { attempt: *attempt, score: *score }),
            RunState::Queued
            | RunState::Running { .. }
            | RunState::Published { .. }
            | RunState::Failed { .. }
            | RunState::Cancelled => None,
        }
    }

    /// The attempt, profile and (when known) job of a state that has a job.
    pub fn placement(&self) -> Option<(Attempt, &ProfileName, Option<&JobId>)> {
        match self {
            RunState::Launching { profile, attempt, .. } => Some((*attempt, profile, None)),
            RunState::Running { profile, attempt, job } | RunState::Predicted { profile, attempt, job } => {
                Some((*attempt, profile, Some(job)))
            }
            RunState::Queued
            | RunState::Scored { .. }
            | RunState::Published { .. }
            | RunState::Failed { .. }
            | RunState::Cancelled => None,
        }
    }

    /// The score, once there is one.
    pub fn score(&self) -> Option<Score> {
        match self {
            RunState::Scored { score, .. } | RunState::Published { score, .. } => Some(*score),
            RunState::Queued
            | RunState::Launching { .. }
            | RunState::Running { .. }
            | RunState::Predicted { .. }
            | RunState::Failed { .. }
            | RunState::Cancelled => None,
        }
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        match self.score() {
            Some(score) if !score.value().is_finite() => Err(format!("score {} is not finite", score.value())),
            _ => Ok(()),
        }
    }
}

/// Where a retry of a failed run resumes when its job already succeeded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resume {
    /// Score the predictions again.
    Score {
        /// The profile the job ran on.
        profile: ProfileName,
        /// The attempt that produced the predictions.
        attempt: Attempt,
        /// The job that produced them.
        job: JobId,
    },
    /// Publish the score again.
    Publish {
        /// The attempt that produced the predictions.
        attempt: Attempt,
        /// The score.
        score: Score,
    },
}

/// How a job ended, as its runner tells it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobOutcome {
    /// It exited 0 and wrote its predictions.
    Succeeded,
    /// It ran out of a resource.
    OutOfMemory {
        /// Which one.
        resource: Resource,
    },
    /// Its machine went away (Spot reclaim, host terminated, infrastructure).
    Interrupted {
        /// What the runner said.
        detail: Detail,
    },
    /// It ran past the time limit.
    TimedOut,
    /// It exited with an error.
    Crashed {
        /// Its exit code, if it exited (rather than being killed by a signal).
        exit_code: Option<i32>,
    },
    /// It could not start (image pull, missing command).
    CannotStart {
        /// What the runner said.
        detail: Detail,
    },
    /// It was stopped for breaking a sandbox limit other than memory or time.
    LimitExceeded {
        /// Which limit.
        limit: Limit,
    },
}

/// A sandbox limit other than memory and time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Limit {
    /// The number of processes and threads.
    Processes,
    /// The bytes written to its output and scratch directories and logs.
    Disk,
}

impl Limit {
    /// What the limit bounds, in words.
    pub fn words(self) -> &'static str {
        match self {
            Limit::Processes => "processes",
            Limit::Disk => "disk space",
        }
    }
}

/// An activity: the side effect a command asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activity {
    /// Launching a job.
    Launch,
    /// Scoring predictions.
    Score,
    /// Publishing a score.
    Publish,
}

impl Activity {
    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Activity::Launch => "launch",
            Activity::Score => "score",
            Activity::Publish => "publish",
        }
    }
}

/// Why a run failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureReason {
    /// It ran out of a resource on the largest profile that has it.
    OutOfMemory {
        /// The resource.
        resource: Resource,
        /// The last profile tried.
        profile: ProfileName,
    },
    /// Its job ran past the time limit.
    TimedOut {
        /// The profile it ran on.
        profile: ProfileName,
    },
    /// Its program exited with an error.
    Crashed {
        /// The exit code, if any.
        exit_code: Option<i32>,
    },
    /// Its job could not start.
    CannotStart {
        /// What the runner said.
        detail: Detail,
    },
    /// Its job broke a sandbox limit.
    LimitExceeded {
        /// Which limit.
        limit: Limit,
    },
    /// Its jobs were interrupted too many times in a row.
    Interrupted {
        /// Interruptions in a row.
        interruptions: u32,
    },
    /// Its predictions file was rejected.
    InvalidPredictions {
        /// Which rule it broke, and where.
        reason: Detail,
    },
    /// No profile of its ladder is configured.
    NoEligibleProfile {
        /// Whether it needed the CPU ladder.
        cpu_only: bool,
    },
    /// It used up `retry.attempts_max` launches.
    AttemptsExhausted {
        /// Launches made.
        attempts: u32,
    },
    /// An activity kept failing for reasons outside the submission.
    ActivityFailed {
        /// Which activity.
        activity: Activity,
        /// The last error.
        error: Detail,
    },
}

impl FailureReason {
    /// The reason's kind, as shown in listings and JSON.
    pub fn kind(&self) -> &'static str {
        match self {
            FailureReason::OutOfMemory { .. } => "out_of_memory",
            FailureReason::TimedOut { .. } => "timed_out",
            FailureReason::Crashed { .. } => "crashed",
            FailureReason::CannotStart { .. } => "cannot_start",
            FailureReason::LimitExceeded { .. } => "limit_exceeded",
            FailureReason::Interrupted { .. } => "interrupted",
            FailureReason::InvalidPredictions { .. } => "invalid_predictions",
            FailureReason::NoEligibleProfile { .. } => "no_eligible_profile",
            FailureReason::AttemptsExhausted { .. } => "attempts_exhausted",
            FailureReason::ActivityFailed { .. } => "activity_failed",
        }
    }
}

/// A job outcome in words.
impl std::fmt::Display for JobOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JobOutcome::Succeeded => f.write_str("succeeded"),
            JobOutcome::OutOfMemory { resource } => write!(f, "out of {}", resource.words()),
            JobOutcome::Interrupted { detail } => write!(f, "interrupted: {detail}"),
            JobOutcome::TimedOut => f.write_str("timed out"),
            JobOutcome::Crashed { exit_code: Some(code) } => write!(f, "crashed with exit code {code}"),
            JobOutcome::Crashed { exit_code: None } => f.write_str(KILLED),
            JobOutcome::CannotStart { detail } => could_not_start(f, detail),
            JobOutcome::LimitExceeded { limit } => limit_exceeded(f, *limit),
        }
    }
}

/// The words a job killed by a signal and a run failed by one share.
const KILLED: &str = "killed by a signal";

fn could_not_start(f: &mut std::fmt::Formatter<'_>, detail: &Detail) -> std::fmt::Result {
    write!(f, "could not start: {detail}")
}

fn limit_exceeded(f: &mut std::fmt::Formatter<'_>, limit: Limit) -> std::fmt::Result {
    write!(f, "exceeded the sandbox's limit on {}", limit.words())
}

impl std::fmt::Display for FailureReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FailureReason::OutOfMemory { resource, profile } => {
                write!(f, "out of {} on {profile}, and no profile of its ladder has more", resource.words())
            }
            FailureReason::TimedOut { profile } => write!(f, "exceeded the time limit on {profile}"),
            FailureReason::Crashed { exit_code: Some(code) } => write!(f, "exited with code {code}"),
            FailureReason::Crashed { exit_code: None } => f.write_str(KILLED),
            FailureReason::CannotStart { detail } => could_not_start(f, detail),
            FailureReason::LimitExceeded { limit } => limit_exceeded(f, *limit),
            FailureReason::Interrupted { interruptions } => write!(f, "interrupted {interruptions} times in a row"),
            FailureReason::InvalidPredictions { reason } => write!(f, "invalid predictions: {reason}"),
            FailureReason::NoEligibleProfile { cpu_only: true } => f.write_str("no cpu_only profile is configured"),
            FailureReason::NoEligibleProfile { cpu_only: false } => f.write_str("no GPU profile is configured"),
            FailureReason::AttemptsExhausted { attempts } => write!(f, "used all {attempts} launches allowed"),
            FailureReason::ActivityFailed { activity, error } => write!(f, "{} failed: {error}", activity.as_str()),
        }
    }
}

/// Where a run starts, learned from another stage of its submission.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LearnedStart {
    /// The profile to start on.
    pub profile: ProfileName,
    /// Why, in words: which run ran out of what, where, and where it then succeeded.
    pub reason: Detail,
}

/// Where another run of `sibling`'s submission should start: the profile
/// `sibling` succeeded on after running out of memory on a smaller one (the
/// private re-run of a final pick need not pay for the failed G4 attempt
/// again). `None` when it never ran out, or has not succeeded since.
pub fn learned_start(sibling: &Run) -> Option<LearnedStart> {
    let attempts = &sibling.status.attempts;
    let ended = |a: &AttemptRecord| match &a.end {
        Some(AttemptEnd::Job(outcome)) => Some(outcome.clone()),
        _ => None,
    };
    let succeeded = attempts.iter().rev().find(|a| ended(a) == Some(JobOutcome::Succeeded))?;
    let mut before = attempts.iter().rev().filter(|a| a.attempt < succeeded.attempt);
    let (ran_out, resource) = before.find_map(|a| match ended(a) {
        Some(JobOutcome::OutOfMemory { resource }) => Some((a, resource)),
        _ => None,
    })?;
    let reason = format!(
        "{} ran out of {} on {} and succeeded on {}",
        sibling.spec.run,
        resource.words(),
        ran_out.profile,
        succeeded.profile
    );
    Some(LearnedStart { profile: succeeded.profile.clone(), reason: Detail::new(reason) })
}

/// What happened to a run. Past tense: events are facts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// The run was submitted. Always the first entry of a history.
    Submitted(RunSpec),
    /// The scheduler gave the run a launch slot.
    Admitted {
        /// Where to start instead of the ladder's cheapest profile, learned
        /// from another stage of the same submission.
        start: Option<LearnedStart>,
    },
    /// The runner launched (or adopted) the attempt's job.
    JobLaunched {
        /// The attempt launched.
        attempt: Attempt,
        /// The runner's job id.
        job: JobId,
    },
    /// The attempt's job could not be launched, for a reason in the submission.
    LaunchFailed {
        /// The attempt.
        attempt: Attempt,
        /// Why.
        error: Detail,
    },
    /// The attempt's job ended.
    JobEnded {
        /// The attempt.
        attempt: Attempt,
        /// The job.
        job: JobId,
        /// How it ended.
        outcome: JobOutcome,
        /// What it used.
        usage: JobUsage,
        /// What the runner saw of its end.
        evidence: Evidence,
    },
    /// The attempt's job's status before its end: not started yet, for the
    /// runner's reason, or started (`RUNNING`).
    JobWaiting {
        /// The attempt.
        attempt: Attempt,
        /// The job.
        job: JobId,
        /// The runner's status for it.
        status: Detail,
        /// The runner's reason.
        reason: Option<Detail>,
    },
    /// The predictions were scored.
    PredictionsScored {
        /// The attempt that produced them.
        attempt: Attempt,
        /// The score.
        score: Score,
    },
    /// The predictions broke a rule of the competition.
    PredictionsRejected {
        /// The attempt that produced them.
        attempt: Attempt,
        /// Which rule, and where.
        reason: Detail,
    },
    /// The score is final: on the leaderboard (an audit run's only in its audit).
    Published {
        /// The attempt that produced the predictions.
        attempt: Attempt,
    },
    /// The attempt's score is off the leaderboard (or never reached it),
    /// and stays off even if its publish lands later.
    Withdrawn {
        /// The attempt.
        attempt: Attempt,
    },
    /// The attempt's job is stopped (or was never running).
    JobTerminated {
        /// The attempt.
        attempt: Attempt,
        /// The job the termination named; `None`: every job of the attempt, found by name.
        job: Option<JobId>,
    },
    /// A worker gave up on an activity after its retries.
    ActivityFailed {
        /// The attempt it worked for.
        attempt: Attempt,
        /// Which activity.
        activity: Activity,
        /// The last error.
        error: Detail,
    },
    /// An operator asked to stop the run.
    CancelRequested,
    /// An operator asked to run a failed or cancelled run again.
    RetryRequested,
}

impl Event {
    /// The event's name, as shown in histories.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Submitted(_) => "submitted",
            Event::Admitted { .. } => "admitted",
            Event::JobLaunched { .. } => "job_launched",
            Event::LaunchFailed { .. } => "launch_failed",
            Event::JobEnded { .. } => "job_ended",
            Event::JobWaiting { .. } => "job_waiting",
            Event::PredictionsScored { .. } => "predictions_scored",
            Event::PredictionsRejected { .. } => "predictions_rejected",
            Event::Published { .. } => "published",
            Event::JobTerminated { .. } => "job_terminated",
            Event::Withdrawn { .. } => "withdrawn",
            Event::ActivityFailed { .. } => "activity_failed",
            Event::CancelRequested => "cancel_requested",
            Event::RetryRequested => "retry_requested",
        }
    }
}

/// A side effect the machine asks for. Imperative: commands are requests.
/// Workers carry them out and answer with events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// Launch (or adopt) the attempt's job on `profile`; answered by
    /// `JobLaunched`, `LaunchFailed` or `ActivityFailed`.
    LaunchJob {
        /// The attempt.
        attempt: Attempt,
        /// Where to place it.
        profile: ProfileName,
        /// Not before this time.
        not_before: Option<Timestamp>,
    },
    /// Stop the attempt's job; answered by `JobTerminated`.
    TerminateJob {
        /// The attempt.
        attempt: Attempt,
        /// The job, if known; otherwise found by its deterministic name.
        job: Option<JobId>,
    },
    /// Score the attempt's predictions; answered by `PredictionsScored`,
    /// `PredictionsRejected` or `ActivityFailed`.
    ScorePredictions {
        /// The attempt that produced them.
        attempt: Attempt,
        /// The job that produced them.
        job: JobId,
    },
    /// Put the score on the leaderboard; answered by `Published` or `ActivityFailed`.
    Publish {
        /// The attempt that produced the predictions.
        attempt: Attempt,
        /// The score.
        score: Score,
    },
    /// Keep the attempt's score off the leaderboard, now and if its publish
    /// lands later; answered by `Withdrawn`.
    Withdraw {
        /// The attempt whose score was being published.
        attempt: Attempt,
    },
}

impl Command {
    /// The command's name.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::LaunchJob { .. } => "launch_job",
            Command::TerminateJob { .. } => "terminate_job",
            Command::ScorePredictions { .. } => "score_predictions",
            Command::Publish { .. } => "publish",
            Command::Withdraw { .. } => "withdraw",
        }
    }

    /// The attempt the command is about.
    pub fn attempt(&self) -> Attempt {
        match self {
            Command::LaunchJob { attempt, .. }
            | Command::TerminateJob { attempt, .. }
            | Command::ScorePredictions { attempt, .. }
            | Command::Publish { attempt, .. }
            | Command::Withdraw { attempt } => *attempt,
        }
    }
}

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
            if let Some(record) = record_mut(status, attempt) {
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
        if let Some(record) = record_mut(&mut status_after, attempt) {
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
                self.apply(RunState::Failed { reason, resume: None }, |_| ())
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
            RunState::Queued | RunState::Predicted { .. } => Ok(self.apply(RunState::Cancelled, |_| ())),
            // Its publish may be under way, and may land after the cancel.
            RunState::Scored { attempt, .. } => {
                let attempt = *attempt;
                Ok(self.apply(RunState::Cancelled, |status| {
                    if !status.withdrawals.contains(&attempt) {
                        status.withdrawals.push(attempt);
                    }
                }))
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
    if let Some(record) = record_mut(status, attempt) {
        record.job = Some(job.clone());
    }
}

fn end_attempt(status: &mut RunStatus, attempt: Attempt, end: AttemptEnd, usage: Option<JobUsage>) {
    if let Some(record) = record_mut(status, attempt) {
        record.end = Some(end);
        record.usage = usage;
    }
}

fn record_mut(status: &mut RunStatus, attempt: Attempt) -> Option<&mut AttemptRecord> {
    let index = usize::try_from(attempt.0).ok()?.checked_sub(1)?;
    status.attempts.get_mut(index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{Stage, SubmissionId, TeamId};
    use crate::policy::tests::case_policy;
    use crate::run::SubmissionSource;

    fn pn(name: &str) -> ProfileName {
        ProfileName::new(name).unwrap()
    }

    fn job(name: &str) -> JobId {
        JobId::new(name).unwrap()
    }

    fn usage() -> JobUsage {
        JobUsage { started_at: Some(Timestamp(1_000)), ended_at: Timestamp(9_000), peak_memory_mib: Some(100) }
    }

    /// One run driven event by event, at a clock that ticks one second per event.
    struct Harness {
        policy: Policy,
        run: Run,
        now: Timestamp,
    }

    impl Harness {
        fn new(cpu_only: bool) -> Harness {
            let spec = RunSpec::new(
                SubmissionId::new("sub").unwrap(),
                TeamId::new("team").unwrap(),
                Stage::Public,
                cpu_only,
                SubmissionSource::Image { uri: "registry/sub:1".into() },
                Timestamp(0),
            );
            Harness {
                policy: case_policy(),
                run: Run { spec, status: RunStatus::submitted(Timestamp(0)) },
                now: Timestamp(0),
            }
        }

        fn try_step(&mut self, envelope: Envelope) -> Result<Transition, TransitionError> {
            self.now = self.now.plus_secs(1);
            let transition = step(&self.policy, &self.run, &envelope, self.now)?;
            transition.status.validate().unwrap();
            self.run.status = transition.status.clone();
            Ok(transition)
        }

        /// An unfenced event that must be accepted.
        fn feed(&mut self, event: Event) -> Transition {
            self.try_step(Envelope::unfenced(event)).unwrap()
        }

        /// The answer to the command issued at the current version.
        fn answer(&mut self, event: Event) -> Transition {
            let version = self.run.status.version;
            self.try_step(Envelope::answering(event, version)).unwrap()
        }

        fn state(&self) -> &RunState {
            &self.run.status.state
        }

        fn attempt(&self) -> Attempt {
            self.run.status.attempts.last().unwrap().attempt
        }

        fn launch(&mut self, job_name: &str) {
            let attempt = self.attempt();
            self.answer(Event::JobLaunched { attempt, job: job(job_name) });
        }

        fn end(&mut self, outcome: JobOutcome) -> Transition {
            let RunState::Running { attempt, job, .. } = self.state().clone() else { panic!("not running") };
            self.feed(Event::JobEnded { attempt, job, outcome, usage: usage(), evidence: Evidence::default() })
        }

        fn running(cpu_only: bool) -> Harness {
            let mut h = Harness::new(cpu_only);
            h.feed(Event::Admitted { start: None });
            h.launch("j1");
            h
        }

        fn predicted() -> Harness {
            let mut h = Harness::running(false);
            h.end(JobOutcome::Succeeded);
            h
        }

        fn scored() -> Harness {
            let mut h = Harness::predicted();
            let attempt = h.attempt();
            h.answer(Event::PredictionsScored { attempt, score: Score::new(0.2).unwrap() });
            h
        }

        fn published() -> Harness {
            let mut h = Harness::scored();
            let attempt = h.attempt();
            h.answer(Event::Published { attempt });
            h
        }

        fn failed() -> Harness {
            let mut h = Harness::running(false);
            h.end(JobOutcome::Crashed { exit_code: Some(3) });
            h
        }

        fn cancelled() -> Harness {
            let mut h = Harness::running(false);
            h.feed(Event::CancelRequested);
            h
        }
    }

    fn oom(resource: Resource) -> JobOutcome {
        JobOutcome::OutOfMemory { resource }
    }

    #[test]
    fn admission_launches_on_the_cheapest_profile_of_the_ladder() {
        let mut h = Harness::new(false);
        let t = h.feed(Event::Admitted { start: None });
        assert_eq!(t.disposition, Disposition::Applied);
        assert_eq!(*h.state(), RunState::Launching { profile: pn("g4"), attempt: Attempt(1), not_before: None });
        assert_eq!(t.commands, [Command::LaunchJob { attempt: Attempt(1), profile: pn("g4"), not_before: None }]);
        assert_eq!(t.status.version, 2);

        let mut cpu = Harness::new(true);
        cpu.feed(Event::Admitted { start: None });
        assert!(matches!(cpu.state(), RunState::Launching { profile, .. } if *profile == pn("cpu")));
    }

    #[test]
    fn a_start_learned_on_another_stage_is_where_the_run_starts() {
        let mut public = Harness::running(false);
        assert_eq!(learned_start(&public.run), None, "nothing learned while it runs");
        public.end(oom(Resource::GpuMemory));
        assert_eq!(learned_start(&public.run), None, "nor before it succeeded somewhere");
        public.launch("j2");
        public.end(JobOutcome::Succeeded);
        let learned = learned_start(&public.run).unwrap();
        assert_eq!(learned.profile, pn("p3"));
        assert_eq!(learned.reason.as_str(), "sub-public ran out of GPU memory on g4 and succeeded on p3");

        let mut private = Harness::new(false);
        private.feed(Event::Admitted { start: Some(learned.clone()) });
        assert_eq!(*private.state(), RunState::Launching { profile: pn("p3"), attempt: Attempt(1), not_before: None });

        // A profile of the other ladder, or one no longer configured, is not learned from.
        for profile in ["cpu", "gone"] {
            let mut h = Harness::new(false);
            h.feed(Event::Admitted { start: Some(LearnedStart { profile: pn(profile), ..learned.clone() }) });
            assert!(matches!(h.state(), RunState::Launching { profile, .. } if *profile == pn("g4")), "{profile}");
        }

        let mut crashed = Harness::running(false);
        crashed.end(JobOutcome::Crashed { exit_code: Some(1) });
        assert_eq!(learned_start(&crashed.run), None, "only an escalation that worked teaches");
    }

    #[test]
    fn a_jobs_wait_is_noted_on_its_attempt_without_changing_the_state() {
        let mut h = Harness::running(false);
        let version = h.run.status.version;
        let waiting = |status: &str, reason: Option<&str>| Event::JobWaiting {
            attempt: Attempt(1),
            job: job("j1"),
            status: Detail::new(status),
            reason: reason.map(Detail::new),
        };
        let capacity = "CAPACITY:INSUFFICIENT_INSTANCE_CAPACITY - Service cannot fulfill the capacity requested";
        let t = h.feed(waiting("RUNNABLE", None));
        assert_eq!((t.disposition, t.commands.len(), t.status.version), (Disposition::Noted, 0, version));
        let since = h.run.status.attempts[0].waiting.as_ref().unwrap().since;
        h.feed(waiting("RUNNABLE", Some(capacity)));
        let noted = h.run.status.attempts[0].waiting.clone().unwrap();
        assert_eq!((noted.status.as_str(), noted.reason.unwrap().as_str()), ("RUNNABLE", capacity));
        assert_eq!(noted.since, since, "still RUNNABLE since it was first seen so");
        let t = h.feed(waiting("RUNNABLE", Some(capacity)));
        assert_eq!(t.disposition, Disposition::Ignored(IgnoreReason::Duplicate), "the same wait again");
        let stray =
            Event::JobWaiting { attempt: Attempt(1), job: job("other"), status: Detail::new("RUNNABLE"), reason: None };
        assert_eq!(h.feed(stray).disposition, Disposition::Ignored(IgnoreReason::NotAwaited));
        assert!(matches!(h.state(), RunState::Running { .. }));
    }

    #[test]
    fn an_audit_run_is_scored_but_never_published() {
        let mut h = Harness::new(false);
        h.run.spec = h.run.spec.audit(2, Timestamp(5)).unwrap();
        assert_eq!(h.run.spec.run.as_str(), "sub-audit2-public");
        assert_eq!(h.run.spec.expected_run().unwrap(), h.run.spec.run);
        h.feed(Event::Admitted { start: None });
        h.launch("j1");
        h.end(JobOutcome::Succeeded);
        let score = Score::new(0.3).unwrap();
        let t = h.answer(Event::PredictionsScored { attempt: Attempt(1), score });
        assert_eq!(*h.state(), RunState::Published { attempt: Attempt(1), score });
        assert!(t.commands.is_empty(), "no Publish: {:?}", t.commands);
        assert!(crate::run::is_audit_name("sub-audit2") && !crate::run::is_audit_name("sub-audit"));
        assert!(!crate::run::is_audit_name("auditor") && !crate::run::is_audit_name("x-audit2b"));
    }

    #[test]
    fn a_cpu_submission_without_a_cpu_ladder_fails_with_its_reason() {
        let mut h = Harness::new(true);
        h.policy = Policy::from_toml(
            "time_limit_secs = 60\n[[profile]]\nname = \"g4\"\nhost_memory_mib = 1\ngpu_memory_mib = 1\nvcpus = 1\n\
             price_per_hour_usd = 1.0\n",
        )
        .unwrap();
        h.feed(Event::Admitted { start: None });
        assert!(matches!(
            h.state(),
            RunState::Failed { reason: FailureReason::NoEligibleProfile { cpu_only: true }, .. }
        ));
    }

    #[test]
    fn admitting_a_run_that_is_not_queued_is_an_error() {
        let mut h = Harness::running(false);
        let err = h.try_step(Envelope::unfenced(Event::Admitted { start: None })).unwrap_err();
        assert!(matches!(err, TransitionError::NotQueued { state: StateTag::Running, .. }));
    }

    #[test]
    fn a_launched_job_runs() {
        let h = Harness::running(false);
        assert_eq!(*h.state(), RunState::Running { profile: pn("g4"), attempt: Attempt(1), job: job("j1") });
        assert_eq!(h.run.status.attempts[0].job, Some(job("j1")));
        assert!(h.run.status.outbox().is_empty(), "a running job owes nothing: the watcher follows it");
    }

    #[test]
    fn a_launch_failure_fails_the_run_as_cannot_start() {
        let mut h = Harness::new(false);
        h.feed(Event::Admitted { start: None });
        h.answer(Event::LaunchFailed { attempt: Attempt(1), error: Detail::new("no submission.toml") });
        let RunState::Failed { reason: FailureReason::CannotStart { detail }, resume: None } = h.state() else {
            panic!("{:?}", h.state())
        };
        assert_eq!(detail.as_str(), "no submission.toml");
        assert_eq!(h.run.status.attempts[0].end, Some(AttemptEnd::LaunchFailed));
    }

    #[test]
    fn success_owes_scoring() {
        let mut h = Harness::running(false);
        let t = h.end(JobOutcome::Succeeded);
        assert_eq!(*h.state(), RunState::Predicted { profile: pn("g4"), attempt: Attempt(1), job: job("j1") });
        assert_eq!(t.commands, [Command::ScorePredictions { attempt: Attempt(1), job: job("j1") }]);
        assert_eq!(h.run.status.attempts[0].usage, Some(usage()));
    }

    #[test]
    fn host_oom_on_g4_escalates_to_the_cheapest_profile_with_more_host_memory() {
        let mut h = Harness::running(false);
        let t = h.end(oom(Resource::HostMemory));
        assert_eq!(*h.state(), RunState::Launching { profile: pn("g4-2x"), attempt: Attempt(2), not_before: None });
        assert_eq!(t.commands, [Command::LaunchJob { attempt: Attempt(2), profile: pn("g4-2x"), not_before: None }]);
        assert_eq!(h.run.status.attempts[0].end, Some(AttemptEnd::Job(oom(Resource::HostMemory))));
    }

    #[test]
    fn gpu_oom_on_g4_escalates_to_p3_then_fails_at_the_top() {
        let mut h = Harness::running(false);
        h.end(oom(Resource::GpuMemory));
        assert!(matches!(h.state(), RunState::Launching { profile, attempt: Attempt(2), .. } if *profile == pn("p3")));
        h.launch("j2");
        h.end(oom(Resource::GpuMemory));
        let expected = FailureReason::OutOfMemory { resource: Resource::GpuMemory, profile: pn("p3") };
        assert_eq!(*h.state(), RunState::Failed { reason: expected, resume: None });
    }

    #[test]
    fn an_interruption_relaunches_on_the_same_profile_after_backoff() {
        let mut h = Harness::running(false);
        let interrupted = || JobOutcome::Interrupted { detail: Detail::new("Host EC2 (instance i-1) terminated.") };
        h.end(interrupted());
        let backoff_until = h.now.plus_secs(60);
        assert_eq!(
            *h.state(),
            RunState::Launching { profile: pn("g4"), attempt: Attempt(2), not_before: Some(backoff_until) }
        );
        assert_eq!(h.run.status.interruptions, 1);
        h.launch("j2");
        h.end(interrupted());
        assert!(matches!(h.state(), RunState::Launching { attempt: Attempt(3), .. }));
        h.launch("j3");
        h.end(interrupted());
        assert_eq!(
            *h.state(),
            RunState::Failed { reason: FailureReason::Interrupted { interruptions: 3 }, resume: None },
            "interruptions_max is 2"
        );
    }

    #[test]
    fn timeouts_crashes_unstartable_images_and_broken_limits_fail_with_their_reason() {
        let cases = [
            (JobOutcome::TimedOut, FailureReason::TimedOut { profile: pn("g4") }),
            (JobOutcome::Crashed { exit_code: Some(2) }, FailureReason::Crashed { exit_code: Some(2) }),
            (
                JobOutcome::CannotStart { detail: Detail::new("CannotPullContainerError: x") },
                FailureReason::CannotStart { detail: Detail::new("CannotPullContainerError: x") },
            ),
            (
                JobOutcome::LimitExceeded { limit: Limit::Processes },
                FailureReason::LimitExceeded { limit: Limit::Processes },
            ),
        ];
        for (outcome, reason) in cases {
            let mut h = Harness::running(false);
            let t = h.end(outcome);
            assert_eq!(*h.state(), RunState::Failed { reason, resume: None });
            assert!(t.commands.is_empty());
        }
    }

    #[test]
    fn a_job_end_that_overtakes_the_launch_report_still_counts() {
        let mut h = Harness::new(false);
        h.feed(Event::Admitted { start: None });
        h.feed(Event::JobEnded {
            attempt: Attempt(1),
            job: job("j1"),
            outcome: JobOutcome::Succeeded,
            usage: usage(),
            evidence: Evidence::default(),
        });
        assert_eq!(*h.state(), RunState::Predicted { profile: pn("g4"), attempt: Attempt(1), job: job("j1") });
        let version = h.run.status.version;
        let late =
            h.try_step(Envelope::answering(Event::JobLaunched { attempt: Attempt(1), job: job("j1") }, 2)).unwrap();
        assert!(matches!(late.disposition, Disposition::Ignored(IgnoreReason::StaleVersion { .. })));
        assert!(late.commands.is_empty(), "the job is known and ended: nothing to terminate");
        assert_eq!(h.run.status.version, version);
    }

    #[test]
    fn scoring_then_publishing_ends_published() {
        let mut h = Harness::predicted();
        let score = Score::new(0.25).unwrap();
        let t = h.answer(Event::PredictionsScored { attempt: Attempt(1), score });
        assert_eq!(t.commands, [Command::Publish { attempt: Attempt(1), score }]);
        h.answer(Event::Published { attempt: Attempt(1) });
        assert_eq!(*h.state(), RunState::Published { attempt: Attempt(1), score });
        assert!(h.run.status.outbox().is_empty());
    }

    #[test]
    fn rejected_predictions_fail_the_run() {
        let mut h = Harness::predicted();
        h.answer(Event::PredictionsRejected { attempt: Attempt(1), reason: Detail::new("row 3: value 1.5 > 1") });
        assert!(matches!(
            h.state(),
            RunState::Failed { reason: FailureReason::InvalidPredictions { .. }, resume: None }
        ));
    }

    #[test]
    fn a_failed_activity_after_the_job_resumes_there_on_retry() {
        let mut h = Harness::predicted();
        h.answer(Event::ActivityFailed {
            attempt: Attempt(1),
            activity: Activity::Score,
            error: Detail::new("labels"),
        });
        assert!(matches!(h.state(), RunState::Failed { resume: Some(Resume::Score { .. }), .. }));
        let t = h.feed(Event::RetryRequested);
        assert_eq!(t.commands, [Command::ScorePredictions { attempt: Attempt(1), job: job("j1") }]);

        let mut h = Harness::scored();
        h.answer(Event::ActivityFailed { attempt: Attempt(1), activity: Activity::Publish, error: Detail::new("s3") });
        let t = h.feed(Event::RetryRequested);
        assert!(matches!(t.commands.as_slice(), [Command::Publish { attempt: Attempt(1), .. }]));

        let mut h = Harness::new(false);
        h.feed(Event::Admitted { start: None });
        h.answer(Event::ActivityFailed { attempt: Attempt(1), activity: Activity::Launch, error: Detail::new("api") });
        h.feed(Event::RetryRequested);
        assert_eq!(*h.state(), RunState::Queued, "a failed launch starts over");
    }

    #[test]
    fn cancelling_a_running_run_owes_the_termination_of_its_job() {
        let mut h = Harness::running(false);
        let t = h.feed(Event::CancelRequested);
        assert_eq!(*h.state(), RunState::Cancelled);
        assert_eq!(t.commands, [Command::TerminateJob { attempt: Attempt(1), job: Some(job("j1")) }]);
        assert!(h.run.status.is_live(), "a cancelled run owing a termination stays live");
        assert_eq!(h.run.status.attempts[0].end, Some(AttemptEnd::Cancelled));
        let version = h.run.status.version;
        let t = h.feed(Event::JobTerminated { attempt: Attempt(1), job: Some(job("j1")) });
        assert_eq!(t.disposition, Disposition::Acknowledged);
        assert_eq!(h.run.status.version, version, "an acknowledgement is not a state change");
        assert!(!h.run.status.is_live());
    }

    #[test]
    fn cancelling_a_launch_terminates_by_name_and_an_orphan_launch_is_terminated_too() {
        let mut h = Harness::new(false);
        h.feed(Event::Admitted { start: None });
        let launch_version = h.run.status.version;
        let t = h.feed(Event::CancelRequested);
        assert_eq!(t.commands, [Command::TerminateJob { attempt: Attempt(1), job: None }]);
        h.feed(Event::JobTerminated { attempt: Attempt(1), job: None });
        // The launch finishes after the terminator found nothing to stop.
        let late = Envelope::answering(Event::JobLaunched { attempt: Attempt(1), job: job("j1") }, launch_version);
        let t = h.try_step(late.clone()).unwrap();
        assert_eq!(t.disposition, Disposition::Ignored(IgnoreReason::OrphanJob));
        assert_eq!(t.commands, [Command::TerminateJob { attempt: Attempt(1), job: Some(job("j1")) }]);
        let again = h.try_step(late).unwrap();
        assert!(again.commands.is_empty(), "the termination is already owed");
    }

    #[test]
    fn a_second_job_of_the_running_attempt_is_terminated_and_acknowledged_alone() {
        let mut h = Harness::new(false);
        h.feed(Event::Admitted { start: None });
        let launch_version = h.run.status.version;
        h.launch("j1");
        // A raced launch reports another job for the same attempt.
        let late = Envelope::answering(Event::JobLaunched { attempt: Attempt(1), job: job("j2") }, launch_version);
        let t = h.try_step(late).unwrap();
        assert_eq!(t.disposition, Disposition::Ignored(IgnoreReason::OrphanJob));
        assert_eq!(t.commands, [Command::TerminateJob { attempt: Attempt(1), job: Some(job("j2")) }]);
        assert!(matches!(h.state(), RunState::Running { job: j, .. } if *j == job("j1")), "the run keeps its job");
        h.feed(Event::CancelRequested);
        assert_eq!(h.run.status.terminations.len(), 2, "j1 (cancel) and j2 (orphan)");
        let t = h.feed(Event::JobTerminated { attempt: Attempt(1), job: Some(job("j2")) });
        assert_eq!(t.disposition, Disposition::Acknowledged);
        assert_eq!(h.run.status.terminations, [Termination { attempt: Attempt(1), job: Some(job("j1")) }]);
    }

    #[test]
    fn a_launch_given_up_owes_the_termination_of_whatever_it_made() {
        let mut h = Harness::new(false);
        h.feed(Event::Admitted { start: None });
        let t = h.answer(Event::ActivityFailed {
            attempt: Attempt(1),
            activity: Activity::Launch,
            error: Detail::new("timeout"),
        });
        assert_eq!(t.commands, [Command::TerminateJob { attempt: Attempt(1), job: None }]);
        assert!(h.run.status.is_live(), "failed, but still owed a termination");
    }

    #[test]
    fn cancel_from_each_live_state() {
        let starts = [
            Harness::new(false),
            {
                let mut h = Harness::new(false);
                h.feed(Event::Admitted { start: None });
                h
            },
            Harness::running(false),
            Harness::predicted(),
            Harness::scored(),
        ];
        for mut h in starts {
            let from = h.state().tag();
            h.feed(Event::CancelRequested);
            assert_eq!(*h.state(), RunState::Cancelled, "from {from}");
            let cleanup = |c: &Command| matches!(c, Command::TerminateJob { .. } | Command::Withdraw { .. });
            assert!(h.run.status.outbox().iter().all(cleanup), "from {from}");
        }
    }

    #[test]
    fn cancelling_a_scored_run_withdraws_its_score_whatever_its_publish_does() {
        let mut h = Harness::scored();
        let publish_version = h.run.status.version;
        let t = h.feed(Event::CancelRequested);
        assert_eq!(t.commands, [Command::Withdraw { attempt: Attempt(1) }]);
        assert!(h.run.status.is_live(), "cancelled, but owed a withdrawal");
        // The publish that was under way lands afterwards: it changes nothing.
        let late = h.try_step(Envelope::answering(Event::Published { attempt: Attempt(1) }, publish_version)).unwrap();
        assert!(matches!(late.disposition, Disposition::Ignored(IgnoreReason::StaleVersion { .. })));
        assert_eq!(
            h.feed(Event::Withdrawn { attempt: Attempt(2) }).disposition,
            Disposition::Ignored(IgnoreReason::NotAwaited)
        );
        let version = h.run.status.version;
        let t = h.feed(Event::Withdrawn { attempt: Attempt(1) });
        assert_eq!(t.disposition, Disposition::Acknowledged);
        assert_eq!(h.run.status.version, version, "an acknowledgement is not a state change");
        assert!(!h.run.status.is_live());
    }

    #[test]
    fn cancel_of_an_ended_run_is_refused_and_a_second_cancel_is_a_duplicate() {
        let mut h = Harness::published();
        let err = h.try_step(Envelope::unfenced(Event::CancelRequested)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "run sub-public is already published: only queued, launching, running, predicted or scored runs can be cancelled"
        );
        let mut h = Harness::cancelled();
        let t = h.feed(Event::CancelRequested);
        assert_eq!(t.disposition, Disposition::Ignored(IgnoreReason::Duplicate));
    }

    #[test]
    fn retry_requeues_failed_and_cancelled_runs_keeping_the_attempt_count() {
        for mut h in [Harness::failed(), Harness::cancelled()] {
            h.feed(Event::RetryRequested);
            assert_eq!(*h.state(), RunState::Queued);
            h.feed(Event::Admitted { start: None });
            assert!(matches!(h.state(), RunState::Launching { attempt: Attempt(2), .. }), "a new job name");
        }
        let mut h = Harness::running(false);
        let err = h.try_step(Envelope::unfenced(Event::RetryRequested)).unwrap_err();
        assert!(matches!(err, TransitionError::NotRetryable { state: StateTag::Running, .. }));
    }

    #[test]
    fn the_launch_bound_ends_endless_escalation_and_retries() {
        let mut h = Harness::new(false);
        for _ in 0..8 {
            h.feed(Event::Admitted { start: None });
            h.launch("j");
            h.end(JobOutcome::Crashed { exit_code: Some(1) });
            h.feed(Event::RetryRequested);
        }
        h.feed(Event::Admitted { start: None });
        assert_eq!(
            *h.state(),
            RunState::Failed { reason: FailureReason::AttemptsExhausted { attempts: 8 }, resume: None }
        );
    }

    #[test]
    fn stale_and_unawaited_events_are_ignored() {
        let mut h = Harness::running(false);
        let stale =
            Envelope::answering(Event::PredictionsScored { attempt: Attempt(1), score: Score::new(0.1).unwrap() }, 1);
        let t = h.try_step(stale).unwrap();
        assert_eq!(t.disposition, Disposition::Ignored(IgnoreReason::StaleVersion { expected: 1, actual: 3 }));
        let other_job = Event::JobEnded {
            attempt: Attempt(1),
            job: job("other"),
            outcome: JobOutcome::Succeeded,
            usage: usage(),
            evidence: Evidence::default(),
        };
        assert_eq!(h.feed(other_job).disposition, Disposition::Ignored(IgnoreReason::NotAwaited));
        let other_attempt = Event::JobEnded {
            attempt: Attempt(7),
            job: job("j1"),
            outcome: JobOutcome::Succeeded,
            usage: usage(),
            evidence: Evidence::default(),
        };
        assert_eq!(h.feed(other_attempt).disposition, Disposition::Ignored(IgnoreReason::NotAwaited));
        assert!(matches!(h.state(), RunState::Running { .. }));
    }

    #[test]
    fn resubmitting_is_a_no_op_and_a_conflicting_submission_is_refused() {
        let mut h = Harness::running(false);
        let same = RunSpec { submitted_at: Timestamp(99), ..h.run.spec.clone() };
        assert_eq!(h.feed(Event::Submitted(same)).disposition, Disposition::Ignored(IgnoreReason::Duplicate));
        let other = RunSpec { cpu_only: true, ..h.run.spec.clone() };
        let err = h.try_step(Envelope::unfenced(Event::Submitted(other))).unwrap_err();
        assert!(matches!(err, TransitionError::SubmissionConflict { .. }));
    }

    /// Every event a run could be sent, for the attempt and job it last had.
    fn every_event(h: &Harness) -> Vec<Event> {
        let attempt = h.run.status.attempts.last().map_or(Attempt(1), |r| r.attempt);
        let j = h.run.status.attempts.last().and_then(|r| r.job.clone()).unwrap_or_else(|| job("j1"));
        let ended = |outcome| Event::JobEnded {
            attempt,
            job: j.clone(),
            outcome,
            usage: usage(),
            evidence: Evidence::default(),
        };
        vec![
            Event::Submitted(h.run.spec.clone()),
            Event::Admitted { start: None },
            Event::JobLaunched { attempt, job: j.clone() },
            Event::JobLaunched { attempt, job: job("stray") },
            Event::LaunchFailed { attempt, error: Detail::new("x") },
            ended(JobOutcome::Succeeded),
            ended(oom(Resource::HostMemory)),
            ended(oom(Resource::GpuMemory)),
            ended(JobOutcome::Interrupted { detail: Detail::new("spot") }),
            ended(JobOutcome::TimedOut),
            ended(JobOutcome::Crashed { exit_code: None }),
            ended(JobOutcome::CannotStart { detail: Detail::new("pull") }),
            ended(JobOutcome::LimitExceeded { limit: Limit::Disk }),
            Event::JobWaiting { attempt, job: j.clone(), status: Detail::new("RUNNABLE"), reason: None },
            Event::PredictionsScored { attempt, score: Score::new(0.5).unwrap() },
            Event::PredictionsRejected { attempt, reason: Detail::new("x") },
            Event::Published { attempt },
            Event::JobTerminated { attempt, job: Some(j.clone()) },
            Event::JobTerminated { attempt, job: None },
            Event::Withdrawn { attempt },
            Event::ActivityFailed { attempt, activity: Activity::Launch, error: Detail::new("x") },
            Event::ActivityFailed { attempt, activity: Activity::Score, error: Detail::new("x") },
            Event::ActivityFailed { attempt, activity: Activity::Publish, error: Detail::new("x") },
            Event::CancelRequested,
        ]
    }

    #[test]
    fn terminal_states_absorb_every_event_but_retry() {
        for make in [Harness::published, Harness::failed, Harness::cancelled] {
            let base = make();
            for event in every_event(&base) {
                for fenced in [false, true] {
                    let mut h = make();
                    let envelope = if fenced {
                        Envelope::answering(event.clone(), h.run.status.version)
                    } else {
                        Envelope::unfenced(event.clone())
                    };
                    let before = h.run.status.clone();
                    if let Ok(t) = h.try_step(envelope) {
                        assert_eq!(t.status.state, before.state, "{} absorbed {event:?}", before.state.tag());
                        assert_eq!(t.status.version, before.version);
                        assert!(
                            t.commands.iter().all(|c| matches!(c, Command::TerminateJob { .. })),
                            "a terminal state only ever owes terminations (withdrawals come with a cancel)"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn the_transition_table_names_every_state_and_event() {
        let doc = include_str!("machine.rs").split("use serde").next().unwrap();
        for tag in StateTag::ALL {
            let name = format!("{tag:?}");
            assert!(doc.contains(&name), "state {name} is missing from the table");
        }
        let h = Harness::running(false);
        for event in every_event(&h).iter().chain([&Event::RetryRequested]) {
            let name = format!("{event:?}");
            let variant = name.split([' ', '(', '{']).next().unwrap();
            assert!(doc.contains(variant), "event {variant} is missing from the table");
        }
    }
}
