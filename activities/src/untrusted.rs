//! Reading what untrusted code wrote, without trusting it.
//!
//! A job's files are hostile: a link may point at the private labels or at
//! another team's predictions, a FIFO may block its reader for ever, a
//! `/proc` file may stat as 0 bytes and never end, and a tree may hold more
//! entries, or deeper paths, than a path-based walk can follow. So every
//! host-side read of them here:
//!
//! - opens beneath a directory the engine trusts, relative to its fd, through
//!   no symbolic link and across no mount (`openat2` with `RESOLVE_BENEATH`,
//!   `RESOLVE_NO_SYMLINKS`, `RESOLVE_NO_MAGICLINKS`, `RESOLVE_NO_XDEV`),
//!   without blocking (`O_NONBLOCK`);
//! - accepts only a regular file, and for contents that are scored, one
//!   with a single link;
//! - reads at most the cap + 1 bytes from the fd, whatever `stat` says.
//!
//! Walks are fd-relative too, and fail closed: a tree that cannot be
//! measured within its bounds is [`Unmeasurable`], which a limit counts as
//! over.

use std::ffi::CStr;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags, ResolveFlags, Stat};
use rustix::io::Errno;

/// The deepest directory a walk enters (each level holds one open fd).
pub const DEPTH_MAX: usize = 64;

/// Why a file a job wrote is not read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// It is a symbolic link, or one lies on its path.
    #[error("is a symbolic link (or lies behind one): write it as a regular file")]
    Link,
    /// A FIFO, socket, device or directory.
    #[error("is not a regular file: write it as a regular file")]
    NotRegular,
    /// It has other names (a hard link).
    #[error("has other hard links: write it as a new regular file")]
    HardLinked,
    /// Its path leaves the job's directory.
    #[error("lies outside the job's directory")]
    Outside,
}

/// What a capped read of a job's file found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Contents {
    /// No such file.
    Missing,
    /// A file that must not be read.
    Refused(Refusal),
    /// More than the cap.
    TooLarge {
        /// At least this many bytes.
        bytes: u64,
    },
    /// Its bytes, at most the cap.
    Found(Vec<u8>),
}

fn open_dir(dir: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(dir, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?)
}

/// Opens the regular file `relative` beneath `dir` without following a
/// link or blocking; `Err(Ok(..))` says why it was not opened.
fn open_regular(dir: &Path, relative: &Path) -> io::Result<Result<(File, Stat), Option<Refusal>>> {
    let base = match open_dir(dir) {
        Ok(base) => base,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Err(None)),
        Err(e) => return Err(e),
    };
    let how = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS | ResolveFlags::NO_XDEV;
    let flags = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK | OFlags::NOFOLLOW;
    let fd = match rustix::fs::openat2(&base, relative, flags, Mode::empty(), how) {
        Ok(fd) => fd,
        Err(Errno::NOENT | Errno::NOTDIR) => return Ok(Err(None)),
        Err(Errno::LOOP) => return Ok(Err(Some(Refusal::Link))),
        Err(Errno::XDEV) => return Ok(Err(Some(Refusal::Outside))),
        Err(Errno::NXIO | Errno::ISDIR) => return Ok(Err(Some(Refusal::NotRegular))),
        Err(e) => return Err(e.into()),
    };
    let stat = rustix::fs::fstat(&fd)?;
    if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
        return Ok(Err(Some(Refusal::NotRegular)));
    }
    Ok(Ok((File::from(fd), stat)))
}

