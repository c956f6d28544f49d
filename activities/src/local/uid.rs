//! A host uid of its own for each running job.
//!
//! Jobs that shared one uid (say `nobody`) could reach each other's files
//! and processes through any gap the namespaces leave. A root supervisor
//! claims a uid from [`UID_FIRST`]..[`UID_FIRST`] + [`UIDS`] for the job's
//! whole life by holding an exclusive lock on `/run/evalflow/uids/<uid>`,
//! so two live jobs, of this data directory or of any other on the host,
//! never share one. The lock goes with the supervisor (also when it is
//! killed), and the uid with it.

use std::fs::{self, File, TryLockError};
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

/// The first uid jobs run as: far above any uid a distribution hands out.
pub const UID_FIRST: u32 = 0x7000_0000;
/// How many uids jobs take turns with.
pub const UIDS: u32 = 1 << 16;
/// Where the claims are, host-wide.
const CLAIMS_DIR: &str = "/run/evalflow/uids";

/// A uid claimed for one job, held until dropped.
#[derive(Debug)]
pub struct JobUid {
    uid: u32,
    _claim: File,
}

impl JobUid {
    /// The uid (and gid) the job runs as.
    pub fn get(&self) -> u32 {
        self.uid
    }

    /// Claims a free uid, starting the search at a place derived from `job`
    /// so that concurrent supervisors rarely contend.
    pub fn claim(job: &str) -> io::Result<JobUid> {
        let dir = Path::new(CLAIMS_DIR);
        fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write(job.as_bytes());
        let start = (hasher.finish() % u64::from(UIDS)) as u32;
        for offset in 0..UIDS {
            let uid = UID_FIRST + (start + offset) % UIDS;
            let claim = File::options().create(true).truncate(false).write(true).open(dir.join(uid.to_string()))?;
            match claim.try_lock() {
                Ok(()) => return Ok(JobUid { uid, _claim: claim }),
                Err(TryLockError::WouldBlock) => continue,
                Err(TryLockError::Error(e)) => return Err(e),
            }
        }
        Err(io::Error::other(format!("all {UIDS} job uids from {UID_FIRST} are in use")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_claims_never_share_a_uid() {
        // SAFETY: geteuid(2) has no preconditions.
        #[allow(unsafe_code)]
        if unsafe { libc::geteuid() } != 0 {
            return; // only root claims uids
        }
        let claims: Vec<JobUid> = (0..8).map(|_| JobUid::claim("same-job").unwrap()).collect();
        let uids: std::collections::BTreeSet<u32> = claims.iter().map(JobUid::get).collect();
        assert_eq!(uids.len(), claims.len(), "{uids:?}");
        assert!(uids.iter().all(|uid| (UID_FIRST..UID_FIRST + UIDS).contains(uid)));
    }
}
