//! The API's token: 32 random bytes, in hex, kept in `DIR/state/api.token`
//! with mode 0600. Every API request carries it (`Authorization: Bearer
//! TOKEN`), so only a user who can read that file (the engine's own, and
//! root) can use the engine. The engine makes the file at its first start and
//! reuses it after; it refuses one that group or others can read.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use subtle::ConstantTimeEq;

/// The token's file, under the data directory.
const TOKEN_FILE: &str = "state/api.token";
/// The token's length in bytes, before hex encoding.
const TOKEN_BYTES: usize = 32;

/// Why the token cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The file exists but cannot be read.
    #[error(
        "cannot read the API token {path}: {error} (it is readable by the engine's user only: run this as that user)"
    )]
    Unreadable {
        /// The file.
        path: String,
        /// Why.
        error: io::Error,
    },
    /// Group or others may read or change the file.
    #[error(
        "the API token {path} is open to other users (mode {mode:03o}): \
         run `chmod 600 {path}`, then start the engine again"
    )]
    Exposed {
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// The file is not a token (or not a regular file).
    #[error("{path} is not an API token ({problem}): remove it, and the engine makes a new one when it starts")]
    Malformed {
        /// The file.
        path: String,
        /// What is wrong.
        problem: &'static str,
    },
    /// The file cannot be made.
    #[error("cannot create the API token {path}: {error}")]
    Create {
        /// The file.
        path: String,
        /// Why.
        error: io::Error,
    },
}

impl TokenError {
    /// Whether the file is there but this user may not read it.
    pub fn is_permission_denied(&self) -> bool {
        matches!(self, TokenError::Unreadable { error, .. } if error.kind() == io::ErrorKind::PermissionDenied)
    }
}

/// A data directory's API token.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiToken(String);

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiToken(..)")
    }
}

impl ApiToken {
    /// Where the token of `data_dir` is kept.
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(TOKEN_FILE)
    }

    /// The engine's token: the one in `data_dir`, or a new one written there
    /// (mode 0600, atomically). An existing file that group or others can read
    /// is refused. Call it holding the data directory's lock.
    pub fn load_or_create(data_dir: &Path) -> Result<ApiToken, TokenError> {
        let path = ApiToken::path(data_dir);
        match fs::symlink_metadata(&path) {
            Ok(meta) => {
                let mode = meta.permissions().mode() & 0o777;
                if meta.file_type().is_file() && mode & 0o077 != 0 {
                    return Err(TokenError::Exposed { path: path.display().to_string(), mode });
                }
                ApiToken::read(data_dir)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => ApiToken::create(&path),
            Err(error) => Err(TokenError::Unreadable { path: path.display().to_string(), error }),
        }
    }

    /// The token the engine of `data_dir` made, for a client.
    pub fn read(data_dir: &Path) -> Result<ApiToken, TokenError> {
        let path = ApiToken::path(data_dir);
        let shown = || path.display().to_string();
        let malformed = |problem| TokenError::Malformed { path: shown(), problem };
        let meta = fs::symlink_metadata(&path).map_err(|error| TokenError::Unreadable { path: shown(), error })?;
        if !meta.file_type().is_file() {
            return Err(malformed("not a regular file"));
        }
        let text = fs::read_to_string(&path).map_err(|error| TokenError::Unreadable { path: shown(), error })?;
        let token = text.trim_end_matches('\n');
        if token.len() != 2 * TOKEN_BYTES || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(malformed("not 64 hex digits"));
        }
        Ok(ApiToken(token.to_owned()))
    }

    /// Writes a new token to `path`: to a temporary file made with mode
    /// 0600 (never readable by others, not even for a moment), then renamed.
    fn create(path: &Path) -> Result<ApiToken, TokenError> {
        let failed = |error| TokenError::Create { path: path.display().to_string(), error };
        let bytes: [u8; TOKEN_BYTES] = rand::random();
        let token = ApiToken(bytes.iter().map(|b| format!("{b:02x}")).collect());
        let tmp = path.with_file_name(format!(".api.token.tmp.{}", std::process::id()));
        // Left by a process of this pid that died while writing it.
        let _ = fs::remove_file(&tmp);
        let mut file = File::options().write(true).create_new(true).mode(0o600).open(&tmp).map_err(failed)?;
        file.write_all(format!("{}\n", token.0).as_bytes()).map_err(failed)?;
        file.sync_all().map_err(failed)?;
        fs::rename(&tmp, path).map_err(failed)?;
        if let Some(dir) = path.parent() {
            File::open(dir).and_then(|d| d.sync_all()).map_err(failed)?;
        }
        Ok(token)
    }

    /// The token, to send.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is this token, compared in constant time (how long
    /// the comparison takes says nothing about how much of it matched).
    pub fn matches(&self, presented: &[u8]) -> bool {
        self.0.as_bytes().ct_eq(presented).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("state")).unwrap();
        dir
    }

    #[test]
    fn a_new_token_is_private_and_reused() {
        let dir = data_dir();
        let token = ApiToken::load_or_create(dir.path()).unwrap();
        let mode = fs::metadata(ApiToken::path(dir.path())).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(token.as_str().len(), 64);
        assert_eq!(ApiToken::load_or_create(dir.path()).unwrap(), token, "reused at the next start");
        assert_eq!(ApiToken::read(dir.path()).unwrap(), token, "what a client reads");
        let other = data_dir();
        assert_ne!(ApiToken::load_or_create(other.path()).unwrap(), token, "random");
    }

    #[test]
    fn a_token_others_can_read_is_refused_with_the_fix() {
        let dir = data_dir();
        ApiToken::load_or_create(dir.path()).unwrap();
        let path = ApiToken::path(dir.path());
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = ApiToken::load_or_create(dir.path()).unwrap_err().to_string();
        assert!(err.contains(&format!("run `chmod 600 {}`", path.display())), "{err}");
    }

    #[test]
    fn a_file_that_is_no_token_is_refused() {
        let dir = data_dir();
        let path = ApiToken::path(dir.path());
        std::os::unix::fs::symlink("/etc/hostname", &path).unwrap();
        assert!(matches!(ApiToken::load_or_create(dir.path()), Err(TokenError::Malformed { .. })));
        fs::remove_file(&path).unwrap();
        File::options().write(true).create_new(true).mode(0o600).open(&path).unwrap().write_all(b"short\n").unwrap();
        assert!(matches!(ApiToken::read(dir.path()), Err(TokenError::Malformed { .. })));
    }

    #[test]
    fn only_the_token_matches() {
        let token = ApiToken("ab".repeat(32));
        assert!(token.matches("ab".repeat(32).as_bytes()));
        assert!(!token.matches("ab".repeat(31).as_bytes()), "a prefix");
        assert!(!token.matches(format!("{}ac", "ab".repeat(31)).as_bytes()));
        assert!(!token.matches(b""));
    }
}
