//! Online rebuild: bringing a stale or new replica back while the volume
//! stays in use.
//!
//! 1. The replica joins in WO mode: every write from now on reaches it too,
//!    but it serves no reads. First, if a replica left or was added since
//!    the last flush, a barrier flush moves the set past any flush epoch
//!    the joining one may hold (see "Losing replicas" in `crate::volume`).
//! 2. With every modification paused ([`RangeLocks::lock_all`]), each
//!    writable replica, the joining one included, freezes its head as the
//!    same system snapshot. Below that cut the volume cannot change; above
//!    it, every replica's new head receives the same writes.
//! 3. The joining replica takes the source's chain below its head
//!    (`prepare_rebuild`), then each layer is compared per 1 MiB chunk by a
//!    64-bit hash, and within a differing chunk per 4 KiB block; only
//!    differing blocks are sent. A new replica receives all the source's
//!    data (holes stay holes); a returning one keeps its old layers and
//!    receives what changed while it was away, block for block: scattered
//!    small writes cost what they wrote, not a chunk each.
//! 4. `finish_rebuild` syncs, rebuilds its index and adopts the source's
//!    revision counter (as read just before: writes racing with that read
//!    may leave it a few counts low, which decides nothing); it turns RW,
//!    and a barrier flush names it as in the set. Flushes it received
//!    while WO did not name it, so it never claimed a barrier it may not
//!    hold (see `rvol_replica::dirty`): an engine that dies at any point of
//!    a rebuild leaves the joining replica stale, never a source.
//!
//! The copy writes only layers below the head, and new writes only the
//! head, so the two never race.
//!
//! 5. Every call of the copy has a time limit, the flush timeout (it may
//!    wait on a disk like a flush does), and is given up at once when the
//!    I/O path fails the source or the joining replica: a rebuild waiting
//!    on a replica that stopped answering would otherwise hold the
//!    background loop, and with it every other re-attach and rebuild, until
//!    it answered (the chaos soak found one hung for minutes).
//!
//! 6. The cut has done its job once the rebuild ends, well or not: it is
//!    removed (and purged into its child) after every attempt, with any
//!    cut an engine that died mid-rebuild left behind. Kept, every rebuild
//!    would add a layer to the chain for good (the chaos soak found them
//!    piling up).
//!
//! [`RangeLocks::lock_all`]: crate::range_lock::RangeLocks::lock_all

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use rvol_frontend::BlockVolume;
use rvol_replica::client::{ClientError, ReplicaClient};
use rvol_replica::store::{ChecksumUnit, REBUILD_CHUNK};
use rvol_replica::BLOCK_SIZE;
use serde::{Deserialize, Serialize};

use crate::events::EventKind;
use crate::volume::{Mode, ReplicaSlot, ReplicatedVolume};

/// Chunks compared per checksum request (64 MiB).
const WINDOW: u64 = 64 * REBUILD_CHUNK;

/// Differing chunks copied at once: overlaps one chunk's round trips with
/// another's disk work.
const CHUNKS_IN_FLIGHT: usize = 4;

/// The rebuild in progress, for status.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RebuildStatus {
    pub replica: String,
    /// Bytes of layers compared so far, of `total`.
    pub scanned: u64,
    pub total: u64,
    /// Bytes of data sent to the replica (holes it had to punch are free).
    pub copied: u64,
    pub mib_per_s: f64,
}

#[derive(Default)]
pub struct RebuildState {
    current: Mutex<Option<RebuildStatus>>,
    snapshots: AtomicU64,
    /// Total bytes copied by finished rebuilds.
    pub copied_total: AtomicU64,
    /// Held for the whole of a rebuild: the chain must not change under it.
    pub running: tokio::sync::Mutex<()>,
}

impl RebuildState {
    pub fn status(&self) -> Option<RebuildStatus> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Holds off rebuilds (which copy a chain fixed at their start) for a
    /// chain change. Refused while a rebuild runs; waits out a purge round.
    pub async fn chain_steady(
        &self,
        what: &str,
    ) -> Result<tokio::sync::MutexGuard<'_, ()>, String> {
        if self.status().is_some() {
            return Err(format!(
                "a rebuild is in progress; {what} when it has finished"
            ));
        }
        Ok(self.running.lock().await)
    }

    fn set(&self, s: Option<RebuildStatus>) {
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = s;
    }
}

