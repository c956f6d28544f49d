//! Turning what an organizer submits into run specs: one submission, or a
//! manifest of many (JSON lines). A submitted directory is checked, then
//! kept in the data directory, so the run does not depend on the original.
//!
//! The engine trusts no path a client gives: [`check_specs`] accepts a
//! directory only where [`prepare`] keeps it, `DIR/submissions/<id>`, and
//! only with the digest of what is there.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use evalflow_activities::artifacts::check_stage_files;
use evalflow_activities::fsutil::{copy_dir_digest, dir_digest};
use evalflow_activities::submission::Manifest;
use evalflow_workflow::{
    RunId, RunSpec, Stage, StateTag, SubmissionId, SubmissionSource, TeamId, Timestamp, WorkflowStore, is_audit_name,
};
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
/// How far in the future a spec's `submitted_at` may be (clocks differ a little), in seconds.
const SUBMITTED_AHEAD_MAX_SECS: u64 = 300;

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
    /// The directory submissions are kept in cannot be made.
    #[error(
        "cannot make {path}, where submissions are kept: {error} (check the data directory's permissions and free space)"
    )]
    Unkeepable {
        /// The directory.
        path: String,
        /// Why.
        error: std::io::Error,
    },
    /// The submit's journal cannot be written.
    #[error("cannot write {path}, the journal of this submit: {error}")]
    Journal {
        /// The journal.
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
    /// The manifest names no submission.
    #[error(
        "manifest {path} has no submissions: write one JSON object per line, such as \
         {{\"id\": \"sub1\", \"team\": \"team1\", \"stage\": \"public\", \"path\": \"subs/sub1\"}}"
    )]
    ManifestEmpty {
        /// The manifest.
        path: String,
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
    /// A manifest that submits one run twice, or one id as two submissions.
    #[error("manifest entries {first} and {again} (counting non-blank lines): {problem}: nothing was submitted")]
    Inconsistent {
        /// The first entry, from 1.
        first: usize,
        /// The entry that disagrees with it.
        again: usize,
        /// How.
        problem: String,
    },
    /// An id already submitted by another team.
    #[error("submission {id} was already submitted by team {team}: give this one its own id (nothing was submitted)")]
    OtherTeam {
        /// The submission.
        id: SubmissionId,
        /// The team it belongs to.
        team: TeamId,
    },
    /// A directory for a competition on AWS, or an image for one on this machine.
    #[error("submission {id}: {problem}")]
    WrongKind {
        /// The submission.
        id: SubmissionId,
        /// What this competition takes.
        problem: &'static str,
    },
    /// A run spec the engine refuses: not as `evalflow submit` prepares it.
    #[error("run {run}: {problem}")]
    Refused {
        /// The run.
        run: RunId,
        /// Which rule it breaks.
        problem: String,
    },
    /// The stage's test set and labels do not agree: the organizer's to fix.
    #[error(
        "stage {stage} is not ready, so nothing was submitted: {problem} \
         (a mistake in the competition's files, not the team's)"
    )]
    StageNotReady {
        /// The stage.
        stage: Stage,
        /// What is wrong, and what to do.
        problem: String,
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

/// One submit at a time in a data directory. The lock file is also the
/// submit's journal: before its first copy, a submit writes there the ids it
/// is about to copy anew, and empties it once the engine took (or refused)
/// them. What the next submit finds written there was left by one that did
/// not finish.
#[derive(Debug)]
pub struct SubmitLock {
    file: std::fs::File,
    /// The ids a submit that did not finish was copying.
    left: Vec<SubmissionId>,
}

impl SubmitLock {
    /// Takes the lock, waiting while another submit holds it, and reads what
    /// the last holder left in its journal.
    pub fn take(config: &Config) -> std::io::Result<SubmitLock> {
        use std::io::Read;
        let path = config.submit_lock();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut file = std::fs::File::options().create(true).truncate(false).read(true).write(true).open(&path)?;
        file.lock()?;
        let mut journal = String::new();
        file.read_to_string(&mut journal)?;
        let left = journal.lines().filter_map(|line| SubmissionId::new(line).ok()).collect();
        Ok(SubmitLock { file, left })
    }

    /// Writes the ids this submit is about to copy anew, replacing what was there.
    fn record<'a>(&self, ids: impl IntoIterator<Item = &'a SubmissionId>) -> std::io::Result<()> {
        use std::io::{Seek, Write};
        let journal: String = ids.into_iter().map(|id| format!("{id}\n")).collect();
        let mut file = &self.file;
        file.set_len(0)?;
        file.seek(std::io::SeekFrom::Start(0))?;
        file.write_all(journal.as_bytes())
    }

    /// The ids the last holder's submit was copying when it stopped.
    pub fn left(&self) -> &[SubmissionId] {
        &self.left
    }

    /// The engine took or refused this submit's specs: nothing of it is left over.
    pub fn done(self) -> std::io::Result<()> {
        self.file.set_len(0)
    }
}

