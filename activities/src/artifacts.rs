//! Where the evaluation's files are: the predictions a job wrote, the
//! private labels, the published results and the leaderboards.
//!
//! [`FsArtifacts`] keeps them in the data directory:
//!
//! | path | what |
//! |---|---|
//! | `jobs/<job>/output/submission.csv` | a job's predictions (read beneath `jobs/`, through no link, at most the cap + 1 bytes) |
//! | `results/<stage>/journal.jsonl` | the published results and the withdrawals, a JSON line each |
//! | `results/<stage>/<run>.json`, `<run>.a<attempt>.withdrawn` | the same, one file each, as versions before the journal wrote them (read, never written) |
//! | `leaderboard/<stage>.json`, `.csv` | the leaderboard |
//!
//! Writers take `leaderboard/.lock` in turn, across processes. Each
//! [`FsArtifacts`] keeps every stage's [`Standings`] in memory, read from
//! the files once and then from the journal's new lines only (another
//! process's), so a publish appends one line and settles one team's row,
//! instead of reading every result again. A change is durable once the
//! journal is synced, which is done before the board's files are written.
//!
//! Within a process, changes are group-committed: each waits in a queue,
//! and one writer (on a thread of its own, started by the change that found
//! none) takes all that wait, appends them, syncs the journal once, writes
//! the board once, hands each its outcome and goes on while changes wait. So
//! publishes arriving together share one lock, one sync and one board, and
//! the others wait without holding a thread.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use evalflow_workflow::{Attempt, RunId, Stage, TeamId, job_name};
use serde::{Deserialize, Serialize};

use crate::fsutil::write_atomic;
use crate::leaderboard::{Leaderboard, PublishedResult, Standings};
use crate::untrusted::{self, Contents, Refusal};
use crate::{ActivityError, blocking};

/// A job's predictions, as found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Predictions {
    /// The job wrote none.
    Missing,
    /// The job left something that must not be read as its predictions (a
    /// link, a FIFO, a hard link): the submission's fault.
    Refused(Refusal),
    /// Too large to read.
    TooLarge {
        /// Its size.
        bytes: u64,
    },
    /// The file's bytes.
    Found(Vec<u8>),
}

/// A stage's private labels: test file -> is it FAKE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Labels(BTreeMap<String, bool>);

impl Labels {
    /// Parses a `filename,label` CSV (label 1 = FAKE, 0 = REAL). `source` names
    /// the file in errors.
    pub fn parse(bytes: &[u8], source: &str) -> Result<Labels, ActivityError> {
        let bad = |line: u64, problem: String| {
            ActivityError::Permanent(format!("labels file {source}, line {line}: {problem}"))
        };
        let mut reader = csv::ReaderBuilder::new().trim(csv::Trim::All).from_reader(bytes);
        let headers = reader.headers().map_err(|e| bad(1, e.to_string()))?.clone();
        if headers.iter().collect::<Vec<_>>() != ["filename", "label"] {
            return Err(bad(1, "the header must be filename,label".into()));
        }
        let mut labels = BTreeMap::new();
        for record in reader.records() {
            let record = record.map_err(|e| bad(0, e.to_string()))?;
            let line = record.position().map_or(0, |p| p.line());
            let fake = match record.get(1) {
                Some("1") => true,
                Some("0") => false,
                Some(other) => {
                    return Err(bad(line, format!("label {other:?} is not 0 or 1 (1 for FAKE, 0 for REAL)")));
                }
                None => return Err(bad(line, "no label: write filename,label with a label of 0 or 1".into())),
            };
            let file = record.get(0).unwrap_or_default().to_owned();
            if labels.insert(file.clone(), fake).is_some() {
                return Err(bad(line, format!("{file:?} is labelled twice")));
            }
        }
        if labels.is_empty() {
            return Err(bad(1, "no labels".into()));
        }
        Ok(Labels(labels))
    }

