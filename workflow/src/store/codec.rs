//! The on-disk record format: one schema-version byte, then the record in
//! postcard (compact, serde-based, with a stable wire format).

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::StoreError;
use crate::machine::{HistoryEntry, RunSpec, RunStatus};

/// The record format this build reads and writes. Bump it, and teach
/// [`decode`] the old one, whenever a stored type changes shape; bump the
/// store's layout version too (`sled_store::LAYOUT_VERSION`), which is what
/// an older evalflow checks on open.
pub(crate) const SCHEMA_VERSION: u8 = 2;

/// A record that can check its own invariants.
pub(crate) trait Record: Serialize + DeserializeOwned {
    fn validate(&self) -> Result<(), String>;
}

impl Record for HistoryEntry {
    fn validate(&self) -> Result<(), String> {
        if self.seq == 0 {
            return Err("seq 0".into());
        }
        self.status.validate()
    }
}

impl Record for RunSpec {
    fn validate(&self) -> Result<(), String> {
        match self.expected_run() {
            Ok(run) if run == self.run => Ok(()),
            _ => Err(format!("run id {} does not match its submission and stage (and audit)", self.run)),
        }
    }
}

/// A run as the terminal index holds it: everything [`super::StoredRun`]
/// has, so that listing a terminal state reads one range and nothing else.
#[derive(Serialize, Deserialize)]
pub(crate) struct Finished {
    pub spec: RunSpec,
    pub last_seq: u32,
    pub status: RunStatus,
}

impl Record for Finished {
    fn validate(&self) -> Result<(), String> {
        self.spec.validate()?;
        if self.last_seq == 0 {
            return Err("seq 0".into());
        }
        self.status.validate()
    }
}

/// Encodes a record that passed validation.
pub(crate) fn encode<T: Record>(key: &[u8], record: &T) -> Result<Vec<u8>, StoreError> {
    record.validate().map_err(|problem| corrupt(key, problem))?;
    postcard::to_extend(record, vec![SCHEMA_VERSION]).map_err(|e| corrupt(key, e.to_string()))
}

/// Decodes a record and checks it before handing it out.
pub(crate) fn decode<T: Record>(key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    let Some((&version, body)) = bytes.split_first() else {
        return Err(corrupt(key, "empty value".into()));
    };
    if version != SCHEMA_VERSION {
        return Err(StoreError::SchemaVersion { found: version, supported: SCHEMA_VERSION });
    }
    let record: T = postcard::from_bytes(body).map_err(|e| corrupt(key, e.to_string()))?;
    record.validate().map_err(|problem| corrupt(key, problem))?;
    Ok(record)
}

pub(crate) fn corrupt(key: &[u8], problem: String) -> StoreError {
    StoreError::Corrupt { key: String::from_utf8_lossy(key).into_owned(), problem }
}
