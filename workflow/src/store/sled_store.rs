//! The store on disk: one sled tree, keys by prefix.
//!
//! | key | value |
//! |---|---|
//! | `m` | layout version ([`LAYOUT_VERSION`]) |
//! | `h` run `\0` seq (u32, big-endian) | a history entry, with the status after it; the first is the submission, with the run's spec |
//! | `l` run | (empty) the run is live |
//! | `t` state run | the run in this terminal state: spec, last seq and status |
//! | `c` state | how many runs are in this state (u64, big-endian) |
//!
//! A run's spec is kept in its first entry alone: sled's layout costs about
//! 180 bytes on disk a record beyond the record's own, so a key of its own
//! for the spec took 380 of the 2,790 bytes a stored run took on disk
//! (layout 3, in the benchmark).
//!
//! The terminal index holds its runs whole, although the first and the last
//! history entries hold the same: at a million stored runs, finding a run's
//! spec and last entry costs two reads of pages out of cache (~35 µs), so
//! listing 10,000 failed runs took a third of a second and counting every
//! run at start 20 s, where one pass over a range costs a few µs a run. The
//! copy is written when a run enters a terminal state and again with each
//! event recorded while it is there (a late event, an acknowledged
//! termination), which are few; live runs, which change at every step, are
//! not copied.
//!
//! Run ids are ASCII letters, digits, `_` and `-`, so `\0` ends a run id in a
//! history key and one run's entries never interleave with another's. A
//! commit is one `apply_batch` (atomic, also across a crash) and one flush.
//!
//! sled shows a batch to readers as soon as it is applied, before it is on
//! disk; a flush cut short (a full disk) would leave readers looking at a
//! state that a restart does not have. So readers go through [`Flushes`]: a
//! read that may have seen a commit returns only once that commit is
//! flushed, and after a failed flush the store answers nothing more.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::ErrorKind;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::codec::{self, Finished};
use super::{
    Commit, IndexDelta, LIST_LIMIT_MAX, RunChange, RunFilter, StateCounts, StoreError, StoredRun, WorkflowStore,
};
use crate::ids::RunId;
use crate::machine::{Event, HistoryEntry, Run, RunSpec, StateTag};

/// How long opening waits for sled's file lock to clear.
pub const LOCK_WAIT: Duration = Duration::from_secs(2);

/// The layout of the keys (the table above), kept in `m`. Version 2 had
/// empty terminal-index values, version 3 a key `s` run for each spec; an
/// older store is brought to 4 when opened ([`SledStore::open`]).
pub(crate) const LAYOUT_VERSION: u8 = 4;

const META_KEY: &[u8] = b"m";
/// Layout 3's key of a run's spec.
const SPEC_OF_LAYOUT_3: u8 = b's';
/// The seq of a run's first entry, its submission, as its key ends.
const FIRST_ENTRY: [u8; 5] = [0, 0, 0, 0, 1];
const HISTORY: u8 = b'h';
const LIVE: u8 = b'l';
const TERMINAL: u8 = b't';
const COUNT: u8 = b'c';
const EMPTY: &[u8] = &[];

/// Tuning of the embedded database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SledOptions {
    /// sled's page cache, in bytes: the main part of the store's memory.
    pub cache_capacity_bytes: u64,
}

impl Default for SledOptions {
    fn default() -> Self {
        SledOptions { cache_capacity_bytes: 64 * 1024 * 1024 }
    }
}

/// What the records of one kind take ([`SledStore::footprint`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Footprint {
    /// How many there are.
    pub records: u64,
    /// Their keys' bytes.
    pub key_bytes: u64,
    /// Their values' bytes.
    pub value_bytes: u64,
}

/// Records written per batch when the store is copied (a backup, a migration).
const COPY_BATCH: usize = 10_000;

/// The durable store, in a directory of its own. Clones share it: one
/// writer (the engine) and any number of readers.
#[derive(Clone)]
pub struct SledStore {
    db: sled::Db,
    tree: sled::Tree,
    /// The counters, kept in memory and updated by the writer after each commit.
    counts: Arc<Mutex<StateCounts>>,
    /// The seq of the last stored entry of each run past its queue that a
    /// commit changed since the store was opened, until the run is terminal
    /// (so a bulk submission's queued runs take no room). A commit's check
    /// that its entries go on from the stored history reads it instead of
    /// sled when it can: the two point reads took about an eighth of the
    /// engine thread in the full-stack benchmark.
    last_seqs: Arc<Mutex<HashMap<RunId, u32>>>,
    flushes: Arc<Flushes>,
}

/// The commits begun and flushed, so that readers see only flushed state.
#[derive(Default)]
struct Flushes {
    state: Mutex<FlushState>,
    flushed: Condvar,
    /// Held by the one commit in progress.
    writer: Mutex<()>,
}

#[derive(Default)]
struct FlushState {
    /// Commits whose batch was applied (and may be visible to readers).
    begun: u64,
    /// Commits flushed to disk: the first `flushed` of the `begun`.
    flushed: u64,
    /// Why a commit failed: from then on the store answers nothing.
    failed: Option<String>,
}

/// Stops the store when dropped: dropped only if a write unwinds.
struct CutShort<'a>(&'a Flushes);

