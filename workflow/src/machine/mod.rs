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
//! Queued | Launching | Running | Predicted | Scored --(CancelRequested)--> Cancelled  [TerminateJob if a job may run; Withdraw from Predicted or Scored]
//! Failed | Cancelled --(RetryRequested)----------> Queued, or back to Predicted | Scored to resume an activity
//! Scored | Published --(RescoreRequested)--------> Predicted{the same attempt and job}       [ScorePredictions]
//! Predicted --(PredictionsRejected | CancelRequested)--> Failed | Cancelled  [Withdraw: scored before, if rescored]
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
//!
//! One file per concern, each importing only those above it: [`detail`]
//! (free text), [`spec`] (what a run is of), [`outcome`] (how jobs end and
//! runs fail), [`commands`], [`state`], [`events`], [`status`] (the run as
//! stored), [`placement`] (learned across stages), and [`step`] itself.

mod commands;
mod detail;
mod events;
mod outcome;
mod placement;
mod spec;
mod state;
mod status;
mod step;
#[cfg(test)]
mod tests;

pub use commands::{Command, Termination};
pub use detail::{DETAIL_MAX_LEN, Detail};
pub use events::{Disposition, Envelope, Event, IgnoreReason, LearnedStart};
pub use outcome::{Activity, Evidence, FailureReason, JobOutcome, JobUsage, Limit, Score};
pub use placement::learned_start;
pub use spec::{AUDIT_SUFFIX, Audit, RunSpec, SubmissionSource, is_audit_name};
pub use state::{Resume, RunState, StateTag};
pub use status::{AttemptEnd, AttemptRecord, HistoryEntry, Run, RunStatus, Waiting};
pub use step::{Transition, TransitionError, step};
