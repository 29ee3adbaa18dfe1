//! The records the control plane keeps in the store, and their keys.
//!
//! Everything lives under one prefix ([`PREFIX`]), one JSON record per
//! key: `nodes/NAME` is a node as its agent last reported it, written under
//! the agent's lease so that it disappears when the agent stops renewing
//! it; `engine-certs/VOLUME` the certificate of a volume's engine. Every record names the [`PROTOCOL`] of the process that wrote it,
//! so a controller and agents of incompatible versions refuse each other
//! instead of misreading each other's records.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::store::{StoreError, Versioned};

/// The root of rvol's keys in the store.
pub const PREFIX: &str = "/rvol/";

/// The version of the records' meaning; raised on incompatible changes.
pub const PROTOCOL: u32 = 1;

/// Declares a name type: `[A-Za-z0-9._-]`, 1 to 63 characters (a DNS
/// label, or close to one, as Kubernetes names are), so a name is safe in
/// a store key, a file name and a URI.
macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $what:literal, $dir:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String")]
        pub struct $name(String);

        impl $name {
            pub fn new(name: &str) -> Result<$name, String> {
                let ok = !name.is_empty()
                    && name.len() <= 63
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
                    && name != "."
                    && name != "..";
                if ok {
                    Ok($name(name.to_string()))
                } else {
                    Err(format!(
                        "{name:?} is not a {} name (1-63 of A-Z a-z 0-9 . _ -)",
                        $what
                    ))
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// Its key in the store.
            pub fn key(&self) -> String {
                format!("{PREFIX}{}/{}", $dir, self.0)
            }
        }

        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(s: String) -> Result<$name, String> {
                $name::new(&s)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.pad(&self.0)
            }
        }
    };
}

name_type!(
    /// A node's name; its record is `nodes/NAME`.
    NodeName,
    "node",
    "nodes"
);
name_type!(
    /// A volume's name; its record is `volumes/NAME`.
    VolumeName,
    "volume",
    "volumes"
);
name_type!(
    /// A snapshot's name, unique within its volume (kept in the volume's
    /// record, not under a key of its own).
    SnapshotName,
    "snapshot",
    "snapshots"
);

/// A disk an agent offers for replicas.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    pub path: String,
    pub capacity_bytes: u64,
    pub free_bytes: u64,
}

/// A node, as its agent reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub protocol: u32,
    pub name: NodeName,
    /// Where the agent is reached (its API address).
    pub address: String,
    /// The IP address replicas and NBD exports of this node listen on.
    pub advertise: String,
    /// The ports the controller may give this node's replicas and exports.
    pub ports: PortRange,
    pub zone: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub disks: Vec<Disk>,
    /// The lease the record lives under: the agent's, which a restarted
    /// agent of the same node resumes while it still lives.
    pub lease: i64,
}

/// An inclusive range of TCP ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl std::str::FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<PortRange, String> {
        let bad = || format!("{s:?} is not a port range FIRST-LAST");
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let (first, last) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
        if first == 0 || first > last {
            return Err(bad());
        }
        Ok(PortRange { first, last })
    }
}

/// What the operator decided about a node (`settings/NAME`), kept apart
/// from the agent's record so that neither overwrites the other.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSettings {
    pub protocol: u32,
    /// No new replica or attachment is placed on it.
    pub cordoned: bool,
    /// Cordoned, and its replicas move away: each is replaced elsewhere,
    /// rebuilt, and only then removed (`rvol node drain`).
    #[serde(default)]
    pub draining: bool,
}

pub fn settings_key(node: &NodeName) -> String {
    format!("{PREFIX}settings/{node}")
}

/// The certificate of a volume's engine (`engine-certs/VOLUME`), in a
/// cluster whose replicas and engines use mutual TLS. The agent of the
/// node the volume is attached to makes a key, keeps it, and asks with a
/// certificate request; the leading controller signs the request's key for
/// the volume's identity (`rvol://volume/NAME`), and only for the node and
/// attachment the volume's record names. So a node holds an engine
/// certificate only for a volume attached to it, and a stolen one opens
/// that volume alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineCert {
    pub protocol: u32,
    pub volume: VolumeName,
    pub uid: String,
    pub serial: u64,
    pub node: NodeName,
    /// The request, in PEM.
    pub request: String,
    /// The certificate, in PEM, once signed.
    pub cert: Option<String>,
}

