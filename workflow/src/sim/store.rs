//! The simulation's store: the in-memory one, whose next commit can be made
//! to fail, as a flush does when the power goes or the disk fills. The
//! engine then stops, and a new one starts from what was durable.

use std::cell::Cell;

use crate::ids::RunId;
use crate::machine::HistoryEntry;
use crate::store::{Commit, MemoryStore, RunFilter, StateCounts, StoreError, StoredRun, WorkflowStore};

/// A [`MemoryStore`] whose commits fail while told to.
#[derive(Default)]
pub struct FlakyStore {
    inner: MemoryStore,
    failing: Cell<bool>,
}

impl FlakyStore {
    /// A flaky store holding what `inner` holds.
    pub fn new(inner: MemoryStore) -> FlakyStore {
        FlakyStore { inner, failing: Cell::new(false) }
    }

    /// Makes the next commits fail (`true`) or succeed again.
    pub fn fail_commits(&self, failing: bool) {
        self.failing.set(failing);
    }

    /// The store underneath.
    pub fn into_inner(self) -> MemoryStore {
        self.inner
    }
}

impl WorkflowStore for FlakyStore {
    fn load(&self, run: &RunId) -> Result<Option<StoredRun>, StoreError> {
        self.inner.load(run)
    }

    fn commit(&self, commit: &Commit) -> Result<(), StoreError> {
        if self.failing.get() {
            return Err(StoreError::Stopped { problem: "the simulated flush failed".into() });
        }
        self.inner.commit(commit)
    }

    fn history(&self, run: &RunId) -> Result<Vec<HistoryEntry>, StoreError> {
        self.inner.history(run)
    }

    fn runs(&self, filter: RunFilter, after: Option<&RunId>, limit: usize) -> Result<Vec<RunId>, StoreError> {
        self.inner.runs(filter, after, limit)
    }

    fn counts(&self) -> Result<StateCounts, StoreError> {
        self.inner.counts()
    }
}