impl Drop for CutShort<'_> {
    fn drop(&mut self) {
        self.0.cut_short();
    }
}

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Flushes {
    fn stopped(problem: &str) -> StoreError {
        StoreError::Stopped { problem: problem.to_owned() }
    }

    /// Makes one commit visible and durable with `write` (apply, then
    /// flush); the caller holds `writer`.
    fn flush(&self, write: impl FnOnce() -> Result<(), StoreError>) -> Result<(), StoreError> {
        {
            let mut state = locked(&self.state);
            if let Some(problem) = &state.failed {
                return Err(Self::stopped(problem));
            }
            state.begun += 1;
        }
        // A write that panics stops the store too: no reader waits for it for ever.
        let cut_short = CutShort(self);
        let result = write();
        std::mem::forget(cut_short);
        let mut state = locked(&self.state);
        let result = match result {
            Ok(()) => {
                state.flushed = state.begun;
                Ok(())
            }
            Err(e) => {
                let problem = match e {
                    StoreError::Sled(e) => sled_words(&e),
                    other => other.to_string(),
                };
                let stopped = Self::stopped(&problem);
                state.failed = Some(problem);
                Err(stopped)
            }
        };
        self.flushed.notify_all();
        result
    }

    /// Stops the store after a write that did not return.
    fn cut_short(&self) {
        let mut state = locked(&self.state);
        state.failed.get_or_insert_with(|| "a write to the store was cut short".into());
        self.flushed.notify_all();
    }

    /// `read`'s answer, once everything it may have seen is flushed.
    fn durable<T>(&self, read: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
        let answer = read();
        let mut state = locked(&self.state);
        let seen = state.begun;
        while state.flushed < seen && state.failed.is_none() {
            state = self.flushed.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
        match &state.failed {
            Some(problem) => Err(Self::stopped(problem)),
            None => answer,
        }
    }
}

/// The error for a store whose files cannot be read, in sled's words
/// (without its empty backtrace).
fn damaged_store(dir: &Path, error: &sled::Error) -> StoreError {
    StoreError::Damaged { path: dir.display().to_string(), problem: sled_words(error) }
}

/// sled's words for `error`, without its empty backtrace; a full disk and
/// damaged files in plain words, with the file.
pub(super) fn sled_words(error: &sled::Error) -> String {
    match error {
        sled::Error::Io(io) if matches!(io.kind(), ErrorKind::StorageFull | ErrorKind::QuotaExceeded) => {
            "No space left on device".into()
        }
        sled::Error::Io(io) => io.to_string(),
        sled::Error::Corruption { at: Some(sled::DiskPtr::Inline(offset)), .. } => {
            format!("the record at byte {offset} of its log, the file db, fails its checksum")
        }
        sled::Error::Corruption { at: Some(sled::DiskPtr::Blob(_, blob)), .. } => {
            format!("its file blobs/{blob} fails its checksum")
        }
        sled::Error::Corruption { at: None, .. } => "a record of its log, the file db, fails its checksum".into(),
        other => other.to_string().trim_end_matches(" backtrace ()").to_owned(),
    }
}

/// Renames the snapshots sled left unfinished in `dir` (`snap.*.generating`)
/// to `interrupted-snap.*`, out of sled's sight; returns how many.
fn set_aside_interrupted_snapshots(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    let mut moved = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            let aside = dir.join(format!("interrupted-{name}"));
            moved += usize::from(std::fs::rename(entry.path(), &aside).is_ok());
        }
    }
    moved
}

impl SledStore {
    /// Opens (or creates) the store in `dir`. sled releases its file lock a
    /// moment after its last handle drops (its I/O worker finishes first), so
    /// a lock is waited for, up to [`LOCK_WAIT`], before it counts as held.
    pub fn open(dir: &Path, options: SledOptions) -> Result<SledStore, StoreError> {
        let deadline = Instant::now() + LOCK_WAIT;
        loop {
            match Self::open_with(sled::Config::new().path(dir), options) {
                // sled reports a held file lock as an I/O error of kind
                // `Other` whose message names the lock.
                Err(StoreError::Sled(sled::Error::Io(io))) if io.to_string().contains("could not acquire lock") => {
                    if Instant::now() >= deadline {
                        return Err(StoreError::Locked { path: dir.display().to_string() });
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(StoreError::Sled(damaged @ (sled::Error::Corruption { .. } | sled::Error::Unsupported(_)))) => {
                    // A snapshot cut short (a full disk) is left as `snap.*.generating`:
                    // set it aside once, and open what was flushed before it.
                    if set_aside_interrupted_snapshots(dir) > 0 {
                        return Self::open_with(sled::Config::new().path(dir), options).map_err(|e| match e {
                            StoreError::Sled(e) => damaged_store(dir, &e),
                            other => other,
                        });
                    }
                    return Err(damaged_store(dir, &damaged));
                }
                result => return result,
            }
        }
    }

    /// A store that lives until dropped, for tests.
    pub fn temporary() -> Result<SledStore, StoreError> {
        Self::open_with(sled::Config::new().temporary(true), SledOptions::default())
    }

    fn open_with(config: sled::Config, options: SledOptions) -> Result<SledStore, StoreError> {
        let db = config
            .cache_capacity(options.cache_capacity_bytes)
            .mode(sled::Mode::HighThroughput)
            .flush_every_ms(None)
            .open()?;
        let tree = db.open_tree("runs")?;
        match tree.get(META_KEY)?.as_deref() {
            Some([LAYOUT_VERSION]) => {}
            Some([2]) => {
                check_specs_of_layout_3(&tree)?;
                migrate_from_2(&db, &tree)?;
                set_layout(&db, &tree)?;
            }
            Some([3]) => {
                check_specs_of_layout_3(&tree)?;
                set_layout(&db, &tree)?;
            }
            Some(found) => {
                let found = found.first().copied().unwrap_or(0);
                return Err(StoreError::SchemaVersion { found, supported: LAYOUT_VERSION });
            }
            None => {
                tree.insert(META_KEY, &[LAYOUT_VERSION])?;
                db.flush()?;
            }
        }
        remove_specs_of_layout_3(&db, &tree)?;
        let mut counts = StateCounts::default();
        for item in tree.scan_prefix([COUNT]) {
            let (key, value) = item?;
            let tag = key.get(1).and_then(|&code| StateTag::from_code(code));
            let count = <[u8; 8]>::try_from(value.as_ref()).map(u64::from_be_bytes);
            match (tag, count) {
                (Some(tag), Ok(count)) => counts[tag] = count,
                _ => return Err(codec::corrupt(&key, "bad counter".into())),
            }
        }
        Ok(SledStore {
            db,
            tree,
            counts: Arc::new(Mutex::new(counts)),
            last_seqs: Arc::default(),
            flushes: Arc::default(),
        })
    }

    /// Writes a copy of the store to `dest`, a directory that must not
    /// exist, as a store [`SledStore::open`] opens; returns the entries
    /// copied. Commits wait meanwhile, so the copy is of one moment; readers
    /// go on.
    pub fn backup(&self, dest: &Path) -> Result<u64, StoreError> {
        let _writer = locked(&self.flushes.writer);
        if let Some(problem) = &locked(&self.flushes.state).failed {
            return Err(Flushes::stopped(problem));
        }
        if dest.exists() {
            return Err(StoreError::Backup(format!("{} exists already: name a new directory", dest.display())));
        }
        let copy = sled::Config::new().path(dest).mode(sled::Mode::HighThroughput).flush_every_ms(None).open()?;
        let tree = copy.open_tree("runs")?;
        let (mut entries, mut batch, mut batched) = (0u64, sled::Batch::default(), 0usize);
        for item in self.tree.iter() {
            let (key, value) = item?;
            batch.insert(key, value);
            (entries, batched) = (entries + 1, batched + 1);
            if batched == COPY_BATCH {
                tree.apply_batch(std::mem::take(&mut batch))?;
                batched = 0;
            }
        }
        tree.apply_batch(batch)?;
        copy.flush()?;
        Ok(entries)
    }

    /// The bytes sled's files take on disk.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.db.size_on_disk()?)
    }

    /// What the store's records take, by kind (`history`, `terminal index`, ...):
    /// how many there are and the bytes of their keys and values, before
    /// sled's own layout. Reads every record.
    pub fn footprint(&self) -> Result<BTreeMap<&'static str, Footprint>, StoreError> {
        let mut kinds = BTreeMap::<&'static str, Footprint>::new();
        for item in self.tree.iter() {
            let (key, value) = item?;
            let kind = match key.first() {
                Some(&HISTORY) => "history",
                Some(&LIVE) => "live index",
                Some(&TERMINAL) => "terminal index",
                Some(&COUNT) => "counter",
                _ => "other",
            };
            let footprint = kinds.entry(kind).or_default();
            footprint.records += 1;
            footprint.key_bytes += key.len() as u64;
            footprint.value_bytes += value.len() as u64;
        }
        Ok(kinds)
    }

