//! Online rebuild with real processes: delta rebuild of a returning
//! replica (block for block), full rebuild of a replaced one (timed
//! against `cp`), zero blocks kept, bit rot repaired, the rate limit kept,
//! and data checked through the engine with one replica left.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn mode(admin: &str, i: usize) -> String {
    status(admin)["replicas"][i]["mode"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Waits until no system snapshot is left below the head and no purge
/// runs: a rebuild's cut is removed once it ends, and purged in the
/// background (a removed layer that still holds data the head reads
/// through stays, marked removed).
fn wait_chain_settled(admin: &str) {
    wait_until(
        "the rebuild's cut to be removed and purged",
        Duration::from_secs(60),
        || {
            let chain: serde_json::Value =
                serde_json::from_str(&http_get(admin, "/v1/snapshots")).unwrap();
            let chain = chain.as_array().unwrap();
            chain[..chain.len() - 1]
                .iter()
                .all(|l| l["user_created"] == true || l["removed"] == true)
                && status(admin)["purge"].is_null()
        },
    );
}

/// Every layer file of replica `a` has the same contents in replica `b`,
/// once the chain has settled.
fn assert_same_layers(admin: &str, a: &ReplicaProc, b: &ReplicaProc) {
    wait_chain_settled(admin);
    let chain = |r: &ReplicaProc| -> Vec<String> {
        let m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(r.dir.join("replica.json")).unwrap()).unwrap();
        m["chain"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    let (ca, cb) = (chain(a), chain(b));
    assert_eq!(ca.len(), cb.len(), "{ca:?} vs {cb:?}");
    // Snapshot layers carry the same names; heads are each replica's own.
    for (la, lb) in ca.iter().zip(&cb) {
        if la.starts_with("volume-snap-") {
            assert_eq!(la, lb);
        }
        let out = run(
            "cmp",
            &[
                a.dir.join(la).to_str().unwrap(),
                b.dir.join(lb).to_str().unwrap(),
            ],
        );
        assert!(
            out.status.success(),
            "{la} differs: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        // Below the head, holes must be holes too: a zero block that is
        // data shadows the layers below it.
        if la.starts_with("volume-snap-") {
            assert_eq!(
                data_extents(&a.dir.join(la)),
                data_extents(&b.dir.join(lb)),
                "{la}: allocation differs"
            );
        }
    }
}

/// `(start, end)` byte ranges of a file that hold data (SEEK_DATA/SEEK_HOLE).
fn data_extents(path: &std::path::Path) -> Vec<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len() as i64;
    let seek = |at: i64, whence: i32| unsafe { libc::lseek(f.as_raw_fd(), at, whence) };
    let mut out = Vec::new();
    let mut at = 0;
    while at < len {
        let start = seek(at, libc::SEEK_DATA);
        if start < 0 {
            break; // ENXIO: no data past `at`
        }
        let end = seek(start, libc::SEEK_HOLE);
        assert!(end > start, "SEEK_HOLE in {path:?}");
        out.push((start as u64, end as u64));
        at = end;
    }
    out
}

#[test]
fn a_returning_replica_receives_only_what_changed() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rs = replicas_on_fixed_ports(tmp.path(), 3, "1G");
    let (_engine, uri, admin) =
        start_engine("delta", "1G", &addrs(&rs), &["--replica-timeout", "2"]);
    // Half the volume holds data.
    qemu_io(&uri, &["write -P 0x5a 0 512M", "flush"]);
    rs[2].proc.kill9();
    // While r2 is away: 100 MiB changes in 1 MiB pieces; about 1,800
    // single blocks spread over the data half change, one in four by a
    // 512-byte write; 8 MiB of data is trimmed.
    let mut cmds = vec!["-f".to_string(), "raw".into(), uri.clone()];
    let mut run = |c: String| {
        cmds.push("-c".into());
        cmds.push(c);
    };
    for i in 0..100u64 {
        run(format!("write -P 0x{:02x} {}M 1M", (i % 200) + 1, i * 10));
    }
    let scattered: Vec<u64> = (0..2000u64)
        .map(|i| (i * 7919) % (128 << 10) * 4096) // distinct blocks of 512 MiB
        .filter(|at| at % (10 << 20) >= 1 << 20) // not in a 1 MiB piece
        .collect();
    for (i, at) in scattered.iter().enumerate() {
        if i % 4 == 0 {
            run(format!("write -P 0xee {} 512", at + 1024));
        } else {
            run(format!("write -P 0xee {at} 4k"));
        }
    }
    run("discard 401M 8M".into());
    run("flush".into());
    run_ok(
        "qemu-io",
        &cmds.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    rs[2].restart("1G");
    wait_until("r2 to be rebuilt", Duration::from_secs(120), || {
        mode(&admin, 2) == "RW"
    });
    let copied = status(&admin)["rebuilt_bytes"].as_u64().unwrap();
    let changed = (100 << 20) + scattered.len() as u64 * 4096 + (8 << 20);
    println!(
        "delta rebuild: {copied} bytes sent for {changed} changed ({} scattered blocks) on a 1 GiB volume (half data)",
        scattered.len()
    );
    assert!(
        copied >= 100 << 20,
        "copied {copied}: less than what changed"
    );
    assert!(
        copied <= changed + changed / 10,
        "copied {copied}: more than the {changed} that changed, plus 10 %"
    );
    assert_same_layers(&admin, &rs[0], &rs[2]);
    let sha = export_sha(&uri, tmp.path());
    // r2 alone returns the same data.
    rs[0].proc.kill9();
    rs[1].proc.kill9();
    assert_eq!(export_sha(&uri, tmp.path()), sha);
    let (full, part) = (scattered[1], scattered[0]);
    qemu_io(
        &uri,
        &[
            "read -P 0x01 0 1M",
            "read -P 0x64 990M 1M",
            &format!("read -P 0xee {full} 4k"),
            &format!("read -P 0x5a {part} 1k"),
            &format!("read -P 0xee {} 512", part + 1024),
            &format!("read -P 0x5a {} 2560", part + 1536),
            "read -P 0 401M 8M",
            "read -P 0 1000M 24M",
        ],
    );
}

#[test]
fn a_replaced_replica_is_rebuilt_in_full_and_timed_against_cp() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rs = replicas_on_fixed_ports(tmp.path(), 2, "1G");
    let (_engine, uri, admin) =
        start_engine("full", "1G", &addrs(&rs), &["--replica-timeout", "2"]);
    qemu_io(
        &uri,
        &["write -P 0x33 0 256M", "write -P 0x44 512M 256M", "flush"],
    );
    // The disk under r1 is replaced: a new, empty replica at its address.
    rs[1].proc.kill9();
    std::fs::remove_dir_all(&rs[1].dir).unwrap();
    let t = Instant::now();
    rs[1].restart("1G");
    wait_until("r1 to be rebuilt", Duration::from_secs(180), || {
        let s = status(&admin);
        s["rebuilt_bytes"].as_u64() > Some(0) && s["replicas"][1]["mode"] == "RW"
    });
    let rebuild = t.elapsed();
    let copied = status(&admin)["rebuilt_bytes"].as_u64().unwrap();
    assert_eq!(
        copied,
        512 << 20,
        "a new replica receives exactly the data, holes stay holes"
    );
    // The same data copied by cp, for comparison.
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(rs[0].dir.join("replica.json")).unwrap()).unwrap();
    let layer = m["chain"][0].as_str().unwrap().to_string();
    let t = Instant::now();
    run_ok(
        "cp",
        &[
            "--sparse=always",
            rs[0].dir.join(&layer).to_str().unwrap(),
            tmp.path().join("copy.img").to_str().unwrap(),
        ],
    );
    let cp = t.elapsed();
    println!(
        "full rebuild of 1 GiB (512 MiB data): {:.2} s ({:.0} MiB/s, includes start-up and the 2 s retry period); cp --sparse=always: {:.2} s; ratio {:.1}x",
        rebuild.as_secs_f64(),
        512.0 / rebuild.as_secs_f64(),
        cp.as_secs_f64(),
        rebuild.as_secs_f64() / cp.as_secs_f64()
    );
    let du = run_ok("du", &["-k", rs[1].dir.join(&layer).to_str().unwrap()]);
    let kib: u64 = du.split_whitespace().next().unwrap().parse().unwrap();
    assert!(
        kib < 600 << 10,
        "rebuilt layer allocates {kib} KiB: holes were filled"
    );
    assert_same_layers(&admin, &rs[0], &rs[1]);
    rs[0].proc.kill9();
    qemu_io(
        &uri,
        &[
            "read -P 0x33 0 256M",
            "read -P 0 256M 256M",
            "read -P 0x44 512M 256M",
        ],
    );
}