/// Removes the copies a submit that did not finish made (those its journal
/// names) that no stored run has, with their half-made copies. `stored` must
/// be read under the lock, and after the engine applied what was sent before.
/// Returns how many directories it removed; nothing else is touched.
pub fn clear_unsubmitted(config: &Config, stored: &HashMap<SubmissionId, TeamId>, lock: &SubmitLock) -> usize {
    let submissions = config.submissions_dir();
    let left: HashSet<&SubmissionId> = lock.left.iter().filter(|id| !stored.contains_key(*id)).collect();
    let mut removed = clear_staging(&submissions, &left);
    for id in left {
        let kept = submissions.join(id.as_str());
        if std::fs::symlink_metadata(&kept).is_ok_and(|m| m.is_dir()) {
            match std::fs::remove_dir_all(&kept) {
                Ok(()) => removed += 1,
                Err(e) => tracing::warn!("cannot remove {}: {e}", kept.display()),
            }
        }
    }
    removed
}

/// Removes the copies of `ids` left half-made (`.new-<id>-<pid>`) by a
/// process that died while copying, in one look at `dir`; returns how many.
fn clear_staging(dir: &Path, ids: &HashSet<&SubmissionId>) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((id, pid)) = name.strip_prefix(".new-").and_then(|rest| rest.rsplit_once('-')) else { continue };
        let ours = SubmissionId::new(id).is_ok_and(|id| ids.contains(&id));
        if ours && !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()) {
            removed += usize::from(std::fs::remove_dir_all(entry.path()).is_ok());
        }
    }
    removed
}

/// Checks, once per stage submitted to, that the stage's test set and
/// labels agree (on this machine; on AWS they are in S3): a mistake of the
/// organizer's is refused before any job runs, and never becomes a team's
/// failure.
pub fn check_stages(config: &Config, requests: &[SubmissionRequest]) -> Result<(), SubmitError> {
    if config.aws.is_some() {
        return Ok(());
    }
    let stages: std::collections::BTreeSet<Stage> = requests.iter().map(|r| r.stage).collect();
    for stage in stages {
        let Some(files) = config.stages.get(&stage) else { continue }; // prepare names it
        check_stage_files(&files.test_set, &files.labels)
            .map_err(|problem| SubmitError::StageNotReady { stage, problem })?;
    }
    Ok(())
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
    // Editors on Windows start UTF-8 files with a byte-order mark.
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
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
    if requests.is_empty() {
        return Err(SubmitError::ManifestEmpty { path: shown });
    }
    Ok(requests)
}

/// Checks requests as one unit before anything is copied: each (id, stage)
/// once, one id one submission (one team, one source), and no id that
/// `stored` (the teams of the ids submitted before) gives to another team.
pub fn check_requests(
    requests: &[SubmissionRequest],
    stored: &HashMap<SubmissionId, TeamId>,
) -> Result<(), SubmitError> {
    let mut seen: HashMap<&SubmissionId, usize> = HashMap::new();
    let mut runs: HashMap<(&SubmissionId, Stage), usize> = HashMap::new();
    for (index, request) in requests.iter().enumerate() {
        let entry = index + 1;
        let inconsistent = |first, problem: String| SubmitError::Inconsistent { first, again: entry, problem };
        match seen.get(&request.id) {
            Some(&first) => {
                let earlier = &requests[first - 1];
                let same = (&earlier.team, &earlier.path, &earlier.image, earlier.cpu_only)
                    == (&request.team, &request.path, &request.image, request.cpu_only);
                if !same {
                    let problem = format!("{} is given two teams or two sources: one id is one submission", request.id);
                    return Err(inconsistent(first, problem));
                }
            }
            None => _ = seen.insert(&request.id, entry),
        }
        if let Some(first) = runs.insert((&request.id, request.stage), entry) {
            return Err(inconsistent(first, format!("both submit {} on {}", request.id, request.stage)));
        }
        if let Some(team) = stored.get(&request.id).filter(|team| **team != request.team) {
            return Err(SubmitError::OtherTeam { id: request.id.clone(), team: team.clone() });
        }
    }
    Ok(())
}

