//! `evalflow.toml`: the competition, its stages, the policy, and how this
//! machine runs jobs. Relative paths are relative to the file's directory.
//!
//! ```toml
//! [competition]
//! name = "deepfake-detection"
//! metric = "binary_log_loss"          # the only metric: lower is better
//!
//! [stages.public]
//! test_set = "data/public/test"      # the files the submissions predict
//! labels = "data/public/labels.csv"  # filename,label (1 = FAKE); never shown to submissions
//!
//! [policy]                           # see evalflow_workflow::policy
//! time_limit_secs = 32400
//! [[policy.profile]]
//! name = "g4"
//! ...
//!
//! [local]
//! max_concurrent_jobs = 2
//! free_disk_min_mib = 1024           # below this, no new run launches until there is room
//!
//! [api]                              # the engine's HTTP API; these are the defaults
//! header_read_timeout_secs = 10      # also how long a kept-alive connection may idle
//! request_timeout_secs = 60
//! connections_max = 64
//! body_max_mib = 64
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use evalflow_activities::artifacts::check_stage_files;
use evalflow_activities::causes::{SignatureConfig, SignatureError, Signatures};
use evalflow_activities::local::job::Limits;
use evalflow_workflow::{Policy, PolicyConfig, PolicyError, Stage};
use serde::Deserialize;

mod aws;
use aws::check_aws;
pub use aws::{AwsConfig, AwsStage, BatchBootstrap};

/// The configuration file's name.
pub const CONFIG_FILE: &str = "evalflow.toml";

/// A configuration that cannot be used, with what to change.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// No `evalflow.toml`.
    #[error(
        "no {CONFIG_FILE} in {dir}: create a competition there with `evalflow init {dir}`, \
         or point --data-dir (EVALFLOW_DATA_DIR) at one"
    )]
    Missing {
        /// The data directory.
        dir: String,
    },
    /// It cannot be read.
    #[error("cannot read {path}: {error}")]
    Unreadable {
        /// The file.
        path: String,
        /// Why.
        error: std::io::Error,
    },
    /// It is not valid TOML or has unknown fields.
    #[error("{path}: {problem}")]
    Malformed {
        /// The file.
        path: String,
        /// What the parser said, with the line.
        problem: String,
    },
    /// The policy is not usable.
    #[error("{path}: [policy]: {error}")]
    Policy {
        /// The file.
        path: String,
        /// What is wrong.
        error: PolicyError,
    },
    /// A `[[causes.signature]]` does not compile.
    #[error("{path}: {error}")]
    Signature {
        /// The file.
        path: String,
        /// What is wrong.
        error: SignatureError,
    },
    /// The `[api]` table is not usable.
    #[error("{path}: [api]: {problem}")]
    Api {
        /// The file.
        path: String,
        /// What is wrong, and what to change.
        problem: String,
    },
    /// The `[local]` table is not usable.
    #[error("{path}: [local]: {problem}")]
    Local {
        /// The file.
        path: String,
        /// What is wrong, and what to change.
        problem: String,
    },
    /// The `[reproduce]` table is not usable.
    #[error("{path}: [reproduce]: {problem}")]
    Reproduce {
        /// The file.
        path: String,
        /// What is wrong, and what to change.
        problem: String,
    },
    /// The `[aws]` table is not usable.
    #[error("{path}: [aws]: {problem}")]
    Aws {
        /// The file.
        path: String,
        /// What is wrong, and what to change.
        problem: String,
    },
    /// A stage's test set or labels cannot be read.
    #[error("{path}: [stages.{stage}] {what} {target} cannot be read: {problem}")]
    Stage {
        /// The file.
        path: String,
        /// The stage.
        stage: Stage,
        /// `test_set` or `labels`.
        what: &'static str,
        /// The path given.
        target: String,
        /// Why.
        problem: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    competition: Competition,
    #[serde(default)]
    stages: BTreeMap<Stage, StageFile>,
    policy: PolicyConfig,
    #[serde(default)]
    local: LocalConfig,
    #[serde(default)]
    causes: CausesConfig,
    #[serde(default)]
    api: ApiConfig,
    #[serde(default)]
    reproduce: ReproduceConfig,
    aws: Option<AwsConfig>,
}

/// A TOML error in one line: where, and what (the parser's own message
/// spreads a drawing of the line over several, the problem last).
fn toml_problem(text: &str, error: &toml::de::Error) -> String {
    match error.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("line {line}, column {column}: {}", error.message().trim_end())
        }
        None => error.message().trim_end().to_owned(),
    }
}