/// Reads the regular, singly linked file `relative` beneath `dir`: at most
/// `cap` bytes, reading at most `cap + 1` to tell.
pub fn read_capped(dir: &Path, relative: &Path, cap: u64) -> io::Result<Contents> {
    let (file, stat) = match open_regular(dir, relative)? {
        Ok(opened) => opened,
        Err(None) => return Ok(Contents::Missing),
        Err(Some(refusal)) => return Ok(Contents::Refused(refusal)),
    };
    if stat.st_nlink != 1 {
        return Ok(Contents::Refused(Refusal::HardLinked));
    }
    let mut bytes = Vec::new();
    file.take(cap.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > cap {
        let size = u64::try_from(stat.st_size).unwrap_or(0);
        return Ok(Contents::TooLarge { bytes: size.max(cap + 1) });
    }
    Ok(Contents::Found(bytes))
}

/// The last `bytes` bytes of the regular file `relative` beneath `dir`,
/// lossily decoded; empty when it cannot be read safely.
pub fn read_tail(dir: &Path, relative: &Path, bytes: u64) -> String {
    let Ok(Ok((mut file, stat))) = open_regular(dir, relative) else { return String::new() };
    let size = u64::try_from(stat.st_size).unwrap_or(0);
    if file.seek(SeekFrom::Start(size.saturating_sub(bytes))).is_err() {
        return String::new();
    }
    let mut tail = Vec::new();
    let _ = file.take(bytes).read_to_end(&mut tail);
    String::from_utf8_lossy(&tail).into_owned()
}

/// Opens the regular file `relative` beneath `dir` for copying or hashing,
/// refusing links and special files; `None` when it does not exist.
pub fn open_file(dir: &Path, relative: &Path) -> io::Result<Option<(File, u64)>> {
    match open_regular(dir, relative)? {
        Ok((file, stat)) => Ok(Some((file, u64::try_from(stat.st_size).unwrap_or(0)))),
        Err(None) => Ok(None),
        Err(Some(refusal)) => Err(io::Error::other(format!("{} {refusal}", dir.join(relative).display()))),
    }
}

/// One entry a walk met.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its path relative to the walked directory.
    pub path: PathBuf,
    /// What it is (a symbolic link is reported, never followed).
    pub kind: FileType,
    /// The bytes it takes: its length, or its allocated blocks if more.
    pub bytes: u64,
}

/// Why a walk stopped before the end of the tree.
#[derive(Debug, thiserror::Error)]
pub enum Unmeasurable {
    /// More entries than the walk may read.
    #[error("it holds more than {0} files and directories")]
    TooManyEntries(u64),
    /// Directories nested deeper than [`DEPTH_MAX`].
    #[error("its directories nest deeper than {DEPTH_MAX} levels")]
    TooDeep,
    /// The walk failed.
    #[error("it cannot be read: {0}")]
    Io(#[from] io::Error),
}

impl From<Errno> for Unmeasurable {
    fn from(e: Errno) -> Self {
        Unmeasurable::Io(e.into())
    }
}

/// Walks the tree under `dir` relative to directory fds, never following a
/// link, calling `visit` on every entry; stops with an error after
/// `entries_max` entries or past [`DEPTH_MAX`] levels. Entries that vanish
/// while it walks (a running job deleting files) are skipped.
pub fn walk(dir: &Path, entries_max: u64, mut visit: impl FnMut(&Entry)) -> Result<u64, Unmeasurable> {
    let mut stack: Vec<(Dir, PathBuf)> = vec![(Dir::new(open_dir(dir)?)?, PathBuf::new())];
    let mut seen = 0_u64;
    while let Some(depth) = stack.len().checked_sub(1) {
        let (current, relative) = &mut stack[depth];
        let Some(entry) = current.read() else {
            stack.pop();
            continue;
        };
        let entry = entry?;
        let name: &CStr = entry.file_name();
        if name == c"." || name == c".." {
            continue;
        }
        seen += 1;
        if seen > entries_max {
            return Err(Unmeasurable::TooManyEntries(entries_max));
        }
        let stat = match rustix::fs::statat(current.fd()?, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => stat,
            Err(Errno::NOENT) => continue,
            Err(e) => return Err(e.into()),
        };
        let kind = FileType::from_raw_mode(stat.st_mode);
        let length = u64::try_from(stat.st_size).unwrap_or(0);
        let allocated = u64::try_from(stat.st_blocks).unwrap_or(0).saturating_mul(512);
        let path = relative.join(std::ffi::OsStr::from_bytes(name.to_bytes()));
        visit(&Entry { path: path.clone(), kind, bytes: length.max(allocated) });
        if kind == FileType::Directory {
            if depth + 1 >= DEPTH_MAX {
                return Err(Unmeasurable::TooDeep);
            }
            let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            match rustix::fs::openat(current.fd()?, name, flags, Mode::empty()) {
                Ok(fd) => stack.push((Dir::new(fd)?, path)),
                Err(Errno::NOENT) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(seen)
}

/// The bytes taken by everything under `dir`, walking at most `entries_max` entries.
pub fn tree_bytes(dir: &Path, entries_max: u64) -> Result<u64, Unmeasurable> {
    let mut total = 0_u64;
    walk(dir, entries_max, |entry| total = total.saturating_add(entry.bytes))?;
    Ok(total)
}
