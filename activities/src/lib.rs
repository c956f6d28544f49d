//! evalflow's activities: the side effects the state machine asks for.
//!
//! - [`JobRunner`]: launch a job (or adopt the one already launched under its
//!   deterministic name), terminate it, and check how running jobs ended.
//!   [`local::LocalRunner`] runs jobs in a bubblewrap sandbox on this machine.
//! - [`scoring`]: validate a `submission.csv` and compute its log loss.
//! - [`leaderboard`]: the leaderboard, derived from published results.
//! - [`ArtifactStore`]: predictions, labels, results and leaderboards;
//!   [`artifacts::FsArtifacts`] keeps them in the data directory.
//!
//! Every activity is idempotent: running it twice has the effect of running
//! it once, so a worker may repeat one after a crash.

#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod artifacts;
pub mod aws;
pub mod backoff;
pub mod causes;
pub mod fsutil;
pub mod leaderboard;
pub mod local;
pub mod scoring;
pub mod submission;
pub mod untrusted;

use async_trait::async_trait;
use evalflow_workflow::{Attempt, Evidence, JobId, JobOutcome, JobUsage, Profile, RunId, RunSpec, Stage, Timestamp};

pub use artifacts::{ArtifactStore, Labels, Predictions};
pub use leaderboard::PublishedResult;

/// Why an activity failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ActivityError {
    /// A failure that may pass (I/O hiccup, throttling, a service down): retry later.
    #[error("{0}")]
    Transient(String),
    /// A failure that will not pass by retrying: the configuration or the
    /// competition's data needs the operator.
    #[error("{0}")]
    Permanent(String),
    /// The submission itself cannot be run (bad manifest, missing command).
    #[error("{0}")]
    InvalidSubmission(String),
    /// The host is out of disk space: the host's problem, never a reason to
    /// fail a run. The activity stays owed and is carried out once there is room.
    #[error("out of disk space ({0}): free some, and the work goes on by itself")]
    HostFull(String),
}

impl ActivityError {
    /// Whether retrying the same activity may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ActivityError::Transient(_) | ActivityError::HostFull(_) => true,
            ActivityError::Permanent(_) | ActivityError::InvalidSubmission(_) => false,
        }
    }
}

impl From<std::io::Error> for ActivityError {
    fn from(e: std::io::Error) -> Self {
        match e.kind() {
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => {
                ActivityError::HostFull(e.to_string())
            }
            _ => ActivityError::Transient(e.to_string()),
        }
    }
}

/// Runs blocking file-system work off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ActivityError> + Send + 'static,
) -> Result<T, ActivityError> {
    tokio::task::spawn_blocking(work).await.map_err(|e| ActivityError::Transient(format!("worker thread: {e}")))?
}

/// Everything a runner needs to launch one attempt of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct LaunchRequest {
    /// What was submitted.
    pub spec: RunSpec,
    /// The attempt.
    pub attempt: Attempt,
    /// Where to place it.
    pub profile: Profile,
    /// The wall-clock limit, in seconds.
    pub time_limit_secs: u64,
}

/// A job the engine believes is running.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RunningJob {
    /// The run.
    pub run: RunId,
    /// The stage it runs on.
    pub stage: Stage,
    /// The attempt.
    pub attempt: Attempt,
    /// The job.
    pub job: JobId,
    /// When the run started waiting for it (its last state change).
    pub since: Timestamp,
}

/// A job found ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndedJob {
    /// Which job.
    pub job: RunningJob,
    /// How it ended.
    pub outcome: JobOutcome,
    /// What it used.
    pub usage: JobUsage,
    /// What the runner saw of its end.
    pub evidence: Evidence,
}

/// A job believed running, with the status its runner gives it before it
/// ends: not started yet (and why), or started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitingJob {
    /// Which job.
    pub job: RunningJob,
    /// The runner's status for it (`RUNNABLE` ...).
    pub status: String,
    /// The runner's reason, if it gives one.
    pub reason: Option<String>,
}

/// What a look at the jobs believed running found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checked {
    /// The jobs that ended.
    pub ended: Vec<EndedJob>,
    /// The jobs that have not ended: whether they started, and if not, why.
    pub waiting: Vec<WaitingJob>,
}

/// Runs submissions' jobs somewhere: this machine, or AWS Batch.
#[async_trait]
pub trait JobRunner: Send + Sync {
    /// Launches the attempt's job, or adopts the one already launched under
    /// its deterministic name: calling it twice launches one job.
    async fn launch(&self, request: &LaunchRequest) -> Result<JobId, ActivityError>;

    /// Stops the attempt's job, found by id or by its name; a job that never
    /// started or already ended is fine.
    async fn terminate(&self, run: &RunId, attempt: Attempt, job: Option<&JobId>) -> Result<(), ActivityError>;

    /// Looks at jobs believed running: those that ended, and those that
    /// have not started yet.
    async fn check(&self, jobs: &[RunningJob]) -> Result<Checked, ActivityError>;

    /// Resolves once a job launched by this runner may have ended since the
    /// last time it resolved: the watcher then looks at once instead of at
    /// its next interval. A hint, never the only way an end is seen (ends
    /// while no engine ran are found by looking). By default it never
    /// resolves: the watcher's interval alone.
    async fn ended_hint(&self) {
        std::future::pending::<()>().await;
    }
}
