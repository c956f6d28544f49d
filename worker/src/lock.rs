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
            Ok(LockState::Acquired(DataDirLock { _file: file, info_path }))
        }
        Err(fs::TryLockError::WouldBlock) => {
            let info = fs::read(&info_path).ok().and_then(|bytes| serde_json::from_slice(&bytes).ok());
            Ok(LockState::HeldBy(info))
        }
        Err(fs::TryLockError::Error(e)) => Err(e),
    }
}

impl DataDirLock {
    /// Tells other processes how to reach this engine.
    pub fn announce(&self, info: &EngineInfo) -> io::Result<()> {
        write_atomic(&self.info_path, &serde_json::to_vec_pretty(info).map_err(io::Error::other)?)
    }
}

impl Drop for DataDirLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.info_path);
    }
}
