//! Making a backup of a snapshot.
//!
//! 1. Take the volume's lease on the target (one backup of a volume at a
//!    time; none while a sweep runs, see [`crate::lease`]).
//! 2. Pick the base: the newest backup of the volume, with the same chunk
//!    size, whose snapshot still exists. Its manifest says which chunk each
//!    unchanged part of the volume is; the store is not asked about them.
//! 3. Ask the source where the snapshot may differ from the base's
//!    snapshot (the layers between them, [`Source::extents`]); with no
//!    base, where it holds data. Only chunks touching those extents are
//!    read, hashed, and uploaded if the target does not have them (known
//!    from the base's manifest, this backup, or the journal of an attempt
//!    that died). A first backup (no base) and a retry ask the store
//!    about each chunk they do not know before uploading it, so a clone's
//!    first backup uploads nothing its origin's backups hold; a later
//!    backup never asks.
//! 4. Write the manifest, create-only. Until then nothing lists or
//!    restores the backup; chunks already uploaded stay for a retry.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::format::{
    encode_chunk, BackupStats, ChunkId, Manifest, BLOCK_SIZE, DEFAULT_CHUNK_SIZE, FORMAT,
};
use crate::lease::{self, backup_lease, renew_every, Lease, SWEEP_LEASE};
use crate::target::{PutRefused, Target};

/// What a backup reads: one snapshot of a volume.
pub trait Source: Send + Sync {
    /// The volume's snapshots that exist now (not removed).
    fn snapshots(&self) -> impl Future<Output = anyhow::Result<Vec<String>>> + Send;
    /// `(start, end)` byte ranges, in order, where the snapshot holds data
    /// (`base` `None`) or may differ from the older snapshot `base`.
    fn extents(
        &self,
        base: Option<&str>,
    ) -> impl Future<Output = anyhow::Result<Vec<(u64, u64)>>> + Send;
    /// The snapshot's bytes at `[offset, offset + len)`, then in an
    /// encrypted volume each block's nonce and tag.
    fn read(&self, offset: u64, len: u64) -> impl Future<Output = anyhow::Result<Bytes>> + Send;
}

/// The volume a backup is of.
#[derive(Debug, Clone)]
pub struct VolumeInfo {
    pub name: String,
    pub uuid: Uuid,
    pub size: u64,
    pub auth_bytes: u64,
    pub encryption: Option<serde_json::Value>,
}

#[derive(Debug, Clone)]
pub struct BackupRequest {
    pub volume: VolumeInfo,
    pub snapshot: String,
    /// `None`: the chunk size of the volume's newest backup in the target
    /// (so that it is incremental), [`DEFAULT_CHUNK_SIZE`] for a first.
    pub chunk_size: Option<u64>,
    /// Chunks read and uploaded at once.
    pub parallel: usize,
    /// Read rate limit in MiB/s (0: none).
    pub rate_mib: f64,
}

/// A backup's progress, updated as it runs.
#[derive(Default)]
pub struct Progress {
    /// Volume bytes to read, and read so far.
    pub to_read: AtomicU64,
    pub read: AtomicU64,
    pub chunks_uploaded: AtomicU64,
    pub bytes_uploaded: AtomicU64,
    started: Mutex<Option<Instant>>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ProgressReport {
    pub to_read: u64,
    pub read: u64,
    pub chunks_uploaded: u64,
    pub bytes_uploaded: u64,
    pub mib_per_s: f64,
}

impl Progress {
    pub fn report(&self) -> ProgressReport {
        let read = self.read.load(Ordering::Relaxed);
        let secs = self
            .started
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|s| s.elapsed().as_secs_f64())
            .unwrap_or(0.0);
        ProgressReport {
            to_read: self.to_read.load(Ordering::Relaxed),
            read,
            chunks_uploaded: self.chunks_uploaded.load(Ordering::Relaxed),
            bytes_uploaded: self.bytes_uploaded.load(Ordering::Relaxed),
            mib_per_s: if secs > 0.0 {
                read as f64 / secs / (1 << 20) as f64
            } else {
                0.0
            },
        }
    }

    fn start(&self) {
        *self.started.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }
}

