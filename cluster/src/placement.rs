//! Where a volume's replicas go: a pure function of the nodes as the store
//! last saw them, so the controller's choice can be tested exhaustively
//! and explained when it fails.
//!
//! Rules, in the order they are applied to each node:
//! 1. **Eligible**: alive (its agent's lease lives), not cordoned, and its
//!    labels match every `key=value` of the volume's node selector.
//! 2. **Distinct** (always hard): no node holds two replicas of a volume;
//!    nodes that already hold one are skipped.
//! 3. **Room**: a disk fits a replica of `size` bytes if the sizes already
//!    scheduled on it plus `size` stay within its capacity times the
//!    overprovisioning ratio (replicas are sparse, so scheduling more than
//!    the disk holds is the operator's choice: 1.0 by default, Longhorn's
//!    100 %), and it still has at least `min_free` of its capacity free.
//! 4. **Zones**: with hard anti-affinity no two replicas share a zone (a
//!    node without a zone is a zone of its own); with soft, a node in a
//!    zone not used yet is preferred.
//!
//! Among the nodes that fit, the one preferred for data locality comes
//! first, then the one whose best disk has the most room left, then the
//! name, so the same state always gives the same answer. When fewer nodes
//! fit than replicas are asked for, the error says why each other node
//! did not.

use std::collections::{BTreeMap, BTreeSet};

use crate::model::{Node, NodeName};

impl std::str::FromStr for ZoneAntiAffinity {
    type Err = String;
    fn from_str(s: &str) -> Result<ZoneAntiAffinity, String> {
        match s {
            "soft" => Ok(ZoneAntiAffinity::Soft),
            "hard" => Ok(ZoneAntiAffinity::Hard),
            _ => Err(format!("{s:?}: zone anti-affinity is soft or hard")),
        }
    }
}

/// A node as placement sees it.
#[derive(Debug, Clone)]
pub struct NodeView {
    pub node: Node,
    pub alive: bool,
    pub cordoned: bool,
    /// Bytes of replicas already placed on each disk, by disk path.
    pub scheduled: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ZoneAntiAffinity {
    #[default]
    Soft,
    Hard,
}

/// What is to be placed.
#[derive(Debug, Clone)]
pub struct Request {
    /// Replicas still to place.
    pub count: usize,
    pub size: u64,
    pub zones: ZoneAntiAffinity,
    pub selector: BTreeMap<String, String>,
    /// Nodes that already hold a replica of the volume, and so take no
    /// other; their zones count as used.
    pub holding: Vec<NodeName>,
    /// Data locality: the node to prefer (where the volume is attached).
    pub prefer: Option<NodeName>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// How far scheduled replica sizes may exceed a disk's capacity.
    pub overprovisioning: f64,
    /// Share of a disk's capacity that must stay free.
    pub min_free: f64,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            overprovisioning: 1.0,
            min_free: 0.1,
        }
    }
}

/// One replica's place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    pub node: NodeName,
    pub disk: String,
}

/// Why a request could not be met, node by node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{asked} replica(s) asked, {fit} node(s) fit{}", reasons(.why))]
pub struct Unplaceable {
    pub asked: usize,
    pub fit: usize,
    /// Each node that was not used, and why.
    pub why: BTreeMap<NodeName, String>,
}

fn reasons(why: &BTreeMap<NodeName, String>) -> String {
    if why.is_empty() {
        return String::new();
    }
    let list: Vec<String> = why.iter().map(|(n, r)| format!("{n} {r}")).collect();
    format!(": {}", list.join("; "))
}

fn gib(bytes: f64) -> String {
    format!("{:.1} GiB", bytes / (1u64 << 30) as f64)
}

