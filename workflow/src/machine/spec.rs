//! What a run is of: its spec, written once (the submission, its team and
//! stage, where its code is), and the audit runs that re-run one.

use serde::{Deserialize, Serialize};

use crate::ids::{IdError, RunId, Stage, SubmissionId, TeamId};
use crate::time::Timestamp;

/// Where the submission's code is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubmissionSource {
    /// A directory with `submission.toml`, kept in the data directory (local runner).
    Directory {
        /// The directory's absolute path.
        path: String,
        /// A digest of its contents: the same id with other contents is another submission.
        digest: String,
    },
    /// A container image URI (AWS Batch).
    Image {
        /// The image, e.g. `123456789012.dkr.ecr.us-east-1.amazonaws.com/team42:final`.
        uri: String,
    },
}

/// What was submitted: never changes after the run is created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSpec {
    /// The run: `<submission>-<stage>`.
    pub run: RunId,
    /// The submission evaluated.
    pub submission: SubmissionId,
    /// The team that made it.
    pub team: TeamId,
    /// The test set it runs on.
    pub stage: Stage,
    /// Whether it runs on the CPU ladder.
    pub cpu_only: bool,
    /// Its code.
    pub source: SubmissionSource,
    /// When it was submitted; breaks leaderboard ties.
    pub submitted_at: Timestamp,
    /// Set for an audit run (`evalflow reproduce`): the published run it
    /// re-runs. Its score never reaches the leaderboard.
    pub audit: Option<Audit>,
}

/// What an audit run re-runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Audit {
    /// The published run it re-runs.
    pub of: RunId,
    /// Which audit of it, from 1.
    pub number: u32,
}

/// The suffix of an audit run's submission part: `<submission>-audit<n>-<stage>`.
pub const AUDIT_SUFFIX: &str = "-audit";

/// Whether `id` ends as audit runs are named (`-audit<n>`): such ids are
/// evalflow's, not a team's.
pub fn is_audit_name(id: &str) -> bool {
    id.rsplit_once(AUDIT_SUFFIX).is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The name of the `number`-th audit run of `submission` on `stage`.
fn audit_run(submission: &SubmissionId, stage: Stage, number: u32) -> Result<RunId, IdError> {
    Ok(RunId::new(&SubmissionId::new(format!("{submission}{AUDIT_SUFFIX}{number}"))?, stage))
}

impl RunSpec {
    /// The spec of `submission` on `stage`.
    pub fn new(
        submission: SubmissionId,
        team: TeamId,
        stage: Stage,
        cpu_only: bool,
        source: SubmissionSource,
        submitted_at: Timestamp,
    ) -> RunSpec {
        RunSpec {
            run: RunId::new(&submission, stage),
            submission,
            team,
            stage,
            cpu_only,
            source,
            submitted_at,
            audit: None,
        }
    }

    /// The `number`-th audit run of `self`, a published run: the same code
    /// on the same stage, named `<submission>-audit<number>-<stage>`.
    pub fn audit(&self, number: u32, now: Timestamp) -> Result<RunSpec, IdError> {
        Ok(RunSpec {
            run: audit_run(&self.submission, self.stage, number)?,
            submitted_at: now,
            audit: Some(Audit { of: self.run.clone(), number }),
            ..self.clone()
        })
    }

    /// The name this spec's run must have: `<submission>-<stage>`, or an audit's name.
    pub fn expected_run(&self) -> Result<RunId, IdError> {
        match &self.audit {
            None => Ok(RunId::new(&self.submission, self.stage)),
            Some(audit) if audit.of == RunId::new(&self.submission, self.stage) => {
                audit_run(&self.submission, self.stage, audit.number)
            }
            Some(audit) => Err(IdError::BadRunId { value: audit.of.to_string() }),
        }
    }

    /// Whether `other` submits the same thing (the submission time aside), so
    /// that submitting it again is a no-op rather than a conflict.
    pub fn same_submission(&self, other: &RunSpec) -> bool {
        RunSpec { submitted_at: other.submitted_at, ..self.clone() } == *other
    }
}
