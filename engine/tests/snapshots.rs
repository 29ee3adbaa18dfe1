//! User snapshots through the engine: taken under a live writer on every
//! replica, listed with their labels and sizes, and kept across an engine
//! restart.

mod common;

use std::time::Duration;

use common::*;

fn chain(admin: &str) -> Vec<serde_json::Value> {
    let out = run_ok(RVOL, &["snapshot", "ls", "--admin", admin, "--json"]);
    serde_json::from_str::<serde_json::Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn snapshots_are_taken_on_every_replica_under_load_and_listed() {
    let tmp = tempfile::tempdir().unwrap();
    let rs = three_replicas(tmp.path(), "32M");
    let (mut engine, uri, admin) = start_engine("snaps", "32M", &addrs(&rs), &[]);
    // 4 MiB of 0x61 at 16 MiB; the writer works on the first 8 MiB.
    run_ok(
        "qemu-io",
        &["-f", "raw", &uri, "-c", "write -P 0x61 16M 4M"],
    );
    let w = Writer::start(&uri, 2048);
    w.wait_progress(200, Duration::from_secs(20));

    let out = run_ok(
        RVOL,
        &[
            "snapshot", "create", "before", "--label", "app=db", "--admin", &admin,
        ],
    );
    assert!(out.contains("snapshot before taken"), "{out}");
    eprintln!("{out}"); // the pause, for the record
    let again = run(RVOL, &["snapshot", "create", "before", "--admin", &admin]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists"));
    let bad = run(RVOL, &["snapshot", "create", "a/b", "--admin", &admin]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("snapshot name"));
    let bad_label = run(
        RVOL,
        &[
            "snapshot", "create", "x", "--label", "nokey", "--admin", &admin,
        ],
    );
    assert!(!bad_label.status.success());
    run_ok(RVOL, &["snapshot", "create", "--admin", &admin]); // a generated name
    w.wait_progress(200, Duration::from_secs(20));

    run_ok(
        "qemu-io",
        &["-f", "raw", &uri, "-c", "write -P 0x62 16M 4M"],
    );
    w.finish(); // every acknowledged write reads back, snapshots or not

    let layers = chain(&admin);
    assert_eq!(layers.len(), 3, "{layers:?}");
    let before = &layers[0];
    assert_eq!(before["name"], "volume-snap-before.img");
    assert_eq!(before["user_created"], true);
    assert_eq!(before["labels"]["app"], "db");
    assert!(before["allocated_bytes"].as_u64().unwrap() >= 4 << 20);
    assert!(layers[1]["name"]
        .as_str()
        .unwrap()
        .starts_with("volume-snap-snap-"));
    assert!(layers[2]["name"]
        .as_str()
        .unwrap()
        .starts_with("volume-head-"));
    let table = run_ok(RVOL, &["snapshot", "ls", "--admin", &admin]);
    assert!(
        table.contains("before") && table.contains("user") && table.contains("app=db"),
        "{table}"
    );

    // Every replica froze the old data; the volume serves the new.
    for r in &rs {
        let snap = std::fs::read(r.dir.join("volume-snap-before.img")).unwrap();
        assert!(
            snap[16 << 20..20 << 20].iter().all(|&b| b == 0x61),
            "replica {}",
            r.addr
        );
    }
    run_ok("qemu-io", &["-f", "raw", &uri, "-c", "read -P 0x62 16M 4M"]);

    // The chain survives an engine restart.
    assert_eq!(engine.stop(), 0);
    let (_engine, uri, admin) = start_engine("snaps", "32M", &addrs(&rs), &[]);
    assert_eq!(chain(&admin).len(), 3);
    run_ok("qemu-io", &["-f", "raw", &uri, "-c", "read -P 0x62 16M 4M"]);
}
