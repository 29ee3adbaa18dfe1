//! The controller's HTTP/JSON API, which the CLI (and the CSI driver)
//! drive. Every change is checked whole before anything is written: bad
//! input gets a 4xx answer with a message and changes nothing.
//!
//! ```text
//! GET    /v1/volumes                  POST /v1/volumes {name, size, replicas, ...}
//! GET    /v1/volumes/NAME             DELETE /v1/volumes/NAME
//! POST   /v1/volumes/NAME/attach {node, frontend}   POST /v1/volumes/NAME/detach
//! POST   /v1/volumes/NAME/expand {size}
//! GET    /v1/volumes/NAME/snapshots   POST /v1/volumes/NAME/snapshots {name}
//! DELETE /v1/volumes/NAME/snapshots/SNAPSHOT
//! POST   /v1/volumes/NAME/backups {snapshot, target, rate_mib?}
//! GET    /v1/nodes                    POST /v1/nodes/NAME/cordon | uncordon | drain
//! GET    /metrics                     (OpenMetrics: see crate::metrics)
//! ```
//!
//! Attach and detach answer once the node's agent reports the engine
//! serving (or gone), or with an error that says what it waits for.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::stream::BoxStream;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::Ctl;
use crate::model::{
    encode, report_key, Attachment, DataLocality, Frontend, NodeName, ProcessState, Volume,
    VolumeName, VolumeSpec, ZoneAntiAffinity, PROTOCOL,
};
use crate::store::{Change, Expect, Revision, Store, StoreError};
use crate::view::{ClusterView, VolumeState};

/// The largest volume: 64 TiB.
pub const MAX_SIZE: u64 = 64 << 40;
/// The most replicas a volume may ask for.
pub const MAX_REPLICAS: usize = 5;
/// How long attach and detach wait for the agent.
pub(super) const WAIT: Duration = Duration::from_secs(60);
/// How long attaching waits for an engine held for its key: a few of its
/// agent's passes (a report may predate a key just placed).
const KEY_RECHECK: Duration = Duration::from_secs(3);

/// An error answer: a status and a message, as `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::Conflict { .. } => ApiError(
                StatusCode::CONFLICT,
                format!("{e}: changed by someone else meanwhile; try again"),
            ),
            e => ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        }
    }
}

pub(super) type ApiResult<T> = Result<Json<T>, ApiError>;

pub(super) fn bad(message: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, message.into())
}

pub(super) fn not_found(what: &str) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, format!("{what} does not exist"))
}

pub(super) fn conflict(message: impl Into<String>) -> ApiError {
    ApiError(StatusCode::CONFLICT, message.into())
}

pub fn router<S: Store>(ctl: Arc<Ctl<S>>) -> Router {
    Router::new()
        .route("/v1/leader", get(leader::<S>))
        .route("/v1/volumes", get(list_volumes::<S>).post(create::<S>))
        .route(
            "/v1/volumes/{name}",
            get(get_volume::<S>).delete(remove::<S>),
        )
        .route("/v1/volumes/{name}/attach", post(attach::<S>))
        .route("/v1/volumes/{name}/detach", post(detach::<S>))
        .route("/v1/volumes/{name}/expand", post(expand::<S>))
        .route(
            "/v1/volumes/{name}/snapshots",
            get(super::snapshots::list::<S>).post(super::snapshots::create::<S>),
        )
        .route(
            "/v1/volumes/{name}/snapshots/{snapshot}",
            axum::routing::delete(super::snapshots::remove::<S>),
        )
        .route(
            "/v1/volumes/{name}/backups",
            post(super::snapshots::backup::<S>),
        )
        .route("/v1/nodes", get(super::nodes::list::<S>))
        .route("/v1/nodes/{name}/cordon", post(super::nodes::cordon::<S>))
        .route(
            "/v1/nodes/{name}/uncordon",
            post(super::nodes::uncordon::<S>),
        )
        .route("/v1/nodes/{name}/drain", post(super::nodes::drain::<S>))
        .route("/metrics", get(metrics::<S>))
        .with_state(ctl)
}

/// Holds the leader's change lock, or answers where the leader is.
pub(super) async fn change_lock<S: Store>(
    ctl: &Ctl<S>,
) -> Result<tokio::sync::MutexGuard<'_, ()>, ApiError> {
    if !ctl.leading() {
        let leader = ctl.leader().await?.unwrap_or_else(|| "(none yet)".into());
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("this controller does not lead; the leader is at {leader}"),
        ));
    }
    Ok(ctl.changes.lock().await)
}

