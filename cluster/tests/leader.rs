//! Leadership among candidates on a real etcd: one leads, resigning hands
//! over at once, a silent leader is replaced once its lease expires, and a
//! leader cut off from etcd knows it lost before its lease could expire.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{store, Etcd};
use rvol_cluster::leader::Candidate;

const KEY: &str = "/rvol/leader";
const TTL: Duration = Duration::from_secs(3);

#[tokio::test]
async fn one_leads_and_the_next_takes_over_on_resignation_or_silence() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(dir.path());
    let s = Arc::new(store(&etcd).await);
    let candidates: Vec<Arc<Candidate<_>>> = ["c1", "c2", "c3"]
        .iter()
        .map(|id| Arc::new(Candidate::new(s.clone(), KEY, id, TTL)))
        .collect();

    let first = candidates[0].campaign().await.unwrap();
    assert_eq!(candidates[0].leader().await.unwrap().as_deref(), Some("c1"));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for c in &candidates[1..] {
        let (c, tx) = (c.clone(), tx.clone());
        tokio::spawn(async move {
            let leadership = c.campaign().await.unwrap();
            let _ = tx.send((c.leader().await.unwrap(), leadership));
        });
    }
    // Nobody else leads while c1 does.
    assert!(tokio::time::timeout(Duration::from_secs(2), rx.recv())
        .await
        .is_err());

    // Resigning hands over at once, to one of the two.
    let t = Instant::now();
    first.resign(s.as_ref()).await.unwrap();
    let (second_id, second) = rx.recv().await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    let second_id = second_id.unwrap();
    assert!(second_id == "c2" || second_id == "c3", "{second_id}");
    assert!(tokio::time::timeout(Duration::from_secs(1), rx.recv())
        .await
        .is_err());

    // A leader that falls silent (dropped, as if it crashed) is replaced
    // once its lease runs out, not before.
    let t = Instant::now();
    drop(second);
    let (third_id, _third) = tokio::time::timeout(TTL * 4, rx.recv())
        .await
        .expect("the last candidate leads within the lease's time")
        .unwrap();
    assert!(
        t.elapsed() >= TTL / 2,
        "took over after only {:?}",
        t.elapsed()
    );
    let third_id = third_id.unwrap();
    assert_ne!(third_id, second_id);
}

#[tokio::test]
async fn a_leader_cut_off_from_etcd_steps_down_within_its_lease() {
    let dir = tempfile::tempdir().unwrap();
    let mut etcd = Etcd::start(dir.path());
    let s = Arc::new(store(&etcd).await);
    let c = Candidate::new(s.clone(), KEY, "c1", TTL);
    let mut leading = c.campaign().await.unwrap();
    // Renewals keep it leading well past one lease.
    assert!(tokio::time::timeout(TTL * 2, leading.lost()).await.is_err());

    let t = Instant::now();
    etcd.kill();
    tokio::time::timeout(TTL * 2, leading.lost())
        .await
        .expect("it knows it lost");
    // Before the store could have let its lease expire.
    assert!(t.elapsed() < TTL, "stepped down after {:?}", t.elapsed());
}
