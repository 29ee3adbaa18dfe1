//! Model-based test: random write / trim / write-zeroes / flush / reopen /
//! snapshot / remove / purge / revert / expand sequences against an
//! in-memory model of the volume and of every snapshot's view.

use proptest::prelude::*;
use rvol_replica::{Replica, BLOCK_SIZE};

const BLOCKS: u64 = 96;
const SIZE: u64 = BLOCKS * BLOCK_SIZE;

#[derive(Debug, Clone)]
enum Op {
    Write {
        block: u64,
        count: u64,
        seed: u8,
    },
    Trim {
        block: u64,
        count: u64,
    },
    WriteZeroes {
        block: u64,
        count: u64,
    },
    Flush,
    Reopen {
        clean: bool,
    },
    Read {
        block: u64,
        count: u64,
    },
    Snapshot,
    /// Remove the n-th kept snapshot (modulo their number).
    Remove {
        nth: usize,
    },
    /// Purge steps, or a purge to the end when `steps` is 0.
    Purge {
        steps: usize,
    },
    /// Revert to the n-th kept snapshot.
    Revert {
        nth: usize,
    },
    Expand {
        blocks: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let range = (0..BLOCKS).prop_flat_map(|b| (Just(b), 1..=(BLOCKS - b).min(16)));
    prop_oneof![
        6 => (range.clone(), any::<u8>()).prop_map(|((block, count), seed)| Op::Write { block, count, seed }),
        2 => range.clone().prop_map(|(block, count)| Op::Trim { block, count }),
        2 => range.clone().prop_map(|(block, count)| Op::WriteZeroes { block, count }),
        1 => Just(Op::Flush),
        1 => any::<bool>().prop_map(|clean| Op::Reopen { clean }),
        3 => range.prop_map(|(block, count)| Op::Read { block, count }),
        2 => Just(Op::Snapshot),
        2 => any::<usize>().prop_map(|nth| Op::Remove { nth }),
        2 => (0..4usize).prop_map(|steps| Op::Purge { steps }),
        1 => any::<usize>().prop_map(|nth| Op::Revert { nth }),
        1 => (1..8u64).prop_map(|blocks| Op::Expand { blocks }),
    ]
}

fn pattern(seed: u8, block: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i as u64 ^ block) as u8) | 1)
        .collect()
}

/// A snapshot as the model sees it: its name, its view, and whether it
/// was removed.
struct ModelSnapshot {
    name: String,
    view: Vec<u8>,
    removed: bool,
}

