//! Chain operations across the replica set: removing snapshots and purging
//! them in the background, reverting to a snapshot, growing the volume.
//!
//! Removal, revert and expansion change what later requests do (a trim
//! punches through removed layers; a revert replaces the head), so each
//! runs on every writable replica under the whole-volume range lock, like a
//! snapshot cut. A replica that does not apply one is marked as having
//! missed it and comes back only through a rebuild, which gives it the
//! chain of a current replica; one that refuses after others applied is
//! dropped for the same reason. The engine checks what every replica
//! would refuse before asking any.
//!
//! Purge is different: no step of it changes what any view reads (see
//! `rvol_replica::maintenance`), so replicas may be at different points of
//! it and one that misses it loses nothing. One background task drives it
//! a step at a time on each RW replica, holding the rebuild lock for a
//! round of steps only, so rebuilds (which need a fixed chain) take turns
//! with it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rvol_frontend::BlockVolume;
use rvol_replica::client::{ClientError, ReplicaClient};
use rvol_replica::maintenance::{snapshot_file, MAX_VOLUME_SIZE};
use rvol_replica::proto::Status;
use rvol_replica::BLOCK_SIZE;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::volume::{Mode, ReplicaFailure, ReplicatedVolume};

/// The purge in progress, for status.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PurgeStatus {
    /// Layer the last step worked on, and what it did.
    pub layer: String,
    pub action: rvol_replica::maintenance::PurgeAction,
    /// Bytes of removed layers gone through in this purge, over all replicas.
    pub bytes: u64,
    pub steps: u64,
}

#[derive(Default)]
pub struct ChainState {
    purge: Mutex<Option<PurgeStatus>>,
    wake_purge: Notify,
    /// Bytes of removed layers purged since the engine started.
    pub purged_total: AtomicU64,
    /// A frontend serves the volume, so a revert is refused.
    pub frontend_attached: AtomicBool,
    /// The last purge left a removed layer in the chain because the head
    /// did not overwrite all of it. A trim may punch out the rest, so
    /// trims then ask for another purge, which drops the emptied layer.
    removed_layer_left: AtomicBool,
}

impl ChainState {
    pub fn purge_status(&self) -> Option<PurgeStatus> {
        self.purge.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_purge(&self, s: Option<PurgeStatus>) {
        *self.purge.lock().unwrap_or_else(|e| e.into_inner()) = s;
    }

    /// Asks the purge task for a run (it runs once more if one is going).
    pub fn request_purge(&self) {
        self.wake_purge.notify_one();
    }

    /// After a trim: asks for a purge if a removed layer may have emptied.
    pub fn trimmed(&self) {
        if self.removed_layer_left.load(Ordering::Acquire) {
            self.request_purge();
        }
    }
}

impl ReplicatedVolume {
    /// Runs a chain operation on every writable replica; see the module
    /// documentation. Errors if the first replica refuses it (then nothing
    /// changed) or no RW replica applied it.
    ///
    /// An `idempotent` operation (removal, expansion) that no RW replica
    /// is known to have applied is retried, for up to the hold time, on
    /// the RW replicas that did not answer: they may well have applied it,
    /// and dropping the last of them as having missed it would leave no
    /// current replica, so the volume faulted for good (the chaos soak
    /// found one: an expansion behind a lossy link). Writes stay paused
    /// meanwhile, as they would while the volume holds for a replica.
    async fn on_every_replica<F, Fut>(
        &self,
        what: &str,
        idempotent: bool,
        op: F,
    ) -> Result<(), String>
    where
        F: Fn(Arc<ReplicaClient>) -> Fut,
        Fut: std::future::Future<Output = Result<(), ClientError>>,
    {
        let mut applied = Vec::new();
        let mut unanswered = Vec::new();
        for slot in self.slots().into_iter().filter(|s| s.mode() != Mode::ERR) {
            match self.call(&slot, &op).await {
                Ok(()) => applied.push(slot),
                Err(ReplicaFailure::Client(ClientError::Remote {
                    status: Status::Invalid,
                    message,
                })) if applied.is_empty() => return Err(message),
                Err(ReplicaFailure::Timeout(_)) if idempotent && slot.mode() == Mode::RW => {
                    unanswered.push(slot)
                }
                Err(e) => {
                    tracing::warn!(replica = %slot.endpoint, error = %e, "{what} failed on a replica; dropping it");
                    self.leave(&slot, &format!("{what} failed: {e}"));
                }
            }
        }
        let deadline = std::time::Instant::now() + self.hold();
        while !unanswered.is_empty()
            && !applied.iter().any(|s| s.mode() == Mode::RW)
            && std::time::Instant::now() < deadline
        {
            tracing::warn!(
                replicas = unanswered.len(),
                "{what} unanswered by the last current replicas; retrying"
            );
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            let mut still = Vec::new();
            for slot in unanswered {
                match self.call(&slot, &op).await {
                    Ok(()) => applied.push(slot),
                    Err(_) => still.push(slot),
                }
            }
            unanswered = still;
        }
        for slot in unanswered {
            tracing::warn!(replica = %slot.endpoint, "{what} unanswered by a replica; dropping it");
            self.leave(&slot, &format!("{what} failed: no answer"));
        }
        self.mark_missed_except(&applied);
        if !applied.iter().any(|s| s.mode() == Mode::RW) {
            return Err(format!("no RW replica applied the {what}"));
        }
        self.cover_departures().await.map_err(|e| e.to_string())
    }

