//! Replica and layer metadata files, and how they are replaced safely.
//!
//! Metadata is JSON: it is on the control path only (written at create,
//! snapshot and bind time, never per I/O), humans read it while debugging,
//! and serde gives a strict parser that the fuzz target exercises.
//!
//! # Crash safety
//!
//! A metadata file is never modified in place. [`write_atomic`] writes the
//! new contents to `NAME.tmp`, fsyncs it, renames it over `NAME` and fsyncs
//! the directory. A crash at any point leaves either the complete old file
//! or the complete new one under `NAME`; a stray `NAME.tmp` is ignored and
//! overwritten next time. (Longhorn once shipped a replica that could be
//! left with an empty metadata file after a crash; this is the cure.)

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{Error, Result};

/// Version of the on-disk format this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;

pub const REPLICA_META: &str = "replica.json";

/// `replica.json`: what the replica is and how its layers are chained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaMeta {
    pub format_version: u32,
    /// The volume this replica belongs to; nil until an engine first binds it.
    pub volume_uuid: Uuid,
    /// This replica's own identity, made when it is created: an engine can
    /// tell a replica that came back from a new one at the same address.
    pub replica_uuid: Uuid,
    pub size: u64,
    pub block_size: u64,
    /// Layer file names, oldest snapshot first, the writable head last.
    pub chain: Vec<String>,
    /// Set while an engine rebuilds this replica: its data is then incomplete
    /// and it must never be chosen as a source.
    pub rebuilding: bool,
    /// Set when the volume is encrypted (bound with the volume, never
    /// changed); absent otherwise, so replicas of plain volumes read as
    /// before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
}

/// What the replicas of an encrypted volume know of its encryption: the
/// cipher, which fixes how many bytes of nonce and tag each block carries
/// beside its checksums (see [`crate::checksum`]), and a key check value,
/// which tells an engine whether its key is the volume's without saying
/// anything of the key. The key itself never reaches a replica: blocks
/// arrive sealed and leave sealed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Encryption {
    pub cipher: String,
    /// Hex; derived from the volume's key (see the engine's `crypt`).
    pub key_check: String,
}

/// AES-256-GCM-SIV with a random 96-bit nonce per block write.
pub const CIPHER_AES_256_GCM_SIV: &str = "aes-256-gcm-siv";

impl Encryption {
    /// Bytes of nonce and tag per block.
    pub fn auth_bytes(&self) -> Result<usize> {
        match self.cipher.as_str() {
            CIPHER_AES_256_GCM_SIV => Ok(12 + 16),
            other => Err(Error::Mismatch(format!(
                "cipher {other:?} is not supported (this build knows {CIPHER_AES_256_GCM_SIV})"
            ))),
        }
    }
}

/// Bytes of nonce and tag per block for an optional encryption (0: none).
pub fn auth_bytes(e: Option<&Encryption>) -> Result<usize> {
    e.map_or(Ok(0), Encryption::auth_bytes)
}

/// `<layer>.meta`: one per layer file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerMeta {
    pub parent: Option<String>,
    /// Seconds since the Unix epoch.
    pub created: u64,
    pub user_created: bool,
    pub removed: bool,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl ReplicaMeta {
    pub fn parse(bytes: &[u8]) -> std::result::Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

impl LayerMeta {
    pub fn parse(bytes: &[u8]) -> std::result::Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// Reads and parses a JSON metadata file, naming the file in any error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = fs::read(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt(format!("{}: {e}", path.display())))
}

/// Replaces `path` with `value` as JSON; see the module documentation.
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value)
        .map_err(|e| Error::Corrupt(format!("encoding {}: {e}", path.display())))?;
    bytes.push(b'\n');
    write_atomic(path, &bytes)
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let ctx = |what: &str| format!("{what} {}", path.display());
    let tmp = path.with_extension(match path.extension() {
        Some(ext) => format!("{}.tmp", ext.to_string_lossy()),
        None => "tmp".into(),
    });
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| Error::io(ctx("creating temp file for"), e))?;
    f.write_all(bytes)
        .map_err(|e| Error::io(ctx("writing"), e))?;
    f.sync_all().map_err(|e| Error::io(ctx("syncing"), e))?;
    drop(f);
    fs::rename(&tmp, path).map_err(|e| Error::io(ctx("renaming into"), e))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("syncing directory {}", dir.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("replica.json");
        let m = ReplicaMeta {
            format_version: FORMAT_VERSION,
            volume_uuid: Uuid::nil(),
            replica_uuid: Uuid::new_v4(),
            size: 1 << 20,
            block_size: 4096,
            chain: vec!["volume-head-000.img".into()],
            rebuilding: false,
            encryption: None,
        };
        write_json_atomic(&p, &m).unwrap();
        let mut m2 = m.clone();
        m2.size = 2 << 20;
        write_json_atomic(&p, &m2).unwrap();
        assert_eq!(read_json::<ReplicaMeta>(&p).unwrap(), m2);
        assert!(!dir.path().join("replica.json.tmp").exists());
    }

    #[test]
    fn truncated_or_unknown_metadata_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("replica.json");
        fs::write(&p, b"{\"format_version\": 1, \"size\":").unwrap();
        assert!(matches!(
            read_json::<ReplicaMeta>(&p),
            Err(Error::Corrupt(_))
        ));
        fs::write(&p, b"").unwrap();
        assert!(matches!(
            read_json::<ReplicaMeta>(&p),
            Err(Error::Corrupt(_))
        ));
    }
}
