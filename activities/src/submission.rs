//! The local submission contract: a directory with a `submission.toml`.
//!
//! ```toml
//! command = ["python3", "predict.py"]   # run in a scratch copy of the directory
//! cpu_only = false                       # optional: true puts it on the CPU ladder
//! ```
//!
//! The program reads the test set from `$EVALFLOW_INPUT_DIR` (read-only) and
//! writes `$EVALFLOW_OUTPUT_DIR/submission.csv` with the header
//! `filename,label` and one row per test file: the probability that the file
//! is FAKE. Exit code [`GPU_OOM_EXIT_CODE`] reports running out of GPU memory.

use std::path::Path;

use serde::Deserialize;

use crate::untrusted::{self, Contents};

/// The exit code a submission uses to say it ran out of GPU memory (CUDA
/// out-of-memory is not visible to the runner otherwise).
pub const GPU_OOM_EXIT_CODE: i32 = 86;

/// The file a submission directory must have.
pub const MANIFEST: &str = "submission.toml";

/// The largest `submission.toml` read, in bytes.
const MANIFEST_MAX_BYTES: u64 = 64 * 1024;

/// The longest command line, in bytes.
const COMMAND_MAX_LEN: usize = 4096;

/// A parsed `submission.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The program and its arguments.
    pub command: Vec<String>,
    /// Whether it runs on the CPU ladder.
    #[serde(default)]
    pub cpu_only: bool,
}

/// Why a submission directory cannot be run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// No `submission.toml`.
    #[error("{dir} has no {MANIFEST}: add one with command = [\"python3\", \"predict.py\"]")]
    Missing {
        /// The directory.
        dir: String,
    },
    /// It does not parse.
    #[error("{dir}/{MANIFEST} is not valid: {problem}")]
    Invalid {
        /// The directory.
        dir: String,
        /// What the parser said.
        problem: String,
    },
    /// An empty command, an empty argument or one with a NUL byte.
    #[error(
        "{dir}/{MANIFEST}: command must be a non-empty list of non-empty strings without NUL bytes, \
         {COMMAND_MAX_LEN} bytes at most, e.g. command = [\"python3\", \"predict.py\"]"
    )]
    BadCommand {
        /// The directory.
        dir: String,
    },
}

impl Manifest {
    /// Reads and checks `dir/submission.toml`.
    pub fn read(dir: &Path) -> Result<Manifest, ManifestError> {
        let shown = dir.display().to_string();
        let invalid = |problem: String| ManifestError::Invalid { dir: shown.clone(), problem };
        // The directory is the submitter's: no link, no FIFO, a bounded read.
        let bytes = match untrusted::read_capped(dir, Path::new(MANIFEST), MANIFEST_MAX_BYTES) {
            Ok(Contents::Found(bytes)) => bytes,
            Ok(Contents::Missing) => return Err(ManifestError::Missing { dir: shown.clone() }),
            Ok(Contents::Refused(refusal)) => return Err(invalid(format!("{MANIFEST} {refusal}"))),
            Ok(Contents::TooLarge { .. }) => {
                return Err(invalid(format!("{MANIFEST} is larger than {MANIFEST_MAX_BYTES} bytes")));
            }
            Err(e) => return Err(invalid(e.to_string())),
        };
        let text = String::from_utf8(bytes).map_err(|_| invalid(format!("{MANIFEST} is not UTF-8")))?;
        let manifest: Manifest =
            toml::from_str(&text).map_err(|e| ManifestError::Invalid { dir: shown.clone(), problem: e.to_string() })?;
        let length: usize = manifest.command.iter().map(String::len).sum();
        let bad_arg = manifest.command.iter().any(|a| a.is_empty() || a.contains('\0'));
        if manifest.command.is_empty() || bad_arg || length > COMMAND_MAX_LEN {
            return Err(ManifestError::BadCommand { dir: shown });
        }
        Ok(manifest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: Option<&str>) -> Result<Manifest, ManifestError> {
        let dir = tempfile::tempdir().unwrap();
        if let Some(text) = text {
            std::fs::write(dir.path().join(MANIFEST), text).unwrap();
        }
        Manifest::read(dir.path())
    }

    #[test]
    fn a_good_manifest_reads() {
        let m = read(Some("command = [\"python3\", \"predict.py\"]\ncpu_only = true\n")).unwrap();
        assert_eq!(m, Manifest { command: vec!["python3".into(), "predict.py".into()], cpu_only: true });
    }

    #[test]
    fn broken_manifests_name_the_problem_and_the_fix() {
        assert!(read(None).unwrap_err().to_string().contains("has no submission.toml: add one with command"));
        assert!(
            matches!(read(Some("cpu_only = true")), Err(ManifestError::Invalid { problem, .. }) if problem.contains("missing field `command`"))
        );
        assert!(matches!(read(Some("command = []")), Err(ManifestError::BadCommand { .. })));
        assert!(matches!(read(Some("command = [\"\"]")), Err(ManifestError::BadCommand { .. })));
        assert!(matches!(read(Some("command = \"python3 x.py\"")), Err(ManifestError::Invalid { .. })));
        assert!(
            matches!(read(Some("command = [\"a\"]\ngpu = 1")), Err(ManifestError::Invalid { problem, .. }) if problem.contains("unknown field `gpu`"))
        );
    }
}
