//! The admin API: HTTP/JSON on the admin listener.
//!
//! - `GET /v1/volume`: [`VolumeStatus`].
//!
//! The CLI's side ([`get`]) is a minimal HTTP/1.1 client over TCP or a
//! Unix socket, enough for our own JSON endpoints.

use std::sync::Arc;

use anyhow::{bail, Context};
use axum::{extract::State, routing::get as get_route, Json, Router};
use rvol_frontend::BlockVolume;
use rvol_replica::server::{Endpoint, Listener};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::volume::{Mode, ReplicatedVolume};

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
    pub replicas: Vec<ReplicaStatus>,
    /// The rebuild in progress, if any.
    pub rebuild: Option<crate::rebuild::RebuildStatus>,
    /// Bytes copied by finished rebuilds since the engine started.
    pub rebuilt_bytes: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ReplicaStatus {
    pub address: String,
    pub mode: String,
    pub revision: u64,
    /// Missed an acknowledged write while out of the set: needs a rebuild.
    pub stale: bool,
    pub last_error: Option<String>,
}

pub struct AdminState {
    pub volume: Arc<ReplicatedVolume>,
    pub frontend: String,
    pub nbd: Vec<String>,
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
        replicas,
        rebuild: v.rebuilds.status(),
        rebuilt_bytes: v
            .rebuilds
            .copied_total
            .load(std::sync::atomic::Ordering::Relaxed),
    }
}

async fn volume_status(State(s): State<Arc<AdminState>>) -> Json<VolumeStatus> {
    Json(status(&s))
}

pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/v1/volume", get_route(volume_status))
        .with_state(state)
}

/// Serves the admin API on `listener` until `stop` resolves.
pub async fn serve(
    listener: Listener,
    state: Arc<AdminState>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(state);
    match listener {
        Listener::Tcp(l) => axum::serve(l, app).with_graceful_shutdown(stop).await,
        Listener::Unix(l) => axum::serve(l, app).with_graceful_shutdown(stop).await,
    }
}

/// GETs `path` from an admin endpoint and returns the body of a 200 reply.
pub async fn get(endpoint: &Endpoint, path: &str) -> anyhow::Result<String> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: rvol\r\nConnection: close\r\n\r\n");
    let mut raw = Vec::new();
    match endpoint {
        Endpoint::Tcp(a) => {
            let mut s = tokio::net::TcpStream::connect(a)
                .await
                .with_context(|| format!("connecting to {a}"))?;
            s.write_all(request.as_bytes()).await?;
            s.read_to_end(&mut raw).await?;
        }
        Endpoint::Unix(p) => {
            let mut s = tokio::net::UnixStream::connect(p)
                .await
                .with_context(|| format!("connecting to {}", p.display()))?;
            s.write_all(request.as_bytes()).await?;
            s.read_to_end(&mut raw).await?;
        }
    }
    let text = String::from_utf8_lossy(&raw);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("malformed HTTP reply from {endpoint}");
    };
    let status_line = head.lines().next().unwrap_or_default();
    if !status_line.contains(" 200 ") {
        bail!("{endpoint}{path}: {status_line}: {body}");
    }
    Ok(body.to_string())
}
