//! Free disk space where the local deployment writes: the host's problem,
//! never a run's. While a directory's filesystem has less free than `[local]
//! free_disk_min_mib`, or since a write there failed for want of space, the
//! engine launches no new run, `status` says why, and an activity that met
//! the full disk waits for room instead of failing; all of it resumes by
//! itself once there is room.

use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use evalflow_activities::fsutil::{FreeSpace, free_space};
use tokio_util::sync::CancellationToken;

/// How often free space is looked at while it is short.
pub const SPACE_WATCH: Duration = Duration::from_secs(5);

/// The free space of the directories evalflow writes, as last looked at.
#[derive(Debug)]
pub struct Space {
    dirs: Vec<PathBuf>,
    min_free_bytes: u64,
    /// Why launching is paused; `None` while there is room.
    short: Mutex<Option<String>>,
    /// Ends the waits for room (the node's shutdown).
    shutdown: CancellationToken,
}

const MIB: u64 = 1024 * 1024;

impl Space {
    /// Watches `dirs`, keeping at least `min_free_mib` MiB free in each.
    pub fn new(dirs: Vec<PathBuf>, min_free_mib: u64, shutdown: CancellationToken) -> Space {
        Space { dirs, min_free_bytes: min_free_mib.saturating_mul(MIB), short: Mutex::new(None), shutdown }
    }

    /// Looks at the free space now, and returns why launching pauses, if it does.
    pub fn check(&self) -> Option<String> {
        let short = self.dirs.iter().find_map(|dir| {
            let FreeSpace { bytes: free, no_inodes } = free_space(dir).ok()?;
            if no_inodes {
                return Some(format!(
                    "the disk under {} has no inodes left (no file can be made): remove some files and launching \
                     resumes by itself",
                    dir.display()
                ));
            }
            (free < self.min_free_bytes || free == 0).then(|| {
                format!(
                    "the disk under {} has {} MiB free, less than the {} MiB evalflow keeps free ([local] \
                     free_disk_min_mib): free some space and launching resumes by itself",
                    dir.display(),
                    free / MIB,
                    self.min_free_bytes / MIB
                )
            })
        });
        let mut known = self.lock();
        match (&*known, &short) {
            (None, Some(problem)) => tracing::warn!("launching paused: {problem}"),
            (Some(_), None) => tracing::info!("there is disk space again: launching resumes"),
            _ => {}
        }
        known.clone_from(&short);
        short
    }

    /// Why launching is paused, as last looked at.
    pub fn short(&self) -> Option<String> {
        self.lock().clone()
    }

    /// Notes that a write failed for want of space, whatever the last look said.
    pub fn full(&self, error: &str) {
        let mut known = self.lock();
        if known.is_none() {
            tracing::warn!("launching paused: {error}");
        }
        *known = Some(format!("a write failed ({error}): free some space and the work resumes by itself"));
    }

    /// Waits until a look finds room; false if the node shuts down first.
    pub async fn room(&self) -> bool {
        loop {
            tokio::select! {
                () = tokio::time::sleep(SPACE_WATCH) => {}
                () = self.shutdown.cancelled() => return false,
            }
            if self.check().is_none() {
                return true;
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.short.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn short_space_is_named_with_the_directory_and_the_setting() {
        let dir = tempfile::tempdir().unwrap();
        let space = Space::new(vec![dir.path().to_owned()], u64::MAX / MIB, CancellationToken::new());
        let problem = space.check().unwrap();
        assert!(problem.contains(&dir.path().display().to_string()), "{problem}");
        assert!(problem.contains("free_disk_min_mib") && problem.contains("resumes by itself"), "{problem}");
        assert_eq!(space.short(), Some(problem));

        let roomy = Space::new(vec![dir.path().to_owned()], 0, CancellationToken::new());
        assert_eq!(roomy.check(), None);
        roomy.full("No space left on device (os error 28)");
        assert!(roomy.short().unwrap().contains("os error 28"), "a failed write pauses until the next look");
        assert_eq!(roomy.check(), None);
        assert_eq!(roomy.short(), None);
    }

    #[tokio::test]
    async fn a_wait_for_room_ends_at_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let shutdown = CancellationToken::new();
        let space = Space::new(vec![dir.path().to_owned()], u64::MAX / MIB, shutdown.clone());
        shutdown.cancel();
        assert!(!space.room().await);
    }
}
