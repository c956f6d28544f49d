//! How a job's program is started: inside bubblewrap (no network, only the
//! system's read-only directories, the test set read-only at `/input`, its
//! scratch copy at `/work`, its output at `/output`), or, when the operator
//! explicitly allows it, unconfined.
//!
//! The sandbox inherits nothing it was not given: bubblewrap starts with an
//! empty environment (its own pid 1 keeps the one it started with, readable
//! at `/proc/1/environ`), every fd above 2 is closed at exec but those
//! bubblewrap is handed on purpose, the job joins a fresh session keyring,
//! and a seccomp filter ([`super::seccomp`]) denies what namespaces leave
//! open. The job's directories are handed over as open fds
//! (`--bind-fd`), so a sandbox running as an unprivileged uid reaches them
//! under a data directory only the engine's user may enter.

use std::ffi::{CString, OsString};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use rustix::fs::{Mode, OFlags};

pub use super::job::Isolation;
use super::job::{JobPaths, JobRequest};
use super::seccomp;
use crate::submission::GPU_OOM_EXIT_CODE;

/// The uid and gid a root supervisor drops to before starting a probe
/// sandbox; jobs run as a uid of their own ([`super::uid`]).
pub const NOBODY: u32 = 65534;

/// What bubblewrap prints before its own errors: a sandbox that failed to
/// start, not a program that failed.
pub const BWRAP_ERROR_PREFIX: &str = "bwrap: ";

/// The `PATH` inside the sandbox.
const SANDBOX_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// The size of the sandbox's `/tmp` (memory-backed, charged to the job's memory).
const TMP_BYTES: u64 = 64 * 1024 * 1024;

/// Why the sandbox cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SandboxError {
    /// bubblewrap is not installed.
    #[error(
        "bubblewrap (bwrap) is not installed, and untrusted submissions must not run without a sandbox: \
         install it (apt-get install bubblewrap), or pass --no-sandbox to run them unconfined (only for code you trust)"
    )]
    NotInstalled,
    /// Job control groups cannot be created, so memory and process limits cannot be enforced.
    #[error(
        "{0}: jobs need a memory and a process limit over their whole process tree; run evalflow as root \
         on a host with cgroup memory and pids controllers, or pass --no-sandbox to run submissions unconfined"
    )]
    NoCgroups(String),
    /// A sandbox cannot reach the job directories or read a probe file in them.
    #[error(
        "a sandbox cannot use the job directories under {dir} ({problem}): keep the data directory on a \
         local file system that root can read, or pass --no-sandbox to run submissions unconfined"
    )]
    Unreachable {
        /// The jobs directory.
        dir: String,
        /// What went wrong.
        problem: String,
    },
    /// A directory on the way to the job directories or a test set that
    /// other users may not pass through.
    #[error(
        "{dir} is mode {mode:o}, so job sandboxes, which run as unprivileged users, cannot reach {target} \
         inside it: let other users pass through it (chmod o+x {dir}; they still cannot list it), \
         or keep the data directory elsewhere (for example under /srv or /var/lib)"
    )]
    Untraversable {
        /// The directory.
        dir: String,
        /// Its mode.
        mode: u32,
        /// What lies inside it.
        target: String,
    },
    /// The seccomp filter cannot be made.
    #[error("{0}")]
    Seccomp(String),
    /// bubblewrap is installed but cannot create namespaces here.
    #[error(
        "bubblewrap cannot create a sandbox on this machine ({0}): allow user namespaces \
         (sysctl kernel.unprivileged_userns_clone=1), or pass --no-sandbox to run submissions unconfined"
    )]
    Unusable(String),
}

/// Finds `bwrap` on the `PATH`.
pub fn find_bwrap() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join("bwrap")).find(|candidate| candidate.is_file())
}

