//! Where runs live: the [`WorkflowStore`] trait, its sled implementation and
//! its in-memory twin.
//!
//! A run is stored as its history: one entry per event, each holding the
//! status the event left the run in, the first (its submission) holding the
//! run's spec. The last entry *is* the run's current state and its outbox,
//! so recording an event is one key, not a state row, a history row and an
//! outbox row. Two indexes make the questions the engine and the CLI ask
//! cheap without a full scan:
//!
//! - the live index: runs that are not terminal or are owed a command (what
//!   recovery reads on open);
//! - the terminal index: runs by terminal state (`runs --state failed`);
//!
//! and one counter per state answers "how many runs are in each state".
//! Index keys change only when a run enters or leaves the live set or a
//! terminal state, which keeps a transition near one written key.

mod codec;
mod memory;
mod sled_store;

pub use memory::MemoryStore;
pub use sled_store::{Footprint, SledOptions, SledStore};

use std::ops::{Index, IndexMut};

use crate::ids::RunId;
use crate::machine::{Event, HistoryEntry, Run, RunSpec, RunStatus, StateTag};

/// How many runs a listing returns at most per call.
pub const LIST_LIMIT_MAX: usize = 10_000;

/// sled's error in words an organizer can act on: damaged files say what to do.
fn sled_error_words(error: &sled::Error) -> String {
    match error {
        sled::Error::Corruption { .. } => format!(
            "the store's files are damaged ({}): stop evalflow, move DIR/state/store aside and put a backup in its \
             place (`evalflow backup DEST` makes one: its DEST/state/store)",
            sled_store::sled_words(error)
        ),
        other => format!("store error: {other}"),
    }
}

/// A store that cannot be used, or a record that cannot be trusted.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The embedded database failed.
    #[error("{}", sled_error_words(.0))]
    Sled(#[from] sled::Error),
    /// The store's files cannot be read: damaged, not merely old.
    #[error(
        "the store in {path} cannot be opened: its files are damaged ({problem}). Nothing was changed. Move that \
         directory aside and restore it from a backup (`evalflow backup DEST` makes one: its DEST/state/store); the \
         jobs' files and results in the data directory are kept"
    )]
    Damaged {
        /// The store's directory.
        path: String,
        /// What sled found.
        problem: String,
    },
    /// A write to the store failed (a full disk, say): from then on it takes
    /// and answers nothing, so that nothing unflushed is ever shown.
    #[error(
        "the store stopped after a write to it failed ({problem}); what was not yet on disk is not shown. Fix the \
         cause (for a full disk: free space) and start evalflow again: every change it acknowledged is kept"
    )]
    Stopped {
        /// Why the write failed.
        problem: String,
    },
    /// A backup cannot be written where asked.
    #[error("cannot write the backup: {0}")]
    Backup(String),
    /// Another process holds the store open.
    #[error("the store at {path} is open in another process: stop it, or talk to it through its API")]
    Locked {
        /// The store's directory.
        path: String,
    },
    /// A record does not decode or breaks an invariant.
    #[error("corrupt record {key}: {problem}")]
    Corrupt {
        /// The record's key, printable.
        key: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The store was written by an evalflow with another record format.
    #[error(
        "the store's records have schema version {found}; this evalflow reads version {supported}: finish this \
         competition with the evalflow that made its store, or start this one in a new data directory"
    )]
    SchemaVersion {
        /// The version found.
        found: u8,
        /// The version this build reads and writes.
        supported: u8,
    },
    /// A write that breaks an invariant: a bug in the caller, refused before it reaches disk.
    #[error("refused write for run {run}: {problem}")]
    InvalidWrite {
        /// The run.
        run: RunId,
        /// The broken invariant.
        problem: String,
    },
}

/// A run as loaded: its spec, its current status and the seq of its last entry.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRun {
    /// The run.
    pub run: Run,
    /// The seq of its last history entry.
    pub last_seq: u32,
}

/// The changes to one run in one commit.
#[derive(Debug, Clone, PartialEq)]
pub struct RunChange {
    /// The run.
    pub run: RunId,
    /// Its spec, when the run is new.
    pub spec: Option<RunSpec>,
    /// Its status before this commit (`None` when new): decides the index updates.
    pub before: Option<RunStatus>,
    /// The new entries, in order, continuing its history.
    pub entries: Vec<HistoryEntry>,
}

impl RunChange {
    /// Checks the change before it is written.
    fn validate(&self, last_seq_before: u32) -> Result<(), StoreError> {
        let refuse = |problem: String| StoreError::InvalidWrite { run: self.run.clone(), problem };
        if self.spec.is_some() != self.before.is_none() {
            return Err(refuse("a spec goes with a new run, and only with one".into()));
        }
        if let Some(spec) = &self.spec
            && spec.run != self.run
        {
            return Err(refuse(format!("spec of run {}", spec.run)));
        }
        let Some(last) = self.entries.last() else {
            return Err(refuse("no entries".into()));
        };
        // The sled store keeps a run's spec in its first entry alone.
        if let (Some(spec), Some(first)) = (&self.spec, self.entries.first())
            && (first.seq != 1 || !matches!(&first.input.event, Event::Submitted(submitted) if submitted == spec))
        {
            return Err(refuse("a new run's first entry is its submission, with its spec".into()));
        }
        for (offset, entry) in (1..).zip(&self.entries) {
            if entry.seq != last_seq_before + offset {
                return Err(refuse(format!("entry seq {} after seq {}", entry.seq, last_seq_before)));
            }
            entry.status.validate().map_err(|p| refuse(format!("entry {}: {p}", entry.seq)))?;
        }
        if let Some(before) = &self.before
            && last.status.version < before.version
        {
            return Err(refuse(format!("version went from {} to {}", before.version, last.status.version)));
        }
        Ok(())
    }