fn kept(snaps: &[ModelSnapshot]) -> Vec<usize> {
    (0..snaps.len()).filter(|&i| !snaps[i].removed).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn replica_matches_model(ops in proptest::collection::vec(op(), 1..80)) {
        let dir = tempfile::tempdir().unwrap();
        let mut replica = Replica::create(dir.path(), SIZE).unwrap();
        let mut model = vec![0u8; SIZE as usize];
        let mut snaps: Vec<ModelSnapshot> = Vec::new();
        let mut revision = 0u64;
        // A new replica is clean; any modification makes it dirty until
        // the next clean shutdown.
        let mut clean_now = true;
        let mut taken = 0;
        for op in ops {
            if matches!(op, Op::Write { .. } | Op::Trim { .. } | Op::WriteZeroes { .. }) {
                clean_now = false;
            }
            match op {
                Op::Write { block, count, seed } => {
                    let data = pattern(seed, block, (count * BLOCK_SIZE) as usize);
                    replica.write(block * BLOCK_SIZE, &data, 0).unwrap();
                    let at = (block * BLOCK_SIZE) as usize;
                    model[at..at + data.len()].copy_from_slice(&data);
                    revision += 1;
                }
                Op::Trim { block, count } | Op::WriteZeroes { block, count } => {
                    let (off, len) = (block * BLOCK_SIZE, count * BLOCK_SIZE);
                    let trim = matches!(op, Op::Trim { .. });
                    if trim {
                        replica.trim(off, len, 0).unwrap();
                    } else {
                        replica.write_zeroes(off, len, 0).unwrap();
                    }
                    // Write-zeroes always reads back as zeros; trim does
                    // only while no kept snapshot lies below the head.
                    if !trim || kept(&snaps).is_empty() {
                        model[off as usize..(off + len) as usize].fill(0);
                    }
                    revision += 1;
                }
                Op::Snapshot => {
                    taken += 1;
                    let name = format!("s{taken}");
                    replica.snapshot(&name, true, Default::default()).unwrap();
                    snaps.push(ModelSnapshot { name, view: model.clone(), removed: false });
                    prop_assert_eq!(replica.info().chain.len(), snaps.len() + 1);
                }
                Op::Remove { nth } => {
                    let kept = kept(&snaps);
                    if kept.is_empty() {
                        prop_assert!(replica.remove_snapshot("nosuch").is_err());
                        continue;
                    }
                    let s = &mut snaps[kept[nth % kept.len()]];
                    prop_assert!(replica.remove_snapshot(&s.name).unwrap());
                    prop_assert!(!replica.remove_snapshot(&s.name).unwrap(), "removing twice");
                    s.removed = true;
                }
                Op::Purge { steps } => {
                    let mut n = 0;
                    while steps == 0 || n < steps {
                        if replica.purge_step().unwrap().is_none() {
                            break;
                        }
                        n += 1;
                        prop_assert!(n < 10_000, "purge does not end");
                    }
                    // The chain in the replica keeps every kept snapshot, in order.
                    let chain = replica.info().chain;
                    let names: Vec<String> = chain.iter().filter(|l| !l.removed)
                        .filter_map(|l| l.name.strip_prefix("volume-snap-")?.strip_suffix(".img").map(String::from))
                        .collect();
                    let want: Vec<String> = kept(&snaps).iter().map(|&i| snaps[i].name.clone()).collect();
                    prop_assert_eq!(&names, &want);
                    if steps == 0 {
                        // A finished purge leaves at most the removed layer
                        // directly below the head, holding visible data.
                        let removed: Vec<usize> = (0..chain.len()).filter(|&i| chain[i].removed).collect();
                        prop_assert!(removed.is_empty() || removed == vec![chain.len() - 2],
                            "removed layers left: {:?}", removed);
                    }
                    // The model keeps removed snapshots only for their order.
                    let live: Vec<String> = chain.iter().filter_map(|l| l.name.strip_prefix("volume-snap-")?.strip_suffix(".img").map(String::from)).collect();
                    snaps.retain(|s| live.contains(&s.name));
                }
                Op::Revert { nth } => {
                    let kept = kept(&snaps);
                    if kept.is_empty() {
                        continue;
                    }
                    let i = kept[nth % kept.len()];
                    let newer_kept = snaps[i + 1..].iter().any(|s| !s.removed);
                    let before = replica.info().chain;
                    match replica.revert(&snaps[i].name) {
                        Ok(()) => {
                            prop_assert!(!newer_kept, "reverted past a kept snapshot");
                            model = snaps[i].view.clone();
                            snaps.truncate(i + 1);
                            revision += 1;
                            clean_now = false;
                        }
                        Err(e) => {
                            prop_assert!(newer_kept, "revert failed: {}", e);
                            prop_assert_eq!(replica.info().chain, before);
                        }
                    }
                }
                Op::Expand { blocks } => {
                    let size = model.len() as u64 + blocks * BLOCK_SIZE;
                    replica.expand(size).unwrap();
                    prop_assert!(replica.expand(size - BLOCK_SIZE).is_err(), "shrinking");
                    model.resize(size as usize, 0);
                    for s in &mut snaps {
                        s.view.resize(size as usize, 0);
                    }
                    prop_assert_eq!(replica.size(), size);
                }
                Op::Flush => {
                    prop_assert_eq!(replica.flush().unwrap().0, revision);
                }
                Op::Reopen { clean } => {
                    if clean {
                        replica.mark_clean().unwrap();
                        clean_now = true;
                    } else {
                        replica.flush().unwrap();
                    }
                    drop(replica);
                    replica = Replica::open(dir.path()).unwrap();
                    let info = replica.info();
                    prop_assert_eq!(info.revision.0, revision);
                    prop_assert_eq!(info.clean, clean_now);
                    prop_assert_eq!(info.size, model.len() as u64);
                }
                Op::Read { block, count } => {
                    let (got, crc) = replica.read_with_crc(block * BLOCK_SIZE, count * BLOCK_SIZE).unwrap();
                    let at = (block * BLOCK_SIZE) as usize;
                    prop_assert!(got == model[at..at + got.len()], "read mismatch at block {}", block);
                    // The crc a reply is sealed with, derived from block crcs and holes.
                    prop_assert_eq!(crc, rvol_replica::crc::of(&got));
                }
            }
        }
        prop_assert!(replica.read(0, model.len() as u64).unwrap() == model, "final contents differ");
        // Allocation agrees with the model's non-zero blocks being data.
        for (i, chunk) in model.chunks(BLOCK_SIZE as usize).enumerate() {
            let alloc = replica.allocation(i as u64 * BLOCK_SIZE, BLOCK_SIZE).unwrap();
            if chunk.iter().any(|&b| b != 0) {
                prop_assert_eq!(alloc, vec![(BLOCK_SIZE, true)]);
            }
        }
        // Every kept snapshot's view reads as it was cut, and the layers
        // between two kept snapshots cover every block where they differ
        // (what an incremental backup relies on).
        let file = |s: &ModelSnapshot| format!("volume-snap-{}.img", s.name);
        let size = model.len() as u64;
        let mut older: Option<&ModelSnapshot> = None;
        for s in snaps.iter().filter(|s| !s.removed) {
            let view = replica.read_snapshot(&file(s), 0, size).unwrap();
            prop_assert!(view == s.view, "the view of {} reads differently", s.name);
            let runs = replica.snapshot_extents(&file(s), older.map(file).as_deref(), 0, size).unwrap();
            let mut at = 0usize;
            for (len, data) in runs {
                let (from, to) = (at, at + len as usize);
                let same = match older {
                    Some(o) => o.view[from..to] == s.view[from..to],
                    None => s.view[from..to].iter().all(|&b| b == 0),
                };
                prop_assert!(data || same, "{}: bytes {}..{} changed outside the extents", s.name, from, to);
                at = to;
            }
            prop_assert_eq!(at as u64, size);
            older = Some(s);
        }
        // Every kept snapshot still reads as it was cut: revert to each,
        // newest first (removing the newer ones on the way).
        for i in (0..snaps.len()).rev() {
            if snaps[i].removed {
                continue;
            }
            replica.revert(&snaps[i].name).unwrap();
            prop_assert!(replica.read(0, model.len() as u64).unwrap() == snaps[i].view,
                "snapshot {} reads differently", snaps[i].name);
            replica.remove_snapshot(&snaps[i].name).unwrap();
        }
    }
}