/// Submissions prepared as one unit: the copies this submit made are
/// removed again if it does not go through.
#[derive(Debug)]
pub struct Prepared {
    /// The specs, in the requests' order.
    pub specs: Vec<RunSpec>,
    /// The submissions' directories this submit copied (none were kept before).
    fresh: Vec<PathBuf>,
}

impl Prepared {
    /// Removes the copies this submit made: nothing of it stays behind.
    pub fn discard(self) {
        for dir in self.fresh {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!("cannot remove {}: {e}", dir.display());
            }
        }
    }
}

/// Prepares every request ([`prepare`]), its new copies written in `lock`'s
/// journal first, calling `done` with the number of requests each step
/// prepared; if one fails, removes the copies the others made, so that a
/// corrected manifest can be submitted again. The submissions' directory is
/// looked through once, not per request; each directory is kept once, however
/// many stages its id is submitted to, on as many threads as there are cores.
pub fn prepare_all(
    config: &Config,
    requests: &[SubmissionRequest],
    now: Timestamp,
    lock: &SubmitLock,
    done: impl Fn(u64) + Sync,
) -> Result<Prepared, SubmitError> {
    let submissions = config.submissions_dir();
    let mut new_ids: Vec<&SubmissionId> = requests
        .iter()
        .filter(|r| r.path.is_some() && !submissions.join(r.id.as_str()).exists())
        .map(|r| &r.id)
        .collect();
    new_ids.sort();
    new_ids.dedup();
    lock.record(new_ids.iter().copied())
        .map_err(|error| SubmitError::Journal { path: config.submit_lock().display().to_string(), error })?;
    let fresh: Vec<PathBuf> = new_ids.iter().map(|id| submissions.join(id.as_str())).collect();
    clear_staging(&submissions, &new_ids.iter().copied().collect());
    match prepare_specs(config, requests, now, &done) {
        Ok(specs) => Ok(Prepared { specs, fresh }),
        Err(e) => {
            Prepared { specs: Vec::new(), fresh: fresh.into_iter().filter(|d| d.exists()).collect() }.discard();
            Err(e)
        }
    }
}

