//! Turning what an organizer submits into run specs: one submission, or a
//! manifest of many (JSON lines). A submitted directory is checked, then
//! kept in the data directory, so the run does not depend on the original.

use std::path::{Path, PathBuf};

use evalflow_activities::fsutil::{copy_dir, dir_digest};
use evalflow_activities::submission::Manifest;
use evalflow_workflow::{RunSpec, Stage, SubmissionId, SubmissionSource, TeamId, Timestamp};
use serde::Deserialize;

use crate::config::Config;

/// One submission to evaluate, as the organizer names it: a directory (on
/// this machine) or a container image (on AWS).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmissionRequest {
    /// Its id.
    pub id: SubmissionId,
    /// Its team.
    pub team: TeamId,
    /// The stage to evaluate it on.
    pub stage: Stage,
    /// Its directory, for a competition on this machine.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Its container image, for a competition on AWS.
    #[serde(default)]
    pub image: Option<String>,
    /// Whether an image runs on the CPU ladder (a directory says so in its submission.toml).
    #[serde(default)]
    pub cpu_only: bool,
}

/// The longest image reference accepted.
const IMAGE_MAX_LEN: usize = 512;

/// A submission that cannot be accepted.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The manifest cannot be read.
    #[error("cannot read manifest {path}: {error}")]
    ManifestUnreadable {
        /// The manifest.
        path: String,
        /// Why.
        error: std::io::Error,
    },
    /// A manifest line is not a submission.
    #[error(
        "manifest {path}, line {line}: {problem} (each line is a JSON object: \
         {{\"id\": \"sub1\", \"team\": \"team1\", \"stage\": \"public\", \"path\": \"subs/sub1\"}})"
    )]
    ManifestLine {
        /// The manifest.
        path: String,
        /// The line, from 1.
        line: usize,
        /// What is wrong.
        problem: String,
    },
    /// The directory is not a runnable submission.
    #[error("submission {id}: {problem}")]
    Invalid {
        /// The submission.
        id: SubmissionId,
        /// What is wrong.
        problem: String,
    },
    /// The id was submitted before with other contents.
    #[error(
        "submission {id} was already submitted with other contents (kept in {kept}): \
         give the new version its own id"
    )]
    Conflict {
        /// The submission.
        id: SubmissionId,
        /// Where the earlier one is kept.
        kept: String,
    },
    /// A directory for a competition on AWS, or an image for one on this machine.
    #[error("submission {id}: {problem}")]
    WrongKind {
        /// The submission.
        id: SubmissionId,
        /// What this competition takes.
        problem: &'static str,
    },
    /// No test set for the stage.
    #[error("submission {id}: evalflow.toml has no [stages.{stage}]: add its test_set and labels")]
    NoStage {
        /// The submission.
        id: SubmissionId,
        /// The stage.
        stage: Stage,
    },
}

/// Removes copies of `id` left half-made by a process that died while copying.
fn clear_staging(dir: &Path, id: &SubmissionId) {
    let prefix = format!(".new-{id}-");
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name.strip_prefix(&prefix).unwrap_or_default();
        if !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Reads a manifest: one JSON object per line, `{"id", "team", "stage",
/// "path"}` or `{"id", "team", "stage", "image", "cpu_only"?}`; blank lines are skipped.
/// Relative paths are relative to the manifest's directory. Every line is
/// checked before anything is submitted.
pub fn read_manifest(path: &Path) -> Result<Vec<SubmissionRequest>, SubmitError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|error| SubmitError::ManifestUnreadable { path: shown.clone(), error })?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut requests = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let mut request: SubmissionRequest = serde_json::from_str(line).map_err(|e| SubmitError::ManifestLine {
            path: shown.clone(),
            line: index + 1,
            problem: e.to_string(),
        })?;
        request.path = request.path.map(|p| base.join(p));
        requests.push(request);
    }
    Ok(requests)
}