/// The controller's metrics ([`crate::metrics`]).
async fn metrics<S: Store>(State(ctl): State<Arc<Ctl<S>>>) -> impl IntoResponse {
    let view = ClusterView::load(&*ctl.store).await;
    let text = crate::metrics::encode_controller(
        &ctl.reconcile,
        ctl.leading(),
        view.as_ref().map_err(|e| e.to_string()),
    );
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
}

async fn leader<S: Store>(State(ctl): State<Arc<Ctl<S>>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "leader": ctl.leader().await.ok().flatten(),
        "this": ctl.address,
        "leading": ctl.leading(),
    }))
}

/// A volume as the API shows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct VolumeView {
    pub name: VolumeName,
    pub size: u64,
    pub state: VolumeState,
    pub spec: VolumeSpec,
    pub attached_node: Option<NodeName>,
    pub frontend: Option<Frontend>,
    /// Attached read-only.
    #[serde(default)]
    pub readonly: bool,
    /// Where the controller's maintenance engine runs, while detached.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub maintenance: Option<NodeName>,
    pub nbd: Option<String>,
    pub device: Option<String>,
    pub replicas: Vec<ReplicaView>,
    /// The rebuild its engine runs, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuild: Option<crate::model::RebuildProgress>,
    /// The newest backup asked for, and its engine's progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<crate::model::BackupJob>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_progress: Option<crate::model::BackupProgress>,
    pub events: Vec<crate::model::Event>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ReplicaView {
    pub id: crate::model::ReplicaId,
    pub node: NodeName,
    pub disk: String,
    pub address: String,
    /// The replica process, as its agent reports it.
    pub process: Option<ProcessState>,
    /// Its mode in the engine, while attached.
    pub mode: Option<String>,
    pub in_sync: bool,
}

pub fn volume_view(view: &ClusterView, v: &Volume) -> VolumeView {
    let engine = view.engine_report(v);
    VolumeView {
        name: v.name.clone(),
        size: engine.map_or(v.spec.size, |e| e.size.max(v.spec.size)),
        state: view.state(v),
        spec: v.spec.clone(),
        attached_node: v.attached().map(|a| a.node.clone()),
        frontend: v.attached().map(|a| a.frontend),
        readonly: v.attached().is_some_and(|a| a.readonly),
        maintenance: v
            .attachment
            .as_ref()
            .filter(|a| a.maintenance)
            .map(|a| a.node.clone()),
        nbd: engine.and_then(|e| e.nbd.clone()),
        device: engine.and_then(|e| e.device.clone()),
        replicas: v
            .replicas
            .iter()
            .map(|p| ReplicaView {
                id: p.id,
                node: p.node.clone(),
                disk: p.disk.clone(),
                address: p.address.clone(),
                process: view.replica_report(v, p).map(|r| r.state.clone()),
                mode: engine
                    .and_then(|e| e.replicas.iter().find(|r| r.id == p.id))
                    .map(|r| r.mode.clone()),
                in_sync: v.in_sync.contains(&p.id),
            })
            .collect(),
        rebuild: engine.and_then(|e| e.rebuild.clone()),
        backup: v.backup.clone(),
        backup_progress: engine.and_then(|e| e.backup.clone()),
        events: v.events.clone(),
    }
}

/// The volume `name` and its revision, or 404.
pub(super) fn find<'a>(
    view: &'a ClusterView,
    name: &VolumeName,
) -> Result<&'a (Volume, Revision), ApiError> {
    view.volumes
        .get(name)
        .ok_or_else(|| not_found(&format!("volume {name}")))
}

pub(super) fn volume_name(name: &str) -> Result<VolumeName, ApiError> {
    VolumeName::new(name).map_err(bad)
}

pub(super) fn node_name(name: &str) -> Result<NodeName, ApiError> {
    NodeName::new(name).map_err(bad)
}

async fn list_volumes<S: Store>(State(ctl): State<Arc<Ctl<S>>>) -> ApiResult<Vec<VolumeView>> {
    let view = ClusterView::load(&*ctl.store).await?;
    Ok(Json(
        view.volumes
            .values()
            .map(|(v, _)| volume_view(&view, v))
            .collect(),
    ))
}

