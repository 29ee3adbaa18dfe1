//! The replicated volume: one block device made of N replicas.
//!
//! # Data path
//!
//! - A write goes to every replica in RW or WO mode at once; it completes
//!   when all of them have answered, and succeeds if at least one RW replica
//!   applied it. Replicas that failed are set to ERR and left out from then
//!   on, so every replica still in the set has applied every completed
//!   write.
//! - A read goes to one RW replica and fails over to the next on error: to
//!   a replica in this process (`local:DIR`) if there is one, as it costs
//!   no socket and no other process's CPU; otherwise round-robin.
//! - Replicas see only whole, aligned 4 KiB blocks. Anything smaller is
//!   read-modify-written here, under the [`RangeLocks`] of the blocks it
//!   touches, held until every replica has answered.
//! - FLUSH flushes every replica in the set: a write completed before the
//!   flush was issued is then durable on every replica that stays in the
//!   set. It is also a barrier of the [`EpochGate`]: it first waits for the
//!   writes of the epoch it closes, so replicas can forget which regions
//!   those writes touched. A FUA write is sent with FUA to every replica.
//! - A replica that errors or does not answer within the timeout is set to
//!   ERR and logged. Requests that wait for the disk (flush, FUA writes)
//!   have a longer timeout of their own: a flush after gigabytes of
//!   scattered writes legitimately takes a while, and setting every replica
//!   to ERR for it would fault a healthy volume. If it answers `Fenced`, a
//!   newer engine owns the volume: this engine refuses all further writes
//!   and reports itself fenced.
//!
//! # Losing replicas and getting them back
//!
//! A replica is *current* while it has missed no acknowledged modification:
//! every write, trim or write-zeroes answered to the frontend while the
//! replica was not among the replicas that applied it sets its `missed`
//! flag. A current replica in ERR (a dropped connection, a restarted
//! process) can rejoin as it is: it is reattached in WO mode, a barrier of
//! the [`EpochGate`] waits out every modification that started without it,
//! and if it still missed nothing it becomes RW. A replica that missed
//! something stays ERR until it is rebuilt.
//!
//! A replica that misses something still reports, to the next engine, the
//! newest barrier flush it completed, which may be the newest any replica
//! completed: after a crash it would look as current as the replicas that
//! hold what it missed (`crate::freshness`). So whatever must survive a
//! crash and was applied without some replica (a FUA write, a snapshot, a
//! revert, an expansion) is acknowledged only once a barrier flush begun
//! after that *departure* has completed. That flush does not name the
//! replica, so the replicas holding the change move to a newer flush epoch
//! than it. It costs one flush per departure, not one per request.
//!
//! When no RW replica is left, I/O is not failed at once: requests wait for
//! up to the hold time while current replicas are reconnected; if one
//! returns, they go on without an error, otherwise they fail with EIO and
//! the volume is faulted (until a current replica returns).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::future::join_all;
use rvol_frontend::{BlockVolume, Extent, VolumeError};
use rvol_replica::client::{ClientError, Links, ReplicaClient};
use rvol_replica::proto::{Sealed, Status, MAX_PAYLOAD};
use rvol_replica::server::Endpoint;
use rvol_replica::{Generation, Owner, BLOCK_SIZE};
use serde::Serialize;
use tokio::sync::watch;

use crate::crypt::VolumeKey;
use crate::epoch::EpochGate;
use crate::events::EventKind;
use crate::metrics::{IoMetrics, IoOp};
use crate::range_lock::RangeLocks;

/// What a replica is doing in the set. (The names are the ones operators
/// know from Longhorn, hence the capitals.)
#[allow(clippy::upper_case_acronyms)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[repr(u8)]
pub enum Mode {
    /// Fresh: receives writes and serves reads.
    RW = 0,
    /// Being rebuilt: receives writes, serves no reads.
    WO = 1,
    /// Out of the set: receives nothing.
    ERR = 2,
}

impl Mode {
    fn from_u8(v: u8) -> Mode {
        match v {
            0 => Mode::RW,
            1 => Mode::WO,
            _ => Mode::ERR,
        }
    }
}

/// One replica of the volume, as the engine sees it.
pub struct ReplicaSlot {
    pub endpoint: Endpoint,
    client: Mutex<Option<Arc<ReplicaClient>>>,
    mode: AtomicU8,
    /// Missed an acknowledged modification: stale until rebuilt.
    missed: AtomicBool,
    /// Bumped whenever the replica leaves or rejoins the set, so a reply
    /// sent on an earlier attachment never counts as applied.
    attachment: AtomicU64,
    /// Identity of the replica whose data this slot holds (nil: none).
    identity: Mutex<uuid::Uuid>,
    /// The replica's revision counter as far as the engine knows it.
    revision: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// Times it was put out of the set by an error since the engine
    /// started.
    pub failures: AtomicU64,
    /// Its round trips, against its peers' ([`crate::slow`]).
    pub timing: crate::slow::ReplicaTiming,
}

impl ReplicaSlot {
    pub fn new(
        endpoint: Endpoint,
        client: ReplicaClient,
        identity: uuid::Uuid,
        mode: Mode,
        revision: u64,
    ) -> Self {
        ReplicaSlot {
            endpoint,
            client: Mutex::new(Some(Arc::new(client))),
            mode: AtomicU8::new(mode as u8),
            missed: AtomicBool::new(false),
            attachment: AtomicU64::new(0),
            identity: Mutex::new(identity),
            revision: AtomicU64::new(revision),
            last_error: Mutex::new(None),
            failures: AtomicU64::new(0),
            timing: Default::default(),
        }
    }

    /// A replica that is out of the set from the start.
    pub fn failed(endpoint: Endpoint, error: String) -> Self {
        ReplicaSlot {
            endpoint,
            client: Mutex::new(None),
            mode: AtomicU8::new(Mode::ERR as u8),
            // Left out at start: whatever it holds is not known to be current.
            missed: AtomicBool::new(true),
            attachment: AtomicU64::new(0),
            identity: Mutex::new(uuid::Uuid::nil()),
            revision: AtomicU64::new(0),
            last_error: Mutex::new(Some(error)),
            failures: AtomicU64::new(1),
            timing: Default::default(),
        }
    }

