//! Identifiers: what users name (submissions, teams, profiles) and what the
//! system derives from them (runs, attempts, jobs).
//!
//! A user-given id must be safe everywhere it ends up: in a file path, an S3
//! key, an SQS message and an AWS Batch job name (`ef-<run>-a<attempt>`, at
//! most 128 characters of letters, digits, `-` and `_`). So ids are 1 to
//! [`ID_MAX_LEN`] ASCII letters, digits, `_` or `-`, starting with a letter or
//! a digit, and they are checked once, when they enter the system.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The longest user-given id, in characters.
///
/// `ef-` + submission (64) + `-private` (8) + `-a` + attempt (up to 10 digits)
/// stays well under the 128 characters of a Batch job name.
pub const ID_MAX_LEN: usize = 64;

/// The longest job id a job runner may hand back, in bytes.
pub const JOB_ID_MAX_LEN: usize = 256;

/// An id that is not safe to use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The id is empty.
    #[error("{kind} is empty: use 1 to {ID_MAX_LEN} characters from A-Z, a-z, 0-9, '_' and '-'")]
    Empty {
        /// What the id names ("submission id", "team" ...).
        kind: &'static str,
    },
    /// The id is longer than [`ID_MAX_LEN`].
    #[error("{kind} {value:?} is {len} characters long: use at most {ID_MAX_LEN}")]
    TooLong {
        /// What the id names.
        kind: &'static str,
        /// The offending value, shortened for display.
        value: String,
        /// Its length in characters.
        len: usize,
    },
    /// The id has a character outside the safe set, or starts with `_` or `-`.
    #[error(
        "{kind} {value:?} has {found:?} at position {position}: use only A-Z, a-z, 0-9, '_' and '-', \
         starting with a letter or a digit"
    )]
    BadCharacter {
        /// What the id names.
        kind: &'static str,
        /// The offending value.
        value: String,
        /// The first character that breaks the rule.
        found: char,
        /// Its position, counting from 1.
        position: usize,
    },
    /// A run id that is not `<submission>-public` or `<submission>-private`.
    #[error("run id {value:?} is not of the form <submission>-public or <submission>-private")]
    BadRunId {
        /// The offending value.
        value: String,
    },
    /// A job id that is empty or longer than [`JOB_ID_MAX_LEN`].
    #[error("job id of {len} bytes: a job id has 1 to {JOB_ID_MAX_LEN} bytes")]
    BadJobId {
        /// Its length in bytes.
        len: usize,
    },
}

/// Checks `value` against the rule for user-given ids.
fn check_id(kind: &'static str, value: &str) -> Result<(), IdError> {
    let len = value.chars().count();
    if len == 0 {
        return Err(IdError::Empty { kind });
    }
    if len > ID_MAX_LEN {
        let shown: String = value.chars().take(ID_MAX_LEN).collect();
        return Err(IdError::TooLong { kind, value: format!("{shown}..."), len });
    }
    for (index, found) in value.chars().enumerate() {
        let allowed = found.is_ascii_alphanumeric() || (index > 0 && (found == '_' || found == '-'));
        if !allowed {
            return Err(IdError::BadCharacter { kind, value: value.to_owned(), found, position: index + 1 });
        }
    }
    Ok(())
}

/// Declares a validated, user-given id: a `String` that passed [`check_id`].
macro_rules! user_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// What this id names, as used in error messages.
            pub const KIND: &'static str = $kind;

            /// Validates `value` and wraps it.
            pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                check_id($kind, &value)?;
                Ok(Self(value))
            }

            /// The id as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(value: String) -> Result<Self, IdError> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(value: &str) -> Result<Self, IdError> {
                Self::new(value)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

user_id!(
    /// The id of a submission, chosen by the organizer (`good`, `team42-final`).
    SubmissionId,
    "submission id"
);
user_id!(
    /// The team that made a submission; the leaderboard keeps one row per team.
    TeamId,
    "team"
);
user_id!(
    /// The name of a placement profile of the ladder (`g4`, `p3`, `cpu`).
    ProfileName,
    "profile name"
);

/// The test set a submission is evaluated on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// The public test set, scored during the competition.
    Public,
    /// The private test set, scored once on each team's final picks.
    Private,
}

impl Stage {
    /// Every stage, in display order.
    pub const ALL: [Stage; 2] = [Stage::Public, Stage::Private];

    /// The stage's lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Public => "public",
            Stage::Private => "private",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Stage {
    type Err = String;
    fn from_str(value: &str) -> Result<Self, String> {
        match value {
            "public" => Ok(Stage::Public),
            "private" => Ok(Stage::Private),
            other => Err(format!("stage {other:?} is not one of: public, private")),
        }
    }
}

/// One submission evaluated on one stage: `<submission>-<stage>`.
///
/// The stage is the suffix after the last `-`, and stage names have no `-`,
/// so every run id names exactly one (submission, stage) pair.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RunId(String);

impl RunId {
    /// The run of `submission` on `stage`.
    pub fn new(submission: &SubmissionId, stage: Stage) -> Self {
        Self(format!("{submission}-{stage}"))
    }

    /// Splits the id back into its submission and stage.
    pub fn parts(&self) -> (SubmissionId, Stage) {
        // `RunId` is only built by `new` or `parse`, which guarantee the form.
        let (submission, stage) = self.0.rsplit_once('-').unwrap_or_default();
        let stage = if stage == "private" { Stage::Private } else { Stage::Public };
        (SubmissionId(submission.to_owned()), stage)
    }