    fn last_entry(&self, run: &RunId) -> Result<Option<HistoryEntry>, StoreError> {
        let prefix = history_prefix(run);
        let mut upper = prefix.clone();
        upper.extend_from_slice(&[0xff; 5]);
        match self.tree.get_lt(upper)? {
            Some((key, value)) if key.starts_with(&prefix) => Ok(Some(codec::decode(&key, &value)?)),
            _ => Ok(None),
        }
    }

    fn stage(
        &self,
        change: &RunChange,
        last_seqs: &HashMap<RunId, u32>,
        batch: &mut sled::Batch,
        counts: &mut StateCounts,
    ) -> Result<(), StoreError> {
        // The entries go on from the stored history: the entry before the
        // first is stored (unless it is the first), the first is not. Known
        // from the last commit that changed the run, or else two point reads
        // (measured a little cheaper than one forward seek over both), where
        // finding the last entry is a backward seek.
        let first = change.entries.first().map_or(0, |e| e.seq);
        let last_seq_before = first.saturating_sub(1);
        let follows = match last_seqs.get(&change.run) {
            Some(&last) => last == last_seq_before,
            None => {
                (last_seq_before == 0 || self.tree.contains_key(entry_key(&change.run, last_seq_before))?)
                    && !self.tree.contains_key(entry_key(&change.run, first))?
            }
        };
        if !follows {
            let stored = self.last_entry(&change.run)?.map_or(0, |e| e.seq);
            return Err(StoreError::InvalidWrite {
                run: change.run.clone(),
                problem: format!("entry seq {first} after seq {stored}"),
            });
        }
        change.validate(last_seq_before)?;
        for entry in &change.entries {
            let key = entry_key(&change.run, entry.seq);
            let value = codec::encode(&key, entry)?;
            batch.insert(key, value);
        }
        let Some(after) = change.after() else { return Ok(()) };
        let delta = IndexDelta::of(change.before.as_ref(), after);
        match delta.live {
            Some(true) => batch.insert(key(LIVE, &change.run), EMPTY),
            Some(false) => batch.remove(key(LIVE, &change.run)),
            None => {}
        }
        if let Some(tag) = delta.terminal_out {
            batch.remove(terminal_key(tag, &change.run));
        }
        // Any change to a run that ends terminal rewrites its copy in the index.
        let tag = after.state.tag();
        if tag.is_terminal() {
            let spec = match &change.spec {
                Some(spec) => spec.clone(),
                None => self.spec(&change.run)?.ok_or_else(|| {
                    codec::corrupt(&entry_key(&change.run, 1), "a run with history but no first entry".into())
                })?,
            };
            let key = terminal_key(tag, &change.run);
            let last_seq = change.entries.last().map_or(last_seq_before, |e| e.seq);
            let value = codec::encode(&key, &Finished { spec, last_seq, status: after.clone() })?;
            batch.insert(key, value);
        }
        counts.count(&change.run, delta)
    }

    /// The run's spec, from its first entry; `None` for an unknown run.
    fn spec(&self, run: &RunId) -> Result<Option<RunSpec>, StoreError> {
        let key = entry_key(run, 1);
        let Some(value) = self.tree.get(&key)? else { return Ok(None) };
        spec_in(&key, run, codec::decode::<HistoryEntry>(&key, &value)?.input.event).map(Some)
    }

    fn load_now(&self, run: &RunId) -> Result<Option<StoredRun>, StoreError> {
        let Some(HistoryEntry { seq: last_seq, input, status, .. }) = self.last_entry(run)? else { return Ok(None) };
        // A queued run, the one most loaded, has one entry: read once.
        let spec = match last_seq {
            1 => spec_in(&entry_key(run, 1), run, input.event)?,
            _ => self.spec(run)?.ok_or_else(|| {
                codec::corrupt(&entry_key(run, last_seq), "an entry of a run without a first entry".into())
            })?,
        };
        Ok(Some(StoredRun { run: Run { spec, status }, last_seq }))
    }

    /// The batch that writes `commit`, and the counters after it; checked, not written.
    fn prepare(&self, commit: &Commit) -> Result<(sled::Batch, StateCounts), StoreError> {
        let mut counts = *locked(&self.counts);
        let before = counts;
        let mut batch = sled::Batch::default();
        let last_seqs = locked(&self.last_seqs);
        // Each change is checked against the stored history, not against
        // another change of the same commit: a run changes once a commit.
        let mut runs = HashSet::with_capacity(commit.changes.len());
        for change in &commit.changes {
            if !runs.insert(&change.run) {
                let problem = "changed twice in one commit".to_owned();
                return Err(StoreError::InvalidWrite { run: change.run.clone(), problem });
            }
            self.stage(change, &last_seqs, &mut batch, &mut counts)?;
        }
        for (tag, count) in counts.iter() {
            if count != before[tag] {
                batch.insert(&[COUNT, tag.code()], &count.to_be_bytes()[..]);
            }
        }
        Ok((batch, counts))
    }

    /// Up to `limit` records of `filter`'s index after `after`, as `read` makes them of each key and value.
    fn scan<T>(
        &self,
        filter: RunFilter,
        after: Option<&RunId>,
        limit: usize,
        mut read: impl FnMut(&[u8], RunId, &[u8]) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        // Every run is named by the key of its first entry; its others are
        // passed over. The start goes past `after`'s own keys: its id, then
        // `\0` in an index key, `\0` and a seq in a history key.
        let (prefix, past) = match filter {
            RunFilter::All => (vec![HISTORY], 1),
            RunFilter::Live => (vec![LIVE], 0),
            RunFilter::Terminal(tag) => (vec![TERMINAL, tag.code()], 0),
        };
        let mut start = prefix.clone();
        if let Some(after) = after {
            start.extend_from_slice(after.as_str().as_bytes());
            start.push(past);
        }
        let limit = limit.min(LIST_LIMIT_MAX);
        let mut found = Vec::new();
        // Listing every run: the key of the last first entry passed.
        let mut first: Option<sled::IVec> = None;
        for item in self.tree.range(start..) {
            if found.len() == limit {
                break;
            }
            let (key, value) = item?;
            let Some(id) = key.strip_prefix(prefix.as_slice()) else { break };
            let id = match filter {
                RunFilter::All => match id.strip_suffix(&FIRST_ENTRY) {
                    Some(id) => {
                        first = Some(key.clone());
                        id
                    }
                    None if first.as_ref().is_some_and(|first| of_first(first, &key)) => continue,
                    None => return Err(codec::corrupt(&key, "an entry of a run without a first entry".into())),
                },
                RunFilter::Live | RunFilter::Terminal(_) => id,
            };
            let id = std::str::from_utf8(id).map_err(|e| codec::corrupt(&key, e.to_string()))?;
            let id = RunId::parse(id).map_err(|e| codec::corrupt(&key, e.to_string()))?;
            found.push(read(&key, id, &value)?);
        }
        Ok(found)
    }

