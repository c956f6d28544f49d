//! A local job's directory: what the launcher asks of the supervisor and
//! what the supervisor reports back, as files.
//!
//! | file | written by | when |
//! |---|---|---|
//! | `job.json` | the launcher | before the directory appears under its name |
//! | `spawned` | the launcher | each time it starts a supervisor |
//! | `supervisor.lock` | the supervisor | locked for as long as it lives |
//! | `supervisor.json` | the supervisor | when it starts the job |
//! | `terminate` | the terminator | to ask the supervisor to stop the job |
//! | `status.json` | the supervisor | atomically, as its last act |
//! | `work/`, `output/`, `stdout.log`, `stderr.log` | the job | while it runs |

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use evalflow_workflow::{Attempt, Evidence, JobOutcome, JobUsage, ProfileName, RunId, Timestamp};
use serde::{Deserialize, Serialize};

use crate::causes::SignatureConfig;

/// How much of each of stdout and stderr a status keeps, in bytes.
pub const TAIL_BYTES: u64 = 4096;

/// How jobs are isolated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    /// bubblewrap namespaces: the default, required for untrusted code.
    Sandbox,
    /// No isolation: only for code the operator trusts (`--no-sandbox`).
    Unconfined,
}

/// The limits every local job runs under, besides its profile's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Processes and threads at once.
    pub pids_max: u32,
    /// Bytes written to scratch, output and logs, in MiB.
    pub disk_max_mib: u64,
    /// Files and directories in scratch and output.
    #[serde(default = "files_max_default")]
    pub files_max: u64,
    /// Between SIGTERM and SIGKILL when a job is stopped, in seconds.
    pub kill_grace_secs: u64,
}

/// The file cap of a job requested before the cap existed.
fn files_max_default() -> u64 {
    10_000
}

/// What the launcher asks the supervisor to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRequest {
    /// The run.
    pub run: RunId,
    /// The attempt.
    pub attempt: Attempt,
    /// The profile it is placed on.
    pub profile: ProfileName,
    /// The submission's directory, copied to `work/` before the job starts.
    pub submission_dir: PathBuf,
    /// The stage's test set, mounted read-only.
    pub input_dir: PathBuf,
    /// The memory limit of the whole process tree, in MiB.
    pub memory_limit_mib: u64,
    /// The GPU memory the profile stands for, in MiB (told to the job).
    pub gpu_memory_mib: u64,
    /// The profile's vCPUs (told to the job).
    pub vcpus: u32,
    /// The wall-clock limit, in seconds.
    pub time_limit_secs: u64,
    /// The other limits.
    pub limits: Limits,
    /// How the job is isolated.
    pub isolation: Isolation,
    /// The organizer's log signatures, besides the built-in ones.
    #[serde(default)]
    pub signatures: Vec<SignatureConfig>,
}

/// What the supervisor saw when it wrote `supervisor.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Started {
    /// The supervisor's pid.
    pub pid: u32,
    /// When it started the job.
    pub at: Timestamp,
}

/// How the job ended: the supervisor's last word.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobStatus {
    /// The outcome, as the state machine knows outcomes.
    pub outcome: JobOutcome,
    /// Times and peak memory.
    pub usage: JobUsage,
    /// The program's exit code, if it exited.
    pub exit_code: Option<i32>,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
    /// Why the supervisor stopped it, if it did.
    pub note: Option<String>,
    /// What decided the outcome, and what it matched (none in a status
    /// written before evidence was kept).
    #[serde(default)]
    pub evidence: Evidence,
    /// The end of its standard output.
    pub stdout_tail: String,
    /// The end of its standard error.
    pub stderr_tail: String,
}

/// The files of one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobPaths {
    dir: PathBuf,
}

impl JobPaths {
    /// The job named `name` under `jobs_dir`.
    pub fn new(jobs_dir: &Path, name: &str) -> JobPaths {
        JobPaths { dir: jobs_dir.join(name) }
    }

    /// The job whose directory is `dir`.
    pub fn at(dir: &Path) -> JobPaths {
        JobPaths { dir: dir.to_path_buf() }
    }

    /// The job's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The job's name (its directory's).
    pub fn name(&self) -> String {
        self.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    }

    /// What the job is called where names are host-wide (its control
    /// groups): `evalflow-<data directory tag>-<job>`, so that two
    /// competitions on one host with the same run ids never meet.
    pub fn host_name(&self) -> String {
        let jobs_dir = self.dir.parent().unwrap_or(Path::new("/"));
        format!("{}{}", host_prefix(jobs_dir), self.name())
    }

    /// `job.json`.
    pub fn request(&self) -> PathBuf {
        self.dir.join("job.json")
    }

    /// `supervisor.lock`.
    pub fn lock(&self) -> PathBuf {
        self.dir.join("supervisor.lock")
    }

    /// `spawned`: touched each time a supervisor is started.
    pub fn spawned(&self) -> PathBuf {
        self.dir.join("spawned")
    }

    /// `supervisor.json`.
    pub fn started(&self) -> PathBuf {
        self.dir.join("supervisor.json")
    }

    /// `terminate`.
    pub fn terminate(&self) -> PathBuf {
        self.dir.join("terminate")
    }

    /// `status.json`.
    pub fn status(&self) -> PathBuf {
        self.dir.join("status.json")
    }

    /// `work/`: the scratch copy of the submission.
    pub fn work(&self) -> PathBuf {
        self.dir.join("work")
    }

    /// `output/`: where `submission.csv` goes.
    pub fn output(&self) -> PathBuf {
        self.dir.join("output")
    }

    /// `stdout.log`.
    pub fn stdout(&self) -> PathBuf {
        self.dir.join("stdout.log")
    }

    /// `stderr.log`.
    pub fn stderr(&self) -> PathBuf {
        self.dir.join("stderr.log")
    }

    /// Reads `status.json`, if the job has ended.
    pub fn read_status(&self) -> io::Result<Option<JobStatus>> {
        read_json(&self.status())
    }

    /// Whether a supervisor holds this job's lock now.
    pub fn supervised(&self) -> io::Result<bool> {
        let file = match File::open(self.lock()) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        match file.try_lock_shared() {
            Ok(()) => Ok(false),
            Err(std::fs::TryLockError::WouldBlock) => Ok(true),
            Err(std::fs::TryLockError::Error(e)) => Err(e),
        }
    }
}

/// The prefix of the host-wide names of the jobs under `jobs_dir`:
/// `evalflow-` and 12 hex digits of a digest of the directory's real path.
pub fn host_prefix(jobs_dir: &Path) -> String {
    use sha2::{Digest, Sha256};
    let real = jobs_dir.canonicalize().unwrap_or_else(|_| jobs_dir.to_path_buf());
    let digest = Sha256::digest(real.as_os_str().as_encoded_bytes());
    let tag: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("evalflow-{tag}-")
}

/// Reads a JSON file; `None` when it does not exist.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> io::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes).map(Some).map_err(|e| io::Error::other(format!("{}: {e}", path.display())))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The last [`TAIL_BYTES`] of a job's log, lossily decoded, read without
/// following a link.
pub fn tail(path: &Path) -> String {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else { return String::new() };
    crate::untrusted::read_tail(dir, Path::new(name), TAIL_BYTES)
}
