//! `rvol replica` as a process: SIGKILL crash rounds, fencing, and bad
//! input of every kind (files, frames, ranges, a full disk).

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use common::direct::*;
use common::*;
use futures::future::join_all;
use rvol_replica::client::ReplicaClient;
use rvol_replica::proto::{Op, RequestHeader, Status, REPLY_HEADER_LEN};
use rvol_replica::{Generation, Owner, BLOCK_SIZE};
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_flushes_survive_sigkill_in_20_rounds() {
    let tmp = tempfile::tempdir().unwrap();
    let ep = sock(tmp.path());
    const BLOCKS: u64 = 2048; // 8 MiB
                              // Per block, the write the last acknowledged flush covered.
    let mut durable: HashMap<u64, u64> = HashMap::new();
    let mut last_flushed_revision = 0;
    let mut next_id = 0u64;
    let mut rand = xorshift(0x5eed_u64);
    let mut p = start_replica(tmp.path(), &ep, "8M");
    for round in 1..=20u64 {
        let c = connect(&ep, round, round).await.unwrap();
        // Writes issued since the last acknowledged flush, per block.
        let mut issued_since_flush: HashMap<u64, Vec<u64>> = HashMap::new();
        let mut acked = durable.clone();
        let kill_after = Duration::from_millis(30 + rand() % 250);
        let killer = tokio::spawn(async move {
            tokio::time::sleep(kill_after).await;
            p.kill9();
        });
        'writing: for batch in 1.. {
            let blocks: std::collections::BTreeSet<u64> =
                (0..16).map(|_| rand() % BLOCKS).collect();
            let writes: Vec<(u64, u64)> = blocks
                .into_iter()
                .map(|b| {
                    (b, {
                        next_id += 1;
                        next_id
                    })
                })
                .collect();
            for &(b, id) in &writes {
                issued_since_flush.entry(b).or_default().push(id);
            }
            let results =
                join_all(writes.iter().map(|&(b, id)| {
                    c.write(b * BLOCK_SIZE, Bytes::from(block_for(id, b)), false, 0)
                }))
                .await;
            for (&(b, id), r) in writes.iter().zip(results) {
                if r.is_err() {
                    break 'writing;
                }
                acked.insert(b, id);
            }
            if batch % 4 == 0 {
                // No write is in flight: the flush covers everything acked.
                let covered = acked.clone();
                match c.flush().await {
                    Ok(rev) => {
                        durable = covered;
                        issued_since_flush.clear();
                        last_flushed_revision = rev.0;
                    }
                    Err(_) => break,
                }
            }
        }
        killer.await.unwrap();
        drop(c);

        // Restart. A block untouched since the last acknowledged flush holds
        // exactly the flushed write; one written after it may hold either.
        p = start_replica(tmp.path(), &ep, "8M");
        let c = connect(&ep, round, round).await.unwrap();
        let info = c.info().await.unwrap();
        assert!(
            info.revision.0 >= last_flushed_revision,
            "round {round}: persisted revision {} < last flushed {last_flushed_revision}",
            info.revision
        );
        assert!(
            !info.clean,
            "a killed replica must not claim a clean shutdown"
        );
        let reads = join_all((0..BLOCKS).map(|b| c.read(b * BLOCK_SIZE, BLOCK_SIZE))).await;
        for (b, data) in (0..BLOCKS).zip(reads) {
            let got = id_of(&data.unwrap(), b);
            let flushed = durable.get(&b).copied();
            let later = issued_since_flush.get(&b);
            let ok = got == flushed || later.is_some_and(|l| got.is_some_and(|g| l.contains(&g)));
            assert!(ok, "round {round}: block {b} holds {got:?}, flushed {flushed:?}, issued after {later:?}");
            // What survived is the baseline of the next round.
            match got {
                Some(g) => durable.insert(b, g),
                None => durable.remove(&b),
            };
        }
    }
    let meta = std::fs::read(tmp.path().join("data/replica.json")).unwrap();
    rvol_replica::meta::ReplicaMeta::parse(&meta).expect("metadata parses after 20 crashes");
}