/// The specs of `requests`, in their order: every request checked before
/// anything is copied, then each submission's directory kept once. Stops
/// keeping directories at the first that fails, and returns that failure
/// (the first in the requests' order if several failed at once).
fn prepare_specs(
    config: &Config,
    requests: &[SubmissionRequest],
    now: Timestamp,
    done: &(impl Fn(u64) + Sync),
) -> Result<Vec<RunSpec>, SubmitError> {
    // Each id's directory, with how many requests submit it.
    let mut dirs: Vec<(&SubmissionId, &Path, u64)> = Vec::new();
    // Each id's place in `dirs`, and the entry that first gave it.
    let mut dir_of: HashMap<&SubmissionId, (usize, usize)> = HashMap::new();
    for (index, request) in requests.iter().enumerate() {
        match check_request(config, request)? {
            Some(path) => match dir_of.get(&request.id) {
                Some(&(at, first)) if dirs[at].1 != path => {
                    let problem = format!("{} is given two directories: one id is one submission", request.id);
                    return Err(SubmitError::Inconsistent { first, again: index + 1, problem });
                }
                Some(&(at, _)) => dirs[at].2 += 1,
                None => {
                    dir_of.insert(&request.id, (dirs.len(), index + 1));
                    dirs.push((&request.id, path, 1));
                }
            },
            None => done(1),
        }
    }
    let kept = match dirs.is_empty() {
        true => Vec::new(),
        false => {
            let submissions = submissions_dir(config)?;
            let failed = AtomicBool::new(false);
            let kept = in_parallel(&dirs, |&(id, path, requests)| {
                if failed.load(Ordering::Relaxed) {
                    return None;
                }
                let kept = keep_directory(config, &submissions, id, path);
                failed.fetch_or(kept.is_err(), Ordering::Relaxed);
                done(requests);
                Some(kept)
            });
            kept.into_iter().flatten().collect::<Result<Vec<Kept>, _>>()?
        }
    };
    let specs = requests.iter().map(|request| {
        let source = match (dir_of.get(&request.id), &request.image) {
            (Some(&(index, _)), _) => {
                let Kept { path, digest, cpu_only } = &kept[index];
                let source = SubmissionSource::Directory { path: path.display().to_string(), digest: digest.clone() };
                (source, *cpu_only)
            }
            (None, image) => {
                let uri = image.clone().unwrap_or_else(|| unreachable!("a request without a directory gives an image"));
                (SubmissionSource::Image { uri }, request.cpu_only)
            }
        };
        let (source, cpu_only) = source;
        RunSpec::new(request.id.clone(), request.team.clone(), request.stage, cpu_only, source, now)
    });
    Ok(specs.collect())
}

/// `f` of each item, in their order, computed on as many threads as the
/// machine has cores (the work it is for, copying and hashing small files,
/// is the kernel's and the CPU's).
fn in_parallel<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(items.len());
    if threads <= 1 {
        return items.iter().map(f).collect();
    }
    let next = AtomicUsize::new(0);
    let mut results: Vec<Option<R>> = std::iter::repeat_with(|| None).take(items.len()).collect();
    std::thread::scope(|scope| {
        let take = || {
            let mut out = Vec::new();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                let Some(item) = items.get(index) else { return out };
                out.push((index, f(item)));
            }
        };
        let workers: Vec<_> = (0..threads).map(|_| scope.spawn(take)).collect();
        for worker in workers {
            let out = worker.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            for (index, result) in out {
                results[index] = Some(result);
            }
        }
    });
    results
        .into_iter()
        .map(|result| result.unwrap_or_else(|| unreachable!("every item was taken by a thread")))
        .collect()
}

/// Why a team's id may not end in `-audit<N>`.
const AUDIT_NAME_RESERVED: &str =
    "ids ending in -audit<N> name evalflow's audit runs (evalflow reproduce): choose another id";

/// Checks a submission's directory, keeps a copy in the data directory and
/// returns its run spec. The same id with the same contents is accepted
/// again; with other contents it is a conflict.
pub fn prepare(config: &Config, request: &SubmissionRequest, now: Timestamp) -> Result<RunSpec, SubmitError> {
    let mut specs = prepare_specs(config, std::slice::from_ref(request), now, &|_| {})?;
    Ok(specs.pop().unwrap_or_else(|| unreachable!("one spec a request")))
}

/// Checks what a request names, before anything is copied: an id that is
/// not an audit's, a stage the competition has, and the kind of source it
/// takes. Returns the request's directory, if it gives one.
fn check_request<'a>(config: &Config, request: &'a SubmissionRequest) -> Result<Option<&'a Path>, SubmitError> {
    let id = &request.id;
    if is_audit_name(id.as_str()) {
        return Err(SubmitError::Invalid { id: id.clone(), problem: AUDIT_NAME_RESERVED.into() });
    }
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
        (Some(path), None, false) => Ok(Some(path)),
        (None, Some(image), true) => check_image(request, image).map(|()| None),
        (Some(_), None, true) => {
            Err(wrong("this competition runs on AWS Batch: submit a container image (--image URI)"))
        }
        (None, Some(_), false) => {
            Err(wrong("this competition runs on this machine: submit a directory with a submission.toml"))
        }
        _ => Err(wrong("give either a directory or a container image (--image), not both or neither")),
    }
}

