//! The replicated volume: one block device made of N replicas.
//!
//! # Data path
//!
//! - A write goes to every replica in RW or WO mode at once; it completes
//!   when all of them have answered, and succeeds if at least one RW replica
//!   applied it. Replicas that failed are set to ERR and left out from then
//!   on, so every replica still in the set has applied every completed
//!   write.
//! - A read goes to one RW replica, round-robin, and fails over to the next
//!   on error.
//! - Replicas see only whole, aligned 4 KiB blocks. Anything smaller is
//!   read-modify-written here, under the [`RangeLocks`] of the blocks it
//!   touches, held until every replica has answered.
//! - FLUSH flushes every replica in the set: a write completed before the
//!   flush was issued is then durable on every replica that stays in the
//!   set. It is also a barrier of the [`EpochGate`]: it first waits for the
//!   writes of the epoch it closes, so replicas can forget which regions
//!   those writes touched. A FUA write is sent with FUA to every replica.
//! - A replica that errors or does not answer within the timeout is set to
//!   ERR and logged. If it answers `Fenced`, a newer engine owns the volume:
//!   this engine refuses all further writes and reports itself fenced.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::future::join_all;
use rvol_frontend::{BlockVolume, Extent, VolumeError};
use rvol_replica::client::{ClientError, ReplicaClient};
use rvol_replica::proto::{Status, MAX_PAYLOAD};
use rvol_replica::server::Endpoint;
use rvol_replica::{Generation, BLOCK_SIZE};
use serde::Serialize;
use tokio::sync::watch;