/// The `[reproduce]` table: when an audit run reproduces its original
/// (`evalflow reproduce`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReproduceConfig {
    /// The largest difference between the two probabilities of one test file
    /// that still counts as reproduced.
    #[serde(default = "default_tolerance")]
    pub tolerance: f64,
}

impl Default for ReproduceConfig {
    fn default() -> Self {
        ReproduceConfig { tolerance: default_tolerance() }
    }
}

fn default_tolerance() -> f64 {
    1e-3
}

/// The `[causes]` table: log signatures the organizer adds to the built-in
/// ones (see `evalflow_activities::causes`).
///
/// ```toml
/// [[causes.signature]]
/// name = "mxnet-oom"
/// resource = "gpu_memory"          # gpu_memory, host_memory or shared_memory
/// pattern = '^mxnet\.base\.MXNetError: .*out of memory'
/// fatal = true                     # false: a warning, counted only if nothing else killed it
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CausesConfig {
    /// The signatures, tried after the built-in ones.
    #[serde(default)]
    pub signature: Vec<SignatureConfig>,
}

/// The `[competition]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Competition {
    /// Its name, shown in reports.
    pub name: String,
    /// How predictions are scored.
    #[serde(default)]
    pub metric: Metric,
}

/// A scoring metric.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Binary log loss of the probability of FAKE, natural log, probabilities
    /// clipped to [1e-15, 1 - 1e-15]; lower is better.
    #[default]
    BinaryLogLoss,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StageFile {
    test_set: PathBuf,
    labels: PathBuf,
}

/// A stage's files, as absolute paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageConfig {
    /// The directory of test files.
    pub test_set: PathBuf,
    /// The labels CSV.
    pub labels: PathBuf,
}

/// The `[local]` table: how this machine runs jobs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalConfig {
    /// Jobs launching or running at once.
    pub max_concurrent_jobs: usize,
    /// Processes and threads per job.
    pub pids_max: u32,
    /// Bytes a job may write (scratch, output, logs), in MiB.
    pub disk_max_mib: u64,
    /// Files and directories a job may have in its scratch and output.
    pub files_max: u64,
    /// Between SIGTERM and SIGKILL, in seconds.
    pub kill_grace_secs: u64,
    /// The largest submitted directory, in MiB.
    pub submission_max_mib: u64,
    /// The free space, in MiB, below which no new run launches (on the
    /// filesystems of the store, the jobs and the results).
    pub free_disk_min_mib: u64,
}

impl Default for LocalConfig {
    fn default() -> Self {
        LocalConfig {
            max_concurrent_jobs: 2,
            pids_max: 256,
            disk_max_mib: 1024,
            files_max: 10_000,
            kill_grace_secs: 5,
            submission_max_mib: 1024,
            free_disk_min_mib: 1024,
        }
    }
}

impl LocalConfig {
    /// The job limits besides memory and time.
    pub fn limits(&self) -> Limits {
        Limits {
            pids_max: self.pids_max,
            disk_max_mib: self.disk_max_mib,
            files_max: self.files_max,
            kill_grace_secs: self.kill_grace_secs,
        }
    }

    /// The largest submitted directory, in bytes.
    pub fn submission_max_bytes(&self) -> u64 {
        self.submission_max_mib.saturating_mul(1 << 20)
    }
}

/// The `[api]` table: the limits of the engine's HTTP API, which bound what
/// one client can hold (a connection slot, the engine's attention).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// How long a client may take to send a request's headers, counted from
    /// when the server waits for them: also how long a kept-alive connection
    /// may stay idle, in seconds.
    pub header_read_timeout_secs: u64,
    /// How long one request may take, reading its body included, in seconds.
    pub request_timeout_secs: u64,
    /// Connections served at once; more wait in the listen backlog.
    pub connections_max: usize,
    /// The largest request body, in MiB (a submit of many runs is the largest).
    pub body_max_mib: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig { header_read_timeout_secs: 10, request_timeout_secs: 60, connections_max: 64, body_max_mib: 64 }
    }
}

impl ApiConfig {
    fn check(&self) -> Result<(), String> {
        let zero = [
            ("header_read_timeout_secs", self.header_read_timeout_secs == 0),
            ("request_timeout_secs", self.request_timeout_secs == 0),
            ("connections_max", self.connections_max == 0),
            ("body_max_mib", self.body_max_mib == 0),
        ];
        match zero.iter().find(|(_, is_zero)| *is_zero) {
            Some((name, _)) => Err(format!("{name} is 0: give it at least 1, or leave it out for the default")),
            None => Ok(()),
        }
    }
}