#[test]
fn out_of_range_and_unaligned_io_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let r = Replica::create(dir.path(), SIZE).unwrap();
    r.write(0, &[7u8; 4096], 0).unwrap();
    for (off, len) in [
        (SIZE, 4096),
        (SIZE - 4096, 8192),
        (512, 4096),
        (0, 100),
        (u64::MAX - 4095, 4096),
    ] {
        assert!(r.read(off, len).is_err(), "read {off}+{len}");
        assert!(r.trim(off, len, 0).is_err());
        assert!(r.write_zeroes(off, len, 0).is_err());
    }
    assert!(r.write(SIZE, &[1u8; 4096], 0).is_err());
    assert!(r.write(100, &[1u8; 4096], 0).is_err());
    assert_eq!(r.info().revision.0, 1);
    assert_eq!(r.read(0, 4096).unwrap(), vec![7u8; 4096]);
}

#[test]
fn a_replica_directory_is_opened_by_one_holder_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let r = Replica::create(dir.path(), SIZE).unwrap();
    r.write(0, &[7u8; 4096], 0).unwrap();
    let second = Replica::open(dir.path())
        .err()
        .expect("second open refused");
    assert!(second.to_string().contains("in use"), "{second}");
    assert!(Replica::open_or_create(dir.path(), Some(SIZE)).is_err());
    // Refusing changed nothing, and the lock goes with the holder.
    assert_eq!(r.read(0, 4096).unwrap(), vec![7u8; 4096]);
    drop(r);
    let r = Replica::open(dir.path()).unwrap();
    assert_eq!(r.read(0, 4096).unwrap(), vec![7u8; 4096]);
}

