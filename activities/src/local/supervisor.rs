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
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use evalflow_workflow::{Detail, Evidence, JobOutcome, JobUsage, Limit, Resource, Timestamp};

use super::cgroup::JobCgroup;
use super::job::{JobPaths, JobRequest, JobStatus, Limits, Started, read_json, tail};
use super::sandbox::{
    BWRAP_ERROR_PREFIX, Isolation, PreExec, SandboxFds, find_bwrap, is_root, job_command, probe, resolve,
};
use super::uid::JobUid;
use crate::causes::{Cause, Signatures};
use crate::fsutil::{copy_dir, free_space, link_dir, write_atomic};
use crate::submission::{GPU_OOM_EXIT_CODE, MANIFEST, Manifest};
use crate::untrusted::{self, Unmeasurable};

/// How often the supervisor looks at its job's limits (its exit is seen at once).
const POLL: Duration = Duration::from_millis(50);
/// How often it measures the job's disk use.
const DISK_POLL: Duration = Duration::from_millis(500);
/// The audit trail of program starts, in the jobs directory.
pub const LAUNCHES_LOG: &str = "launches.log";
/// A mebibyte.
const MIB: u64 = 1024 * 1024;

/// Why the supervisor stopped a job before it ended by itself.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stop {
    TimedOut,
    Processes,
    /// Over the disk or file limit, and how.
    Disk(String),
    Terminated,
}

/// Runs the job in `job_dir` to its end and writes its `status.json`.
/// A second supervisor of the same job waits for the first to end, then
/// finds its status and returns. (Waiting, rather than giving up on a held
/// lock, also rides out the brief shared locks of whoever asks whether the
/// job is supervised.)
pub fn supervise(job_dir: &Path) -> io::Result<()> {
    // Before anything else: see `sandbox::inherit_nothing`.
    super::sandbox::inherited_fds_close_on_exec()?;
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
    let status = serde_json::to_vec_pretty(&status)?;
    let deadline = Instant::now() + ROOM_WAIT_MAX;
    loop {
        match write_atomic(&paths.status(), &status) {
            Err(e) if e.kind() == io::ErrorKind::StorageFull && Instant::now() < deadline => {
                tracing::warn!("cannot write the job's status ({e}): waiting for room on the host's disk");
                std::thread::sleep(ROOM_POLL);
            }
            written => {
                // The scratch directory was the job's alone: nothing reads it
                // after the job, and it holds links to the kept copy.
                if written.is_ok() && paths.work().exists() {
                    let _ = fs::remove_dir_all(paths.work());
                }
                return written;
            }
        }
    }
}

fn ended_early(outcome: JobOutcome) -> JobStatus {
    JobStatus {
        outcome,
        usage: JobUsage { started_at: None, ended_at: Timestamp::now(), peak_memory_mib: None },
        exit_code: None,
        signal: None,
        note: None,
        evidence: Evidence::default(),
        stdout_tail: String::new(),
        stderr_tail: String::new(),
    }
}

fn cannot_start(detail: String) -> JobStatus {
    ended_early(JobOutcome::CannotStart { detail: Detail::new(detail) })
}

fn execute(paths: &JobPaths, request: &JobRequest) -> JobStatus {
    let sandboxed = request.isolation == Isolation::Sandbox;
    let uid = match (sandboxed && is_root()).then(|| JobUid::claim(&paths.host_name())).transpose() {
        Ok(uid) => uid,
        Err(e) => return interrupted(format!("cannot claim a uid for the job: {e}")),
    };
    let argv = match prepare_when_room(paths, request, uid.as_ref().map(JobUid::get)) {
        Ok(argv) => argv,
        Err(status) => return *status,
    };
    let cgroup =
        match JobCgroup::create(&paths.host_name(), request.memory_limit_mib, request.limits.pids_max, request.vcpus) {
            Ok(cgroup) => Some(cgroup),
            Err(e) if !sandboxed => {
                tracing::warn!("{e}: running without memory and process limits");
                None
            }
            Err(e) => return interrupted(e.to_string()),
        };
    let status = run(paths, request, &argv, cgroup.as_ref(), uid.as_ref().map(JobUid::get));
    if let Some(cgroup) = cgroup {
        cgroup.kill_all();
        cgroup.remove();
    }
    status
}