/// A loaded, checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The directory holding `evalflow.toml` and the competition's state.
    pub data_dir: PathBuf,
    /// The competition.
    pub competition: Competition,
    /// Each stage's files.
    pub stages: BTreeMap<Stage, StageConfig>,
    /// The policy.
    pub policy: Policy,
    /// How this machine runs jobs.
    pub local: LocalConfig,
    /// The organizer's log signatures.
    pub causes: CausesConfig,
    /// The limits of the engine's HTTP API.
    pub api: ApiConfig,
    /// When an audit reproduces its original.
    pub reproduce: ReproduceConfig,
    /// The AWS deployment, when the competition runs there.
    pub aws: Option<AwsConfig>,
}

impl Config {
    /// Loads and checks `data_dir/evalflow.toml`.
    pub fn load(data_dir: &Path) -> Result<Config, ConfigError> {
        let data_dir = std::path::absolute(data_dir)
            .map_err(|error| ConfigError::Unreadable { path: data_dir.display().to_string(), error })?;
        let path = data_dir.join(CONFIG_FILE);
        let shown = path.display().to_string();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ConfigError::Missing { dir: data_dir.display().to_string() });
            }
            Err(error) => return Err(ConfigError::Unreadable { path: shown, error }),
        };
        let file: ConfigFile = toml::from_str(&text)
            .map_err(|e| ConfigError::Malformed { path: shown.clone(), problem: toml_problem(&text, &e) })?;
        if file.local.max_concurrent_jobs == 0 {
            let problem = "max_concurrent_jobs = 0 would launch nothing, ever: use 1 or more".into();
            return Err(ConfigError::Local { path: shown, problem });
        }
        let policy = Policy::new(file.policy).map_err(|error| ConfigError::Policy { path: shown.clone(), error })?;
        let mut stages = BTreeMap::new();
        for (stage, files) in file.stages {
            let resolved = StageConfig { test_set: data_dir.join(files.test_set), labels: data_dir.join(files.labels) };
            check_stage(&shown, stage, &resolved)?;
            stages.insert(stage, resolved);
        }
        if let Some(aws) = &file.aws {
            check_aws(aws, &policy).map_err(|problem| ConfigError::Aws { path: shown.clone(), problem })?;
        }
        Signatures::new(&file.causes.signature)
            .map_err(|error| ConfigError::Signature { path: shown.clone(), error })?;
        file.api.check().map_err(|problem| ConfigError::Api { path: shown.clone(), problem })?;
        let tolerance = file.reproduce.tolerance;
        if !(tolerance.is_finite() && tolerance >= 0.0) {
            let problem = format!("tolerance = {tolerance}: use a finite difference of 0 or more, such as 0.001");
            return Err(ConfigError::Reproduce { path: shown, problem });
        }
        let ConfigFile { competition, local, causes, api, reproduce, aws, .. } = file;
        Ok(Config { data_dir, competition, stages, policy, local, causes, api, reproduce, aws })
    }

    /// The stages whose test set and labels do not agree (a bad header,
    /// duplicate names, values other than 0 and 1, labels of files not in
    /// the test set, an empty test set), with what is wrong: the
    /// organizer's to fix, and no run of theirs should launch meanwhile.
    /// On AWS the files are in S3 and are checked when scored.
    pub fn stage_problems(&self) -> BTreeMap<Stage, String> {
        if self.aws.is_some() {
            return BTreeMap::new();
        }
        let checked =
            self.stages.iter().map(|(stage, files)| (*stage, check_stage_files(&files.test_set, &files.labels)));
        checked.filter_map(|(stage, checked)| Some((stage, checked.err()?))).collect()
    }

    /// The log signatures: the built-in ones, then the organizer's (checked when loaded).
    pub fn signatures(&self) -> Signatures {
        Signatures::new(&self.causes.signature).unwrap_or_else(|e| unreachable!("checked at load: {e}"))
    }

    /// The directory of the sled store.
    pub fn store_dir(&self) -> PathBuf {
        self.data_dir.join("state").join("store")
    }

    /// The lock one submit at a time holds.
    pub fn submit_lock(&self) -> PathBuf {
        self.data_dir.join("state").join("submit.lock")
    }

    /// The directory of job directories.
    pub fn jobs_dir(&self) -> PathBuf {
        self.data_dir.join("jobs")
    }

    /// Where submitted directories are kept.
    pub fn submissions_dir(&self) -> PathBuf {
        self.data_dir.join("submissions")
    }

    /// Keeps the data directory to the engine's user: no other user may
    /// list it (0711: job sandboxes, which run as unprivileged uids, pass
    /// through it to `jobs/` and the test sets); the store, the kept
    /// submissions, the results and the leaderboards are 0700; each stage's
    /// labels 0600. Says so when it changes a mode.
    pub fn make_private(&self) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let mut dirs: Vec<(PathBuf, u32)> =
            ["state", "submissions", "results", "leaderboard"].map(|d| (self.data_dir.join(d), 0o700)).into();
        dirs.push((self.jobs_dir(), 0o711));
        for (dir, _) in &dirs {
            std::fs::create_dir_all(dir)?;
        }
        let labels = self.stages.values().map(|stage| (stage.labels.clone(), 0o600));
        let private = std::iter::once((self.data_dir.clone(), 0o711)).chain(dirs).chain(labels);
        for (path, mode) in private {
            let current = match std::fs::metadata(&path) {
                Ok(metadata) => metadata.permissions().mode() & 0o777,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            if current != mode {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
                tracing::info!("{} was mode {current:o}: now {mode:o}", path.display());
            }
        }
        Ok(())
    }

    /// The file of the secret jobs' output locations are derived with:
    /// `[aws] output_key_file`, or `state/output.key`.
    pub fn output_key_file(&self) -> PathBuf {
        let configured = self.aws.as_ref().and_then(|aws| aws.output_key_file.as_deref());
        self.data_dir.join(configured.unwrap_or(Path::new("state/output.key")))
    }
}