/// The disk of `v` with the most room for `size`, and that room; or why
/// none fits.
fn best_disk(v: &NodeView, size: u64, policy: Policy) -> Result<(String, f64), String> {
    let mut best: Option<(String, f64)> = None;
    let mut closest = String::from("has no disk");
    for d in &v.node.disks {
        let cap = d.capacity_bytes as f64;
        let scheduled = v.scheduled.get(&d.path).copied().unwrap_or(0) as f64;
        let room = cap * policy.overprovisioning - scheduled - size as f64;
        let reserve = cap * policy.min_free;
        if room < 0.0 {
            closest = format!(
                "has {} schedulable on {} for a {} replica",
                gib((cap * policy.overprovisioning - scheduled).max(0.0)),
                d.path,
                gib(size as f64)
            );
        } else if (d.free_bytes as f64) < reserve {
            closest = format!(
                "has {} free on {}, under the {:.0} % kept free",
                gib(d.free_bytes as f64),
                d.path,
                policy.min_free * 100.0
            );
        } else if best.as_ref().is_none_or(|(_, r)| room > *r) {
            best = Some((d.path.clone(), room));
        }
    }
    best.ok_or(closest)
}

fn zone_of(v: &NodeView) -> String {
    // A node without a zone is a zone of its own.
    v.node
        .zone
        .clone()
        .unwrap_or_else(|| format!("node:{}", v.node.name))
}

/// Places `req.count` replicas; see the module docs.
pub fn place(
    nodes: &[NodeView],
    req: &Request,
    policy: Policy,
) -> Result<Vec<Placed>, Unplaceable> {
    let mut why = BTreeMap::new();
    // Nodes that fit, with their best disk and its room.
    let mut fit: Vec<(&NodeView, String, f64)> = Vec::new();
    for v in nodes {
        let reason = if req.holding.contains(&v.node.name) {
            Some("already holds a replica of this volume".to_string())
        } else if !v.alive {
            Some("is not alive".to_string())
        } else if v.cordoned {
            Some("is cordoned".to_string())
        } else if let Some((k, want)) = req
            .selector
            .iter()
            .find(|(k, want)| v.node.labels.get(*k) != Some(*want))
        {
            Some(format!("does not match {k}={want}"))
        } else {
            match best_disk(v, req.size, policy) {
                Ok((disk, room)) => {
                    fit.push((v, disk, room));
                    None
                }
                Err(reason) => Some(reason),
            }
        };
        if let Some(r) = reason {
            why.insert(v.node.name.clone(), r);
        }
    }
    let mut used_zones: BTreeSet<String> = nodes
        .iter()
        .filter(|v| req.holding.contains(&v.node.name))
        .map(zone_of)
        .collect();
    let mut chosen = Vec::new();
    while chosen.len() < req.count {
        let pick = fit
            .iter()
            .enumerate()
            .filter(|(_, (v, _, _))| {
                req.zones == ZoneAntiAffinity::Soft || !used_zones.contains(&zone_of(v))
            })
            .max_by(|(_, (a, _, ra)), (_, (b, _, rb))| {
                let key = |v: &NodeView, room: f64| {
                    (
                        req.prefer.as_ref() == Some(&v.node.name),
                        !used_zones.contains(&zone_of(v)),
                        room,
                    )
                };
                let (ka, kb) = (key(a, *ra), key(b, *rb));
                ka.partial_cmp(&kb)
                    .unwrap_or(std::cmp::Ordering::Equal)
                    // Smaller names win ties.
                    .then_with(|| b.node.name.cmp(&a.node.name))
            })
            .map(|(i, _)| i);
        let Some(i) = pick else {
            break;
        };
        let (v, disk, _) = fit.swap_remove(i);
        used_zones.insert(zone_of(v));
        chosen.push(Placed {
            node: v.node.name.clone(),
            disk,
        });
    }
    if chosen.len() < req.count {
        for (v, _, _) in fit {
            why.insert(
                v.node.name.clone(),
                format!(
                    "shares zone {} with another replica (anti-affinity is hard)",
                    zone_of(v)
                ),
            );
        }
        return Err(Unplaceable {
            asked: req.count,
            fit: chosen.len(),
            why,
        });
    }
    Ok(chosen)
}

#[cfg(test)]
mod tests;