    pub fn mode(&self) -> Mode {
        Mode::from_u8(self.mode.load(Ordering::Acquire))
    }

    pub fn revision(&self) -> u64 {
        self.revision.load(Ordering::Relaxed)
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn client(&self) -> Option<Arc<ReplicaClient>> {
        if self.mode() == Mode::ERR {
            return None;
        }
        self.current_client()
    }

    pub fn missed(&self) -> bool {
        self.missed.load(Ordering::Acquire)
    }

    /// It missed a modification or a chain change: only a rebuild brings
    /// it back. True if it had missed nothing until now.
    fn mark_missed(&self) -> bool {
        !self.missed.swap(true, Ordering::AcqRel)
    }

    pub fn identity(&self) -> uuid::Uuid {
        *self.identity.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The client of the current attachment, whatever the mode.
    pub fn current_client(&self) -> Option<Arc<ReplicaClient>> {
        self.client
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Why an operation on one replica failed.
pub(crate) enum ReplicaFailure {
    Client(ClientError),
    Timeout(Duration),
}

impl std::fmt::Display for ReplicaFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplicaFailure::Client(e) => write!(f, "{e}"),
            ReplicaFailure::Timeout(d) => write!(f, "no answer within {d:?}"),
        }
    }
}

/// The volume; see the module documentation.
pub struct ReplicatedVolume {
    pub name: String,
    size: AtomicU64,
    pub generation: Generation,
    slots: std::sync::RwLock<Vec<Arc<ReplicaSlot>>>,
    locks: RangeLocks,
    epochs: EpochGate,
    /// Bytes copied at start to reconcile replicas after an unclean stop.
    pub reconciled_bytes: u64,
    timeout: Duration,
    /// The timeout of requests that wait for the disk.
    flush_timeout: Duration,
    next_read: AtomicUsize,
    fenced: AtomicBool,
    /// Turns true when a newer engine has taken the replicas over.
    fenced_tx: watch::Sender<bool>,
    /// How to reconnect a replica: as whom, for which volume.
    attach: AttachInfo,
    /// How long I/O waits for a current replica when none is left.
    hold: Duration,
    faulted: AtomicBool,
    /// Serializes reattachment and the hold.
    recovery: tokio::sync::Mutex<()>,
    pub rebuilds: crate::rebuild::RebuildState,
    pub chain: crate::chain::ChainState,
    pub backups: crate::backup::Backups,
    /// What happened, for status ([`crate::events`]).
    pub events: crate::events::Events,
    /// Reads that found data not matching its checksums.
    pub checksum_errors: AtomicU64,
    /// Reads sent from a replica's files that did not match the recorded
    /// checksums and were read again, verified by the replica.
    pub stored_crc_rereads: AtomicU64,
    /// Bytes read from the files of replicas on this node
    /// ([`rvol_replica::direct`]).
    pub direct_read_bytes: AtomicU64,
    /// Replicas that started missing changes (or joined, or started out of
    /// the set), and how many of those departures a completed barrier
    /// flush has covered (see the module documentation).
    departures: AtomicU64,
    departures_flushed: AtomicU64,
    /// Has the cluster record the RW set before a flush is acknowledged.
    in_sync_hook: Option<crate::in_sync::InSyncHook>,
    /// Seals blocks before they leave, opens them when they come back
    /// ([`crate::crypt`]); `None` for a plain volume.
    key: Option<Arc<VolumeKey>>,
    /// Requests as the frontends ask them ([`crate::metrics`]).
    pub io: IoMetrics,
}

/// What reconnecting a replica needs.
#[derive(Clone)]
pub struct AttachInfo {
    pub volume: uuid::Uuid,
    pub owner: Owner,
    pub links: Links,
}

type OpResult<T> = Result<T, VolumeError>;

pub struct VolumeParams {
    pub name: String,
    pub size: u64,
    pub generation: Generation,
    /// First flush epoch of this engine: above every epoch replicas saw.
    pub first_epoch: u64,
    pub reconciled_bytes: u64,
    pub timeout: Duration,
    pub flush_timeout: Duration,
    pub attach: AttachInfo,
    pub hold: Duration,
    pub in_sync_hook: Option<crate::in_sync::InSyncHook>,
    pub key: Option<Arc<VolumeKey>>,
}

impl ReplicatedVolume {
    pub fn new(p: VolumeParams, slots: Vec<Arc<ReplicaSlot>>) -> Self {
        // Replicas that start out of the set count as departed: nothing
        // this engine acknowledges without them may be served by them
        // after a crash.
        let departed = slots.iter().filter(|s| s.missed()).count() as u64;
        let VolumeParams {
            name,
            size,
            generation,
            first_epoch,
            reconciled_bytes,
            timeout,
            flush_timeout,
            attach,
            hold,
            in_sync_hook,
            key,
        } = p;
        ReplicatedVolume {
            name,
            size: AtomicU64::new(size),
            generation,
            slots: std::sync::RwLock::new(slots),
            locks: RangeLocks::default(),
            epochs: EpochGate::new(first_epoch),
            reconciled_bytes,
            timeout,
            flush_timeout,
            next_read: AtomicUsize::new(0),
            fenced: AtomicBool::new(false),
            fenced_tx: watch::channel(false).0,
            attach,
            hold,
            faulted: AtomicBool::new(false),
            recovery: tokio::sync::Mutex::new(()),
            rebuilds: Default::default(),
            chain: Default::default(),
            backups: Default::default(),
            events: Default::default(),
            checksum_errors: AtomicU64::new(0),
            stored_crc_rereads: AtomicU64::new(0),
            direct_read_bytes: AtomicU64::new(0),
            departures: AtomicU64::new(departed),
            departures_flushed: AtomicU64::new(0),
            in_sync_hook,
            key,
            io: IoMetrics::default(),
        }
    }

