//! Small filesystem tools: atomic writes, content digests, bounded copies
//! that open every file fd-relative and through no link.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use rustix::fs::FileType;
use sha2::{Digest, Sha256};

use crate::untrusted;

/// The most entries a submission directory may hold.
pub const DIR_ENTRIES_MAX: usize = 10_000;

/// Writes `bytes` to `path` so that a reader sees the old file or the new
/// one, never a part: write a temporary file, sync it, rename, sync the
/// directory. The file is the engine's user's alone (0600).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let name = path.file_name().ok_or_else(|| io::Error::other(format!("{} has no file name", path.display())))?;
    let tmp = path.with_file_name(format!(".{}.tmp.{}", name.to_string_lossy(), std::process::id()));
    let mut file = File::options().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The regular files under `dir`, as paths relative to it with their
/// sizes, sorted. Refuses symlinks and special files (a link could point a
/// sandbox at host files), trees of more than [`DIR_ENTRIES_MAX`] entries,
/// and more than `bytes_max` bytes in all.
pub fn list_files(dir: &Path, bytes_max: u64) -> io::Result<Vec<(PathBuf, u64)>> {
    let mut files = Vec::new();
    let mut refused = None;
    let mut total = 0_u64;
    untrusted::walk(dir, DIR_ENTRIES_MAX as u64, |entry| match entry.kind {
        FileType::Directory => {}
        FileType::RegularFile => {
            total = total.saturating_add(entry.bytes);
            files.push((entry.path.clone(), entry.bytes));
        }
        FileType::Symlink => refused = refused.take().or(Some((entry.path.clone(), "a symlink"))),
        _ => refused = refused.take().or(Some((entry.path.clone(), "a special file"))),
    })
    .map_err(|e| io::Error::other(format!("{}: {e}", dir.display())))?;
    if let Some((path, what)) = refused {
        return Err(io::Error::other(format!(
            "{} is {what}: submissions hold only plain files and directories",
            dir.join(path).display()
        )));
    }
    if total > bytes_max {
        return Err(io::Error::other(format!(
            "{} holds {} MiB, more than the {} MiB a submission may take",
            dir.display(),
            total.div_ceil(1 << 20),
            bytes_max >> 20
        )));
    }
    files.sort();
    Ok(files)
}

/// A SHA-256 digest of a directory's files: their relative paths and
/// contents. Every file is opened beneath `dir`, through no link.
pub fn dir_digest(dir: &Path, bytes_max: u64) -> io::Result<String> {
    let mut hasher = Sha256::new();
    for (relative, _) in list_files(dir, bytes_max)? {
        let (file, length) = open_listed(dir, &relative)?;
        digest_head(&mut hasher, &relative, length);
        io::copy(&mut file.take(length), &mut hasher)?;
    }
    Ok(hex(hasher))
}

/// Copies the files of `from` into `to` (created) as [`copy_dir`] does, and
/// returns the [`dir_digest`] of what it wrote: each file is read once, for
/// its copy and its digest.
pub fn copy_dir_digest(from: &Path, to: &Path, bytes_max: u64) -> io::Result<String> {
    let mut hasher = Sha256::new();
    copy_tree(from, to, bytes_max, Some(&mut hasher))?;
    Ok(hex(hasher))
}

/// Copies the files of `from` into `to` (created), each into `hasher` too
/// (after its [`digest_head`]). A file that changes length while it is
/// copied is refused.
fn copy_tree(from: &Path, to: &Path, bytes_max: u64, mut hasher: Option<&mut Sha256>) -> io::Result<()> {
    /// Hashes what it writes.
    struct Tee<'a>(&'a mut Sha256, File);
    impl Write for Tee<'_> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let written = self.1.write(buf)?;
            self.0.update(&buf[..written]);
            Ok(written)
        }
        fn flush(&mut self) -> io::Result<()> {
            self.1.flush()
        }
    }
    let mut parents = Parents::new(to)?;
    for (relative, _) in list_files(from, bytes_max)? {
        let target = to.join(&relative);
        parents.make(&target)?;
        let (file, length) = open_listed(from, &relative)?;
        let (mut source, mut copy) = ((&file).take(length), create_copy(&file, &target)?);
        let copied = match hasher.as_deref_mut() {
            Some(hasher) => {
                digest_head(hasher, &relative, length);
                io::copy(&mut source, &mut Tee(hasher, copy))?
            }
            // File to file: the kernel copies (copy_file_range), in no buffer of ours.
            None => io::copy(&mut source, &mut copy)?,
        };
        if copied != length || file.metadata()?.len() != length {
            return Err(io::Error::other(format!(
                "{} changed while it was copied: something writes to it; try again once nothing does",
                from.join(&relative).display()
            )));
        }
    }
    Ok(())
}

