//! An agent's node registration on a real etcd: the record and its disks,
//! one live agent per name, a crashed agent resuming its own lease, and a
//! dead agent's name freed once its lease runs out.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{store, Etcd};
use rvol_cluster::agent::{AgentConfig, AgentError, Registration};
use rvol_cluster::etcd::EtcdStore;
use rvol_cluster::model::{decode, Node, NodeName};
use rvol_cluster::store::Store;

const TTL: Duration = Duration::from_secs(3);

fn config(node: &str, disk: &Path, address: &str) -> AgentConfig {
    std::fs::create_dir_all(disk).unwrap();
    AgentConfig {
        node: NodeName::new(node).unwrap(),
        address: address.into(),
        advertise: "10.0.0.1".into(),
        ports: "10100-10199".parse().unwrap(),
        zone: Some("z1".into()),
        labels: BTreeMap::from([("rack".to_string(), "r7".to_string())]),
        disks: vec![disk.to_path_buf()],
        ttl: TTL,
        tls: None,
        keys_dir: disk.join("keys"),
        rebuild_rate_mib: 0.0,
        evict_slow_replicas: None,
    }
}

async fn record(s: &EtcdStore, node: &str) -> Option<Node> {
    let key = NodeName::new(node).unwrap().key();
    let v = s.get(&key).await.unwrap()?;
    Some(decode(&key, &v).unwrap())
}

#[tokio::test]
async fn one_live_agent_per_node_and_a_crashed_one_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&dir.path().join("etcd"));
    let s = Arc::new(store(&etcd).await);
    let disk = dir.path().join("disk-a");

    let first = Registration::register(s.clone(), config("n1", &disk, "10.0.0.1:7000"))
        .await
        .unwrap();
    let n = record(&s, "n1").await.expect("the node is registered");
    assert_eq!(n.address, "10.0.0.1:7000");
    assert_eq!(
        (n.zone.as_deref(), n.labels["rack"].as_str()),
        (Some("z1"), "r7")
    );
    assert_eq!(n.disks.len(), 1);
    assert!(n.disks[0].capacity_bytes > 0 && n.disks[0].free_bytes <= n.disks[0].capacity_bytes);
    assert_eq!(n.lease, first.lease().0);

    // Another agent (its own disk, so not the same process) is refused.
    let other = dir.path().join("disk-b");
    match Registration::register(s.clone(), config("n1", &other, "10.0.0.2:7000")).await {
        Err(AgentError::NameTaken { address, .. }) => assert_eq!(address, "10.0.0.1:7000"),
        other => panic!("{:?}", other.map(|r| r.lease())),
    }
    assert_eq!(record(&s, "n1").await.unwrap().address, "10.0.0.1:7000");

    // The agent crashes (stops renewing) and is restarted at once: it
    // resumes its own lease instead of being refused.
    let lease = first.lease();
    drop(first);
    let again = Registration::register(s.clone(), config("n1", &disk, "10.0.0.1:7000"))
        .await
        .expect("a restarted agent resumes its registration");
    assert_eq!(again.lease(), lease);

    // It dies for good: its name is free once the lease runs out.
    drop(again);
    let t = Instant::now();
    while record(&s, "n1").await.is_some() {
        assert!(t.elapsed() < TTL * 4, "the record outlived its lease");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let taken = Registration::register(s.clone(), config("n1", &other, "10.0.0.2:7000"))
        .await
        .unwrap();
    assert_eq!(record(&s, "n1").await.unwrap().lease, taken.lease().0);
}

#[tokio::test]
async fn a_heartbeat_keeps_the_node_registered_and_stops_when_the_name_is_taken() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&dir.path().join("etcd"));
    let s = Arc::new(store(&etcd).await);
    let disk = dir.path().join("disk");
    let mut reg = Registration::register(s.clone(), config("n2", &disk, "a:1"))
        .await
        .unwrap();
    for _ in 0..6 {
        tokio::time::sleep(TTL / 3).await;
        reg.beat().await.unwrap();
    }
    assert!(record(&s, "n2").await.is_some(), "gone after two leases");

    // Someone replaces the record behind its back: the next beat stops.
    let key = NodeName::new("n2").unwrap().key();
    let mut forged = record(&s, "n2").await.unwrap();
    forged.address = "elsewhere:1".into();
    s.put(
        &key,
        serde_json::to_vec(&forged).unwrap(),
        rvol_cluster::store::Expect::Anything,
        None,
    )
    .await
    .unwrap();
    assert!(matches!(reg.beat().await, Err(AgentError::Store(_))));
    assert_eq!(record(&s, "n2").await.unwrap().address, "elsewhere:1");
}