impl ReplicatedVolume {
    /// Rebuilds every ERR replica that answers, one after the other.
    pub async fn rebuild_stale(&self, rate_mib_s: f64) {
        for slot in self.slots() {
            // An evicted slow replica stays out (see `crate::slow`).
            if slot.mode() != Mode::ERR
                || !slot.missed()
                || slot.timing.evicted()
                || self.is_fenced()
            {
                continue;
            }
            if !self.slots().iter().any(|s| s.mode() == Mode::RW) {
                return;
            }
            let _running = self.rebuilds.running.lock().await;
            let replica = Some(slot.endpoint.to_string());
            match self.rebuild(&slot, rate_mib_s).await {
                Ok(copied) => {
                    tracing::info!(replica = %slot.endpoint, copied, "replica rebuilt");
                    self.events.push(
                        EventKind::RebuildFinished,
                        replica,
                        format!("rebuilt: {copied} bytes copied; RW"),
                    );
                }
                Err(e) => {
                    // Unreachable replicas are retried every 2 s: only a
                    // rebuild that started and failed is an event.
                    if slot.current_client().is_some() && slot.mode() == Mode::WO {
                        tracing::warn!(replica = %slot.endpoint, error = %e, "rebuild failed");
                        self.events.push(
                            EventKind::RebuildFailed,
                            replica,
                            format!("rebuild failed: {e}"),
                        );
                    } else {
                        tracing::debug!(replica = %slot.endpoint, error = %e, "rebuild not possible now");
                    }
                    self.leave(&slot, &format!("rebuild failed: {e}"));
                }
            }
            self.rebuilds.set(None);
            self.remove_rebuild_cuts().await;
        }
    }

    /// Removes the cuts of finished or abandoned rebuilds (system
    /// snapshots named `rebuild-*`); called with the rebuild lock held, so
    /// none is in use.
    async fn remove_rebuild_cuts(&self) {
        let Ok(layers) = self.layers().await else {
            return;
        };
        for name in kept_cuts(&layers) {
            if let Err(e) = self.remove_snapshot(name).await {
                tracing::warn!(snapshot = name, error = %e, "could not remove a rebuild's cut");
            }
        }
    }

    async fn rebuild(&self, slot: &Arc<ReplicaSlot>, rate_mib_s: f64) -> Result<u64, String> {
        let a = self.attach_info();
        let connect = ReplicaClient::connect(&slot.endpoint, a.volume, a.owner, a.links.clone());
        let (client, joining) = tokio::time::timeout(self.timeout(), connect)
            .await
            .map_err(|_| "no answer".to_string())?
            .map_err(|e| e.to_string())?;
        if joining.size < self.size() {
            // It missed an expansion; the new tail is a hole, like the source's.
            tokio::time::timeout(self.flush_timeout(), client.expand(self.size()))
                .await
                .map_err(|_| "no answer to the expansion".to_string())?
                .map_err(|e| e.to_string())?;
        }
        let client = Arc::new(client);
        // Before it joins, the replicas in the set move past every flush
        // epoch it may have completed (a new replica has completed none, as
        // a volume never flushed has not): a crash from here on never finds
        // it as current as they are.
        self.cover_departures()
            .await
            .map_err(|e| format!("flush before the rebuild: {e}"))?;
        tracing::info!(replica = %slot.endpoint, "rebuilding replica: joined in WO mode");
        self.events.push(
            EventKind::RebuildStarted,
            Some(slot.endpoint.to_string()),
            "rebuild started: joined write-only",
        );
        self.join_write_only(slot, client.clone(), joining.replica_uuid);

        // The cut.
        let name = format!(
            "rebuild-g{}-{}-{}",
            self.generation.0,
            std::process::id(),
            self.rebuilds.snapshots.fetch_add(1, Ordering::Relaxed)
        );
        {
            let _all = self.locks().lock_all().await;
            self.snapshot_all(&name, false, &Default::default())
                .await
                .map_err(|e| format!("snapshot {name}: {e}"))?;
        }
        let (source_slot, source) = self
            .slots()
            .into_iter()
            .filter(|s| s.mode() == Mode::RW)
            .find_map(|s| s.current_client().map(|c| (s, c)))
            .ok_or("no RW replica to copy from")?;
        let step = Step {
            source: &source_slot,
            joining: slot,
            limit: self.flush_timeout(),
        };
        let info = step.run(source.info()).await?;
        let chain = info.chain_below_head();
        step.run(client.prepare_rebuild(&chain)).await?;

        let size = info.size;
        let total = size * chain.len() as u64;
        let started = Instant::now();
        let (mut scanned, mut copied) = (0u64, 0u64);
        let report = |scanned: u64, copied: u64| {
            self.rebuilds.set(Some(RebuildStatus {
                replica: slot.endpoint.to_string(),
                scanned,
                total,
                copied,
                mib_per_s: copied as f64 / 1048576.0 / started.elapsed().as_secs_f64().max(1e-3),
            }))
        };
        for (layer, _) in &chain {
            let mut window = 0;
            while window < size {
                let len = WINDOW.min(size - window);
                let (theirs, ours) = step
                    .run(async {
                        tokio::try_join!(
                            source.layer_checksums(layer, window, len, ChecksumUnit::Chunk),
                            client.layer_checksums(layer, window, len, ChecksumUnit::Chunk),
                        )
                    })
                    .await?;
                let differing: Vec<(u64, bool)> = theirs
                    .iter()
                    .zip(&ours)
                    .enumerate()
                    .filter(|(_, (s, o))| s != o)
                    .map(|(i, (_, o))| (window + i as u64 * REBUILD_CHUNK, o.is_none()))
                    .collect();
                let mut copies = futures::stream::iter(differing)
                    .map(|(at, target_empty)| {
                        let n = REBUILD_CHUNK.min(size - at);
                        let copy = copy_chunk(&source, &client, layer, at, n, target_empty);
                        async move { step.run(copy).await.map(|sent| (at + n, sent)) }
                    })
                    .buffer_unordered(CHUNKS_IN_FLIGHT);
                // Within a window, progress is the furthest chunk copied:
                // a window of many differing chunks takes a while.
                let mut reached = window;
                while let Some(done) = copies.next().await {
                    let (end, sent) = done?;
                    copied += sent;
                    reached = reached.max(end);
                    if rate_mib_s > 0.0 {
                        let due = Duration::from_secs_f64(copied as f64 / (rate_mib_s * 1048576.0));
                        if let Some(wait) = due.checked_sub(started.elapsed()) {
                            tokio::time::sleep(wait).await;
                        }
                    }
                    report(scanned + (reached - window), copied);
                }
                scanned += len;
                window += len;
                report(scanned, copied);
            }
        }
        let revision = step.run(source.info()).await?.revision;
        step.run(client.finish_rebuild(revision)).await?;
        // Counted before the replica turns RW: status must never show a
        // healthy set whose rebuild copied nothing.
        self.rebuilds
            .copied_total
            .fetch_add(copied, Ordering::Relaxed);
        self.promote(slot, revision.0);
        // The flushes it received in WO mode did not name it, so after a
        // crash it would count as stale until a barrier flush does.
        if let Err(e) = self.flush().await {
            tracing::warn!(replica = %slot.endpoint, error = %e, "flush after the rebuild failed");
        }
        tracing::info!(
            replica = %slot.endpoint,
            copied,
            seconds = started.elapsed().as_secs_f64(),
            "rebuild done: replica is RW"
        );
        Ok(copied)
    }
}