    fn runs_now(&self, filter: RunFilter, after: Option<&RunId>, limit: usize) -> Result<Vec<RunId>, StoreError> {
        self.scan(filter, after, limit, |_, id, _| Ok(id))
    }

    fn stored_runs_now(
        &self,
        filter: RunFilter,
        after: Option<&RunId>,
        limit: usize,
    ) -> Result<Vec<StoredRun>, StoreError> {
        match filter {
            RunFilter::Terminal(tag) => self.scan(filter, after, limit, |key, id, value| {
                let Finished { spec, last_seq, status } = codec::decode(key, value)?;
                if spec.run != id || status.state.tag() != tag {
                    return Err(codec::corrupt(key, format!("holds run {} in state {}", spec.run, status.state.tag())));
                }
                Ok(StoredRun { run: Run { spec, status }, last_seq })
            }),
            RunFilter::All => self.every_run_from_history(after, limit),
            RunFilter::Live => {
                let ids = self.runs_now(filter, after, limit)?;
                let mut runs = Vec::with_capacity(ids.len());
                for id in &ids {
                    runs.extend(self.load_now(id)?);
                }
                Ok(runs)
            }
        }
    }

    /// Up to `limit` runs after `after`, in id order, read in one pass over
    /// the history: the spec from each run's first entry, the status from
    /// its last.
    fn every_run_from_history(&self, after: Option<&RunId>, limit: usize) -> Result<Vec<StoredRun>, StoreError> {
        let limit = limit.min(LIST_LIMIT_MAX);
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut start = vec![HISTORY];
        if let Some(after) = after {
            start.extend_from_slice(after.as_str().as_bytes());
            start.push(1);
        }
        let finish = |read: Reading| -> Result<StoredRun, StoreError> {
            let HistoryEntry { seq, input, status, .. } = read.first;
            let spec = spec_in(&read.key, &read.run, input.event)?;
            let (last_seq, status) = match read.last {
                Some((key, value)) => {
                    codec::decode::<HistoryEntry>(&key, &value).map(|last| (last.seq, last.status))?
                }
                None => (seq, status),
            };
            Ok(StoredRun { run: Run { spec, status }, last_seq })
        };
        let mut runs = Vec::new();
        let mut reading: Option<Reading> = None;
        for item in self.tree.range(start..) {
            let (key, value) = item?;
            if key.first() != Some(&HISTORY) {
                break;
            }
            if let Some(id) = key.get(1..).and_then(|rest| rest.strip_suffix(&FIRST_ENTRY)) {
                if let Some(read) = reading.take() {
                    runs.push(finish(read)?);
                    if runs.len() == limit {
                        return Ok(runs);
                    }
                }
                let run = std::str::from_utf8(id).ok().and_then(|id| RunId::parse(id).ok());
                let run = run.ok_or_else(|| codec::corrupt(&key, "not a run id".into()))?;
                reading = Some(Reading { run, first: codec::decode(&key, &value)?, key, last: None });
            } else {
                match &mut reading {
                    Some(read) if of_first(&read.key, &key) => read.last = Some((key, value)),
                    _ => return Err(codec::corrupt(&key, "an entry of a run without a first entry".into())),
                }
            }
        }
        if let Some(read) = reading {
            runs.push(finish(read)?);
        }
        Ok(runs)
    }

    /// Up to `limit` (at most [`LIST_LIMIT_MAX`]) runs matching `filter`,
    /// loaded, in id order, starting after `after`: [`WorkflowStore::runs`]
    /// and a [`WorkflowStore::load`] of each, but a terminal state's are read
    /// in one pass over its index, and every run's in one over the history.
    pub fn stored_runs(
        &self,
        filter: RunFilter,
        after: Option<&RunId>,
        limit: usize,
    ) -> Result<Vec<StoredRun>, StoreError> {
        self.flushes.durable(|| self.stored_runs_now(filter, after, limit))
    }

    /// Visits every run matching `filter`, in id order, page by page of
    /// [`SledStore::stored_runs`].
    pub fn each_in(&self, filter: RunFilter, mut visit: impl FnMut(StoredRun)) -> Result<(), StoreError> {
        let mut after = None;
        loop {
            let page = self.stored_runs(filter, after.as_ref(), LIST_LIMIT_MAX)?;
            let last_page = page.len() < LIST_LIMIT_MAX;
            after = page.last().map(|stored| stored.run.spec.run.clone());
            page.into_iter().for_each(&mut visit);
            if last_page {
                return Ok(());
            }
        }
    }

    /// Visits every run once, in id order, each as it was when read: the
    /// terminal ones from their states' indexes, which hold them, the
    /// others loaded from the live index. The indexes are read side by side
    /// in id order, so a run found in two (a terminal run owed a command,
    /// or one that moved while they were read) is visited once. While
    /// commits go on, a run submitted meanwhile may be missed, and so may
    /// one that moved to an index already read past it.
    pub fn each_run(&self, mut visit: impl FnMut(StoredRun)) -> Result<(), StoreError> {
        let mut indexes: Vec<Pages<'_>> = StateTag::ALL
            .into_iter()
            .filter(|tag| tag.is_terminal())
            .map(RunFilter::Terminal)
            .chain([RunFilter::Live])
            .map(|filter| Pages {
                store: self,
                filter,
                page: Vec::new().into_iter().peekable(),
                after: None,
                done: false,
            })
            .collect();
        loop {
            let mut least: Option<RunId> = None;
            for index in &mut indexes {
                if let Some((id, _)) = index.peek()?
                    && least.as_ref().is_none_or(|least| id < least)
                {
                    least = Some(id.clone());
                }
            }
            let Some(least) = least else { return Ok(()) };
            let mut found = None;
            for index in &mut indexes {
                if index.peek()?.is_some_and(|(id, _)| *id == least) {
                    found = found.or(index.page.next().and_then(|(_, stored)| stored));
                }
            }
            match found {
                Some(stored) => visit(stored),
                None => self.load(&least)?.into_iter().for_each(&mut visit),
            }
        }
    }
}

