//! The admin API: HTTP/JSON on the admin listener.
//!
//! - `GET /v1/volume`: [`VolumeStatus`].
//! - `GET /v1/replicas`: the replicas ([`ReplicaStatus`] each).
//! - `POST /v1/replicas`, `DELETE /v1/replicas` with `{"address": ADDR}`:
//!   add a replica (it is rebuilt in the background) or remove one (never
//!   the last RW replica).
//! - `GET /v1/snapshots`: the chain; `POST /v1/snapshots` with
//!   `{"name"?, "labels"?}`: take one; `DELETE /v1/snapshots/NAME`: remove
//!   one (purged in the background); `POST /v1/snapshots/NAME/revert`.
//! - `POST /v1/volume/expand` with `{"size": BYTES}`.
//! - `POST /v1/verify`: scrub every replica (see [`crate::scrub`]).
//! - `POST /v1/backups` with [`crate::backup::BackupStart`]: back a
//!   snapshot up in the background (202); `GET /v1/backups`: its progress
//!   and outcome (also in the volume's status).
//! - `GET /v1/events`: what happened to the volume ([`crate::events`]).
//! - `GET /metrics`: the status as Prometheus text, for scraping.
//! - `GET /ui/`: the dashboard ([`rvol_dashboard`]), which reads and acts
//!   through the routes above, with the caller's token.
//!
//! Errors: 400/409 with `{"error": ...}`; 401 without a valid token and
//! 403 for a read-only token on a control verb (see [`crate::access`]).
//!
//! The CLI's side ([`get`]) is a minimal HTTP/1.1 client over TCP or a
//! Unix socket, enough for our own JSON endpoints.

use std::sync::Arc;

use anyhow::{bail, Context};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete as delete_route, get as get_route, post as post_route};
use axum::{Json, Router};
use rvol_frontend::BlockVolume;
use rvol_replica::server::{Endpoint, Listener};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use rvol_tls::ServerTls;

use crate::volume::{Mode, ReplicatedVolume};
use rvol_access::https::TlsListener;
use rvol_access::tokens::{self as access, Tokens};

/// The variable naming the file the CLI reads its admin token from.
pub const ADMIN_TOKEN_ENV: &str = "RVOL_ADMIN_TOKEN_FILE";

#[derive(Debug, Serialize, Deserialize)]
pub struct VolumeStatus {
    pub volume: String,
    pub size: u64,
    pub generation: u64,
    pub state: String,
    /// Bytes copied at start to reconcile replicas after an unclean stop.
    pub reconciled_bytes: u64,
    pub frontend: String,
    pub nbd: Vec<String>,
    /// The block device (`/dev/ublkbN`) when the ublk frontend serves.
    #[serde(default)]
    pub device: Option<String>,
    pub replicas: Vec<ReplicaStatus>,
    /// The rebuild in progress, if any.
    pub rebuild: Option<crate::rebuild::RebuildStatus>,
    /// Bytes copied by finished rebuilds since the engine started.
    pub rebuilt_bytes: u64,
    /// The purge of removed snapshots in progress, if any.
    #[serde(default)]
    pub purge: Option<crate::chain::PurgeStatus>,
    /// Bytes of removed layers purged since the engine started.
    #[serde(default)]
    pub purged_bytes: u64,
    /// Reads that found a replica's data not matching its checksums (or,
    /// in an encrypted volume, its tags).
    #[serde(default)]
    pub checksum_errors: u64,
    /// Reads sent from a replica's files that did not match the recorded
    /// checksums and were read again verified (mostly reads racing writes
    /// to the same blocks; bit rot also counts in `checksum_errors`).
    #[serde(default)]
    pub stored_crc_rereads: u64,
    /// Bytes read from the files of replica processes on this node instead
    /// of through their sockets.
    #[serde(default)]
    pub direct_read_bytes: u64,
    /// The newest events ([`crate::events`]), oldest first.
    #[serde(default)]
    pub events: Vec<crate::events::Event>,
    /// The backup running, or the last one since the engine started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<crate::backup::BackupStatus>,
    /// The cipher the volume is encrypted with, if it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ReplicaStatus {
    pub address: String,
    pub mode: String,
    pub revision: u64,
    /// Missed an acknowledged write while out of the set: needs a rebuild.
    pub stale: bool,
    pub last_error: Option<String>,
    /// Times an error put it out of the set since the engine started.
    #[serde(default)]
    pub failures: u64,
    /// Mean round trip of its writes and flushes over the last few
    /// seconds (when there were enough to say).
    #[serde(default)]
    pub latency_ms: Option<f64>,
    /// Set while it is far slower than its peers ([`crate::slow`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow: Option<crate::slow::SlowReport>,
}

