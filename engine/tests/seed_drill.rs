//! The seed drill, on hosts of their own: three replica hosts and a
//! diskless engine host (network namespaces), a writer with periodic
//! flushes throughout, and replicas stopped and started under it.

mod common;

use std::time::Duration;

use common::netns::Lab;
use common::*;

#[test]
fn seed_drill() {
    if !Lab::available() {
        eprintln!("SKIPPED: network namespaces need root and iproute2");
        return;
    }
    let lab = Lab::new(&["r1", "r2", "r3", "eng"]);
    let tmp = tempfile::tempdir().unwrap();
    let dirs: Vec<_> = (0..3)
        .map(|i| tmp.path().join(format!("r{}", i + 1)))
        .collect();
    let listen: Vec<String> = (0..3).map(|i| format!("{}:4001", lab.host(i).ip)).collect();
    let start = |i: usize| {
        Proc::start_in(
            &lab.host(i).ns,
            &[
                "replica",
                "--dir",
                dirs[i].to_str().unwrap(),
                "--listen",
                &listen[i],
                "--size",
                "64M",
            ],
        )
    };
    let mut rs: Vec<Proc> = (0..3).map(start).collect();
    // The engine host has no disk of its own: it reaches replicas over the
    // lab network and serves NBD and admin on Unix sockets.
    let nbd = format!("unix:{}", tmp.path().join("nbd.sock").display());
    let admin = format!("unix:{}", tmp.path().join("admin.sock").display());
    let mut args = vec![
        "engine",
        "--name",
        "drill",
        "--size",
        "64M",
        "--nbd-listen",
        &nbd,
        "--admin-listen",
        &admin,
    ];
    args.extend(["--replica-timeout", "2", "--io-hold-timeout", "60"]);
    for l in &listen {
        args.extend(["--replica", l.as_str()]);
    }
    let encryption = encryption_args();
    args.extend(encryption.iter().map(String::as_str));
    let _engine = Proc::start_in(&lab.host(3).ns, &args);
    let w = Writer::start(&nbd, 16384);
    w.wait_progress(300, Duration::from_secs(20));

    rs[1].kill9(); // stop r2: writes go on
    w.wait_progress(300, Duration::from_secs(20));
    rs[2].kill9(); // stop r3: writes go on with one replica
    w.wait_progress(300, Duration::from_secs(20));
    wait_until("r2, r3 out", Duration::from_secs(10), || {
        modes(&admin) == ["RW", "ERR", "ERR"]
    });

    rs[1] = start(1); // start r2 and r3: both rebuilt while writes go on
    rs[2] = start(2);
    wait_until("all RW", Duration::from_secs(90), || {
        modes(&admin) == ["RW", "RW", "RW"]
    });
    w.wait_progress(300, Duration::from_secs(20));
    assert!(status(&admin)["rebuilt_bytes"].as_u64().unwrap() > 0);

    for r in rs.iter_mut() {
        r.kill9(); // stop all three: I/O stalls
    }
    std::thread::sleep(Duration::from_secs(3));
    let stalled = w.acked();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(w.acked(), stalled, "writes acknowledged with no replica");
    rs = (0..3).map(start).collect(); // back within the hold time
    w.wait_progress(300, Duration::from_secs(30));
    wait_until("healthy", Duration::from_secs(90), || {
        status(&admin)["state"] == "healthy"
    });
    w.finish(); // no error seen, every acknowledged write reads back

    // The replicas hold the same data: each alone serves what the others do.
    let whole = tmp.path().join("whole.img");
    let digest = |keep: usize, rs: &mut Vec<Proc>| {
        for (i, r) in rs.iter_mut().enumerate() {
            if i != keep {
                r.kill9();
            }
        }
        let _ = std::fs::remove_file(&whole);
        export_to_file(&format!("nbd+unix:///?socket={}", &nbd[5..]), &whole);
        sha256_file(&whole)
    };
    let mut sums = Vec::new();
    for keep in 0..3 {
        sums.push(digest(keep, &mut rs));
        for i in (0..3).filter(|&i| i != keep) {
            rs[i] = start(i);
        }
        wait_until("healthy", Duration::from_secs(90), || {
            status(&admin)["state"] == "healthy"
        });
    }
    assert!(
        sums.iter().all(|s| *s == sums[0]),
        "replicas differ: {sums:?}"
    );
}

#[test]
fn replicas_are_added_listed_and_removed_online() {
    let tmp = tempfile::tempdir().unwrap();
    let rs = replicas_on_fixed_ports(tmp.path(), 2, "32M");
    let (_engine, uri, admin) = start_engine("addrm", "32M", &[rs[0].addr.clone()], &[]);
    // 8 MiB of 0x61 at 16 MiB; the writer works on the first 16 MiB.
    qemu_io(&uri, &["write -P 0x61 16M 8M", "flush"]);
    let w = Writer::start(&uri, 4096);
    run_ok(RVOL, &["replica", "add", &rs[1].addr, "--admin", &admin]);
    let out = run(RVOL, &["replica", "add", &rs[1].addr, "--admin", &admin]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("already a replica")
    );
    wait_until(
        "the added replica to be rebuilt",
        Duration::from_secs(60),
        || status(&admin)["replicas"][1]["mode"] == "RW",
    );
    w.wait_progress(200, Duration::from_secs(20));
    let ls = run_ok(RVOL, &["replica", "ls", "--admin", &admin]);
    assert_eq!(ls.matches(" RW ").count(), 2, "{ls}");
    // The original replica goes; the added one carries the volume alone.
    run_ok(RVOL, &["replica", "rm", &rs[0].addr, "--admin", &admin]);
    let out = run(RVOL, &["replica", "rm", &rs[1].addr, "--admin", &admin]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("last RW replica")
    );
    w.wait_progress(200, Duration::from_secs(20));
    w.finish();
    qemu_io(&uri, &["read -P 0x61 16M 8M"]);
    assert_eq!(status(&admin)["replicas"].as_array().unwrap().len(), 1);
}