    /// How many test files there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none (never, for parsed labels).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The test files, sorted.
    pub fn files(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    /// The stored name of a test file, if it is one.
    pub fn file(&self, name: &str) -> Option<&str> {
        self.0.get_key_value(name).map(|(k, _)| k.as_str())
    }

    /// Whether a test file is FAKE.
    pub fn is_fake(&self, name: &str) -> Option<bool> {
        self.0.get(name).copied()
    }
}

/// The most test files a stage's check reads.
const TEST_FILES_MAX: u64 = 10_000_000;

/// Checks a stage's test set and labels against each other, before any job
/// runs: the labels parse, the test set has files, and every test file has
/// exactly one label. The problem is the organizer's to fix, in words.
pub fn check_stage_files(test_set: &Path, labels: &Path) -> Result<usize, String> {
    let bytes = fs::read(labels).map_err(|e| format!("cannot read labels file {}: {e}", labels.display()))?;
    let labels = Labels::parse(&bytes, &labels.display().to_string()).map_err(|e| e.to_string())?;
    let mut files = std::collections::BTreeSet::new();
    untrusted::walk(test_set, TEST_FILES_MAX, |entry| {
        if entry.kind != rustix::fs::FileType::Directory {
            files.insert(entry.path.to_string_lossy().into_owned());
        }
    })
    .map_err(|e| format!("test set {}: {e}", test_set.display()))?;
    if files.is_empty() {
        return Err(format!("test set {} has no files: put the stage's test files in it", test_set.display()));
    }
    let unlabelled: Vec<&String> = files.iter().filter(|f| labels.file(f).is_none()).collect();
    if let Some(first) = unlabelled.first() {
        return Err(format!(
            "{} of the {} test files have no label, for example {first:?}: add them to the labels file",
            unlabelled.len(),
            files.len()
        ));
    }
    let absent: Vec<&str> = labels.files().filter(|f| !files.contains(*f)).collect();
    if let Some(first) = absent.first() {
        return Err(format!(
            "{} labelled files are not in the test set {}, for example {first:?}: remove their labels or add the files",
            absent.len(),
            test_set.display()
        ));
    }
    Ok(files.len())
}

/// Predictions, labels, results and leaderboards.
#[async_trait]
pub trait ArtifactStore: Send + Sync {
    /// The predictions the attempt's job wrote, if at most `max_bytes`.
    async fn predictions(&self, run: &RunId, attempt: Attempt, max_bytes: u64) -> Result<Predictions, ActivityError>;

    /// A stage's private labels.
    async fn labels(&self, stage: Stage) -> Result<Arc<Labels>, ActivityError>;

    /// What scoring the attempt reads: its job's predictions (if at most
    /// `max_bytes`) and its stage's labels.
    async fn scoring_inputs(
        &self,
        run: &RunId,
        attempt: Attempt,
        max_bytes: u64,
    ) -> Result<(Predictions, Arc<Labels>), ActivityError> {
        let labels = self.labels(run.parts().1).await?;
        Ok((self.predictions(run, attempt, max_bytes).await?, labels))
    }

    /// Records a published result, once, and brings its team's row of the
    /// stage's leaderboard up to date. Publishing the same result again
    /// changes nothing.
    async fn publish(&self, result: &PublishedResult) -> Result<Arc<Leaderboard>, ActivityError>;

    /// Keeps the result of `team`'s run's attempt off the leaderboard,
    /// whether it was published before or is published after, and brings
    /// the team's row up to date. Withdrawing again changes nothing.
    async fn withdraw(&self, team: &TeamId, run: &RunId, attempt: Attempt) -> Result<Arc<Leaderboard>, ActivityError>;
}

/// The name a withdrawal goes by: `<run>.a<attempt>`.
pub fn withdrawal_name(run: &RunId, attempt: Attempt) -> String {
    format!("{run}.a{attempt}")
}

/// The run and attempt of a [`withdrawal_name`].
pub fn parse_withdrawal_name(name: &str) -> Option<(RunId, Attempt)> {
    let (run, attempt) = name.rsplit_once(".a")?;
    Some((RunId::parse(run).ok()?, Attempt(attempt.parse().ok()?)))
}

/// Artifacts in the data directory.
#[derive(Debug, Clone)]
pub struct FsArtifacts {
    inner: Arc<FsLayout>,
}

#[derive(Debug)]
struct FsLayout {
    jobs_dir: PathBuf,
    results_dir: PathBuf,
    leaderboard_dir: PathBuf,
    labels: BTreeMap<Stage, PathBuf>,
    /// Each stage's standings, as this process last read them.
    known: Mutex<HashMap<Stage, Known>>,
    /// Each stage's labels as last parsed, and their file's stamp then.
    parsed_labels: Mutex<HashMap<Stage, (Stamp, Arc<Labels>)>>,
    /// The changes waiting for the writer.
    waiting: Mutex<Waiting>,
    /// Held by the writer; `leaderboard/.lock`, once opened.
    writing: Mutex<Option<fs::File>>,
}

/// The changes waiting for the writer, and whether one is at work.
#[derive(Debug, Default)]
struct Waiting {
    changes: Vec<Pending>,
    writer: bool,
}

/// A change waiting for the writer, and where the writer sends its outcome:
/// the stage's board that holds it, or why it could not be made.
#[derive(Debug)]
struct Pending {
    stage: Stage,
    record: Record,
    outcome: tokio::sync::oneshot::Sender<Result<Arc<Leaderboard>, ActivityError>>,
}

/// A stage's standings as of a length of its journal, and the board
/// written when the journal, synced, had `written` bytes.
#[derive(Debug)]
struct Known {
    standings: Standings,
    journal: fs::File,
    read: u64,
    written: u64,
    board: Arc<Leaderboard>,
    /// Whether a row changed since the board was written (or none was).
    dirty: bool,
}

/// A line of the journal.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Record {
    Publish(PublishedResult),
    Withdraw { team: TeamId, run: RunId, attempt: Attempt },
}

