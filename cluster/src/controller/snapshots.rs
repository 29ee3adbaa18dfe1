//! The controller's snapshot endpoints. A snapshot is asked for in the
//! volume's record; the engine of the volume takes it (a maintenance
//! engine when the volume is detached, see `heal`) and the engine's agent
//! records it taken, which is when the API answers. Asking again for a
//! snapshot taken answers with it, so a retried request (the CLI's after
//! a leader change, the CSI driver's) takes nothing twice.
//!
//! Backups of a taken snapshot are asked for the same way (one at a time,
//! [`crate::model::BackupJob`]); the request answers at once and the
//! caller follows the job in the volume's record.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;

use super::api::{
    bad, change_lock, conflict, find, not_found, volume_name, ApiError, ApiResult, KeyWatch, WAIT,
};
use super::Ctl;
use crate::model::{
    encode, BackupJob, BackupJobState, Snapshot, SnapshotName, SnapshotState, Volume, VolumeName,
};
use crate::store::{Expect, Revision, Store};
use crate::view::ClusterView;

/// The most snapshots a volume keeps (each is a layer of every replica's
/// chain, and a line of the volume's record).
pub const MAX_SNAPSHOTS: usize = 200;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    pub name: String,
}

pub async fn list<S: Store>(
    State(ctl): State<Arc<Ctl<S>>>,
    Path(name): Path<String>,
) -> ApiResult<Vec<Snapshot>> {
    let name = volume_name(&name)?;
    let view = ClusterView::load(&*ctl.store).await?;
    Ok(Json(find(&view, &name)?.0.snapshots.clone()))
}

pub async fn create<S: Store>(
    State(ctl): State<Arc<Ctl<S>>>,
    Path(name): Path<String>,
    Json(req): Json<SnapshotRequest>,
) -> ApiResult<Snapshot> {
    let name = volume_name(&name)?;
    let snap = SnapshotName::new(&req.name).map_err(bad)?;
    let written = change(&ctl, &name, |v| {
        match v.snapshots.iter().find(|s| s.name == snap) {
            Some(s) if s.state == SnapshotState::Removing => {
                Err(conflict(format!("snapshot {snap} is being removed")))
            }
            Some(_) => Ok(false),
            None if v.snapshots.len() >= MAX_SNAPSHOTS => Err(conflict(format!(
                "volume {name} has {MAX_SNAPSHOTS} snapshots: remove one first"
            ))),
            None => {
                v.snapshots.push(Snapshot {
                    name: snap.clone(),
                    state: SnapshotState::Requested,
                });
                v.event(format!("snapshot {snap} asked for"));
                Ok(true)
            }
        }
    })
    .await?;
    wait(&ctl, &name, written, |v| {
        match v.snapshots.iter().find(|s| s.name == snap) {
            Some(s) if matches!(s.state, SnapshotState::Taken { .. }) => Some(Ok(s.clone())),
            Some(_) => None,
            None => Some(Err(conflict(format!(
                "snapshot {snap} was removed meanwhile"
            )))),
        }
    })
    .await
}

