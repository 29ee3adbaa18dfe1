//! Losing replicas: a replica that missed nothing rejoins by itself, one
//! that missed writes stays out, and with every replica gone I/O is held,
//! then resumes (or fails once the hold time is over).

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn current_replicas_rejoin_and_stale_ones_are_rebuilt() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rs = replicas_on_fixed_ports(tmp.path(), 3, "16M");
    let (_engine, uri, admin) =
        start_engine("rejoin", "16M", &addrs(&rs), &["--replica-timeout", "2"]);
    let mut c = RawNbd::open(&uri);
    c.request(1, 1, 0, 4096, &[1; 4096]);
    assert_eq!(c.reply(0).0, 0);
    // r0 goes away while nothing is written, and comes back as it is.
    rs[0].proc.kill9();
    c.request(0, 2, 0, 4096, &[]); // reads may pick r0 and fail over
    assert_eq!(c.reply(4096).0, 0);
    rs[0].restart("16M");
    wait_until("r0 to rejoin", Duration::from_secs(15), || {
        modes(&admin)[0] == "RW"
    });
    assert_eq!(
        status(&admin)["rebuilt_bytes"],
        0,
        "a current replica needs no copy"
    );
    // r1 goes away and misses a write: it is rebuilt when it returns.
    rs[1].proc.kill9();
    c.request(1, 3, 8192, 4096, &[3; 4096]);
    assert_eq!(c.reply(0).0, 0);
    assert_eq!(status(&admin)["replicas"][1]["stale"], true);
    rs[1].restart("16M");
    wait_until("r1 to be rebuilt", Duration::from_secs(20), || {
        modes(&admin)[1] == "RW"
    });
    let s = status(&admin);
    assert!(s["rebuilt_bytes"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(s["replicas"][1]["stale"], false);
    // r1 alone serves what it missed.
    rs[0].proc.kill9();
    rs[2].proc.kill9();
    c.request(0, 4, 8192, 4096, &[]);
    let (err, _, data) = c.reply(4096);
    assert_eq!(err, 0);
    assert_eq!(data, vec![3; 4096]);
}

#[test]
fn a_flush_slower_than_the_answer_timeout_keeps_its_replica() {
    let tmp = tempfile::tempdir().unwrap();
    let rs = replicas_on_fixed_ports(tmp.path(), 3, "16M");
    let (_engine, uri, admin) = start_engine(
        "slowflush",
        "16M",
        &addrs(&rs),
        &["--replica-timeout", "2", "--flush-timeout", "30"],
    );
    let mut c = RawNbd::open(&uri);
    c.request(1, 1, 0, 4096, &[7; 4096]);
    assert_eq!(c.reply(0).0, 0);
    // r1 stops answering for twice the answer timeout while a flush (and
    // nothing else) waits on it: the flush is slow, not failed.
    rs[1].proc.signal(libc::SIGSTOP);
    c.request(3, 2, 0, 0, &[]);
    std::thread::sleep(Duration::from_secs(4));
    rs[1].proc.signal(libc::SIGCONT);
    assert_eq!(c.reply(0).0, 0, "the flush succeeds");
    assert_eq!(modes(&admin), ["RW", "RW", "RW"], "{}", status(&admin));
    // A write is still held to the answer timeout.
    rs[1].proc.signal(libc::SIGSTOP);
    c.request(1, 3, 0, 4096, &[8; 4096]);
    assert_eq!(c.reply(0).0, 0);
    rs[1].proc.signal(libc::SIGCONT);
    assert_eq!(modes(&admin)[1], "ERR", "{}", status(&admin));
}

#[test]
fn io_is_held_while_every_replica_is_gone_and_resumes_without_error() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rs = replicas_on_fixed_ports(tmp.path(), 3, "64M");
    let (_engine, uri, admin) = start_engine(
        "hold",
        "64M",
        &addrs(&rs),
        &["--replica-timeout", "2", "--io-hold-timeout", "30"],
    );
    let acked = Arc::new(AtomicU64::new(0));
    let last_ack_ms = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let writer = {
        let (acked, last, stop, uri) = (
            acked.clone(),
            last_ack_ms.clone(),
            stop.clone(),
            uri.clone(),
        );
        std::thread::spawn(move || {
            let mut c = RawNbd::open(&uri);
            let mut written = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Acquire) {
                n += 1;
                let block = n % 16384;
                let data = pseudo_random(n, 4096);
                c.request(1, n, block * 4096, 4096, &data);
                let (err, _, _) = c.reply(0);
                assert_eq!(err, 0, "write {n} failed while replicas were away");
                if n.is_multiple_of(32) {
                    c.request(3, 0, 0, 0, &[]);
                    assert_eq!(c.reply(0).0, 0, "flush failed");
                }
                written.push((block, data));
                acked.fetch_add(1, Ordering::Release);
                last.store(t0.elapsed().as_millis() as u64, Ordering::Release);
            }
            // Everything acknowledged reads back (the newest write per block).
            let mut newest = std::collections::HashMap::new();
            for (b, d) in written {
                newest.insert(b, d);
            }
            for (b, d) in newest {
                c.request(0, b, b * 4096, 4096, &[]);
                let (err, _, got) = c.reply(4096);
                assert_eq!(err, 0);
                assert!(got == d, "block {b} lost an acknowledged write");
            }
        })
    };
    wait_until("some writes", Duration::from_secs(10), || {
        acked.load(Ordering::Acquire) > 500
    });
    for r in rs.iter_mut() {
        r.proc.kill9();
    }
    std::thread::sleep(Duration::from_secs(3));
    let stalled_at = acked.load(Ordering::Acquire);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        acked.load(Ordering::Acquire),
        stalled_at,
        "I/O went on with no replica"
    );
    assert_eq!(status(&admin)["state"], "faulted");
    for r in rs.iter_mut() {
        r.restart("64M");
    }
    wait_until("I/O to resume", Duration::from_secs(20), || {
        acked.load(Ordering::Acquire) > stalled_at + 500
    });
    stop.store(true, Ordering::Release);
    writer
        .join()
        .expect("the writer saw no error and read everything back");
    let s = status(&admin);
    assert!(modes(&admin).iter().any(|m| m == "RW"), "{s}");
    assert_ne!(s["state"], "faulted");
}

#[test]
fn when_the_hold_time_passes_io_fails_and_the_volume_is_faulted() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rs = replicas_on_fixed_ports(tmp.path(), 1, "16M");
    let (_engine, uri, admin) = start_engine(
        "fault",
        "16M",
        &addrs(&rs),
        &["--replica-timeout", "1", "--io-hold-timeout", "2"],
    );
    let mut c = RawNbd::open(&uri);
    c.request(1, 1, 0, 4096, &[7; 4096]);
    assert_eq!(c.reply(0).0, 0);
    rs[0].proc.kill9();
    let t = Instant::now();
    c.request(1, 2, 4096, 4096, &[8; 4096]);
    assert_eq!(c.reply(0).0, 5, "EIO once the hold time is over");
    assert!(
        t.elapsed() >= Duration::from_secs(2),
        "failed before the hold time"
    );
    assert_eq!(status(&admin)["state"], "faulted");
    // The replica returns: the volume serves again.
    rs[0].restart("16M");
    wait_until("the volume to recover", Duration::from_secs(15), || {
        status(&admin)["state"] == "healthy"
    });
    c.request(0, 3, 0, 4096, &[]);
    let (err, _, data) = c.reply(4096);
    assert_eq!(err, 0);
    assert_eq!(data, vec![7; 4096]);
}