/// Backs up `req.snapshot` of the volume `source` reads; returns the
/// manifest written.
pub async fn create<S: Source>(
    target: &Arc<Target>,
    source: &S,
    req: &BackupRequest,
    progress: &Progress,
) -> anyhow::Result<Manifest> {
    check_request(req)?;
    let volume = &req.volume.name;
    let what = format!("a backup of {volume} from snapshot {}", req.snapshot);
    let lease_key = backup_lease(volume);
    let (lease, interrupted) = Lease::acquire(target, &lease_key, &what).await?;
    let result = async {
        if let Some((_, sweep)) = lease::live_leases(target, &lease_key)
            .await?
            .into_iter()
            .find(|(k, _)| k == SWEEP_LEASE)
        {
            bail!(
                "{}: {} runs; back up when it has finished",
                target.url(),
                sweep.what
            );
        }
        // The journal of an attempt that died: no sweep ran since (a sweep
        // deletes expired leases first), so its chunks are still there.
        let journal = interrupted.map(|r| r.uploaded);
        run(target, source, req, progress, &lease, journal).await
    }
    .await;
    let released = lease.release().await;
    let manifest = result?;
    if let Err(e) = released {
        tracing::warn!(error = %e, "backup written; its lease stays until it expires");
    }
    Ok(manifest)
}

fn check_request(req: &BackupRequest) -> anyhow::Result<()> {
    if let Some(c) = req
        .chunk_size
        .filter(|&c| c == 0 || c % BLOCK_SIZE != 0 || c > 64 << 20)
    {
        bail!("chunk size {c} must be a multiple of {BLOCK_SIZE} bytes, at most 64 MiB");
    }
    if crate::format::manifest_key(&format!("{}.x", req.volume.name)).is_none() {
        bail!("volume name {:?} cannot name a backup", req.volume.name);
    }
    Ok(())
}

