//! `--in-sync-hook`: the engine has its node's agent record which replicas
//! hold every acknowledged write before it acknowledges a flush made after
//! that set changed.
//!
//! **Invariant: a replica the cluster records as in sync lacks no write
//! acknowledged as durable.** Every durable acknowledgement (a flush, and
//! through [`ReplicatedVolume::cover_departures`] a FUA write, a snapshot,
//! an expansion made without some replica) completes a flush first, and
//! [`InSyncHook::record`] runs at the end of every flush with the replicas
//! still RW then, which hold everything acknowledged so far. A replica that
//! left is thus out of the record before anything it missed is promised.
//!
//! It costs one local call when the RW set changes, none otherwise. When
//! the agent cannot record (it, or the cluster store, is down), the flush
//! retries for the hold time and then fails with an I/O error: the engine
//! refuses to promise durability it could not record. An answer of 409
//! (the volume is no longer attached to this node) fails it at once.
//!
//! [`ReplicatedVolume::cover_departures`]: crate::volume::ReplicatedVolume

use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use rvol_cluster::http::{self, Address, HttpError};
use tokio::sync::Mutex;

pub struct InSyncHook {
    address: Address,
    volume: String,
    /// The set last recorded (sorted addresses).
    recorded: Mutex<Option<Vec<String>>>,
}

impl InSyncHook {
    pub fn new(address: Address, volume: &str) -> InSyncHook {
        InSyncHook {
            address,
            volume: volume.to_string(),
            recorded: Mutex::new(None),
        }
    }

    /// Records `rw` unless it is what was recorded last; see the module
    /// docs.
    pub async fn record(&self, mut rw: Vec<String>, hold: Duration) -> Result<(), String> {
        rw.sort();
        let mut recorded = self.recorded.lock().await;
        if recorded.as_ref() == Some(&rw) {
            return Ok(());
        }
        let body = serde_json::json!({ "volume": self.volume, "in_sync": rw }).to_string();
        let deadline = Instant::now() + hold;
        loop {
            let sent = http::request(
                &self.address,
                Method::POST,
                "/v1/in-sync",
                Some(body.clone()),
                &http::Credentials::default(),
                Duration::from_secs(5),
            )
            .await;
            let error = match sent {
                Ok(_) => {
                    tracing::info!(in_sync = ?rw, "the cluster recorded the in-sync replicas");
                    *recorded = Some(rw);
                    return Ok(());
                }
                Err(HttpError::Status { status, body }) if status == StatusCode::CONFLICT => {
                    return Err(format!("the cluster refused the in-sync replicas: {body}"));
                }
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(format!(
                    "the cluster could not record the in-sync replicas within {hold:?}: {error}"
                ));
            }
            tracing::warn!(%error, "recording the in-sync replicas; retrying");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}