/// One index read page by page, in id order, for [`SledStore::each_run`]:
/// each run with its record when the index holds it.
struct Pages<'s> {
    store: &'s SledStore,
    filter: RunFilter,
    page: std::iter::Peekable<std::vec::IntoIter<(RunId, Option<StoredRun>)>>,
    /// The last run of the last page read.
    after: Option<RunId>,
    done: bool,
}

impl Pages<'_> {
    fn peek(&mut self) -> Result<Option<&(RunId, Option<StoredRun>)>, StoreError> {
        if self.page.peek().is_none() && !self.done {
            let after = self.after.as_ref();
            let page: Vec<(RunId, Option<StoredRun>)> = match self.filter {
                RunFilter::Terminal(_) => self
                    .store
                    .stored_runs(self.filter, after, LIST_LIMIT_MAX)?
                    .into_iter()
                    .map(|stored| (stored.run.spec.run.clone(), Some(stored)))
                    .collect(),
                _ => self.store.runs(self.filter, after, LIST_LIMIT_MAX)?.into_iter().map(|id| (id, None)).collect(),
            };
            self.done = page.len() < LIST_LIMIT_MAX;
            self.after = page.last().map(|(id, _)| id.clone());
            self.page = page.into_iter().peekable();
        }
        Ok(self.page.peek())
    }
}

/// A run read by [`SledStore::every_run_from_history`].
struct Reading {
    run: RunId,
    /// Its first entry, and that entry's key.
    first: HistoryEntry,
    key: sled::IVec,
    /// The key and value of its last entry so far, unless it is the first.
    last: Option<(sled::IVec, sled::IVec)>,
}

/// Whether history key `key` is of the run whose first entry's key is `first`.
fn of_first(first: &[u8], key: &[u8]) -> bool {
    let prefix = first.len().saturating_sub(FIRST_ENTRY.len() - 1);
    first.len() == key.len() && first.get(..prefix) == key.get(..prefix)
}

/// The spec a run's first entry holds (its event): its submission, of this run.
fn spec_in(key: &[u8], run: &RunId, first: Event) -> Result<RunSpec, StoreError> {
    match first {
        Event::Submitted(spec) if spec.run == *run => Ok(spec),
        Event::Submitted(spec) => Err(codec::corrupt(key, format!("the submission of run {}", spec.run))),
        other => Err(codec::corrupt(key, format!("the first entry is {}, not the submission", other.kind()))),
    }
}

/// Brings a store of layout version 2, whose terminal index held no values,
/// to version 3: each terminal run is copied into its index, batch by batch,
/// then the version is set. Cut short, it starts again at the next open
/// (version 2 readers ignore the values), so nothing is lost.
fn migrate_from_2(db: &sled::Db, tree: &sled::Tree) -> Result<(), StoreError> {
    let store = SledStore {
        db: db.clone(),
        tree: tree.clone(),
        counts: Arc::default(),
        last_seqs: Arc::default(),
        flushes: Arc::default(),
    };
    let mut batch = sled::Batch::default();
    let mut batched = 0;
    for item in tree.scan_prefix([TERMINAL]) {
        let (key, _) = item?;
        let id = key.get(2..).and_then(|id| std::str::from_utf8(id).ok()).and_then(|id| RunId::parse(id).ok());
        let id = id.ok_or_else(|| codec::corrupt(&key, "not a run id".into()))?;
        let stored = store.load_now(&id)?.ok_or_else(|| codec::corrupt(&key, "a run without a spec".into()))?;
        let StoredRun { run: Run { spec, status }, last_seq } = stored;
        if key.get(1) != Some(&status.state.tag().code()) {
            return Err(codec::corrupt(&key, format!("indexes a run in state {}", status.state.tag())));
        }
        batch.insert(key.clone(), codec::encode(&key, &Finished { spec, last_seq, status })?);
        batched += 1;
        if batched == COPY_BATCH {
            tree.apply_batch(std::mem::take(&mut batch))?;
            batched = 0;
        }
    }
    tree.apply_batch(batch)?;
    db.flush()?;
    tree.insert(META_KEY, &[3])?;
    db.flush()?;
    Ok(())
}

/// Checks that each spec a store of layout 2 or 3 kept under a key of its
/// own is the one its run's first entry holds, which layout 4 keeps alone
/// ([`remove_specs_of_layout_3`] removes the others once the version is
/// set). It changes nothing, so that a store it refuses is left as it was.
fn check_specs_of_layout_3(tree: &sled::Tree) -> Result<(), StoreError> {
    for item in tree.scan_prefix([SPEC_OF_LAYOUT_3]) {
        let (key, value) = item?;
        let spec: RunSpec = codec::decode(&key, &value)?;
        let first = entry_key(&spec.run, 1);
        let held = match tree.get(&first)? {
            Some(entry) => {
                Some(spec_in(&first, &spec.run, codec::decode::<HistoryEntry>(&first, &entry)?.input.event)?)
            }
            None => None,
        };
        if key.get(1..) != Some(spec.run.as_str().as_bytes()) || held.as_ref() != Some(&spec) {
            let problem = "its spec is not the one its run's first history entry holds, which layout 4 keeps alone: \
                           open this store with the evalflow that made it";
            return Err(codec::corrupt(&key, problem.into()));
        }
    }
    Ok(())
}

fn set_layout(db: &sled::Db, tree: &sled::Tree) -> Result<(), StoreError> {
    tree.insert(META_KEY, &[LAYOUT_VERSION])?;
    db.flush()?;
    Ok(())
}

/// Removes layout 3's spec keys, batch by batch, once the version is set,
/// and at each open until none is left (a removal cut short).
fn remove_specs_of_layout_3(db: &sled::Db, tree: &sled::Tree) -> Result<(), StoreError> {
    loop {
        let mut batch = sled::Batch::default();
        let mut batched = 0;
        for item in tree.scan_prefix([SPEC_OF_LAYOUT_3]).keys().take(COPY_BATCH) {
            batch.remove(item?);
            batched += 1;
        }
        if batched == 0 {
            return Ok(());
        }
        tree.apply_batch(batch)?;
        db.flush()?;
    }
}

impl WorkflowStore for SledStore {
    fn load(&self, run: &RunId) -> Result<Option<StoredRun>, StoreError> {
        self.flushes.durable(|| self.load_now(run))
    }