fn interrupted(detail: String) -> JobStatus {
    ended_early(JobOutcome::Interrupted { detail: Detail::new(detail) })
}

/// Below this much free space, the host's disk counts as full.
const HOST_FULL_BELOW: u64 = MIB;

/// How full the disk under `dir` is, if below [`HOST_FULL_BELOW`] or out of inodes.
fn host_full(dir: &Path) -> Option<String> {
    let free = free_space(dir).ok()?;
    (free.bytes < HOST_FULL_BELOW || free.no_inodes).then(|| {
        let inodes = if free.no_inodes { ", no inodes left" } else { "" };
        format!("{} KiB free{inodes} under {}", free.bytes / 1024, dir.display())
    })
}

/// How often a job whose preparation met a full disk looks again.
const ROOM_POLL: Duration = Duration::from_secs(5);
/// How long it waits for room at most; then the attempt counts as interrupted.
const ROOM_WAIT_MAX: Duration = Duration::from_secs(24 * 3600);

/// Why a job could not be prepared.
enum Unprepared {
    /// The host's disk is full: its problem, not the submission's.
    NoSpace(String),
    /// The submission cannot start.
    Refused(String),
}

/// The error of a failed preparation step `what`.
fn unprepared(what: String) -> impl FnOnce(io::Error) -> Unprepared {
    move |e| match e.kind() {
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => Unprepared::NoSpace(format!("{what}: {e}")),
        _ => Unprepared::Refused(format!("{what}: {e}")),
    }
}

/// [`prepare`], again every [`ROOM_POLL`] while the host's disk is full
/// (the partial copy is kept meanwhile, so the disk shows full to the
/// engine too, which launches nothing more), until it is terminated or
/// [`ROOM_WAIT_MAX`] has passed.
fn prepare_when_room(paths: &JobPaths, request: &JobRequest, uid: Option<u32>) -> Result<Vec<String>, Box<JobStatus>> {
    let deadline = Instant::now() + ROOM_WAIT_MAX;
    loop {
        match prepare(paths, request, uid) {
            Ok(argv) => return Ok(argv),
            Err(Unprepared::NoSpace(detail)) if Instant::now() < deadline && !paths.terminate().exists() => {
                tracing::warn!("{detail}: waiting for room on the host's disk");
                std::thread::sleep(ROOM_POLL);
            }
            Err(Unprepared::NoSpace(detail)) => return Err(Box::new(interrupted(detail))),
            Err(Unprepared::Refused(detail)) => return Err(Box::new(cannot_start(detail))),
        }
    }
}

/// Makes a fresh scratch directory holding the submission's files and an
/// empty output directory, and checks the command exists where it will run.
///
/// A job of a uid of its own gets the kept copy's files as read-only hard
/// links in directories of its own: it may add, remove and replace files
/// there, not change the kept ones, and a large model costs no copy. A job
/// of the engine's own user could change the kept files: it gets a copy.
fn prepare(paths: &JobPaths, request: &JobRequest, uid: Option<u32>) -> Result<Vec<String>, Unprepared> {
    for dir in [paths.work(), paths.output()] {
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(unprepared(format!("cannot clear {}", dir.display())))?;
        }
    }
    let (kept, work) = (&request.submission_dir, &paths.work());
    // The files of the scratch directory that are the job's own: `None`, all.
    let copied = match uid {
        // The manifest is read as the submitter's file, which must have one link.
        Some(_) if hard_links_protected() => Some(
            link_dir(kept, work, &[Path::new(MANIFEST)])
                .map_err(unprepared("cannot link the submission's files".into()))?,
        ),
        // The kept copy was checked against the size cap when it was submitted.
        _ => {
            copy_dir(kept, work, u64::MAX).map_err(unprepared("cannot copy the submission".into()))?;
            None
        }
    };
    fs::create_dir_all(paths.output()).map_err(unprepared("cannot create the output directory".into()))?;
    let manifest = Manifest::read(work).map_err(|e| Unprepared::Refused(e.to_string()))?;
    let program = &manifest.command[0];
    if resolve(program, &paths.work(), request.isolation).is_none() {
        return Err(Unprepared::Refused(format!(
            "command {program:?} is not found in the sandbox: use a program of the system's /usr/bin, \
             or a path inside the submission such as ./run.sh"
        )));
    }
    if let Some(uid) = uid {
        let hand = |dir: &Path, files| {
            chown_tree(dir, uid, files).map_err(unprepared(format!("cannot hand {} to the sandbox", dir.display())))
        };
        hand(work, copied.as_deref())?;
        hand(&paths.output(), None)?;
    }
    Ok(manifest.command)
}