/// `rvol replica add local:DIR` creates the replica in the engine's own
/// process, of the volume's size, and rebuilds it; a directory that is not
/// a replica's is refused and left alone.
#[test]
fn a_replica_added_in_the_engines_process_is_created_and_rebuilt() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rs = replicas_on_fixed_ports(tmp.path(), 1, "256M");
    let (_engine, uri, admin) = start_engine("addlocal", "256M", &addrs(&rs), &[]);
    qemu_io(&uri, &["write -P 0x5a 0 64M", "flush"]);
    let add = |dir: &std::path::Path| {
        let local = format!("local:{}", dir.display());
        run(RVOL, &["replica", "add", &local, "--admin", &admin])
    };
    let foreign = tmp.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), b"mine").unwrap();
    let refused = add(&foreign);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("not empty"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_dir(&foreign).unwrap().count(), 1);
    assert_eq!(modes(&admin), ["RW"]);

    assert!(add(&tmp.path().join("local")).status.success());
    wait_until(
        "the local replica to be rebuilt",
        Duration::from_secs(120),
        || modes(&admin) == ["RW", "RW"],
    );
    assert_eq!(status(&admin)["rebuilt_bytes"], 64 << 20);
    // Reads go to the replica in the engine's process: with the other one
    // stopped they all complete, and none times out on it. (Plain NBD
    // reads: a client that flushes on close would wait for the stopped one.)
    rs[0].proc.signal(libc::SIGSTOP);
    let mut c = RawNbd::open(&uri);
    for mib in 0..128u64 {
        c.request(0, mib, mib << 20, 1 << 20, &[]);
        let (err, _, data) = c.reply(1 << 20);
        let want = if mib < 64 { 0x5a } else { 0 };
        assert!(err == 0 && data.iter().all(|&b| b == want), "MiB {mib}");
    }
    assert_eq!(modes(&admin), ["RW", "RW"]);
    rs[0].proc.signal(libc::SIGCONT);
    rs[0].proc.kill9();
    qemu_io(&uri, &["write -P 0x5b 1M 1M", "read -P 0x5b 1M 1M"]);
}

