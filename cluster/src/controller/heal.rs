//! The leader's reconciler: keeps every volume at its replica count.
//!
//! Each pass reads the whole cluster and, for each volume:
//! 1. **Replaces replicas of nodes away too long.** A node is away while
//!    it has no live agent; this leader notes when it first saw it away
//!    (a new leader starts counting again, which only delays a
//!    replacement). After the replenish wait its replicas leave the
//!    volume's record, so the engine drops them and their node, if it
//!    returns, deletes their data. A replica of the in-sync set is kept
//!    while no other in-sync replica is left: forgetting it would forget
//!    where the volume's current data is.
//! 2. **Places missing replicas** ([`place_missing`]), which the agents
//!    then start and the engine, when attached, adds and rebuilds online;
//!    a volume short of nodes gets them when nodes are added later. Why
//!    placement fails is written to the volume's events once per reason.
//!
//! Writes are made at the revision the pass read, so a volume changed
//! meanwhile (by the API, an agent recording its in-sync set) is left for
//! the next pass.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Ctl;
use crate::model::{encode, DataLocality, NodeName, ReplicaId, ReplicaPlace, Volume, VolumeName};
use crate::placement::{self, NodeView, Policy, Request};
use crate::store::{Expect, Store, StoreError};
use crate::view::{join_host_port, ClusterView};

pub struct Healer<S> {
    ctl: Arc<Ctl<S>>,
    wait: Duration,
    away_since: BTreeMap<NodeName, Instant>,
    /// The last placement failure written to each volume's events.
    told: BTreeMap<VolumeName, String>,
}

impl<S: Store> Healer<S> {
    pub fn new(ctl: Arc<Ctl<S>>, wait: Duration) -> Healer<S> {
        Healer {
            ctl,
            wait,
            away_since: BTreeMap::new(),
            told: BTreeMap::new(),
        }
    }

    pub async fn pass(&mut self) {
        let _lock = self.ctl.changes.lock().await;
        let view = match ClusterView::load(&*self.ctl.store).await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "reconcile pass skipped");
                return;
            }
        };
        let now = Instant::now();
        let referenced: BTreeSet<&NodeName> = view
            .volumes
            .values()
            .flat_map(|(v, _)| v.replicas.iter().map(|p| &p.node))
            .collect();
        self.away_since
            .retain(|n, _| referenced.contains(n) && !view.alive(n));
        for n in referenced {
            if !view.alive(n) {
                self.away_since.entry(n.clone()).or_insert(now);
            }
        }
        for (v, revision) in view.volumes.values() {
            let mut next = v.clone();
            let mut changed = self.replace_lost(&mut next, now);
            if next.replicas.len() < next.spec.replicas {
                let prefer = match next.spec.data_locality {
                    DataLocality::Disabled => None,
                    _ => next.attachment.as_ref().map(|a| a.node.clone()),
                };
                match place_missing(&view, &mut next, self.ctl.policy, prefer) {
                    Ok(placed) => {
                        next.event(format!("placed {placed}"));
                        self.told.remove(&v.name);
                        changed = true;
                    }
                    Err(why) => {
                        if self.told.get(&v.name) != Some(&why) {
                            next.event(format!("cannot place a replica: {why}"));
                            self.told.insert(v.name.clone(), why);
                            changed = true;
                        }
                    }
                }
            }
            if changed {
                match self
                    .ctl
                    .store
                    .put(&v.name.key(), encode(&next), Expect::At(*revision), None)
                    .await
                {
                    Ok(_) | Err(StoreError::Conflict { .. }) => {}
                    Err(e) => tracing::warn!(volume = %v.name, error = %e, "healing not written"),
                }
            }
        }
    }

    /// Step 1 of the module docs; whether anything changed.
    fn replace_lost(&self, v: &mut Volume, now: Instant) -> bool {
        let lost: Vec<(ReplicaId, NodeName, Duration)> = v
            .replicas
            .iter()
            .filter_map(|p| {
                let away = now - *self.away_since.get(&p.node)?;
                (away >= self.wait).then(|| (p.id, p.node.clone(), away))
            })
            .collect();
        let mut changed = false;
        for (id, node, away) in lost {
            let others_in_sync = v
                .in_sync
                .iter()
                .filter(|i| **i != id && v.replicas.iter().any(|p| p.id == **i))
                .count();
            if v.in_sync.contains(&id) && others_in_sync == 0 {
                continue;
            }
            v.replicas.retain(|p| p.id != id);
            v.in_sync.retain(|i| *i != id);
            v.event(format!(
                "replica {id} on {node} removed: the node has been away for {}s",
                away.as_secs()
            ));
            changed = true;
        }
        changed
    }
}

/// The lowest port of `node`'s range that no replica or export of any
/// volume uses, nor any of `taken`.
pub fn free_port(view: &ClusterView, node: &NodeName, taken: &[u16]) -> Option<u16> {
    let range = view.nodes.get(node)?.ports;
    let mut used: BTreeSet<u16> = taken.iter().copied().collect();
    for (v, _) in view.volumes.values() {
        used.extend(
            v.replicas
                .iter()
                .filter(|p| &p.node == node)
                .map(|p| p.port),
        );
        used.extend(
            v.attachment
                .iter()
                .filter(|a| &a.node == node)
                .map(|a| a.port),
        );
    }
    (range.first..=range.last).find(|p| !used.contains(p))
}

/// Places the replicas `v` lacks, giving each an id, a port and an
/// address; returns what was placed, or why it could not be.
pub fn place_missing(
    view: &ClusterView,
    v: &mut Volume,
    policy: Policy,
    prefer: Option<NodeName>,
) -> Result<String, String> {
    let count = v.spec.replicas.saturating_sub(v.replicas.len());
    if count == 0 {
        return Ok("nothing".into());
    }
    let mut scheduled: BTreeMap<NodeName, BTreeMap<String, u64>> = BTreeMap::new();
    for (other, _) in view.volumes.values().filter(|(o, _)| o.name != v.name) {
        for p in &other.replicas {
            *scheduled
                .entry(p.node.clone())
                .or_default()
                .entry(p.disk.clone())
                .or_default() += other.spec.size;
        }
    }
    let nodes: Vec<NodeView> = view
        .nodes
        .values()
        .map(|n| NodeView {
            node: n.clone(),
            alive: true,
            cordoned: view.cordoned(&n.name),
            scheduled: scheduled.remove(&n.name).unwrap_or_default(),
        })
        .collect();
    let request = Request {
        count,
        size: v.spec.size,
        zones: v.spec.zone_anti_affinity,
        selector: v.spec.node_selector.clone(),
        holding: v.replicas.iter().map(|p| p.node.clone()).collect(),
        prefer,
    };
    let placed = placement::place(&nodes, &request, policy).map_err(|e| e.to_string())?;
    let mut said = Vec::new();
    let mut taken: Vec<u16> = v.replicas.iter().map(|p| p.port).collect();
    for p in placed {
        let node = view
            .nodes
            .get(&p.node)
            .ok_or_else(|| format!("node {} vanished", p.node))?;
        let port = free_port(view, &p.node, &taken)
            .ok_or_else(|| format!("node {} has no free port left in its range", p.node))?;
        taken.push(port);
        let id = ReplicaId(v.next_replica);
        v.next_replica += 1;
        said.push(format!("{id} on {} ({})", p.node, p.disk));
        v.replicas.push(ReplicaPlace {
            id,
            node: p.node,
            disk: p.disk,
            port,
            address: join_host_port(&node.advertise, port),
        });
    }
    Ok(said.join(", "))
}
