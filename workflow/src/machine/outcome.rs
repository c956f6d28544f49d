//! How jobs end and runs fail: a job's outcome and usage with the evidence
//! that decided it, a run's failure reason, the activities, the score.

use serde::{Deserialize, Serialize};

use super::detail::Detail;
use crate::ids::ProfileName;
use crate::policy::Resource;
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
    /// Every kind [`FailureReason::kind`] names (keep the two together).
    pub const KINDS: [&'static str; 10] = [
        "out_of_memory",
        "timed_out",
        "crashed",
        "cannot_start",
        "limit_exceeded",
        "interrupted",
        "invalid_predictions",
        "no_eligible_profile",
        "attempts_exhausted",
        "activity_failed",
    ];

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

impl JobOutcome {
    /// The outcome's kind, as metrics label it (`succeeded`, `out_of_memory` ...).
    pub fn kind(&self) -> &'static str {
        match self {
            JobOutcome::Succeeded => "succeeded",
            JobOutcome::OutOfMemory { .. } => "out_of_memory",
            JobOutcome::Interrupted { .. } => "interrupted",
            JobOutcome::TimedOut => "timed_out",
            JobOutcome::Crashed { .. } => "crashed",
            JobOutcome::CannotStart { .. } => "cannot_start",
            JobOutcome::LimitExceeded { .. } => "limit_exceeded",
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

/// What a job used, as reported by its runner when it ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobUsage {
    /// When the job's program started, if it did.
    pub started_at: Option<Timestamp>,
    /// When the job ended.
    pub ended_at: Timestamp,
    /// The peak memory of the job's processes, in MiB, when known.
    pub peak_memory_mib: Option<u64>,
}

impl JobUsage {
    /// The job's running time in seconds (zero if it never started).
    pub fn running_secs(&self) -> f64 {
        self.started_at.map_or(0.0, |start| self.ended_at.since(start).as_secs_f64())
    }
}

/// What the runner saw of a job that ended: the grounds for its outcome,
/// kept with the attempt, so that "why did this run move to P3, or fail" is
/// answered by one command.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    /// The rule that decided the outcome: a log signature (`pytorch-oom`),
    /// `cgroup-oom-kill`, `exit-code-86`, a Batch reason (`batch:OutOfMemoryError`).
    pub rule: Option<Detail>,
    /// What the rule matched: the log's fatal line, the runner's reason.
    pub matched: Option<Detail>,
    /// The program's exit code, if it exited.
    pub exit_code: Option<i32>,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
    /// The runner's reason for the job's status (AWS Batch's `statusReason`).
    pub status_reason: Option<Detail>,
    /// Where its log is, beyond its job directory (a CloudWatch Logs stream).
    pub log_stream: Option<Detail>,
}

impl Evidence {
    /// This evidence, with the rule that decided the outcome and what it matched.
    pub fn decided(self, rule: &str, matched: impl Into<String>) -> Evidence {
        Evidence { rule: Some(Detail::new(rule)), matched: Some(Detail::new(matched)), ..self }
    }

    /// `rule: matched`, the words `history` and `logs` show; `None` when no rule decided.
    pub fn words(&self) -> Option<String> {
        let rule = self.rule.as_ref()?;
        Some(match &self.matched {
            Some(matched) => format!("{matched} [{rule}]"),
            None => format!("[{rule}]"),
        })
    }
}