#[tokio::test]
async fn generations_fence_older_engines() {
    let tmp = tempfile::tempdir().unwrap();
    let ep = sock(tmp.path());
    let _p = start_replica(tmp.path(), &ep, "1M");
    fencing(&ep).await;
}

/// The same sessions, run in this process (`local:DIR`).
#[tokio::test]
async fn generations_fence_older_engines_in_process() {
    let tmp = tempfile::tempdir().unwrap();
    let ep = format!("local:{}", tmp.path().join("data").display());
    rvol_replica::local::prepare(&ep.parse().unwrap(), 1 << 20)
        .await
        .unwrap();
    fencing(&ep).await;
}

async fn fencing(ep: &str) {
    let old = connect(ep, 5, 1).await.unwrap();
    old.write(0, Bytes::from(vec![1u8; 4096]), false, 0)
        .await
        .unwrap();
    // Lower generation: refused.
    let e = connect(ep, 4, 2)
        .await
        .err()
        .expect("older generation refused");
    assert!(e.is_fenced(), "{e}");
    // Same generation, another engine: refused.
    assert!(connect(ep, 5, 2)
        .await
        .err()
        .expect("same generation, other engine")
        .is_fenced());
    // Same engine may connect again; then what still comes on its older
    // connection (a write it gave up on, arriving late) is refused, never
    // applied, and is not taken for a fence.
    let again = connect(ep, 5, 1).await.unwrap();
    let e = old
        .write(0, Bytes::from(vec![3u8; 4096]), false, 0)
        .await
        .unwrap_err();
    assert!(e.is_superseded() && !e.is_fenced(), "{e}");
    assert_eq!(again.read(0, 4096).await.unwrap(), vec![1u8; 4096]);
    // A newer engine takes over; the old one's next request is fenced.
    let new = connect(ep, 6, 2).await.unwrap();
    let e = old
        .write(0, Bytes::from(vec![2u8; 4096]), false, 0)
        .await
        .unwrap_err();
    assert!(e.is_fenced(), "{e}");
    assert!(old.flush().await.unwrap_err().is_fenced());
    assert_eq!(new.read(0, 4096).await.unwrap(), vec![1u8; 4096]);
    assert_eq!(new.info().await.unwrap().generation, Generation(6));
}

/// Sends raw bytes on a fresh connection after a valid HELLO; returns
/// whether the replica closed the connection.
fn raw_session(sock_path: &Path, frames: &[u8]) -> (bool, Vec<u8>) {
    let mut s = UnixStream::connect(sock_path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&hello_frame(VOLUME, 1, 1)).unwrap();
    let mut rh = [0u8; REPLY_HEADER_LEN];
    s.read_exact(&mut rh).unwrap();
    let plen = u32::from_le_bytes(rh[24..28].try_into().unwrap());
    let mut body = vec![0u8; plen as usize];
    s.read_exact(&mut body).unwrap();
    s.write_all(frames).unwrap();
    let mut rest = Vec::new();
    let closed = match s.read_to_end(&mut rest) {
        Ok(_) => true,
        Err(e) => {
            e.kind() != std::io::ErrorKind::WouldBlock && e.kind() != std::io::ErrorKind::TimedOut
        }
    };
    (closed, rest)
}

fn frame(op: Op, offset: u64, length: u64, payload: &[u8]) -> Vec<u8> {
    let h = RequestHeader {
        op: op as u8,
        flags: 0,
        id: 7,
        offset,
        length,
        epoch: 0,
        payload_len: 0,
        crc: 0,
    };
    let mut f = h.encode(payload).to_vec();
    f.extend_from_slice(payload);
    f
}