pub struct AdminState {
    pub volume: Arc<ReplicatedVolume>,
    pub frontend: String,
    pub nbd: Vec<String>,
    pub device: Option<String>,
}

pub fn status(s: &AdminState) -> VolumeStatus {
    let v = &s.volume;
    let replicas: Vec<ReplicaStatus> = v
        .slots()
        .iter()
        .map(|r| ReplicaStatus {
            address: r.endpoint.to_string(),
            mode: format!("{:?}", r.mode()),
            revision: r.revision(),
            stale: r.missed(),
            last_error: r.last_error(),
            failures: r.failures.load(std::sync::atomic::Ordering::Relaxed),
            latency_ms: r.timing.last_ms(),
            slow: r.timing.report(),
        })
        .collect();
    let rw = v.slots().iter().filter(|r| r.mode() == Mode::RW).count();
    let state = if v.is_fenced() {
        "fenced"
    } else if rw == 0 || v.is_faulted() {
        "faulted"
    } else if rw < replicas.len() {
        "degraded"
    } else {
        "healthy"
    };
    VolumeStatus {
        volume: v.name.clone(),
        size: v.size(),
        generation: v.generation.0,
        state: state.into(),
        reconciled_bytes: v.reconciled_bytes,
        frontend: s.frontend.clone(),
        nbd: s.nbd.clone(),
        device: s.device.clone(),
        replicas,
        rebuild: v.rebuilds.status(),
        rebuilt_bytes: v
            .rebuilds
            .copied_total
            .load(std::sync::atomic::Ordering::Relaxed),
        purge: v.chain.purge_status(),
        checksum_errors: v.checksum_errors.load(std::sync::atomic::Ordering::Relaxed),
        stored_crc_rereads: v
            .stored_crc_rereads
            .load(std::sync::atomic::Ordering::Relaxed),
        direct_read_bytes: v
            .direct_read_bytes
            .load(std::sync::atomic::Ordering::Relaxed),
        purged_bytes: v
            .chain
            .purged_total
            .load(std::sync::atomic::Ordering::Relaxed),
        encryption: v.encryption().map(|e| e.cipher.clone()),
        backup: v.backups.status(),
        events: v.events.newest(20),
    }
}

async fn volume_status(State(s): State<Arc<AdminState>>) -> Json<VolumeStatus> {
    Json(status(&s))
}

async fn list_replicas(State(s): State<Arc<AdminState>>) -> Json<Vec<ReplicaStatus>> {
    Json(status(&s).replicas)
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ReplicaRequest {
    pub address: String,
}

type Answer = (StatusCode, Json<serde_json::Value>);

fn answer(r: Result<(), String>) -> Answer {
    match r {
        Ok(()) => (StatusCode::OK, Json(serde_json::json!({ "ok": true }))),
        Err(e) => (
            StatusCode::CONFLICT,
            Json(serde_json::json!({ "error": e })),
        ),
    }
}

fn parse_address(a: &str) -> Result<Endpoint, Answer> {
    a.parse().map_err(|e: String| {
        (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({ "error": e })),
        )
    })
}

