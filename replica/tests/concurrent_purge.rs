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

/// The clients' side: random writes, trims and write-zeroes of up to 8
/// blocks, and what each block may read as after them.
struct Client {
    model: Vec<Expect>,
    rng: u64,
    tag: u64,
}

/// One client request: a trim, a write-zeroes, or a write of `data`.
struct Request {
    block: u64,
    count: u64,
    data: Option<Vec<u8>>,
    trim: bool,
}

impl Client {
    fn new(seed: u64) -> Client {
        Client {
            model: vec![Expect::Is(0); BLOCKS as usize],
            rng: seed,
            tag: 0,
        }
    }

    fn random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    /// Draws the next request and records what it does in the model.
    fn next(&mut self) -> Request {
        let block = self.random() % BLOCKS;
        let count = (1 + self.random() % 8).min(BLOCKS - block);
        let blocks = block as usize..(block + count) as usize;
        let (data, trim) = match self.random() % 8 {
            0 => {
                for e in &mut self.model[blocks] {
                    if let Expect::Is(t) = *e {
                        *e = Expect::OldOrZero(t);
                    }
                }
                (None, true)
            }
            1 => {
                self.model[blocks].fill(Expect::Is(0));
                (None, false)
            }
            _ => {
                self.tag += 1;
                self.model[blocks].fill(Expect::Is(self.tag));
                let data = (block..block + count).flat_map(|b| content(self.tag, b));
                (Some(data.collect()), false)
            }
        };
        Request {
            block,
            count,
            data,
            trim,
        }
    }
}