#[tokio::test]
async fn bad_frames_close_the_connection_and_touch_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let ep = sock(tmp.path());
    let path = tmp.path().join("r.sock");
    let _p = start_replica(tmp.path(), &ep, "1M");
    // Bad crc on a write: closed, block untouched.
    let mut f = frame(Op::Write, 0, 4096, &[0xee; 4096]);
    let n = f.len();
    f[n - 1] ^= 0xff;
    let (closed, rest) = raw_session(&path, &f);
    assert!(
        closed && rest.is_empty(),
        "bad crc must close without a reply"
    );
    // Oversized frame: closed before the payload is read.
    let mut f = frame(Op::Write, 0, 4096, &[]);
    f[40..44].copy_from_slice(&(64u32 << 20).to_le_bytes());
    assert!(raw_session(&path, &f).0);
    // Garbage: closed.
    assert!(raw_session(&path, &[0xab; rvol_replica::proto::REQUEST_HEADER_LEN]).0);
    // I/O past the end and unknown ops get error replies; the connection lives.
    let c = connect(&ep, 1, 1).await.unwrap();
    let e = c.read(1 << 20, 4096).await.unwrap_err();
    assert!(
        matches!(
            e,
            rvol_replica::client::ClientError::Remote {
                status: Status::Invalid,
                ..
            }
        ),
        "{e}"
    );
    assert!(c
        .write(4096 * 255, Bytes::from(vec![1u8; 8192]), false, 0)
        .await
        .is_err());
    assert!(c
        .write(100, Bytes::from(vec![1u8; 4096]), false, 0)
        .await
        .is_err());
    let f = frame(Op::Read, 0, 4096, &[]);
    let mut unknown = f.clone();
    unknown[4] = 200;
    let h = RequestHeader::decode(&unknown).unwrap();
    let fixed = RequestHeader { crc: 0, ..h }.encode(&[]);
    let (closed, rest) = raw_session(&path, &fixed);
    assert!(!closed || !rest.is_empty(), "unknown op must be answered");
    assert_eq!(
        u16::from_le_bytes(rest[4..6].try_into().unwrap()),
        Status::Unsupported as u16
    );
    // A FLUSH whose payload is not a list of UUIDs: refused, not applied.
    let (_, rest) = raw_session(&path, &frame(Op::Flush, 0, 0, &[1u8; 17]));
    assert_eq!(
        u16::from_le_bytes(rest[4..6].try_into().unwrap()),
        Status::Invalid as u16
    );
    assert_eq!(c.info().await.unwrap().flush_received, 0);
    // Nothing reached the data.
    assert_eq!(c.read(0, 4096).await.unwrap(), vec![0u8; 4096]);
    assert_eq!(c.info().await.unwrap().revision.0, 0);
}

/// A barrier flush's named replicas are reported until a newer barrier
/// flush arrives, and only a flush that names the replica counts as a
/// barrier for it (see `rvol_replica::dirty`).
#[tokio::test]
async fn a_barrier_flush_reports_the_replicas_it_named() {
    let tmp = tempfile::tempdir().unwrap();
    let ep = sock(tmp.path());
    let _p = start_replica(tmp.path(), &ep, "1M");
    let c = connect(&ep, 1, 1).await.unwrap();
    let me = c.info().await.unwrap().replica_uuid;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    c.flush_barrier(3, &[a, me]).await.unwrap();
    let info = c.info().await.unwrap();
    assert_eq!((info.flush_received, info.flush_members), (3, vec![a, me]));
    assert_eq!(info.flush_epoch, 3);
    // A plain flush names nobody and changes nothing.
    c.flush().await.unwrap();
    assert_eq!(c.info().await.unwrap().flush_members, [a, me]);
    // Nor does a barrier flush that does not name it (it is being brought
    // in, and may lack what the barrier covers).
    c.flush_barrier(4, &[a, b]).await.unwrap();
    let info = c.info().await.unwrap();
    assert_eq!(
        (info.flush_received, info.flush_epoch, info.flush_members),
        (3, 3, vec![a, me])
    );
    c.flush_barrier(5, &[me]).await.unwrap();
    let info = c.info().await.unwrap();
    assert_eq!((info.flush_received, info.flush_members), (5, vec![me]));
}

