//! The leader's reconciler: keeps every volume at its replica count, on
//! the nodes it should be on, with an engine to rebuild it when needed.
//!
//! Each pass reads the whole cluster and, for each volume:
//! 1. **Replaces replicas of nodes away too long.** A node is away while
//!    it has no live agent; this leader notes when it first saw it away
//!    (a new leader starts counting again, which only delays a
//!    replacement). After the replenish wait (the volume's own, or the
//!    controller's) its replicas leave the
//!    volume's record, so the engine drops them and their node, if it
//!    returns, deletes their data. A replica of the in-sync set is kept
//!    while no other in-sync replica is left: forgetting it would forget
//!    where the volume's current data is.
//! 2. **Places replicas** ([`place_missing`]): those the volume lacks,
//!    one for each replica on a draining node or evicted by its engine as
//!    slow (on another node: the evicted one still holds its own), and,
//!    with best-effort data locality, one on the node the volume is
//!    attached to. The agents start them and the engine adds and rebuilds
//!    them online. Why a placement fails is written to the volume's events
//!    once per reason.
//! 3. **Retires surplus replicas**, only once the replicas that stay hold
//!    the volume's count in sync: a replica leaves a draining node, an
//!    evicted one goes, or one gives way to the local one, after its
//!    successor was rebuilt, never before. So a move never lowers the
//!    number of current copies.
//! 4. **Runs a maintenance engine for a detached volume** that has a
//!    replica to rebuild or a snapshot to take or remove: an engine with
//!    no frontend, on a node holding an in-sync replica, removed once that
//!    is done. Without it a replacement placed while the volume is
//!    detached would stay empty, a drain would wait, and a snapshot could
//!    not be taken, until a user attached the volume.
//!
//! The pass also signs engine certificates (`super::certs`).
//!
//! Writes are made at the revision the pass read, so a volume changed
//! meanwhile (by the API, an agent recording its in-sync set) is left for
//! the next pass; every step is decided from the record alone, so the
//! next pass (of this leader or another) decides the same.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Ctl;
use crate::model::{
    encode, Attachment, DataLocality, Frontend, NodeName, ReplicaId, ReplicaPlace, SnapshotState,
    Volume, VolumeName,
};
use crate::placement::{self, NodeView, Policy, Request};
use crate::store::{Expect, Store, StoreError};
use crate::view::{join_host_port, ClusterView};

pub struct Healer<S> {
    ctl: Arc<Ctl<S>>,
    wait: Duration,
    away_since: BTreeMap<NodeName, Instant>,
    /// The last failure of each kind written to each volume's events.
    told: BTreeMap<(VolumeName, &'static str), String>,
    /// Engine certificate requests said to be unsignable.
    unsigned: BTreeSet<(VolumeName, u64)>,
}

impl<S: Store> Healer<S> {
    pub fn new(ctl: Arc<Ctl<S>>, wait: Duration) -> Healer<S> {
        Healer {
            ctl,
            wait,
            away_since: BTreeMap::new(),
            told: BTreeMap::new(),
            unsigned: BTreeSet::new(),
        }
    }

