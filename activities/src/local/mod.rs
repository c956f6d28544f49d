//! The local job runner: each job runs on this machine under its own
//! supervisor process, in a bubblewrap sandbox with cgroup limits.
//!
//! Jobs live in `<jobs dir>/<job name>/` (see [`job`]); the job name
//! `ef-<run>-a<attempt>` is deterministic, so launching twice adopts the
//! first job. The supervisor is detached from the engine (its own process
//! group, reparented on the engine's death), so jobs outlive the engine.

pub mod cgroup;
pub mod job;
pub mod sandbox;
pub mod seccomp;
pub mod supervisor;
pub mod uid;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use evalflow_workflow::{
    Attempt, Detail, Evidence, JobId, JobOutcome, JobUsage, RunId, Stage, SubmissionSource, Timestamp, job_name,
};

use self::job::{JobPaths, JobRequest, Limits, Started, read_json};
use self::sandbox::{Isolation, SandboxError};
use crate::causes::SignatureConfig;
use crate::fsutil::write_atomic;
use crate::{ActivityError, Checked, EndedJob, JobRunner, LaunchRequest, RunningJob, blocking};

/// How long a launched job may go without its supervisor starting before it
/// counts as lost.
const SUPERVISOR_START_GRACE: Duration = Duration::from_secs(30);

/// Where and how local jobs run.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalRunnerConfig {
    /// The directory of job directories.
    pub jobs_dir: PathBuf,
    /// The supervisor's program and leading arguments; the job directory is
    /// appended (the CLI uses `evalflow supervise`).
    pub supervisor: Vec<OsString>,
    /// Each stage's test set directory.
    pub test_sets: BTreeMap<Stage, PathBuf>,
    /// How jobs are isolated.
    pub isolation: Isolation,
    /// The limits besides memory and time.
    pub limits: Limits,
    /// The organizer's log signatures, besides the built-in ones.
    pub signatures: Vec<SignatureConfig>,
}

/// Runs jobs on this machine.
#[derive(Debug, Clone)]
pub struct LocalRunner {
    config: Arc<LocalRunnerConfig>,
    /// Told when a supervisor this runner spawned exits: its job ended.
    exited: Arc<tokio::sync::Notify>,
}

impl LocalRunner {
    /// A runner. Call [`LocalRunner::check_host`] before running untrusted code with it.
    pub fn new(config: LocalRunnerConfig) -> LocalRunner {
        LocalRunner { config: Arc::new(config), exited: Arc::default() }
    }

    /// Checks that this machine can run jobs as configured: with
    /// [`Isolation::Sandbox`], that bubblewrap makes sandboxes that reach
    /// the job directories, and that job cgroups can be created. Removes the
    /// cgroups that jobs of this data directory left behind.
    pub fn check_host(&self) -> Result<(), SandboxError> {
        if self.config.isolation == Isolation::Unconfined {
            return Ok(());
        }
        fs::create_dir_all(&self.config.jobs_dir).map_err(|e| SandboxError::Unreachable {
            dir: self.config.jobs_dir.display().to_string(),
            problem: e.to_string(),
        })?;
        sandbox::check_reachable(&self.config.jobs_dir)?;
        for test_set in self.config.test_sets.values() {
            sandbox::check_reachable(test_set)?;
        }
        sandbox::probe(&self.config.jobs_dir)?;
        let jobs_dir = self.config.jobs_dir.clone();
        cgroup::JobCgroup::remove_leftovers(&job::host_prefix(&jobs_dir), |job| {
            JobPaths::new(&jobs_dir, job).supervised().unwrap_or(true)
        });
        let probe = cgroup::JobCgroup::create(&format!("evalflow-probe-{}", std::process::id()), 64, 16, 1)
            .map_err(|e| SandboxError::NoCgroups(e.to_string()))?;
        probe.remove();
        Ok(())
    }

    /// The files of the attempt's job.
    pub fn job_paths(&self, run: &RunId, attempt: Attempt) -> JobPaths {
        JobPaths::new(&self.config.jobs_dir, &job_name(run, attempt))
    }
}

#[async_trait]
impl JobRunner for LocalRunner {
    async fn launch(&self, request: &LaunchRequest) -> Result<JobId, ActivityError> {
        let (config, request, exited) = (self.config.clone(), request.clone(), self.exited.clone());
        blocking(move || launch(&config, &request, exited)).await
    }

