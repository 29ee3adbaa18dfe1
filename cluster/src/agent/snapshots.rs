//! Taking and removing the snapshots a volume's record asks for, through
//! its engine's admin API, and recording that they were.
//!
//! **The engine's chain is the truth.** A requested snapshot is marked
//! taken when the chain has it, whether this pass took it or an earlier
//! one did and its record was lost (the agent was killed in between); a
//! removed one leaves the record only once the chain no longer has it. So
//! a pass repeated after a crash takes or removes nothing twice.

use hyper::Method;

use super::admin;
use super::record::{update_attached, RecordError};
use crate::http::Address;
use crate::model::{NodeName, SnapshotName, SnapshotState, Volume};
use crate::store::Store;

/// The chain layer of snapshot `name` (the replica's file name for it).
fn layer(name: &SnapshotName) -> String {
    format!("volume-snap-{name}.img")
}

enum Done {
    Taken(u64),
    Removed,
    Failed(String),
}

/// Brings the engine's chain to the record's snapshots; see the module
/// docs.
pub async fn converge<S: Store>(store: &S, node: &NodeName, v: &Volume, socket: &Address) {
    if v.snapshots
        .iter()
        .all(|s| matches!(s.state, SnapshotState::Taken { .. }))
    {
        return;
    }
    let chain = match admin(socket, Method::GET, "/v1/snapshots", None).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(volume = %v.name, error = %e, "listing the engine's snapshots");
            return;
        }
    };
    let created = |name: &SnapshotName| {
        chain.as_array().into_iter().flatten().find_map(|l| {
            (l["name"] == layer(name).as_str() && l["removed"] != true)
                .then(|| l["created"].as_u64().unwrap_or_default())
        })
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut done = Vec::new();
    for s in &v.snapshots {
        let outcome = match s.state {
            SnapshotState::Taken { .. } => continue,
            SnapshotState::Requested => match created(&s.name) {
                Some(at) => Done::Taken(at),
                None => {
                    let body = serde_json::json!({ "name": s.name }).to_string();
                    match admin(socket, Method::POST, "/v1/snapshots", Some(body)).await {
                        Ok(_) => Done::Taken(now),
                        Err(e) => Done::Failed(format!("snapshot {} not taken: {e}", s.name)),
                    }
                }
            },
            SnapshotState::Removing => match created(&s.name) {
                None => Done::Removed,
                Some(_) => {
                    let path = format!("/v1/snapshots/{}", s.name);
                    match admin(socket, Method::DELETE, &path, None).await {
                        Ok(_) => Done::Removed,
                        Err(e) => Done::Failed(format!("snapshot {} not removed: {e}", s.name)),
                    }
                }
            },
        };
        done.push((s.name.clone(), outcome));
    }
    let recorded = update_attached(store, node, &v.name, |next| {
        let mut changed = false;
        for (name, outcome) in &done {
            let Some(i) = next.snapshots.iter().position(|s| &s.name == name) else {
                continue;
            };
            match (outcome, next.snapshots[i].state) {
                (Done::Taken(at), SnapshotState::Requested) => {
                    next.snapshots[i].state = SnapshotState::Taken { at: *at };
                    next.event(format!("snapshot {name} taken"));
                }
                (Done::Removed, SnapshotState::Removing) => {
                    next.snapshots.remove(i);
                    next.event(format!("snapshot {name} removed"));
                }
                // Said once, not at every pass.
                (Done::Failed(why), _) if next.events.last().map(|e| &e.message) != Some(why) => {
                    next.event(why.clone());
                }
                _ => continue,
            }
            changed = true;
        }
        Ok(changed)
    })
    .await;
    if let Err(e @ RecordError::Store(_)) = recorded {
        tracing::warn!(volume = %v.name, error = %e, "recording snapshots");
    }
}
