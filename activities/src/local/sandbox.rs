//! How a job's program is started: inside bubblewrap (no network, only the
//! system's read-only directories, the test set read-only at `/input`, its
//! scratch copy at `/work`, its output at `/output`), or, when the operator
//! explicitly allows it, unconfined.

use std::ffi::{CString, OsString};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use super::job::{JobPaths, JobRequest};
use crate::submission::GPU_OOM_EXIT_CODE;

/// The uid and gid a root supervisor drops to before starting the sandbox,
/// so that host files owned by root stay out of the submission's reach.
pub const NOBODY: u32 = 65534;

/// The `PATH` inside the sandbox.
const SANDBOX_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// The size of the sandbox's `/tmp` (memory-backed, charged to the job's memory).
const TMP_BYTES: u64 = 64 * 1024 * 1024;

/// How jobs are isolated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    /// bubblewrap namespaces: the default, required for untrusted code.
    Sandbox,
    /// No isolation: only for code the operator trusts (`--no-sandbox`).
    Unconfined,
}

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

/// Checks that a sandbox can be made here, by making one that runs `true`.
pub fn probe() -> Result<PathBuf, SandboxError> {
    let bwrap = find_bwrap().ok_or(SandboxError::NotInstalled)?;
    let mut command = Command::new(&bwrap);
    command.args(system_binds()).args(["--unshare-all", "--unshare-user", "--die-with-parent", "--", "true"]);
    drop_root(&mut command);
    let output = command.output().map_err(|e| SandboxError::Unusable(e.to_string()))?;
    if !output.status.success() {
        return Err(SandboxError::Unusable(String::from_utf8_lossy(&output.stderr).trim().to_owned()));
    }
    Ok(bwrap)
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

/// The command that runs `argv` for the job, isolated as `request` says.
pub fn job_command(bwrap: Option<&Path>, request: &JobRequest, paths: &JobPaths, argv: &[String]) -> Command {
    match (request.isolation, bwrap) {
        (Isolation::Sandbox, Some(bwrap)) => {
            let mut command = Command::new(bwrap);
            command.args(system_binds());
            command.args(["--unshare-all", "--unshare-user", "--uid", "1000", "--gid", "1000"]);
            command.args(["--die-with-parent", "--new-session", "--hostname", "sandbox"]);
            command.args(["--proc", "/proc", "--dev", "/dev", "--size", &TMP_BYTES.to_string(), "--tmpfs", "/tmp"]);
            command.arg("--bind").arg(paths.work()).arg("/work");
            command.arg("--ro-bind").arg(&request.input_dir).arg("/input");
            command.arg("--bind").arg(paths.output()).arg("/output");
            command.args([
                "--chdir",
                "/work",
                "--clearenv",
                "--setenv",
                "PATH",
                SANDBOX_PATH,
                "--setenv",
                "HOME",
                "/work",
            ]);
            for (key, value) in job_env(request, Path::new("/input"), Path::new("/output")) {
                command.args(["--setenv", &key, &value]);
            }
            command.arg("--").args(argv);
            drop_root(&mut command);
            command
        }
        (Isolation::Unconfined, _) | (Isolation::Sandbox, None) => {
            let mut command = Command::new(&argv[0]);
            command.args(&argv[1..]).current_dir(paths.work()).env_clear();
            command.env("PATH", std::env::var_os("PATH").unwrap_or_else(|| SANDBOX_PATH.into()));
            command.env("HOME", paths.work()).envs(job_env(request, &request.input_dir, &paths.output()));
            command
        }
    }
}

/// A root caller drops to nobody before starting bubblewrap.
fn drop_root(command: &mut Command) {
    // SAFETY: geteuid(2) has no preconditions.
    #[allow(unsafe_code)]
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        command.uid(NOBODY).gid(NOBODY);
    }
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
}

impl PreExec {
    /// Joins the cgroups whose `cgroup.procs` are given and caps file sizes.
    pub fn new(cgroup_procs: &[PathBuf], file_size_max: u64) -> std::io::Result<PreExec> {
        let cgroup_procs =
            cgroup_procs.iter().map(|p| std::fs::OpenOptions::new().write(true).open(p)).collect::<Result<_, _>>()?;
        Ok(PreExec { cgroup_procs, file_size_max })
    }

    /// Installs the steps on `command`: join the cgroups, cap the size of files
    /// written, start a new session, die with the supervisor.
    pub fn install(self, command: &mut Command) {
        let fds: Vec<i32> = self.cgroup_procs.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
        let limit = libc::rlimit { rlim_cur: self.file_size_max, rlim_max: self.file_size_max };
        let zero = CString::from(c"0");
        // The files stay open until spawn returns: keep them alive in the closure.
        let files = self.cgroup_procs;
        // SAFETY: the closure only makes async-signal-safe system calls
        // (write, setrlimit, setsid, prctl) on data prepared before the fork.
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
                Ok(())
            });
        }
    }
}