/// Checks that a sandbox can be made here, as jobs are made: in a probe
/// directory under `jobs_dir`, handed over as fds, with the seccomp filter,
/// as an unprivileged uid; the probe reads a file from its `/input` and
/// writes one to its `/output`.
pub fn probe(jobs_dir: &Path) -> Result<PathBuf, SandboxError> {
    let bwrap = find_bwrap().ok_or(SandboxError::NotInstalled)?;
    let dir = jobs_dir.join(format!(".probe-{}", std::process::id()));
    let result = probe_in(&bwrap, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result.map(|()| bwrap)
}

fn probe_in(bwrap: &Path, dir: &Path) -> Result<(), SandboxError> {
    let unreachable = |problem: String| SandboxError::Unreachable { dir: dir.display().to_string(), problem };
    let (input, output) = (dir.join("input"), dir.join("output"));
    let setup = || -> std::io::Result<()> {
        std::fs::create_dir_all(&input)?;
        std::fs::create_dir_all(&output)?;
        std::fs::write(input.join("probe"), "probe\n")?;
        if is_root() {
            std::os::unix::fs::chown(&output, Some(NOBODY), Some(NOBODY))?;
        }
        Ok(())
    };
    setup().map_err(|e| unreachable(e.to_string()))?;
    let fds = SandboxFds::open(&input, &output, &output).map_err(|e| match e {
        OpenError::Seccomp(e) => SandboxError::Seccomp(e.to_string()),
        OpenError::Io(e) => unreachable(e.to_string()),
    })?;
    let script = "read line < /input/probe && echo \"$line\" > /output/probe";
    let mut command = Command::new(bwrap);
    command.env_clear().args(sandbox_args(&fds, "/output")).args(["--", "/bin/sh", "-c", script]);
    if is_root() {
        command.uid(NOBODY).gid(NOBODY);
    }
    PreExec::new(&[], u64::MAX, fds.raw()).map_err(|e| unreachable(e.to_string()))?.install(&mut command);
    let out = command.output().map_err(|e| SandboxError::Unusable(e.to_string()))?;
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    if !out.status.success() {
        let namespaces = stderr.contains("namespace") || stderr.contains("setting up uid map");
        return Err(if namespaces { SandboxError::Unusable(stderr) } else { unreachable(stderr) });
    }
    match std::fs::read_to_string(output.join("probe")) {
        Ok(text) if text == "probe\n" => Ok(()),
        other => Err(unreachable(format!("the probe did not write its output ({other:?}) {stderr}"))),
    }
}

/// Checks that an unprivileged user may pass through every directory on
/// the way to `target` (when jobs run as uids of their own, that is, when
/// this process is root).
pub fn check_reachable(target: &Path) -> Result<(), SandboxError> {
    use std::os::unix::fs::PermissionsExt;
    if !is_root() {
        return Ok(());
    }
    let real = target.canonicalize().unwrap_or_else(|_| target.to_path_buf());
    for dir in real.ancestors().collect::<Vec<_>>().into_iter().rev() {
        let Ok(metadata) = std::fs::metadata(dir) else { break };
        let mode = metadata.permissions().mode() & 0o7777;
        if metadata.is_dir() && mode & 0o001 == 0 {
            let (dir, target) = (dir.display().to_string(), target.display().to_string());
            return Err(SandboxError::Untraversable { dir, mode, target });
        }
    }
    Ok(())
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions.
    #[allow(unsafe_code)]
    let euid = unsafe { libc::geteuid() };
    euid == 0
}

/// The system directories, read-only, mirroring the host's layout (`/bin`
/// may be a directory or a link into `/usr`).
fn system_binds() -> Vec<OsString> {
    let mut args: Vec<OsString> = ["--ro-bind", "/usr", "/usr", "--ro-bind", "/etc", "/etc"].map(Into::into).to_vec();
    for dir in ["/bin", "/lib", "/lib64", "/sbin"] {
        match std::fs::read_link(dir) {
            Ok(target) => args.extend([OsString::from("--symlink"), target.into(), dir.into()]),
            Err(_) if Path::new(dir).is_dir() => args.extend(["--ro-bind", dir, dir].map(Into::into)),
            Err(_) => {}
        }
    }
    args
}

/// The environment every job sees.
pub fn job_env(request: &JobRequest, input: &Path, output: &Path) -> Vec<(String, String)> {
    vec![
        ("EVALFLOW_INPUT_DIR".into(), input.display().to_string()),
        ("EVALFLOW_OUTPUT_DIR".into(), output.display().to_string()),
        ("EVALFLOW_PROFILE".into(), request.profile.to_string()),
        ("EVALFLOW_MEMORY_LIMIT_MIB".into(), request.memory_limit_mib.to_string()),
        ("EVALFLOW_GPU_MEMORY_MIB".into(), request.gpu_memory_mib.to_string()),
        ("EVALFLOW_GPU_OOM_EXIT_CODE".into(), GPU_OOM_EXIT_CODE.to_string()),
        ("EVALFLOW_VCPUS".into(), request.vcpus.to_string()),
    ]
}

/// Why a sandbox's fds could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// A directory of the job.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The seccomp programs.
    #[error("{0}")]
    Seccomp(#[from] seccomp::SeccompError),
}

/// The open files a sandbox is handed: its directories and its seccomp programs.
#[derive(Debug)]
pub struct SandboxFds {
    work: OwnedFd,
    input: OwnedFd,
    output: OwnedFd,
    seccomp: Vec<OwnedFd>,
}

impl SandboxFds {
    /// Opens the directories mounted at `/input` (read-only), `/work` and
    /// `/output`, and the seccomp programs.
    pub fn open(input: &Path, work: &Path, output: &Path) -> Result<SandboxFds, OpenError> {
        let dir = |path: &Path| -> std::io::Result<OwnedFd> {
            let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
            rustix::fs::open(path, flags, Mode::empty())
                .map_err(|e| std::io::Error::other(format!("cannot open {}: {e}", path.display())))
        };
        Ok(SandboxFds {
            work: dir(work)?,
            input: dir(input)?,
            output: dir(output)?,
            seccomp: seccomp::program_files()?,
        })
    }

    /// The fds bubblewrap must inherit.
    pub fn raw(&self) -> Vec<RawFd> {
        let dirs = [&self.work, &self.input, &self.output].map(AsRawFd::as_raw_fd);
        dirs.into_iter().chain(self.seccomp.iter().map(AsRawFd::as_raw_fd)).collect()
    }
}

/// bubblewrap's arguments for a sandbox over `fds`, its working directory `chdir`.
fn sandbox_args(fds: &SandboxFds, chdir: &str) -> Vec<OsString> {
    let fd = |fd: &OwnedFd| OsString::from(fd.as_raw_fd().to_string());
    let mut args = system_binds();
    args.extend(
        ["--unshare-all", "--unshare-user", "--disable-userns", "--uid", "1000", "--gid", "1000"].map(Into::into),
    );
    args.extend(["--die-with-parent", "--new-session", "--hostname", "sandbox"].map(Into::into));
    args.extend(["--proc", "/proc", "--dev", "/dev"].map(Into::into));
    args.extend(["--size".into(), TMP_BYTES.to_string().into(), "--tmpfs".into(), "/tmp".into()]);
    args.extend([OsString::from("--bind-fd"), fd(&fds.work), "/work".into()]);
    args.extend([OsString::from("--ro-bind-fd"), fd(&fds.input), "/input".into()]);
    args.extend([OsString::from("--bind-fd"), fd(&fds.output), "/output".into()]);
    args.extend(["--remount-ro", "/", "--chdir", chdir, "--clearenv"].map(Into::into));
    args.extend(["--setenv", "PATH", SANDBOX_PATH, "--setenv", "HOME", "/work"].map(Into::into));
    for program in &fds.seccomp {
        args.extend([OsString::from("--add-seccomp-fd"), fd(program)]);
    }
    args
}

/// The command that runs `argv` for the job, isolated as `request` says:
/// in bubblewrap over `sandbox`'s fds, as its uid when one is given, or
/// unconfined.
pub fn job_command(
    bwrap: Option<&Path>,
    request: &JobRequest,
    paths: &JobPaths,
    argv: &[String],
    sandbox: Option<(&SandboxFds, Option<u32>)>,
) -> Command {
    match (request.isolation, bwrap, sandbox) {
        (Isolation::Sandbox, Some(bwrap), Some((fds, uid))) => {
            let mut command = Command::new(bwrap);
            command.env_clear().args(sandbox_args(fds, "/work"));
            for (key, value) in job_env(request, Path::new("/input"), Path::new("/output")) {
                command.args(["--setenv", &key, &value]);
            }
            command.arg("--").args(argv);
            if let Some(uid) = uid {
                command.uid(uid).gid(uid);
            }
            command
        }
        _ => {
            let mut command = Command::new(&argv[0]);
            command.args(&argv[1..]).current_dir(paths.work()).env_clear();
            command.env("PATH", std::env::var_os("PATH").unwrap_or_else(|| SANDBOX_PATH.into()));
            command.env("HOME", paths.work()).envs(job_env(request, &request.input_dir, &paths.output()));
            command
        }
    }
}

/// Makes `command` (the supervisor) start with nothing of its caller's
/// environment but `PATH`. The fds above 2 that the engine did not open
/// itself (its own are all close-on-exec), such as those its parent left
/// open, the supervisor marks close-on-exec first thing
/// ([`inherited_fds_close_on_exec`]), before it runs anything else. Doing it
/// here, in a closure between fork and exec, would make std fork the engine,
/// copying its page tables (about 15 ms a launch with a few hundred MiB
/// mapped in 4 KiB pages); without a closure std spawns with `posix_spawn`,
/// which copies nothing.
pub fn inherit_nothing(command: &mut Command) {
    command.env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        command.env("PATH", path);
    }
}

