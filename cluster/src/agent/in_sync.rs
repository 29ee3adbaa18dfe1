//! Recording which replicas of a volume are in sync: they hold every write
//! its engine acknowledged. The record is what makes a stale replica
//! harmless: an engine is started only when one replica of the set is
//! reachable (see [`super`]).
//!
//! Two paths write it, both through [`record`]:
//! - **Before a durable acknowledgement.** An engine started with
//!   `--in-sync-hook` calls the agent's socket (`POST /v1/in-sync`) when
//!   its RW set changed, and acknowledges the flush only once this
//!   answered. So no replica the record names lacks a write acknowledged
//!   as durable.
//! - **From the engine's status**, each pass, so that a replica rebuilt
//!   while the volume is idle joins the set without waiting for a flush.
//!
//! Only the agent of the node the volume is attached to records, and only
//! replicas the volume still holds; a set with none of them is refused
//! rather than recorded, as it would say no data is current.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;

use super::record::{update_attached, RecordError};
use crate::model::{NodeName, ReplicaId, VolumeName};
use crate::store::Store;

/// Records `rw` (replica addresses) as the in-sync set of `volume`,
/// attached to `node`; see the module docs.
pub async fn record<S: Store>(
    store: &S,
    node: &NodeName,
    volume: &VolumeName,
    rw: &[String],
) -> Result<(), RecordError> {
    update_attached(store, node, volume, |next| {
        let ids: BTreeSet<ReplicaId> = next
            .replicas
            .iter()
            .filter(|p| rw.contains(&p.address))
            .map(|p| p.id)
            .collect();
        if ids.is_empty() {
            return Err(format!("none of {rw:?} is a replica of volume {volume}"));
        }
        if ids == next.in_sync.iter().copied().collect() {
            return Ok(false);
        }
        next.in_sync = ids.into_iter().collect();
        let list: Vec<String> = next.in_sync.iter().map(|id| id.to_string()).collect();
        next.event(format!("in-sync replicas: {}", list.join(", ")));
        Ok(true)
    })
    .await
}

#[derive(Debug, Deserialize)]
struct HookRequest {
    volume: String,
    in_sync: Vec<String>,
}

struct Hook<S> {
    store: Arc<S>,
    node: NodeName,
}

async fn hook<S: Store>(
    State(h): State<Arc<Hook<S>>>,
    Json(req): Json<HookRequest>,
) -> (StatusCode, String) {
    let volume = match VolumeName::new(&req.volume) {
        Ok(v) => v,
        Err(e) => return (StatusCode::BAD_REQUEST, e),
    };
    match record(&*h.store, &h.node, &volume, &req.in_sync).await {
        Ok(()) => (StatusCode::OK, "{}".into()),
        Err(RecordError::Refused(e)) => (StatusCode::CONFLICT, e),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// Serves the hook on a Unix socket at `path` (mode 0600: only processes
/// of the agent's user may call it).
pub async fn serve<S: Store>(store: Arc<S>, node: NodeName, path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let listener = tokio::net::UnixListener::bind(&tmp)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(&tmp, path)?;
    let app = Router::new()
        .route("/v1/in-sync", post(hook::<S>))
        .with_state(Arc::new(Hook { store, node }));
    axum::serve(listener, app).await
}