async fn add_replica(State(s): State<Arc<AdminState>>, Json(r): Json<ReplicaRequest>) -> Answer {
    let ep = match parse_address(&r.address) {
        Ok(ep) => ep,
        Err(a) => return a,
    };
    if let Err(e) = rvol_replica::local::prepare(&ep, s.volume.size()).await {
        return answer(Err(format!("{ep}: {e}")));
    }
    answer(s.volume.add_replica(ep))
}

async fn remove_replica(State(s): State<Arc<AdminState>>, Json(r): Json<ReplicaRequest>) -> Answer {
    match parse_address(&r.address) {
        Ok(ep) => answer(s.volume.remove_replica(&ep)),
        Err(a) => a,
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct SnapshotRequest {
    /// Generated (`snap-<unix seconds>`) when absent.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

async fn create_snapshot(
    State(s): State<Arc<AdminState>>,
    Json(r): Json<SnapshotRequest>,
) -> Answer {
    let name = r.name.unwrap_or_else(|| {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        format!("snap-{secs}")
    });
    match s.volume.snapshot_user(&name, &r.labels).await {
        Ok(paused) => {
            tracing::info!(snapshot = %name, paused_ms = paused.as_secs_f64() * 1e3, "user snapshot taken");
            (
                StatusCode::OK,
                Json(serde_json::json!({ "name": name, "paused_ms": paused.as_secs_f64() * 1e3 })),
            )
        }
        Err(e) => answer(Err(e)),
    }
}

async fn list_snapshots(State(s): State<Arc<AdminState>>) -> Answer {
    match s.volume.layers().await {
        Ok(chain) => (StatusCode::OK, Json(serde_json::json!(chain))),
        Err(e) => answer(Err(e)),
    }
}

/// The status in the Prometheus text format.
async fn metrics(State(s): State<Arc<AdminState>>) -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        crate::metrics::encode(&s.volume.io, &status(&s)),
    )
}

async fn verify(State(s): State<Arc<AdminState>>) -> Json<Vec<crate::scrub::ReplicaScrub>> {
    Json(s.volume.scrub().await)
}

async fn remove_snapshot(State(s): State<Arc<AdminState>>, Path(name): Path<String>) -> Answer {
    answer(s.volume.remove_snapshot(&name).await)
}

async fn revert_snapshot(State(s): State<Arc<AdminState>>, Path(name): Path<String>) -> Answer {
    answer(s.volume.revert(&name).await)
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ExpandRequest {
    pub size: u64,
}

async fn start_backup(
    State(s): State<Arc<AdminState>>,
    Json(r): Json<crate::backup::BackupStart>,
) -> Answer {
    match s.volume.start_backup(r).await {
        Ok(()) => (
            StatusCode::OK,
            Json(serde_json::json!({ "backup": s.volume.backups.status() })),
        ),
        Err(e) => answer(Err(e)),
    }
}

async fn events(State(s): State<Arc<AdminState>>) -> Json<Vec<crate::events::Event>> {
    Json(s.volume.events.newest(usize::MAX))
}

async fn backup_status(
    State(s): State<Arc<AdminState>>,
) -> Json<Option<crate::backup::BackupStatus>> {
    Json(s.volume.backups.status())
}

async fn expand(State(s): State<Arc<AdminState>>, Json(r): Json<ExpandRequest>) -> Answer {
    answer(s.volume.expand(r.size).await)
}

pub fn router(state: Arc<AdminState>, tokens: Arc<Tokens>) -> Router {
    Router::new()
        .route("/v1/volume", get_route(volume_status))
        .route(
            "/v1/replicas",
            get_route(list_replicas)
                .post(add_replica)
                .delete(remove_replica),
        )
        .route(
            "/v1/snapshots",
            get_route(list_snapshots).post(create_snapshot),
        )
        .route("/v1/snapshots/{name}", delete_route(remove_snapshot))
        .route("/v1/snapshots/{name}/revert", post_route(revert_snapshot))
        .route("/v1/volume/expand", post_route(expand))
        .route("/v1/verify", post_route(verify))
        .route("/v1/backups", get_route(backup_status).post(start_backup))
        .route("/v1/events", get_route(events))
        .route("/metrics", get_route(metrics))
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(tokens, access::guard))
        .merge(rvol_dashboard::router(rvol_dashboard::Kind::Engine))
}

/// Serves the admin API on `listener` until `stop` resolves; with `tls`, a
/// TCP listener serves HTTPS only.
pub async fn serve(
    listener: Listener,
    state: Arc<AdminState>,
    tokens: Arc<Tokens>,
    tls: Option<Arc<ServerTls>>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let (Listener::Tcp(l), true) = (&listener, tokens.is_open()) {
        tracing::warn!(
            address = %l.local_addr()?,
            "the admin API listens on TCP without a token: whoever reaches it controls the \
             volume (--admin-token-file, or a Unix socket)"
        );
    }
    let app = router(state, tokens);
    match (listener, tls) {
        (Listener::Tcp(l), Some(tls)) => {
            let l = TlsListener::start(l, tls)?;
            axum::serve(l, app).with_graceful_shutdown(stop).await
        }
        (Listener::Tcp(l), None) => axum::serve(l, app).with_graceful_shutdown(stop).await,
        (Listener::Unix(l, _), _) => axum::serve(l, app).with_graceful_shutdown(stop).await,
    }
}

/// GETs `path` from an admin endpoint and returns the body of a 200 reply.
pub async fn get(endpoint: &Endpoint, path: &str) -> anyhow::Result<String> {
    request(endpoint, "GET", path, None).await
}

/// Sends one request with an optional JSON body; returns the body of a
/// 200 reply, or an error carrying the status and body.
pub async fn request(
    endpoint: &Endpoint,
    method: &str,
    path: &str,
    json: Option<&str>,
) -> anyhow::Result<String> {
    let body = json.unwrap_or("");
    let auth = match access::client_token(ADMIN_TOKEN_ENV)? {
        Some(t) => zeroize::Zeroizing::new(format!("Authorization: Bearer {}\r\n", t.as_str())),
        None => zeroize::Zeroizing::new(String::new()),
    };
    let request = zeroize::Zeroizing::new(format!(
        "{method} {path} HTTP/1.1\r\nHost: rvol\r\nConnection: close\r\n{}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        auth.as_str(),
        body.len()
    ));
    let mut raw = Vec::new();
    let ca = std::env::var_os("RVOL_ADMIN_CA_FILE");
    match endpoint {
        Endpoint::Tcp(a) => {
            let s = tokio::net::TcpStream::connect(a)
                .await
                .with_context(|| format!("connecting to {a}"))?;
            match ca {
                Some(ca) => {
                    let mut s =
                        rvol_tls::connect_anonymous(std::path::Path::new(&ca), a, s).await?;
                    s.write_all(request.as_bytes()).await?;
                    s.flush().await?;
                    // A TLS server may close without close_notify after
                    // Connection: close; what arrived is the reply.
                    let _ = s.read_to_end(&mut raw).await;
                }
                None => {
                    let mut s = s;
                    s.write_all(request.as_bytes()).await?;
                    let _ = s.read_to_end(&mut raw).await;
                }
            }
        }
        Endpoint::Unix(p) => {
            let mut s = tokio::net::UnixStream::connect(p)
                .await
                .with_context(|| format!("connecting to {}", p.display()))?;
            s.write_all(request.as_bytes()).await?;
            s.read_to_end(&mut raw).await?;
        }
        Endpoint::Local(_) => bail!("{endpoint} is a replica directory, not an admin address"),
    }
    let text = String::from_utf8_lossy(&raw);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!(
            "no HTTP reply from {endpoint} (if its admin API serves HTTPS, name the CA \
             certificate in RVOL_ADMIN_CA_FILE)"
        );
    };
    let status_line = head.lines().next().unwrap_or_default();
    if !status_line.contains(" 200 ") {
        bail!("{endpoint}{path}: {status_line}: {body}");
    }
    Ok(body.to_string())
}
