//! The cluster as one read of the store saw it: every record under
//! [`PREFIX`] at one revision, decoded. Controllers and agents act on such
//! a view and write back with revision checks, so acting on a view that
//! went stale meanwhile fails instead of undoing someone else's change.
//!
//! A record that does not decode (garbage, or written by another protocol
//! version) is left out of the view and named in [`ClusterView::refused`]:
//! one bad record must not stop the control of every other volume.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::{
    decode, Attachment, EngineCert, EngineReport, Node, NodeName, NodeSettings, ProcessState,
    ReplicaPlace, ReplicaReport, Report, Volume, VolumeName, PREFIX,
};
use crate::store::{Revision, Store, StoreError};

#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    pub revision: Revision,
    pub nodes: BTreeMap<NodeName, Node>,
    pub settings: BTreeMap<NodeName, NodeSettings>,
    /// Each volume, and the revision to write it back at.
    pub volumes: BTreeMap<VolumeName, (Volume, Revision)>,
    pub reports: BTreeMap<NodeName, Report>,
    /// Engine certificates, and the revision to write each back at.
    pub engine_certs: BTreeMap<VolumeName, (EngineCert, Revision)>,
    /// Records left out, and why.
    pub refused: Vec<String>,
}

/// A volume's state, from its record and what the agents report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeState {
    /// Its replicas are not all running yet, and it never served.
    Creating,
    /// Attached, the engine is starting (or waits for a replica).
    Attaching,
    /// Attached, every replica RW.
    Healthy,
    /// Attached with fewer RW replicas than asked, or detached with fewer
    /// running in-sync replicas than asked.
    Degraded,
    /// No replica with the volume's current data is available.
    Faulted,
    /// Not attached; its replicas run.
    Detached,
}

impl ClusterView {
    pub async fn load<S: Store>(store: &S) -> Result<ClusterView, StoreError> {
        let listing = store.list(PREFIX).await?;
        let mut view = ClusterView {
            revision: listing.revision,
            ..ClusterView::default()
        };
        for (key, v) in &listing.items {
            let Some(rest) = key.strip_prefix(PREFIX) else {
                continue;
            };
            let Some((kind, name)) = rest.split_once('/') else {
                continue;
            };
            let refused = match kind {
                "nodes" => decode::<Node>(key, v).map(|n| {
                    view.nodes.insert(n.name.clone(), n);
                }),
                "volumes" => decode::<Volume>(key, v).map(|vol| {
                    view.volumes.insert(vol.name.clone(), (vol, v.revision));
                }),
                "reports" => decode::<Report>(key, v).map(|r| {
                    view.reports.insert(r.node.clone(), r);
                }),
                "engine-certs" => decode::<EngineCert>(key, v).map(|c| {
                    view.engine_certs.insert(c.volume.clone(), (c, v.revision));
                }),
                "settings" => match NodeName::new(name) {
                    Ok(n) => decode::<NodeSettings>(key, v).map(|s| {
                        view.settings.insert(n, s);
                    }),
                    Err(e) => Err(StoreError::Refused(e)),
                },
                _ => Ok(()),
            };
            if let Err(e) = refused {
                tracing::warn!(%key, error = %e, "record ignored");
                view.refused.push(e.to_string());
            }
        }
        Ok(view)
    }

    pub fn alive(&self, node: &NodeName) -> bool {
        self.nodes.contains_key(node)
    }

    pub fn cordoned(&self, node: &NodeName) -> bool {
        self.settings.get(node).is_some_and(|s| s.cordoned)
    }

    pub fn draining(&self, node: &NodeName) -> bool {
        self.settings.get(node).is_some_and(|s| s.draining)
    }

    /// Whether the volume's engine evicted the replica as slow.
    pub fn evicted(&self, volume: &Volume, place: &ReplicaPlace) -> bool {
        self.engine_report(volume)
            .is_some_and(|e| e.replicas.iter().any(|r| r.id == place.id && r.evicted))
    }

    /// Whether the replica is on its way out: its node drains, or its
    /// engine evicted it as slow. A successor is placed for it, and it
    /// is retired once that one is in sync.
    pub fn leaving(&self, volume: &Volume, place: &ReplicaPlace) -> bool {
        self.draining(&place.node) || self.evicted(volume, place)
    }

    /// Where the engine reaches a replica (`IP:PORT`), if its node is known.
    pub fn replica_address(&self, place: &ReplicaPlace) -> Option<String> {
        let node = self.nodes.get(&place.node)?;
        Some(join_host_port(&node.advertise, place.port))
    }

    /// What the replica's agent says of it.
    pub fn replica_report(&self, volume: &Volume, place: &ReplicaPlace) -> Option<&ReplicaReport> {
        self.reports
            .get(&place.node)?
            .replicas
            .iter()
            .find(|r| r.volume == volume.name && r.uid == volume.uid && r.id == place.id)
    }

    /// Whether the replica runs on a live node.
    pub fn replica_running(&self, volume: &Volume, place: &ReplicaPlace) -> bool {
        self.alive(&place.node)
            && self
                .replica_report(volume, place)
                .is_some_and(|r| matches!(r.state, ProcessState::Running { .. }))
    }

    /// The engine serving the volume's current attachment, as reported.
    pub fn engine_report(&self, volume: &Volume) -> Option<&EngineReport> {
        let a: &Attachment = volume.attachment.as_ref()?;
        self.reports
            .get(&a.node)?
            .engines
            .iter()
            .find(|e| e.volume == volume.name && e.uid == volume.uid && e.serial == a.serial)
    }

    pub fn state(&self, volume: &Volume) -> VolumeState {
        let in_sync_running = volume
            .replicas
            .iter()
            .filter(|p| volume.in_sync.contains(&p.id) && self.replica_running(volume, p))
            .count();
        if volume.attached().is_some() {
            let Some(e) = self.engine_report(volume) else {
                return VolumeState::Attaching;
            };
            if !matches!(e.state, ProcessState::Running { .. }) {
                return if in_sync_running > 0 {
                    VolumeState::Attaching
                } else {
                    VolumeState::Faulted
                };
            }
            let rw = e.replicas.iter().filter(|r| r.mode == "RW").count();
            return match rw {
                0 => VolumeState::Faulted,
                n if n >= volume.spec.replicas => VolumeState::Healthy,
                _ => VolumeState::Degraded,
            };
        }
        // Detached (perhaps with a maintenance engine rebuilding it).
        if in_sync_running >= volume.spec.replicas {
            VolumeState::Detached
        } else if volume.last_serial == 0 && volume.replicas.iter().all(|p| self.alive(&p.node)) {
            VolumeState::Creating
        } else if in_sync_running > 0 {
            VolumeState::Degraded
        } else {
            VolumeState::Faulted
        }
    }
}

/// `host:port`, bracketing an IPv6 host.
pub fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}
