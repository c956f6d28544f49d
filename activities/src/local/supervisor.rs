//! The supervisor: one process per job, detached from the engine, that runs
//! the job under its limits and writes how it ended. Like an AWS Batch job,
//! it outlives the engine: a crash of the engine neither stops nor loses it,
//! and its `status.json` is read after a restart.
//!
//! It holds `supervisor.lock` for its whole life, which tells anyone whether
//! it still runs. It writes `supervisor.json` before starting the job: a
//! supervisor that finds that file (and no status) knows its predecessor died
//! and reports the job as interrupted rather than running it twice.

use std::fs::{self, File};
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use evalflow_workflow::{Detail, JobOutcome, JobUsage, Limit, Resource, Timestamp};

use super::cgroup::JobCgroup;
use super::job::{JobPaths, JobRequest, JobStatus, Started, read_json, tail};
use super::sandbox::{Isolation, NOBODY, PreExec, find_bwrap, job_command, resolve};
use crate::fsutil::{copy_dir, dir_bytes, write_atomic};
use crate::submission::{GPU_OOM_EXIT_CODE, Manifest};

/// How often the supervisor looks at its job.
const POLL: Duration = Duration::from_millis(50);
/// How often it measures the job's disk use.
const DISK_POLL: Duration = Duration::from_millis(500);
/// The audit trail of program starts, in the jobs directory.
pub const LAUNCHES_LOG: &str = "launches.log";
/// The most directory entries one disk measurement reads.
const DISK_ENTRIES_MAX: usize = 100_000;

/// Why the supervisor stopped a job before it ended by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    TimedOut,
    Limit(Limit),
    Terminated,
}

/// Runs the job in `job_dir` to its end and writes its `status.json`.
/// A second supervisor of the same job waits for the first to end, then
/// finds its status and returns. (Waiting, rather than giving up on a held
/// lock, also rides out the brief shared locks of whoever asks whether the
/// job is supervised.)
pub fn supervise(job_dir: &Path) -> io::Result<()> {
    let paths = JobPaths::at(job_dir);
    let lock = File::options().create(true).truncate(false).write(true).open(paths.lock())?;
    lock.lock()?;
    if paths.status().exists() {
        return Ok(());
    }
    let request: JobRequest = read_json(&paths.request())?
        .ok_or_else(|| io::Error::other(format!("{} has no job.json", job_dir.display())))?;
    let status = if paths.started().exists() {
        ended_early(JobOutcome::Interrupted { detail: Detail::new("the job's supervisor died before the job ended") })
    } else if paths.terminate().exists() {
        ended_early(JobOutcome::Interrupted { detail: Detail::new("terminated before it started") })
    } else {
        let started = Started { pid: std::process::id(), at: Timestamp::now() };
        write_atomic(&paths.started(), &serde_json::to_vec(&started)?)?;
        execute(&paths, &request)
    };
    write_atomic(&paths.status(), &serde_json::to_vec_pretty(&status)?)
}

fn ended_early(outcome: JobOutcome) -> JobStatus {
    JobStatus {
        outcome,
        usage: JobUsage { started_at: None, ended_at: Timestamp::now(), peak_memory_mib: None },
        exit_code: None,
        signal: None,
        note: None,
        stdout_tail: String::new(),
        stderr_tail: String::new(),
    }
}

fn cannot_start(detail: String) -> JobStatus {
    ended_early(JobOutcome::CannotStart { detail: Detail::new(detail) })
}

fn execute(paths: &JobPaths, request: &JobRequest) -> JobStatus {
    let argv = match prepare(paths, request) {
        Ok(argv) => argv,
        Err(detail) => return cannot_start(detail),
    };
    let name = paths.dir().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let cgroup = match JobCgroup::create(&name, request.memory_limit_mib, request.limits.pids_max) {
        Ok(cgroup) => Some(cgroup),
        Err(e) if request.isolation == Isolation::Unconfined => {
            tracing::warn!("{e}: running without memory and process limits");
            None
        }
        Err(e) => return ended_early(JobOutcome::Interrupted { detail: Detail::new(e.to_string()) }),
    };
    let status = run(paths, request, &argv, cgroup.as_ref());
    if let Some(cgroup) = cgroup {
        cgroup.kill_all();
        cgroup.remove();
    }
    status
}