impl FsArtifacts {
    /// Artifacts under `data_dir`, with each stage's labels file.
    pub fn new(data_dir: &Path, labels: BTreeMap<Stage, PathBuf>) -> FsArtifacts {
        FsArtifacts {
            inner: Arc::new(FsLayout {
                jobs_dir: data_dir.join("jobs"),
                results_dir: data_dir.join("results"),
                leaderboard_dir: data_dir.join("leaderboard"),
                labels,
                known: Mutex::default(),
                parsed_labels: Mutex::default(),
                waiting: Mutex::default(),
                writing: Mutex::default(),
            }),
        }
    }
}

#[async_trait]
impl ArtifactStore for FsArtifacts {
    async fn predictions(&self, run: &RunId, attempt: Attempt, max_bytes: u64) -> Result<Predictions, ActivityError> {
        let (layout, run) = (self.inner.clone(), run.clone());
        blocking(move || layout.predictions(&run, attempt, max_bytes)).await
    }

    async fn labels(&self, stage: Stage) -> Result<Arc<Labels>, ActivityError> {
        let layout = self.inner.clone();
        blocking(move || layout.labels(stage)).await
    }

    /// Both read on one blocking thread: one hop, not two.
    async fn scoring_inputs(
        &self,
        run: &RunId,
        attempt: Attempt,
        max_bytes: u64,
    ) -> Result<(Predictions, Arc<Labels>), ActivityError> {
        let (layout, run) = (self.inner.clone(), run.clone());
        blocking(move || {
            let labels = layout.labels(run.parts().1)?;
            Ok((layout.predictions(&run, attempt, max_bytes)?, labels))
        })
        .await
    }

    async fn publish(&self, result: &PublishedResult) -> Result<Arc<Leaderboard>, ActivityError> {
        self.change(result.stage, Record::Publish(result.clone())).await
    }

    async fn withdraw(&self, team: &TeamId, run: &RunId, attempt: Attempt) -> Result<Arc<Leaderboard>, ActivityError> {
        let record = Record::Withdraw { team: team.clone(), run: run.clone(), attempt };
        self.change(run.parts().1, record).await
    }
}

impl FsArtifacts {
    /// Makes the change durable and its board written, with every change
    /// waiting at the same time: queues it, starts the writer unless one is
    /// at work, and waits for its outcome.
    async fn change(&self, stage: Stage, record: Record) -> Result<Arc<Leaderboard>, ActivityError> {
        let (outcome, answer) = tokio::sync::oneshot::channel();
        let start = {
            let mut waiting = locked(&self.inner.waiting);
            waiting.changes.push(Pending { stage, record, outcome });
            !std::mem::replace(&mut waiting.writer, true)
        };
        if start {
            let writer = Writer { layout: self.inner.clone(), done: false };
            tokio::task::spawn_blocking(move || writer.run());
        }
        // No answer: the writer stopped half-way (a panic), and dropped it.
        answer.await.unwrap_or_else(|_| Err(ActivityError::Transient("a leaderboard writer stopped".into())))
    }
}

