//! The run's state: where it is in the machine, with the data each state
//! holds, and its tag for indexes and counts.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::commands::Command;
use super::outcome::{FailureReason, Score};
use crate::ids::{Attempt, JobId, ProfileName};
use crate::time::Timestamp;

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

/// The eight states, without their data: for indexes, counts and filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StateTag {
    /// Waiting for a launch slot.
    Queued,
    /// A job is being launched.
    Launching,
    /// A job runs.
    Running,
    /// The job wrote predictions; they are being scored.
    Predicted,
    /// Scored; being published.
    Scored,
    /// On the leaderboard. Terminal.
    Published,
    /// Ended with a reason. Terminal (retry starts it again).
    Failed,
    /// Stopped by an operator. Terminal (retry starts it again).
    Cancelled,
}

impl StateTag {
    /// Every state, in the order of the happy path then the other ends.
    pub const ALL: [StateTag; 8] = [
        StateTag::Queued,
        StateTag::Launching,
        StateTag::Running,
        StateTag::Predicted,
        StateTag::Scored,
        StateTag::Published,
        StateTag::Failed,
        StateTag::Cancelled,
    ];

    /// The lowercase name used in listings and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            StateTag::Queued => "queued",
            StateTag::Launching => "launching",
            StateTag::Running => "running",
            StateTag::Predicted => "predicted",
            StateTag::Scored => "scored",
            StateTag::Published => "published",
            StateTag::Failed => "failed",
            StateTag::Cancelled => "cancelled",
        }
    }

    /// Whether the run has ended (only an operator's retry moves it on).
    pub fn is_terminal(self) -> bool {
        match self {
            StateTag::Published | StateTag::Failed | StateTag::Cancelled => true,
            StateTag::Queued | StateTag::Launching | StateTag::Running | StateTag::Predicted | StateTag::Scored => {
                false
            }
        }
    }

    /// A stable one-byte code, for index keys.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The tag of a [`StateTag::code`].
    pub fn from_code(code: u8) -> Option<StateTag> {
        StateTag::ALL.get(usize::from(code)).copied()
    }
}

impl fmt::Display for StateTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for StateTag {
    type Err = String;
    fn from_str(value: &str) -> Result<Self, String> {
        StateTag::ALL.into_iter().find(|t| t.as_str() == value).ok_or_else(|| {
            let names: Vec<&str> = StateTag::ALL.iter().map(|t| t.as_str()).collect();
            format!("state {value:?} is not one of: {}", names.join(", "))
        })
    }
}
