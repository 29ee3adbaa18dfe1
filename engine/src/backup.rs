//! Backups run by the engine: a snapshot read from the replicas, written
//! to a target by [`rvol_backup`].
//!
//! The engine reads the snapshot's view from an RW replica
//! (`READ_SNAPSHOT`), another one if that one fails, so a backup outlives
//! the loss of a replica. An encrypted volume is read as its replicas hold
//! it: sealed blocks with their nonces and tags, never plaintext.
//!
//! While a backup reads snapshot S, S's view must not change (see
//! `rvol_replica::snapshot_view`): purges wait (the backup asks for one
//! when it ends), a revert is refused, and so is removing S.

use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use rvol_backup::{
    BackupRequest, Progress, ProgressReport, Source, StoreOptions, Target, VolumeInfo,
};
use rvol_frontend::BlockVolume;
use rvol_replica::maintenance::snapshot_file;
use rvol_replica::BLOCK_SIZE;
use serde::{Deserialize, Serialize};

use crate::volume::{Mode, ReplicatedVolume};

/// Volume bytes per SNAPSHOT_EXTENTS request: a reply of at most one run
/// per block stays well inside a frame.
const EXTENTS_WINDOW: u64 = 1 << 30;
/// Volume bytes per READ_SNAPSHOT request.
const READ_PIECE: u64 = 4 << 20;

/// What `POST /v1/backups` takes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupStart {
    pub snapshot: String,
    /// `s3://BUCKET/PREFIX` or `file:///DIR`.
    pub target: String,
    /// The target's settings (`AWS_*`), credentials included; never
    /// shown in status or logs.
    #[serde(default)]
    pub options: StoreOptions,
    #[serde(default)]
    pub chunk_size: Option<u64>,
    #[serde(default)]
    pub parallel: Option<usize>,
    #[serde(default)]
    pub rate_mib: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupState {
    Running,
    Done,
    Failed,
}

/// The backup in progress, or the last one, for status.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupStatus {
    pub snapshot: String,
    pub target: String,
    pub state: BackupState,
    pub progress: ProgressReport,
    /// The backup's name, once written.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub stats: Option<rvol_backup::format::BackupStats>,
}

struct Current {
    status: BackupStatus,
    progress: Arc<Progress>,
}

#[derive(Default)]
pub struct Backups {
    current: Mutex<Option<Current>>,
}

impl Backups {
    pub fn status(&self) -> Option<BackupStatus> {
        let cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        cur.as_ref().map(|c| BackupStatus {
            progress: c.progress.report(),
            ..c.status.clone()
        })
    }

    /// The snapshot a running backup reads, whose view must not change.
    pub fn pinned(&self) -> Option<String> {
        let cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        cur.as_ref()
            .filter(|c| c.status.state == BackupState::Running)
            .map(|c| c.status.snapshot.clone())
    }

    fn finish(&self, result: anyhow::Result<rvol_backup::Manifest>) {
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = cur.as_mut() {
            match result {
                Ok(m) => {
                    c.status.state = BackupState::Done;
                    c.status.name = Some(m.name);
                    c.status.stats = Some(m.stats);
                }
                Err(e) => {
                    c.status.state = BackupState::Failed;
                    c.status.error = Some(format!("{e:#}"));
                }
            }
        }
    }
}

/// Reads one snapshot of the volume from its RW replicas.
struct SnapshotSource {
    volume: Arc<ReplicatedVolume>,
    /// The snapshot's layer file name.
    layer: String,
}

impl SnapshotSource {
    /// Runs `op` on the first RW replica that answers it.
    async fn on_a_replica<T, F, Fut>(&self, what: &str, op: F) -> anyhow::Result<T>
    where
        F: Fn(Arc<rvol_replica::client::ReplicaClient>) -> Fut,
        Fut: std::future::Future<Output = Result<T, rvol_replica::client::ClientError>>,
    {
        let mut errors = Vec::new();
        for slot in self.volume.slots() {
            if slot.mode() != Mode::RW {
                continue;
            }
            match self.volume.call(&slot, &op).await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    tracing::warn!(replica = %slot.endpoint, error = %e, "{what} failed; trying another replica");
                    errors.push(format!("{}: {e}", slot.endpoint));
                }
            }
        }
        anyhow::bail!("{what}: no RW replica answered ({})", errors.join("; "))
    }
}

impl Source for SnapshotSource {
    async fn snapshots(&self) -> anyhow::Result<Vec<String>> {
        let layers = self.volume.layers().await.map_err(anyhow::Error::msg)?;
        Ok(layers[..layers.len().saturating_sub(1)]
            .iter()
            .filter(|l| !l.removed)
            .filter_map(|l| {
                l.name
                    .strip_prefix("volume-snap-")?
                    .strip_suffix(".img")
                    .map(String::from)
            })
            .collect())
    }

