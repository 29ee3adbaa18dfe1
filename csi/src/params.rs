//! StorageClass parameters, with Longhorn's names where they mean the same
//! thing, so that its users' StorageClasses need few edits:
//!
//! | parameter | meaning | default |
//! |---|---|---|
//! | `numberOfReplicas` | replicas, 1 to 5 | 3 |
//! | `staleReplicaTimeout` | minutes a replica's node may be away before the replica is replaced | the controller's wait |
//! | `zoneAntiAffinity` | `soft` or `hard` | `soft` |
//! | `dataLocality` | `disabled`, `best-effort` or `strict-local` | `disabled` |
//! | `nodeSelector` | `key=value[,key=value...]`: only nodes with these labels | none |
//! | `fsType`, `csi.storage.k8s.io/fstype` | `ext4` or `xfs` | `ext4` |
//! | `encrypted` | `true`: encrypted at rest with the key in the Secret that `csi.storage.k8s.io/node-stage-secret-name` and `-namespace` name (its `CRYPTO_KEY_VALUE`, as Longhorn's) | `false` |
//!
//! Other `csi.storage.k8s.io/` keys (the provisioner's metadata) are
//! accepted and ignored; any other key is refused, so a typo is an error
//! rather than a silently different volume.

use std::collections::{BTreeMap, HashMap};

/// What the parameters ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    pub replicas: usize,
    pub replenish_wait_secs: Option<u64>,
    pub zone_anti_affinity: String,
    pub data_locality: String,
    pub node_selector: BTreeMap<String, String>,
    pub fs_type: String,
    pub encrypted: bool,
}

pub const FS_TYPES: [&str; 2] = ["ext4", "xfs"];

pub fn parse(params: &HashMap<String, String>) -> Result<Params, String> {
    let mut p = Params {
        replicas: 3,
        replenish_wait_secs: None,
        zone_anti_affinity: "soft".into(),
        data_locality: "disabled".into(),
        node_selector: BTreeMap::new(),
        fs_type: "ext4".into(),
        encrypted: false,
    };
    let mut keys: Vec<&String> = params.keys().collect();
    keys.sort();
    for key in keys {
        let value = params[key].trim();
        let bad = |what: &str| format!("parameter {key}={value:?}: {what}");
        match key.as_str() {
            "numberOfReplicas" => {
                p.replicas = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=5).contains(n))
                    .ok_or_else(|| bad("a number of replicas from 1 to 5"))?
            }
            "staleReplicaTimeout" => {
                let minutes: u64 = value.parse().map_err(|_| bad("minutes, a whole number"))?;
                p.replenish_wait_secs = Some(minutes * 60);
            }
            "zoneAntiAffinity" => match value {
                "soft" | "hard" => p.zone_anti_affinity = value.into(),
                _ => return Err(bad("soft or hard")),
            },
            "dataLocality" => match value {
                "disabled" | "best-effort" | "strict-local" => p.data_locality = value.into(),
                _ => return Err(bad("disabled, best-effort or strict-local")),
            },
            "nodeSelector" => {
                for pair in value.split(',').filter(|s| !s.trim().is_empty()) {
                    let (k, v) = pair
                        .split_once('=')
                        .filter(|(k, _)| !k.trim().is_empty())
                        .ok_or_else(|| bad("key=value pairs, comma-separated"))?;
                    p.node_selector.insert(k.trim().into(), v.trim().into());
                }
            }
            "fsType" | "csi.storage.k8s.io/fstype" => {
                if !FS_TYPES.contains(&value) {
                    return Err(bad("ext4 or xfs"));
                }
                p.fs_type = value.into();
            }
            "encrypted" => {
                p.encrypted = value.parse().map_err(|_| bad("true or false"))?;
            }
            k if k.starts_with("csi.storage.k8s.io/") => {}
            _ => return Err(format!("unknown parameter {key:?}")),
        }
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn longhorn_names_map_and_unknown_ones_are_refused() {
        let p = parse(&map(&[
            ("numberOfReplicas", "2"),
            ("staleReplicaTimeout", "30"),
            ("zoneAntiAffinity", "hard"),
            ("dataLocality", "best-effort"),
            ("nodeSelector", "tier=ssd, rack=r1"),
            ("csi.storage.k8s.io/fstype", "xfs"),
            ("csi.storage.k8s.io/pvc/name", "data"),
            ("encrypted", "true"),
            ("csi.storage.k8s.io/node-stage-secret-name", "key"),
        ]))
        .unwrap();
        assert!(p.encrypted);
        assert_eq!(p.replicas, 2);
        assert_eq!(p.replenish_wait_secs, Some(1800));
        assert_eq!(
            (p.zone_anti_affinity.as_str(), p.data_locality.as_str()),
            ("hard", "best-effort")
        );
        assert_eq!(p.node_selector.len(), 2);
        assert_eq!(p.fs_type, "xfs");
        assert_eq!(parse(&map(&[])).unwrap().replicas, 3);
        assert!(!parse(&map(&[])).unwrap().encrypted);
        for bad in [
            ("numberOfReplicas", "0"),
            ("numberOfReplicas", "six"),
            ("staleReplicaTimeout", "-1"),
            ("zoneAntiAffinity", "maybe"),
            ("fsType", "btrfs"),
            ("nodeSelector", "=x"),
            ("replicas", "3"),
            ("encrypted", "yes"),
        ] {
            assert!(parse(&map(&[bad])).is_err(), "{bad:?}");
        }
    }
}