#[test]
fn open_time_and_index_memory_are_reported() {
    // A 1 GiB sparse volume with every 4th MiB written: measure open time
    // and index memory (printed; `cargo test -- --nocapture` shows them).
    let dir = tempfile::tempdir().unwrap();
    let size = 1u64 << 30;
    let r = Replica::create(dir.path(), size).unwrap();
    for mib in (0..1024u64).step_by(4) {
        r.write(mib << 20, &[1u8; 8192], 0).unwrap();
    }
    r.mark_clean().unwrap();
    drop(r);
    let t = std::time::Instant::now();
    let r = Replica::open(dir.path()).unwrap();
    let open = t.elapsed();
    let mem = r.index_memory_bytes();
    let blocks = size / BLOCK_SIZE;
    println!(
        "1 GiB, 256 written extents: open {open:?}, index {mem} bytes ({:.3} bytes/block)",
        mem as f64 / blocks as f64
    );
    // Each touched 4 MiB chunk costs a byte per block; untouched ones ~nothing.
    assert!(
        mem as f64 <= 1.1 * blocks as f64,
        "index memory {mem} exceeds the bound"
    );
    assert_eq!(r.read(4 << 20, 8192).unwrap(), vec![1u8; 8192]);
}

#[test]
fn a_snapshot_cut_short_by_a_crash_leaves_the_old_chain_and_no_strays() {
    let dir = tempfile::tempdir().unwrap();
    let r = Replica::create(dir.path(), SIZE).unwrap();
    r.write(0, &[5u8; 4096], 0).unwrap();
    r.mark_clean().unwrap();
    drop(r);
    // What a crash after the hard link and the new head, but before the
    // chain switch, leaves behind.
    let d = dir.path();
    std::fs::hard_link(d.join("volume-head-000.img"), d.join("volume-snap-x.img")).unwrap();
    std::fs::write(d.join("volume-snap-x.img.meta"), b"{}").unwrap();
    std::fs::write(d.join("volume-head-001.img"), b"").unwrap();
    let r = Replica::open(d).unwrap();
    assert_eq!(r.info().chain.len(), 1);
    assert_eq!(r.read(0, 4096).unwrap(), vec![5u8; 4096]);
    assert!(!d.join("volume-snap-x.img").exists() && !d.join("volume-head-001.img").exists());
    // And the same snapshot can be taken again.
    r.snapshot("x", true, Default::default()).unwrap();
    r.write(0, &[6u8; 4096], 0).unwrap();
    drop(r);
    let r = Replica::open(d).unwrap();
    assert_eq!(r.info().chain.len(), 2);
    assert_eq!(r.read(0, 4096).unwrap(), vec![6u8; 4096]);
    assert_eq!(
        r.read_layer("volume-snap-x.img", 0, 4096).unwrap(),
        vec![5u8; 4096]
    );
}

#[test]
fn open_time_and_index_memory_with_100_snapshots() {
    // The same data spread over 100 layers instead of one: the index costs
    // the same; open time grows with the layers' extents, not their count.
    let dir = tempfile::tempdir().unwrap();
    let size = 1u64 << 30;
    let r = Replica::create(dir.path(), size).unwrap();
    for s in 0..100u64 {
        for mib in (s * 4..1024).step_by(400) {
            r.write(mib << 20, &[1u8; 8192], 0).unwrap();
        }
        r.snapshot(&format!("s{s}"), true, Default::default())
            .unwrap();
    }
    r.mark_clean().unwrap();
    drop(r);
    let t = std::time::Instant::now();
    let r = Replica::open(dir.path()).unwrap();
    let open = t.elapsed();
    let mem = r.index_memory_bytes();
    let blocks = size / BLOCK_SIZE;
    println!(
        "1 GiB, 101 layers: open {open:?}, index {mem} bytes ({:.3} bytes/block)",
        mem as f64 / blocks as f64
    );
    assert_eq!(r.info().chain.len(), 101);
    assert!(
        mem as f64 <= 1.1 * blocks as f64,
        "index memory {mem} exceeds the bound"
    );
    assert_eq!(r.read(4 << 20, 8192).unwrap(), vec![1u8; 8192]);
}