    async fn terminate(&self, run: &RunId, attempt: Attempt, _job: Option<&JobId>) -> Result<(), ActivityError> {
        let paths = self.job_paths(run, attempt);
        let grace = Duration::from_secs(self.config.limits.kill_grace_secs);
        blocking(move || terminate(&paths, grace)).await
    }

    async fn check(&self, jobs: &[RunningJob]) -> Result<Checked, ActivityError> {
        let (config, jobs) = (self.config.clone(), jobs.to_vec());
        blocking(move || {
            let mut ended = Vec::new();
            for job in jobs {
                let paths = JobPaths::new(&config.jobs_dir, &job_name(&job.run, job.attempt));
                // One job that cannot be read must not hide the others' ends.
                match end_of(&paths) {
                    Ok(Some((outcome, usage, evidence))) => ended.push(EndedJob { job, outcome, usage, evidence }),
                    Ok(None) => {}
                    // A job whose end cannot be read, and whose supervisor is gone, would
                    // stay running for ever: it is an interruption of the host's.
                    Err(e) if !paths.dir().exists() || !paths.supervised().unwrap_or(true) => {
                        let detail = if paths.dir().exists() {
                            Detail::new(format!("its status cannot be read ({e})"))
                        } else {
                            Detail::new(format!("its job directory {} is gone", paths.dir().display()))
                        };
                        let usage = JobUsage { started_at: None, ended_at: Timestamp::now(), peak_memory_mib: None };
                        tracing::warn!("{e}: {detail}");
                        let evidence = Evidence::default().decided("status-unreadable", e.to_string());
                        ended.push(EndedJob { job, outcome: JobOutcome::Interrupted { detail }, usage, evidence });
                    }
                    Err(e) => tracing::warn!("cannot read job {}: {e}", paths.dir().display()),
                }
            }
            Ok(Checked { ended, waiting: Vec::new() }) // a local job starts at once
        })
        .await
    }

    /// A supervisor spawned here exited: it wrote its job's status first,
    /// or died, which the next look sees too.
    async fn ended_hint(&self) {
        self.exited.notified().await;
    }
}

fn launch(
    config: &LocalRunnerConfig,
    request: &LaunchRequest,
    exited: Arc<tokio::sync::Notify>,
) -> Result<JobId, ActivityError> {
    let name = job_name(&request.spec.run, request.attempt);
    let paths = JobPaths::new(&config.jobs_dir, &name);
    if !paths.dir().exists() {
        create(config, request, &paths)?;
    }
    let job = JobId::new(name).map_err(|e| ActivityError::Permanent(e.to_string()))?;
    if paths.status().exists() || paths.started().exists() || paths.supervised()? {
        return Ok(job); // adopted: it runs, or ran
    }
    spawn_supervisor(config, &paths, exited)?;
    Ok(job)
}

/// Prepares the job's directory under a temporary name and renames it into
/// place, so that a job directory always has its `job.json`.
fn create(config: &LocalRunnerConfig, request: &LaunchRequest, paths: &JobPaths) -> Result<(), ActivityError> {
    let spec = &request.spec;
    let SubmissionSource::Directory { path, .. } = &spec.source else {
        let problem = format!("run {}: the local runner runs directory submissions, not container images", spec.run);
        return Err(ActivityError::InvalidSubmission(problem));
    };
    let input_dir = config.test_sets.get(&spec.stage).ok_or_else(|| {
        ActivityError::Permanent(format!("no test set is configured for stage {} in evalflow.toml", spec.stage))
    })?;
    let profile = &request.profile;
    let job = JobRequest {
        run: spec.run.clone(),
        attempt: request.attempt,
        profile: profile.name.clone(),
        submission_dir: PathBuf::from(path),
        input_dir: input_dir.clone(),
        memory_limit_mib: profile.host_memory_mib,
        gpu_memory_mib: profile.gpu_memory_mib,
        vcpus: profile.vcpus,
        time_limit_secs: request.time_limit_secs,
        limits: config.limits,
        isolation: config.isolation,
        signatures: config.signatures.clone(),
    };
    let name = paths.dir().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let staging = config.jobs_dir.join(format!(".new-{name}-{}", std::process::id()));
    fs::create_dir_all(&staging)?;
    // Sandboxes pass through it to their own directories; nobody else lists it.
    fs::set_permissions(&staging, std::os::unix::fs::PermissionsExt::from_mode(0o711))?;
    write_atomic(&staging.join("job.json"), &serde_json::to_vec_pretty(&job).map_err(std::io::Error::other)?)?;
    match fs::rename(&staging, paths.dir()) {
        Ok(()) => Ok(()),
        Err(_) if paths.request().exists() => Ok(fs::remove_dir_all(&staging)?),
        Err(e) => Err(e.into()),
    }
}