async fn get_volume<S: Store>(
    State(ctl): State<Arc<Ctl<S>>>,
    Path(name): Path<String>,
) -> ApiResult<VolumeView> {
    let name = volume_name(&name)?;
    let view = ClusterView::load(&*ctl.store).await?;
    let (v, _) = find(&view, &name)?;
    Ok(Json(volume_view(&view, v)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    pub name: String,
    pub size: u64,
    pub replicas: usize,
    #[serde(default)]
    pub zone_anti_affinity: ZoneAntiAffinity,
    #[serde(default)]
    pub data_locality: DataLocality,
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default)]
    pub replenish_wait_secs: Option<u64>,
    #[serde(default)]
    pub encrypted: bool,
}

async fn create<S: Store>(
    State(ctl): State<Arc<Ctl<S>>>,
    Json(req): Json<CreateRequest>,
) -> Result<(StatusCode, Json<VolumeView>), ApiError> {
    let name = volume_name(&req.name)?;
    if req.size == 0 || req.size % 4096 != 0 || req.size > MAX_SIZE {
        return Err(bad(format!(
            "size {} is not a multiple of 4096 between 4096 and {MAX_SIZE}",
            req.size
        )));
    }
    if !(1..=MAX_REPLICAS).contains(&req.replicas) {
        return Err(bad(format!(
            "replicas {} is not between 1 and {MAX_REPLICAS}",
            req.replicas
        )));
    }
    let _lock = change_lock(&ctl).await?;
    let view = ClusterView::load(&*ctl.store).await?;
    if view.volumes.contains_key(&name) {
        return Err(conflict(format!("volume {name} already exists")));
    }
    let spec = VolumeSpec {
        size: req.size,
        replicas: req.replicas,
        zone_anti_affinity: req.zone_anti_affinity,
        data_locality: req.data_locality,
        node_selector: req.node_selector,
        replenish_wait_secs: req.replenish_wait_secs,
        encrypted: req.encrypted,
    };
    let mut volume = Volume {
        protocol: PROTOCOL,
        name: name.clone(),
        uid: uuid::Uuid::new_v4().simple().to_string()[..16].to_string(),
        created_size: spec.size,
        spec,
        replicas: Vec::new(),
        next_replica: 1,
        attachment: None,
        last_serial: 0,
        in_sync: Vec::new(),
        snapshots: Vec::new(),
        backup: None,
        events: Vec::new(),
    };
    let count = volume.spec.replicas;
    let placed = super::heal::place_missing(
        &view,
        &mut volume,
        ctl.policy,
        count,
        super::heal::Where::Prefer(None),
    )
    .map_err(|e| ApiError(StatusCode::UNPROCESSABLE_ENTITY, e))?;
    volume.in_sync = volume.replicas.iter().map(|p| p.id).collect();
    volume.event(format!("created: {placed}"));
    ctl.store
        .put(&name.key(), encode(&volume), Expect::Absent, None)
        .await?;
    let view = ClusterView::load(&*ctl.store).await?;
    Ok((StatusCode::CREATED, Json(volume_view(&view, &volume))))
}