async fn run<S: Source>(
    target: &Arc<Target>,
    source: &S,
    req: &BackupRequest,
    progress: &Progress,
    lease: &Lease,
    journal: Option<Vec<ChunkId>>,
) -> anyhow::Result<Manifest> {
    let started = Instant::now();
    let requests_before = target.requests();
    let vol = &req.volume;
    let snapshots = source.snapshots().await?;
    if !snapshots.contains(&req.snapshot) {
        bail!("volume {} has no snapshot {}", vol.name, req.snapshot);
    }
    let (manifests, _) = target.manifests(Some(&vol.name)).await?;
    let chunk = req
        .chunk_size
        .or(manifests.last().map(|m| m.chunk_size))
        .unwrap_or(DEFAULT_CHUNK_SIZE);
    let base = manifests.into_iter().rev().find(|m| {
        m.volume_uuid == vol.uuid
            && m.chunk_size == chunk
            && m.auth_bytes == vol.auth_bytes
            && m.size <= vol.size
            && snapshots.contains(&m.snapshot)
    });
    let count = vol.size.div_ceil(chunk);
    let mut changed = BTreeSet::new();
    if base.as_ref().is_none_or(|b| b.snapshot != req.snapshot) {
        let extents = source
            .extents(base.as_ref().map(|b| b.snapshot.as_str()))
            .await
            .context("finding what changed")?;
        for (s, e) in extents {
            changed.extend(s / chunk..e.div_ceil(chunk).min(count));
        }
    }
    let mut entries: BTreeMap<u64, ChunkId> = BTreeMap::new();
    // Asking the store about a chunk before sending it pays on a first
    // backup (another volume may hold the same bytes: a clone, a restored
    // copy) and on a retry (what the dead attempt sent after its last
    // journal entry); a later backup knows from its base, and never asks.
    let ask_store = base.is_none() || journal.is_some();
    let journal = journal.unwrap_or_default();
    let mut known: HashSet<ChunkId> = journal.iter().copied().collect();
    if let Some(b) = &base {
        // The base's last chunk is shorter if the volume grew since.
        if b.size < vol.size && b.size % chunk != 0 {
            changed.insert(b.size / chunk);
        }
        for &(i, id) in &b.chunks {
            known.insert(id);
            if !changed.contains(&i) {
                entries.insert(i, id);
            }
        }
    }
    let unchanged = entries.len() as u64;
    progress.to_read.store(
        changed
            .iter()
            .map(|&i| chunk.min(vol.size - i * chunk))
            .sum(),
        Ordering::Relaxed,
    );
    progress.start();
    tracing::info!(
        volume = %vol.name,
        snapshot = %req.snapshot,
        base = base.as_ref().map(|b| b.name.as_str()),
        chunks = changed.len(),
        unchanged,
        "backup started"
    );

    let known = Mutex::new(known);
    // The journal carries over, so a chain of dead attempts keeps it all.
    let uploaded = Mutex::new(journal);
    let pace = Pacer::new(req.rate_mib);
    let stats = Mutex::new(BackupStats::default());
    let chunks = futures::stream::iter(changed.iter().copied())
        .map(|i| {
            let (known, uploaded, stats, pace) = (&known, &uploaded, &stats, &pace);
            async move {
                let len = chunk.min(vol.size - i * chunk);
                pace.wait(progress.read.load(Ordering::Relaxed)).await;
                let content = source
                    .read(i * chunk, len)
                    .await
                    .with_context(|| format!("reading chunk {i} (byte {})", i * chunk))?;
                let expected = (len + len / BLOCK_SIZE * vol.auth_bytes) as usize;
                if content.len() != expected {
                    bail!(
                        "chunk {i}: read {} bytes, expected {expected}",
                        content.len()
                    );
                }
                progress.read.fetch_add(len, Ordering::Relaxed);
                let hashed = tokio::task::spawn_blocking(move || {
                    (!content.iter().all(|&b| b == 0)).then(|| (ChunkId::of(&content), content))
                })
                .await?;
                // All zeros: a hole, not stored.
                let Some((id, content)) = hashed else {
                    return Ok((i, None));
                };
                let fresh =
                    lock(known).insert(id) && !(ask_store && target.exists(&id.key()).await?);
                {
                    let mut s = lock(stats);
                    s.chunks_read += 1;
                    s.bytes_read += len;
                    if !fresh {
                        s.chunks_known += 1;
                    }
                }
                if fresh {
                    let object =
                        tokio::task::spawn_blocking(move || encode_chunk(&content)).await??;
                    let n = object.len() as u64;
                    target.put_chunk(&id, Bytes::from(object)).await?;
                    lock(uploaded).push(id);
                    progress.chunks_uploaded.fetch_add(1, Ordering::Relaxed);
                    progress.bytes_uploaded.fetch_add(n, Ordering::Relaxed);
                    let mut s = lock(stats);
                    s.chunks_uploaded += 1;
                    s.bytes_uploaded += n;
                }
                Ok((i, Some(id)))
            }
        })
        .buffer_unordered(req.parallel.max(1))
        .try_collect::<Vec<(u64, Option<ChunkId>)>>();
    let renew = async {
        loop {
            tokio::time::sleep(renew_every()).await;
            let journal = lock(&uploaded).clone();
            if let Err(e) = lease.renew(journal).await {
                return e;
            }
        }
    };
    let read: Vec<(u64, Option<ChunkId>)> = tokio::select! {
        r = chunks => r?,
        e = renew => return Err(e),
    };
    for (i, id) in read {
        match id {
            Some(id) => entries.insert(i, id),
            None => entries.remove(&i),
        };
    }
    lease.check()?;
    let mut stats = lock(&stats).clone();
    stats.chunks_unchanged = unchanged;
    stats.seconds = started.elapsed().as_secs_f64();
    let created = lease::now();
    let mut manifest = Manifest {
        format: FORMAT,
        name: String::new(),
        volume: vol.name.clone(),
        volume_uuid: vol.uuid,
        snapshot: req.snapshot.clone(),
        created,
        size: vol.size,
        chunk_size: chunk,
        auth_bytes: vol.auth_bytes,
        encryption: vol.encryption.clone(),
        base: base.map(|b| b.name),
        chunks: entries.into_iter().collect(),
        stats,
    };
    let stamp = utc_stamp(created);
    for n in 0.. {
        manifest.name = match n {
            0 => format!("{}.{stamp}", vol.name),
            n => format!("{}.{stamp}-{n}", vol.name),
        };
        // The manifest's own write is counted in it.
        manifest.stats.requests = target.requests() - requests_before + 1;
        let body = Bytes::from(serde_json::to_vec(&manifest)?);
        match target.put_if(&manifest.key(), body, None).await {
            Ok(_) => break,
            Err(PutRefused::Conflict) if n < 100 => continue,
            Err(PutRefused::Conflict) => bail!("no free backup name at {stamp}"),
            Err(PutRefused::Other(e)) => return Err(e),
        }
    }
    tracing::info!(
        backup = %manifest.name,
        uploaded = manifest.stats.chunks_uploaded,
        bytes = manifest.stats.bytes_uploaded,
        requests = manifest.stats.requests,
        "backup written"
    );
    Ok(manifest)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Holds reads to a rate.
struct Pacer {
    start: Instant,
    bytes_per_s: f64,
}

impl Pacer {
    fn new(rate_mib: f64) -> Pacer {
        Pacer {
            start: Instant::now(),
            bytes_per_s: rate_mib * (1 << 20) as f64,
        }
    }

    async fn wait(&self, done: u64) {
        if self.bytes_per_s > 0.0 {
            let due = Duration::from_secs_f64(done as f64 / self.bytes_per_s);
            tokio::time::sleep_until((self.start + due).into()).await;
        }
    }
}

/// `YYYYMMDDTHHMMSSZ` of a Unix time.
pub fn utc_stamp(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn stamps_are_utc_calendar_times() {
        assert_eq!(super::utc_stamp(0), "19700101T000000Z");
        assert_eq!(super::utc_stamp(1_796_620_353), "20261207T051233Z");
        assert_eq!(super::utc_stamp(951_782_400), "20000229T000000Z");
    }
}
