//! What a run asks the world for: the commands its state owes, carried
//! out by workers, idempotently.

use serde::{Deserialize, Serialize};

use super::outcome::Score;
use crate::ids::{Attempt, JobId, ProfileName};
use crate::time::Timestamp;

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

/// A `TerminateJob` the run still owes: issued on cancel, or for a job
/// launched for an attempt nobody waits for any more, until acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Termination {
    /// The attempt whose job must stop.
    pub attempt: Attempt,
    /// The job, when known; otherwise the runner finds it by its deterministic name.
    pub job: Option<JobId>,
}