/// The one writer at work: takes the waiting changes and writes them, until
/// none waits. Dropped before it is done (its thread never started, or it
/// panicked), it lets the next change start another, and drops the changes
/// still waiting, whose requesters then hear that it stopped.
struct Writer {
    layout: Arc<FsLayout>,
    /// Whether it found no change waiting, and said so.
    done: bool,
}

impl Writer {
    fn run(mut self) {
        let layout = self.layout.clone();
        let mut writing = locked(&layout.writing);
        loop {
            let changes = {
                let mut waiting = locked(&layout.waiting);
                if waiting.changes.is_empty() {
                    // Under the same lock as a change that would find it at work.
                    (waiting.writer, self.done) = (false, true);
                    return;
                }
                std::mem::take(&mut waiting.changes)
            };
            let mut stages = BTreeMap::<Stage, Vec<Pending>>::new();
            for pending in changes {
                stages.entry(pending.stage).or_default().push(pending);
            }
            for (stage, changes) in stages {
                let (records, outcomes): (Vec<Record>, Vec<_>) =
                    changes.into_iter().map(|p| (p.record, p.outcome)).unzip();
                let written = layout.write(&mut writing, stage, records);
                outcomes.into_iter().for_each(|outcome| _ = outcome.send(written.clone()));
            }
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if !self.done {
            let mut waiting = locked(&self.layout.waiting);
            waiting.writer = false;
            waiting.changes.clear();
        }
    }
}

impl FsLayout {
    fn predictions(&self, run: &RunId, attempt: Attempt, max_bytes: u64) -> Result<Predictions, ActivityError> {
        // Beneath the jobs directory, through no link: a link in the job's
        // output could name the labels or another team's predictions.
        let relative = Path::new(&job_name(run, attempt)).join("output").join("submission.csv");
        Ok(match untrusted::read_capped(&self.jobs_dir, &relative, max_bytes)? {
            Contents::Missing => Predictions::Missing,
            Contents::Refused(refusal) => Predictions::Refused(refusal),
            Contents::TooLarge { bytes } => Predictions::TooLarge { bytes },
            Contents::Found(bytes) => Predictions::Found(bytes),
        })
    }

    /// A stage's labels, parsed again only if their file changed since.
    fn labels(&self, stage: Stage) -> Result<Arc<Labels>, ActivityError> {
        let path = self.labels.get(&stage).ok_or_else(|| {
            ActivityError::Permanent(format!("no labels file is configured for stage {stage} in evalflow.toml"))
        })?;
        let unreadable =
            |e: std::io::Error| ActivityError::Permanent(format!("cannot read labels file {}: {e}", path.display()));
        // One stat for each scoring: the file is opened only when it changed.
        let stamp = Stamp::of(&fs::metadata(path).map_err(unreadable)?);
        if let Some((parsed_at, labels)) = locked(&self.parsed_labels).get(&stage)
            && *parsed_at == stamp
        {
            return Ok(labels.clone());
        }
        // Stamped as opened: a change after this is seen by the next scoring.
        let mut file = fs::File::open(path).map_err(unreadable)?;
        let stamp = Stamp::of(&file.metadata().map_err(unreadable)?);
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(unreadable)?;
        let labels = Arc::new(Labels::parse(&bytes, &path.display().to_string())?);
        locked(&self.parsed_labels).insert(stage, (stamp, labels.clone()));
        Ok(labels)
    }