impl Request {
    fn apply(&self, replica: &Replica) {
        let (off, len) = (self.block * BLOCK_SIZE, self.count * BLOCK_SIZE);
        match (&self.data, self.trim) {
            (Some(data), _) => replica.write(off, data, 0),
            (None, true) => replica.trim(off, len, 0),
            (None, false) => replica.write_zeroes(off, len, 0),
        }
        .unwrap();
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
    let mut client = Client::new(0x2545_f491_4f6c_dd1d);
    let deadline = Instant::now() + Duration::from_secs(4);
    let mut ops = 0u64;
    while Instant::now() < deadline && failure.lock().unwrap().is_none() {
        let r = client.next();
        r.apply(&replica);
        let when = format!("op {ops}, right after it");
        check(&replica, &client.model, r.block, r.count, &when);
        ops += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let rounds = maintenance.join().unwrap();
    if let Some(e) = failure.lock().unwrap().take() {
        panic!("maintenance failed: {e}");
    }
    println!("{ops} writes beside {rounds} snapshot-remove-purge rounds");
    assert!(rounds > 5 && ops > 300, "too little raced to tell");
    check(&replica, &client.model, 0, BLOCKS, "after the race");
    // Trims are settled now: what the head reads is what it keeps.
    let settled = replica.read(0, BLOCKS * BLOCK_SIZE).unwrap();
    assert_reads_after_reopen(replica, dir.path(), &settled);
}

/// Flushes and closes `replica`, opens its directory again and checks the
/// volume reads `settled`.
fn assert_reads_after_reopen(replica: Arc<Replica>, dir: &std::path::Path, settled: &[u8]) {
    replica.flush().unwrap();
    drop(replica);
    let reopened = Replica::open(dir).unwrap();
    assert!(
        reopened.read(0, BLOCKS * BLOCK_SIZE).unwrap() == settled,
        "the volume reads differently after a reopen"
    );
}

/// Two replicas of one volume, written alike as an engine fans writes out,
/// while one drops out (misses writes) and is rebuilt from the other
/// online, as `rvol-engine`'s rebuild does it: a cut on both, the
/// source's chain below the head given to the joining one, every
/// differing block of every layer copied (a hole as a hole), the cut then
/// removed and purged on both. Snapshots come and go meanwhile. Both must
/// read what was written, and read alike, after every round and a reopen
/// (the chaos soak saw a replica rebuilt beside removed cuts read older
/// data once they were purged).
#[test]
fn a_replica_rebuilt_beside_writes_and_purges_reads_like_its_source() {
    use rvol_replica::store::ChecksumUnit;
    use std::sync::RwLock;

    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let open = |i: usize| Arc::new(Replica::create(dirs[i].path(), BLOCKS * BLOCK_SIZE).unwrap());
    let (src, dst) = (open(0), open(1));
    // Writers hold it shared; chain changes (cut, snapshot, removal) hold
    // it exclusive, as the engine's lock_all.
    let volume = Arc::new(RwLock::new(()));
    // 0: dst receives writes and may be read; 1: out (misses writes);
    // 2: joining (receives writes, not read).
    let dst_state = Arc::new(std::sync::atomic::AtomicU8::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let maintenance = {
        let (src, dst, volume, dst_state, stop) = (
            src.clone(),
            dst.clone(),
            volume.clone(),
            dst_state.clone(),
            stop.clone(),
        );
        std::thread::spawn(move || -> Result<u64, String> {
            let both = |f: &dyn Fn(&Replica) -> rvol_replica::Result<()>| -> Result<(), String> {
                let _all = volume.write().unwrap();
                f(&src).and_then(|()| f(&dst)).map_err(|e| e.to_string())
            };
            let purge = |r: &Replica| -> Result<(), String> {
                while r.purge_step().map_err(|e| e.to_string())?.is_some() {}
                Ok(())
            };
            let mut round = 0u64;
            let mut kept: Vec<String> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                round += 1;
                let snap = format!("s{round}");
                both(&|r| r.snapshot(&snap, true, Default::default()).map(drop))?;
                kept.push(snap);
                while kept.len() > (round % 3) as usize {
                    let gone = kept.remove(0);
                    both(&|r| r.remove_snapshot(&gone).map(drop))?;
                }
                purge(&src)?;
                purge(&dst)?;
                if round % 2 == 1 {
                    continue;
                }
                // dst misses writes for a while, then joins and is rebuilt.
                dst_state.store(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
                dst_state.store(2, Ordering::SeqCst);
                let cut = format!("rebuild-{round}");
                both(&|r| r.snapshot(&cut, false, Default::default()).map(drop))?;
                let chain = src.info().chain_below_head();
                dst.prepare_rebuild(&chain).map_err(|e| e.to_string())?;
                let len = BLOCKS * BLOCK_SIZE;
                for (layer, _) in &chain {
                    let sums = |r: &Replica| r.layer_checksums(layer, 0, len, ChecksumUnit::Block);
                    let theirs = sums(&src).map_err(|e| e.to_string())?;
                    let ours = sums(&dst).map_err(|e| e.to_string())?;
                    for (b, (t, o)) in theirs.iter().zip(&ours).enumerate() {
                        let at = b as u64 * BLOCK_SIZE;
                        let copied = match (t, o) {
                            (t, o) if t == o => Ok(()),
                            (Some(_), _) => src
                                .read_layer(layer, at, BLOCK_SIZE)
                                .and_then(|data| dst.write_layer(layer, at, &data)),
                            (None, _) => dst.punch_layer(layer, at, BLOCK_SIZE),
                        };
                        copied.map_err(|e| format!("copying block {b} of {layer}: {e}"))?;
                    }
                }
                dst.finish_rebuild(src.info().revision)
                    .map_err(|e| e.to_string())?;
                dst_state.store(0, Ordering::SeqCst);
                both(&|r| r.remove_snapshot(&cut).map(drop))?;
                purge(&src)?;
                purge(&dst)?;
            }
            Ok(round)
        })
    };
    let mut client = Client::new(0x9e37_79b9_7f4a_7c15);
    let deadline = Instant::now() + Duration::from_secs(4);
    let mut ops = 0u64;
    while Instant::now() < deadline && !maintenance.is_finished() {
        let r = client.next();
        let read_dst = {
            let _op = volume.read().unwrap();
            let state = dst_state.load(Ordering::SeqCst);
            r.apply(&src);
            if state != 1 {
                r.apply(&dst);
            }
            state == 0
        };
        let model = &client.model;
        check(&src, model, r.block, r.count, &format!("source, op {ops}"));
        if read_dst {
            check(&dst, model, r.block, r.count, &format!("rebuilt, op {ops}"));
        }
        ops += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let rounds = maintenance
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("maintenance failed: {e}"));
    println!(
        "{ops} writes beside {rounds} rounds ({} rebuilds)",
        rounds / 2
    );
    assert!(rounds > 5 && ops > 300, "too little raced to tell");
    assert_eq!(dst_state.load(Ordering::SeqCst), 0);
    check(&src, &client.model, 0, BLOCKS, "source, after the race");
    check(&dst, &client.model, 0, BLOCKS, "rebuilt, after the race");
    let settled = src.read(0, BLOCKS * BLOCK_SIZE).unwrap();
    assert!(
        dst.read(0, BLOCKS * BLOCK_SIZE).unwrap() == settled,
        "the replicas differ"
    );
    for (r, dir) in [(src, &dirs[0]), (dst, &dirs[1])] {
        assert_reads_after_reopen(r, dir.path(), &settled);
    }
}
