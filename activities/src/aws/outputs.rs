//! Where an attempt's job writes its predictions:
//! `outputs/<run>/a<attempt>-<tag>/`, where the tag is the first 128 bits of
//! HMAC-SHA256(key, `<run>/a<attempt>`), in hex.
//!
//! Every job's role may write under `outputs/`, and every run id is public.
//! Without the tag, a job could overwrite a rival's predictions between the
//! rival's job ending and its scoring. With it, a location can only be
//! learned from the job it was given to (its `EVALFLOW_OUTPUT_URI`): the job
//! role cannot list the bucket, and the key never leaves the engine's and the
//! workers' hosts.
//!
//! The key is 32 random bytes in a file (`state/output.key` of the data
//! directory by default), mode 0600. The tag is deterministic, so a relaunch
//! or an adopted job, by any worker holding the key, computes the location
//! the first launch gave the job. Changing the key moves every location: do
//! it only when no job is running or waiting to be scored.

use std::fmt;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use evalflow_workflow::{Attempt, RunId};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The size of an output key, in bytes.
pub const OUTPUT_KEY_BYTES: usize = 32;
/// The bytes of the HMAC kept in a tag (128 bits).
const TAG_BYTES: usize = 16;
/// Permission bits of group and others, none of which a key file may have.
const GROUP_OTHER_BITS: u32 = 0o077;

/// The secret that output locations are derived with.
#[derive(Clone, PartialEq, Eq)]
pub struct OutputKey([u8; OUTPUT_KEY_BYTES]);

impl fmt::Debug for OutputKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OutputKey(..)")
    }
}

/// Why the output key cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum OutputKeyError {
    /// There is no key file, and this process may not make one.
    #[error(
        "the output key {path} is missing: copy the engine's (its data directory's state/output.key, made by \
         `evalflow aws bootstrap` or `evalflow serve`) there with mode 0600, or set [aws] output_key_file"
    )]
    Missing {
        /// The key file.
        path: String,
    },
    /// Group or others may read or write the key file.
    #[error(
        "the output key {path} is open to group or others (mode {mode:o}): run `chmod 600 {path}` (and if \
         someone else may have read it, replace it while no job is running)"
    )]
    Exposed {
        /// The key file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// The key file does not hold a key.
    #[error(
        "the output key {path} is {bytes} bytes instead of {OUTPUT_KEY_BYTES}: restore the engine's key \
         (a new one would lose the predictions of jobs already launched)"
    )]
    Malformed {
        /// The key file.
        path: String,
        /// How many bytes it has (at most one more than a key).
        bytes: usize,
    },
    /// Reading or writing the key file failed.
    #[error("cannot {action} the output key {path}: {error}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The key file.
        path: String,
        /// What went wrong.
        #[source]
        error: io::Error,
    },
    /// The system has no randomness to give.
    #[error("cannot draw random bytes for a new output key: {0}")]
    Random(String),
}

impl OutputKey {
    /// Reads the key at `path`, refusing a file others may access.
    pub fn load(path: &Path) -> Result<OutputKey, OutputKeyError> {
        let shown = || path.display().to_string();
        let io = |action| move |error| OutputKeyError::Io { action, path: shown(), error };
        let file = match std::fs::File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(OutputKeyError::Missing { path: shown() }),
            Err(e) => return Err(io("open")(e)),
        };
        let mode = file.metadata().map_err(io("inspect"))?.permissions().mode();
        if mode & GROUP_OTHER_BITS != 0 {
            return Err(OutputKeyError::Exposed { path: shown(), mode: mode & 0o777 });
        }
        let mut bytes = Vec::with_capacity(OUTPUT_KEY_BYTES + 1);
        file.take(OUTPUT_KEY_BYTES as u64 + 1).read_to_end(&mut bytes).map_err(io("read"))?;
        let key = <[u8; OUTPUT_KEY_BYTES]>::try_from(bytes.as_slice())
            .map_err(|_| OutputKeyError::Malformed { path: shown(), bytes: bytes.len() })?;
        Ok(OutputKey(key))
    }

    /// Reads the key at `path`, first making one if there is none; says
    /// whether it made it. Of processes making it at once, one wins and all
    /// read its key.
    pub fn load_or_create(path: &Path) -> Result<(OutputKey, bool), OutputKeyError> {
        match OutputKey::load(path) {
            Err(OutputKeyError::Missing { .. }) => {
                let created = create(path)?;
                Ok((OutputKey::load(path)?, created))
            }
            loaded => Ok((loaded?, false)),
        }
    }

    /// The tag of an attempt's output location: 32 hex digits.
    pub fn tag(&self, run: &RunId, attempt: Attempt) -> String {
        let mut mac = match Hmac::<Sha256>::new_from_slice(&self.0) {
            Ok(mac) => mac,
            Err(_) => unreachable!("HMAC takes keys of any length"),
        };
        mac.update(format!("{run}/a{attempt}").as_bytes());
        mac.finalize().into_bytes()[..TAG_BYTES].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The S3 key prefix the attempt's job writes `submission.csv` under:
    /// `outputs/<run>/a<attempt>-<tag>/`.
    pub fn prefix(&self, run: &RunId, attempt: Attempt) -> String {
        format!("outputs/{run}/a{attempt}-{}/", self.tag(run, attempt))
    }
}