fn check_image(request: &SubmissionRequest, image: &str) -> Result<(), SubmitError> {
    let clean = !image.is_empty()
        && image.len() <= IMAGE_MAX_LEN
        && !image.chars().any(|c| c.is_whitespace() || c.is_control());
    if !clean {
        return Err(SubmitError::Invalid {
            id: request.id.clone(),
            problem: format!("image {image:?} is not an image reference (1 to {IMAGE_MAX_LEN} characters, no spaces)"),
        });
    }
    Ok(())
}

/// The submissions' directory, made if need be and resolved as the engine
/// resolves it (see [`check_specs`]).
fn submissions_dir(config: &Config) -> Result<PathBuf, SubmitError> {
    let submissions = config.submissions_dir();
    let unusable = |error| SubmitError::Unkeepable { path: submissions.display().to_string(), error };
    std::fs::create_dir_all(&submissions).map_err(unusable)?;
    submissions.canonicalize().map_err(unusable)
}

/// A submission's directory as kept in the data directory.
#[derive(Debug)]
struct Kept {
    /// Where it is kept.
    path: PathBuf,
    /// The digest of what is kept there.
    digest: String,
    /// Whether its submission.toml puts it on the CPU ladder.
    cpu_only: bool,
}

/// Checks the directory `path` of submission `id` and keeps a copy of it in
/// `submissions` (canonical), unless the same contents are kept there already.
fn keep_directory(config: &Config, submissions: &Path, id: &SubmissionId, path: &Path) -> Result<Kept, SubmitError> {
    let invalid = |problem: String| SubmitError::Invalid { id: id.clone(), problem };
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(invalid(format!(
                "{} is not a directory: submit the directory that holds its submission.toml",
                path.display()
            )));
        }
        Err(e) => return Err(invalid(format!("{} cannot be read ({e}): check the path", path.display()))),
    }
    let manifest = Manifest::read(path).map_err(|e| invalid(e.to_string()))?;
    let bytes_max = config.local.submission_max_bytes();
    let kept = submissions.join(id.as_str());
    let digest_of =
        |dir: &Path, bytes_max| dir_digest(dir, bytes_max).map_err(|e| invalid(format!("{}: {e}", dir.display())));
    let digest = if kept.exists() {
        let (digest, kept_digest) = (digest_of(path, bytes_max)?, digest_of(&kept, u64::MAX)?);
        if kept_digest != digest {
            return Err(SubmitError::Conflict { id: id.clone(), kept: kept.display().to_string() });
        }
        digest
    } else {
        // The digest is of what is written to the copy, even if the source
        // changes meanwhile. A dead process's copy under this very name (its
        // pid reused) goes first; `prepare_all` clears the others.
        let staging = submissions.join(format!(".new-{id}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        let kept_copy = copy_dir_digest(path, &staging, bytes_max)
            .map_err(|e| invalid(format!("cannot copy it: {e}")))
            .and_then(|digest| {
                std::fs::rename(&staging, &kept).map_err(|e| invalid(format!("cannot keep it: {e}")))?;
                Ok(digest)
            });
        if kept_copy.is_err() {
            let _ = std::fs::remove_dir_all(&staging);
        }
        kept_copy?
    };
    Ok(Kept { path: kept, digest, cpu_only: manifest.cpu_only })
}

/// Checks run specs before the engine takes them, whoever sent them: each
/// run is named `<submission>-<stage>`, was not submitted more than
/// [`SUBMITTED_AHEAD_MAX_SECS`] after `now`, and a directory source is the
/// submission's directory in this data directory (the canonical
/// `DIR/submissions/<id>`, itself no link) holding the contents its digest
/// names. Images are taken as they are. Reads each directory once, the
/// directories on as many threads as there are cores.
pub fn check_specs(config: &Config, specs: &[RunSpec], now: Timestamp) -> Result<(), SubmitError> {
    let mut dirs: Vec<(&SubmissionId, &str)> = Vec::new();
    for spec in specs {
        let refused = |problem: String| SubmitError::Refused { run: spec.run.clone(), problem };
        if spec.audit.is_none() && is_audit_name(spec.submission.as_str()) {
            return Err(refused(AUDIT_NAME_RESERVED.into()));
        }
        let run = spec.expected_run().map_err(|e| refused(format!("its audit names another run: {e}")))?;
        if spec.run != run {
            return Err(refused(format!(
                "a run of submission {} on {} must be named {run}",
                spec.submission, spec.stage
            )));
        }
        let ahead_secs = spec.submitted_at.since(now).as_secs();
        if ahead_secs > SUBMITTED_AHEAD_MAX_SECS {
            return Err(refused(format!(
                "submitted_at is {ahead_secs} s ahead of this engine's clock (at most {SUBMITTED_AHEAD_MAX_SECS} s): \
                 check the submitting machine's clock"
            )));
        }
        if let SubmissionSource::Directory { path, .. } = &spec.source {
            dirs.push((&spec.submission, path));
        }
    }
    // Once per submission and path: a path is checked against the submission that names it.
    dirs.sort_unstable();
    dirs.dedup();
    // Resolved once, and only needed for directories (an AWS competition has none).
    let submissions = config.submissions_dir().canonicalize();
    let found = in_parallel(&dirs, |&(submission, path)| kept_digest(&submissions, submission, path));
    let digests: HashMap<(&SubmissionId, &str), &Result<String, String>> = dirs.into_iter().zip(&found).collect();
    for spec in specs {
        let SubmissionSource::Directory { path, digest } = &spec.source else { continue };
        let refused = |problem: String| SubmitError::Refused { run: spec.run.clone(), problem };
        let found = digests[&(&spec.submission, path.as_str())].as_ref().map_err(|e| refused(e.clone()))?;
        if found != digest {
            return Err(refused(format!(
                "its digest {digest} is not that of the contents of {path} ({found}): \
                 submit the directory with `evalflow submit`, which computes it"
            )));
        }
    }
    Ok(())
}

/// Checks audit run specs against the store: each re-runs a published run,
/// not an audit itself, with exactly its code, team, stage and ladder.
pub fn check_audits(store: &impl WorkflowStore, specs: &[RunSpec]) -> Result<(), SubmitError> {
    for spec in specs {
        let Some(audit) = &spec.audit else { continue };
        let refused = |problem: String| SubmitError::Refused { run: spec.run.clone(), problem };
        let stored = store.load(&audit.of).map_err(|e| refused(format!("its original cannot be read: {e}")))?;
        let Some(original) = stored.map(|s| s.run) else {
            return Err(refused(format!("it audits {}, which does not exist", audit.of)));
        };
        if original.status.state.tag() != StateTag::Published || original.spec.audit.is_some() {
            return Err(refused(format!("it audits {}, which is not a published run", audit.of)));
        }
        let same = RunSpec {
            run: original.spec.run.clone(),
            submitted_at: original.spec.submitted_at,
            audit: None,
            ..spec.clone()
        };
        if same != original.spec {
            return Err(refused(format!("it is not the code, team, stage and ladder of {}", audit.of)));
        }
    }
    Ok(())
}

/// The digest of `path`, which must be where [`prepare`] keeps `submission`
/// in the (canonical) `submissions` directory.
fn kept_digest(
    submissions: &std::io::Result<PathBuf>,
    submission: &SubmissionId,
    path: &str,
) -> Result<String, String> {
    let rule = "the engine takes only directories that `evalflow submit` kept in its submissions directory";
    let kept = match submissions {
        Ok(dir) => dir.join(submission.as_str()),
        Err(e) => {
            return Err(format!(
                "its directory {path} cannot be there: the submissions directory is missing ({e}): {rule}"
            ));
        }
    };
    if Path::new(path) != kept {
        return Err(format!("its directory is {path}, not {}: {rule}", kept.display()));
    }
    match std::fs::symlink_metadata(&kept) {
        Ok(meta) if meta.file_type().is_dir() => {}
        Ok(_) => return Err(format!("{} is not a directory: {rule}", kept.display())),
        Err(e) => return Err(format!("{} cannot be read ({e}): {rule}", kept.display())),
    }
    dir_digest(&kept, u64::MAX).map_err(|e| format!("{}: {e}", kept.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = crate::config::TEST_CONFIG;

    fn competition() -> (tempfile::TempDir, Config) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("test")).unwrap();
        std::fs::write(dir.path().join("labels.csv"), "filename,label\n").unwrap();
        std::fs::write(dir.path().join(crate::config::CONFIG_FILE), CONFIG).unwrap();
        let config = Config::load(dir.path()).unwrap();
        (dir, config)
    }

    fn prepared(config: &Config, id: &str) -> RunSpec {
        let source = config.data_dir.join("incoming").join(id);
        std::fs::create_dir_all(&source).unwrap();
        std::fs::write(source.join("submission.toml"), "command = [\"true\"]\n").unwrap();
        let request = SubmissionRequest {
            id: SubmissionId::new(id).unwrap(),
            team: TeamId::new("team").unwrap(),
            stage: Stage::Public,
            path: Some(source),
            image: None,
            cpu_only: false,
        };
        prepare(config, &request, Timestamp(1000)).unwrap()
    }

    #[test]
    fn copies_left_half_made_by_a_dead_submit_are_cleared_in_one_look_and_only_theirs() {
        let dir = tempfile::tempdir().unwrap();
        for name in [".new-team-a-123", ".new-team-a-b-77", ".new-team-a-x", "team-a", ".new-other-9"] {
            std::fs::create_dir(dir.path().join(name)).unwrap();
        }
        let (team_a, other) = (SubmissionId::new("team-a").unwrap(), SubmissionId::new("other").unwrap());
        assert_eq!(clear_staging(dir.path(), &[&team_a].into()), 1, "team-a's copy by pid 123, nothing else");
        let mut left: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        left.sort();
        assert_eq!(left, [".new-other-9", ".new-team-a-b-77", ".new-team-a-x", "team-a"]);
        assert_eq!(clear_staging(dir.path(), &[&other, &team_a].into()), 1);
    }

    #[test]
    fn what_prepare_makes_passes_the_engines_check() {
        let (_dir, config) = competition();
        let specs = [prepared(&config, "a"), prepared(&config, "b")];
        check_specs(&config, &specs, Timestamp(1000)).unwrap();
        let image = SubmissionSource::Image { uri: "img".into() };
        let image = RunSpec { source: image, ..specs[0].clone() };
        check_specs(&config, &[image], Timestamp(1000)).unwrap();
    }

    #[test]
    fn a_kept_directory_swapped_for_a_link_is_refused() {
        let (_dir, config) = competition();
        let spec = prepared(&config, "a");
        let kept = config.submissions_dir().join("a");
        let elsewhere = config.data_dir.join("elsewhere");
        std::fs::rename(&kept, &elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &kept).unwrap();
        let err = check_specs(&config, &[spec], Timestamp(1000)).unwrap_err().to_string();
        assert!(err.starts_with("run a-public: ") && err.contains("is not a directory"), "{err}");
    }

    #[test]
    fn one_id_given_two_directories_is_refused_before_anything_is_copied() {
        let (_dir, config) = competition();
        let request = |dir: &str| {
            let source = config.data_dir.join(dir);
            std::fs::create_dir_all(&source).unwrap();
            std::fs::write(source.join("submission.toml"), "command = [\"true\"]\n").unwrap();
            SubmissionRequest {
                id: SubmissionId::new("a").unwrap(),
                team: TeamId::new("team").unwrap(),
                stage: Stage::Public,
                path: Some(source),
                image: None,
                cpu_only: false,
            }
        };
        let requests = [request("one"), request("two")];
        let err = prepare_specs(&config, &requests, Timestamp(1000), &|_| {}).unwrap_err().to_string();
        assert!(err.starts_with("manifest entries 1 and 2") && err.contains("two directories"), "{err}");
        assert!(!config.submissions_dir().join("a").exists(), "nothing kept");
    }

    #[test]
    fn a_run_named_for_another_submission_or_stage_is_refused() {
        let (_dir, config) = competition();
        let spec = prepared(&config, "a");
        let renamed = RunSpec { run: RunId::new(&SubmissionId::new("b").unwrap(), Stage::Public), ..spec };
        let err = check_specs(&config, &[renamed], Timestamp(1000)).unwrap_err().to_string();
        assert!(err.starts_with("run b-public: a run of submission a on public must be named a-public"), "{err}");
    }
}