async fn remove<S: Store>(
    State(ctl): State<Arc<Ctl<S>>>,
    Path(name): Path<String>,
) -> ApiResult<serde_json::Value> {
    let name = volume_name(&name)?;
    let _lock = change_lock(&ctl).await?;
    let view = ClusterView::load(&*ctl.store).await?;
    let (v, revision) = find(&view, &name)?;
    if let Some(a) = v.attached() {
        return Err(conflict(format!(
            "volume {name} is attached to {}: detach it first",
            a.node
        )));
    }
    ctl.store.delete(&name.key(), Expect::At(*revision)).await?;
    tracing::info!(volume = %name, "deleted; agents delete its replicas' data");
    Ok(Json(serde_json::json!({ "deleted": name })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachRequest {
    pub node: String,
    #[serde(default)]
    pub frontend: Frontend,
    #[serde(default)]
    pub readonly: bool,
}

/// Where an attached volume is served.
#[derive(Debug, Serialize, Deserialize)]
pub struct Attached {
    pub node: NodeName,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nbd: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

async fn attach<S: Store>(
    State(ctl): State<Arc<Ctl<S>>>,
    Path(name): Path<String>,
    Json(req): Json<AttachRequest>,
) -> ApiResult<Attached> {
    let name = volume_name(&name)?;
    let node = node_name(&req.node)?;
    let (serial, written) = {
        let _lock = change_lock(&ctl).await?;
        let view = ClusterView::load(&*ctl.store).await?;
        let (v, revision) = find(&view, &name)?;
        if !view.alive(&node) {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!("node {node} has no live agent"),
            ));
        }
        // A maintenance engine gives way to the user's: the new engine
        // takes the replicas over with a higher generation.
        match v.attached() {
            Some(a)
                if a.node == node && a.frontend == req.frontend && a.readonly == req.readonly =>
            {
                (a.serial, view.revision)
            }
            Some(a) if a.node == node => {
                return Err(conflict(format!(
                    "volume {name} is attached to {node} with {:?}{}: detach it first",
                    a.frontend,
                    if a.readonly { ", read-only" } else { "" }
                )))
            }
            Some(a) if view.alive(&a.node) => {
                return Err(conflict(format!(
                    "volume {name} is attached to {}, which is alive: detach it there first",
                    a.node
                )))
            }
            current => {
                if v.spec.data_locality == DataLocality::StrictLocal
                    && !v.replicas.iter().any(|p| p.node == node)
                {
                    return Err(conflict(format!(
                        "volume {name} is strict-local and has no replica on {node}"
                    )));
                }
                let port = super::heal::free_port(&view, &node, &[]).ok_or_else(|| {
                    conflict(format!("node {node} has no free port left in its range"))
                })?;
                let mut next = v.clone();
                next.last_serial += 1;
                next.attachment = Some(Attachment {
                    node: node.clone(),
                    frontend: req.frontend,
                    port,
                    serial: next.last_serial,
                    maintenance: false,
                    readonly: req.readonly,
                });
                next.event(match current {
                    Some(old) => format!(
                        "attached to {node}, taking over from {}, whose agent is away",
                        old.node
                    ),
                    None => match &v.attachment {
                        Some(m) => format!(
                            "attached to {node}; the maintenance engine on {} gives way",
                            m.node
                        ),
                        None => format!("attached to {node}"),
                    },
                });
                let written = ctl
                    .store
                    .put(&name.key(), encode(&next), Expect::At(*revision), None)
                    .await?;
                (next.last_serial, written)
            }
        }
    };
    // The agent starts the engine; wait for it to serve, or to say why not.
    let deadline = Instant::now() + WAIT;
    let mut reports = KeyWatch::new(&*ctl.store, &report_key(&node), written).await;
    loop {
        let view = ClusterView::load(&*ctl.store).await?;
        let (v, _) = find(&view, &name)?;
        if v.attachment.as_ref().map(|a| a.serial) != Some(serial) {
            return Err(conflict(format!("volume {name} was detached meanwhile")));
        }
        if let Some(e) = view.engine_report(v) {
            match &e.state {
                ProcessState::Running { .. } => {
                    return Ok(Json(Attached {
                        node,
                        nbd: e.nbd.clone(),
                        device: e.device.clone(),
                    }))
                }
                // Replicas that are starting come; those of nodes away
                // may not: say so at once.
                ProcessState::Waiting { reason }
                    if v.replicas
                        .iter()
                        .filter(|p| v.in_sync.contains(&p.id))
                        .all(|p| !view.alive(&p.node)) =>
                {
                    return Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, reason.clone()))
                }
                // Its key comes to the node from elsewhere (a CSI stage):
                // no use waiting here, once the agent has had passes
                // enough to see a key placed just before this call.
                ProcessState::Waiting { reason }
                    if reason.starts_with(crate::keys::WAITING)
                        && deadline - Instant::now() < WAIT - KEY_RECHECK =>
                {
                    return Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, reason.clone()))
                }
                ProcessState::Failed { error, restarts } if *restarts > 0 => {
                    return Err(ApiError(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("the engine on {node} fails: {error}"),
                    ))
                }
                _ => {}
            }
        }
        if Instant::now() > deadline {
            return Err(ApiError(
                StatusCode::GATEWAY_TIMEOUT,
                format!("the engine on {node} did not start within {WAIT:?}"),
            ));
        }
        reports.next().await;
    }
}