/// Writes a new random key to `path`, mode 0600, unless a file is already
/// there: the key goes to a temporary file first, then is linked into place
/// only if nothing is there yet (a rename would replace a key another process
/// made meanwhile, and may be using). `Ok(false)` when another process won.
fn create(path: &Path) -> Result<bool, OutputKeyError> {
    let shown = || path.display().to_string();
    let io = |action| move |error| OutputKeyError::Io { action, path: shown(), error };
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io("make the directory of"))?;
    let mut key = [0_u8; OUTPUT_KEY_BYTES];
    getrandom::fill(&mut key).map_err(|e| OutputKeyError::Random(e.to_string()))?;
    // tempfile makes its files with mode 0600.
    let mut temp = tempfile::NamedTempFile::new_in(dir).map_err(io("create"))?;
    temp.write_all(&key).map_err(io("write"))?;
    temp.as_file().sync_all().map_err(io("write"))?;
    match temp.persist_noclobber(path) {
        Ok(_) => {}
        Err(e) if e.error.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => return Err(io("create")(e.error)),
    }
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io("write the directory of"))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use std::fs;

    use evalflow_workflow::{Stage, SubmissionId};

    use super::*;

    fn run() -> RunId {
        RunId::new(&SubmissionId::new("sub1").unwrap(), Stage::Public)
    }

    #[test]
    fn a_key_is_made_once_with_mode_0600_and_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state").join("output.key");
        let (made, created) = OutputKey::load_or_create(&path).unwrap();
        assert!(created);
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::read(&path).unwrap().len(), OUTPUT_KEY_BYTES);
        let (again, created) = OutputKey::load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(again, made);
        assert_eq!(OutputKey::load(&path).unwrap(), made);
        assert_eq!(fs::read_dir(path.parent().unwrap()).unwrap().count(), 1, "no temporary file is left");
    }

    #[test]
    fn processes_making_a_key_at_once_all_get_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("output.key");
        let keys: Vec<OutputKey> = std::thread::scope(|scope| {
            let makers: Vec<_> = (0..8).map(|_| scope.spawn(|| OutputKey::load_or_create(&path).unwrap().0)).collect();
            makers.into_iter().map(|m| m.join().unwrap()).collect()
        });
        assert!(keys.iter().all(|k| *k == keys[0]));
    }

    #[test]
    fn a_missing_exposed_or_malformed_key_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("output.key");
        let missing = OutputKey::load(&path).unwrap_err();
        assert!(matches!(missing, OutputKeyError::Missing { .. }), "{missing}");
        assert!(!path.exists(), "loading alone makes no key");

        OutputKey::load_or_create(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let exposed = OutputKey::load_or_create(&path).unwrap_err().to_string();
        assert!(exposed.contains(&format!("chmod 600 {}", path.display())), "{exposed}");
        assert!(exposed.contains("mode 640"), "{exposed}");

        fs::write(&path, b"short").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let malformed = OutputKey::load_or_create(&path).unwrap_err();
        assert!(matches!(malformed, OutputKeyError::Malformed { bytes: 5, .. }), "{malformed}");
    }

    #[test]
    fn prefixes_are_deterministic_per_key_and_differ_across_keys_and_attempts() {
        let (one, two) = (OutputKey([1; OUTPUT_KEY_BYTES]), OutputKey([2; OUTPUT_KEY_BYTES]));
        let prefix = one.prefix(&run(), Attempt(1));
        assert_eq!(prefix, one.clone().prefix(&run(), Attempt(1)));
        let tag = prefix.strip_prefix("outputs/sub1-public/a1-").unwrap().strip_suffix('/').unwrap();
        assert_eq!(tag.len(), 2 * TAG_BYTES);
        assert!(tag.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_ne!(prefix, two.prefix(&run(), Attempt(1)));
        assert_ne!(prefix, one.prefix(&run(), Attempt(2)));
        assert_eq!(format!("{one:?}"), "OutputKey(..)", "debug output hides the key");
    }

    #[test]
    fn tags_are_hmac_sha256_truncated_to_128_bits() {
        // Python: hmac.new(bytes([7] * 32), b"sub1-public/a3", hashlib.sha256).hexdigest()[:32]
        let key = OutputKey([7; OUTPUT_KEY_BYTES]);
        assert_eq!(key.tag(&run(), Attempt(3)), "762f2c7acfd1025bee29d0afc0b5d36b");
    }
}