#[test]
fn a_rebuild_keeps_zeroed_blocks_that_shadow_a_snapshot() {
    // Write-zeroes above a kept snapshot writes zero blocks as data; a
    // rebuild that turned them into holes would let the snapshot's data
    // show through on the rebuilt replica.
    let tmp = tempfile::tempdir().unwrap();
    let mut rs = replicas_on_fixed_ports(tmp.path(), 3, "16M");
    let (mut engine, uri, admin) =
        start_engine("zeroes", "16M", &addrs(&rs), &["--replica-timeout", "2"]);
    qemu_io(&uri, &["write -P 0x33 0 8M"]);
    run_ok(RVOL, &["snapshot", "create", "base", "--admin", &admin]);
    rs[2].proc.kill9();
    qemu_io(
        &uri,
        &["write -z 0 2M", "write -z -u 2M 2M", "write -P 0x44 8M 1M"],
    );
    rs[2].restart("16M");
    wait_until("r2 to be rebuilt", Duration::from_secs(60), || {
        mode(&admin, 2) == "RW"
    });
    assert!(status(&admin)["rebuilt_bytes"].as_u64().unwrap() > 0);
    assert_same_layers(&admin, &rs[0], &rs[2]);
    assert_eq!(engine.stop(), 0);
    // The rebuilt replica alone.
    let (_engine, uri, _) = start_engine("zeroes", "16M", &addrs(&rs[2..]), &[]);
    qemu_io(
        &uri,
        &["read -P 0 0 4M", "read -P 0x33 4M 4M", "read -P 0x44 8M 1M"],
    );
}