/// The snapshot names of the rebuilds' cuts in `chain` (a replica's,
/// head last) that are not removed.
pub(crate) fn kept_cuts(chain: &[rvol_replica::store::LayerInfo]) -> Vec<&str> {
    let below_head = &chain[..chain.len().saturating_sub(1)];
    below_head
        .iter()
        .filter(|l| !l.user_created && !l.removed)
        .filter_map(|l| {
            l.name
                .strip_prefix("volume-snap-")
                .and_then(|n| n.strip_suffix(".img"))
                .filter(|n| n.starts_with("rebuild-"))
        })
        .collect()
}

/// One call of a rebuild, bounded (see point 5 of the module
/// documentation).
#[derive(Clone, Copy)]
struct Step<'a> {
    source: &'a ReplicaSlot,
    joining: &'a ReplicaSlot,
    limit: Duration,
}

impl Step<'_> {
    async fn run<T>(
        self,
        call: impl std::future::Future<Output = Result<T, ClientError>>,
    ) -> Result<T, String> {
        let failed = async {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if self.source.mode() != Mode::RW {
                    return "the source replica failed during the rebuild";
                }
                if self.joining.mode() != Mode::WO {
                    return "the replica failed during the rebuild";
                }
            }
        };
        tokio::select! {
            done = tokio::time::timeout(self.limit, call) => match done {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(_) => Err(format!(
                    "a rebuild call got no answer within {:?}",
                    self.limit
                )),
            },
            why = failed => Err(why.to_string()),
        }
    }
}

/// Makes one differing chunk of `layer` on `target` match `source`, block by
/// block, and returns the bytes of data sent. Each run of differing blocks
/// becomes what the source holds: data, zero blocks included (an allocated
/// zero block shadows the layers below, a hole does not), or a hole.
/// `target_empty` skips asking the target (it holds nothing).
async fn copy_chunk(
    source: &ReplicaClient,
    target: &ReplicaClient,
    layer: &str,
    at: u64,
    n: u64,
    target_empty: bool,
) -> Result<u64, ClientError> {
    let (theirs, ours) = if target_empty {
        let theirs = source
            .layer_checksums(layer, at, n, ChecksumUnit::Block)
            .await?;
        let none = vec![None; theirs.len()];
        (theirs, none)
    } else {
        tokio::try_join!(
            source.layer_checksums(layer, at, n, ChecksumUnit::Block),
            target.layer_checksums(layer, at, n, ChecksumUnit::Block),
        )?
    };
    let mut sent = 0;
    let mut i = 0;
    while i < theirs.len() {
        if theirs[i] == ours[i] {
            i += 1;
            continue;
        }
        let data = theirs[i].is_some();
        let mut j = i + 1;
        while j < theirs.len() && theirs[j] != ours[j] && theirs[j].is_some() == data {
            j += 1;
        }
        let (pos, len) = (at + i as u64 * BLOCK_SIZE, (j - i) as u64 * BLOCK_SIZE);
        if data {
            let bytes = source.read_layer(layer, pos, len).await?;
            target.write_layer(layer, pos, &bytes).await?;
            sent += len;
        } else {
            target.punch_layer(layer, pos, len).await?;
        }
        i = j;
    }
    Ok(sent)
}
