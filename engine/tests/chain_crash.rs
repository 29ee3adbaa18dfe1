//! SIGKILL of a replica process in the middle of changes to its chain, 20
//! rounds of each: a snapshot cut, a purge, a revert and an expansion. The
//! chain opens every time, every acknowledged write reads back, every kept
//! snapshot is still there, and a change cut short happened entirely or
//! not at all: a revert shows the snapshot or the head it replaces, never
//! a mix; an expansion leaves the old size or the new one.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::direct::*;
use common::{block_for, id_of, xorshift, Proc};
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

/// What each of the first `blocks` blocks holds: the id of its write, or
/// `None` for zeros.
async fn view(c: &ReplicaClient, blocks: u64) -> Vec<Option<u64>> {
    let reads = join_all((0..blocks.div_ceil(CHUNK)).map(|i| {
        let len = CHUNK.min(blocks - i * CHUNK);
        c.read(i * CHUNK * BLOCK_SIZE, len * BLOCK_SIZE)
    }))
    .await;
    let mut ids = Vec::with_capacity(blocks as usize);
    for data in reads {
        for block in data.unwrap().chunks(BLOCK_SIZE as usize) {
            ids.push(id_of(block, ids.len() as u64));
        }
    }
    ids
}

fn expected(model: &HashMap<u64, u64>, blocks: u64) -> Vec<Option<u64>> {
    (0..blocks).map(|b| model.get(&b).copied()).collect()
}

async fn verify(c: &ReplicaClient, model: &HashMap<u64, u64>, round: u64) {
    let got = view(c, BLOCKS).await;
    for (b, (got, want)) in got.iter().zip(expected(model, BLOCKS)).enumerate() {
        assert_eq!(*got, want, "round {round}: block {b}");
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

/// Kills the replica process while `op` runs, after a delay drawn
/// log-uniformly below `window`, and returns whether `op` was
/// acknowledged. `window` becomes how long `op` took when the kill came
/// too late; the log scale spreads the kills over the op's first
/// milliseconds (where a revert or expansion does its work) as well as over
/// its tail.
async fn kill_during<T, E>(
    mut p: Proc,
    window: &mut Duration,
    rand: &mut impl FnMut() -> u64,
    op: impl std::future::Future<Output = Result<T, E>>,
) -> bool {
    let delay = window.div_f64(2f64.powf((rand() % 8000) as f64 / 1000.0));
    let killer = tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        p.kill9();
    });
    let started = Instant::now();
    let acknowledged = op.await.is_ok();
    if acknowledged {
        *window = started.elapsed();
    }
    killer.await.unwrap();
    acknowledged
}

/// What `replica.json` records, the chain and the size, and the length of
/// every layer file, as a kill left them.
fn on_disk(dir: &Path) -> (Vec<String>, u64, Vec<(String, u64)>) {
    let data = dir.join("data");
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join("replica.json")).unwrap()).unwrap();
    let chain = meta["chain"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect();
    let layers = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap())
        .filter_map(|e| {
            let name = e.file_name().into_string().unwrap();
            name.ends_with(".img")
                .then(|| (name, e.metadata().unwrap().len()))
        })
        .collect();
    (chain, meta["size"].as_u64().unwrap(), layers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_revert_and_expansion_applies_all_or_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let ep = sock(tmp.path());
    let mut model: HashMap<u64, u64> = HashMap::new();
    let mut next_id = 0u64;
    let mut rand = xorshift(0x5eed_u64);
    let mut p = start_replica(tmp.path(), &ep, "32M");
    let mut blocks = BLOCKS;
    let mut revert_window = Duration::from_millis(20);
    let mut expand_window = Duration::from_millis(20);
    // Kills that left a change half done on disk: a new head file the
    // unchanged chain does not name, layer files longer than the recorded
    // size.
    let (mut mid_revert, mut mid_expand) = (0, 0);
    for round in 1..=40u64 {
        let c = connect(&ep, round, round).await.unwrap();
        write_round(&c, &mut model, &mut next_id, &mut rand).await;
        if round % 2 == 1 {
            // Kill during a revert to a snapshot with 4 MiB written since.
            let name = format!("r{round}");
            c.snapshot(&name, true, &Default::default()).await.unwrap();
            let at_snapshot = model.clone();
            write_round(&c, &mut model, &mut next_id, &mut rand).await;
            let (before, _, _) = on_disk(tmp.path());
            let acknowledged = kill_during(p, &mut revert_window, &mut rand, c.revert(&name)).await;
            let (chain, _, layers) = on_disk(tmp.path());
            let stray = layers.iter().any(|(l, _)| !chain.contains(l));
            mid_revert += u32::from(chain == before && stray);
            p = start_replica(tmp.path(), &ep, "32M");
            let c = connect(&ep, round, round).await.unwrap();
            let got = view(&c, blocks).await;
            let reverted = got == expected(&at_snapshot, blocks);
            assert!(
                reverted || (!acknowledged && got == expected(&model, blocks)),
                "round {round}: after a revert {} the replica shows neither the \
                 snapshot nor the head it replaces",
                if acknowledged {
                    "acknowledged"
                } else {
                    "cut short"
                }
            );
            if !reverted {
                c.revert(&name).await.unwrap();
            }
            model = at_snapshot;
            verify(&c, &model, round).await;
        } else {
            // Kill during an expansion by 4 MiB.
            let (size, new_size) = (blocks * BLOCK_SIZE, (blocks + 1024) * BLOCK_SIZE);
            let acknowledged =
                kill_during(p, &mut expand_window, &mut rand, c.expand(new_size)).await;
            let (_, recorded, layers) = on_disk(tmp.path());
            mid_expand += u32::from(recorded == size && layers.iter().any(|&(_, len)| len > size));
            p = start_replica(tmp.path(), &ep, "32M");
            let c = connect(&ep, round, round).await.unwrap();
            let now = c.info().await.unwrap().size;
            assert!(
                now == new_size || (!acknowledged && now == size),
                "round {round}: size {now} after an expansion from {size} to {new_size} {}",
                if acknowledged {
                    "acknowledged"
                } else {
                    "cut short"
                }
            );
            if now != new_size {
                c.expand(new_size).await.unwrap();
            }
            // The new tail reads as zeros and takes writes.
            let tail = blocks + rand() % 1024;
            next_id += 1;
            let data = Bytes::from(block_for(next_id, tail));
            c.write(tail * BLOCK_SIZE, data, false, 0).await.unwrap();
            model.insert(tail, next_id);
            blocks += 1024;
            assert_eq!(
                view(&c, blocks).await,
                expected(&model, blocks),
                "round {round}"
            );
        }
    }
    println!(
        "kills that left a change half done: {mid_revert}/20 reverts, {mid_expand}/20 expansions"
    );
    assert!(
        mid_revert >= 1 && mid_expand >= 1,
        "no kill landed mid-change: {mid_revert} reverts, {mid_expand} expansions of 20"
    );
}