    pub async fn pass(&mut self) {
        let ctl = self.ctl.clone();
        let _lock = ctl.changes.lock().await;
        let started = Instant::now();
        let mut errors = 0;
        let view = match ClusterView::load(&*self.ctl.store).await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "reconcile pass skipped");
                ctl.reconcile.pass(started.elapsed().as_secs_f64(), 1);
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
            changed |= self.place(&view, &mut next);
            changed |= retire_surplus(&view, &mut next);
            changed |= self.maintain(&view, &mut next);
            if changed {
                match self
                    .ctl
                    .store
                    .put(&v.name.key(), encode(&next), Expect::At(*revision), None)
                    .await
                {
                    Ok(_) | Err(StoreError::Conflict { .. }) => {}
                    Err(e) => {
                        errors += 1;
                        tracing::warn!(volume = %v.name, error = %e, "healing not written");
                    }
                }
            }
        }
        let issuer = ctl.issuer.as_deref();
        super::certs::sign(&*ctl.store, issuer, &view, &mut self.unsigned).await;
        ctl.reconcile.pass(started.elapsed().as_secs_f64(), errors);
    }

    /// Writes `outcome` to the volume's events: a success always, a
    /// failure once until it changes. Whether the volume changed.
    fn tell(
        &mut self,
        v: &mut Volume,
        kind: &'static str,
        outcome: Result<String, String>,
    ) -> bool {
        let key = (v.name.clone(), kind);
        match outcome {
            Ok(said) => {
                self.told.remove(&key);
                v.event(said);
                true
            }
            Err(why) if self.told.get(&key) != Some(&why) => {
                self.told.insert(key, why.clone());
                v.event(why);
                true
            }
            Err(_) => false,
        }
    }

    /// Step 1 of the module docs; whether anything changed.
    fn replace_lost(&self, v: &mut Volume, now: Instant) -> bool {
        let lost: Vec<(ReplicaId, NodeName, Duration)> = v
            .replicas
            .iter()
            .filter_map(|p| {
                let away = now - *self.away_since.get(&p.node)?;
                let wait = v
                    .spec
                    .replenish_wait_secs
                    .map_or(self.wait, Duration::from_secs);
                (away >= wait).then(|| (p.id, p.node.clone(), away))
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

    /// Step 2 of the module docs; whether anything changed.
    fn place(&mut self, view: &ClusterView, v: &mut Volume) -> bool {
        let policy = self.ctl.policy;
        let mut changed = false;
        let staying = v.replicas.iter().filter(|p| !view.leaving(v, p)).count();
        if staying < v.spec.replicas {
            let prefer = match v.spec.data_locality {
                DataLocality::Disabled => None,
                _ => v.attached().map(|a| a.node.clone()),
            };
            let count = v.spec.replicas - staying;
            let outcome = place_missing(view, v, policy, count, Where::Prefer(prefer))
                .map(|placed| format!("placed {placed}"))
                .map_err(|why| format!("cannot place a replica: {why}"));
            changed |= self.tell(v, "place", outcome);
        }
        if let Some(local) = locality_wanted(view, v) {
            let outcome = place_missing(view, v, policy, 1, Where::Only(local.clone()))
                .map(|placed| format!("placed {placed} for data locality"))
                .map_err(|why| format!("data locality: no replica fits on {local}: {why}"));
            changed |= self.tell(v, "locality", outcome);
        }
        changed
    }

    /// Step 4 of the module docs; whether anything changed.
    fn maintain(&mut self, view: &ClusterView, v: &mut Volume) -> bool {
        let running = |p: &&ReplicaPlace| view.replica_running(v, p);
        // The engine goes where an in-sync replica runs, on an uncordoned
        // node if there is one.
        let source = v
            .replicas
            .iter()
            .filter(running)
            .filter(|p| v.in_sync.contains(&p.id))
            .min_by_key(|p| view.cordoned(&p.node))
            .map(|p| p.node.clone());
        let to_rebuild: Vec<ReplicaId> = v
            .replicas
            .iter()
            .filter(running)
            .filter(|p| !v.in_sync.contains(&p.id))
            .map(|p| p.id)
            .collect();
        let mut work: Vec<String> = to_rebuild
            .iter()
            .map(|id| format!("rebuild {id}"))
            .collect();
        work.extend(
            v.snapshots
                .iter()
                .filter(|s| !matches!(s.state, SnapshotState::Taken { .. }))
                .map(|s| format!("snapshot {}", s.name)),
        );
        work.extend(
            v.backup
                .iter()
                .filter(|b| b.pending())
                .map(|b| format!("backup of {}", b.snapshot)),
        );
        match &v.attachment {
            None if !work.is_empty() => {
                let Some(node) = source else {
                    let outcome = Err(format!(
                        "detached, and no in-sync replica runs to {}",
                        work.join(", ")
                    ));
                    return self.tell(v, "maintain", outcome);
                };
                v.last_serial += 1;
                v.attachment = Some(Attachment {
                    node: node.clone(),
                    frontend: Frontend::Nbd,
                    port: 0,
                    serial: v.last_serial,
                    maintenance: true,
                    readonly: false,
                });
                let said = format!("maintenance engine on {node}: {}", work.join(", "));
                self.tell(v, "maintain", Ok(said))
            }
            Some(a) if a.maintenance && (work.is_empty() || !view.alive(&a.node)) => {
                let said = format!("maintenance engine on {} done", a.node);
                v.attachment = None;
                self.tell(v, "maintain", Ok(said))
            }
            _ => false,
        }
    }
}

/// With best-effort data locality: the node the volume is attached to,
/// when it holds no replica and may take one.
fn locality_wanted(view: &ClusterView, v: &Volume) -> Option<NodeName> {
    let a = v.attached()?;
    let wanted = v.spec.data_locality == DataLocality::BestEffort
        && view.alive(&a.node)
        && !view.cordoned(&a.node)
        && !v.replicas.iter().any(|p| p.node == a.node);
    wanted.then(|| a.node.clone())
}

/// Step 3 of the module docs; whether anything changed.
fn retire_surplus(view: &ClusterView, v: &mut Volume) -> bool {
    let mut changed = false;
    while v.replicas.len() > v.spec.replicas {
        let in_sync_without = |id: ReplicaId| {
            v.in_sync
                .iter()
                .filter(|i| **i != id && v.replicas.iter().any(|p| p.id == **i))
                .count()
        };
        let Some((id, why)) = surplus(view, v)
            .into_iter()
            .find(|(id, _)| in_sync_without(*id) >= v.spec.replicas)
        else {
            break;
        };
        let node = v
            .replicas
            .iter()
            .find(|p| p.id == id)
            .map(|p| p.node.clone());
        v.replicas.retain(|p| p.id != id);
        v.in_sync.retain(|i| *i != id);
        if let Some(node) = node {
            v.event(format!("replica {id} on {node} retired: {why}"));
        }
        changed = true;
    }
    changed
}

/// The replicas that may leave a volume with more than its count, best
/// first, and why each would.
fn surplus(view: &ClusterView, v: &Volume) -> Vec<(ReplicaId, &'static str)> {
    let leaving: Vec<_> = v
        .replicas
        .iter()
        .filter(|p| view.leaving(v, p))
        .map(|p| {
            let why = if view.draining(&p.node) {
                "its node is drained"
            } else {
                "its engine evicted it as slow"
            };
            (p.id, why)
        })
        .collect();
    if !leaving.is_empty() {
        return leaving;
    }
    // Those not in sync first, then the newest; with best-effort locality
    // the local replica stays, once it is in sync (until then, nothing
    // leaves: it might not make it).
    let mut rest: Vec<&ReplicaPlace> = v.replicas.iter().collect();
    let mut why = "the volume has more replicas than asked";
    if let Some(a) = v
        .attached()
        .filter(|_| v.spec.data_locality == DataLocality::BestEffort)
    {
        if let Some(local) = v.replicas.iter().find(|p| p.node == a.node) {
            if !v.in_sync.contains(&local.id) {
                return Vec::new();
            }
            rest.retain(|p| p.id != local.id);
            why = "a replica on the node the volume is attached to took its place";
        }
    }
    rest.sort_by_key(|p| (v.in_sync.contains(&p.id), std::cmp::Reverse(p.id)));
    rest.into_iter().map(|p| (p.id, why)).collect()
}

/// The lowest port of `node`'s range that no replica or export of any
/// volume uses, that no process the node's agent reports still holds, nor
/// any of `taken`. The reports matter: a deleted volume's replicas keep
/// their ports until their agent has stopped them, and a new replica
/// given such a port fails to bind and is degraded until it is freed.
pub fn free_port(view: &ClusterView, node: &NodeName, taken: &[u16]) -> Option<u16> {
    let range = view.nodes.get(node)?.ports;
    let mut used: BTreeSet<u16> = taken.iter().copied().collect();
    let port_of = |address: &str| {
        address
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
    };
    if let Some(r) = view.reports.get(node) {
        used.extend(r.replicas.iter().filter_map(|p| port_of(&p.address)));
        used.extend(
            r.engines
                .iter()
                .filter_map(|e| e.nbd.as_deref().and_then(port_of)),
        );
    }
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

/// Where [`place_missing`] may put replicas.
pub enum Where {
    /// Any node that fits, this one first.
    Prefer(Option<NodeName>),
    /// This node only.
    Only(NodeName),
}

/// Places `count` more replicas of `v`, giving each an id, a port and an
/// address; returns what was placed, or why it could not be.
pub fn place_missing(
    view: &ClusterView,
    v: &mut Volume,
    policy: Policy,
    count: usize,
    at: Where,
) -> Result<String, String> {
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
    let (only, prefer) = match at {
        Where::Prefer(node) => (None, node),
        Where::Only(node) => (Some(node.clone()), Some(node)),
    };
    let nodes: Vec<NodeView> = view
        .nodes
        .values()
        .filter(|n| only.as_ref().is_none_or(|o| *o == n.name))
        .map(|n| NodeView {
            node: n.clone(),
            alive: true,
            cordoned: view.cordoned(&n.name),
            scheduled: scheduled.remove(&n.name).unwrap_or_default(),
        })
        .collect();
    // A replica on a draining node neither uses up its zone (its
    // successor may go there) nor lets its node take another: the node is
    // cordoned.
    let request = Request {
        count,
        size: v.spec.size,
        zones: v.spec.zone_anti_affinity,
        selector: v.spec.node_selector.clone(),
        holding: v
            .replicas
            .iter()
            .filter(|p| !view.draining(&p.node))
            .map(|p| p.node.clone())
            .collect(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{
        Node, NodeName, PortRange, ProcessState, ReplicaId, ReplicaReport, Report, VolumeName,
    };

    #[test]
    fn a_port_still_held_by_a_reported_process_is_not_given_out() {
        let node = NodeName::new("n1").unwrap();
        let mut view = ClusterView::default();
        view.nodes.insert(
            node.clone(),
            Node {
                protocol: 1,
                name: node.clone(),
                address: "127.0.0.1:7500".into(),
                advertise: "127.0.0.1".into(),
                ports: PortRange {
                    first: 11000,
                    last: 11003,
                },
                zone: None,
                labels: Default::default(),
                disks: Vec::new(),
                lease: 0,
            },
        );
        assert_eq!(free_port(&view, &node, &[]), Some(11000));
        // A replica of a volume deleted a moment ago, still running.
        view.reports.insert(
            node.clone(),
            Report {
                protocol: 1,
                node: node.clone(),
                replicas: vec![ReplicaReport {
                    volume: VolumeName::new("gone").unwrap(),
                    uid: "u".into(),
                    id: ReplicaId(1),
                    address: "127.0.0.1:11000".into(),
                    state: ProcessState::Running { pid: 1 },
                }],
                engines: Vec::new(),
            },
        );
        assert_eq!(free_port(&view, &node, &[11001]), Some(11002));
    }
}