/// Checks a submission's directory, keeps a copy in the data directory and
/// returns its run spec. The same id with the same contents is accepted
/// again; with other contents it is a conflict.
pub fn prepare(config: &Config, request: &SubmissionRequest, now: Timestamp) -> Result<RunSpec, SubmitError> {
    let id = &request.id;
    let wrong = |problem| SubmitError::WrongKind { id: id.clone(), problem };
    let on_aws = config.aws.is_some();
    let has_stage = match &config.aws {
        Some(aws) => aws.stages.contains_key(&request.stage),
        None => config.stages.contains_key(&request.stage),
    };
    if !has_stage {
        return Err(SubmitError::NoStage { id: id.clone(), stage: request.stage });
    }
    match (&request.path, &request.image, on_aws) {
        (Some(path), None, false) => prepare_directory(config, request, path, now),
        (None, Some(image), true) => prepare_image(request, image, now),
        (Some(_), None, true) => {
            Err(wrong("this competition runs on AWS Batch: submit a container image (--image URI)"))
        }
        (None, Some(_), false) => {
            Err(wrong("this competition runs on this machine: submit a directory with a submission.toml"))
        }
        _ => Err(wrong("give either a directory or a container image (--image), not both or neither")),
    }
}

fn prepare_image(request: &SubmissionRequest, image: &str, now: Timestamp) -> Result<RunSpec, SubmitError> {
    let clean = !image.is_empty()
        && image.len() <= IMAGE_MAX_LEN
        && !image.chars().any(|c| c.is_whitespace() || c.is_control());
    if !clean {
        return Err(SubmitError::Invalid {
            id: request.id.clone(),
            problem: format!("image {image:?} is not an image reference (1 to {IMAGE_MAX_LEN} characters, no spaces)"),
        });
    }
    let source = SubmissionSource::Image { uri: image.to_owned() };
    Ok(RunSpec::new(request.id.clone(), request.team.clone(), request.stage, request.cpu_only, source, now))
}

fn prepare_directory(
    config: &Config,
    request: &SubmissionRequest,
    path: &Path,
    now: Timestamp,
) -> Result<RunSpec, SubmitError> {
    let id = &request.id;
    let invalid = |problem: String| SubmitError::Invalid { id: id.clone(), problem };
    let manifest = Manifest::read(path).map_err(|e| invalid(e.to_string()))?;
    let bytes_max = config.local.submission_max_bytes();
    let kept = config.submissions_dir().join(id.as_str());
    let digest_of =
        |dir: &Path, bytes_max| dir_digest(dir, bytes_max).map_err(|e| invalid(format!("{}: {e}", dir.display())));
    let digest = if kept.exists() {
        let (digest, kept_digest) = (digest_of(path, bytes_max)?, digest_of(&kept, u64::MAX)?);
        if kept_digest != digest {
            return Err(SubmitError::Conflict { id: id.clone(), kept: kept.display().to_string() });
        }
        digest
    } else {
        // Copied first, then digested: the digest is of what is kept, even
        // if the source changes meanwhile.
        clear_staging(&config.submissions_dir(), id);
        let staging = config.submissions_dir().join(format!(".new-{id}-{}", std::process::id()));
        let kept_copy = copy_dir(path, &staging, bytes_max)
            .map_err(|e| invalid(format!("cannot copy it: {e}")))
            .and_then(|()| digest_of(&staging, u64::MAX))
            .and_then(|digest| {
                std::fs::rename(&staging, &kept).map_err(|e| invalid(format!("cannot keep it: {e}")))?;
                Ok(digest)
            });
        if kept_copy.is_err() {
            let _ = std::fs::remove_dir_all(&staging);
        }
        kept_copy?
    };
    let source = SubmissionSource::Directory { path: kept.display().to_string(), digest };
    Ok(RunSpec::new(id.clone(), request.team.clone(), request.stage, manifest.cpu_only, source, now))
}