    async fn extents(&self, base: Option<&str>) -> anyhow::Result<Vec<(u64, u64)>> {
        let base = base.map(snapshot_file);
        let size = self.volume.size();
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut at = 0;
        while at < size {
            let len = EXTENTS_WINDOW.min(size - at);
            let (layer, base) = (&self.layer, base.as_deref());
            let runs = self
                .on_a_replica("reading the snapshot's extents", |c| async move {
                    c.snapshot_extents(layer, base, at, len).await
                })
                .await?;
            let mut pos = at;
            for (n, data) in runs {
                if data {
                    match out.last_mut() {
                        Some((_, end)) if *end == pos => *end += n,
                        _ => out.push((pos, pos + n)),
                    }
                }
                pos += n;
            }
            at += len;
        }
        Ok(out)
    }

    async fn read(&self, offset: u64, len: u64) -> anyhow::Result<Bytes> {
        let auth = auth_bytes(&self.volume);
        let mut data = BytesMut::with_capacity((len + len / BLOCK_SIZE * auth) as usize);
        let mut auths = BytesMut::new();
        let mut at = offset;
        while at < offset + len {
            let n = READ_PIECE.min(offset + len - at);
            let layer = &self.layer;
            let piece = self
                .on_a_replica("reading the snapshot", |c| async move {
                    c.read_snapshot(layer, at, n).await
                })
                .await?;
            data.extend_from_slice(&piece[..n as usize]);
            auths.extend_from_slice(&piece[n as usize..]);
            at += n;
        }
        data.extend_from_slice(&auths);
        Ok(data.freeze())
    }
}

impl ReplicatedVolume {
    /// Starts a backup of snapshot `req.snapshot` in the background;
    /// refused if one runs or the snapshot does not exist.
    pub async fn start_backup(self: &Arc<Self>, req: BackupStart) -> Result<(), String> {
        rvol_replica::store::check_snapshot_name(&req.snapshot).map_err(|e| e.to_string())?;
        // A target that is not there, or refuses us, is named now.
        let target = Target::open_checked(&req.target, &req.options)
            .await
            .map_err(|e| format!("{e:#}"))?;
        let progress = Arc::new(Progress::default());
        {
            let mut cur = self
                .backups
                .current
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(c) = cur
                .as_ref()
                .filter(|c| c.status.state == BackupState::Running)
            {
                return Err(format!(
                    "a backup of snapshot {} to {} is running",
                    c.status.snapshot, c.status.target
                ));
            }
            *cur = Some(Current {
                status: BackupStatus {
                    snapshot: req.snapshot.clone(),
                    target: req.target.clone(),
                    state: BackupState::Running,
                    progress: ProgressReport::default(),
                    name: None,
                    error: None,
                    stats: None,
                },
                progress: progress.clone(),
            });
        }
        // Checked with the pin held: the snapshot cannot go meanwhile.
        let source = SnapshotSource {
            volume: self.clone(),
            layer: snapshot_file(&req.snapshot),
        };
        let missing = match source.snapshots().await {
            Ok(s) if s.contains(&req.snapshot) => None,
            Ok(_) => Some(format!("no snapshot {}", req.snapshot)),
            Err(e) => Some(format!("{e:#}")),
        };
        if let Some(e) = missing {
            self.backups.finish(Err(anyhow::anyhow!(e.clone())));
            return Err(e);
        }
        let request = BackupRequest {
            volume: VolumeInfo {
                name: self.name.clone(),
                uuid: self.attach_info().volume,
                size: self.size(),
                auth_bytes: auth_bytes(self),
                encryption: self.encryption().and_then(|e| serde_json::to_value(e).ok()),
            },
            snapshot: req.snapshot,
            chunk_size: req.chunk_size,
            parallel: req.parallel.unwrap_or(4),
            rate_mib: req.rate_mib.unwrap_or(0.0),
        };
        let volume = self.clone();
        tokio::spawn(async move {
            let target = Arc::new(target);
            let result = rvol_backup::create(&target, &source, &request, &progress).await;
            let events = &volume.events;
            match &result {
                Ok(m) => {
                    tracing::info!(backup = %m.name, "backup finished");
                    events.push(
                        crate::events::EventKind::BackupFinished,
                        None,
                        format!(
                            "backup {} of snapshot {} written: {} chunks ({} bytes) uploaded",
                            m.name, m.snapshot, m.stats.chunks_uploaded, m.stats.bytes_uploaded
                        ),
                    );
                }
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "backup failed");
                    events.push(
                        crate::events::EventKind::BackupFailed,
                        None,
                        format!("backup of snapshot {} failed: {e:#}", request.snapshot),
                    );
                }
            }
            volume.backups.finish(result);
            volume.chain.request_purge();
        });
        Ok(())
    }
}

/// Bytes of nonce and tag per block.
fn auth_bytes(v: &ReplicatedVolume) -> u64 {
    rvol_replica::meta::auth_bytes(v.encryption()).unwrap_or(0) as u64
}