fn check_stage(path: &str, stage: Stage, files: &StageConfig) -> Result<(), ConfigError> {
    let fail = |what, target: &Path, problem: String| ConfigError::Stage {
        path: path.to_owned(),
        stage,
        what,
        target: target.display().to_string(),
        problem,
    };
    std::fs::read_dir(&files.test_set).map_err(|e| fail("test_set", &files.test_set, e.to_string()))?;
    let labels = std::fs::metadata(&files.labels).map_err(|e| fail("labels", &files.labels, e.to_string()))?;
    if !labels.is_file() {
        return Err(fail("labels", &files.labels, "not a file".into()));
    }
    let real = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    if real(&files.labels).starts_with(real(&files.test_set)) {
        let problem = "it is inside the test set, which every submission reads: move it out".into();
        return Err(fail("labels", &files.labels, problem));
    }
    Ok(())
}

/// A minimal `evalflow.toml` for unit tests: a public stage in `test` and
/// `labels.csv`, one profile.
#[cfg(test)]
pub(crate) const TEST_CONFIG: &str = r#"
[competition]
name = "t"
[stages.public]
test_set = "test"
labels = "labels.csv"
[policy]
time_limit_secs = 10
[[policy.profile]]
name = "g4"
host_memory_mib = 128
gpu_memory_mib = 1
vcpus = 1
price_per_hour_usd = 0.5
"#;

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = TEST_CONFIG;

    fn load(text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("test")).unwrap();
        std::fs::write(dir.path().join("labels.csv"), "filename,label\n").unwrap();
        std::fs::write(dir.path().join(CONFIG_FILE), text).unwrap();
        Config::load(dir.path())
    }

    #[test]
    fn a_good_config_loads_with_absolute_paths() {
        let config = load(GOOD).unwrap();
        assert!(config.stages[&Stage::Public].test_set.is_absolute());
        assert_eq!(config.local, LocalConfig::default());
        assert_eq!(config.output_key_file(), config.data_dir.join("state/output.key"));
    }

    #[test]
    fn bad_configs_name_the_problem() {
        let missing = Config::load(tempfile::tempdir().unwrap().path()).unwrap_err().to_string();
        assert!(missing.contains("no evalflow.toml in") && missing.contains("evalflow init"), "{missing}");
        let typo = load(&GOOD.replace("[local]", "").replace("name = \"t\"", "name = \"t\"\nmetrc = 1")).unwrap_err();
        assert!(typo.to_string().contains("unknown field `metrc`"), "{typo}");
        let stage = load(&GOOD.replace("\"test\"", "\"nope\"")).unwrap_err().to_string();
        assert!(stage.contains("[stages.public] test_set") && stage.contains("nope"), "{stage}");
        let policy = load(&GOOD.replace("time_limit_secs = 10", "time_limit_secs = 0")).unwrap_err().to_string();
        assert!(policy.contains("[policy]: time_limit_secs = 0"), "{policy}");
        let api = load(&format!("{GOOD}[api]\nconnections_max = 0\n")).unwrap_err().to_string();
        assert!(api.contains("[api]: connections_max is 0: give it at least 1"), "{api}");
        let syntax = load("[competition\n").unwrap_err().to_string();
        assert!(syntax.contains("line 1"), "{syntax}");
    }
}