    /// The status after this change.
    pub fn after(&self) -> Option<&RunStatus> {
        self.entries.last().map(|e| &e.status)
    }
}

/// A group of changes written as one atomic, durable unit.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Commit {
    /// One change per run, each run at most once.
    pub changes: Vec<RunChange>,
}

/// How many runs are in each state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StateCounts([u64; 8]);

impl StateCounts {
    /// Runs in any state.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// Moves `run`'s count as `delta` says, refusing to go below zero; the
    /// one counter update of both stores.
    fn count(&mut self, run: &RunId, delta: IndexDelta) -> Result<(), StoreError> {
        if let Some(tag) = delta.count_out {
            self[tag] = self[tag].checked_sub(1).ok_or_else(|| StoreError::InvalidWrite {
                run: run.clone(),
                problem: format!("leaves state {tag}, which counts no run"),
            })?;
        }
        if let Some(tag) = delta.count_in {
            self[tag] += 1;
        }
        Ok(())
    }

    /// Each state with its count, in [`StateTag::ALL`] order.
    pub fn iter(&self) -> impl Iterator<Item = (StateTag, u64)> + '_ {
        StateTag::ALL.into_iter().map(|tag| (tag, self[tag]))
    }
}

impl Index<StateTag> for StateCounts {
    type Output = u64;
    fn index(&self, tag: StateTag) -> &u64 {
        &self.0[usize::from(tag.code())]
    }
}

impl IndexMut<StateTag> for StateCounts {
    fn index_mut(&mut self, tag: StateTag) -> &mut u64 {
        &mut self.0[usize::from(tag.code())]
    }
}

/// Which runs a listing covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunFilter {
    /// Every run (a full scan of the histories' keys).
    All,
    /// Runs not terminal or owed a command.
    Live,
    /// Runs in one terminal state.
    Terminal(StateTag),
}

/// The index and counter updates one run change implies; shared by both
/// stores so that they cannot disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct IndexDelta {
    /// `Some(true)`: add to the live index; `Some(false)`: remove.
    live: Option<bool>,
    /// Remove from this terminal state's index.
    terminal_out: Option<StateTag>,
    /// Add to this terminal state's index.
    terminal_in: Option<StateTag>,
    /// Decrement this state's counter.
    count_out: Option<StateTag>,
    /// Increment this state's counter.
    count_in: Option<StateTag>,
}

impl IndexDelta {
    fn of(before: Option<&RunStatus>, after: &RunStatus) -> IndexDelta {
        let terminal = |s: &RunStatus| Some(s.state.tag()).filter(|t| t.is_terminal());
        let was_live = before.is_some_and(RunStatus::is_live);
        let was_terminal = before.and_then(terminal);
        let tag_before = before.map(|s| s.state.tag());
        let tag_after = after.state.tag();
        let moved = tag_before != Some(tag_after);
        IndexDelta {
            live: (was_live != after.is_live()).then_some(after.is_live()),
            terminal_out: was_terminal.filter(|_| moved),
            terminal_in: terminal(after).filter(|_| moved),
            count_out: tag_before.filter(|_| moved),
            count_in: Some(tag_after).filter(|_| moved),
        }
    }
}

/// Persistent storage of runs.
///
/// `commit` is the only write. Everything a commit holds becomes visible and
/// durable together, or not at all: after it returns `Ok`, a crash loses none
/// of it; if the process dies during it, none of it is seen after reopening.
pub trait WorkflowStore: Send {
    /// The run's spec and current status, if it exists.
    fn load(&self, run: &RunId) -> Result<Option<StoredRun>, StoreError>;

    /// Writes `commit` atomically and durably.
    fn commit(&self, commit: &Commit) -> Result<(), StoreError>;

    /// The run's whole history, in order; empty for an unknown run.
    fn history(&self, run: &RunId) -> Result<Vec<HistoryEntry>, StoreError>;

    /// Up to `limit` (at most [`LIST_LIMIT_MAX`]) runs matching `filter`, in
    /// id order, starting after `after`.
    fn runs(&self, filter: RunFilter, after: Option<&RunId>, limit: usize) -> Result<Vec<RunId>, StoreError>;

    /// How many runs are in each state, from the counters (no scan).
    fn counts(&self) -> Result<StateCounts, StoreError>;
}

/// Every run matching `filter`, page by page.
pub fn all_runs(store: &impl WorkflowStore, filter: RunFilter) -> Result<Vec<RunId>, StoreError> {
    let mut all = Vec::new();
    loop {
        let page = store.runs(filter, all.last(), LIST_LIMIT_MAX)?;
        let done = page.len() < LIST_LIMIT_MAX;
        all.extend(page);
        if done {
            return Ok(all);
        }
    }
}