    /// Takes the leaderboard lock (across processes) on `file`, opened the
    /// first time; it is released when the returned guard drops.
    fn lock<'f>(&self, file: &'f mut Option<fs::File>) -> Result<Flock<'f>, ActivityError> {
        let lock = match file {
            Some(lock) => lock,
            None => {
                let path = self.leaderboard_dir.join(".lock");
                let opened = match fs::File::create(&path) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        fs::create_dir_all(&self.leaderboard_dir)?;
                        fs::File::create(&path)?
                    }
                    opened => opened?,
                };
                file.insert(opened)
            }
        };
        lock.lock()?;
        Ok(Flock(lock))
    }

    /// Appends the records the standings do not hold yet to the stage's
    /// journal, then makes them durable and writes the board's files,
    /// unless a board written earlier holds them all.
    fn write(
        &self,
        lock_file: &mut Option<fs::File>,
        stage: Stage,
        records: Vec<Record>,
    ) -> Result<Arc<Leaderboard>, ActivityError> {
        let _lock = self.lock(lock_file)?;
        let mut known = locked(&self.known);
        let known = self.current(&mut known, stage)?;
        for record in records {
            let held = match &record {
                Record::Publish(result) => known.standings.holds(result),
                Record::Withdraw { run, attempt, .. } => known.standings.is_withdrawn(run, *attempt),
            };
            if !held {
                let mut line = serde_json::to_vec(&record).map_err(std::io::Error::other)?;
                line.push(b'\n');
                known.journal.write_all(&line)?;
                known.read += line.len() as u64;
                known.dirty |= apply(&mut known.standings, record);
            }
        }
        if known.written >= known.read {
            return Ok(known.board.clone());
        }
        known.journal.sync_data()?;
        if known.dirty {
            let board = known.standings.board(stage);
            let json_path = self.leaderboard_dir.join(format!("{stage}.json"));
            let json = board.to_json();
            // A row changed since this process wrote the board; before it
            // wrote one, the files may be this board already.
            if known.written > 0 || fs::read_to_string(&json_path).ok().as_deref() != Some(json.as_str()) {
                write_atomic(&self.leaderboard_dir.join(format!("{stage}.csv")), board.to_csv().as_bytes())?;
                write_atomic(&json_path, json.as_bytes())?;
            }
            known.board = Arc::new(board);
            known.dirty = false;
        }
        known.written = known.read;
        Ok(known.board.clone())
    }

    /// The stage's standings with every line of its journal counted: this
    /// process's, and those another process appended since. Called holding
    /// the lock.
    fn current<'k>(&self, known: &'k mut HashMap<Stage, Known>, stage: Stage) -> Result<&'k mut Known, ActivityError> {
        use std::collections::hash_map::Entry;
        let known = match known.entry(stage) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => entry.insert(self.read_files(stage)?),
        };
        let length = known.journal.metadata()?.len();
        if length < known.read {
            // Cut short by someone else: read it all again.
            *known = self.read_files(stage)?;
        }
        if length > known.read {
            let mut tail = Vec::new();
            known.journal.seek(SeekFrom::Start(known.read))?;
            (&known.journal).take(length - known.read).read_to_end(&mut tail)?;
            let (read, changed) = read_lines(&mut known.standings, &tail, &self.journal_path(stage))?;
            known.read += read;
            known.dirty |= changed;
            if known.read < length {
                // A line its writer did not finish: it never counted, and
                // the next line must not be appended to it.
                known.journal.set_len(known.read)?;
            }
        }
        Ok(known)
    }

    fn journal_path(&self, stage: Stage) -> PathBuf {
        self.results_dir.join(stage.as_str()).join("journal.jsonl")
    }

    /// A stage's standings from the results and withdrawals of one file
    /// each, with none of the journal read yet.
    fn read_files(&self, stage: Stage) -> Result<Known, ActivityError> {
        let stage_dir = self.results_dir.join(stage.as_str());
        fs::create_dir_all(&stage_dir)?;
        let (mut results, mut withdrawn) = (Vec::new(), Vec::new());
        for entry in fs::read_dir(&stage_dir)? {
            let path = entry?.path();
            let Some(file) = path.file_name().and_then(|n| n.to_str()) else { continue };
            if let Some(withdrawal) = file.strip_suffix(".withdrawn") {
                withdrawn.extend(parse_withdrawal_name(withdrawal));
            } else if file.ends_with(".json") && !file.starts_with('.') {
                let bytes = fs::read(&path)?;
                let published: PublishedResult = serde_json::from_slice(&bytes)
                    .map_err(|e| ActivityError::Permanent(format!("result {}: {e}", path.display())))?;
                results.push(published);
            }
        }
        let mut standings = Standings::withdrawn(withdrawn);
        for result in results.into_iter().filter(|r| r.stage == stage) {
            standings.publish(result);
        }
        let journal = fs::File::options().read(true).append(true).create(true).open(self.journal_path(stage))?;
        let board = Arc::new(standings.board(stage));
        // The board's files are written again (if they differ) once.
        Ok(Known { standings, journal, read: 0, written: 0, board, dirty: true })
    }
}

/// What tells a file changed: which file it is, its length, and when its
/// contents and its inode last changed (the latter no one can set back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp([i64; 7]);

