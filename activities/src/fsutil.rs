//! Small filesystem tools: atomic writes, content digests, bounded copies.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The most entries a submission directory may hold.
pub const DIR_ENTRIES_MAX: usize = 10_000;

/// Writes `bytes` to `path` so that a reader sees the old file or the new
/// one, never a part: write a temporary file, sync it, rename, sync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let name = path.file_name().ok_or_else(|| io::Error::other(format!("{} has no file name", path.display())))?;
    let tmp = path.with_file_name(format!(".{}.tmp.{}", name.to_string_lossy(), std::process::id()));
    let mut file = File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The regular files under `dir`, as paths relative to it, sorted. Refuses
/// symlinks and special files (a link could point a sandbox at host files),
/// and trees of more than [`DIR_ENTRIES_MAX`] entries.
pub fn list_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut pending = vec![PathBuf::new()];
    let mut seen = 0;
    while let Some(relative) = pending.pop() {
        for entry in fs::read_dir(dir.join(&relative))? {
            let entry = entry?;
            seen += 1;
            if seen > DIR_ENTRIES_MAX {
                return Err(io::Error::other(format!("{} has more than {DIR_ENTRIES_MAX} entries", dir.display())));
            }
            let kind = entry.file_type()?;
            let path = relative.join(entry.file_name());
            if kind.is_dir() {
                pending.push(path);
            } else if kind.is_file() {
                files.push(path);
            } else {
                let what = if kind.is_symlink() { "a symlink" } else { "a special file" };
                return Err(io::Error::other(format!(
                    "{} is {what}: submissions hold only plain files and directories",
                    dir.join(&path).display()
                )));
            }
        }
    }
    files.sort();
    Ok(files)
}

/// A SHA-256 digest of a directory's files: their relative paths and contents.
pub fn dir_digest(dir: &Path) -> io::Result<String> {
    let mut hasher = Sha256::new();
    for relative in list_files(dir)? {
        let name = relative.to_string_lossy();
        hasher.update((name.len() as u64).to_le_bytes());
        hasher.update(name.as_bytes());
        let mut file = File::open(dir.join(&relative))?;
        hasher.update(file.metadata()?.len().to_le_bytes());
        io::copy(&mut file, &mut hasher)?;
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Copies the files of `from` into `to` (created), refusing what [`list_files`] refuses.
pub fn copy_dir(from: &Path, to: &Path) -> io::Result<()> {
    fs::create_dir_all(to)?;
    for relative in list_files(from)? {
        let target = to.join(&relative);
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::copy(from.join(&relative), target)?;
    }
    Ok(())
}

/// The bytes taken by the files under `dir`, counting at most `entries_max`
/// entries (a bound on the cost of a check, not on the directory).
pub fn dir_bytes(dir: &Path, entries_max: usize) -> io::Result<u64> {
    let mut total = 0;
    let mut pending = vec![dir.to_path_buf()];
    let mut seen = 0;
    while let Some(current) = pending.pop() {
        for entry in fs::read_dir(&current)? {
            let entry = entry?;
            seen += 1;
            if seen > entries_max {
                return Ok(total);
            }
            let metadata = entry.metadata()?;
            if metadata.is_dir() {
                pending.push(entry.path());
            } else {
                total += metadata.len();
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_change_with_contents_and_names_but_not_with_copies() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        fs::create_dir_all(a.join("sub")).unwrap();
        fs::write(a.join("x.py"), "print(1)").unwrap();
        fs::write(a.join("sub/y.txt"), "y").unwrap();
        let b = dir.path().join("b");
        copy_dir(&a, &b).unwrap();
        assert_eq!(dir_digest(&a).unwrap(), dir_digest(&b).unwrap());
        fs::write(b.join("x.py"), "print(2)").unwrap();
        assert_ne!(dir_digest(&a).unwrap(), dir_digest(&b).unwrap());
        assert_eq!(dir_bytes(&a, 100).unwrap(), 9);
    }

    #[test]
    fn symlinks_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("leak")).unwrap();
        let err = list_files(dir.path()).unwrap_err().to_string();
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
