//! A control group per job: a memory limit and a process limit over the
//! job's whole process tree, the kernel's count of OOM kills and of refused
//! forks, peak memory, and a way to kill every process of the job.
//!
//! Both layouts are supported: cgroup v1 (a hierarchy per controller, as on
//! hosts in hybrid mode) where the job's group is a child of the caller's,
//! and cgroup v2 (one unified hierarchy) where job groups live under
//! `/sys/fs/cgroup/evalflow` so that the parent has no processes of its own.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

const ROOT: &str = "/sys/fs/cgroup";
/// The CPU quota's period, in microseconds.
const CPU_PERIOD_US: u64 = 100_000;

/// Why a job's control group could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up the job's control group at {path}: {problem}")]
pub struct CgroupError {
    path: String,
    problem: String,
}

fn error(path: &Path, problem: impl ToString) -> CgroupError {
    CgroupError { path: path.display().to_string(), problem: problem.to_string() }
}

/// A job's control group(s).
#[derive(Debug)]
pub enum JobCgroup {
    /// cgroup v1: one group in the memory hierarchy, one in the pids hierarchy.
    V1 {
        /// The group in the memory hierarchy.
        memory: PathBuf,
        /// The group in the pids hierarchy.
        pids: PathBuf,
        /// The group in the cpu hierarchy, where the host has one.
        cpu: Option<PathBuf>,
    },
    /// cgroup v2: one group.
    V2 {
        /// The group.
        dir: PathBuf,
    },
}

/// The caller's group in the v1 hierarchy of `controller`, from /proc/self/cgroup.
fn v1_own_group(controller: &str) -> Option<PathBuf> {
    let table = fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = table.lines().find_map(|line| {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        controllers.split(',').any(|c| c == controller).then(|| path.trim_start_matches('/').to_owned())
    })?;
    Some(Path::new(ROOT).join(controller).join(path))
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(|e| error(path, e))
}

/// The value of `key` in a flat keyed file (`oom_kill 3`), 0 if absent.
fn keyed(path: &Path, key: &str) -> u64 {
    let text = fs::read_to_string(path).unwrap_or_default();
    text.lines().find_map(|line| line.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0)
}