#[test]
fn bit_rot_in_one_replica_is_read_around_reported_and_repaired() {
    use std::os::unix::fs::FileExt;
    let tmp = tempfile::tempdir().unwrap();
    let mut rs = replicas_on_fixed_ports(tmp.path(), 3, "16M");
    let (mut engine, uri, admin) =
        start_engine("rot", "16M", &addrs(&rs), &["--replica-timeout", "2"]);
    qemu_io(&uri, &["write -P 0x5c 0 8M", "flush"]);
    // Rot: one byte of r0's head changes on disk, behind the replica's back.
    let head = rs[0].dir.join("volume-head-000.img");
    let f = std::fs::OpenOptions::new().write(true).open(&head).unwrap();
    f.write_all_at(&[0x5d], 10 * 4096 + 5).unwrap();
    drop(f);
    // Reads rotate over the replicas: every one of them returns good data.
    for _ in 0..6 {
        qemu_io(&uri, &["read -P 0x5c 0 8M"]);
    }
    let s = status(&admin);
    assert!(s["checksum_errors"].as_u64().unwrap() >= 1, "{s}");
    // 8 MiB reads are sent from the files: the engine caught the rot and
    // read again verified, which named the block. (An encrypted volume's
    // reads are all verified: each block's nonce and tag come with them.)
    if !encryption_enabled() {
        assert!(s["stored_crc_rereads"].as_u64().unwrap() >= 1, "{s}");
    }
    // Reported where monitoring scrapes.
    let metrics = http_get(&admin, "/metrics");
    let sample = |series: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{series} in:\n{metrics}"))
    };
    assert!(metrics.contains("# TYPE rvol_checksum_errors counter"));
    assert!(sample("rvol_checksum_errors_total{volume=\"rot\"}") >= 1.0);
    // The six 8 MiB reads above, each one request of the NBD client's.
    assert!(sample("rvol_volume_requests_total{volume=\"rot\",op=\"read\"}") >= 6.0);
    assert!(
        sample("rvol_volume_request_bytes_total{volume=\"rot\",op=\"read\"}")
            >= 6.0 * 8.0 * 1048576.0
    );
    assert!(
        sample("rvol_volume_request_duration_seconds_count{volume=\"rot\",op=\"write\"}") >= 1.0
    );
    wait_until("r0 to be repaired", Duration::from_secs(60), || {
        let s = status(&admin);
        mode(&admin, 0) == "RW" && s["rebuilt_bytes"].as_u64().unwrap() > 0
    });
    // Rot in a snapshot layer of r1, found by a scrub rather than a read.
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(rs[1].dir.join("replica.json")).unwrap()).unwrap();
    let oldest = meta["chain"][0].as_str().unwrap();
    assert!(oldest.starts_with("volume-snap-"), "{meta}");
    let snap = rs[1].dir.join(oldest);
    let f = std::fs::OpenOptions::new().write(true).open(&snap).unwrap();
    f.write_all_at(&[0x00], 3 * 4096 + 99).unwrap();
    drop(f);
    let out = run_ok(RVOL, &["snapshot", "verify", "--admin", &admin]);
    let bad: Vec<&str> = out.lines().filter(|l| l.contains(" bad ")).collect();
    assert!(
        bad.len() == 1 && bad[0].starts_with(&rs[1].addr) && bad[0].contains("1 bad"),
        "{out}"
    );
    wait_until("r1 to be repaired", Duration::from_secs(60), || {
        mode(&admin, 1) == "RW"
    });
    let out = run_ok(RVOL, &["snapshot", "verify", "--admin", &admin]);
    assert_eq!(out.matches("all good").count(), 3, "{out}");
    assert_eq!(engine.stop(), 0);
    // r0 alone now holds good data.
    rs[1].proc.kill9();
    rs[2].proc.kill9();
    let (_engine, uri, admin) = start_engine("rot", "16M", &addrs(&rs[..1]), &[]);
    qemu_io(&uri, &["read -P 0x5c 0 8M"]);
    assert_eq!(status(&admin)["checksum_errors"], 0);
}