/// Makes a fresh scratch copy of the submission and an empty output
/// directory, and checks the command exists where it will run.
fn prepare(paths: &JobPaths, request: &JobRequest) -> Result<Vec<String>, String> {
    for dir in [paths.work(), paths.output()] {
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(|e| format!("cannot clear {}: {e}", dir.display()))?;
        }
    }
    copy_dir(&request.submission_dir, &paths.work()).map_err(|e| format!("cannot copy the submission: {e}"))?;
    fs::create_dir_all(paths.output()).map_err(|e| format!("cannot create the output directory: {e}"))?;
    let manifest = Manifest::read(&paths.work()).map_err(|e| e.to_string())?;
    let program = &manifest.command[0];
    if resolve(program, &paths.work(), request.isolation).is_none() {
        return Err(format!(
            "command {program:?} is not found in the sandbox: use a program of the system's /usr/bin, \
             or a path inside the submission such as ./run.sh"
        ));
    }
    // SAFETY: geteuid(2) has no preconditions.
    #[allow(unsafe_code)]
    let root = unsafe { libc::geteuid() } == 0;
    if root && request.isolation == Isolation::Sandbox {
        for dir in [paths.work(), paths.output()] {
            chown_tree(&dir).map_err(|e| format!("cannot hand {} to the sandbox: {e}", dir.display()))?;
        }
    }
    Ok(manifest.command)
}

/// Gives a tree to the unprivileged user the sandbox runs as.
fn chown_tree(dir: &Path) -> io::Result<()> {
    std::os::unix::fs::chown(dir, Some(NOBODY), Some(NOBODY))?;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            chown_tree(&entry.path())?;
        } else {
            std::os::unix::fs::chown(entry.path(), Some(NOBODY), Some(NOBODY))?;
        }
    }
    Ok(())
}

fn run(paths: &JobPaths, request: &JobRequest, argv: &[String], cgroup: Option<&JobCgroup>) -> JobStatus {
    let disk_max_bytes = request.limits.disk_max_mib * 1024 * 1024;
    let mut command = job_command(find_bwrap().as_deref(), request, paths, argv);
    let logs = (File::create(paths.stdout()), File::create(paths.stderr()));
    let (Ok(stdout), Ok(stderr)) = logs else { return cannot_start("cannot create the job's logs".into()) };
    command.stdin(Stdio::null()).stdout(stdout).stderr(stderr);
    let procs = cgroup.map(JobCgroup::procs_files).unwrap_or_default();
    match PreExec::new(&procs, disk_max_bytes) {
        Ok(pre_exec) => pre_exec.install(&mut command),
        Err(e) => return ended_early(JobOutcome::Interrupted { detail: Detail::new(format!("cgroup: {e}")) }),
    }
    if let Err(e) = record_launch(paths) {
        return ended_early(JobOutcome::Interrupted { detail: Detail::new(format!("cannot record the launch: {e}")) });
    }
    let started_at = Timestamp::now();
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => return cannot_start(format!("cannot start {}: {e}", argv[0])),
    };
    let (exit, stop) = watch(&mut child, paths, request, cgroup);
    let ended_at = Timestamp::now();
    let oom_killed = cgroup.is_some_and(|c| c.oom_kills() > 0);
    let (outcome, note) = classify(exit, stop, oom_killed, request);
    JobStatus {
        outcome,
        usage: JobUsage {
            started_at: Some(started_at),
            ended_at,
            peak_memory_mib: cgroup.and_then(JobCgroup::peak_memory_bytes).map(|b| b.div_ceil(1024 * 1024)),
        },
        exit_code: exit.code(),
        signal: exit.signal(),
        note,
        stdout_tail: tail(&paths.stdout()),
        stderr_tail: tail(&paths.stderr()),
    }
}