fn replica_error(dir: &Path, size: Option<&str>) -> String {
    let mut args = vec![
        "replica",
        "--dir",
        dir.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ];
    if let Some(s) = size {
        args.extend_from_slice(&["--size", s]);
    }
    let out = run_within(REFUSAL_LIMIT, RVOL, &args);
    assert_eq!(out.status.code(), Some(1), "{args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn dir_digest(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap_or_default(),
            )
        })
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn broken_replica_directories_give_clear_errors_and_stay_as_they_were() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let ep = sock(tmp.path());
    {
        let mut p = start_replica(tmp.path(), &ep, "1M");
        let c = connect(&ep, 1, 1).await.unwrap();
        c.write(0, Bytes::from(vec![9u8; 4096]), true, 0)
            .await
            .unwrap();
        drop(c);
        assert_eq!(p.stop(), 0);
    }
    let good = dir_digest(&dir);
    let meta = std::fs::read(dir.join("replica.json")).unwrap();

    std::fs::write(dir.join("replica.json"), b"{ not json").unwrap();
    assert!(replica_error(&dir, None).contains("corrupt replica"));
    std::fs::write(dir.join("replica.json"), &meta[..meta.len() / 2]).unwrap();
    assert!(replica_error(&dir, Some("1M")).contains("corrupt replica"));
    std::fs::write(dir.join("replica.json"), &meta).unwrap();

    std::fs::rename(dir.join("volume-head-000.img"), tmp.path().join("aside")).unwrap();
    assert!(replica_error(&dir, None).contains("volume-head-000.img is missing"));
    std::fs::rename(tmp.path().join("aside"), dir.join("volume-head-000.img")).unwrap();

    let state = std::fs::read(dir.join("replica.state")).unwrap();
    std::fs::write(dir.join("replica.state"), vec![0x55; state.len()]).unwrap();
    assert!(replica_error(&dir, None).contains("no valid state record"));
    std::fs::write(dir.join("replica.state"), &state).unwrap();

    assert!(replica_error(&dir, Some("2M")).contains("already holds a replica of 1048576 bytes"));
    let file = tmp.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    assert!(replica_error(&file, Some("1M")).contains("is not a directory"));
    let foreign = tmp.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), b"mine").unwrap();
    assert!(replica_error(&foreign, Some("1M")).contains("not empty and holds no replica"));
    assert_eq!(std::fs::read(foreign.join("notes.txt")).unwrap(), b"mine");

    assert_eq!(
        dir_digest(&dir),
        good,
        "failed opens must not change the replica"
    );

    // A directory of another volume refuses this volume's engine.
    let _p = start_replica(tmp.path(), &ep, "1M");
    // While a replica process holds it, nobody else opens it: neither a
    // second replica process nor an engine in its own process.
    assert!(replica_error(&dir, None).contains("in use by another process"));
    let local = format!("local:{}", dir.display());
    let engine = run_within(
        REFUSAL_LIMIT,
        RVOL,
        &[
            "engine",
            "--name",
            "v",
            "--size",
            "1M",
            "--replica",
            &local,
            "--frontend",
            "none",
            "--admin-listen",
            "127.0.0.1:0",
        ],
    );
    let stderr = String::from_utf8_lossy(&engine.stderr);
    assert_eq!(engine.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("in use by another process"), "{stderr}");
    assert_eq!(dir_digest(&dir), good);
    let owner = Owner {
        generation: Generation(9),
        engine_id: 3,
    };
    let e = ReplicaClient::connect(&ep.parse().unwrap(), Uuid::from_u128(0x999), owner, 1)
        .await
        .err()
        .unwrap();
    assert!(e.to_string().contains("belongs to volume"), "{e}");
    let c = connect(&ep, 9, 3).await.unwrap();
    assert_eq!(c.read(0, 4096).await.unwrap(), vec![9u8; 4096]);
}