/// Large reads are sent from the replicas' files and checked by the
/// engine against the recorded checksums. A write to the same blocks can
/// land between the two; that must cost a second read, not a replica.
#[test]
fn reads_racing_writes_to_the_same_blocks_are_not_taken_for_rot() {
    let tmp = tempfile::tempdir().unwrap();
    let rs = replicas_on_fixed_ports(tmp.path(), 2, "16M");
    let (_engine, uri, admin) = start_engine("race", "16M", &addrs(&rs), &[]);
    let writes: Vec<String> = (0..150)
        .map(|i| format!("write -P {} 0 4M", i % 200 + 1))
        .collect();
    let reads: Vec<String> = (0..300).map(|_| "read 0 4M".to_string()).collect();
    std::thread::scope(|s| {
        for cmds in [&writes, &reads] {
            let uri = &uri;
            s.spawn(move || {
                let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
                qemu_io(uri, &cmds)
            });
        }
    });
    let s = status(&admin);
    eprintln!("reads sent again verified: {}", s["stored_crc_rereads"]);
    assert_eq!(s["checksum_errors"], 0, "{s}");
    assert_eq!(modes(&admin), ["RW", "RW"], "{s}");
    // A replica taken out and back would have been rebuilt.
    assert_eq!(s["rebuilt_bytes"], 0, "{s}");
    qemu_io(&uri, &["read -P 150 0 4M"]);
}

#[test]
fn a_rebuild_keeps_to_its_rate_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rs = replicas_on_fixed_ports(tmp.path(), 2, "64M");
    let (_engine, uri, admin) = start_engine(
        "rate",
        "64M",
        &addrs(&rs),
        &["--replica-timeout", "2", "--rebuild-rate-mib", "8"],
    );
    qemu_io(&uri, &["write -P 0x21 0 64M", "flush"]);
    rs[1].proc.kill9();
    std::fs::remove_dir_all(&rs[1].dir).unwrap();
    rs[1].restart("64M");
    // Unlimited, this rebuild takes about a second even in a debug build;
    // at 8 MiB/s, 64 MiB takes 8 s less the few chunks copied ahead.
    let mut first_seen = None;
    let mut rates = Vec::new();
    wait_until("r1 to be rebuilt", Duration::from_secs(120), || {
        let s = status(&admin);
        if let Some(r) = s["rebuild"].as_object() {
            first_seen.get_or_insert_with(Instant::now);
            if r["copied"].as_u64().unwrap() >= 8 << 20 {
                rates.push(r["mib_per_s"].as_f64().unwrap());
            }
        }
        s["rebuilt_bytes"].as_u64() > Some(0) && mode(&admin, 1) == "RW"
    });
    let took = first_seen.expect("the rebuild was never seen").elapsed();
    println!("rate-limited rebuild of 64 MiB at 8 MiB/s: {took:?}, rates seen {rates:?}");
    assert!(took >= Duration::from_secs(6), "took {took:?}");
    assert!(
        !rates.is_empty() && rates.iter().all(|&r| r <= 10.0),
        "{rates:?}"
    );
    assert_eq!(status(&admin)["rebuilt_bytes"], 64 << 20);
}

/// A rebuild whose cut fails on the joining replica (here: its name is
/// taken there by a directory, as a full disk would fail it) fails; the RW
/// replicas after the joining one in the set still take the cut, so every
/// RW replica keeps the same chain, and none is dropped (found by the
/// chaos soak: RW replicas whose chains differed by a cut, then dropped
/// for lacking it).
#[test]
fn a_cut_that_fails_on_the_joining_replica_leaves_the_rw_chains_alike() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rs = replicas_on_fixed_ports(tmp.path(), 3, "16M");
    let (engine, uri, admin) =
        start_engine("badcut", "16M", &addrs(&rs), &["--replica-timeout", "2"]);
    qemu_io(&uri, &["write -P 0x11 0 1M", "flush"]);
    rs[1].proc.kill9();
    qemu_io(&uri, &["write -P 0x22 0 1M", "flush"]);
    // Every cut this engine names is taken in r1's directory.
    let pid = engine.child.id();
    for n in 0..100 {
        let name = format!("volume-snap-rebuild-g1-{pid}-{n}.img");
        std::fs::create_dir(rs[1].dir.join(name)).unwrap();
    }
    rs[1].restart("16M");
    wait_until("two failed rebuilds", Duration::from_secs(30), || {
        http_get(&admin, "/v1/events")
            .matches("rebuild failed")
            .count()
            >= 2
    });
    let chain = |r: &ReplicaProc| {
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(r.dir.join("replica.json")).unwrap()).unwrap();
        meta["chain"].clone()
    };
    assert_eq!(chain(&rs[0]), chain(&rs[2]), "the RW replicas' chains");
    assert_eq!(mode(&admin, 0), "RW", "{}", status(&admin));
    assert_eq!(mode(&admin, 2), "RW", "{}", status(&admin));
    qemu_io(&uri, &["read -P 0x22 0 1M"]);
}

