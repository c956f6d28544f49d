//! Where the evaluation's files are: the predictions a job wrote, the
//! private labels, the published results and the leaderboards.
//!
//! [`FsArtifacts`] keeps them in the data directory:
//!
//! | path | what |
//! |---|---|
//! | `jobs/<job>/output/submission.csv` | a job's predictions (read beneath `jobs/`, through no link, at most the cap + 1 bytes) |
//! | `results/<stage>/<run>.json` | a published result (one per run) |
//! | `results/<stage>/<run>.a<attempt>.withdrawn` | a withdrawal: that attempt's result does not count |
//! | `leaderboard/<stage>.json`, `.csv` | the leaderboard, rebuilt from the results |
//!
//! Publishers and withdrawers take `leaderboard/.lock` in turn, across processes.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use evalflow_workflow::{Attempt, RunId, Stage, job_name};

use crate::fsutil::write_atomic;
use crate::leaderboard::{Leaderboard, PublishedResult};
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
    async fn labels(&self, stage: Stage) -> Result<Labels, ActivityError>;

    /// Records a published result, once, and rebuilds its stage's leaderboard
    /// from every result. Publishing the same result again changes nothing.
    async fn publish(&self, result: &PublishedResult) -> Result<Leaderboard, ActivityError>;

    /// Keeps the result of the run's attempt off the leaderboard, whether it
    /// was published before or is published after, and rebuilds the
    /// leaderboard. Withdrawing again changes nothing.
    async fn withdraw(&self, run: &RunId, attempt: Attempt) -> Result<Leaderboard, ActivityError>;
}

/// The name a withdrawal goes by: `<run>.a<attempt>`.
pub fn withdrawal_name(run: &RunId, attempt: Attempt) -> String {
    format!("{run}.a{attempt}")
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
            }),
        }
    }
}

#[async_trait]
impl ArtifactStore for FsArtifacts {
    async fn predictions(&self, run: &RunId, attempt: Attempt, max_bytes: u64) -> Result<Predictions, ActivityError> {
        // Beneath the jobs directory, through no link: a link in the job's
        // output could name the labels or another team's predictions.
        let jobs_dir = self.inner.jobs_dir.clone();
        let relative = Path::new(&job_name(run, attempt)).join("output").join("submission.csv");
        blocking(move || {
            Ok(match untrusted::read_capped(&jobs_dir, &relative, max_bytes)? {
                Contents::Missing => Predictions::Missing,
                Contents::Refused(refusal) => Predictions::Refused(refusal),
                Contents::TooLarge { bytes } => Predictions::TooLarge { bytes },
                Contents::Found(bytes) => Predictions::Found(bytes),
            })
        })
        .await
    }

    async fn labels(&self, stage: Stage) -> Result<Labels, ActivityError> {
        let path = self.inner.labels.get(&stage).cloned().ok_or_else(|| {
            ActivityError::Permanent(format!("no labels file is configured for stage {stage} in evalflow.toml"))
        })?;
        blocking(move || {
            let bytes = fs::read(&path)
                .map_err(|e| ActivityError::Permanent(format!("cannot read labels file {}: {e}", path.display())))?;
            Labels::parse(&bytes, &path.display().to_string())
        })
        .await
    }

    async fn publish(&self, result: &PublishedResult) -> Result<Leaderboard, ActivityError> {
        let (layout, result) = (self.inner.clone(), result.clone());
        blocking(move || {
            let bytes = serde_json::to_vec_pretty(&result).map_err(std::io::Error::other)?;
            layout.record_and_rebuild(result.stage, &format!("{}.json", result.run), &bytes)
        })
        .await
    }

    async fn withdraw(&self, run: &RunId, attempt: Attempt) -> Result<Leaderboard, ActivityError> {
        let (layout, stage) = (self.inner.clone(), run.parts().1);
        let name = format!("{}.withdrawn", withdrawal_name(run, attempt));
        blocking(move || layout.record_and_rebuild(stage, &name, b"")).await
    }
}

impl FsLayout {
    /// Writes `bytes` to `results/<stage>/<name>` (unless already there) and
    /// rebuilds the stage's leaderboard, holding the leaderboard lock.
    fn record_and_rebuild(&self, stage: Stage, name: &str, bytes: &[u8]) -> Result<Leaderboard, ActivityError> {
        let stage_dir = self.results_dir.join(stage.as_str());
        fs::create_dir_all(&stage_dir)?;
        fs::create_dir_all(&self.leaderboard_dir)?;
        let lock = fs::File::create(self.leaderboard_dir.join(".lock"))?;
        lock.lock()?;
        let record = stage_dir.join(name);
        if fs::read(&record).ok().as_deref() != Some(bytes) {
            write_atomic(&record, bytes)?;
        }
        let mut results = Vec::new();
        let mut withdrawn = std::collections::HashSet::new();
        for entry in fs::read_dir(&stage_dir)? {
            let path = entry?.path();
            let Some(file) = path.file_name().and_then(|n| n.to_str()) else { continue };
            if let Some(withdrawal) = file.strip_suffix(".withdrawn") {
                withdrawn.insert(withdrawal.to_owned());
            } else if file.ends_with(".json") {
                let bytes = fs::read(&path)?;
                let published: PublishedResult = serde_json::from_slice(&bytes)
                    .map_err(|e| ActivityError::Permanent(format!("result {}: {e}", path.display())))?;
                results.push(published);
            }
        }
        results.retain(|r| !withdrawn.contains(&withdrawal_name(&r.run, r.attempt)));
        let board = Leaderboard::build(stage, results);
        let json_path = self.leaderboard_dir.join(format!("{stage}.json"));
        let json = board.to_json();
        if fs::read_to_string(&json_path).ok().as_deref() != Some(json.as_str()) {
            write_atomic(&self.leaderboard_dir.join(format!("{stage}.csv")), board.to_csv().as_bytes())?;
            write_atomic(&json_path, json.as_bytes())?;
        }
        Ok(board)
    }
}