/// Appends `<job name> <supervisor pid> <ms since epoch>` to the jobs
/// directory's `launches.log` right before the job's program starts: an
/// audit trail in which a job name never appears twice.
fn record_launch(paths: &JobPaths) -> io::Result<()> {
    use std::io::Write;
    let jobs_dir = paths.dir().parent().ok_or_else(|| io::Error::other("a job directory has a parent"))?;
    let name = paths.dir().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let line = format!("{name} {} {}\n", std::process::id(), Timestamp::now().as_millis());
    let mut log = File::options().create(true).append(true).open(jobs_dir.join(LAUNCHES_LOG))?;
    log.write_all(line.as_bytes())?;
    log.sync_data()
}

/// Waits for the job to end, stopping it when it breaks a limit or is asked to stop.
fn watch(
    child: &mut Child,
    paths: &JobPaths,
    request: &JobRequest,
    cgroup: Option<&JobCgroup>,
) -> (ExitStatus, Option<Stop>) {
    let start = Instant::now();
    let deadline = start + Duration::from_secs(request.time_limit_secs);
    let disk_max_bytes = request.limits.disk_max_mib * 1024 * 1024;
    let mut next_disk_check = start;
    loop {
        if let Ok(Some(exit)) = child.try_wait() {
            return (exit, None);
        }
        let now = Instant::now();
        let mut stop = None;
        if now >= deadline {
            stop = Some(Stop::TimedOut);
        } else if cgroup.is_some_and(|c| c.pids_limit_hits() > 0) {
            stop = Some(Stop::Limit(Limit::Processes));
        } else if paths.terminate().exists() {
            stop = Some(Stop::Terminated);
        } else if now >= next_disk_check {
            next_disk_check = now + DISK_POLL;
            if disk_used(paths) > disk_max_bytes {
                stop = Some(Stop::Limit(Limit::Disk));
            }
        }
        if let Some(stop) = stop {
            return (stop_job(child, cgroup, Duration::from_secs(request.limits.kill_grace_secs)), Some(stop));
        }
        std::thread::sleep(POLL);
    }
}

fn disk_used(paths: &JobPaths) -> u64 {
    let logs = [paths.stdout(), paths.stderr()].iter().map(|p| fs::metadata(p).map_or(0, |m| m.len())).sum::<u64>();
    let dirs = [paths.work(), paths.output()].iter().map(|d| dir_bytes(d, DISK_ENTRIES_MAX).unwrap_or(0)).sum::<u64>();
    logs + dirs
}

/// SIGTERM every process of the job, SIGKILL what is left after `grace`.
fn stop_job(child: &mut Child, cgroup: Option<&JobCgroup>, grace: Duration) -> ExitStatus {
    let group = -i32::try_from(child.id()).unwrap_or(i32::MAX);
    signal(group, libc::SIGTERM);
    if let Some(cgroup) = cgroup {
        cgroup.signal_all(libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(exit)) = child.try_wait() {
            return exit;
        }
        std::thread::sleep(POLL);
    }
    if let Some(cgroup) = cgroup {
        cgroup.kill_all();
    }
    signal(group, libc::SIGKILL);
    child.wait().unwrap_or_else(|_| ExitStatus::from_raw(libc::SIGKILL))
}

fn signal(pid: i32, signal: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(pid, signal);
    }
}

