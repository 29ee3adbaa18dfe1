//! The records the control plane keeps in the store, and their keys.
//!
//! Everything lives under one prefix ([`PREFIX`]), one JSON record per
//! key: `nodes/NAME` is a node as its agent last reported it, written under
//! the agent's lease so that it disappears when the agent stops renewing
//! it. Every record names the [`PROTOCOL`] of the process that wrote it,
//! so a controller and agents of incompatible versions refuse each other
//! instead of misreading each other's records.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::store::{StoreError, Versioned};

/// The root of rvol's keys in the store.
pub const PREFIX: &str = "/rvol/";

/// The version of the records' meaning; raised on incompatible changes.
pub const PROTOCOL: u32 = 1;

/// A node's name: `[A-Za-z0-9._-]`, 1 to 63 characters (a DNS label, or
/// close to one, as Kubernetes node names are).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeName(String);

impl NodeName {
    pub fn new(name: &str) -> Result<NodeName, String> {
        let ok = !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if ok {
            Ok(NodeName(name.to_string()))
        } else {
            Err(format!(
                "{name:?} is not a node name (1-63 of A-Z a-z 0-9 . _ -)"
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// This node's key in the store.
    pub fn key(&self) -> String {
        format!("{PREFIX}nodes/{}", self.0)
    }
}

impl std::fmt::Display for NodeName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

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
    pub zone: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub disks: Vec<Disk>,
    /// The lease the record lives under: the agent's, which a restarted
    /// agent of the same node resumes while it still lives.
    pub lease: i64,
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

impl HasProtocol for Node {
    fn protocol(&self) -> u32 {
        self.protocol
    }
}

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
