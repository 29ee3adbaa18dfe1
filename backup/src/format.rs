//! What a backup target holds: chunks named by their content, and one
//! manifest per backup. The layout is a promise to users (a target written
//! today must restore with any later rvol), so it is spelled out here and
//! in the README, and changes only with [`FORMAT`].
//!
//! ```text
//! PREFIX/chunks/ab/abcdef…(64 hex)    a chunk: zstd frame of its content
//! PREFIX/backups/VOLUME/NAME.json     a manifest (JSON, below)
//! PREFIX/leases/backup-VOLUME.json    held while a backup of VOLUME runs
//! PREFIX/leases/sweep.json            held while unreferenced chunks go
//! ```
//!
//! - A volume is cut into chunks of `chunk_size` bytes (the last one may be
//!   shorter). A chunk's content is its bytes as the snapshot reads them;
//!   in an encrypted volume, its sealed blocks followed by each block's
//!   nonce and tag (`auth_bytes` per block), so a backup holds ciphertext
//!   only.
//! - A chunk is named by the SHA-256 of its content and stored once per
//!   target: every backup of every volume that holds the same bytes
//!   refers to the same object. A chunk whose content is all zeros is a
//!   hole and is not stored.
//! - A manifest lists `[index, chunk]` pairs (offset = index ×
//!   `chunk_size`), in index order, plus the volume's size and metadata.
//!   It is written last, with a create-only put: a backup that did not
//!   finish has no manifest, so nothing lists or restores it.
//! - Restore and verify check every chunk against its name after
//!   decompressing it.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

/// The manifest format written by this version.
pub const FORMAT: u32 = 1;

/// The chunk size of a volume's first backup when none is asked for. In
/// docs/benchmarks.md (2026-12-07), 2 MiB backed up as fast as 4 MiB
/// (1 MiB: 8 % slower) and uploaded 12 % less than 4 MiB after scattered
/// writes (1 MiB: 36 % less), with half the requests and manifest entries
/// of 1 MiB (a 1 TiB volume: 512 Ki entries).
pub const DEFAULT_CHUNK_SIZE: u64 = 2 << 20;

/// Volume blocks, the unit of encryption's nonces and tags.
pub const BLOCK_SIZE: u64 = 4096;

/// zstd level for chunks: level 1 keeps compression off the critical path
/// on small machines while still shrinking zeros and text.
const ZSTD_LEVEL: i32 = 1;

/// A chunk's name: the SHA-256 of its content.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId([u8; 32]);

impl ChunkId {
    pub fn of(content: &[u8]) -> ChunkId {
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, content);
        let mut id = [0; 32];
        id.copy_from_slice(d.as_ref());
        ChunkId(id)
    }

    pub fn parse(hex: &str) -> Option<ChunkId> {
        if hex.len() != 64 {
            return None;
        }
        let mut id = [0; 32];
        for (i, b) in id.iter_mut().enumerate() {
            *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(ChunkId(id))
    }

    /// Its object's path below the target's prefix.
    pub fn key(&self) -> String {
        let hex = self.to_string();
        format!("chunks/{}/{hex}", &hex[..2])
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({self})")
    }
}

impl Serialize for ChunkId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ChunkId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ChunkId, D::Error> {
        let s = String::deserialize(d)?;
        ChunkId::parse(&s).ok_or_else(|| serde::de::Error::custom("a chunk id is 64 hex digits"))
    }
}

/// Compresses a chunk's content into the object stored.
pub fn encode_chunk(content: &[u8]) -> std::io::Result<Vec<u8>> {
    zstd::bulk::compress(content, ZSTD_LEVEL)
}

/// Decompresses a chunk object and checks it is chunk `id` of `len` bytes.
pub fn decode_chunk(id: &ChunkId, object: &[u8], len: usize) -> Result<Vec<u8>, String> {
    let content = zstd::bulk::decompress(object, len)
        .map_err(|e| format!("chunk {id} does not decompress: {e}"))?;
    if content.len() != len {
        return Err(format!(
            "chunk {id} holds {} bytes, the manifest expects {len}",
            content.len()
        ));
    }
    if ChunkId::of(&content) != *id {
        return Err(format!("chunk {id} does not match its name: it is corrupt"));
    }
    Ok(content)
}

