//! `evalflow backup DEST`: a data directory `serve --data-dir DEST` starts
//! from, made while the engine runs: the store copied at one moment (commits
//! wait meanwhile, readers go on), the state's keys, and `evalflow.toml`
//! with the stages' files named by absolute path, so that DEST reads the
//! same test sets and labels without copying them. Kept submissions, job
//! directories and results stay where they are (runs name their submission
//! by absolute path).

use std::os::unix::fs::DirBuilderExt as _;
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
/// `dest`: an absolute path, not there yet, outside the data directory
/// (where jobs write), whose parent exists. A backup that fails midway is
/// removed.
pub fn write(config: &Config, store: &SledStore, dest: &Path) -> Result<Written, BackupError> {
    let refuse = |why: &str| Err(BackupError::Destination(format!("{}: {why}", dest.display())));
    let (Some(parent), Some(name)) = (dest.parent(), dest.file_name()) else {
        return refuse("name the backup's new directory");
    };
    if !dest.is_absolute() {
        return refuse("name the backup's directory by an absolute path");
    }
    if dest.symlink_metadata().is_ok() {
        return refuse("exists already: name a new directory (a backup never overwrites)");
    }
    let Ok(parent) = std::fs::canonicalize(parent) else {
        return refuse("its parent directory does not exist: create it first");
    };
    let data_dir = std::fs::canonicalize(&config.data_dir).map_err(io(&config.data_dir))?;
    if parent.starts_with(&data_dir) {
        return refuse("is inside the data directory, where jobs write: put the backup elsewhere");
    }
    let dest = parent.join(name);
    std::fs::DirBuilder::new().mode(0o700).create(&dest).map_err(io(&dest))?;
    let written = write_into(config, store, &dest);
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&dest); // nothing half-written stays behind
    }
    written
}

fn write_into(config: &Config, store: &SledStore, dest: &Path) -> Result<Written, BackupError> {
    let (state, dest_state) = (config.data_dir.join("state"), dest.join("state"));
    std::fs::DirBuilder::new().mode(0o700).create(&dest_state).map_err(io(&dest_state))?;
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

/// `text` (an `evalflow.toml`, written anew: its comments are not kept)
/// with each stage's `test_set` and `labels` as `config` resolved them, and
/// an `[aws] output_key_file` outside `state/` (not copied) by absolute path.
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
    let key = config.output_key_file();
    if let (Some(toml::Value::Table(aws)), false) =
        (table.get_mut("aws"), key.starts_with(config.data_dir.join("state")))
    {
        aws.insert("output_key_file".into(), toml::Value::String(key.display().to_string()));
    }
    let body =
        toml::to_string(&table).map_err(|e| BackupError::Destination(format!("cannot write {CONFIG_FILE}: {e}")))?;
    Ok(format!(
        "# Written by `evalflow backup` from {}; the stages' files are those of the original.\n\n{body}",
        config.data_dir.display()
    ))
}