pub fn engine_cert_key(volume: &VolumeName) -> String {
    format!("{PREFIX}engine-certs/{volume}")
}

/// Zone anti-affinity of a volume's replicas.
pub use crate::placement::ZoneAntiAffinity;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum DataLocality {
    /// Replicas go wherever placement puts them.
    #[default]
    Disabled,
    /// One replica is kept on the node the volume is attached to when it
    /// fits there.
    BestEffort,
    /// Attaching requires a replica on the node.
    StrictLocal,
}

impl std::str::FromStr for DataLocality {
    type Err = String;
    fn from_str(s: &str) -> Result<DataLocality, String> {
        serde_json::from_value(serde_json::Value::String(s.to_string()))
            .map_err(|_| format!("{s:?}: data locality is disabled, best-effort or strict-local"))
    }
}

/// What the user asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSpec {
    pub size: u64,
    pub replicas: usize,
    #[serde(default)]
    pub zone_anti_affinity: ZoneAntiAffinity,
    #[serde(default)]
    pub data_locality: DataLocality,
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    /// How long a replica's node may be away before the replica is
    /// replaced, when not the controller's `--replica-replenish-wait`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replenish_wait_secs: Option<u64>,
    /// Encrypted at rest: engines run with the volume's key from the node
    /// ([`crate::keys`]), which the record never holds.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub encrypted: bool,
}

/// A replica's id within its volume: `r1`, `r2`, ... never reused, so a
/// replica that was removed can never be mistaken for its successor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ReplicaId(pub u32);

impl std::fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "r{}", self.0)
    }
}

/// Where one replica of a volume lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaPlace {
    pub id: ReplicaId,
    pub node: NodeName,
    pub disk: String,
    pub port: u16,
    /// Where engines reach it (`IP:PORT`), fixed when it is placed so
    /// that it stays known while its node is away.
    pub address: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Frontend {
    #[default]
    Nbd,
    Ublk,
}

impl std::str::FromStr for Frontend {
    type Err = String;
    fn from_str(s: &str) -> Result<Frontend, String> {
        match s {
            "nbd" => Ok(Frontend::Nbd),
            "ublk" => Ok(Frontend::Ublk),
            _ => Err(format!("{s:?}: the frontend is nbd or ublk")),
        }
    }
}

/// Where a volume is attached: the node whose agent runs its engine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub node: NodeName,
    pub frontend: Frontend,
    /// The NBD export's port on the node.
    pub port: u16,
    /// Raised by every attachment: an agent runs the engine of the
    /// attachment it sees, and reports which one it runs.
    pub serial: u64,
    /// Made by the controller, not a user: an engine with no frontend
    /// that rebuilds the replicas of a detached volume (and takes its
    /// snapshots). A user's attach replaces it; detach leaves it.
    #[serde(default)]
    pub maintenance: bool,
    /// Published read-only: the node mounts it so (the engine does not
    /// refuse writes itself).
    #[serde(default)]
    pub readonly: bool,
}

/// One line of a volume's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Seconds since the Unix epoch.
    pub at: u64,
    pub message: String,
}

/// Events kept per volume; older ones are dropped.
pub const EVENTS_KEPT: usize = 20;

/// A volume (`volumes/NAME`): what was asked, where its replicas are,
/// where it is attached and which replicas hold its current data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub protocol: u32,
    pub name: VolumeName,
    /// Tells this volume from an earlier one of the same name: replica
    /// directories carry it, so one of a deleted volume is never served
    /// as the new one's.
    pub uid: String,
    pub spec: VolumeSpec,
    /// The size it was created with. Engines start with it and are grown
    /// to `spec.size` by their agent, so an engine never refuses replicas
    /// that missed an expansion made while the volume was detached.
    pub created_size: u64,
    pub replicas: Vec<ReplicaPlace>,
    /// The next replica id to give.
    pub next_replica: u32,
    pub attachment: Option<Attachment>,
    pub last_serial: u64,
    /// The replicas that hold every acknowledged write, as the engine last
    /// reported them (all replicas until an engine has run). An engine is
    /// only started when one of them can be reached.
    pub in_sync: Vec<ReplicaId>,
    /// Snapshots asked for, taken, or being removed, oldest first.
    #[serde(default)]
    pub snapshots: Vec<Snapshot>,
    /// The newest backup asked for ([`BackupJob`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupJob>,
    pub events: Vec<Event>,
}