/// One backup: what restores it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// `VOLUME.YYYYMMDDTHHMMSSZ`, unique in the target.
    pub name: String,
    pub volume: String,
    pub volume_uuid: Uuid,
    /// The snapshot it was read from.
    pub snapshot: String,
    /// Seconds since the Unix epoch.
    pub created: u64,
    /// The volume's size in bytes.
    pub size: u64,
    pub chunk_size: u64,
    /// Bytes of nonce and tag per block after a chunk's blocks (0: plain).
    pub auth_bytes: u64,
    /// The volume's encryption as its replicas record it (cipher and key
    /// check, never the key), if it is encrypted.
    #[serde(default)]
    pub encryption: Option<serde_json::Value>,
    /// The backup whose unchanged chunks this one took over, if any.
    pub base: Option<String>,
    /// `(index, chunk)`, in index order; missing indexes are holes.
    pub chunks: Vec<(u64, ChunkId)>,
    pub stats: BackupStats,
}

impl Manifest {
    /// Its object's path below the target's prefix.
    pub fn key(&self) -> String {
        manifest_key(&self.name).unwrap_or_default()
    }

    /// Volume bytes of chunk `index`.
    pub fn chunk_len(&self, index: u64) -> u64 {
        self.chunk_size
            .min(self.size.saturating_sub(index * self.chunk_size))
    }

    /// Bytes of chunk `index`'s content (blocks, then nonces and tags).
    pub fn content_len(&self, index: u64) -> usize {
        let n = self.chunk_len(index);
        (n + n / BLOCK_SIZE * self.auth_bytes) as usize
    }

    /// Checks what a reader relies on: a known format, sizes that make
    /// sense, chunks in range and in order.
    pub fn check(&self) -> Result<(), String> {
        if self.format != FORMAT {
            return Err(format!(
                "backup {} has format {}; this rvol reads format {FORMAT}",
                self.name, self.format
            ));
        }
        if self.chunk_size == 0 || self.chunk_size % BLOCK_SIZE != 0 || self.size % BLOCK_SIZE != 0
        {
            return Err(format!("backup {}: bad chunk or volume size", self.name));
        }
        let count = self.size.div_ceil(self.chunk_size);
        if !self.chunks.windows(2).all(|w| w[0].0 < w[1].0)
            || self.chunks.last().is_some_and(|c| c.0 >= count)
        {
            return Err(format!(
                "backup {}: chunk list out of order or range",
                self.name
            ));
        }
        Ok(())
    }
}

/// The path of backup `name`'s manifest; `None` if it is not a backup
/// name.
pub fn manifest_key(name: &str) -> Option<String> {
    let (volume, stamp) = name.rsplit_once('.')?;
    let ok = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
    };
    (ok(volume) && ok(stamp)).then(|| format!("backups/{volume}/{name}.json"))
}

/// What a backup did, kept in its manifest.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct BackupStats {
    /// Volume bytes read from the replicas.
    pub bytes_read: u64,
    /// Chunks read and hashed.
    pub chunks_read: u64,
    /// Chunks uploaded, and their compressed bytes.
    pub chunks_uploaded: u64,
    pub bytes_uploaded: u64,
    /// Chunks read but already in the target.
    pub chunks_known: u64,
    /// Chunks taken over from the base backup without reading them.
    pub chunks_unchanged: u64,
    /// Requests sent to the store.
    pub requests: u64,
    pub seconds: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_round_trips_and_a_flipped_byte_is_named() {
        let content: Vec<u8> = (0..BLOCK_SIZE as usize * 4)
            .map(|i| (i % 251) as u8)
            .collect();
        let id = ChunkId::of(&content);
        assert_eq!(ChunkId::parse(&id.to_string()), Some(id));
        let object = encode_chunk(&content).unwrap();
        assert_eq!(decode_chunk(&id, &object, content.len()).unwrap(), content);
        let mut bad = content.clone();
        bad[100] ^= 1;
        let err = decode_chunk(&id, &encode_chunk(&bad).unwrap(), content.len()).unwrap_err();
        assert!(
            err.contains(&id.to_string()) && err.contains("corrupt"),
            "{err}"
        );
        assert!(decode_chunk(&id, b"not zstd", content.len()).is_err());
    }

    #[test]
    fn backup_names_map_to_manifests_and_nothing_else_does() {
        assert_eq!(
            manifest_key("pg-data.20261207T051233Z").as_deref(),
            Some("backups/pg-data/pg-data.20261207T051233Z.json")
        );
        for bad in ["nodot", "../x.y", "a.b/c", ".x", "x.", "a b.c"] {
            assert_eq!(manifest_key(bad), None, "{bad}");
        }
    }
}