/// Whether the kernel lets nobody link a file they may not write
/// (`fs.protected_hardlinks`): otherwise a job could link a kept file until
/// it has no links left to give, and its scratch directory gets copies.
fn hard_links_protected() -> bool {
    fs::read_to_string("/proc/sys/fs/protected_hardlinks").is_ok_and(|value| value.trim() == "1")
}

/// Gives a tree (made by the supervisor) to the job's uid, its top
/// directory to that uid alone: its directories, and its files, all or
/// only `files` (relative to `dir`; the others are links to the kept copy,
/// which stay read-only and root's).
fn chown_tree(dir: &Path, uid: u32, files: Option<&[PathBuf]>) -> io::Result<()> {
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    chown_below(dir, uid, files.is_none())?;
    for file in files.unwrap_or_default() {
        std::os::unix::fs::lchown(dir.join(file), Some(uid), Some(uid))?;
    }
    Ok(())
}

fn chown_below(dir: &Path, uid: u32, files: bool) -> io::Result<()> {
    std::os::unix::fs::lchown(dir, Some(uid), Some(uid))?;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            chown_below(&entry.path(), uid, files)?;
        } else if files {
            std::os::unix::fs::lchown(entry.path(), Some(uid), Some(uid))?;
        }
    }
    Ok(())
}

fn run(
    paths: &JobPaths,
    request: &JobRequest,
    argv: &[String],
    cgroup: Option<&JobCgroup>,
    uid: Option<u32>,
) -> JobStatus {
    let bwrap = find_bwrap();
    let sandbox = match request.isolation {
        Isolation::Sandbox => match SandboxFds::open(&request.input_dir, &paths.work(), &paths.output()) {
            Ok(fds) => Some(fds),
            Err(e) => return interrupted(format!("cannot prepare the sandbox: {e}")),
        },
        Isolation::Unconfined => None,
    };
    let mut command = job_command(bwrap.as_deref(), request, paths, argv, sandbox.as_ref().map(|fds| (fds, uid)));
    let log = |path: PathBuf| File::options().write(true).create(true).truncate(true).mode(0o600).open(path);
    let logs = (log(paths.stdout()), log(paths.stderr()));
    let (Ok(stdout), Ok(stderr)) = logs else { return cannot_start("cannot create the job's logs".into()) };
    command.stdin(Stdio::null()).stdout(stdout).stderr(stderr);
    let procs = cgroup.map(JobCgroup::procs_files).unwrap_or_default();
    let keep = sandbox.as_ref().map(SandboxFds::raw).unwrap_or_default();
    // One byte past the cap, so that a program that ignores EFBIG has still written more than allowed.
    match PreExec::new(&procs, request.limits.disk_max_mib * MIB + 1, keep) {
        Ok(pre_exec) => pre_exec.install(&mut command),
        Err(e) => return interrupted(format!("cgroup: {e}")),
    }
    if let Err(e) = record_launch(paths) {
        return interrupted(format!("cannot record the launch: {e}"));
    }
    let started_at = Timestamp::now();
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => return cannot_start(format!("cannot start {}: {e}", argv[0])),
    };
    drop(sandbox);
    let (exit, stop) = watch(&mut child, paths, request, cgroup);
    let ended_at = Timestamp::now();
    let (stdout_tail, stderr_tail) = (tail(&paths.stdout()), tail(&paths.stderr()));
    let end = End {
        exit,
        stop,
        oom_killed: cgroup.is_some_and(|c| c.oom_kills() > 0),
        disk: disk_verdict(paths, &request.limits),
        sandbox_failed: sandbox_failure(paths, request, exit),
        host_full: host_full(paths.dir()),
        cause: log_cause(request, exit, &stderr_tail, &stdout_tail),
    };
    let Verdict { outcome, note, rule, matched } = classify(&end, request);
    let evidence = Evidence {
        rule: rule.map(Detail::new),
        matched: matched.map(Detail::new),
        exit_code: exit.code(),
        signal: exit.signal(),
        ..Evidence::default()
    };
    JobStatus {
        outcome,
        usage: JobUsage {
            started_at: Some(started_at),
            ended_at,
            peak_memory_mib: cgroup.and_then(JobCgroup::peak_memory_bytes).map(|b| b.div_ceil(MIB)),
        },
        exit_code: exit.code(),
        signal: exit.signal(),
        note,
        evidence,
        stdout_tail,
        stderr_tail,
    }
}