    /// Largest piece of data one request carries: a frame's payload, less
    /// room for the blocks' nonces and tags in an encrypted volume.
    fn max_piece(&self) -> u64 {
        match self.key {
            Some(_) => MAX_PAYLOAD as u64 / 2,
            None => MAX_PAYLOAD as u64,
        }
    }

    /// The replicas, in order (a snapshot: the set may change meanwhile).
    pub fn slots(&self) -> Vec<Arc<ReplicaSlot>> {
        self.slots.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Adds a replica to the set; it is rebuilt in the background.
    pub fn add_replica(&self, endpoint: Endpoint) -> Result<(), String> {
        let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
        if slots.iter().any(|s| s.endpoint == endpoint) {
            return Err(format!("{endpoint} is already a replica of this volume"));
        }
        tracing::info!(replica = %endpoint, "replica added: it will be rebuilt");
        self.events.push(
            EventKind::ReplicaAdded,
            Some(endpoint.to_string()),
            "added; it will be rebuilt",
        );
        slots.push(Arc::new(ReplicaSlot::failed(
            endpoint,
            "added: waiting for its rebuild".into(),
        )));
        self.departures.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Removes a replica from the set. The last RW replica cannot go.
    pub fn remove_replica(&self, endpoint: &Endpoint) -> Result<(), String> {
        let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
        let i = slots
            .iter()
            .position(|s| &s.endpoint == endpoint)
            .ok_or_else(|| format!("{endpoint} is not a replica of this volume"))?;
        let others_rw = slots
            .iter()
            .enumerate()
            .any(|(j, s)| j != i && s.mode() == Mode::RW);
        if slots[i].mode() == Mode::RW && !others_rw {
            return Err(format!(
                "{endpoint} is the last RW replica; refusing to remove it"
            ));
        }
        let slot = slots.remove(i);
        self.leave(&slot, "removed");
        tracing::info!(replica = %endpoint, "replica removed");
        self.events.push(
            EventKind::ReplicaRemoved,
            Some(endpoint.to_string()),
            "removed",
        );
        Ok(())
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }

    pub fn fenced_watch(&self) -> watch::Receiver<bool> {
        self.fenced_tx.subscribe()
    }

    /// Replicas that receive writes (RW and WO).
    fn writable(&self) -> Vec<Arc<ReplicaSlot>> {
        self.slots()
            .iter()
            .filter(|s| s.client().is_some())
            .cloned()
            .collect()
    }

    fn readable(&self) -> Vec<Arc<ReplicaSlot>> {
        self.slots()
            .iter()
            .filter(|s| s.mode() == Mode::RW)
            .cloned()
            .collect()
    }

    fn fail(&self, slot: &ReplicaSlot, why: &ReplicaFailure) {
        if let ReplicaFailure::Client(e) = why {
            if e.is_fenced() && !self.fenced.swap(true, Ordering::AcqRel) {
                tracing::error!(replica = %slot.endpoint, error = %e, "a newer engine has taken the volume over; refusing all writes");
                self.events.push(
                    EventKind::Fenced,
                    Some(slot.endpoint.to_string()),
                    "a newer engine took the volume over; this one stops serving",
                );
                let _ = self.fenced_tx.send(true);
            }
        }
        *slot.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(why.to_string());
        slot.attachment.fetch_add(1, Ordering::AcqRel);
        let was = Mode::from_u8(slot.mode.swap(Mode::ERR as u8, Ordering::AcqRel));
        if was != Mode::ERR {
            slot.failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(replica = %slot.endpoint, was = ?was, error = %why, "replica set to ERR");
            self.events.push(
                EventKind::ReplicaFailed,
                Some(slot.endpoint.to_string()),
                format!("set to ERR (was {was:?}): {why}"),
            );
        }
    }

    pub(crate) async fn call<T, F, Fut>(
        &self,
        slot: &ReplicaSlot,
        f: F,
    ) -> Result<T, ReplicaFailure>
    where
        F: FnOnce(Arc<ReplicaClient>) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        self.call_within(self.timeout, slot, f).await
    }

    async fn call_within<T, F, Fut>(
        &self,
        timeout: Duration,
        slot: &ReplicaSlot,
        f: F,
    ) -> Result<T, ReplicaFailure>
    where
        F: FnOnce(Arc<ReplicaClient>) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let Some(client) = slot.client() else {
            return Err(ReplicaFailure::Client(ClientError::Lost(
                "replica is out of the set".into(),
            )));
        };
        match tokio::time::timeout(timeout, f(client)).await {
            Ok(r) => r.map_err(ReplicaFailure::Client),
            Err(_) => Err(ReplicaFailure::Timeout(timeout)),
        }
    }

    /// Runs `op` on every writable replica, setting those that fail to ERR.
    /// Succeeds if at least one RW replica succeeded; with none left, holds
    /// (see the module documentation) and retries.
    async fn fan_out<F, Fut>(&self, what: &str, op: F) -> OpResult<()>
    where
        F: Fn(Arc<ReplicaClient>) -> Fut,
        Fut: std::future::Future<Output = Result<(), ClientError>>,
    {
        self.fan_out_within(self.timeout, what, op).await
    }

    /// [`Self::fan_out`] of a request that waits for the disk.
    async fn fan_out_durable<F, Fut>(&self, what: &str, op: F) -> OpResult<()>
    where
        F: Fn(Arc<ReplicaClient>) -> Fut,
        Fut: std::future::Future<Output = Result<(), ClientError>>,
    {
        self.fan_out_within(self.flush_timeout, what, op).await
    }