/// A backup of one of a volume's snapshots to a target, asked for in its
/// record: the agent of its engine (a maintenance engine's, while it is
/// detached) has the engine run it and records how it ended. One at a
/// time per volume. The target's credentials are never in the record:
/// the agent hands the engine its own `AWS_*` settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupJob {
    pub snapshot: SnapshotName,
    /// `s3://BUCKET/PREFIX` or `file:///DIR`.
    pub target: String,
    /// Read rate limit in whole MiB/s (none: unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_mib: Option<u32>,
    pub state: BackupJobState,
    /// Unix seconds when it was asked for.
    pub asked: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "is")]
pub enum BackupJobState {
    /// Asked for; no engine runs it yet.
    Requested,
    /// An engine runs it.
    Running,
    /// Written to the target as backup `name`.
    Done {
        name: String,
    },
    Failed {
        error: String,
    },
}

impl BackupJob {
    /// Whether it still has to run (or is running).
    pub fn pending(&self) -> bool {
        matches!(
            self.state,
            BackupJobState::Requested | BackupJobState::Running
        )
    }
}

/// A snapshot of a volume. Users ask for it in the record; the engine of
/// the volume (the user's, or a maintenance engine while detached) takes
/// or removes it in every replica's chain, and its agent records that.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub name: SnapshotName,
    pub state: SnapshotState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "is")]
pub enum SnapshotState {
    /// Asked for; no engine has taken it yet.
    Requested,
    /// In the chain of the volume's replicas since `at` (Unix seconds).
    Taken { at: u64 },
    /// To be removed from the chain; the record goes when it is.
    Removing,
}

impl Volume {
    /// Appends an event, keeping the newest [`EVENTS_KEPT`].
    pub fn event(&mut self, message: String) {
        tracing::info!(volume = %self.name, "{message}");
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.events.push(Event { at, message });
        let extra = self.events.len().saturating_sub(EVENTS_KEPT);
        self.events.drain(..extra);
    }

    /// Where a user attached it (not the controller's maintenance engine).
    pub fn attached(&self) -> Option<&Attachment> {
        self.attachment.as_ref().filter(|a| !a.maintenance)
    }

    /// The directory name of a replica of this volume on a disk.
    pub fn replica_dir(&self, id: ReplicaId) -> String {
        replica_dir(&self.name, &self.uid, id)
    }
}

/// See [`Volume::replica_dir`].
pub fn replica_dir(volume: &VolumeName, uid: &str, id: ReplicaId) -> String {
    format!("{volume}.{uid}.{id}")
}

/// What a process run by an agent is doing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum ProcessState {
    /// Started, not ready yet.
    Starting,
    Running {
        pid: u32,
    },
    /// Not running: why, and how many times it was restarted.
    Failed {
        error: String,
        restarts: u32,
    },
    /// Not started: what it waits for.
    Waiting {
        reason: String,
    },
    /// Asked to stop (an engine flushing its replicas), not gone yet.
    Stopping,
}

/// A replica as its agent reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaReport {
    pub volume: VolumeName,
    pub uid: String,
    pub id: ReplicaId,
    pub address: String,
    #[serde(flatten)]
    pub state: ProcessState,
}

/// An engine replica's mode, as the engine reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineReplica {
    pub id: ReplicaId,
    pub mode: String,
    /// Taken out of the set by the engine for being far slower than its
    /// peers: the controller replaces it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub evicted: bool,
}

/// An engine as its agent reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineReport {
    pub volume: VolumeName,
    pub uid: String,
    /// The attachment it serves.
    pub serial: u64,
    #[serde(flatten)]
    pub state: ProcessState,
    pub nbd: Option<String>,
    pub device: Option<String>,
    pub size: u64,
    pub replicas: Vec<EngineReplica>,
    /// The rebuild the engine runs, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuild: Option<RebuildProgress>,
    /// The backup the engine runs, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupProgress>,
}

/// How far an engine's backup has gone: bytes of the snapshot read, of
/// `to_read` (what changed since the previous backup), and uploaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupProgress {
    pub snapshot: String,
    pub read: u64,
    pub to_read: u64,
    pub uploaded: u64,
}