/// The same 10,000 written blocks in a chain of 10 layers and in one of
/// 10,000: open time, index memory and random-read rate, printed. Slow to
/// set up (each snapshot syncs), so run by hand:
/// `cargo test --release -p rvol-replica --test model -- --ignored --nocapture chain_of`.
#[test]
#[ignore]
fn chain_of_10_vs_10000_layers() {
    let size = 1u64 << 30;
    let blocks = size / BLOCK_SIZE;
    let mut figures = Vec::new();
    for layers in [10u64, 10_000] {
        let dir = tempfile::tempdir().unwrap();
        let r = Replica::create(dir.path(), size).unwrap();
        let per_layer = 10_000 / layers;
        let t = std::time::Instant::now();
        for l in 0..layers {
            for i in 0..per_layer {
                let n = l * per_layer + i;
                let block = n.wrapping_mul(2_654_435_761) % blocks;
                r.write(block * BLOCK_SIZE, &[(n % 251) as u8 + 1; 4096], 0)
                    .unwrap();
            }
            r.snapshot(&format!("s{l}"), true, Default::default())
                .unwrap();
        }
        let build = t.elapsed();
        r.mark_clean().unwrap();
        drop(r);
        let t = std::time::Instant::now();
        let r = Replica::open(dir.path()).unwrap();
        let open = t.elapsed();
        assert_eq!(r.info().chain.len() as u64, layers + 1);
        let mem = r.index_memory_bytes();
        let reads = 200_000u64;
        let t = std::time::Instant::now();
        for i in 0..reads {
            let n = (i * 7919) % 10_000;
            let block = n.wrapping_mul(2_654_435_761) % blocks;
            let got = r.read(block * BLOCK_SIZE, BLOCK_SIZE).unwrap();
            assert!(got[0] != 0, "block {block} lost");
        }
        let iops = reads as f64 / t.elapsed().as_secs_f64();
        println!(
            "{layers} layers: built in {build:.1?}, open {open:.1?}, index {mem} B, {iops:.0} random 4 KiB reads/s"
        );
        figures.push(mem);
    }
    // The index does not grow with the chain.
    assert!(figures[1] <= figures[0] * 2, "index memory {figures:?}");
}

#[test]
fn a_flipped_byte_is_caught_by_its_checksum_in_any_layer() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let r = Replica::create(dir.path(), SIZE).unwrap();
    r.write(0, &pattern(1, 0, 8192), 0).unwrap();
    r.snapshot("s", true, Default::default()).unwrap();
    r.write(8192, &pattern(2, 2, 4096), 0).unwrap();
    r.flush().unwrap();
    let flip = |file: &str, at: u64| {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.path().join(file))
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0x40], at).unwrap();
    };
    flip("volume-snap-s.img", 4096 + 17);
    flip("volume-head-001.img", 8192 + 4000);
    let e = r.read(0, 3 * 4096).unwrap_err();
    assert!(matches!(e, rvol_replica::Error::Checksum(_)), "{e}");
    assert!(e.to_string().contains("block 1 "), "{e}");
    assert_eq!(r.read(0, 4096).unwrap(), pattern(1, 0, 8192)[..4096]);
    let e = r.read(8192, 4096).unwrap_err();
    assert!(e.to_string().contains("volume-head-001.img"), "{e}");
    // The rebuild source path checks too; the unverified read returns the bytes.
    assert!(r.read_layer("volume-snap-s.img", 0, 8192).is_err());
    assert_eq!(
        r.read_unverified(0, 4096).unwrap(),
        pattern(1, 0, 8192)[..4096]
    );
    // Survives a reopen (the sidecars are files, not memory).
    r.mark_clean().unwrap();
    drop(r);
    let r = Replica::open(dir.path()).unwrap();
    assert!(r.read(4096, 4096).is_err());
    // Rewriting the block heals it.
    r.write(4096, &[9u8; 4096], 0).unwrap();
    assert_eq!(r.read(4096, 4096).unwrap(), vec![9u8; 4096]);
}

