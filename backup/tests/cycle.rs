//! Backups against a real S3 server (SeaweedFS) and a directory, of a
//! volume held in memory. The engine's side (reading a snapshot from
//! replicas) is tested in `engine/tests/backup.rs`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rvol_backup::target::PutRefused;
use rvol_backup::testing::Weed;
use rvol_backup::{BackupRequest, Progress, Sink, Source, StoreOptions, Target, VolumeInfo};
use uuid::Uuid;

const BLOCK: usize = 4096;
const CHUNK: u64 = 64 << 10;
const SIZE: usize = 4 << 20;

/// A volume's snapshots, in memory; counts the bytes read.
struct MemSource {
    views: BTreeMap<String, Vec<u8>>,
    snapshot: String,
    read: AtomicU64,
}

impl Source for MemSource {
    async fn snapshots(&self) -> anyhow::Result<Vec<String>> {
        Ok(self.views.keys().cloned().collect())
    }
    async fn extents(&self, base: Option<&str>) -> anyhow::Result<Vec<(u64, u64)>> {
        let view = &self.views[&self.snapshot];
        let zeros = vec![0; view.len()];
        let old = base.map_or(&zeros, |b| &self.views[b]);
        Ok((0..view.len() / BLOCK)
            .filter(|b| view[b * BLOCK..(b + 1) * BLOCK] != old[b * BLOCK..(b + 1) * BLOCK])
            .map(|b| ((b * BLOCK) as u64, ((b + 1) * BLOCK) as u64))
            .collect())
    }
    async fn read(&self, offset: u64, len: u64) -> anyhow::Result<Bytes> {
        self.read.fetch_add(len, Ordering::Relaxed);
        let v = &self.views[&self.snapshot];
        Ok(Bytes::copy_from_slice(
            &v[offset as usize..(offset + len) as usize],
        ))
    }
}

struct MemSink(Mutex<Vec<u8>>);

impl Sink for MemSink {
    async fn write(&self, offset: u64, content: Bytes) -> anyhow::Result<()> {
        let mut v = self.0.lock().unwrap();
        v[offset as usize..offset as usize + content.len()].copy_from_slice(&content);
        Ok(())
    }
    async fn zero(&self, offset: u64, len: u64) -> anyhow::Result<()> {
        self.0.lock().unwrap()[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}

fn volume(name: &str) -> VolumeInfo {
    VolumeInfo {
        name: name.into(),
        uuid: Uuid::new_v5(&Uuid::NAMESPACE_OID, name.as_bytes()),
        size: SIZE as u64,
        auth_bytes: 0,
        encryption: None,
    }
}

fn request(name: &str, snapshot: &str) -> BackupRequest {
    BackupRequest {
        volume: volume(name),
        snapshot: snapshot.into(),
        chunk_size: Some(CHUNK),
        parallel: 4,
        rate_mib: 0.0,
    }
}

/// Pseudo-random bytes (xorshift), so chunks do not dedupe by accident.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

async fn restored(target: &Target, name: &str) -> anyhow::Result<Vec<u8>> {
    let m = target.manifest(name).await?;
    let sink = MemSink(Mutex::new(vec![0; m.size as usize]));
    rvol_backup::restore(target, &m, None, &sink, 4, &AtomicU64::new(0)).await?;
    Ok(sink.0.into_inner().unwrap())
}

async fn chunk_count(target: &Target) -> usize {
    target.list("chunks/").await.unwrap().len()
}

#[tokio::test]
async fn create_only_and_conditional_puts_hold_on_s3_and_in_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let weed = Weed::start(&dir.path().join("weed")).await;
    let file_url = format!("file://{}", dir.path().join("t").display());
    for (url, opts, if_match) in [
        (weed.url("cond"), weed.options(), true),
        (file_url, StoreOptions::default(), false),
    ] {
        let t = Target::open_checked(&url, &opts).await.unwrap();
        let v1 = t.put_if("x", Bytes::from("1"), None).await.unwrap();
        assert!(
            matches!(
                t.put_if("x", Bytes::from("2"), None).await,
                Err(PutRefused::Conflict)
            ),
            "{url}: a second create-only put succeeded"
        );
        let v2 = t.put_if("x", Bytes::from("3"), Some(&v1)).await.unwrap();
        if if_match {
            assert!(
                matches!(
                    t.put_if("x", Bytes::from("4"), Some(&v1)).await,
                    Err(PutRefused::Conflict)
                ),
                "{url}: a put on a stale version succeeded"
            );
            t.put_if("x", Bytes::from("5"), Some(&v2)).await.unwrap();
        }
    }
}

#[tokio::test]
async fn full_incremental_deduplicated_backups_restore_and_sweep_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let weed = Weed::start(&dir.path().join("weed")).await;
    let target = Arc::new(
        Target::open_checked(&weed.url("cycle"), &weed.options())
            .await
            .unwrap(),
    );