/// A rebuild whose source stops answering mid-copy is given up as soon as
/// the I/O path fails that source, and the next attempt copies from
/// another replica (found by the chaos soak: a rebuild waiting minutes on
/// a frozen source, and every other re-attach and rebuild with it).
#[test]
fn a_rebuild_whose_source_freezes_starts_again_from_another() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rs = replicas_on_fixed_ports(tmp.path(), 3, "64M");
    let args = ["--replica-timeout", "2", "--rebuild-rate-mib", "2"];
    let (_engine, uri, admin) = start_engine("frozensrc", "64M", &addrs(&rs), &args);
    qemu_io(&uri, &["write -P 0x11 0 16M", "flush"]);
    rs[1].proc.kill9();
    qemu_io(&uri, &["write -P 0x22 0 16M", "flush"]);
    rs[1].restart("64M");
    wait_until("the rebuild to start", Duration::from_secs(20), || {
        !status(&admin)["rebuild"].is_null()
    });
    // r0, the source, freezes; a write (not FUA, which would wait for the
    // flush timeout) makes the I/O path fail it.
    rs[0].proc.signal(libc::SIGSTOP);
    let frozen = Instant::now();
    let mut c = RawNbd::open(&uri);
    c.request(1, 1, 16 << 20, 4096, &[0x33; 4096]);
    assert_eq!(c.reply(0).0, 0);
    wait_until("r1 to be rebuilt from r2", Duration::from_secs(60), || {
        mode(&admin, 1) == "RW"
    });
    println!("r1 RW {:?} after its source froze", frozen.elapsed());
    assert_eq!(mode(&admin, 0), "ERR", "{}", status(&admin));
    rs[2].proc.kill9();
    // r1 alone holds every write.
    qemu_io(&uri, &["read -P 0x22 0 16M", "read -P 0x33 16M 4k"]);
    rs[0].proc.signal(libc::SIGCONT);
}

/// A rebuild's cut that an engine died with on one replica only (its
/// chain then differs from the others') is removed by the next engine
/// before it serves: a trim, which punches a head only where nothing kept
/// lies below, must leave every replica reading alike (found by the chaos
/// soak: a read returned zeroes after a trim, and the next, from another
/// replica, the data from before it).
#[test]
fn a_cut_left_on_one_replica_is_removed_before_the_next_engine_serves() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rs = replicas_on_fixed_ports(tmp.path(), 2, "16M");
    let (mut engine, uri, _) = start_engine("leftcut", "16M", &addrs(&rs), &[]);
    qemu_io(&uri, &["write -P 0x11 0 1M", "flush"]);
    assert_eq!(engine.stop(), 0);
    // What an engine killed between the replicas' cuts leaves.
    rs[0].proc.kill9();
    let r0 = rvol_replica::Replica::open(&rs[0].dir).unwrap();
    r0.snapshot("rebuild-g1-1-0", false, Default::default())
        .unwrap();
    drop(r0);
    rs[0].restart("16M");
    let (_engine, uri, admin) = start_engine("leftcut", "16M", &addrs(&rs), &[]);
    assert_eq!(modes(&admin), ["RW", "RW"], "{}", status(&admin));
    qemu_io(&uri, &["discard 0 1M", "flush"]);
    // Each replica alone reads the trimmed range the same: as zeroes.
    rs[1].proc.kill9();
    qemu_io(&uri, &["read -P 0 0 1M"]);
}