    async fn fan_out_within<F, Fut>(&self, timeout: Duration, what: &str, op: F) -> OpResult<()>
    where
        F: Fn(Arc<ReplicaClient>) -> Fut,
        Fut: std::future::Future<Output = Result<(), ClientError>>,
    {
        loop {
            if self.is_fenced() {
                return Err(VolumeError::Io(
                    "fenced: a newer engine owns this volume".into(),
                ));
            }
            let targets = self.writable();
            let attachments: Vec<u64> = targets
                .iter()
                .map(|s| s.attachment.load(Ordering::Acquire))
                .collect();
            let timed = match what {
                "write" => Some(crate::slow::Timed::Write),
                "flush" => Some(crate::slow::Timed::Flush),
                _ => None,
            };
            let results = join_all(targets.iter().map(|s| {
                let op = &op;
                async move {
                    // Only writes and flushes are timed (see `crate::slow`).
                    let start = timed.map(|t| (t, std::time::Instant::now()));
                    let r = self.call_within(timeout, s, op).await;
                    if let (Some((t, start)), Ok(())) = (start, &r) {
                        s.timing.record(&self.io, &s.endpoint, t, start.elapsed());
                    }
                    r
                }
            }))
            .await;
            let mut applied = Vec::with_capacity(targets.len());
            let mut ok_rw = 0;
            let mut invalid = None;
            for ((slot, r), attachment) in targets.iter().zip(results).zip(attachments) {
                match r {
                    Ok(()) if slot.attachment.load(Ordering::Acquire) == attachment => {
                        ok_rw += usize::from(slot.mode() == Mode::RW);
                        applied.push(slot.clone());
                    }
                    Ok(()) => {}
                    // A request the replica found wrong is our bug or the
                    // client's, not the replica's fault: keep it in the set.
                    Err(ReplicaFailure::Client(ClientError::Remote {
                        status: Status::Invalid,
                        message,
                    })) => invalid = Some(message),
                    Err(e) => self.fail(slot, &e),
                }
            }
            if let Some(m) = invalid {
                return Err(VolumeError::Invalid(m));
            }
            if ok_rw == 0 {
                self.hold_for_replicas(what).await?;
                continue;
            }
            self.mark_missed_except(&applied);
            return Ok(());
        }
    }

    /// The volume grew (see [`ReplicatedVolume::expand`]).
    pub fn set_size(&self, size: u64) {
        self.size.store(size, Ordering::Release);
    }

    /// Every replica not in `applied` missed a change: it comes back only
    /// through a rebuild.
    pub(crate) fn mark_missed_except(&self, applied: &[Arc<ReplicaSlot>]) {
        for slot in self.slots() {
            if !applied.iter().any(|a| Arc::ptr_eq(a, &slot)) {
                self.mark_missed(&slot);
            }
        }
    }

