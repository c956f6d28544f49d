//! The system calls a job may not make, as seccomp programs that
//! bubblewrap installs (`--add-seccomp-fd`) right before the job's program
//! starts.
//!
//! Namespaces already keep a job from the host; these close what a shared
//! kernel still offers a hostile program: the keyrings (`keyctl`,
//! `add_key`, `request_key`), new user namespaces (`clone`/`unshare` with
//! a `CLONE_NEW*` flag, `setns`), io_uring, `bpf`, `perf_event_open`,
//! `ptrace` and `process_vm_*`, mounts, kernel modules, kexec, and
//! `fallocate` with a mode (which takes disk blocks no size limit sees).
//! (A job's processes share one uid, so they can still open each other's
//! `/proc/<pid>/mem`, inside their own pid namespace only.) They fail with `EPERM`; `clone3`, whose flags a filter cannot
//! read, fails with `ENOSYS` so that the C library falls back to `clone`.
//! On x86_64, the x32 ABI (system call numbers with bit 30 set, which
//! would dodge a list of numbers) fails with `ENOSYS` as a whole.

use std::collections::BTreeMap;
use std::io::{self, Seek, SeekFrom, Write};
use std::os::fd::OwnedFd;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};

/// The calls denied outright.
const DENIED: &[libc::c_long] = &[
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_setns,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_open_by_handle_at,
    libc::SYS_userfaultfd,
    libc::SYS_syslog,
    libc::SYS_acct,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_reboot,
];

/// The calls denied when their flags (argument 0) ask for a new namespace.
const DENIED_WITH_NEW_NAMESPACE: &[libc::c_long] = &[libc::SYS_clone, libc::SYS_unshare];

/// Every `CLONE_NEW*` flag.
const NAMESPACE_FLAGS: &[libc::c_int] = &[
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWNS,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWCGROUP,
    0x80, // CLONE_NEWTIME
];

/// Why the filters could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// This architecture has no filter.
    #[error("no seccomp filter is defined for {0}: jobs cannot be confined on this architecture")]
    Architecture(&'static str),
    /// The filter compiler refused the rules (a bug).
    #[error("seccomp filter: {0}")]
    Compile(#[from] seccompiler::BackendError),
    /// The filter could not be handed to bubblewrap.
    #[error("seccomp filter: {0}")]
    Io(#[from] io::Error),
}

fn arch() -> Result<TargetArch, SeccompError> {
    TargetArch::try_from(std::env::consts::ARCH).map_err(|_| SeccompError::Architecture(std::env::consts::ARCH))
}

/// The programs, compiled: the `EPERM` list, then the `ENOSYS` list.
pub fn programs() -> Result<Vec<BpfProgram>, SeccompError> {
    let eperm = SeccompAction::Errno(libc::EPERM as u32);
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = DENIED.iter().map(|&nr| (nr, vec![])).collect();
    for &nr in DENIED_WITH_NEW_NAMESPACE {
        let per_flag = NAMESPACE_FLAGS.iter().map(|&flag| {
            let flag = u64::from(flag as u32);
            let condition = SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::MaskedEq(flag), flag)?;
            SeccompRule::new(vec![condition])
        });
        rules.insert(nr, per_flag.collect::<Result<_, _>>()?);
    }
    // fallocate with a mode (FALLOC_FL_KEEP_SIZE above all) takes disk
    // blocks that neither RLIMIT_FSIZE nor a file's length shows.
    let with_mode = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, 0)?;
    rules.insert(libc::SYS_fallocate, vec![SeccompRule::new(vec![with_mode])?]);
    let denied = SeccompFilter::new(rules, SeccompAction::Allow, eperm, arch()?)?;
    let enosys = SeccompAction::Errno(libc::ENOSYS as u32);
    let absent = SeccompFilter::new([(libc::SYS_clone3, vec![])].into(), SeccompAction::Allow, enosys, arch()?)?;
    let mut programs = vec![BpfProgram::try_from(denied)?, BpfProgram::try_from(absent)?];
    if cfg!(target_arch = "x86_64") {
        programs.push(x32_guard());
    }
    Ok(programs)
}

/// Fails every x32 system call with `ENOSYS`.
fn x32_guard() -> BpfProgram {
    const X32_SYSCALL_BIT: u32 = 0x4000_0000;
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    let op = |code: u32| u16::try_from(code).unwrap_or_default();
    let statement = |code, k| seccompiler::sock_filter { code: op(code), jt: 0, jf: 0, k };
    let jump = |code, k, jt, jf| seccompiler::sock_filter { code: op(code), jt, jf, k };
    vec![
        statement(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 4), // seccomp_data.arch
        jump(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K, AUDIT_ARCH_X86_64, 0, 3),
        statement(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0), // seccomp_data.nr
        jump(libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K, X32_SYSCALL_BIT, 0, 1),
        statement(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
        statement(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
    ]
}

/// The programs, each in an anonymous file positioned at its start, for
/// bubblewrap to read.
pub fn program_files() -> Result<Vec<OwnedFd>, SeccompError> {
    let mut files = Vec::new();
    for program in programs()? {
        let bytes: Vec<u8> = program
            .iter()
            .flat_map(|op| {
                let mut raw = [0_u8; 8];
                raw[..2].copy_from_slice(&op.code.to_ne_bytes());
                raw[2] = op.jt;
                raw[3] = op.jf;
                raw[4..].copy_from_slice(&op.k.to_ne_bytes());
                raw
            })
            .collect();
        let fd =
            rustix::fs::memfd_create("evalflow-seccomp", rustix::fs::MemfdFlags::CLOEXEC).map_err(io::Error::from)?;
        let mut file = std::fs::File::from(fd);
        file.write_all(&bytes)?;
        file.seek(SeekFrom::Start(0))?;
        files.push(OwnedFd::from(file));
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filters_compile_for_this_machine() {
        let programs = programs().unwrap();
        assert!(programs.len() >= 2);
        assert!(programs[0].len() > DENIED.len(), "every denied call is checked");
        assert_eq!(program_files().unwrap().len(), programs.len());
    }
}