/// How far an engine's rebuild of one replica has gone: bytes of its
/// layers compared, of `total`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebuildProgress {
    pub replica: ReplicaId,
    pub scanned: u64,
    pub total: u64,
}

/// What runs on a node (`reports/NAME`), written by its agent under its
/// lease, so a dead node's report disappears with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub protocol: u32,
    pub node: NodeName,
    pub replicas: Vec<ReplicaReport>,
    pub engines: Vec<EngineReport>,
}

pub fn report_key(node: &NodeName) -> String {
    format!("{PREFIX}reports/{node}")
}

/// The cluster's protocol, in `version`.
#[derive(Debug, Serialize, Deserialize)]
struct Version {
    protocol: u32,
}

/// Joins this process to the cluster's protocol: the first controller or
/// agent writes it, every later one checks it, so a process of an
/// incompatible version refuses to start instead of misreading records
/// (each record names its protocol too, and one of another is ignored).
pub async fn check_version<S: crate::store::Store>(store: &S) -> Result<(), StoreError> {
    let key = format!("{PREFIX}version");
    loop {
        match store.get(&key).await? {
            Some(v) => {
                let theirs: Version = serde_json::from_slice(&v.value).map_err(|e| {
                    StoreError::Refused(format!("{key} holds no valid record: {e}"))
                })?;
                return if theirs.protocol == PROTOCOL {
                    Ok(())
                } else {
                    Err(StoreError::Refused(format!(
                        "this cluster runs rvol protocol {}, this process speaks {PROTOCOL}: \
                         run one version",
                        theirs.protocol
                    )))
                };
            }
            None => {
                let version = encode(&Version { protocol: PROTOCOL });
                match store
                    .put(&key, version, crate::store::Expect::Absent, None)
                    .await
                {
                    Err(StoreError::Conflict { .. }) => continue,
                    r => return r.map(drop),
                }
            }
        }
    }
}

/// Decodes a record of type `T` stored at `key`, refusing one written by
/// an incompatible version.
pub fn decode<T: serde::de::DeserializeOwned + HasProtocol>(
    key: &str,
    v: &Versioned,
) -> Result<T, StoreError> {
    let record: T = serde_json::from_slice(&v.value)
        .map_err(|e| StoreError::Refused(format!("{key} holds no valid record: {e}")))?;
    if record.protocol() != PROTOCOL {
        return Err(StoreError::Refused(format!(
            "{key} was written by rvol protocol {}, this is {PROTOCOL}: run one version",
            record.protocol()
        )));
    }
    Ok(record)
}

/// Encodes a record.
pub fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    // Records are plain data: serialising them cannot fail.
    serde_json::to_vec(record).unwrap_or_default()
}

pub trait HasProtocol {
    fn protocol(&self) -> u32;
}

macro_rules! has_protocol {
    ($($t:ty),*) => {
        $(impl HasProtocol for $t {
            fn protocol(&self) -> u32 {
                self.protocol
            }
        })*
    };
}
has_protocol!(Node, Volume, NodeSettings, Report, EngineCert);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_are_checked() {
        for good in ["n1", "node-a.zone_2", &"x".repeat(63)] {
            assert!(NodeName::new(good).is_ok(), "{good}");
        }
        for bad in ["", "a/b", "a b", "ä", &"x".repeat(64)] {
            assert!(NodeName::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_record_of_another_protocol_or_garbage_is_refused() {
        let node = Node {
            protocol: PROTOCOL + 1,
            name: NodeName::new("n1").unwrap(),
            address: "10.0.0.1:7000".into(),
            advertise: "10.0.0.1".into(),
            ports: PortRange {
                first: 10100,
                last: 10199,
            },
            zone: None,
            labels: BTreeMap::new(),
            disks: vec![],
            lease: 1,
        };
        let v = |value| Versioned {
            value,
            revision: crate::store::Revision(1),
        };
        let err = decode::<Node>("/rvol/nodes/n1", &v(encode(&node))).unwrap_err();
        assert!(err.to_string().contains("protocol 2"), "{err}");
        assert!(decode::<Node>("k", &v(b"{not json".to_vec())).is_err());
        let ok = Node {
            protocol: PROTOCOL,
            ..node
        };
        assert_eq!(decode::<Node>("k", &v(encode(&ok))).unwrap(), ok);
    }
}
