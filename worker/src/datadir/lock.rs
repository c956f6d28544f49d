//! The data directory's lock: one process at a time owns a competition's
//! store. An engine (`evalflow serve`, `evalflow demo`) holds it for its life
//! and says in `state/engine.json` how to reach its API; a CLI command that
//! finds the lock free holds it while it works on the store itself.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use evalflow_activities::fsutil::write_atomic;
use serde::{Deserialize, Serialize};

/// How to reach the engine that holds a data directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineInfo {
    /// The engine's process id.
    pub pid: u32,
    /// Its HTTP API, e.g. `http://127.0.0.1:41234`.
    pub api: String,
}

/// The lock, held until dropped.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
    info_path: PathBuf,
    announced: Option<EngineInfo>,
}

/// What trying the lock found.
#[derive(Debug)]
pub enum LockState {
    /// This process holds the lock now.
    Acquired(DataDirLock),
    /// Another process holds it; here is how to reach it, if it said.
    HeldBy(Option<EngineInfo>),
}

/// Tries to take the lock of `data_dir` without waiting.
pub fn try_lock(data_dir: &Path) -> io::Result<LockState> {
    let state = data_dir.join("state");
    fs::create_dir_all(&state)?;
    let file = File::options().create(true).truncate(false).write(true).open(state.join("engine.lock"))?;
    let info_path = state.join("engine.json");
    match file.try_lock() {
        Ok(()) => {
            // A previous engine died without removing its announcement.
            let _ = fs::remove_file(&info_path);
            Ok(LockState::Acquired(DataDirLock { _file: file, info_path, announced: None }))
        }
        Err(fs::TryLockError::WouldBlock) => {
            // A killed engine leaves its announcement behind until the next
            // one replaces it: one from a process that is gone does not count.
            let info = fs::read(&info_path)
                .ok()
                .and_then(|bytes| serde_json::from_slice::<EngineInfo>(&bytes).ok())
                .filter(|info| alive(info.pid));
            Ok(LockState::HeldBy(info))
        }
        Err(fs::TryLockError::Error(e)) => Err(e),
    }
}

/// Whether process `pid` exists.
fn alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// Takes the lock for an engine: a CLI command holding it (it has not said
/// how to reach it) is waited for, up to `wait`; another engine is not.
pub fn lock_for_engine(data_dir: &Path, wait: std::time::Duration) -> io::Result<LockState> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        match try_lock(data_dir)? {
            LockState::HeldBy(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            state => return Ok(state),
        }
    }
}

impl DataDirLock {
    /// Tells other processes how to reach this engine.
    pub fn announce(&mut self, info: &EngineInfo) -> io::Result<()> {
        write_atomic(&self.info_path, &serde_json::to_vec_pretty(info).map_err(io::Error::other)?)?;
        self.announced = Some(info.clone());
        Ok(())
    }

    /// How this engine said it is reached, if it did.
    pub fn announced(&self) -> Option<&EngineInfo> {
        self.announced.as_ref()
    }
}

impl Drop for DataDirLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.info_path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_announcement_from_a_dead_process_does_not_count() {
        let dir = tempfile::tempdir().unwrap();
        let LockState::Acquired(mut held) = try_lock(dir.path()).unwrap() else { panic!("the lock is free") };
        let live = EngineInfo { pid: std::process::id(), api: "http://127.0.0.1:1".into() };
        held.announce(&live).unwrap();
        assert!(matches!(try_lock(dir.path()).unwrap(), LockState::HeldBy(Some(info)) if info == live));
        // A pid above the kernel's maximum is no process.
        held.announce(&EngineInfo { pid: u32::MAX, api: live.api.clone() }).unwrap();
        assert!(matches!(try_lock(dir.path()).unwrap(), LockState::HeldBy(None)));
        drop(held);
        assert!(matches!(try_lock(dir.path()).unwrap(), LockState::Acquired(_)), "released with its holder");
        assert!(!dir.path().join("state/engine.json").exists(), "and the announcement withdrawn");
    }
}