    fn commit(&self, commit: &Commit) -> Result<(), StoreError> {
        let _writer = locked(&self.flushes.writer);
        let (batch, counts) = self.prepare(commit)?;
        self.flushes.flush(|| {
            self.tree.apply_batch(batch)?;
            self.db.flush()?;
            Ok(())
        })?;
        *locked(&self.counts) = counts;
        let mut last_seqs = locked(&self.last_seqs);
        for change in &commit.changes {
            let (Some(last), Some(after)) = (change.entries.last(), change.after()) else { continue };
            if after.state.tag().is_terminal() || after.state.tag() == StateTag::Queued {
                last_seqs.remove(&change.run);
            } else if let Some(seq) = last_seqs.get_mut(&change.run) {
                *seq = last.seq;
            } else {
                last_seqs.insert(change.run.clone(), last.seq);
            }
        }
        Ok(())
    }

    fn history(&self, run: &RunId) -> Result<Vec<HistoryEntry>, StoreError> {
        self.flushes.durable(|| {
            self.tree
                .scan_prefix(history_prefix(run))
                .map(|item| {
                    let (key, value) = item?;
                    codec::decode(&key, &value)
                })
                .collect()
        })
    }

    fn runs(&self, filter: RunFilter, after: Option<&RunId>, limit: usize) -> Result<Vec<RunId>, StoreError> {
        self.flushes.durable(|| self.runs_now(filter, after, limit))
    }

    fn counts(&self) -> Result<StateCounts, StoreError> {
        // Updated after each flushed commit only; and nothing is answered after a failed one.
        self.flushes.durable(|| Ok(*locked(&self.counts)))
    }
}

fn key(kind: u8, run: &RunId) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + run.as_str().len());
    key.push(kind);
    key.extend_from_slice(run.as_str().as_bytes());
    key
}

fn history_prefix(run: &RunId) -> Vec<u8> {
    let mut key = key(HISTORY, run);
    key.push(0);
    key
}