#[test]
fn layer_hashes_tell_a_hole_from_a_zero_block_and_find_the_block_that_differs() {
    use rvol_replica::store::{ChecksumUnit, MAX_CHECKSUMS, REBUILD_CHUNK};
    let size = 1 << 30; // sparse; large enough to ask for too many hashes
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (
        Replica::create(da.path(), size).unwrap(),
        Replica::create(db.path(), size).unwrap(),
    );
    for r in [&a, &b] {
        r.write(0, &pattern(1, 0, 16 * 4096), 0).unwrap();
    }
    // b differs in block 5 (data) and block 9 (allocated zeros, a hole in a).
    b.write(5 * 4096, &pattern(2, 5, 4096), 0).unwrap();
    a.trim(9 * 4096, 4096, 0).unwrap();
    b.write(9 * 4096, &[0; 4096], 0).unwrap();
    for r in [&a, &b] {
        r.snapshot("s", true, Default::default()).unwrap();
    }
    let layer = "volume-snap-s.img";
    let chunks = |r: &Replica| {
        r.layer_checksums(layer, 0, size, ChecksumUnit::Chunk)
            .unwrap()
    };
    let (ca, cb) = (chunks(&a), chunks(&b));
    assert_eq!(ca.len(), 1024);
    assert!(ca[0].is_some() && ca[0] != cb[0], "{:?} {:?}", ca[0], cb[0]);
    assert_eq!((ca[1], cb[1]), (None, None), "the second chunk is a hole");
    let blocks = |r: &Replica| {
        r.layer_checksums(layer, 0, REBUILD_CHUNK, ChecksumUnit::Block)
            .unwrap()
    };
    let (ba, bb) = (blocks(&a), blocks(&b));
    assert_eq!(ba.len(), 256);
    let differ: Vec<usize> = (0..256).filter(|&i| ba[i] != bb[i]).collect();
    assert_eq!(differ, [5, 9]);
    assert_eq!(ba[9], None, "a hole");
    assert!(bb[9].is_some(), "allocated zeros are data");
    assert_eq!(ba[16], None);
    // The reply is bounded, and a bad request changes nothing.
    let e = a
        .layer_checksums(layer, 0, (MAX_CHECKSUMS + 1) * 4096, ChecksumUnit::Block)
        .unwrap_err();
    assert!(e.to_string().contains("at most"), "{e}");
    assert!(a
        .layer_checksums("volume-snap-x.img", 0, 4096, ChecksumUnit::Block)
        .is_err());
    assert_eq!(chunks(&a), ca);
}

#[test]
fn large_layer_writes_bypass_the_page_cache_and_read_back() {
    use rvol_replica::store::DIRECT_WRITE_MIN;
    // Large writes take O_DIRECT, small ones the page cache; both must read
    // back through the page cache and match their checksums, on ext4 (the
    // temp dir here) and on tmpfs (/dev/shm; kernels before 6.6 refuse
    // O_DIRECT there and the write falls back to the page cache).
    let mut dirs = vec![tempfile::tempdir().unwrap()];
    if std::path::Path::new("/dev/shm").is_dir() {
        dirs.push(tempfile::tempdir_in("/dev/shm").unwrap());
    }
    for dir in &dirs {
        let r = Replica::create(dir.path(), SIZE).unwrap();
        r.snapshot("s", true, Default::default()).unwrap();
        let layer = "volume-snap-s.img";
        let big = pattern(3, 4, 2 * DIRECT_WRITE_MIN as usize);
        let small = pattern(4, 40, 4096);
        r.write_layer(layer, 4 * 4096, &big).unwrap();
        r.write_layer(layer, 40 * 4096, &small).unwrap();
        // Read back through the page cache, checked against the checksums.
        assert_eq!(
            r.read_layer(layer, 4 * 4096, big.len() as u64).unwrap(),
            big,
            "{:?}",
            dir.path()
        );
        assert_eq!(r.read_layer(layer, 40 * 4096, 4096).unwrap(), small);
    }
}