/// What the job's end means. bubblewrap reports a program killed by signal
/// `n` as exit code `128 + n`.
fn classify(
    exit: ExitStatus,
    stop: Option<Stop>,
    oom_killed: bool,
    request: &JobRequest,
) -> (JobOutcome, Option<String>) {
    match stop {
        Some(Stop::TimedOut) => {
            return (JobOutcome::TimedOut, Some(format!("stopped at the time limit of {} s", request.time_limit_secs)));
        }
        Some(Stop::Limit(Limit::Processes)) => {
            let note = format!("stopped: it tried to run more than {} processes", request.limits.pids_max);
            return (JobOutcome::LimitExceeded { limit: Limit::Processes }, Some(note));
        }
        Some(Stop::Limit(Limit::Disk)) => {
            let note = format!("stopped: it wrote more than {} MiB", request.limits.disk_max_mib);
            return (JobOutcome::LimitExceeded { limit: Limit::Disk }, Some(note));
        }
        Some(Stop::Terminated) => {
            return (JobOutcome::Interrupted { detail: Detail::new("terminated on request") }, None);
        }
        None => {}
    }
    if oom_killed {
        let note = format!("killed by the kernel at the memory limit of {} MiB", request.memory_limit_mib);
        return (JobOutcome::OutOfMemory { resource: Resource::HostMemory }, Some(note));
    }
    let signal = exit.signal().or_else(|| exit.code().filter(|c| (129..=192).contains(c)).map(|c| c - 128));
    let outcome = match (exit.code(), signal) {
        (Some(0), _) => JobOutcome::Succeeded,
        (Some(GPU_OOM_EXIT_CODE), _) => JobOutcome::OutOfMemory { resource: Resource::GpuMemory },
        (_, Some(libc::SIGXFSZ)) => JobOutcome::LimitExceeded { limit: Limit::Disk },
        (_, Some(_)) => JobOutcome::Crashed { exit_code: None },
        (code, None) => JobOutcome::Crashed { exit_code: code },
    };
    (outcome, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::job::Limits;
    use evalflow_workflow::{Attempt, ProfileName, RunId};

    fn request() -> JobRequest {
        JobRequest {
            run: RunId::parse("s-public").unwrap(),
            attempt: Attempt(1),
            profile: ProfileName::new("g4").unwrap(),
            submission_dir: "/s".into(),
            input_dir: "/i".into(),
            memory_limit_mib: 160,
            gpu_memory_mib: 15360,
            vcpus: 4,
            time_limit_secs: 12,
            limits: Limits { pids_max: 128, disk_max_mib: 256, kill_grace_secs: 2 },
            isolation: Isolation::Sandbox,
        }
    }

    fn exited(code: i32) -> ExitStatus {
        ExitStatus::from_raw(code << 8)
    }

    fn outcome(exit: ExitStatus, stop: Option<Stop>, oom_killed: bool) -> JobOutcome {
        classify(exit, stop, oom_killed, &request()).0
    }

    #[test]
    fn exits_are_told_apart() {
        assert_eq!(outcome(exited(0), None, false), JobOutcome::Succeeded);
        assert_eq!(outcome(exited(3), None, false), JobOutcome::Crashed { exit_code: Some(3) });
        assert_eq!(
            outcome(exited(GPU_OOM_EXIT_CODE), None, false),
            JobOutcome::OutOfMemory { resource: Resource::GpuMemory },
            "the documented exit code of a CUDA out-of-memory"
        );
        // bubblewrap reports death by signal n as 128 + n.
        assert_eq!(outcome(exited(137), None, true), JobOutcome::OutOfMemory { resource: Resource::HostMemory });
        assert_eq!(outcome(exited(137), None, false), JobOutcome::Crashed { exit_code: None });
        assert_eq!(outcome(exited(128 + libc::SIGXFSZ), None, false), JobOutcome::LimitExceeded { limit: Limit::Disk });
        assert_eq!(outcome(ExitStatus::from_raw(libc::SIGSEGV), None, false), JobOutcome::Crashed { exit_code: None });
    }

    #[test]
    fn what_the_supervisor_stopped_is_reported_as_the_limit_it_broke() {
        let killed = ExitStatus::from_raw(libc::SIGKILL);
        assert_eq!(outcome(killed, Some(Stop::TimedOut), true), JobOutcome::TimedOut, "time first, even with an OOM");
        let (outcome, note) = classify(killed, Some(Stop::Limit(Limit::Processes)), false, &request());
        assert_eq!(outcome, JobOutcome::LimitExceeded { limit: Limit::Processes });
        assert_eq!(note.as_deref(), Some("stopped: it tried to run more than 128 processes"));
        assert!(matches!(self::outcome(killed, Some(Stop::Terminated), false), JobOutcome::Interrupted { .. }));
    }
}
