//! Purges that run beside writes, on other threads: the engine drives
//! `purge_step` in the background while its clients keep writing, trimming
//! and zeroing. No step may change what the head reads, whatever it races
//! with (see `rvol_replica::maintenance`): every write read back right
//! after it, and the whole volume after the race and after a reopen.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rvol_replica::{Replica, BLOCK_SIZE};

const BLOCKS: u64 = 512;

/// What a block may read as: one content, or (after a trim) its old
/// content or zeros.
#[derive(Clone, PartialEq)]
enum Expect {
    Is(u64),
    OldOrZero(u64),
}

/// Block content naming the write that made it (0 is zeros).
fn content(tag: u64, block: u64) -> Vec<u8> {
    if tag == 0 {
        return vec![0; BLOCK_SIZE as usize];
    }
    let mut b = vec![0u8; BLOCK_SIZE as usize];
    for (i, chunk) in b.chunks_mut(16).enumerate() {
        chunk[..8].copy_from_slice(&tag.to_le_bytes());
        chunk[8..].copy_from_slice(&(block ^ i as u64).to_le_bytes());
    }
    b
}

fn check(replica: &Replica, model: &[Expect], block: u64, count: u64, when: &str) {
    let got = replica
        .read(block * BLOCK_SIZE, count * BLOCK_SIZE)
        .unwrap_or_else(|e| panic!("{when}: read of blocks {block}+{count}: {e}"));
    for (i, data) in got.chunks(BLOCK_SIZE as usize).enumerate() {
        let b = block + i as u64;
        let ok = match model[b as usize] {
            Expect::Is(t) => data == content(t, b),
            Expect::OldOrZero(t) => data == content(t, b) || data == content(0, b),
        };
        assert!(ok, "{when}: block {b} reads wrong");
    }
}

#[test]
fn writes_racing_snapshot_removal_and_purge_read_back_right() {
    let dir = tempfile::tempdir().unwrap();
    let replica = Arc::new(Replica::create(dir.path(), BLOCKS * BLOCK_SIZE).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let failure = Arc::new(Mutex::new(None::<String>));
    // Snapshots taken, removed and purged, over and over.
    let maintenance = {
        let (replica, stop, failure) = (replica.clone(), stop.clone(), failure.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            let mut kept = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let step = (|| -> rvol_replica::Result<()> {
                    let name = format!("s{n}");
                    replica.snapshot(&name, true, Default::default())?;
                    kept.push(name);
                    n += 1;
                    // Keep zero to two snapshots; remove the oldest, or all.
                    while kept.len() > (n % 3) as usize {
                        replica.remove_snapshot(&kept.remove(0))?;
                    }
                    while replica.purge_step()?.is_some() {}
                    Ok(())
                })();
                if let Err(e) = step {
                    *failure.lock().unwrap() = Some(e.to_string());
                    return n;
                }
            }
            n
        })
    };
    let mut model = vec![Expect::Is(0); BLOCKS as usize];
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let deadline = Instant::now() + Duration::from_secs(4);
    let mut tag = 0;
    let mut ops = 0u64;
    while Instant::now() < deadline && failure.lock().unwrap().is_none() {
        let block = next() % BLOCKS;
        let count = (1 + next() % 8).min(BLOCKS - block);
        let (off, len) = (block * BLOCK_SIZE, count * BLOCK_SIZE);
        match next() % 8 {
            0 => {
                replica.trim(off, len, 0).unwrap();
                for b in block..block + count {
                    if let Expect::Is(t) = model[b as usize] {
                        model[b as usize] = Expect::OldOrZero(t);
                    }
                }
            }
            1 => {
                replica.write_zeroes(off, len, 0).unwrap();
                model[block as usize..(block + count) as usize].fill(Expect::Is(0));
            }
            _ => {
                tag += 1;
                let data: Vec<u8> = (block..block + count)
                    .flat_map(|b| content(tag, b))
                    .collect();
                replica.write(off, &data, 0).unwrap();
                model[block as usize..(block + count) as usize].fill(Expect::Is(tag));
            }
        }
        check(&replica, &model, block, count, &format!("op {ops}, right after it"));
        ops += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let rounds = maintenance.join().unwrap();
    if let Some(e) = failure.lock().unwrap().take() {
        panic!("maintenance failed: {e}");
    }
    println!("{ops} writes beside {rounds} snapshot-remove-purge rounds");
    assert!(rounds > 10 && ops > 1000, "too little raced to tell");
    check(&replica, &model, 0, BLOCKS, "after the race");
    // Trims are settled now: what the head reads is what it keeps.
    let settled = replica.read(0, BLOCKS * BLOCK_SIZE).unwrap();
    replica.flush().unwrap();
    drop(replica);
    let reopened = Replica::open(dir.path()).unwrap();
    assert!(
        reopened.read(0, BLOCKS * BLOCK_SIZE).unwrap() == settled,
        "the volume reads differently after a reopen"
    );
}