/// What a failed program's logs show it ran out of, if anything: the
/// fatal error of its standard error, else of its standard output.
fn log_cause(request: &JobRequest, exit: ExitStatus, stderr: &str, stdout: &str) -> Option<Cause> {
    if exit.success() {
        return None; // nothing is escalated when the program succeeded
    }
    let signatures = match Signatures::new(&request.signatures) {
        Ok(signatures) => signatures,
        Err(e) => {
            tracing::warn!("{e}: reading the log with the built-in signatures only");
            Signatures::new(&[]).ok()?
        }
    };
    signatures.cause(stderr).or_else(|| signatures.cause(stdout))
}

/// What bubblewrap said, when it is bubblewrap that failed before the
/// program started: exit code 1 with its own message first on stderr,
/// and a probe sandbox that fails too. (A program can print what
/// bubblewrap would; then the probe works, and the failure is the program's.)
fn sandbox_failure(paths: &JobPaths, request: &JobRequest, exit: ExitStatus) -> Option<String> {
    if request.isolation != Isolation::Sandbox || exit.code() != Some(1) {
        return None;
    }
    let mut head = Vec::new();
    File::open(paths.stderr()).ok()?.take(512).read_to_end(&mut head).ok()?;
    let first = String::from_utf8_lossy(&head).lines().next()?.to_owned();
    if !first.starts_with(BWRAP_ERROR_PREFIX) {
        return None;
    }
    let probe = probe(paths.dir().parent()?).err()?;
    Some(format!("{first} (and a probe sandbox fails too: {probe})"))
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
    let mut next_disk_check = start;
    let mut exited = Exited::of(child);
    loop {
        if let Ok(Some(exit)) = child.try_wait() {
            return (exit, None);
        }
        let now = Instant::now();
        let mut stop = None;
        if now >= deadline {
            stop = Some(Stop::TimedOut);
        } else if cgroup.is_some_and(|c| c.pids_limit_hits() > 0) {
            stop = Some(Stop::Processes);
        } else if paths.terminate().exists() {
            stop = Some(Stop::Terminated);
        } else if now >= next_disk_check {
            next_disk_check = now + DISK_POLL;
            stop = disk_verdict(paths, &request.limits).map(Stop::Disk);
        }
        if let Some(stop) = stop {
            let sandboxed = request.isolation == Isolation::Sandbox;
            let grace = Duration::from_secs(request.limits.kill_grace_secs);
            return (stop_job(child, cgroup, sandboxed, grace), Some(stop));
        }
        exited.wait(POLL);
    }
}

/// Tells when a child exits: its pidfd becomes readable (and stays so:
/// once it was, the wait is a plain sleep, should the exit go unseen).
struct Exited(Option<std::os::fd::OwnedFd>);

impl Exited {
    fn of(child: &Child) -> Exited {
        Exited(
            rustix::process::pidfd_open(rustix::process::Pid::from_child(child), rustix::process::PidfdFlags::empty())
                .ok(),
        )
    }