use crate::epoch::EpochGate;
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
    client: Option<Arc<ReplicaClient>>,
    mode: AtomicU8,
    /// The replica's revision counter as far as the engine knows it.
    revision: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl ReplicaSlot {
    pub fn new(endpoint: Endpoint, client: ReplicaClient, mode: Mode, revision: u64) -> Self {
        ReplicaSlot {
            endpoint,
            client: Some(Arc::new(client)),
            mode: AtomicU8::new(mode as u8),
            revision: AtomicU64::new(revision),
            last_error: Mutex::new(None),
        }
    }

    /// A replica that is out of the set from the start.
    pub fn failed(endpoint: Endpoint, error: String) -> Self {
        ReplicaSlot {
            endpoint,
            client: None,
            mode: AtomicU8::new(Mode::ERR as u8),
            revision: AtomicU64::new(0),
            last_error: Mutex::new(Some(error)),
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
        self.client.clone().filter(|_| self.mode() != Mode::ERR)
    }
}

/// Why an operation on one replica failed.
enum ReplicaFailure {
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
    slots: Vec<Arc<ReplicaSlot>>,
    locks: RangeLocks,
    epochs: EpochGate,
    /// Bytes copied at start to reconcile replicas after an unclean stop.
    pub reconciled_bytes: u64,
    timeout: Duration,
    next_read: AtomicUsize,
    fenced: AtomicBool,
    /// Turns true when a newer engine has taken the replicas over.
    fenced_tx: watch::Sender<bool>,
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
}

impl ReplicatedVolume {
    pub fn new(p: VolumeParams, slots: Vec<Arc<ReplicaSlot>>) -> Self {
        let VolumeParams {
            name,
            size,
            generation,
            first_epoch,
            reconciled_bytes,
            timeout,
        } = p;
        ReplicatedVolume {
            name,
            size: AtomicU64::new(size),
            generation,
            slots,
            locks: RangeLocks::default(),
            epochs: EpochGate::new(first_epoch),
            reconciled_bytes,
            timeout,
            next_read: AtomicUsize::new(0),
            fenced: AtomicBool::new(false),
            fenced_tx: watch::channel(false).0,
        }
    }

    pub fn slots(&self) -> &[Arc<ReplicaSlot>] {
        &self.slots
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }

    pub fn fenced_watch(&self) -> watch::Receiver<bool> {
        self.fenced_tx.subscribe()
    }

    /// Replicas that receive writes (RW and WO).
    fn writable(&self) -> Vec<Arc<ReplicaSlot>> {
        self.slots
            .iter()
            .filter(|s| s.client().is_some())
            .cloned()
            .collect()
    }

    fn readable(&self) -> Vec<Arc<ReplicaSlot>> {
        self.slots
            .iter()
            .filter(|s| s.mode() == Mode::RW)
            .cloned()
            .collect()
    }

    fn fail(&self, slot: &ReplicaSlot, why: &ReplicaFailure) {
        if let ReplicaFailure::Client(e) = why {
            if e.is_fenced() && !self.fenced.swap(true, Ordering::AcqRel) {
                tracing::error!(replica = %slot.endpoint, error = %e, "a newer engine has taken the volume over; refusing all writes");
                let _ = self.fenced_tx.send(true);
            }
        }
        *slot.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(why.to_string());
        let was = Mode::from_u8(slot.mode.swap(Mode::ERR as u8, Ordering::AcqRel));
        if was != Mode::ERR {
            tracing::warn!(replica = %slot.endpoint, was = ?was, error = %why, "replica set to ERR");
        }
    }

    async fn call<T, F, Fut>(&self, slot: &ReplicaSlot, f: F) -> Result<T, ReplicaFailure>
    where
        F: FnOnce(Arc<ReplicaClient>) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let Some(client) = slot.client() else {
            return Err(ReplicaFailure::Client(ClientError::Lost(
                "replica is out of the set".into(),
            )));
        };
        match tokio::time::timeout(self.timeout, f(client)).await {
            Ok(r) => r.map_err(ReplicaFailure::Client),
            Err(_) => Err(ReplicaFailure::Timeout(self.timeout)),
        }
    }

    /// Runs `op` on every writable replica, setting those that fail to ERR.
    /// Succeeds if at least one RW replica succeeded.
    async fn fan_out<F, Fut>(&self, what: &str, op: F) -> OpResult<()>
    where
        F: Fn(Arc<ReplicaClient>) -> Fut,
        Fut: std::future::Future<Output = Result<(), ClientError>>,
    {
        if self.is_fenced() {
            return Err(VolumeError::Io(
                "fenced: a newer engine owns this volume".into(),
            ));
        }
        let targets = self.writable();
        let results = join_all(targets.iter().map(|s| self.call(s, &op))).await;
        let mut ok_rw = 0;
        let mut invalid = None;
        for (slot, r) in targets.iter().zip(results) {
            match r {
                Ok(()) => {
                    if slot.mode() == Mode::RW {
                        ok_rw += 1;
                    }
                }
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
            return Err(VolumeError::Io(format!("{what}: no healthy replica left")));
        }
        Ok(())
    }

    fn count_modification(&self) {
        for s in &self.slots {
            if s.mode() != Mode::ERR {
                s.revision.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Reads aligned blocks from one RW replica, failing over on error.
    async fn read_aligned(&self, offset: u64, len: u64) -> OpResult<Bytes> {
        let mut out = BytesMut::with_capacity(len as usize);
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(MAX_PAYLOAD as u64);
            out.extend_from_slice(&self.read_piece(at, n).await?);
            at += n;
        }
        Ok(out.freeze())
    }

    async fn read_piece(&self, offset: u64, len: u64) -> OpResult<Bytes> {
        let candidates = self.readable();
        if candidates.is_empty() {
            return Err(VolumeError::Io("read: no healthy replica left".into()));
        }
        let first = self.next_read.fetch_add(1, Ordering::Relaxed);
        for k in 0..candidates.len() {
            let slot = &candidates[(first + k) % candidates.len()];
            match self
                .call(slot, |c| async move { c.read(offset, len).await })
                .await
            {
                Ok(data) => return Ok(data),
                Err(ReplicaFailure::Client(ClientError::Remote {
                    status: Status::Invalid,
                    message,
                })) => return Err(VolumeError::Invalid(message)),
                Err(e) => self.fail(slot, &e),
            }
        }
        Err(VolumeError::Io("read failed on every replica".into()))
    }

    /// Writes whole aligned blocks to every replica, in pieces the replica
    /// protocol allows. The caller holds the range lock.
    async fn write_aligned(&self, offset: u64, data: Bytes, fua: bool) -> OpResult<()> {
        let mut at = 0usize;
        while at < data.len() {
            let n = (data.len() - at).min(MAX_PAYLOAD as usize);
            let piece = data.slice(at..at + n);
            let off = offset + at as u64;
            let ticket = self.epochs.enter();
            let epoch = ticket.epoch;
            self.fan_out("write", |c| {
                let piece = piece.clone();
                async move { c.write(off, piece, fua, epoch).await }
            })
            .await?;
            drop(ticket);
            self.count_modification();
            at += n;
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
        self.fan_out(
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

impl BlockVolume for ReplicatedVolume {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    async fn read(&self, offset: u64, len: u32) -> OpResult<Bytes> {
        let len = len as u64;
        self.check_range(offset, len)?;
        let (start, end) = (align_down(offset), align_up(offset + len));
        let data = self.read_aligned(start, end - start).await?;
        let from = (offset - start) as usize;
        Ok(data.slice(from..from + len as usize))
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> OpResult<()> {
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

    async fn flush(&self) -> OpResult<()> {
        let epoch = self.epochs.barrier().await;
        self.fan_out("flush", |c| async move { c.flush(epoch).await.map(drop) })
            .await
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> OpResult<()> {
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
        }
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    async fn write_zeroes(
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
                self.write(at, Bytes::from(vec![0u8; n as usize]), fua)
                    .await?;
                at += n;
            }
            return Ok(());
        }
        if inner_start > offset {
            self.write(
                offset,
                Bytes::from(vec![0u8; (inner_start - offset) as usize]),
                false,
            )
            .await?;
        }
        if offset + len > inner_end {
            self.write(
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
            self.flush().await?;
        }
        Ok(())
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
