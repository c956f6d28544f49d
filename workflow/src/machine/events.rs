//! What moves a run: its events, each in an envelope with the fence that
//! guards it, and what applying one did.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::detail::Detail;
use super::outcome::{Activity, Evidence, JobOutcome, JobUsage, Score};
use super::spec::RunSpec;
use crate::ids::{Attempt, JobId, ProfileName};

/// Where a run starts, learned from another stage of its submission.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LearnedStart {
    /// The profile to start on.
    pub profile: ProfileName,
    /// Why, in words: which run ran out of what, where, and where it then succeeded.
    pub reason: Detail,
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
    /// An operator asked to score a scored or published run again from its
    /// stored predictions (after the labels were corrected), and publish it.
    RescoreRequested,
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
            Event::RescoreRequested => "rescore_requested",
        }
    }
}

/// An event addressed to a run, with the fence that guards it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// What happened.
    pub event: Event,
    /// The run's version when the command this event answers was issued.
    /// `None` for events not answering a command (job-state changes, operators).
    pub expected_version: Option<u64>,
}

impl Envelope {
    /// An event without a version fence.
    pub fn unfenced(event: Event) -> Envelope {
        Envelope { event, expected_version: None }
    }

    /// The result of a command issued at `version`.
    pub fn answering(event: Event, version: u64) -> Envelope {
        Envelope { event, expected_version: Some(version) }
    }
}

/// Why an event changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IgnoreReason {
    /// It answers a command issued at another version of the run.
    StaleVersion {
        /// The version the event was fenced with.
        expected: u64,
        /// The run's version when it arrived.
        actual: u64,
    },
    /// The run is not waiting for it: a late, duplicated or misdirected event.
    NotAwaited,
    /// The same request again (a resubmission, a second cancel).
    Duplicate,
    /// It reports a job the run no longer waits for; that job is being terminated.
    OrphanJob,
}

impl fmt::Display for IgnoreReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IgnoreReason::StaleVersion { expected, actual } => {
                write!(f, "stale: answers version {expected}, run is at {actual}")
            }
            IgnoreReason::NotAwaited => f.write_str("not awaited in this state"),
            IgnoreReason::Duplicate => f.write_str("duplicate"),
            IgnoreReason::OrphanJob => f.write_str("orphan job: terminating it"),
        }
    }
}

/// What an event did to the run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Disposition {
    /// The state changed and the version grew by one.
    Applied,
    /// A termination was acknowledged; the state did not change.
    Acknowledged,
    /// A fact about the current attempt was noted (a job's wait); the state did not change.
    Noted,
    /// Nothing changed (except, for an orphan job, a new termination).
    Ignored(IgnoreReason),
}