/// The directories files are copied into, under a root made first: each
/// made once, not once per file (a `mkdir` that finds its directory costs
/// the directory's lock, as much as one that makes it).
struct Parents<'a> {
    root: &'a Path,
    made: std::collections::HashSet<PathBuf>,
}

impl<'a> Parents<'a> {
    fn new(root: &'a Path) -> io::Result<Parents<'a>> {
        fs::create_dir_all(root)?;
        Ok(Parents { root, made: Default::default() })
    }

    /// Makes the directory `target` goes in, unless it is made.
    fn make(&mut self, target: &Path) -> io::Result<()> {
        match target.parent() {
            Some(parent) if parent != self.root && !self.made.contains(parent) => {
                fs::create_dir_all(parent)?;
                self.made.insert(parent.to_owned());
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// What a digest hashes of a file before its contents: its relative path and length.
fn digest_head(hasher: &mut Sha256, relative: &Path, length: u64) {
    let name = relative.to_string_lossy();
    hasher.update((name.len() as u64).to_le_bytes());
    hasher.update(name.as_bytes());
    hasher.update(length.to_le_bytes());
}

fn hex(hasher: Sha256) -> String {
    hasher.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// What is left on the filesystem under a directory, for writers that are not root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FreeSpace {
    /// Bytes free.
    pub bytes: u64,
    /// Whether no file can be made any more: no inodes are left.
    pub no_inodes: bool,
}

/// The free space under `dir`.
pub fn free_space(dir: &Path) -> io::Result<FreeSpace> {
    let stats = rustix::fs::statvfs(dir)?;
    Ok(FreeSpace {
        bytes: stats.f_bavail.saturating_mul(stats.f_frsize),
        no_inodes: stats.f_files > 0 && stats.f_favail == 0,
    })
}

/// Copies the files of `from` into `to` (created), executable ones
/// executable, refusing what [`list_files`] refuses; every file is opened
/// beneath `from`, through no link.
pub fn copy_dir(from: &Path, to: &Path, bytes_max: u64) -> io::Result<()> {
    copy_tree(from, to, bytes_max, None)
}

/// Gives `to` (created) the files of `from` as hard links to them, each
/// made read-only for everyone first (executable ones stay executable):
/// whoever neither owns them nor is root can read them and cannot change
/// them, so a sandbox of another uid reads the kept copy without the cost
/// of copying it. The files `copied` (relative to `from`) are copied
/// instead, and so is any that cannot be made read-only or linked (a
/// read-only or another file system, too many links). Returns the files
/// copied, relative to `to`. Refuses what [`list_files`] refuses; every
/// file is opened beneath `from`, through no link.
pub fn link_dir(from: &Path, to: &Path, copied: &[&Path]) -> io::Result<Vec<PathBuf>> {
    let mut parents = Parents::new(to)?;
    let mut copies = Vec::new();
    for (relative, _) in list_files(from, u64::MAX)? {
        let target = to.join(&relative);
        parents.make(&target)?;
        let (file, length) = open_listed(from, &relative)?;
        let link = !copied.contains(&relative.as_path()) && read_only(&file).is_ok();
        if !(link && fs::hard_link(from.join(&relative), &target).is_ok()) {
            copy_file(file, length, &target)?;
            copies.push(relative);
        }
    }
    Ok(copies)
}

/// Makes `file` read-only for everyone (0444, or 0555 if executable), unless it is.
fn read_only(file: &File) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = file.metadata()?.permissions().mode() & 0o7777;
    let wanted = if mode & 0o111 != 0 { 0o555 } else { 0o444 };
    if mode != wanted {
        file.set_permissions(fs::Permissions::from_mode(wanted))?;
    }
    Ok(())
}

/// Copies `length` bytes of `file` to `target`, executable if `file` is.
fn copy_file(file: File, length: u64, target: &Path) -> io::Result<()> {
    let mut copy = create_copy(&file, target)?;
    io::copy(&mut file.take(length), &mut copy)?;
    Ok(())
}

/// Creates (or empties) `target` for a copy of `file`, executable if `file` is.
fn create_copy(file: &File, target: &Path) -> io::Result<File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let executable = file.metadata()?.permissions().mode() & 0o111 != 0;
    let mode = if executable { 0o755 } else { 0o644 };
    File::options().write(true).create(true).truncate(true).mode(mode).open(target)
}

/// Opens a file [`list_files`] listed; it must still be a regular file.
fn open_listed(dir: &Path, relative: &Path) -> io::Result<(File, u64)> {
    untrusted::open_file(dir, relative)?
        .ok_or_else(|| io::Error::other(format!("{} vanished while it was read", dir.join(relative).display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn linked_files_are_the_kept_ones_read_only_and_the_copied_ones_single() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let kept = dir.path().join("kept");
        fs::create_dir_all(kept.join("sub")).unwrap();
        fs::write(kept.join("submission.toml"), "command = [\"true\"]").unwrap();
        fs::write(kept.join("sub/model.bin"), "weights").unwrap();
        let work = dir.path().join("work");
        fs::write(kept.join("run.sh"), "#!/bin/sh\n").unwrap();
        fs::set_permissions(kept.join("run.sh"), fs::Permissions::from_mode(0o700)).unwrap();
        let copied = link_dir(&kept, &work, &[Path::new("submission.toml")]).unwrap();
        assert_eq!(copied, [Path::new("submission.toml")], "only what was asked is copied");
        assert_eq!(fs::metadata(work.join("run.sh")).unwrap().permissions().mode() & 0o777, 0o555);
        let (source, linked) =
            (fs::metadata(kept.join("sub/model.bin")).unwrap(), fs::metadata(work.join("sub/model.bin")).unwrap());
        assert_eq!((linked.ino(), linked.nlink()), (source.ino(), 2));
        assert_eq!(source.permissions().mode() & 0o777, 0o444);
        let copied = fs::metadata(work.join("submission.toml")).unwrap();
        assert_eq!(copied.nlink(), 1);
        assert_eq!(fs::read_to_string(work.join("submission.toml")).unwrap(), "command = [\"true\"]");
        // Linking again (a relaunch) adds links and changes nothing else.
        assert!(link_dir(&kept, &dir.path().join("again"), &[]).unwrap().is_empty());
        assert_eq!(fs::metadata(kept.join("submission.toml")).unwrap().nlink(), 2);
        // What cannot be linked (here: across file systems, from /dev/shm) is copied.
        if let Ok(shm) = tempfile::tempdir_in("/dev/shm") {
            fs::write(shm.path().join("x"), "x").unwrap();
            assert_eq!(link_dir(shm.path(), &dir.path().join("shm"), &[]).unwrap(), [Path::new("x")]);
        }
        std::os::unix::fs::symlink("/etc/passwd", kept.join("link")).unwrap();
        assert!(link_dir(&kept, &dir.path().join("refused"), &[]).is_err(), "a link in the kept copy is refused");
    }

    #[test]
    fn digests_change_with_contents_and_names_but_not_with_copies() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        fs::create_dir_all(a.join("sub")).unwrap();
        fs::write(a.join("x.py"), "print(1)").unwrap();
        fs::write(a.join("sub/y.txt"), "y").unwrap();
        let b = dir.path().join("b");
        copy_dir(&a, &b, MIB).unwrap();
        assert_eq!(dir_digest(&a, MIB).unwrap(), dir_digest(&b, MIB).unwrap());
        let (c, big) = (dir.path().join("c"), vec![7_u8; 300_000]);
        fs::write(a.join("sub/big.bin"), &big).unwrap();
        let digest = copy_dir_digest(&a, &c, MIB).unwrap();
        assert_eq!((dir_digest(&a, MIB).unwrap(), dir_digest(&c, MIB).unwrap()), (digest.clone(), digest));
        assert_eq!(fs::read(c.join("sub/big.bin")).unwrap(), big, "copied whole, past one buffer");
        fs::remove_file(a.join("sub/big.bin")).unwrap();
        fs::write(b.join("x.py"), "print(2)").unwrap();
        assert_ne!(dir_digest(&a, MIB).unwrap(), dir_digest(&b, MIB).unwrap());
        let err = dir_digest(&a, 8).unwrap_err().to_string();
        assert!(err.ends_with("holds 1 MiB, more than the 0 MiB a submission may take"), "{err}");
    }

    #[test]
    fn symlinks_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("leak")).unwrap();
        let err = list_files(dir.path(), MIB).unwrap_err().to_string();
        assert!(err.ends_with("leak is a symlink: submissions hold only plain files and directories"), "{err}");
    }

    #[test]
    fn atomic_writes_replace_whole_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.json");
        write_atomic(&path, b"old").unwrap();
        write_atomic(&path, b"new").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file is left");
    }
}
