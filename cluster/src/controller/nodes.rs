//! The controller's node endpoints: list, cordon, uncordon, drain.
//!
//! Cordoning and draining are the operator's settings (`settings/NAME`),
//! kept apart from the agent's record so that neither overwrites the
//! other, and they outlive the agent: a node that is away may be drained
//! so that its replicas move before the replenish wait would replace them.
//! Draining only sets the node's state; the healer moves its replicas
//! (each replaced and rebuilt elsewhere before it is removed), and `rvol
//! node drain` watches the node's replica count fall to zero. Engines of
//! volumes attached there stay: detaching them is the workload's business
//! (Kubernetes does it when it evicts their pods).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::api::{change_lock, node_name, not_found, ApiResult};
use super::Ctl;
use crate::model::{encode, settings_key, NodeName, NodeSettings, PROTOCOL};
use crate::store::{Expect, Store};
use crate::view::ClusterView;

/// A node as the API shows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct NodeView {
    pub name: NodeName,
    pub alive: bool,
    pub cordoned: bool,
    #[serde(default)]
    pub draining: bool,
    pub address: Option<String>,
    pub zone: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub disks: Vec<crate::model::Disk>,
    pub replicas: usize,
    pub engines: usize,
}

pub async fn list<S: Store>(State(ctl): State<Arc<Ctl<S>>>) -> ApiResult<Vec<NodeView>> {
    let view = ClusterView::load(&*ctl.store).await?;
    let mut names: Vec<NodeName> = view.nodes.keys().cloned().collect();
    // Nodes that hold replicas or settings are listed while away too.
    for (v, _) in view.volumes.values() {
        names.extend(v.replicas.iter().map(|p| p.node.clone()));
    }
    names.extend(view.settings.keys().cloned());
    names.sort();
    names.dedup();
    Ok(Json(
        names
            .into_iter()
            .map(|name| {
                let n = view.nodes.get(&name);
                NodeView {
                    alive: n.is_some(),
                    cordoned: view.cordoned(&name),
                    draining: view.draining(&name),
                    address: n.map(|n| n.address.clone()),
                    zone: n.and_then(|n| n.zone.clone()),
                    labels: n.map(|n| n.labels.clone()).unwrap_or_default(),
                    disks: n.map(|n| n.disks.clone()).unwrap_or_default(),
                    replicas: view
                        .volumes
                        .values()
                        .flat_map(|(v, _)| &v.replicas)
                        .filter(|p| p.node == name)
                        .count(),
                    engines: view
                        .volumes
                        .values()
                        .filter(|(v, _)| v.attached().is_some_and(|a| a.node == name))
                        .count(),
                    name,
                }
            })
            .collect(),
    ))
}

async fn set<S: Store>(
    ctl: &Ctl<S>,
    name: &str,
    settings: NodeSettings,
) -> ApiResult<NodeSettings> {
    let node = node_name(name)?;
    let _lock = change_lock(ctl).await?;
    let view = ClusterView::load(&*ctl.store).await?;
    let known = view.alive(&node)
        || view
            .volumes
            .values()
            .any(|(v, _)| v.replicas.iter().any(|p| p.node == node));
    if !known {
        return Err(not_found(&format!("node {node}")));
    }
    ctl.store
        .put(
            &settings_key(&node),
            encode(&settings),
            Expect::Anything,
            None,
        )
        .await?;
    tracing::info!(%node, cordoned = settings.cordoned, draining = settings.draining, "node settings");
    Ok(Json(settings))
}

fn settings(cordoned: bool, draining: bool) -> NodeSettings {
    NodeSettings {
        protocol: PROTOCOL,
        cordoned,
        draining,
    }
}

pub async fn cordon<S: Store>(
    State(ctl): State<Arc<Ctl<S>>>,
    Path(name): Path<String>,
) -> ApiResult<NodeSettings> {
    set(&ctl, &name, settings(true, false)).await
}

/// Uncordons, and stops a drain: replicas already moved stay where they
/// went; a successor not yet rebuilt is the one retired.
pub async fn uncordon<S: Store>(
    State(ctl): State<Arc<Ctl<S>>>,
    Path(name): Path<String>,
) -> ApiResult<NodeSettings> {
    set(&ctl, &name, settings(false, false)).await
}

pub async fn drain<S: Store>(
    State(ctl): State<Arc<Ctl<S>>>,
    Path(name): Path<String>,
) -> ApiResult<NodeSettings> {
    set(&ctl, &name, settings(true, true)).await
}
