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

impl Clone for MemoryStore {
    fn clone(&self) -> MemoryStore {
        MemoryStore { inner: Mutex::new(self.lock().clone()) }
    }
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

/// What one run was in the store before a change, to put back should a
/// later change of the same commit be refused.
struct Saved {
    run: RunId,
    spec: Option<RunSpec>,
    history_len: Option<usize>,
    live: bool,
    terminal: Option<StateTag>,
}

impl Inner {
    fn save(&self, run: &RunId) -> Saved {
        Saved {
            run: run.clone(),
            spec: self.specs.get(run).cloned(),
            history_len: self.history.get(run).map(Vec::len),
            live: self.live.contains(run),
            terminal: self.terminal.iter().find(|(_, runs)| runs.contains(run)).map(|(tag, _)| *tag),
        }
    }

    fn restore(&mut self, saved: Saved) {
        let Saved { run, spec, history_len, live, terminal } = saved;
        match spec {
            Some(spec) => _ = self.specs.insert(run.clone(), spec),
            None => _ = self.specs.remove(&run),
        }
        match history_len {
            Some(len) => self.history.entry(run.clone()).or_default().truncate(len),
            None => _ = self.history.remove(&run),
        }
        if live {
            self.live.insert(run.clone());
        } else {
            self.live.remove(&run);
        }
        for runs in self.terminal.values_mut() {
            runs.remove(&run);
        }
        if let Some(tag) = terminal {
            self.terminal.entry(tag).or_default().insert(run);
        }
    }

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
        // All or nothing: what each change touches is saved first, and put
        // back, last first, when a later one is refused.
        let counts = inner.counts;
        let mut saved = Vec::with_capacity(commit.changes.len());
        for change in &commit.changes {
            saved.push(inner.save(&change.run));
            if let Err(e) = inner.apply(change) {
                for before in saved.into_iter().rev() {
                    inner.restore(before);
                }
                inner.counts = counts;
                return Err(e);
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Engine, Input};
    use crate::ids::{Stage, SubmissionId, TeamId};
    use crate::machine::{Envelope, Event, SubmissionSource};
    use crate::store::Commit;
    use crate::time::Timestamp;

    fn spec(name: &str) -> RunSpec {
        let source = SubmissionSource::Image { uri: "img".into() };
        RunSpec::new(
            SubmissionId::new(name).unwrap(),
            TeamId::new("t").unwrap(),
            Stage::Public,
            false,
            source,
            Timestamp(0),
        )
    }

    #[test]
    fn a_commit_with_one_change_refused_changes_nothing() {
        let (mut engine, _) = Engine::open(MemoryStore::new(), crate::policy::tests::case_policy(), 0).unwrap();
        engine.apply(vec![Input::Submit(spec("a"))], Timestamp(1)).unwrap();
        let store = engine.into_store();
        let a = RunId::parse("a-public").unwrap();
        let stored = store.load(&a).unwrap().unwrap();
        let first = store.history(&a).unwrap().remove(0);
        // A new run "b", accepted on its own; then a change of "a" that skips a seq.
        let b = RunChange {
            run: RunId::parse("b-public").unwrap(),
            spec: Some(spec("b")),
            before: None,
            entries: vec![HistoryEntry { input: Envelope::unfenced(Event::Submitted(spec("b"))), ..first.clone() }],
        };
        let broken = RunChange {
            run: a.clone(),
            spec: None,
            before: Some(stored.run.status),
            entries: vec![HistoryEntry { seq: 3, ..first }],
        };
        let counts = store.counts().unwrap();
        let err = store.commit(&Commit { changes: vec![b, broken] }).unwrap_err();
        assert!(err.to_string().contains("entry seq 3 after seq 1"), "{err}");
        assert_eq!(store.load(&RunId::parse("b-public").unwrap()).unwrap(), None, "b is not kept");
        assert_eq!(store.runs(RunFilter::Live, None, 10).unwrap(), std::slice::from_ref(&a));
        assert_eq!(store.history(&a).unwrap().len(), 1);
        assert_eq!(store.counts().unwrap(), counts);
    }

    #[test]
    fn a_new_run_whose_first_entry_is_not_its_submission_is_refused() {
        let (mut engine, _) = Engine::open(MemoryStore::new(), crate::policy::tests::case_policy(), 0).unwrap();
        engine.apply(vec![Input::Submit(spec("a"))], Timestamp(1)).unwrap();
        let store = engine.into_store();
        let first = store.history(&RunId::parse("a-public").unwrap()).unwrap().remove(0);
        let b = RunId::parse("b-public").unwrap();
        // The submission of another run, then an event that is not a submission.
        for event in [Event::Submitted(spec("a")), Event::CancelRequested] {
            let entry = HistoryEntry { input: Envelope::unfenced(event), ..first.clone() };
            let change = RunChange { run: b.clone(), spec: Some(spec("b")), before: None, entries: vec![entry] };
            let err = store.commit(&Commit { changes: vec![change] }).unwrap_err();
            assert_eq!(
                err.to_string(),
                "refused write for run b-public: a new run's first entry is its submission, with its spec"
            );
            assert_eq!(store.load(&b).unwrap(), None);
        }
    }
}