    /// Sleeps for `most`, or less if the child exits meanwhile.
    fn wait(&mut self, most: Duration) {
        use rustix::event::{PollFd, PollFlags, Timespec};
        let Some(pidfd) = &self.0 else { return std::thread::sleep(most) };
        let timeout = Timespec::try_from(most).unwrap_or(Timespec { tv_sec: 0, tv_nsec: 50_000_000 });
        match rustix::event::poll(&mut [PollFd::new(pidfd, PollFlags::IN)], Some(&timeout)) {
            Ok(0) => {}
            Ok(_) => self.0 = None,
            Err(_) => std::thread::sleep(most),
        }
    }
}

/// Whether the job is over its disk or file limit, as a note saying how.
/// A tree that cannot be measured within its bounds counts as over.
fn disk_verdict(paths: &JobPaths, limits: &Limits) -> Option<String> {
    // Allocated blocks too: fallocate(FALLOC_FL_KEEP_SIZE) grows a file's blocks, not its length.
    let taken = |m: fs::Metadata| m.len().max(m.blocks().saturating_mul(512));
    let logs = [paths.stdout(), paths.stderr()].iter().map(|p| fs::metadata(p).map_or(0, taken)).sum::<u64>();
    let mut bytes = logs;
    let mut entries_left = limits.files_max;
    for dir in [paths.work(), paths.output()] {
        let mut dir_bytes = 0_u64;
        match untrusted::walk(&dir, entries_left, |entry| dir_bytes = dir_bytes.saturating_add(entry.bytes)) {
            Ok(seen) => {
                entries_left -= seen;
                bytes = bytes.saturating_add(dir_bytes);
            }
            Err(Unmeasurable::TooManyEntries(_)) => {
                return Some(format!("it made more than {} files and directories", limits.files_max));
            }
            Err(e) => return Some(format!("its files cannot be measured ({e}), which counts as over the limit")),
        }
    }
    (bytes > limits.disk_max_mib * MIB).then(|| format!("it wrote more than {} MiB", limits.disk_max_mib))
}

/// Stops the job: SIGTERM to the program's processes (not to bubblewrap,
/// whose death would kill them at once and make the grace period a lie),
/// SIGKILL to every process of the job after `grace`.
fn stop_job(child: &mut Child, cgroup: Option<&JobCgroup>, sandboxed: bool, grace: Duration) -> ExitStatus {
    let leader = i32::try_from(child.id()).unwrap_or(i32::MAX);
    let program = || match cgroup {
        Some(cgroup) if sandboxed => program_pids(&cgroup.members(), leader),
        Some(cgroup) => cgroup.members(),
        None => vec![-leader], // its process group
    };
    for pid in program() {
        signal(pid, libc::SIGTERM);
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
    signal(-leader, libc::SIGKILL);
    child.wait().unwrap_or_else(|_| ExitStatus::from_raw(libc::SIGKILL))
}

fn signal(pid: i32, signal: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(pid, signal);
    }
}

/// The processes of `members` that are the program's, not bubblewrap's:
/// neither `bwrap` itself nor its child, the sandbox's pid 1.
fn program_pids(members: &[i32], bwrap: i32) -> Vec<i32> {
    members.iter().copied().filter(|&pid| pid != bwrap && parent_of(pid) != Some(bwrap)).collect()
}

/// A process's parent, from `/proc/<pid>/stat` (read after the last `)`,
/// since the command name before it is the program's to choose).
fn parent_of(pid: i32) -> Option<i32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(1)?.parse().ok()
}

/// How a job's program ended, with what the supervisor saw of it.
#[derive(Debug, Clone)]
struct End {
    exit: ExitStatus,
    /// Why the supervisor stopped it, if it did.
    stop: Option<Stop>,
    /// Whether the kernel killed a process of the job for memory.
    oom_killed: bool,
    /// How it broke the disk or file limit, measured after it ended.
    disk: Option<String>,
    /// What bubblewrap said when it failed before the program started.
    sandbox_failed: Option<String>,
    /// How full the host's disk under the job was when it ended, if full.
    host_full: Option<String>,
    /// What the program's log shows it died of.
    cause: Option<Cause>,
}