    /// Parses a run id typed by a user.
    pub fn parse(value: &str) -> Result<Self, IdError> {
        let bad = || IdError::BadRunId { value: value.to_owned() };
        let (submission, stage) = value.rsplit_once('-').ok_or_else(bad)?;
        let stage: Stage = stage.parse().map_err(|_| bad())?;
        Ok(Self::new(&SubmissionId::new(submission)?, stage))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for RunId {
    type Error = IdError;
    fn try_from(value: String) -> Result<Self, IdError> {
        Self::parse(&value)
    }
}

impl From<RunId> for String {
    fn from(id: RunId) -> String {
        id.0
    }
}

impl FromStr for RunId {
    type Err = IdError;
    fn from_str(value: &str) -> Result<Self, IdError> {
        Self::parse(value)
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The number of a launch of a run, from 1, counted over the run's whole life
/// (OOM escalations, interruptions and operator retries all take a new one),
/// so `(run, attempt)` names one job for ever.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Attempt(pub u32);

impl fmt::Display for Attempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The id a job runner gave a launched job (an AWS Batch job id, or the local
/// runner's job directory name).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct JobId(String);

impl JobId {
    /// Wraps a runner's job id.
    pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
        let value = value.into();
        if value.is_empty() || value.len() > JOB_ID_MAX_LEN {
            return Err(IdError::BadJobId { len: value.len() });
        }
        Ok(Self(value))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for JobId {
    type Error = IdError;
    fn try_from(value: String) -> Result<Self, IdError> {
        Self::new(value)
    }
}

impl From<JobId> for String {
    fn from(id: JobId) -> String {
        id.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The deterministic job name of one attempt of a run: `ef-<run>-a<attempt>`.
///
/// Looking this name up before launching is what makes a launch idempotent.
pub fn job_name(run: &RunId, attempt: Attempt) -> String {
    format!("ef-{run}-a{attempt}")
}

/// The run and attempt a job name was made from, if it is one of evalflow's.
pub fn parse_job_name(name: &str) -> Option<(RunId, Attempt)> {
    let (run, attempt) = name.strip_prefix("ef-")?.rsplit_once("-a")?;
    if attempt.is_empty() || !attempt.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((RunId::parse(run).ok()?, Attempt(attempt.parse().ok()?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_safe_ids() {
        for ok in ["a", "good", "team-42_final", "A1", &"x".repeat(ID_MAX_LEN)] {
            assert!(SubmissionId::new(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_unsafe_ids_naming_value_and_rule() {
        let err = SubmissionId::new("../etc/passwd").unwrap_err();
        assert_eq!(
            err.to_string(),
            "submission id \"../etc/passwd\" has '.' at position 1: use only A-Z, a-z, 0-9, '_' and '-', \
             starting with a letter or a digit"
        );
        assert!(matches!(TeamId::new(""), Err(IdError::Empty { kind: "team" })));
        assert!(matches!(TeamId::new("-x"), Err(IdError::BadCharacter { position: 1, .. })));
        assert!(matches!(TeamId::new("a b"), Err(IdError::BadCharacter { found: ' ', .. })));
        assert!(matches!(TeamId::new("é"), Err(IdError::BadCharacter { .. })));
        let long = "x".repeat(ID_MAX_LEN + 1);
        assert!(matches!(SubmissionId::new(long), Err(IdError::TooLong { len: 65, .. })));
    }

    #[test]
    fn run_ids_round_trip_even_when_the_submission_looks_like_a_run() {
        let tricky = SubmissionId::new("a-public").unwrap();
        let run = RunId::new(&tricky, Stage::Private);
        assert_eq!(run.as_str(), "a-public-private");
        assert_eq!(run.parts(), (tricky.clone(), Stage::Private));
        assert_eq!(RunId::parse("a-public-private").unwrap(), run);
        assert!(RunId::parse("good").is_err());
        assert!(RunId::parse("good-staging").is_err());
        assert!(RunId::parse("-public").is_err());
    }

    #[test]
    fn job_names_parse_back_to_their_run_and_attempt() {
        for submission in ["good", "x-ab", "a-public", "a1-a2"] {
            let run = RunId::new(&SubmissionId::new(submission).unwrap(), Stage::Private);
            assert_eq!(parse_job_name(&job_name(&run, Attempt(12))), Some((run, Attempt(12))));
        }
        for other in ["good-public-a1", "ef-good-public", "ef-good-public-a", "ef-good-public-ax", "ef-good-a1"] {
            assert_eq!(parse_job_name(other), None, "{other}");
        }
    }

    #[test]
    fn job_names_fit_batch_rules() {
        let run = RunId::new(&SubmissionId::new("x".repeat(ID_MAX_LEN)).unwrap(), Stage::Private);
        let name = job_name(&run, Attempt(u32::MAX));
        assert!(name.len() <= 128, "{}", name.len());
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
    }

    #[test]
    fn ids_deserialize_only_when_valid() {
        let ok: SubmissionId = serde_json_like("good").unwrap();
        assert_eq!(ok.as_str(), "good");
        assert!(serde_json_like::<SubmissionId>("no/slash").is_err());
    }

    /// Deserializes a bare string through serde without a JSON dependency.
    fn serde_json_like<T: serde::de::DeserializeOwned>(value: &str) -> Result<T, toml::de::Error> {
        #[derive(Deserialize)]
        struct Wrap<T> {
            v: T,
        }
        toml::from_str::<Wrap<T>>(&format!("v = {value:?}")).map(|w| w.v)
    }
}