fn number(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

impl JobCgroup {
    /// Creates the group `name` with the job's limits. A group left by a
    /// supervisor that died (its processes died with it) is removed first.
    /// Its CPU time is capped at `vcpus` CPUs, and as a group of its own it
    /// takes its fair share of a busy host, however many threads it runs.
    pub fn create(name: &str, memory_limit_mib: u64, pids_max: u32, vcpus: u32) -> Result<JobCgroup, CgroupError> {
        let leftover = JobCgroup::at(name);
        if leftover.dirs().iter().any(|dir| dir.exists()) {
            leftover.kill_all();
            leftover.remove();
        }
        let memory_bytes = (memory_limit_mib * 1024 * 1024).to_string();
        if let (Some(memory_parent), Some(pids_parent)) = (v1_own_group("memory"), v1_own_group("pids"))
            && memory_parent.join("memory.limit_in_bytes").exists()
        {
            let (memory, pids) = (memory_parent.join(name), pids_parent.join(name));
            for dir in [&memory, &pids] {
                fs::create_dir_all(dir).map_err(|e| error(dir, e))?;
            }
            write(&memory.join("memory.limit_in_bytes"), &memory_bytes)?;
            // Without swap accounting the file is absent; with it, no swapping past the limit.
            let _ = fs::write(memory.join("memory.memsw.limit_in_bytes"), &memory_bytes);
            write(&pids.join("pids.max"), &pids_max.to_string())?;
            let cpu = match v1_own_group("cpu") {
                Some(parent) if parent.join("cpu.cfs_quota_us").exists() => {
                    let cpu = parent.join(name);
                    fs::create_dir_all(&cpu).map_err(|e| error(&cpu, e))?;
                    write(&cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                    write(&cpu.join("cpu.cfs_quota_us"), &(u64::from(vcpus.max(1)) * CPU_PERIOD_US).to_string())?;
                    Some(cpu)
                }
                _ => None,
            };
            return Ok(JobCgroup::V1 { memory, pids, cpu });
        }
        let root = Path::new(ROOT);
        let controllers = fs::read_to_string(root.join("cgroup.controllers")).map_err(|e| error(root, e))?;
        if !controllers.split_whitespace().any(|c| c == "memory") {
            return Err(error(root, "no memory controller (neither cgroup v1 nor v2 offers one)"));
        }
        let base = root.join("evalflow");
        fs::create_dir_all(&base).map_err(|e| error(&base, e))?;
        let cpu = controllers.split_whitespace().any(|c| c == "cpu");
        let enable = if cpu { "+memory +pids +cpu" } else { "+memory +pids" };
        write(&root.join("cgroup.subtree_control"), enable)?;
        write(&base.join("cgroup.subtree_control"), enable)?;
        let dir = base.join(name);
        fs::create_dir_all(&dir).map_err(|e| error(&dir, e))?;
        write(&dir.join("memory.max"), &memory_bytes)?;
        let _ = fs::write(dir.join("memory.swap.max"), "0");
        write(&dir.join("pids.max"), &pids_max.to_string())?;
        if cpu {
            let quota = u64::from(vcpus.max(1)) * CPU_PERIOD_US;
            write(&dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
        }
        Ok(JobCgroup::V2 { dir })
    }

    /// Where the group `name` is, or would be.
    fn at(name: &str) -> JobCgroup {
        match (v1_own_group("memory"), v1_own_group("pids")) {
            (Some(memory), Some(pids)) if memory.join("memory.limit_in_bytes").exists() => {
                let cpu = v1_own_group("cpu").map(|cpu| cpu.join(name));
                JobCgroup::V1 { memory: memory.join(name), pids: pids.join(name), cpu }
            }
            _ => JobCgroup::V2 { dir: Path::new(ROOT).join("evalflow").join(name) },
        }
    }

    /// Removes the groups whose names start with `prefix` that `is_live`
    /// does not claim: those of jobs whose supervisor died before it could.
    pub fn remove_leftovers(prefix: &str, is_live: impl Fn(&str) -> bool) {
        let parents: Vec<PathBuf> = match JobCgroup::at("") {
            JobCgroup::V1 { memory, pids, cpu } => [Some(memory), Some(pids), cpu].into_iter().flatten().collect(),
            JobCgroup::V2 { dir } => vec![dir],
        };
        let mut names = std::collections::BTreeSet::new();
        for parent in parents {
            let Ok(entries) = fs::read_dir(&parent) else { continue };
            names.extend(entries.flatten().filter_map(|e| e.file_name().to_str().map(str::to_owned)));
        }
        for name in names.into_iter().filter(|n| n.starts_with(prefix)) {
            if !is_live(&name[prefix.len()..]) {
                let leftover = JobCgroup::at(&name);
                leftover.kill_all();
                leftover.remove();
            }
        }
    }

    fn dirs(&self) -> Vec<&PathBuf> {
        match self {
            JobCgroup::V1 { memory, pids, cpu } => {
                [Some(memory), Some(pids), cpu.as_ref()].into_iter().flatten().collect()
            }
            JobCgroup::V2 { dir } => vec![dir],
        }
    }

    /// The `cgroup.procs` files a process writes `0` to, to join the group.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        match self {
            JobCgroup::V1 { memory, pids, cpu } => {
                [Some(memory), Some(pids), cpu.as_ref()].into_iter().flatten().map(|d| d.join("cgroup.procs")).collect()
            }
            JobCgroup::V2 { dir } => vec![dir.join("cgroup.procs")],
        }
    }

    /// How many processes of the group the kernel killed for memory.
    pub fn oom_kills(&self) -> u64 {
        match self {
            JobCgroup::V1 { memory, .. } => keyed(&memory.join("memory.oom_control"), "oom_kill"),
            JobCgroup::V2 { dir } => keyed(&dir.join("memory.events"), "oom_kill"),
        }
    }

    /// How many forks the process limit refused.
    pub fn pids_limit_hits(&self) -> u64 {
        let dir = match self {
            JobCgroup::V1 { pids, .. } => pids,
            JobCgroup::V2 { dir } => dir,
        };
        keyed(&dir.join("pids.events"), "max")
    }

    /// The group's peak memory, in bytes, when the kernel keeps it.
    pub fn peak_memory_bytes(&self) -> Option<u64> {
        match self {
            JobCgroup::V1 { memory, .. } => number(&memory.join("memory.max_usage_in_bytes")),
            JobCgroup::V2 { dir } => number(&dir.join("memory.peak")),
        }
    }

    /// The pids of the group's processes.
    pub fn members(&self) -> Vec<i32> {
        let members: std::collections::BTreeSet<i32> = self
            .procs_files()
            .iter()
            .flat_map(|file| {
                fs::read_to_string(file).unwrap_or_default().lines().map(str::to_owned).collect::<Vec<_>>()
            })
            .filter_map(|line| line.trim().parse().ok())
            .collect();
        members.into_iter().collect()
    }

    /// Sends `signal` to every process of the group.
    pub fn signal_all(&self, signal: i32) {
        for pid in self.members() {
            // SAFETY: kill(2) has no memory-safety preconditions.
            #[allow(unsafe_code)]
            unsafe {
                libc::kill(pid, signal);
            }
        }
    }

    /// Kills every process of the group, waiting (bounded) until none is left.
    pub fn kill_all(&self) {
        if let JobCgroup::V2 { dir } = self {
            let _ = fs::write(dir.join("cgroup.kill"), "1");
        }
        // The last of a sandbox's processes is often still on its way out
        // when bubblewrap has ended: look again soon, then every 10 ms.
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        let mut pause = Duration::from_millis(1);
        while std::time::Instant::now() < deadline {
            if self.members().is_empty() {
                return;
            }
            self.signal_all(libc::SIGKILL);
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(10));
        }
        tracing::warn!("processes of {self:?} survived SIGKILL for 2 s");
    }

    /// Removes the group (it must be empty).
    pub fn remove(&self) {
        for dir in self.dirs() {
            if let Err(e) = fs::remove_dir(dir)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!("could not remove {}: {e}", dir.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    #[test]
    fn a_job_group_caps_memory_processes_and_cpu() {
        let name = format!("evalflow-test-{}", std::process::id());
        let Ok(group) = JobCgroup::create(&name, 64, 16, 3) else {
            return; // not root, or no cgroups here: the host checks say so at start-up
        };
        let read = |dir: &Path, file: &str| fs::read_to_string(dir.join(file)).unwrap().trim().to_owned();
        match &group {
            JobCgroup::V1 { memory, pids, cpu } => {
                assert_eq!(read(memory, "memory.limit_in_bytes"), (64 << 20).to_string());
                assert_eq!(read(pids, "pids.max"), "16");
                if let Some(cpu) = cpu {
                    assert_eq!(read(cpu, "cpu.cfs_quota_us"), "300000", "3 CPUs of a 100 ms period");
                }
            }
            JobCgroup::V2 { dir } => assert_eq!(read(dir, "memory.max"), (64 << 20).to_string()),
        }
        assert_eq!(group.procs_files().len(), group.dirs().len());
        group.remove();
        assert!(group.dirs().iter().all(|dir| !dir.exists()));
    }

    #[test]
    fn a_group_left_by_a_killed_supervisor_is_cleared_before_the_next_job() {
        let name = format!("evalflow-test-left-{}", std::process::id());
        let Ok(left) = JobCgroup::create(&name, 64, 16, 1) else {
            return; // not root, or no cgroups here
        };
        // A supervisor SIGKILLed mid-job: its program lives on in the group, which stays.
        let mut program = std::process::Command::new("sleep").arg("20").spawn().unwrap();
        for procs in left.procs_files() {
            fs::write(procs, program.id().to_string()).unwrap();
        }
        assert_eq!(left.members(), [program.id() as i32]);
        let again = JobCgroup::create(&name, 32, 8, 1).expect("the same name again, as the next attempt's job");
        assert!(program.wait().unwrap().signal().is_some(), "the stale job's program was killed");
        assert!(again.members().is_empty());
        match &again {
            JobCgroup::V1 { memory, .. } => {
                assert_eq!(fs::read_to_string(memory.join("memory.limit_in_bytes")).unwrap().trim(), "33554432");
            }
            JobCgroup::V2 { dir } => assert_eq!(fs::read_to_string(dir.join("memory.max")).unwrap().trim(), "33554432"),
        }
        again.remove();
    }
}
