//! A small filesystem of its own for the full-disk tests: a tmpfs mounted
//! on a directory (the suite runs as root), filled on demand.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs mounted until dropped.
pub struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size_kib` KiB on `dir` (made if missing).
    pub fn mount(dir: &Path, size_kib: u64) -> Tmpfs {
        fs::create_dir_all(dir).unwrap();
        let size = format!("size={size_kib}k,mode=0755");
        let mount = Command::new("mount").args(["-t", "tmpfs", "-o", &size, "tmpfs"]).arg(dir).output().unwrap();
        assert!(
            mount.status.success(),
            "the full-disk tests mount a small tmpfs, which takes root (CI runs as root): {}",
            String::from_utf8_lossy(&mount.stderr)
        );
        Tmpfs { dir: dir.to_owned() }
    }

    /// Bytes free.
    pub fn free(&self) -> u64 {
        evalflow_activities::fsutil::free_space(&self.dir).unwrap().bytes
    }

    /// Fills the filesystem up to `leave` free bytes with the file `name`,
    /// removed by [`Tmpfs::unfill`].
    pub fn fill(&self, name: &str, leave: u64) {
        let take = self.free().saturating_sub(leave);
        let filler = self.dir.join(name);
        fs::write(&filler, vec![0x5a; usize::try_from(take).unwrap()]).unwrap();
    }

    /// Removes what [`Tmpfs::fill`] wrote as `name`: room again.
    pub fn unfill(&self, name: &str) {
        fs::remove_file(self.dir.join(name)).unwrap();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}