impl Stamp {
    fn of(meta: &fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        let (dev, ino, len) = (meta.dev() as i64, meta.ino() as i64, meta.len() as i64);
        Stamp([dev, ino, len, meta.mtime(), meta.mtime_nsec(), meta.ctime(), meta.ctime_nsec()])
    }
}

/// The leaderboard lock, held until dropped.
struct Flock<'f>(&'f fs::File);

impl Drop for Flock<'_> {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

fn locked<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Counts a record in the standings; returns whether a row changed.
fn apply(standings: &mut Standings, record: Record) -> bool {
    match record {
        Record::Publish(result) => standings.publish(result),
        Record::Withdraw { team, run, attempt } => standings.withdraw(&team, &run, attempt),
    }
}

/// Counts the journal's complete lines of `bytes`; returns the bytes they
/// take and whether a row changed. A line that is not a record means the
/// journal is damaged.
fn read_lines(standings: &mut Standings, bytes: &[u8], path: &Path) -> Result<(u64, bool), ActivityError> {
    let (mut read, mut changed) = (0, false);
    while let Some(end) = bytes[read..].iter().position(|&b| b == b'\n') {
        let line = &bytes[read..read + end];
        let record: Record = serde_json::from_slice(line).map_err(|e| {
            ActivityError::Permanent(format!(
                "{} is damaged at byte {read}: {e}; restore the data directory from a backup",
                path.display()
            ))
        })?;
        changed |= apply(standings, record);
        read += end + 1;
    }
    Ok((read as u64, changed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use evalflow_workflow::{SubmissionId, Timestamp};

    fn result(submission: &str, score: f64) -> PublishedResult {
        let submission = SubmissionId::new(submission).unwrap();
        PublishedResult {
            run: RunId::new(&submission, Stage::Public),
            team: TeamId::new(format!("team-{submission}")).unwrap(),
            submission,
            stage: Stage::Public,
            attempt: Attempt(1),
            score,
            submitted_at: Timestamp(1_000),
            version: 0,
        }
    }

    fn teams(board: &Leaderboard) -> Vec<&str> {
        board.entries.iter().map(|e| e.submission.as_str()).collect()
    }

    #[tokio::test]
    async fn the_results_of_earlier_versions_count_and_a_torn_line_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let stage_dir = dir.path().join("results/public");
        fs::create_dir_all(&stage_dir).unwrap();
        // One file a result or withdrawal, as before the journal.
        for (name, score) in [("old", 0.4), ("gone", 0.1)] {
            let bytes = serde_json::to_vec_pretty(&result(name, score)).unwrap();
            fs::write(stage_dir.join(format!("{name}-public.json")), bytes).unwrap();
        }
        fs::write(stage_dir.join("gone-public.a1.withdrawn"), b"").unwrap();
        let store = FsArtifacts::new(dir.path(), BTreeMap::new());
        assert_eq!(teams(&store.publish(&result("new", 0.3)).await.unwrap()), ["new", "old"]);

        // A writer died in the middle of a line.
        let journal = stage_dir.join("journal.jsonl");
        let mut file = fs::File::options().append(true).open(&journal).unwrap();
        file.write_all(br#"{"publish":{"run":"torn-pub"#).unwrap();
        let store = FsArtifacts::new(dir.path(), BTreeMap::new());
        assert_eq!(teams(&store.publish(&result("next", 0.2)).await.unwrap()), ["next", "new", "old"]);
        let text = fs::read_to_string(&journal).unwrap();
        assert_eq!(text.lines().count(), 2, "the torn line is gone: {text}");
        assert!(text.lines().all(|l| serde_json::from_str::<Record>(l).is_ok()), "{text}");

        // Published again: nothing is appended.
        let again = store.publish(&result("next", 0.2)).await.unwrap();
        assert_eq!(teams(&again), ["next", "new", "old"]);
        assert_eq!(fs::read_to_string(&journal).unwrap(), text);
    }

    #[tokio::test]
    async fn labels_are_parsed_again_only_once_their_file_changed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("labels.csv");
        fs::write(&path, "filename,label\na.mp4,1\n").unwrap();
        let store = FsArtifacts::new(dir.path(), BTreeMap::from([(Stage::Public, path.clone())]));
        let first = store.labels(Stage::Public).await.unwrap();
        assert!(Arc::ptr_eq(&first, &store.labels(Stage::Public).await.unwrap()), "parsed once");
        // The same length, rewritten in place: the file's times tell.
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(&path, "filename,label\na.mp4,0\n").unwrap();
        let second = store.labels(Stage::Public).await.unwrap();
        assert_eq!(second.is_fake("a.mp4"), Some(false), "{second:?}");
        fs::write(&path, "filename,label\n").unwrap();
        let error = store.labels(Stage::Public).await.unwrap_err().to_string();
        assert!(error.contains("no labels"), "{error}");
    }

    /// Artifacts whose public journal holds `line`, a line that is not a record.
    fn damaged_journal(line: &[u8]) -> (tempfile::TempDir, FsArtifacts) {
        let dir = tempfile::tempdir().unwrap();
        let stage_dir = dir.path().join("results/public");
        fs::create_dir_all(&stage_dir).unwrap();
        fs::write(stage_dir.join("journal.jsonl"), line).unwrap();
        let store = FsArtifacts::new(dir.path(), BTreeMap::new());
        (dir, store)
    }

    #[tokio::test]
    async fn a_damaged_journal_is_named() {
        let (_dir, store) = damaged_journal(b"{\"publish\":1}\n");
        let error = store.publish(&result("a", 0.2)).await.unwrap_err().to_string();
        assert!(error.contains("journal.jsonl is damaged at byte 0"), "{error}");
        assert!(error.contains("restore the data directory from a backup"), "{error}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn publishes_written_together_all_hear_why_they_failed() {
        let (_dir, store) = damaged_journal(b"not a record\n");
        let tasks: Vec<_> = (0..32)
            .map(|n| {
                let store = store.clone();
                tokio::spawn(async move { store.publish(&result(&format!("s{n}"), 0.3)).await })
            })
            .collect();
        for task in tasks {
            let error = task.await.unwrap().unwrap_err().to_string();
            assert!(error.contains("journal.jsonl is damaged at byte 0"), "{error}");
        }
        // The writer answers, then looks once more for changes before it stops.
        for _ in 0..5_000 {
            if !locked(&store.inner.waiting).writer {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let waiting = locked(&store.inner.waiting);
        assert!(waiting.changes.is_empty() && !waiting.writer, "no change is left waiting, no writer at work");
    }

    #[tokio::test]
    async fn a_writer_that_stops_half_way_lets_the_next_change_start_another() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsArtifacts::new(dir.path(), BTreeMap::new());
        let (outcome, answer) = tokio::sync::oneshot::channel();
        let record = Record::Publish(result("a", 0.2));
        *locked(&store.inner.waiting) =
            Waiting { changes: vec![Pending { stage: Stage::Public, record, outcome }], writer: true };
        drop(Writer { layout: store.inner.clone(), done: false }); // as a panic would
        assert!(answer.await.is_err(), "the change waiting hears the writer stopped");
        let board = store.publish(&result("b", 0.3)).await.unwrap();
        assert_eq!(teams(&board), ["b"], "the next change starts a writer");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn publishes_at_once_all_count() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsArtifacts::new(dir.path(), BTreeMap::new());
        let tasks: Vec<_> = (0..64)
            .map(|n| {
                let store = store.clone();
                tokio::spawn(async move {
                    let published = result(&format!("s{n}"), f64::from(n) / 100.0);
                    (published.submission.clone(), store.publish(&published).await.unwrap())
                })
            })
            .collect();
        for task in tasks {
            let (submission, board) = task.await.unwrap();
            assert!(board.entries.iter().any(|e| e.submission == submission), "a publish's board holds it");
        }
        let written: Leaderboard =
            serde_json::from_slice(&fs::read(dir.path().join("leaderboard/public.json")).unwrap()).unwrap();
        assert_eq!(written.entries.len(), 64);
        let fresh = FsArtifacts::new(dir.path(), BTreeMap::new());
        assert_eq!(
            *fresh.withdraw(&TeamId::new("team-s0").unwrap(), &result("s0", 0.0).run, Attempt(1)).await.unwrap(),
            Leaderboard {
                entries: written.entries[1..]
                    .iter()
                    .cloned()
                    .enumerate()
                    .map(|(i, e)| crate::leaderboard::Entry { rank: i + 1, ..e })
                    .collect(),
                ..written
            }
        );
    }
}
