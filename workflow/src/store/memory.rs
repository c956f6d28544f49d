//! The in-memory twin of the sled store, for tests and simulations: the same
//! contract with plain collections, so the two can be checked against each other.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard};

use super::{
    Commit, IndexDelta, LIST_LIMIT_MAX, RunChange, RunFilter, StateCounts, StoreError, StoredRun, WorkflowStore,
};
use crate::ids::RunId;
use crate::machine::{HistoryEntry, Run, RunSpec, StateTag};

/// Runs kept in memory; lost when dropped.
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Default, Clone)]
struct Inner {
    specs: BTreeMap<RunId, RunSpec>,
    history: BTreeMap<RunId, Vec<HistoryEntry>>,
    live: BTreeSet<RunId>,
    terminal: BTreeMap<StateTag, BTreeSet<RunId>>,
    counts: StateCounts,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Inner {
    fn apply(&mut self, change: &RunChange) -> Result<(), StoreError> {
        let last_seq_before = self.history.get(&change.run).and_then(|h| h.last()).map_or(0, |e| e.seq);
        change.validate(last_seq_before)?;
        if let Some(spec) = &change.spec {
            self.specs.insert(change.run.clone(), spec.clone());
        }
        self.history.entry(change.run.clone()).or_default().extend(change.entries.iter().cloned());
        let Some(after) = change.after() else { return Ok(()) };
        let delta = IndexDelta::of(change.before.as_ref(), after);
        match delta.live {
            Some(true) => _ = self.live.insert(change.run.clone()),
            Some(false) => _ = self.live.remove(&change.run),
            None => {}
        }
        if let Some(tag) = delta.terminal_out {
            self.terminal.entry(tag).or_default().remove(&change.run);
        }
        if let Some(tag) = delta.terminal_in {
            self.terminal.entry(tag).or_default().insert(change.run.clone());
        }
        self.counts.count(&change.run, delta)
    }
}

impl WorkflowStore for MemoryStore {
    fn load(&self, run: &RunId) -> Result<Option<StoredRun>, StoreError> {
        let inner = self.lock();
        let Some(spec) = inner.specs.get(run) else { return Ok(None) };
        let last = inner
            .history
            .get(run)
            .and_then(|h| h.last())
            .ok_or_else(|| StoreError::Corrupt { key: run.to_string(), problem: "a spec without history".into() })?;
        Ok(Some(StoredRun { run: Run { spec: spec.clone(), status: last.status.clone() }, last_seq: last.seq }))
    }

    fn commit(&self, commit: &Commit) -> Result<(), StoreError> {
        let mut inner = self.lock();
        // All or nothing: work on a copy, swap it in at the end.
        let mut next = inner.clone();
        for change in &commit.changes {
            next.apply(change)?;
        }
        *inner = next;
        Ok(())
    }

    fn history(&self, run: &RunId) -> Result<Vec<HistoryEntry>, StoreError> {
        Ok(self.lock().history.get(run).cloned().unwrap_or_default())
    }

    fn runs(&self, filter: RunFilter, after: Option<&RunId>, limit: usize) -> Result<Vec<RunId>, StoreError> {
        let inner = self.lock();
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        let take = limit.min(LIST_LIMIT_MAX);
        let runs = match filter {
            RunFilter::All => {
                inner.specs.range::<RunId, _>((start, Bound::Unbounded)).map(|(r, _)| r.clone()).take(take).collect()
            }
            RunFilter::Live => inner.live.range::<RunId, _>((start, Bound::Unbounded)).take(take).cloned().collect(),
            RunFilter::Terminal(tag) => inner
                .terminal
                .get(&tag)
                .map(|set| set.range::<RunId, _>((start, Bound::Unbounded)).take(take).cloned().collect())
                .unwrap_or_default(),
        };
        Ok(runs)
    }

    fn counts(&self) -> Result<StateCounts, StoreError> {
        Ok(self.lock().counts)
    }
}