    // Snapshot 1: data in the first half, holes in the second.
    let mut v1 = vec![0u8; SIZE];
    v1[..SIZE / 2].copy_from_slice(&noise(1, SIZE / 2));
    let mut src = MemSource {
        views: [("s1".to_string(), v1.clone())].into(),
        snapshot: "s1".into(),
        read: AtomicU64::new(0),
    };
    let b1 = rvol_backup::create(&target, &src, &request("vol", "s1"), &Progress::default())
        .await
        .unwrap();
    let data_chunks = SIZE / 2 / CHUNK as usize;
    assert_eq!(b1.chunks.len(), data_chunks, "holes are not stored");
    assert_eq!(b1.stats.chunks_uploaded as usize, data_chunks);
    assert_eq!(restored(&target, &b1.name).await.unwrap(), v1);

    // Snapshot 2: 5 scattered blocks changed, one chunk of the holes written.
    let mut v2 = v1.clone();
    let changed_blocks = [3usize, 40, 41, 300, 500];
    for &b in &changed_blocks {
        v2[b * BLOCK..(b + 1) * BLOCK].copy_from_slice(&noise(100 + b as u64, BLOCK));
    }
    v2[SIZE - CHUNK as usize..].copy_from_slice(&noise(7, CHUNK as usize));
    src.views.insert("s2".into(), v2.clone());
    src.snapshot = "s2".into();
    src.read.store(0, Ordering::Relaxed);
    let b2 = rvol_backup::create(&target, &src, &request("vol", "s2"), &Progress::default())
        .await
        .unwrap();
    let changed_chunks: std::collections::BTreeSet<usize> = changed_blocks
        .iter()
        .map(|b| b * BLOCK / CHUNK as usize)
        .chain([SIZE / CHUNK as usize - 1])
        .collect();
    assert_eq!(b2.base.as_deref(), Some(b1.name.as_str()));
    assert_eq!(b2.stats.chunks_uploaded as usize, changed_chunks.len());
    assert_eq!(
        src.read.load(Ordering::Relaxed),
        changed_chunks.len() as u64 * CHUNK,
        "an incremental backup reads only the changed chunks"
    );
    assert_eq!(restored(&target, &b2.name).await.unwrap(), v2);

    // Another volume holding the same bytes uploads nothing.
    let other = MemSource {
        views: [("s".to_string(), v2.clone())].into(),
        snapshot: "s".into(),
        read: AtomicU64::new(0),
    };
    let b3 = rvol_backup::create(&target, &other, &request("twin", "s"), &Progress::default())
        .await
        .unwrap();
    assert_eq!(b3.stats.chunks_uploaded, 0, "{:?}", b3.stats);
    assert_eq!(b3.stats.chunks_known as usize, b3.chunks.len());

    // A standby holding backup 1 is brought to backup 2: only what differs.
    let standby = MemSink(Mutex::new(vec![0; SIZE]));
    let written = AtomicU64::new(0);
    rvol_backup::restore(&target, &b1, None, &standby, 4, &written)
        .await
        .unwrap();
    let stats = rvol_backup::restore(&target, &b2, Some(&b1), &standby, 4, &written)
        .await
        .unwrap();
    assert_eq!(stats.chunks_written as usize, changed_chunks.len());
    assert_eq!(*standby.0.lock().unwrap(), v2);