/// What a job's end means, and the rule that decided it.
#[derive(Debug, Clone, PartialEq)]
struct Verdict {
    outcome: JobOutcome,
    /// What the supervisor has to say about it.
    note: Option<String>,
    /// The rule that decided the outcome, when one did (a plain exit decides by itself).
    rule: Option<String>,
    /// What the rule matched: the log's line, or else the note.
    matched: Option<String>,
}

impl Verdict {
    fn new(outcome: JobOutcome, rule: &str, note: Option<String>) -> Verdict {
        Verdict { outcome, matched: note.clone(), note, rule: Some(rule.to_owned()) }
    }
}

/// What the job's end means. bubblewrap reports a program killed by signal
/// `n` as exit code `128 + n`.
fn classify(end: &End, request: &JobRequest) -> Verdict {
    let disk = |note: &str| {
        Verdict::new(JobOutcome::LimitExceeded { limit: Limit::Disk }, "disk-limit", Some(format!("stopped: {note}")))
    };
    match &end.stop {
        Some(Stop::TimedOut) => {
            let note = format!("stopped at the time limit of {} s", request.time_limit_secs);
            return Verdict::new(JobOutcome::TimedOut, "time-limit", Some(note));
        }
        Some(Stop::Processes) => {
            let note = format!("stopped: it tried to run more than {} processes", request.limits.pids_max);
            return Verdict::new(JobOutcome::LimitExceeded { limit: Limit::Processes }, "pids-limit", Some(note));
        }
        Some(Stop::Disk(note)) => return disk(note),
        Some(Stop::Terminated) => {
            let outcome = JobOutcome::Interrupted { detail: Detail::new("terminated on request") };
            return Verdict::new(outcome, "terminated", None);
        }
        None => {}
    }
    if end.oom_killed {
        let note = format!("killed by the kernel at the memory limit of {} MiB", request.memory_limit_mib);
        return Verdict::new(JobOutcome::OutOfMemory { resource: Resource::HostMemory }, "cgroup-oom-kill", Some(note));
    }
    if let Some(note) = &end.disk {
        return disk(note); // also when the program ignored EFBIG and exited by itself
    }
    // Within its limits, a job that fails on a full disk failed for the host's want of space.
    if let (Some(full), false) = (&end.host_full, end.exit.success()) {
        let detail = Detail::new(format!("the host's disk filled up while it ran: {full}"));
        return Verdict::new(JobOutcome::Interrupted { detail }, "host-disk-full", None);
    }
    if let Some(said) = &end.sandbox_failed {
        let detail = Detail::new(format!("the sandbox could not start: {said}"));
        return Verdict::new(JobOutcome::Interrupted { detail }, "sandbox-failed", None);
    }
    if let Some(cause) = &end.cause {
        let note = format!("its log shows it ran out of {} ({}): {}", cause.resource.as_str(), cause.rule, cause.line);
        let outcome = JobOutcome::OutOfMemory { resource: cause.resource.resource() };
        return Verdict { matched: Some(cause.line.clone()), ..Verdict::new(outcome, &cause.rule, Some(note)) };
    }
    let exit = end.exit;
    let signal = exit.signal().or_else(|| exit.code().filter(|c| (129..=192).contains(c)).map(|c| c - 128));
    let plain = |outcome| Verdict { outcome, note: None, rule: None, matched: None };
    match (exit.code(), signal) {
        (Some(0), _) => plain(JobOutcome::Succeeded),
        (Some(GPU_OOM_EXIT_CODE), _) => {
            let note = format!("it exited with code {GPU_OOM_EXIT_CODE}, the documented code of a GPU out-of-memory");
            Verdict::new(JobOutcome::OutOfMemory { resource: Resource::GpuMemory }, "exit-code-86", Some(note))
        }
        (_, Some(libc::SIGXFSZ)) => {
            let note = "it was killed by SIGXFSZ, writing past the file size limit".to_owned();
            Verdict::new(JobOutcome::LimitExceeded { limit: Limit::Disk }, "file-size-limit", Some(note))
        }
        (_, Some(_)) => plain(JobOutcome::Crashed { exit_code: None }),
        (code, None) => plain(JobOutcome::Crashed { exit_code: code }),
    }
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
            limits: Limits { pids_max: 128, disk_max_mib: 256, files_max: 1000, kill_grace_secs: 2 },
            isolation: Isolation::Sandbox,
            signatures: vec![],
        }
    }

    fn exited(code: i32) -> ExitStatus {
        ExitStatus::from_raw(code << 8)
    }

    fn end(exit: ExitStatus, stop: Option<Stop>, oom_killed: bool) -> End {
        End { exit, stop, oom_killed, disk: None, sandbox_failed: None, host_full: None, cause: None }
    }

    fn outcome(exit: ExitStatus, stop: Option<Stop>, oom_killed: bool) -> JobOutcome {
        classify(&end(exit, stop, oom_killed), &request()).outcome
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
        let Verdict { outcome, note, rule, .. } = classify(&end(killed, Some(Stop::Processes), false), &request());
        assert_eq!(rule.as_deref(), Some("pids-limit"));
        assert_eq!(outcome, JobOutcome::LimitExceeded { limit: Limit::Processes });
        assert_eq!(note.as_deref(), Some("stopped: it tried to run more than 128 processes"));
        assert!(matches!(self::outcome(killed, Some(Stop::Terminated), false), JobOutcome::Interrupted { .. }));
    }

    #[test]
    fn over_the_disk_limit_is_the_limit_even_after_a_clean_exit() {
        let ended = End { disk: Some("it wrote more than 256 MiB".into()), ..end(exited(0), None, false) };
        let Verdict { outcome, note, .. } = classify(&ended, &request());
        assert_eq!(outcome, JobOutcome::LimitExceeded { limit: Limit::Disk }, "a program that ignored EFBIG");
        assert_eq!(note.as_deref(), Some("stopped: it wrote more than 256 MiB"));
    }

    #[test]
    fn a_job_that_fails_on_a_full_host_disk_is_interrupted_unless_over_its_own_limit() {
        let full = Some("12 KiB free under /data/jobs/ef-a-public-a1".to_owned());
        let ended = End { host_full: full.clone(), ..end(exited(1), None, false) };
        let verdict = classify(&ended, &request());
        assert_eq!(verdict.rule.as_deref(), Some("host-disk-full"));
        let JobOutcome::Interrupted { detail } = verdict.outcome else { panic!("not interrupted") };
        assert!(detail.as_str().ends_with("filled up while it ran: 12 KiB free under /data/jobs/ef-a-public-a1"));
        let over = End { disk: Some("it wrote more than 256 MiB".into()), host_full: full.clone(), ..ended };
        assert_eq!(classify(&over, &request()).outcome, JobOutcome::LimitExceeded { limit: Limit::Disk });
        let succeeded = End { host_full: full, ..end(exited(0), None, false) };
        assert_eq!(classify(&succeeded, &request()).outcome, JobOutcome::Succeeded);
    }

    #[test]
    fn a_sandbox_that_could_not_start_is_not_the_submissions_crash() {
        let said = "bwrap: Can't find source path /x: No such file or directory".to_owned();
        let ended = End { sandbox_failed: Some(said), ..end(exited(1), None, false) };
        let JobOutcome::Interrupted { detail } = classify(&ended, &request()).outcome else {
            panic!("not interrupted")
        };
        assert!(detail.as_str().starts_with("the sandbox could not start: bwrap: "), "{detail}");
    }

    #[test]
    fn parents_are_read_past_a_hostile_command_name() {
        assert_eq!(parent_of(std::process::id() as i32), Some(std::os::unix::process::parent_id() as i32));
        // The command name is the program's file name: one that forges the fields after it.
        let dir = tempfile::tempdir().unwrap();
        let forged = dir.path().join(") R 1 1");
        fs::copy("/bin/sleep", &forged).unwrap();
        let mut child = std::process::Command::new(&forged).arg("5").spawn().unwrap();
        let pid = child.id() as i32;
        let seen = parent_of(pid);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(seen, Some(std::process::id() as i32), "not fooled by the name");
        assert!(!program_pids(&[2], 2).contains(&2), "bubblewrap itself is not the program");
    }
}
