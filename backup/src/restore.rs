//! Reading backups back: restore into a volume, bring a standby volume up
//! to a newer backup, verify a backup's chunks.
//!
//! Every chunk is checked against its name before a byte of it is
//! written; a restore stops at the first chunk that fails and says which.
//! A restore into a new volume writes only the chunks the backup holds (a
//! new volume reads zeros elsewhere). A standby that holds backup A and is
//! brought to backup B gets only the chunks whose names differ between
//! the two manifests, and zeros where B has a hole and A had data.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::bail;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use crate::format::{ChunkId, Manifest};
use crate::target::Target;

/// Where a restore writes.
pub trait Sink: Send + Sync {
    /// Writes a chunk's content (blocks, then nonces and tags in an
    /// encrypted volume) at `offset`.
    fn write(&self, offset: u64, content: Bytes)
        -> impl Future<Output = anyhow::Result<()>> + Send;
    /// Makes `[offset, offset + len)` read as zeros.
    fn zero(&self, offset: u64, len: u64) -> impl Future<Output = anyhow::Result<()>> + Send;
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RestoreStats {
    pub backup: String,
    pub chunks_written: u64,
    pub bytes_written: u64,
    /// Chunks a standby already held.
    pub chunks_unchanged: u64,
    /// Chunks made zeros (a standby's data where the backup has a hole).
    pub chunks_zeroed: u64,
    pub requests: u64,
    pub seconds: f64,
}

/// Restores `m` through `sink`; with `previous` (the backup the sink holds
/// now, of the same volume) only what differs.
pub async fn restore<K: Sink>(
    target: &Target,
    m: &Manifest,
    previous: Option<&Manifest>,
    sink: &K,
    parallel: usize,
    written: &AtomicU64,
) -> anyhow::Result<RestoreStats> {
    let started = Instant::now();
    let requests_before = target.requests();
    let had: BTreeMap<u64, ChunkId> = match previous {
        Some(p) => {
            if p.volume_uuid != m.volume_uuid
                || p.chunk_size != m.chunk_size
                || p.auth_bytes != m.auth_bytes
                || p.size > m.size
            {
                bail!(
                    "backup {} is not a later backup of the volume {} holds",
                    m.name,
                    p.name
                );
            }
            p.chunks.iter().copied().collect()
        }
        None => BTreeMap::new(),
    };
    let wanted: BTreeSet<u64> = m.chunks.iter().map(|c| c.0).collect();
    let to_write: Vec<(u64, ChunkId)> = m
        .chunks
        .iter()
        .copied()
        .filter(|(i, id)| had.get(i) != Some(id))
        .collect();
    let mut stats = RestoreStats {
        backup: m.name.clone(),
        chunks_unchanged: (m.chunks.len() - to_write.len()) as u64,
        ..Default::default()
    };
    for &i in had.keys().filter(|i| !wanted.contains(i)) {
        sink.zero(i * m.chunk_size, m.chunk_len(i)).await?;
        stats.chunks_zeroed += 1;
    }
    futures::stream::iter(to_write)
        .map(|(i, id)| async move {
            let content = target.chunk(&id, m.content_len(i)).await?;
            let n = m.chunk_len(i);
            sink.write(i * m.chunk_size, Bytes::from(content)).await?;
            written.fetch_add(n, Ordering::Relaxed);
            Ok::<_, anyhow::Error>(n)
        })
        .buffer_unordered(parallel.max(1))
        .try_for_each(|n| {
            stats.chunks_written += 1;
            stats.bytes_written += n;
            futures::future::ready(Ok(()))
        })
        .await?;
    stats.requests = target.requests() - requests_before;
    stats.seconds = started.elapsed().as_secs_f64();
    Ok(stats)
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VerifyReport {
    pub backup: String,
    pub chunks: u64,
    /// What is wrong with each bad chunk.
    pub bad: Vec<String>,
}

/// Reads every chunk of `m` and checks it against its name.
pub async fn verify(
    target: &Target,
    m: &Manifest,
    parallel: usize,
) -> anyhow::Result<VerifyReport> {
    // Each distinct chunk once (the length is the same wherever it is).
    let mut distinct: BTreeMap<ChunkId, u64> = BTreeMap::new();
    for &(i, id) in &m.chunks {
        distinct.entry(id).or_insert(i);
    }
    let bad: Vec<String> = futures::stream::iter(distinct.iter())
        .map(|(id, &i)| async move { target.chunk(id, m.content_len(i)).await.err() })
        .buffer_unordered(parallel.max(1))
        .filter_map(|e| futures::future::ready(e.map(|e| format!("{e:#}"))))
        .collect()
        .await;
    Ok(VerifyReport {
        backup: m.name.clone(),
        chunks: distinct.len() as u64,
        bad,
    })
}