    /// Marks snapshot `name` removed on every replica and wakes the purge.
    pub async fn remove_snapshot(&self, name: &str) -> Result<(), String> {
        rvol_replica::store::check_snapshot_name(name).map_err(|e| e.to_string())?;
        let file = snapshot_file(name);
        let layers = self.layers().await?;
        let below_head = &layers[..layers.len().saturating_sub(1)];
        if self.backups.pinned().as_deref() == Some(name) {
            return Err(format!(
                "a backup of snapshot {name} is running; remove it when the backup has finished"
            ));
        }
        match below_head.iter().find(|l| l.name == file) {
            None => return Err(format!("no snapshot {name}")),
            Some(l) if l.removed => return Err(format!("snapshot {name} is already removed")),
            Some(_) => {}
        }
        {
            let _all = self.locks().lock_all().await;
            self.on_every_replica("snapshot removal", true, |c| async move {
                c.remove_snapshot(name).await.map(drop)
            })
            .await?;
        }
        self.chain.request_purge();
        self.events.push(
            crate::events::EventKind::SnapshotRemoved,
            None,
            format!("snapshot {name} removed; its data is purged in the background"),
        );
        Ok(())
    }

    /// The purge task: waits for a request, then purges until every RW
    /// replica reports nothing left. Runs for the engine's lifetime.
    ///
    /// At most one run a second: a removed layer below the head (a
    /// rebuild's cut leaves one) asks for a purge after every trim, and a
    /// run syncs each replica's head, so a trimming client would otherwise
    /// cost a sync per trim (the chaos soak counted 2,600 runs in two
    /// minutes). Requests meanwhile wait for the next run.
    pub async fn purge_task(self: Arc<Self>) {
        loop {
            self.chain.wake_purge.notified().await;
            self.purge_all().await;
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    }

    async fn purge_all(&self) {
        let mut status = PurgeStatus {
            layer: String::new(),
            action: rvol_replica::maintenance::PurgeAction::Fold,
            bytes: 0,
            steps: 0,
        };
        let mut given_up: Vec<uuid::Uuid> = Vec::new();
        loop {
            if self.is_fenced() {
                return;
            }
            // A backup reads a snapshot's view, which a purge step may
            // change (see `crate::backup`); it asks for a purge when done.
            if self.backups.pinned().is_some() {
                break;
            }
            let mut worked = false;
            {
                let _no_rebuild = self.rebuilds.running.lock().await;
                for slot in self.slots() {
                    if slot.mode() != Mode::RW || given_up.contains(&slot.identity()) {
                        continue;
                    }
                    match self
                        .call(&slot, |c| async move { c.purge_step().await })
                        .await
                    {
                        Ok(Some(step)) => {
                            worked = true;
                            status.layer = step.layer;
                            status.action = step.action;
                            status.bytes += step.bytes;
                            status.steps += 1;
                            self.chain
                                .purged_total
                                .fetch_add(step.bytes, Ordering::Relaxed);
                            self.chain.set_purge(Some(status.clone()));
                        }
                        Ok(None) => {}
                        // The replica keeps serving: its removed layers still
                        // read right. The next purge request tries again.
                        Err(e) => {
                            tracing::warn!(replica = %slot.endpoint, error = %e, "purge step failed; leaving this replica's purge for later");
                            given_up.push(slot.identity());
                        }
                    }
                }
            }
            if !worked {
                break;
            }
        }
        if status.steps > 0 {
            tracing::info!(bytes = status.bytes, steps = status.steps, "purge finished");
        }
        if let Ok(layers) = self.layers().await {
            let left = layers[..layers.len().saturating_sub(1)]
                .iter()
                .any(|l| l.removed);
            self.chain.removed_layer_left.store(left, Ordering::Release);
        }
        self.chain.set_purge(None);
    }

    /// Makes the head a new empty layer on snapshot `name` on every replica.
    /// Only while no frontend serves the volume (see the engine's
    /// `--frontend none`): a mounted file system must not see its blocks
    /// change underneath it.
    pub async fn revert(&self, name: &str) -> Result<(), String> {
        if self.chain.frontend_attached.load(Ordering::Acquire) {
            return Err(
                "a frontend serves this volume; start the engine with --frontend none to revert"
                    .into(),
            );
        }
        rvol_replica::store::check_snapshot_name(name).map_err(|e| e.to_string())?;
        if let Some(s) = self.backups.pinned() {
            return Err(format!(
                "a backup of snapshot {s} is running; revert when it has finished"
            ));
        }
        let _no_rebuild = self.rebuilds.chain_steady("revert").await?;
        let file = snapshot_file(name);
        let layers = self.layers().await?;
        let below_head = &layers[..layers.len().saturating_sub(1)];
        let pos = below_head
            .iter()
            .position(|l| l.name == file && !l.removed)
            .ok_or_else(|| format!("no snapshot {name}"))?;
        let newer: Vec<&str> = below_head[pos + 1..]
            .iter()
            .filter(|l| !l.removed)
            .map(|l| l.name.as_str())
            .collect();
        if !newer.is_empty() {
            return Err(format!(
                "snapshots newer than {name} exist ({}); remove them before reverting",
                newer.join(", ")
            ));
        }
        {
            let _all = self.locks().lock_all().await;
            self.on_every_replica("revert", false, |c| async move { c.revert(name).await })
                .await?;
        }
        self.flush().await.map_err(|e| e.to_string())?;
        self.chain.request_purge();
        tracing::info!(snapshot = %name, "volume reverted");
        self.events.push(
            crate::events::EventKind::Reverted,
            None,
            format!("reverted to snapshot {name}"),
        );
        Ok(())
    }

    /// Grows the volume to `size` bytes on every replica. New NBD
    /// connections see the new size; a ublk device keeps its size until
    /// the engine restarts (the kernels this runs on lack UPDATE_SIZE).
    pub async fn expand(&self, size: u64) -> Result<(), String> {
        let current = self.size();
        if size <= current || !size.is_multiple_of(BLOCK_SIZE) || size > MAX_VOLUME_SIZE {
            return Err(format!(
                "cannot grow the volume from {current} to {size} bytes: the new size must be \
                 larger, a multiple of {BLOCK_SIZE} and at most {MAX_VOLUME_SIZE}"
            ));
        }
        let _no_rebuild = self.rebuilds.chain_steady("expand").await?;
        let _all = self.locks().lock_all().await;
        self.on_every_replica("expansion", true, |c| async move { c.expand(size).await })
            .await?;
        self.set_size(size);
        tracing::info!(from = current, to = size, "volume expanded");
        self.events.push(
            crate::events::EventKind::Expanded,
            None,
            format!("grown from {current} to {size} bytes"),
        );
        Ok(())
    }
}
