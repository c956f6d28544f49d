//! `evalflow backup DEST`: a data directory `serve --data-dir DEST` starts
//! from, made while the engine runs: the store copied at one moment (commits
//! wait meanwhile, readers go on), the state's keys, and `evalflow.toml`
//! with the stages' files named by absolute path, so that DEST reads the
//! same test sets and labels without copying them. Kept submissions, job
//! directories and results stay where they are (runs name their submission
//! by absolute path).

use std::path::{Path, PathBuf};

use evalflow_workflow::{SledStore, StoreError};

use crate::config::{CONFIG_FILE, Config};

/// Files of `state/` that belong to the engine running now, not to a copy.
const NOT_COPIED: [&str; 4] = ["engine.json", "engine.lock", "submit.lock", "api.token"];

/// Why a backup was not written.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// Where it was to go.
    #[error("{0}")]
    Destination(String),
    /// A file could not be read or written.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        error: std::io::Error,
    },
    /// The store could not be copied.
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |error| BackupError::Io { path: path.display().to_string(), error }
}

/// What a backup wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// The store's entries copied.
    pub entries: u64,
    /// The state's files copied besides the store.
    pub files: Vec<String>,
}

/// Writes the backup of `config`'s competition, whose store is `store`, to
/// `dest`: an absolute path, not there yet, outside the data directory's
/// `state/`, whose parent exists.
pub fn write(config: &Config, store: &SledStore, dest: &Path) -> Result<Written, BackupError> {
    let refuse = |why: &str| Err(BackupError::Destination(format!("{}: {why}", dest.display())));
    if !dest.is_absolute() {
        return refuse("name the backup's directory by an absolute path");
    }
    if dest.exists() {
        return refuse("exists already: name a new directory (a backup never overwrites)");
    }
    if !dest.parent().is_some_and(Path::is_dir) {
        return refuse("its parent directory does not exist: create it first");
    }
    let state = config.data_dir.join("state");
    if dest.starts_with(&state) {
        return refuse("is inside the data directory's state/: put the backup elsewhere");
    }
    let dest_state = dest.join("state");
    std::fs::create_dir(dest).map_err(io(dest))?;
    make_private(dest)?;
    std::fs::create_dir(&dest_state).map_err(io(&dest_state))?;
    make_private(&dest_state)?;
    let entries = store.backup(&dest_state.join("store"))?;
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&state).map_err(io(&state))? {
        let entry = entry.map_err(io(&state))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.file_type().map_err(io(&entry.path()))?.is_file() && !NOT_COPIED.contains(&name.as_str()) {
            std::fs::copy(entry.path(), dest_state.join(&name)).map_err(io(&entry.path()))?;
            files.push(name);
        }
    }
    let config_path = config.data_dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&config_path).map_err(io(&config_path))?;
    let written = dest.join(CONFIG_FILE);
    std::fs::write(&written, with_absolute_stages(&text, config)?).map_err(io(&written))?;
    Ok(Written { entries, files })
}

fn make_private(dir: &Path) -> Result<(), BackupError> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))
}

/// `text` (an `evalflow.toml`) with each stage's `test_set` and `labels` as
/// `config` resolved them.
fn with_absolute_stages(text: &str, config: &Config) -> Result<String, BackupError> {
    let unreadable = |e: toml::de::Error| BackupError::Destination(format!("{CONFIG_FILE} cannot be read again: {e}"));
    let mut table: toml::Table = toml::from_str(text).map_err(unreadable)?;
    if let Some(toml::Value::Table(stages)) = table.get_mut("stages") {
        for (stage, files) in &config.stages {
            if let Some(toml::Value::Table(entry)) = stages.get_mut(stage.as_str()) {
                let path = |p: &PathBuf| toml::Value::String(p.display().to_string());
                entry.insert("test_set".into(), path(&files.test_set));
                entry.insert("labels".into(), path(&files.labels));
            }
        }
    }
    let body =
        toml::to_string(&table).map_err(|e| BackupError::Destination(format!("cannot write {CONFIG_FILE}: {e}")))?;
    Ok(format!(
        "# Written by `evalflow backup` from {}; the stages' files are those of the original.\n\n{body}",
        config.data_dir.display()
    ))
}