    // Remove backup 1: backup 2 and the twin still restore; the sweep
    // takes exactly the chunks only backup 1 named.
    let before = chunk_count(&target).await;
    rvol_backup::remove(&target, &b1.name).await.unwrap();
    assert!(target.manifest(&b1.name).await.is_err());
    let kept = rvol_backup::sweep(&target, Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(
        (kept.deleted, kept.chunks as usize),
        (0, before),
        "young chunks stay: {kept:?}"
    );
    let swept = rvol_backup::sweep(&target, Duration::ZERO).await.unwrap();
    let only_b1 = b1
        .chunks
        .iter()
        .filter(|c| !b2.chunks.contains(c) && !b3.chunks.iter().any(|t| t.1 == c.1))
        .count();
    assert_eq!(swept.deleted as usize, only_b1, "{swept:?}");
    assert_eq!(chunk_count(&target).await, before - only_b1);
    assert_eq!(restored(&target, &b2.name).await.unwrap(), v2);
    assert_eq!(restored(&target, &b3.name).await.unwrap(), v2);
    let report = rvol_backup::verify(&target, &b2, 4).await.unwrap();
    assert!(report.bad.is_empty(), "{report:?}");
}

#[tokio::test]
async fn a_corrupt_chunk_is_named_by_verify_and_stops_a_restore() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("t");
    let target = Arc::new(
        Target::open_checked(
            &format!("file://{}", root.display()),
            &StoreOptions::default(),
        )
        .await
        .unwrap(),
    );
    let src = MemSource {
        views: [("s".to_string(), noise(3, SIZE))].into(),
        snapshot: "s".into(),
        read: AtomicU64::new(0),
    };
    let b = rvol_backup::create(&target, &src, &request("vol", "s"), &Progress::default())
        .await
        .unwrap();
    let victim = b.chunks[5].1;
    let object = root.join(victim.key());
    let good = std::fs::read(&object).unwrap();
    let mut bad = zstd::bulk::decompress(&good, CHUNK as usize).unwrap();
    bad[10] ^= 0x40;
    std::fs::write(&object, zstd::bulk::compress(&bad, 1).unwrap()).unwrap();

    let report = rvol_backup::verify(&target, &b, 4).await.unwrap();
    assert_eq!(report.bad.len(), 1, "{report:?}");
    assert!(report.bad[0].contains(&victim.to_string()), "{report:?}");
    let err = restored(&target, &b.name).await.unwrap_err();
    assert!(format!("{err:#}").contains(&victim.to_string()), "{err:#}");
}

#[tokio::test]
async fn two_backups_of_a_volume_at_once_one_is_refused_naming_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let target = Arc::new(
        Target::open_checked(
            &format!("file://{}", dir.path().display()),
            &StoreOptions::default(),
        )
        .await
        .unwrap(),
    );
    let src = MemSource {
        views: [("s".to_string(), noise(4, SIZE))].into(),
        snapshot: "s".into(),
        read: AtomicU64::new(0),
    };
    let slow = BackupRequest {
        rate_mib: 8.0,
        ..request("vol", "s")
    };
    let progress = Progress::default();
    let (a, b) = tokio::join!(
        rvol_backup::create(&target, &src, &slow, &progress),
        async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            rvol_backup::create(&target, &src, &request("vol", "s"), &Progress::default()).await
        }
    );
    a.unwrap();
    let err = format!("{:#}", b.unwrap_err());
    assert!(
        err.contains("busy") && err.contains("a backup of vol"),
        "{err}"
    );
    // A sweep meanwhile would be refused the same way; afterwards it runs.
    rvol_backup::sweep(&target, Duration::ZERO).await.unwrap();
}

#[tokio::test]
async fn bad_targets_and_names_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let weed = Weed::start(&dir.path().join("weed")).await;
    let err = |r: anyhow::Result<Target>| format!("{:#}", r.err().expect("an error"));
    let e = err(Target::open("ftp://x/y", &StoreOptions::default()));
    assert!(e.contains("unknown scheme"), "{e}");
    let e = err(Target::open_checked("s3://no-such-bucket/p", &weed.options()).await);
    assert!(e.contains("bucket does not exist"), "{e}");
    let mut wrong = weed.options();
    wrong
        .0
        .insert("AWS_SECRET_ACCESS_KEY".into(), "wrong".into());
    let e = err(Target::open_checked(&weed.url("p"), &wrong).await);
    assert!(e.contains("access denied"), "{e}");
    let t = Target::open_checked(&weed.url("p"), &weed.options())
        .await
        .unwrap();
    let e = format!(
        "{:#}",
        t.manifest("vol.20260101T000000Z").await.unwrap_err()
    );
    assert!(e.contains("no backup vol.20260101T000000Z"), "{e}");
    let e = format!("{:#}", t.manifest("../../etc").await.unwrap_err());
    assert!(e.contains("not a backup name"), "{e}");
    let src = MemSource {
        views: [("s".to_string(), vec![0; SIZE])].into(),
        snapshot: "s".into(),
        read: AtomicU64::new(0),
    };
    let t = Arc::new(t);
    let e = format!(
        "{:#}",
        rvol_backup::create(&t, &src, &request("vol", "nosuch"), &Progress::default())
            .await
            .unwrap_err()
    );
    assert!(e.contains("no snapshot nosuch"), "{e}");
    assert!(
        t.list("").await.unwrap().is_empty(),
        "a refused backup wrote something"
    );
}