    fn mark_missed(&self, slot: &ReplicaSlot) {
        if slot.mark_missed() {
            self.departures.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Returns once a barrier flush has covered every departure so far, so
    /// that a change acknowledged next survives a crash (see the module
    /// documentation). Free while no replica has departed since the last
    /// flush.
    pub(crate) async fn cover_departures(&self) -> OpResult<()> {
        if self.departures_flushed.load(Ordering::Acquire) < self.departures.load(Ordering::Acquire)
        {
            self.flush().await?;
        }
        Ok(())
    }

    pub fn attach_info(&self) -> AttachInfo {
        self.attach.clone()
    }

    /// How long the volume holds I/O for a current replica to return.
    pub fn hold(&self) -> Duration {
        self.hold
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The timeout of requests that wait for the disk.
    pub fn flush_timeout(&self) -> Duration {
        self.flush_timeout
    }

    pub fn locks(&self) -> &RangeLocks {
        &self.locks
    }

    /// A replica starts receiving writes (and serves no reads); from now on
    /// the slot stands for replica `identity`.
    pub fn join_write_only(
        &self,
        slot: &ReplicaSlot,
        client: Arc<ReplicaClient>,
        identity: uuid::Uuid,
    ) {
        *slot.identity.lock().unwrap_or_else(|e| e.into_inner()) = identity;
        *slot.client.lock().unwrap_or_else(|e| e.into_inner()) = Some(client);
        slot.attachment.fetch_add(1, Ordering::AcqRel);
        slot.mode.store(Mode::WO as u8, Ordering::Release);
    }

    /// A rebuilt replica serves reads again.
    pub fn promote(&self, slot: &ReplicaSlot, revision: u64) {
        slot.revision.store(revision, Ordering::Relaxed);
        slot.missed.store(false, Ordering::Release);
        *slot.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
        slot.mode.store(Mode::RW as u8, Ordering::Release);
    }

    /// Takes a replica out of the set; it stays stale.
    pub fn leave(&self, slot: &ReplicaSlot, why: &str) {
        self.mark_missed(slot);
        slot.attachment.fetch_add(1, Ordering::AcqRel);
        slot.mode.store(Mode::ERR as u8, Ordering::Release);
        *slot.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(why.to_string());
    }

    /// Takes snapshot `name` on every writable replica. The caller holds
    /// every range lock. A replica that fails is dropped, except a joining
    /// (WO) one failing a rebuild's cut (`user_created` false), which fails
    /// the call instead.
    pub async fn snapshot_all(
        &self,
        name: &str,
        user_created: bool,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), String> {
        let mut applied = Vec::new();
        let mut joining_failed = None;
        for slot in self.writable() {
            // Each replica syncs its head: a disk wait.
            let r = self
                .call_within(self.flush_timeout, &slot, |c| async move {
                    c.snapshot(name, user_created, labels).await.map(drop)
                })
                .await;
            // A joining replica that fails a rebuild's cut fails the
            // rebuild, once the RW replicas after it have taken the cut
            // too: every one of them keeps the same chain.
            match r {
                Ok(()) => applied.push(slot),
                Err(e) if slot.mode() == Mode::WO && !user_created => {
                    joining_failed = Some(e.to_string())
                }
                Err(e) => self.fail(&slot, &e),
            }
        }
        // A replica without this layer has another chain: it comes back
        // through a rebuild, never as it is.
        self.mark_missed_except(&applied);
        if self.rw_count() == 0 {
            return Err("no RW replica took the snapshot".into());
        }
        self.cover_departures().await.map_err(|e| e.to_string())?;
        joining_failed.map_or(Ok(()), Err)
    }

    /// A user snapshot: a crash-consistent cut across every replica. New
    /// writes wait and those in flight drain (the whole-volume range lock),
    /// every replica syncs its head and freezes it as `name`, then writes
    /// resume. Returns how long writes were paused. Refused while a
    /// rebuild runs, since the rebuild copies a chain fixed at its start.
    pub async fn snapshot_user(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<Duration, String> {
        let _no_rebuild = self.rebuilds.chain_steady("take the snapshot").await?;
        // Refuse what every replica would refuse before asking any: a
        // replica that fails a snapshot is dropped from the set.
        rvol_replica::store::check_snapshot_name(name).map_err(|e| e.to_string())?;
        let file = rvol_replica::maintenance::snapshot_file(name);
        if self.layers().await?.iter().any(|l| l.name == file) {
            return Err(format!("snapshot {name} exists"));
        }
        // Most of the head's dirty data goes to disk before writes pause,
        // so the sync under the lock has little left to do.
        self.flush().await.map_err(|e| e.to_string())?;
        let started = Instant::now();
        let _all = self.locks().lock_all().await;
        self.snapshot_all(name, true, labels).await?;
        let paused = started.elapsed();
        self.events.push(
            EventKind::Snapshot,
            None,
            format!("snapshot {name} taken; writes paused {paused:.1?}"),
        );
        Ok(paused)
    }

    /// The layer chain as an RW replica reports it, oldest first.
    pub async fn layers(&self) -> Result<Vec<rvol_replica::store::LayerInfo>, String> {
        let slot = self
            .slots()
            .into_iter()
            .find(|s| s.mode() == Mode::RW)
            .ok_or("no RW replica")?;
        self.call(&slot, |c| async move { c.info().await })
            .await
            .map(|i| i.chain)
            .map_err(|e| e.to_string())
    }

    fn rw_count(&self) -> usize {
        self.slots().iter().filter(|s| s.mode() == Mode::RW).count()
    }

    pub fn is_faulted(&self) -> bool {
        self.faulted.load(Ordering::Acquire)
    }

    /// No RW replica is left: waits up to the hold time for a current one
    /// to come back. Errors if none does (the volume is then faulted).
    async fn hold_for_replicas(&self, what: &str) -> OpResult<()> {
        // Poll rather than queue on the lock: a reattachment that holds it
        // may be waiting, in a barrier, for this very request.
        let _one = loop {
            if self.rw_count() > 0 {
                return Ok(());
            }
            if let Ok(guard) =
                tokio::time::timeout(Duration::from_millis(100), self.recovery.lock()).await
            {
                break guard;
            }
        };
        let deadline = Instant::now() + self.hold;
        let mut announced = false;
        loop {
            if self.rw_count() > 0 {
                return Ok(());
            }
            if self.is_fenced() {
                return Err(VolumeError::Io(
                    "fenced: a newer engine owns this volume".into(),
                ));
            }
            if self.is_faulted() {
                return Err(VolumeError::Io(format!(
                    "{what}: volume is faulted: no replica with current data"
                )));
            }
            if !announced {
                tracing::warn!(hold = ?self.hold, "no healthy replica left: holding I/O while reconnecting");
                announced = true;
            }
            self.reattach_locked().await;
            if self.rw_count() > 0 {
                tracing::info!("a current replica is back: I/O resumes");
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.faulted.store(true, Ordering::Release);
                tracing::error!(hold = ?self.hold, "no replica with current data returned: volume faulted");
                return Err(VolumeError::Io(format!(
                    "{what}: no replica with current data returned"
                )));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Sets replicas whose every connection has died to ERR, so a replica
    /// that goes away while idle is noticed without waiting for I/O.
    pub fn check_connections(&self) {
        for slot in &self.slots() {
            if let Some(c) = slot.client() {
                if !c.is_alive() {
                    let lost = ClientError::Lost("every connection to the replica closed".into());
                    self.fail(slot, &ReplicaFailure::Client(lost));
                }
            }
        }
    }

    /// Asks every replica it writes to whether this engine still owns it.
    /// An engine learns of a takeover from its next request; one left idle
    /// (frozen while another engine took over, then thawed with its
    /// clients gone) would otherwise serve on, holding its clients'
    /// device, forever (found by the chaos soak). INFO is admitted under
    /// the lease like every request, so it is refused as fenced; only that
    /// answer counts here: a replica slow to answer is the I/O path's
    /// business, not this probe's, which waits a second at most.
    pub async fn check_owner(&self) {
        let wait = self.timeout.min(Duration::from_secs(1));
        let asks = self.writable().into_iter().filter_map(|slot| {
            let client = slot.client()?;
            Some(async move {
                match tokio::time::timeout(wait, client.info()).await {
                    Ok(Err(e)) if e.is_fenced() => Some((slot, e)),
                    _ => None,
                }
            })
        });
        for (slot, e) in futures::future::join_all(asks).await.into_iter().flatten() {
            self.fail(&slot, &ReplicaFailure::Client(e));
        }
    }

    /// Reconnects ERR replicas that missed nothing (background retry).
    pub async fn reattach_current(&self) {
        let _one = self.recovery.lock().await;
        self.reattach_locked().await;
        if self.rw_count() > 0 && self.faulted.swap(false, Ordering::AcqRel) {
            tracing::info!("a current replica is back: volume no longer faulted");
        }
    }

    async fn reattach_locked(&self) {
        // With no RW replica nothing can be acknowledged meanwhile, and the
        // requests in flight are the held ones: no barrier then (it would
        // wait for them). Otherwise the barrier waits out modifications that
        // started without the returning replicas.
        let barrier = self.rw_count() > 0;
        let mut joining = Vec::new();
        let slots = self.slots();
        for slot in &slots {
            if slot.mode() != Mode::ERR || slot.missed() {
                continue;
            }
            let a = &self.attach;
            let connect =
                ReplicaClient::connect(&slot.endpoint, a.volume, a.owner, a.links.clone());
            match tokio::time::timeout(self.timeout, connect).await {
                Ok(Ok((_, info))) if info.replica_uuid != slot.identity() => {
                    // Another replica now answers at this address (a
                    // replaced disk): it holds none of our data.
                    self.mark_missed(slot);
                    tracing::warn!(replica = %slot.endpoint, "a different replica answers at this address: it will be rebuilt");
                }
                Ok(Ok((client, _))) => {
                    let client = Arc::new(client);
                    *slot.client.lock().unwrap_or_else(|e| e.into_inner()) = Some(client.clone());
                    slot.attachment.fetch_add(1, Ordering::AcqRel);
                    // Writes from now on include it.
                    slot.mode.store(Mode::WO as u8, Ordering::Release);
                    joining.push((slot, client));
                }
                Ok(Err(e)) if e.is_fenced() => self.fail(slot, &ReplicaFailure::Client(e)),
                _ => {}
            }
        }
        if joining.is_empty() {
            return;
        }
        if barrier {
            self.epochs.barrier().await;
        }
        for (slot, client) in joining {
            // What it applied before it was lost may not be durable yet.
            let flushed = tokio::time::timeout(self.flush_timeout, client.flush()).await;
            if slot.missed() || !matches!(flushed, Ok(Ok(_))) {
                slot.attachment.fetch_add(1, Ordering::AcqRel);
                slot.mode.store(Mode::ERR as u8, Ordering::Release);
                continue;
            }
            slot.mode.store(Mode::RW as u8, Ordering::Release);
            *slot.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
            tracing::info!(replica = %slot.endpoint, "replica reattached: it missed no acknowledged write");
            self.events.push(
                EventKind::ReplicaRejoined,
                Some(slot.endpoint.to_string()),
                "back as it was: it missed no acknowledged write",
            );
        }
    }

    fn count_modification(&self) {
        for s in &self.slots() {
            if s.mode() != Mode::ERR {
                s.revision.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The volume's encryption, if it is encrypted.
    pub fn encryption(&self) -> Option<&rvol_replica::meta::Encryption> {
        self.attach.links.encryption.as_ref()
    }

    /// Refuses data I/O on an encrypted volume maintained without its key.
    fn check_key(&self) -> OpResult<()> {
        if self.key.is_none() && self.attach.links.encryption.is_some() {
            return Err(VolumeError::Invalid(
                "an encrypted volume maintained without its key serves no data".into(),
            ));
        }
        Ok(())
    }

    /// Reads aligned blocks from one RW replica, failing over on error.
    async fn read_aligned(&self, offset: u64, len: u64) -> OpResult<Bytes> {
        self.check_key()?;
        if len <= self.max_piece() {
            return self.read_piece(offset, len).await;
        }
        let mut out = BytesMut::with_capacity(len as usize);
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(self.max_piece());
            out.extend_from_slice(&self.read_piece(at, n).await?);
            at += n;
        }
        Ok(out.freeze())
    }

    /// Reads from one RW replica, failing over on error. A replica whose
    /// data fails its checksums is taken out to be rebuilt once another
    /// has answered; if none has a copy that passes, the stored data of
    /// one is served and the event reported (see `rvol_replica::checksum`).
    async fn read_piece(&self, offset: u64, len: u64) -> OpResult<Bytes> {
        loop {
            let candidates = self.readable();
            let first = candidates
                .iter()
                .position(|s| matches!(s.endpoint, Endpoint::Local(_)))
                .unwrap_or_else(|| self.next_read.fetch_add(1, Ordering::Relaxed));
            let mut rotten: Vec<(Arc<ReplicaSlot>, String)> = Vec::new();
            for k in 0..candidates.len() {
                let slot = &candidates[(first + k) % candidates.len()];
                match self.call(slot, |c| self.read_from(c, offset, len)).await {
                    Ok(data) => {
                        for (bad, why) in rotten {
                            tracing::error!(replica = %bad.endpoint, error = %why, "checksum mismatch: read from another replica; rebuilding this one");
                            self.checksum_errors.fetch_add(1, Ordering::Relaxed);
                            self.leave(&bad, &format!("checksum mismatch, being repaired: {why}"));
                        }
                        return Ok(data);
                    }
                    Err(ReplicaFailure::Client(ClientError::Remote {
                        status: Status::Invalid,
                        message,
                    })) => return Err(VolumeError::Invalid(message)),
                    Err(ReplicaFailure::Client(ClientError::Remote {
                        status: Status::Checksum,
                        message,
                    })) => rotten.push((slot.clone(), message)),
                    Err(e) => self.fail(slot, &e),
                }
            }
            if let Some((slot, why)) = rotten.first() {
                tracing::error!(replica = %slot.endpoint, offset, len, error = %why, "no replica holds a copy that matches its checksums; serving the stored data");
                self.checksum_errors.fetch_add(1, Ordering::Relaxed);
                match self
                    .call(
                        slot,
                        |c| async move { c.read_unverified(offset, len).await },
                    )
                    .await
                {
                    // Stored data of an encrypted volume is served only if
                    // it opens: what fails its tag is not the volume's.
                    Ok(data) => return self.open(offset, len, data).map_err(VolumeError::Io),
                    Err(e) => self.fail(slot, &e),
                }
            }
            self.hold_for_replicas("read").await?;
        }
    }

    /// Reads from one replica, letting it send large reads from its files
    /// unchecked. If they do not match their recorded checksums (bit rot, a
    /// write that raced the send, a write cut short by a crash), reads
    /// again with the replica checking every block, which names the bad
    /// block or returns data that is good.
    async fn read_from(
        &self,
        c: Arc<ReplicaClient>,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, ClientError> {
        if self.key.is_some() {
            // A block that does not open is handled as one that fails its
            // checksum: read from another replica, this one rebuilt.
            let sealed = c.read(offset, len).await?;
            return self
                .open(offset, len, sealed)
                .map_err(|message| ClientError::Remote {
                    status: Status::Checksum,
                    message,
                });
        }
        match c.read_stored(offset, len).await {
            Ok(read) => {
                if read.from_files {
                    self.direct_read_bytes.fetch_add(len, Ordering::Relaxed);
                }
                Ok(read.data)
            }
            Err(ClientError::StoredCrcMismatch(why)) => {
                self.stored_crc_rereads.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(replica = %c.endpoint(), offset, len, %why, "reading again, verified");
                c.read(offset, len).await
            }
            Err(e) => Err(e),
        }
    }

    /// Opens what a replica returned for `len` bytes at `offset` of an
    /// encrypted volume (the data itself for a plain one).
    fn open(&self, offset: u64, len: u64, payload: Bytes) -> Result<Bytes, String> {
        match &self.key {
            None => Ok(payload),
            Some(key) => key
                .open(offset / BLOCK_SIZE, &payload, len as usize)
                .map_err(|e| e.to_string()),
        }
    }

    /// Writes whole aligned blocks to every replica, in pieces the replica
    /// protocol allows. The caller holds the range lock.
    async fn write_aligned(&self, offset: u64, data: Bytes, fua: bool) -> OpResult<()> {
        self.check_key()?;
        let mut at = 0usize;
        while at < data.len() {
            let n = (data.len() - at).min(self.max_piece() as usize);
            let off = offset + at as u64;
            // Sealed and checksummed once here, not once per replica.
            let piece = match &self.key {
                None => Sealed::new(data.slice(at..at + n)),
                Some(key) => {
                    let sealed = key
                        .seal(off / BLOCK_SIZE, &data[at..at + n])
                        .map_err(|e| VolumeError::Io(e.to_string()))?;
                    Sealed::blocks_then(sealed, n / BLOCK_SIZE as usize * crate::crypt::AUTH)
                }
            };
            self.write_piece(off, piece, fua).await?;
            at += n;
        }
        if fua {
            self.cover_departures().await?;
        }
        Ok(())
    }

    /// Sends one piece of sealed blocks to every writable replica.
    async fn write_piece(&self, off: u64, piece: Sealed, fua: bool) -> OpResult<()> {
        let ticket = self.epochs.enter();
        let epoch = ticket.epoch;
        let timeout = if fua {
            self.flush_timeout
        } else {
            self.timeout
        };
        self.fan_out_within(timeout, "write", |c| {
            let piece = piece.clone();
            async move { c.write(off, piece, fua, epoch).await }
        })
        .await?;
        drop(ticket);
        self.count_modification();
        Ok(())
    }

    /// Writes blocks of an encrypted volume sealed elsewhere, as a
    /// snapshot read returns them: whole blocks, then each block's nonce
    /// and tag. A block whose nonce and tag are all zeros was a hole and
    /// is left one. A restore writes backups of encrypted volumes so,
    /// without their key.
    pub async fn write_sealed(&self, offset: u64, content: Bytes) -> OpResult<()> {
        let auth = rvol_replica::meta::auth_bytes(self.encryption())
            .map_err(|e| VolumeError::Invalid(e.to_string()))?;
        let unit = BLOCK_SIZE as usize + auth;
        if auth == 0 || !content.len().is_multiple_of(unit) {
            return Err(VolumeError::Invalid(
                "sealed blocks need an encrypted volume and whole blocks with their tags".into(),
            ));
        }
        let blocks = content.len() / unit;
        let len = (blocks as u64) * BLOCK_SIZE;
        self.check_range(offset, len)?;
        let (data, auths) = content.split_at(blocks * BLOCK_SIZE as usize);
        let held = |b: usize| auths[b * auth..(b + 1) * auth].iter().any(|&x| x != 0);
        let _lock = self
            .locks
            .lock(offset / BLOCK_SIZE, (offset + len) / BLOCK_SIZE)
            .await;
        let mut b = 0;
        while b < blocks {
            if !held(b) {
                b += 1;
                continue;
            }
            let most = b + (self.max_piece() / BLOCK_SIZE) as usize;
            let end = (b..blocks.min(most))
                .find(|&x| !held(x))
                .unwrap_or(blocks.min(most));
            let mut piece = Vec::with_capacity((end - b) * unit);
            piece.extend_from_slice(&data[b * BLOCK_SIZE as usize..end * BLOCK_SIZE as usize]);
            piece.extend_from_slice(&auths[b * auth..end * auth]);
            let sealed = Sealed::blocks_then(Bytes::from(piece), (end - b) * auth);
            self.write_piece(offset + b as u64 * BLOCK_SIZE, sealed, false)
                .await?;
            b = end;
        }
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64) -> OpResult<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(VolumeError::Invalid(format!(
                "{offset}+{len} is past the end ({})",
                self.size()
            ))),
        }
    }

    /// Flushes and marks every replica in the set clean (clean shutdown).
    pub async fn shutdown_clean(&self) -> OpResult<()> {
        self.flush().await?;
        self.fan_out_durable(
            "mark clean",
            |c| async move { c.mark_clean().await.map(drop) },
        )
        .await
    }
}

fn align_down(x: u64) -> u64 {
    x / BLOCK_SIZE * BLOCK_SIZE
}

fn align_up(x: u64) -> u64 {
    x.div_ceil(BLOCK_SIZE) * BLOCK_SIZE
}

/// The requests of [`BlockVolume`], uncounted ([`crate::metrics`] counts
/// them in the trait's methods below; these call one another freely).
impl ReplicatedVolume {
    async fn serve_read(&self, offset: u64, len: u32) -> OpResult<Bytes> {
        let len = len as u64;
        self.check_range(offset, len)?;
        let (start, end) = (align_down(offset), align_up(offset + len));
        let data = self.read_aligned(start, end - start).await?;
        let from = (offset - start) as usize;
        Ok(data.slice(from..from + len as usize))
    }

    async fn serve_write(&self, offset: u64, data: Bytes, fua: bool) -> OpResult<()> {
        let len = data.len() as u64;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let (start, end) = (align_down(offset), align_up(offset + len));
        let _lock = self.locks.lock(start / BLOCK_SIZE, end / BLOCK_SIZE).await;
        if start == offset && end == offset + len {
            return self.write_aligned(offset, data, fua).await;
        }
        // Read-modify-write of the partial first and last blocks.
        let mut buf = BytesMut::zeroed((end - start) as usize);
        if start != offset {
            buf[..BLOCK_SIZE as usize]
                .copy_from_slice(&self.read_aligned(start, BLOCK_SIZE).await?);
        }
        let last = end - BLOCK_SIZE;
        if end != offset + len && (last != start || start == offset) {
            let tail = self.read_aligned(last, BLOCK_SIZE).await?;
            buf[(last - start) as usize..].copy_from_slice(&tail);
        }
        let from = (offset - start) as usize;
        buf[from..from + len as usize].copy_from_slice(&data);
        self.write_aligned(start, buf.freeze(), fua).await
    }

    async fn serve_flush(&self) -> OpResult<()> {
        let epoch = self.epochs.barrier().await;
        let departures = self.departures.load(Ordering::Acquire);
        // Every replica in the set now holds every write tagged <= epoch;
        // the flush says which they are (see `rvol_replica::dirty`).
        let members: Arc<[uuid::Uuid]> = self
            .writable()
            .iter()
            .filter(|s| s.mode() == Mode::RW)
            .map(|s| s.identity())
            .collect();
        self.fan_out_durable("flush", |c| {
            let members = members.clone();
            async move { c.flush_barrier(epoch, &members).await.map(drop) }
        })
        .await?;
        if let Some(hook) = &self.in_sync_hook {
            let rw = self
                .writable()
                .iter()
                .filter(|s| s.mode() == Mode::RW)
                .map(|s| s.endpoint.to_string())
                .collect();
            hook.record(rw, self.hold).await.map_err(VolumeError::Io)?;
        }
        self.departures_flushed
            .fetch_max(departures, Ordering::AcqRel);
        Ok(())
    }

    async fn serve_trim(&self, offset: u64, len: u64, fua: bool) -> OpResult<()> {
        self.check_range(offset, len)?;
        // Trim is a hint: partial blocks at the edges are left alone.
        let (start, end) = (align_up(offset), align_down(offset + len));
        if end > start {
            let _lock = self.locks.lock(start / BLOCK_SIZE, end / BLOCK_SIZE).await;
            let ticket = self.epochs.enter();
            let epoch = ticket.epoch;
            self.fan_out("trim", |c| async move {
                c.trim(start, end - start, epoch).await
            })
            .await?;
            self.count_modification();
            self.chain.trimmed();
        }
        if fua {
            self.serve_flush().await?;
        }
        Ok(())
    }

    async fn serve_write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_punch: bool,
        fua: bool,
    ) -> OpResult<()> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let (inner_start, inner_end) = (align_up(offset), align_down(offset + len));
        if !may_punch || inner_end <= inner_start {
            // Written zeros, in pieces (NO_HOLE asks us to keep it allocated).
            let mut at = offset;
            while at < offset + len {
                let n = (offset + len - at).min(MAX_PAYLOAD as u64);
                self.serve_write(at, Bytes::from(vec![0u8; n as usize]), fua)
                    .await?;
                at += n;
            }
            return Ok(());
        }
        if inner_start > offset {
            self.serve_write(
                offset,
                Bytes::from(vec![0u8; (inner_start - offset) as usize]),
                false,
            )
            .await?;
        }
        if offset + len > inner_end {
            self.serve_write(
                inner_end,
                Bytes::from(vec![0u8; (offset + len - inner_end) as usize]),
                false,
            )
            .await?;
        }
        {
            let _lock = self
                .locks
                .lock(inner_start / BLOCK_SIZE, inner_end / BLOCK_SIZE)
                .await;
            let n = inner_end - inner_start;
            let ticket = self.epochs.enter();
            let epoch = ticket.epoch;
            self.fan_out("write zeroes", |c| async move {
                c.write_zeroes(inner_start, n, epoch).await
            })
            .await?;
            self.count_modification();
        }
        if fua {
            self.serve_flush().await?;
        }
        Ok(())
    }
}

impl BlockVolume for ReplicatedVolume {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    async fn read(&self, offset: u64, len: u32) -> OpResult<Bytes> {
        let req = self.io.begin(IoOp::Read);
        let r = self.serve_read(offset, len).await;
        req.done(len as u64, r.is_ok());
        r
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> OpResult<()> {
        let (req, len) = (self.io.begin(IoOp::Write), data.len() as u64);
        let r = self.serve_write(offset, data, fua).await;
        req.done(len, r.is_ok());
        r
    }

    async fn flush(&self) -> OpResult<()> {
        let req = self.io.begin(IoOp::Flush);
        let r = self.serve_flush().await;
        req.done(0, r.is_ok());
        r
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> OpResult<()> {
        let req = self.io.begin(IoOp::Trim);
        let r = self.serve_trim(offset, len, fua).await;
        req.done(len, r.is_ok());
        r
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_punch: bool,
        fua: bool,
    ) -> OpResult<()> {
        let req = self.io.begin(IoOp::WriteZeroes);
        let r = self.serve_write_zeroes(offset, len, may_punch, fua).await;
        req.done(len, r.is_ok());
        r
    }

    async fn block_status(&self, offset: u64, len: u64) -> OpResult<Vec<Extent>> {
        self.check_range(offset, len)?;
        // Bound the work of one query; the client asks again for the rest.
        let len = len.min(1 << 30);
        let (start, end) = (align_down(offset), align_up(offset + len));
        let candidates = self.readable();
        for slot in &candidates {
            match self
                .call(
                    slot,
                    |c| async move { c.allocation(start, end - start).await },
                )
                .await
            {
                Ok(runs) => {
                    let mut skip = offset - start;
                    let mut out = Vec::with_capacity(runs.len());
                    for (n, allocated) in runs {
                        let n = n.saturating_sub(std::mem::take(&mut skip));
                        if n > 0 {
                            out.push(Extent {
                                length: n,
                                hole: !allocated,
                            });
                        }
                    }
                    if out.is_empty() {
                        break;
                    }
                    return Ok(out);
                }
                Err(e) => self.fail(slot, &e),
            }
        }
        Err(VolumeError::Io(
            "block status: no healthy replica answered".into(),
        ))
    }
}