async fn detach<S: Store>(
    State(ctl): State<Arc<Ctl<S>>>,
    Path(name): Path<String>,
) -> ApiResult<serde_json::Value> {
    let name = volume_name(&name)?;
    let (old, written) = {
        let _lock = change_lock(&ctl).await?;
        let view = ClusterView::load(&*ctl.store).await?;
        let (v, revision) = find(&view, &name)?;
        let Some(old) = v.attached().cloned() else {
            return Ok(Json(serde_json::json!({ "detached": name })));
        };
        let mut next = v.clone();
        next.attachment = None;
        next.event(format!("detached from {}", old.node));
        let written = ctl
            .store
            .put(&name.key(), encode(&next), Expect::At(*revision), None)
            .await?;
        (old, written)
    };
    // Wait for the engine to stop (it flushes and marks its replicas
    // clean), or for its node to be gone.
    let deadline = Instant::now() + WAIT;
    let mut reports = KeyWatch::new(&*ctl.store, &report_key(&old.node), written).await;
    loop {
        let view = ClusterView::load(&*ctl.store).await?;
        let running = view.reports.get(&old.node).is_some_and(|r| {
            r.engines
                .iter()
                .any(|e| e.volume == name && e.serial == old.serial)
        });
        if !running {
            return Ok(Json(serde_json::json!({ "detached": name })));
        }
        if Instant::now() > deadline {
            return Err(ApiError(
                StatusCode::GATEWAY_TIMEOUT,
                format!("the engine on {} did not stop within {WAIT:?}", old.node),
            ));
        }
        reports.next().await;
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpandRequest {
    pub size: u64,
}

/// Grows a volume. Attached, it answers once the engine serves the new
/// size; detached, the next engine grows its replicas when it starts.
async fn expand<S: Store>(
    State(ctl): State<Arc<Ctl<S>>>,
    Path(name): Path<String>,
    Json(req): Json<ExpandRequest>,
) -> ApiResult<VolumeView> {
    let name = volume_name(&name)?;
    let written = {
        let _lock = change_lock(&ctl).await?;
        let view = ClusterView::load(&*ctl.store).await?;
        let (v, revision) = find(&view, &name)?;
        if req.size % 4096 != 0 || req.size > MAX_SIZE {
            return Err(bad(format!(
                "size {} is not a multiple of 4096 up to {MAX_SIZE}",
                req.size
            )));
        }
        if req.size < v.spec.size {
            return Err(bad(format!(
                "volume {name} is {} bytes: volumes only grow",
                v.spec.size
            )));
        }
        let mut next = v.clone();
        if req.size > v.spec.size {
            next.spec.size = req.size;
            next.event(format!("expanded to {} bytes", req.size));
            ctl.store
                .put(&name.key(), encode(&next), Expect::At(*revision), None)
                .await?
        } else {
            view.revision
        }
    };
    let deadline = Instant::now() + WAIT;
    let mut reports = None;
    loop {
        let view = ClusterView::load(&*ctl.store).await?;
        let (v, _) = find(&view, &name)?;
        let Some(a) = &v.attachment else {
            return Ok(Json(volume_view(&view, v)));
        };
        if view.engine_report(v).is_some_and(|e| e.size >= req.size) {
            return Ok(Json(volume_view(&view, v)));
        }
        if Instant::now() > deadline {
            return Err(ApiError(
                StatusCode::GATEWAY_TIMEOUT,
                format!("the engine on {} did not grow within {WAIT:?}", a.node),
            ));
        }
        if reports.is_none() {
            reports = Some(KeyWatch::new(&*ctl.store, &report_key(&a.node), written).await);
        }
        if let Some(r) = reports.as_mut() {
            r.next().await;
        }
    }
}

/// Wakes when a key changes (at least every second), so attach and
/// detach answer as soon as the agent reports (its node's report key),
/// without polling the store in a loop.
pub(super) struct KeyWatch(Option<BoxStream<'static, Result<Change, StoreError>>>);

impl KeyWatch {
    pub(super) async fn new<S: Store>(store: &S, key: &str, after: Revision) -> KeyWatch {
        KeyWatch(store.watch(key, after).await.ok())
    }

    pub(super) async fn next(&mut self) {
        match &mut self.0 {
            Some(changes) => {
                if let Ok(None | Some(Err(_))) =
                    tokio::time::timeout(Duration::from_secs(1), changes.next()).await
                {
                    self.0 = None;
                }
            }
            None => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}
