//! SIGKILL of a replica process in the middle of a snapshot cut and in the
//! middle of a purge, 20 rounds each: the chain opens every time, every
//! acknowledged write reads back, and every kept snapshot is still there.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::direct::*;
use common::{block_for, id_of, xorshift};
use futures::future::join_all;
use rvol_replica::client::ReplicaClient;
use rvol_replica::BLOCK_SIZE;

const BLOCKS: u64 = 8192; // 32 MiB
const CHUNK: u64 = 256; // blocks per verification read (1 MiB)

/// Writes 1024 random blocks (4 MiB) and flushes; records them in `model`.
async fn write_round(
    c: &ReplicaClient,
    model: &mut HashMap<u64, u64>,
    next_id: &mut u64,
    rand: &mut impl FnMut() -> u64,
) {
    for _ in 0..16 {
        let writes: Vec<(u64, u64)> = (0..64)
            .map(|_| {
                *next_id += 1;
                (rand() % BLOCKS, *next_id)
            })
            .collect::<HashMap<_, _>>()
            .into_iter()
            .collect();
        let results = join_all(
            writes
                .iter()
                .map(|&(b, id)| c.write(b * BLOCK_SIZE, Bytes::from(block_for(id, b)), false, 0)),
        )
        .await;
        for (&(b, id), r) in writes.iter().zip(results) {
            r.unwrap();
            model.insert(b, id);
        }
    }
    c.flush().await.unwrap();
}

async fn verify(c: &ReplicaClient, model: &HashMap<u64, u64>, round: u64) {
    let reads =
        join_all((0..BLOCKS / CHUNK).map(|i| c.read(i * CHUNK * BLOCK_SIZE, CHUNK * BLOCK_SIZE)))
            .await;
    for (i, data) in reads.into_iter().enumerate() {
        let data = data.unwrap();
        for (j, block) in data.chunks(BLOCK_SIZE as usize).enumerate() {
            let b = i as u64 * CHUNK + j as u64;
            assert_eq!(
                id_of(block, b),
                model.get(&b).copied(),
                "round {round}: block {b}"
            );
        }
    }
}

fn snapshot_names(chain: &[rvol_replica::store::LayerInfo], removed: bool) -> Vec<String> {
    chain
        .iter()
        .filter(|l| l.removed == removed)
        .filter_map(|l| {
            l.name
                .strip_prefix("volume-snap-")?
                .strip_suffix(".img")
                .map(String::from)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_snapshot_create_and_purge_keeps_chain_and_data() {
    let tmp = tempfile::tempdir().unwrap();
    let ep = sock(tmp.path());
    let mut model: HashMap<u64, u64> = HashMap::new();
    let mut kept: Vec<String> = Vec::new();
    let mut next_id = 0u64;
    let mut rand = xorshift(0xc0ffee_u64);
    let mut p = start_replica(tmp.path(), &ep, "32M");
    // Longest a purge took when the kill came too late; kills are drawn
    // below it, so most land mid-purge.
    let mut purge_window = Duration::from_millis(300);
    let (mut cut_mid_purge, mut cut_mid_snapshot) = (0, 0);
    for round in 1..=40u64 {
        let c = connect(&ep, round, round).await.unwrap();
        write_round(&c, &mut model, &mut next_id, &mut rand).await;
        let name = format!("r{round}");
        if round % 2 == 1 {
            // Kill during a snapshot cut.
            let delay = Duration::from_micros(rand() % 4000);
            let killer = tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                p.kill9();
            });
            let r = c.snapshot(&name, true, &Default::default()).await;
            if r.is_ok() {
                kept.push(name.clone());
            } else {
                cut_mid_snapshot += 1;
            }
            killer.await.unwrap();
            p = start_replica(tmp.path(), &ep, "32M");
            let c = connect(&ep, round, round).await.unwrap();
            let chain = c.info().await.unwrap().chain;
            let names = snapshot_names(&chain, false);
            // A cut cut short may or may not have happened, never half.
            if r.is_err() && names.last() == Some(&name) {
                kept.push(name);
            }
            assert_eq!(names, kept, "round {round}: kept snapshots");
            verify(&c, &model, round).await;
        } else {
            // Kill during a purge: fold the oldest kept snapshot into the
            // newer one, with 4 MiB written between them.
            c.snapshot(&name, true, &Default::default()).await.unwrap();
            kept.push(name);
            write_round(&c, &mut model, &mut next_id, &mut rand).await;
            let gone = kept.remove(0);
            assert!(c.remove_snapshot(&gone).await.unwrap());
            let delay = purge_window.mul_f64((rand() % 1000) as f64 / 1000.0);
            let killer = tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                p.kill9();
            });
            let started = Instant::now();
            let finished = loop {
                match c.purge_step().await {
                    Ok(Some(_)) => {}
                    Ok(None) => break true,
                    Err(_) => break false,
                }
            };
            if finished {
                purge_window = started.elapsed();
            } else {
                cut_mid_purge += 1;
            }
            killer.await.unwrap();
            p = start_replica(tmp.path(), &ep, "32M");
            let c = connect(&ep, round, round).await.unwrap();
            let chain = c.info().await.unwrap().chain;
            assert_eq!(snapshot_names(&chain, false), kept, "round {round}");
            // The removal was acknowledged: the layer is removed or gone.
            assert!(
                !snapshot_names(&chain, false).contains(&gone),
                "round {round}: {gone} came back"
            );
            verify(&c, &model, round).await;
            // The purge picks up where it was cut off.
            while c.purge_step().await.unwrap().is_some() {}
            let chain = c.info().await.unwrap().chain;
            assert!(
                snapshot_names(&chain, true).len() <= 1,
                "round {round}: {chain:?}"
            );
            verify(&c, &model, round).await;
        }
    }
    println!(
        "kills mid-purge: {cut_mid_purge}/20, mid-snapshot (unacknowledged): {cut_mid_snapshot}/20"
    );
    assert!(
        cut_mid_purge >= 5,
        "only {cut_mid_purge} of 20 kills landed during a purge"
    );
}