pub async fn remove<S: Store>(
    State(ctl): State<Arc<Ctl<S>>>,
    Path((name, snapshot)): Path<(String, String)>,
) -> ApiResult<serde_json::Value> {
    let name = volume_name(&name)?;
    let snap = SnapshotName::new(&snapshot).map_err(bad)?;
    let written = change(&ctl, &name, |v| {
        let Some(s) = v.snapshots.iter_mut().find(|s| s.name == snap) else {
            return Err(not_found(&format!("snapshot {snap} of volume {name}")));
        };
        if s.state == SnapshotState::Removing {
            return Ok(false);
        }
        s.state = SnapshotState::Removing;
        v.event(format!("snapshot {snap} to be removed"));
        Ok(true)
    })
    .await?;
    wait(&ctl, &name, written, |v| {
        (!v.snapshots.iter().any(|s| s.name == snap))
            .then(|| Ok(serde_json::json!({ "removed": snap })))
    })
    .await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupRequest {
    pub snapshot: String,
    pub target: String,
    /// Whole MiB/s.
    #[serde(default)]
    pub rate_mib: Option<u32>,
}

/// Asks for a backup of a taken snapshot (202 with the job). The same
/// request while it is pending answers with it; another one is refused
/// until it ends. The caller follows it in the volume's record.
pub async fn backup<S: Store>(
    State(ctl): State<Arc<Ctl<S>>>,
    Path(name): Path<String>,
    Json(req): Json<BackupRequest>,
) -> Result<(StatusCode, Json<BackupJob>), ApiError> {
    let name = volume_name(&name)?;
    let snap = SnapshotName::new(&req.snapshot).map_err(bad)?;
    if !(req.target.starts_with("s3://") || req.target.starts_with("file:///")) {
        return Err(bad(format!(
            "{:?} is not a backup target (s3://BUCKET/PREFIX or file:///DIR)",
            req.target
        )));
    }
    let mut job = None;
    change(&ctl, &name, |v| {
        if !v
            .snapshots
            .iter()
            .any(|s| s.name == snap && matches!(s.state, SnapshotState::Taken { .. }))
        {
            return Err(conflict(format!(
                "volume {name} has no snapshot {snap} taken"
            )));
        }
        match &v.backup {
            Some(b) if b.pending() && b.snapshot == snap && b.target == req.target => {
                job = Some(b.clone());
                return Ok(false);
            }
            Some(b) if b.pending() => {
                return Err(conflict(format!(
                    "a backup of volume {name} (snapshot {}) is under way: wait for it",
                    b.snapshot
                )));
            }
            _ => {}
        }
        let asked = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let b = BackupJob {
            snapshot: snap.clone(),
            target: req.target.clone(),
            rate_mib: req.rate_mib,
            state: BackupJobState::Requested,
            asked,
        };
        v.event(format!(
            "backup of snapshot {snap} to {} asked for",
            b.target
        ));
        v.backup = Some(b.clone());
        job = Some(b);
        Ok(true)
    })
    .await?;
    let job = job.ok_or_else(|| conflict("the volume changed meanwhile; try again"))?;
    Ok((StatusCode::ACCEPTED, Json(job)))
}

/// Applies `f` to the volume's record under the leader's lock and writes
/// it if `f` changed it; the revision to wait from.
async fn change<S: Store>(
    ctl: &Ctl<S>,
    name: &VolumeName,
    f: impl FnOnce(&mut Volume) -> Result<bool, ApiError>,
) -> Result<Revision, ApiError> {
    let _lock = change_lock(ctl).await?;
    let view = ClusterView::load(&*ctl.store).await?;
    let (v, revision) = find(&view, name)?;
    let mut next = v.clone();
    if !f(&mut next)? {
        return Ok(view.revision);
    }
    Ok(ctl
        .store
        .put(&name.key(), encode(&next), Expect::At(*revision), None)
        .await?)
}

/// Waits until `done` answers for the volume's record, or says what the
/// volume last did.
async fn wait<S: Store, T>(
    ctl: &Ctl<S>,
    name: &VolumeName,
    after: Revision,
    done: impl Fn(&Volume) -> Option<Result<T, ApiError>>,
) -> ApiResult<T> {
    let deadline = Instant::now() + WAIT;
    let mut changes = KeyWatch::new(&*ctl.store, &name.key(), after).await;
    loop {
        let view = ClusterView::load(&*ctl.store).await?;
        let (v, _) = find(&view, name)?;
        if let Some(answer) = done(v) {
            return answer.map(Json);
        }
        if Instant::now() > deadline {
            let last = v.events.last().map_or("", |e| e.message.as_str());
            return Err(ApiError(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "not done within {WAIT:?} (the volume's engine does it when it runs); last event: {last}"
                ),
            ));
        }
        changes.next().await;
    }
}