/// Spawns the job's supervisor; `exited` is told when it exits.
fn spawn_supervisor(
    config: &LocalRunnerConfig,
    paths: &JobPaths,
    exited: Arc<tokio::sync::Notify>,
) -> Result<(), ActivityError> {
    let Some((program, args)) = config.supervisor.split_first() else {
        return Err(ActivityError::Permanent("no supervisor program is configured".into()));
    };
    // Marks the moment: a supervisor that never takes its lock is judged from it.
    fs::write(paths.spawned(), Timestamp::now().as_millis().to_string())?;
    let log = fs::File::options().create(true).append(true).open(paths.dir().join("supervisor.log"))?;
    let mut command = Command::new(program);
    command.args(args).arg(paths.dir()).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
    command.process_group(0); // out of reach of the terminal's Ctrl-C
    sandbox::inherit_nothing(&mut command);
    let mut child = command.spawn()?;
    std::thread::spawn(move || {
        let _ = child.wait();
        exited.notify_one();
    });
    Ok(())
}

fn terminate(paths: &JobPaths, grace: Duration) -> Result<(), ActivityError> {
    if !paths.dir().exists() || paths.status().exists() {
        return Ok(());
    }
    write_atomic(&paths.terminate(), b"")?;
    let deadline = Instant::now() + grace + Duration::from_secs(30);
    // A job that never started sees the marker when its supervisor starts; a
    // job whose supervisor died died with it (its sandbox dies with its parent).
    while paths.supervised()? && !paths.status().exists() {
        if Instant::now() > deadline {
            return Err(ActivityError::Transient(format!("{} did not stop in time", paths.dir().display())));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// How the job ended, if it did.
fn end_of(paths: &JobPaths) -> Result<Option<(JobOutcome, JobUsage, Evidence)>, ActivityError> {
    if let Some(status) = paths.read_status()? {
        return Ok(Some((status.outcome, status.usage, status.evidence)));
    }
    if paths.supervised()? {
        return Ok(None);
    }
    // Its supervisor is gone: the status may have been written just before.
    if let Some(status) = paths.read_status()? {
        return Ok(Some((status.outcome, status.usage, status.evidence)));
    }
    let lost = |detail: &str, started_at| {
        let usage = JobUsage { started_at, ended_at: Timestamp::now(), peak_memory_mib: None };
        let evidence = Evidence::default().decided("supervisor-gone", detail);
        Ok(Some((JobOutcome::Interrupted { detail: Detail::new(detail) }, usage, evidence)))
    };
    if let Some(started) = read_json::<Started>(&paths.started())? {
        return lost("the job's supervisor died before the job ended", Some(started.at));
    }
    let spawned = fs::metadata(paths.spawned()).and_then(|m| m.modified());
    let age = spawned.map_or(SUPERVISOR_START_GRACE, |at| at.elapsed().unwrap_or_default());
    if age >= SUPERVISOR_START_GRACE {
        return lost("the job's supervisor never started", None);
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use evalflow_workflow::{Attempt, Stage};

    #[tokio::test]
    async fn a_job_whose_status_cannot_be_read_is_interrupted_not_running_for_ever() {
        let dir = tempfile::tempdir().unwrap();
        let config = LocalRunnerConfig {
            jobs_dir: dir.path().to_path_buf(),
            supervisor: Vec::new(),
            test_sets: BTreeMap::new(),
            isolation: Isolation::Sandbox,
            limits: Limits { pids_max: 1, disk_max_mib: 1, files_max: 1, kill_grace_secs: 1 },
            signatures: Vec::new(),
        };
        let runner = LocalRunner::new(config);
        let run = RunId::parse("garbled-public").unwrap();
        let paths = runner.job_paths(&run, Attempt(1));
        fs::create_dir_all(paths.dir()).unwrap();
        fs::write(paths.status(), b"{\"outcome\": tru").unwrap();
        let job = RunningJob {
            run: run.clone(),
            stage: Stage::Public,
            attempt: Attempt(1),
            job: JobId::new("ef-garbled-public-a1").unwrap(),
            since: Timestamp::now(),
        };
        let ended = runner.check(&[job]).await.unwrap().ended;
        let [EndedJob { outcome: JobOutcome::Interrupted { detail }, .. }] = &ended[..] else {
            panic!("not interrupted: {ended:?}")
        };
        assert!(detail.as_str().starts_with("its status cannot be read"), "{detail}");
    }
}