fn entry_key(run: &RunId, seq: u32) -> Vec<u8> {
    let mut key = history_prefix(run);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn terminal_key(tag: StateTag, run: &RunId) -> Vec<u8> {
    let mut key = vec![TERMINAL, tag.code()];
    key.extend_from_slice(run.as_str().as_bytes());
    key
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Engine, Input};
    use crate::ids::{Stage, SubmissionId, TeamId};
    use crate::machine::SubmissionSource;
    use crate::store::codec::SCHEMA_VERSION;
    use crate::time::Timestamp;

    fn submit(store: SledStore, name: &str) -> SledStore {
        let spec = RunSpec::new(
            SubmissionId::new(name).unwrap(),
            TeamId::new("t").unwrap(),
            Stage::Public,
            false,
            SubmissionSource::Image { uri: "img".into() },
            Timestamp(0),
        );
        let (mut engine, _) = Engine::open(store, crate::policy::tests::case_policy(), 0).unwrap();
        engine.apply(vec![Input::Submit(spec)], Timestamp(1)).unwrap();
        engine.into_store()
    }

    #[test]
    fn a_damaged_store_is_named_with_what_to_do_and_not_blamed_on_a_version() {
        let dir = tempfile::tempdir().unwrap();
        drop(SledStore::open(dir.path(), SledOptions::default()).unwrap());
        std::fs::write(dir.path().join("conf"), b"\xff\xfe garbage, not sled's conf").unwrap();
        let err = SledStore::open(dir.path(), SledOptions::default()).err().unwrap().to_string();
        assert!(err.contains("cannot be opened: its files are damaged ("), "{err}");
        assert!(err.contains("restore it from a backup") && !err.contains("schema version"), "{err}");
    }

    #[test]
    fn a_backup_opens_as_the_store_it_copies_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            submit(submit(SledStore::open(&dir.path().join("store"), SledOptions::default()).unwrap(), "a"), "b");
        let dest = dir.path().join("backup");
        let entries = store.backup(&dest).unwrap();
        assert!(entries >= 6, "meta, counters, specs, histories, indexes: {entries}");
        let err = store.backup(&dest).unwrap_err().to_string();
        assert!(err.contains("exists already: name a new directory"), "{err}");
        let copy = SledStore::open(&dest, SledOptions::default()).unwrap();
        assert_eq!(copy.counts().unwrap(), store.counts().unwrap());
        for run in ["a-public", "b-public"] {
            let run = RunId::parse(run).unwrap();
            assert_eq!(copy.load(&run).unwrap(), store.load(&run).unwrap());
            assert_eq!(copy.history(&run).unwrap(), store.history(&run).unwrap());
        }
        let live = |s: &SledStore| crate::store::all_runs(s, RunFilter::Live).unwrap();
        assert_eq!(live(&copy), live(&store), "the indexes too");
    }

    #[test]
    fn a_snapshot_cut_short_by_a_full_disk_does_not_keep_the_store_shut() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), SledOptions::default()).unwrap();
        store.tree.insert(b"kept", b"acknowledged").unwrap();
        store.db.flush().unwrap();
        drop(store);
        let snapshots: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("snap."))
            .collect();
        // What a snapshot interrupted by ENOSPC leaves: a prefix of one, under its temporary name.
        let cut = match snapshots.first() {
            Some(done) => std::fs::read(done.path()).unwrap()[..8].to_vec(),
            None => b"\x01\x02\x03".to_vec(),
        };
        std::fs::write(dir.path().join("snap.FFFFFFFFFFFFFFFF.generating"), cut).unwrap();
        let store = SledStore::open(dir.path(), SledOptions::default()).unwrap();
        assert_eq!(store.tree.get(b"kept").unwrap().as_deref(), Some(&b"acknowledged"[..]));
    }

    #[test]
    fn a_write_that_panics_stops_the_store_instead_of_keeping_readers_waiting() {
        let flushes = Flushes::default();
        let panicked =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| flushes.flush(|| panic!("a write cut short"))));
        assert!(panicked.is_err());
        let read = flushes.durable(|| Ok(1));
        assert!(matches!(&read, Err(StoreError::Stopped { problem }) if problem.contains("cut short")), "{read:?}");
    }

    #[test]
    fn a_store_of_layout_2_opens_with_its_terminal_runs_copied_into_their_index() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), SledOptions::default()).unwrap();
        let store = submit(submit(submit(store, "a"), "b"), "c");
        let (mut engine, _) = Engine::open(store, crate::policy::tests::case_policy(), 0).unwrap();
        let cancel = |name: &str| Input::Event {
            run: RunId::parse(name).unwrap(),
            envelope: crate::machine::Envelope::unfenced(Event::CancelRequested),
        };
        engine.apply(vec![cancel("a-public"), cancel("c-public")], Timestamp(2)).unwrap();
        let store = engine.into_store();
        let cancelled = store.stored_runs(RunFilter::Terminal(StateTag::Cancelled), None, LIST_LIMIT_MAX).unwrap();
        assert_eq!(cancelled.len(), 2);
        // What version 2 wrote: the terminal index's keys without values.
        for item in store.tree.scan_prefix([TERMINAL]) {
            store.tree.insert(item.unwrap().0, EMPTY).unwrap();
        }
        add_specs_of_layout_3(&store); // layout 2 kept them too
        store.tree.insert(META_KEY, &[2]).unwrap();
        drop(store);

        let store = SledStore::open(dir.path(), SledOptions::default()).unwrap();
        assert_eq!(store.tree.get(META_KEY).unwrap().as_deref(), Some(&[LAYOUT_VERSION][..]));
        assert_eq!(store.tree.scan_prefix([SPEC_OF_LAYOUT_3]).count(), 0);
        assert_eq!(store.stored_runs(RunFilter::Terminal(StateTag::Cancelled), None, 10).unwrap(), cancelled);
        let mut visited = Vec::new();
        store.each_run(|stored| visited.push(stored.run.spec.run.to_string())).unwrap();
        visited.sort();
        assert_eq!(visited, ["a-public", "b-public", "c-public"]);
    }

    /// What layout 3 wrote besides layout 4's records: each run's spec under `s`.
    fn add_specs_of_layout_3(store: &SledStore) {
        for item in store.tree.scan_prefix([HISTORY]) {
            let (entry_key, value) = item.unwrap();
            if let Event::Submitted(spec) = codec::decode::<HistoryEntry>(&entry_key, &value).unwrap().input.event {
                let key = key(SPEC_OF_LAYOUT_3, &spec.run);
                store.tree.insert(&key, codec::encode(&key, &spec).unwrap()).unwrap();
            }
        }
        store.tree.insert(META_KEY, &[3]).unwrap();
    }

    fn every_run(store: &SledStore) -> Vec<StoredRun> {
        let mut runs = Vec::new();
        store.each_in(RunFilter::All, |stored| runs.push(stored)).unwrap();
        runs
    }

    #[test]
    fn a_store_of_layout_3_opens_with_each_spec_kept_in_its_first_entry_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = submit(submit(SledStore::open(dir.path(), SledOptions::default()).unwrap(), "a"), "b");
        let runs = every_run(&store);
        assert_eq!(runs.len(), 2);
        add_specs_of_layout_3(&store);
        assert_eq!(store.tree.scan_prefix([SPEC_OF_LAYOUT_3]).count(), 2);
        drop(store);

        let store = SledStore::open(dir.path(), SledOptions::default()).unwrap();
        assert_eq!(store.tree.get(META_KEY).unwrap().as_deref(), Some(&[LAYOUT_VERSION][..]));
        assert_eq!(store.tree.scan_prefix([SPEC_OF_LAYOUT_3]).count(), 0);
        assert_eq!(every_run(&store), runs);
    }

    #[test]
    fn a_spec_of_layout_2_or_3_that_its_first_entry_does_not_hold_stops_the_migration_before_any_change() {
        for layout in [2, 3] {
            let dir = tempfile::tempdir().unwrap();
            let store = submit(submit(SledStore::open(dir.path(), SledOptions::default()).unwrap(), "a"), "b");
            add_specs_of_layout_3(&store);
            store.tree.insert(META_KEY, &[layout]).unwrap();
            let key = key(SPEC_OF_LAYOUT_3, &RunId::parse("b-public").unwrap());
            let mut spec: RunSpec = codec::decode(&key, &store.tree.get(&key).unwrap().unwrap()).unwrap();
            spec.team = TeamId::new("another").unwrap();
            store.tree.insert(&key, codec::encode(&key, &spec).unwrap()).unwrap();
            drop(store);

            let err = SledStore::open(dir.path(), SledOptions::default()).err().unwrap();
            assert_eq!(
                err.to_string(),
                "corrupt record sb-public: its spec is not the one its run's first history entry holds, which layout \
                 4 keeps alone: open this store with the evalflow that made it"
            );
            let db = sled::open(dir.path()).unwrap();
            let tree = db.open_tree("runs").unwrap();
            assert_eq!(tree.get(META_KEY).unwrap().as_deref(), Some(&[layout][..]));
            assert_eq!(tree.scan_prefix([SPEC_OF_LAYOUT_3]).count(), 2, "nothing removed");
        }
    }

    #[test]
    fn a_run_submitted_again_over_its_own_history_is_refused() {
        let store = submit(SledStore::temporary().unwrap(), "a");
        let run = RunId::parse("a-public").unwrap();
        let first = store.history(&run).unwrap().remove(0);
        let Event::Submitted(spec) = first.input.event.clone() else { panic!("{first:?}") };
        // Goes on from the stored entry 1, as a new run: it would be counted twice.
        let again = RunChange {
            run: run.clone(),
            spec: Some(spec),
            before: None,
            entries: vec![HistoryEntry { seq: 2, ..first }],
        };
        let err = store.commit(&Commit { changes: vec![again] }).unwrap_err();
        assert_eq!(
            err.to_string(),
            "refused write for run a-public: a new run's first entry is its submission, with its spec"
        );
        assert_eq!((store.history(&run).unwrap().len(), store.counts().unwrap().total()), (1, 1));
    }

    #[test]
    fn every_run_is_read_from_the_history_page_by_page_as_loaded() {
        let mut store = SledStore::temporary().unwrap();
        for name in ["b", "a-b", "a", "ab", "a_b"] {
            store = submit(store, name);
        }
        // Histories of one entry and of more, side by side.
        let (mut engine, _) = Engine::open(store, crate::policy::tests::case_policy(), 0).unwrap();
        let cancels = ["a-b-public", "ab-public"].map(|run| Input::Event {
            run: RunId::parse(run).unwrap(),
            envelope: crate::machine::Envelope::unfenced(Event::CancelRequested),
        });
        engine.apply(cancels.into(), Timestamp(2)).unwrap();
        let store = engine.into_store();
        let mut ids: Vec<RunId> =
            ["b", "a-b", "a", "ab", "a_b"].map(|name| RunId::parse(&format!("{name}-public")).unwrap()).into();
        ids.sort();
        let loaded: Vec<StoredRun> = ids.iter().map(|id| store.load(id).unwrap().unwrap()).collect();
        assert_eq!(
            (store.stored_runs(RunFilter::All, None, 0).unwrap(), store.runs(RunFilter::All, None, 0).unwrap()),
            (vec![], vec![])
        );
        assert_eq!(loaded.iter().filter(|stored| stored.last_seq > 1).count(), 2);
        for limit in 1..=ids.len() + 1 {
            let (mut read, mut listed) = (Vec::new(), Vec::new());
            for _page in 0..=ids.len() {
                let after = read.last().map(|stored: &StoredRun| stored.run.spec.run.clone());
                let page = store.stored_runs(RunFilter::All, after.as_ref(), limit).unwrap();
                listed.extend(store.runs(RunFilter::All, after.as_ref(), limit).unwrap());
                let done = page.len() < limit;
                read.extend(page);
                if done {
                    break;
                }
            }
            assert_eq!((&read, &listed), (&loaded, &ids), "pages of {limit}");
        }
    }

    #[test]
    fn every_run_is_visited_once_in_id_order_across_pages_of_each_index() {
        let runs = LIST_LIMIT_MAX + 50;
        let specs: Vec<Input> = (0..runs)
            .map(|i| {
                Input::Submit(RunSpec::new(
                    SubmissionId::new(format!("s{i:05}")).unwrap(),
                    TeamId::new("t").unwrap(),
                    Stage::Public,
                    false,
                    SubmissionSource::Image { uri: "img".into() },
                    Timestamp(0),
                ))
            })
            .collect();
        let (mut engine, _) =
            Engine::open(SledStore::temporary().unwrap(), crate::policy::tests::case_policy(), 0).unwrap();
        engine.apply(specs, Timestamp(1)).unwrap();
        // Every third cancelled: a terminal index and the live one, both longer than a page.
        let cancels = (0..runs).step_by(3).map(|i| Input::Event {
            run: RunId::parse(&format!("s{i:05}-public")).unwrap(),
            envelope: crate::machine::Envelope::unfenced(Event::CancelRequested),
        });
        engine.apply(cancels.collect(), Timestamp(2)).unwrap();
        let store = engine.into_store();
        let mut visited = Vec::new();
        store
            .each_run(|stored| visited.push((stored.run.spec.run.to_string(), stored.run.status.state.tag())))
            .unwrap();
        let expected: Vec<_> = (0..runs)
            .map(|i| {
                let state = if i % 3 == 0 { StateTag::Cancelled } else { StateTag::Queued };
                (format!("s{i:05}-public"), state)
            })
            .collect();
        assert_eq!(visited, expected);
    }

    #[test]
    fn a_store_of_another_schema_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), SledOptions::default()).unwrap();
        store.tree.insert(META_KEY, &[LAYOUT_VERSION + 1]).unwrap();
        drop(store);
        let err = SledStore::open(dir.path(), SledOptions::default()).err().unwrap();
        assert_eq!(
            err.to_string(),
            format!(
                "the store's records have schema version {}; this evalflow reads version {LAYOUT_VERSION}: finish \
                 this competition with the evalflow that made its store, or start this one in a new data directory",
                LAYOUT_VERSION + 1
            )
        );
    }

    #[test]
    fn a_corrupt_record_is_reported_with_its_key() {
        let store = submit(SledStore::temporary().unwrap(), "a");
        let run = RunId::parse("a-public").unwrap();
        store.tree.insert(entry_key(&run, 1), &[SCHEMA_VERSION, 0xff, 0xff][..]).unwrap();
        let err = store.load(&run).unwrap_err();
        assert!(matches!(&err, StoreError::Corrupt { key, .. } if key.starts_with("ha-public")), "{err}");
        store.tree.insert(entry_key(&run, 1), &[SCHEMA_VERSION + 1][..]).unwrap();
        assert!(matches!(store.load(&run), Err(StoreError::SchemaVersion { .. })));
        // An entry of a run whose first is missing.
        let store = submit(SledStore::temporary().unwrap(), "a");
        let orphan = RunId::parse("b-public").unwrap();
        store.tree.insert(entry_key(&orphan, 2), store.tree.get(entry_key(&run, 1)).unwrap().unwrap()).unwrap();
        let listed =
            [store.runs(RunFilter::All, None, 10).map(|_| ()), store.stored_runs(RunFilter::All, None, 10).map(|_| ())];
        for err in listed {
            assert!(
                matches!(&err, Err(StoreError::Corrupt { key, problem }) if key.starts_with("hb-public") && problem == "an entry of a run without a first entry"),
                "{err:?}"
            );
        }
    }

    #[test]
    fn a_second_opener_is_told_the_store_is_locked() {
        let dir = tempfile::tempdir().unwrap();
        let _first = SledStore::open(dir.path(), SledOptions::default()).unwrap();
        let err = SledStore::open(dir.path(), SledOptions::default()).err().unwrap();
        assert!(matches!(err, StoreError::Locked { .. }), "{err}");
    }

    #[test]
    fn a_write_that_breaks_the_history_is_refused_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunId::parse("a-public").unwrap();
        // The store that wrote the run (admitted: past its queue) knows its
        // last seq; one opened since reads it.
        let store = submit(SledStore::open(dir.path(), SledOptions::default()).unwrap(), "a");
        let (mut engine, _) = Engine::open(store, crate::policy::tests::case_policy(), 1).unwrap();
        engine.apply(Vec::new(), Timestamp(2)).unwrap();
        let written = engine.into_store();
        let mut stores = vec![written];
        for reopened in [false, true] {
            if reopened {
                drop(stores.pop());
                stores.push(SledStore::open(dir.path(), SledOptions::default()).unwrap());
            }
            let store = &stores[0];
            let stored = store.load(&run).unwrap().unwrap();
            assert_eq!((stored.last_seq, stored.run.status.state.tag()), (2, StateTag::Launching));
            for (seq, problem) in [(4, "entry seq 4 after seq 2"), (2, "entry seq 2 after seq 2")] {
                let mut entry = store.history(&run).unwrap().remove(1);
                entry.seq = seq; // skips seq 3, or overwrites seq 2
                let before = Some(stored.run.status.clone());
                let change = RunChange { run: run.clone(), spec: None, before, entries: vec![entry] };
                let err = store.commit(&Commit { changes: vec![change] }).unwrap_err();
                assert_eq!(err.to_string(), format!("refused write for run a-public: {problem}"), "{reopened}");
                assert_eq!(store.history(&run).unwrap().len(), 2);
                assert_eq!(store.counts().unwrap()[StateTag::Launching], 1);
            }
        }
        // Two changes of one run in a commit, each going on from the stored history.
        let store = &stores[0];
        let stored = store.load(&run).unwrap().unwrap();
        let mut entry = store.history(&run).unwrap().remove(1);
        entry.seq = 3;
        let change = RunChange { run: run.clone(), spec: None, before: Some(stored.run.status), entries: vec![entry] };
        let err = store.commit(&Commit { changes: vec![change.clone(), change] }).unwrap_err();
        assert_eq!(err.to_string(), "refused write for run a-public: changed twice in one commit");
        assert_eq!(store.history(&run).unwrap().len(), 2);
    }
}