/// Marks every fd above 2 of this process close-on-exec: what a supervisor
/// inherited reaches none of its children.
pub fn inherited_fds_close_on_exec() -> std::io::Result<()> {
    close_fds_from_3(&[])
}

/// Marks every fd above 2 close-on-exec, except those in `keep`. Also called
/// between fork and exec: only async-signal-safe calls.
fn close_fds_from_3(keep: &[RawFd]) -> std::io::Result<()> {
    // SAFETY: close_range(2) and fcntl(2) only change fd flags.
    #[allow(unsafe_code)]
    unsafe {
        if libc::syscall(libc::SYS_close_range, 3_u32, u32::MAX, libc::CLOSE_RANGE_CLOEXEC) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        for &fd in keep {
            if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// The name of a command inside the sandbox, resolved the way the sandbox's
/// shell would; `None` when it does not exist there.
pub fn resolve(program: &str, work: &Path, isolation: Isolation) -> Option<PathBuf> {
    if program.contains('/') {
        let path = work.join(program.trim_start_matches("./"));
        return path.is_file().then_some(path);
    }
    let search = match isolation {
        Isolation::Sandbox => SANDBOX_PATH.to_owned(),
        Isolation::Unconfined => std::env::var("PATH").unwrap_or_else(|_| SANDBOX_PATH.to_owned()),
    };
    std::env::split_paths(&search).map(|dir| dir.join(program)).find(|p| p.is_file())
}

/// What the job's process does between fork and exec, prepared beforehand
/// because only async-signal-safe calls are allowed there.
pub struct PreExec {
    cgroup_procs: Vec<std::fs::File>,
    file_size_max: u64,
    keep: Vec<RawFd>,
}

impl PreExec {
    /// Joins the cgroups whose `cgroup.procs` are given, caps file sizes,
    /// and keeps only the fds in `keep` (besides 0, 1 and 2) across exec.
    pub fn new(cgroup_procs: &[PathBuf], file_size_max: u64, keep: Vec<RawFd>) -> std::io::Result<PreExec> {
        let cgroup_procs =
            cgroup_procs.iter().map(|p| std::fs::OpenOptions::new().write(true).open(p)).collect::<Result<_, _>>()?;
        Ok(PreExec { cgroup_procs, file_size_max, keep })
    }

    /// Installs the steps on `command`: join the cgroups, cap the size of
    /// files written, start a new session, die with the supervisor, join a
    /// fresh session keyring, close every fd not kept.
    pub fn install(self, command: &mut Command) {
        let fds: Vec<i32> = self.cgroup_procs.iter().map(AsRawFd::as_raw_fd).collect();
        let limit = libc::rlimit { rlim_cur: self.file_size_max, rlim_max: self.file_size_max };
        let zero = CString::from(c"0");
        // The files stay open until spawn returns: keep them alive in the closure.
        let (files, keep) = (self.cgroup_procs, self.keep);
        // SAFETY: the closure only makes async-signal-safe system calls
        // (write, setrlimit, setsid, prctl, keyctl, close_range, fcntl) on
        // data prepared before the fork.
        #[allow(unsafe_code)]
        unsafe {
            command.pre_exec(move || {
                let _keep = &files;
                for &fd in &fds {
                    if libc::write(fd, zero.as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // A job never outlives its supervisor: a relaunch must not run beside it.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The engine's session keyring stays the engine's.
                let none: *const libc::c_char = std::ptr::null();
                if libc::syscall(libc::SYS_keyctl, libc::KEYCTL_JOIN_SESSION_KEYRING, none) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                close_fds_from_3(&keep)
            });
        }
    }
}