#[tokio::test]
async fn a_full_disk_fails_writes_cleanly_and_keeps_earlier_data() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: the full-disk test mounts a tmpfs and needs root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    run_ok(
        "mount",
        &[
            "-t",
            "tmpfs",
            "-o",
            "size=2M",
            "tmpfs",
            mnt.to_str().unwrap(),
        ],
    );
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _u = Unmount(mnt.clone());
    let ep = format!("unix:{}", tmp.path().join("r.sock").display());
    let mut p = Proc::start(&[
        "replica",
        "--dir",
        mnt.join("data").to_str().unwrap(),
        "--listen",
        &ep,
        "--size",
        "64M",
    ]);
    let c = connect(&ep, 1, 1).await.unwrap();
    c.write(0, Bytes::from(vec![3u8; 65536]), false, 0)
        .await
        .unwrap();
    c.flush().await.unwrap();
    let mut failed = None;
    for i in 1..64u64 {
        if let Err(e) = c
            .write(i << 20, Bytes::from(vec![4u8; 1 << 20]), false, 0)
            .await
        {
            failed = Some(e);
            break;
        }
    }
    let e = failed.expect("a 2 MiB file system cannot take 64 MiB");
    assert!(
        matches!(
            e,
            rvol_replica::client::ClientError::Remote {
                status: Status::NoSpace,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(c.read(0, 65536).await.unwrap(), vec![3u8; 65536]);
    assert!(p.is_running());
    drop(c);
    assert_eq!(p.stop(), 0, "clean shutdown on a full disk");
    let meta = std::fs::read(mnt.join("data/replica.json")).unwrap();
    rvol_replica::meta::ReplicaMeta::parse(&meta).expect("metadata intact");
    let _p = Proc::start(&[
        "replica",
        "--dir",
        mnt.join("data").to_str().unwrap(),
        "--listen",
        &ep,
    ]);
    let c = connect(&ep, 2, 1).await.unwrap();
    assert_eq!(c.read(0, 65536).await.unwrap(), vec![3u8; 65536]);
}

/// Small reads of blocks in the head come from its file with no request to
/// the replica, and only while that returns what the replica would: not a
/// rotten block, not a hole over a snapshot, not the head a revert threw
/// away, and not once another engine holds the lease.
#[tokio::test]
async fn small_reads_from_the_head_are_served_only_while_they_are_right() {
    use rvol_replica::client::{ClientError, Links};
    use std::os::unix::fs::FileExt;
    let tmp = tempfile::tempdir().unwrap();
    let ep = format!("127.0.0.1:{}", free_port());
    let _p = start_replica(tmp.path(), &ep, "8M");
    let links = Links {
        connections: 1,
        direct_reads: true,
        tls: None,
        encryption: None,
    };
    let c = connect_with(&ep, 1, 1, links).await.unwrap();
    let block = |b: u8| Bytes::from(vec![b; BLOCK_SIZE as usize]);
    c.write(0, Bytes::from(vec![0x11u8; 64 << 10]), false, 0)
        .await
        .unwrap();
    let read = c.read_stored(4096, 4096).await.unwrap();
    assert_eq!((read.data, read.from_files), (block(0x11), true));
    // A block never written reads as zeros, from the file too: the head is
    // the only layer.
    let read = c.read_stored(1 << 20, 4096).await.unwrap();
    assert_eq!((read.data, read.from_files), (block(0), true));

    // Rot is not served; the replica names it.
    let head = tmp.path().join("data/volume-head-000.img");
    let f = std::fs::OpenOptions::new().write(true).open(&head).unwrap();
    f.write_all_at(&[0x12], 4096 + 9).unwrap();
    match c.read_stored(4096, 4096).await.unwrap_err() {
        ClientError::Remote {
            status: Status::Checksum,
            ..
        } => {}
        e => panic!("{e}"),
    }
    f.write_all_at(&[0x11], 4096 + 9).unwrap();

    // A trimmed block reads as zeros, from the replica.
    c.trim(8192, 4096, 0).await.unwrap();
    let read = c.read_stored(8192, 4096).await.unwrap();
    assert_eq!((read.data, read.from_files), (block(0), false));

    // Below a snapshot, only what the new head holds comes from it.
    c.snapshot("s1", true, &Default::default()).await.unwrap();
    c.write(0, Bytes::from(vec![0x22u8; 32 << 10]), false, 0)
        .await
        .unwrap();
    let read = c.read_stored(4096, 4096).await.unwrap();
    assert_eq!((read.data, read.from_files), (block(0x22), true));
    // A hole in the head shows the snapshot: the replica answers.
    let read = c.read_stored(32 << 10, 4096).await.unwrap();
    assert_eq!((read.data, read.from_files), (block(0x11), false));
    // A revert drops the head whose file the client held.
    c.revert("s1").await.unwrap();
    let read = c.read_stored(4096, 4096).await.unwrap();
    assert_eq!(read.data, block(0x11));
    c.write(4096, block(0x33), false, 0).await.unwrap();
    let read = c.read_stored(4096, 4096).await.unwrap();
    assert_eq!((read.data, read.from_files), (block(0x33), true));

    // Another engine takes the replica over: no more reads for this one.
    let _newer = connect_with(&ep, 2, 2, 1.into()).await.unwrap();
    let e = c.read_stored(4096, 4096).await.unwrap_err();
    assert!(e.is_fenced(), "{e}");
}

/// Large reads sent from the files unchecked (`read_stored`), by the
/// replica or, from a replica on this node, read from its files by the
/// client itself: the data is right across layers and holes, rot shows up
/// as a mismatch that leaves the connection usable, and the verified read
/// then names the block.
#[tokio::test]
async fn reads_sent_from_the_files_are_checked_by_the_reader() {
    use rvol_replica::client::{ClientError, Links};
    use std::os::unix::fs::FileExt;
    let tmp = tempfile::tempdir().unwrap();
    for (ep, direct_reads) in [
        (format!("127.0.0.1:{}", free_port()), false),
        (sock(tmp.path()), false),
        (format!("127.0.0.1:{}", free_port()), true),
    ] {
        let dir = tempfile::tempdir_in(tmp.path()).unwrap();
        let _p = start_replica(dir.path(), &ep, "8M");
        let links = Links {
            connections: 1,
            direct_reads,
            tls: None,
            encryption: None,
        };
        let c = connect_with(&ep, 1, 1, links).await.unwrap();
        // A snapshot layer with 0x11 in the first MiB, the head with 0x22
        // over its second half, and a hole after.
        c.write(0, Bytes::from(vec![0x11u8; 1 << 20]), false, 0)
            .await
            .unwrap();
        c.snapshot("s1", true, &Default::default()).await.unwrap();
        c.write(512 << 10, Bytes::from(vec![0x22u8; 1 << 20]), false, 0)
            .await
            .unwrap();
        let mut want = vec![0x11u8; 512 << 10];
        want.extend(vec![0x22u8; 1 << 20]);
        want.extend(vec![0u8; 512 << 10]);
        let read = c.read_stored(0, 2 << 20).await.unwrap();
        assert_eq!(read.data, want, "{ep}");
        assert_eq!(read.from_files, direct_reads, "{ep}");
        // Rot one byte of the head behind the replica's back.
        let head = dir.path().join("data/volume-head-001.img");
        let f = std::fs::OpenOptions::new().write(true).open(&head).unwrap();
        f.write_all_at(&[0x23], (1 << 20) + 7).unwrap();
        drop(f);
        let e = c.read_stored(0, 2 << 20).await.unwrap_err();
        assert!(matches!(e, ClientError::StoredCrcMismatch(_)), "{ep}: {e}");
        // The same connections go on serving.
        assert_eq!(
            c.read_stored(0, 1 << 20).await.unwrap().data,
            want[..1 << 20],
            "{ep}"
        );
        match c.read(0, 2 << 20).await.unwrap_err() {
            ClientError::Remote {
                status: Status::Checksum,
                message,
            } => assert!(message.contains("block 256 "), "{ep}: {message}"),
            e => panic!("{ep}: {e}"),
        }
        // A snapshot changes the chain under the files the client holds.
        c.snapshot("s2", true, &Default::default()).await.unwrap();
        c.write(3 << 20, Bytes::from(vec![0x33u8; 64 << 10]), false, 0)
            .await
            .unwrap();
        let read = c.read_stored(2 << 20, 2 << 20).await.unwrap();
        assert_eq!(read.data[..1 << 20], vec![0u8; 1 << 20], "{ep}");
        assert_eq!(read.data[1 << 20..][..64 << 10], vec![0x33u8; 64 << 10]);
        assert_eq!(read.from_files, direct_reads, "{ep}");
    }
}
