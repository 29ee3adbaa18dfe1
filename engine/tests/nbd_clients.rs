//! The replicated volume through real NBD clients: qemu-img, qemu-io,
//! nbdinfo, nbdsh and fio, against real `rvol replica` and `rvol engine`
//! processes on loopback.

mod common;

use common::*;

#[test]
fn qemu_img_round_trip_of_a_random_image() {
    let tmp = tempfile::tempdir().unwrap();
    let rs = three_replicas(tmp.path(), "64M");
    let (_engine, uri, _) = start_engine("img", "64M", &addrs(&rs), &[]);
    let src = tmp.path().join("src.img");
    std::fs::write(&src, pseudo_random(7, 64 << 20)).unwrap();
    import_file(&src, &uri);
    let back = tmp.path().join("back.img");
    export_to_file(&uri, &back);
    assert_eq!(sha256_file(&src), sha256_file(&back));
    run_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            src.to_str().unwrap(),
            &uri,
        ],
    );
}

#[test]
fn qemu_io_unaligned_patterns() {
    let tmp = tempfile::tempdir().unwrap();
    let rs = three_replicas(tmp.path(), "16M");
    let (_engine, uri, _) = start_engine("io", "16M", &addrs(&rs), &[]);
    let out = qemu_io(
        &uri,
        &[
            "write -P 0xab 512 4096",
            "write -P 0xcd 1536 512",
            "write -P 0x11 8191 3",
            "write -P 0x22 12800 9000",
            "read -P 0xab 512 1024",
            "read -P 0xcd 1536 512",
            "read -P 0xab 2048 2560",
            "read -P 0 0 512",
            "read -P 0x11 8191 3",
            "read -P 0 8194 4606",
            "read -P 0x22 12800 9000",
            "read -P 0 21800 1000",
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert_eq!(out.matches("read ").count(), 8, "{out}");
}

#[test]
fn nbdinfo_shows_size_allocation_and_trimmed_holes() {
    let tmp = tempfile::tempdir().unwrap();
    let rs = three_replicas(tmp.path(), "32M");
    let (_engine, uri, _) = start_engine("map", "32M", &addrs(&rs), &[]);
    let info = run_ok("nbdinfo", &["--json", &uri]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    let export = &v["exports"][0];
    assert_eq!(export["export-size"], 32 << 20);
    assert!(export["contexts"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c == "base:allocation"));
    assert_eq!(export["block_size_minimum"], 512);
    assert_eq!(export["block_size_preferred"], 4096);
    qemu_io(&uri, &["write -P 0x5a 1M 2M"]);
    let map = run_ok("nbdinfo", &["--map", "--json", &uri]);
    let m: Vec<serde_json::Value> = serde_json::from_str(&map).unwrap();
    let data: Vec<_> = m.iter().filter(|e| e["type"] == 0).collect();
    assert_eq!(data.len(), 1, "{map}");
    assert_eq!(
        (data[0]["offset"].as_u64(), data[0]["length"].as_u64()),
        (Some(1 << 20), Some(2 << 20))
    );
    qemu_io(&uri, &["discard 1M 1M"]);
    let map = run_ok("nbdinfo", &["--map", "--json", &uri]);
    let m: Vec<serde_json::Value> = serde_json::from_str(&map).unwrap();
    let data: Vec<_> = m.iter().filter(|e| e["type"] == 0).collect();
    assert_eq!(data.len(), 1, "{map}");
    assert_eq!(
        (data[0]["offset"].as_u64(), data[0]["length"].as_u64()),
        (Some(2 << 20), Some(1 << 20))
    );
    qemu_io(&uri, &["read -P 0 1M 1M", "read -P 0x5a 2M 1M"]);
}

fn fio_verify(uri: &str, size: &str, extra: &[&str]) -> std::process::Child {
    let mut args = vec![
        "--name=verify".to_string(),
        "--ioengine=nbd".into(),
        format!("--uri={uri}"),
        "--rw=randwrite".into(),
        "--bs=4k".into(),
        "--iodepth=16".into(),
        format!("--size={size}"),
        "--verify=crc32c".into(),
        "--verify_state_save=0".into(),
        "--verify_fatal=1".into(),
        "--do_verify=1".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    std::process::Command::new("fio")
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("fio")
}

fn wait_ok(child: std::process::Child) -> String {
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "fio failed: {text}");
    assert!(!text.contains("verify: bad"), "{text}");
    text
}

#[test]
fn fio_verify_on_three_replicas_even_when_one_is_killed() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rs = three_replicas(tmp.path(), "128M");
    let (_engine, uri, admin) =
        start_engine("fio", "128M", &addrs(&rs), &["--replica-timeout", "2"]);
    wait_ok(fio_verify(&uri, "64M", &[]));
    // Same run, with replica 1 SIGKILLed while fio writes.
    let fio = fio_verify(&uri, "96M", &["--offset=16M"]);
    std::thread::sleep(std::time::Duration::from_millis(700));
    rs[1].proc.kill9();
    wait_ok(fio);
    let s = status(&admin);
    let modes: Vec<&str> = s["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["mode"].as_str().unwrap())
        .collect();
    assert_eq!(modes, ["RW", "ERR", "RW"], "{s}");
    assert_eq!(s["state"], "degraded");
    assert!(s["replicas"][1]["last_error"]
        .as_str()
        .is_some_and(|e| !e.is_empty()));
}

#[test]
fn multi_conn_flush_is_visible_across_connections() {
    let tmp = tempfile::tempdir().unwrap();
    let rs = three_replicas(tmp.path(), "16M");
    let (_engine, uri, _) = start_engine("mc", "16M", &addrs(&rs), &[]);
    let script = format!(
        r#"
import nbd
a = nbd.NBD(); a.connect_uri("{uri}")
b = nbd.NBD(); b.connect_uri("{uri}")
assert a.can_multi_conn() and a.can_flush() and a.can_fua()
buf = bytes(range(256)) * 64
a.pwrite(buf, 12288)
a.flush()
assert b.pread(len(buf), 12288) == buf, "write on a not visible on b"
b.pwrite(b"\x77" * 1536, 2560, nbd.CMD_FLAG_FUA)
assert a.pread(1536, 2560) == b"\x77" * 1536
a.shutdown(); b.shutdown()
print("multi-conn ok")
"#
    );
    let out = libnbd_python(&script);
    assert!(out.contains("multi-conn ok"), "{out}");
}

#[test]
fn data_survives_engine_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let rs = three_replicas(tmp.path(), "32M");
    let src = tmp.path().join("src.img");
    std::fs::write(&src, pseudo_random(99, 32 << 20)).unwrap();
    {
        let (mut engine, uri, _) = start_engine("restart", "32M", &addrs(&rs), &[]);
        import_file(&src, &uri);
        assert_eq!(engine.stop(), 0, "clean stop exits 0");
    }
    // The pod is re-created: a new engine on the same replicas.
    let (_engine, uri, admin) = start_engine("restart", "32M", &addrs(&rs), &[]);
    run_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            src.to_str().unwrap(),
            &uri,
        ],
    );
    let s = status(&admin);
    assert_eq!(s["state"], "healthy", "{s}");
    assert_eq!(s["generation"], 2);
}

#[test]
fn engine_refuses_replicas_of_another_size_and_no_replicas() {
    let tmp = tempfile::tempdir().unwrap();
    let r = ReplicaProc::start(&tmp.path().join("r0"), "16M", "127.0.0.1:0");
    // It must refuse before it listens: any port will do.
    let (nbd, admin) = ("127.0.0.1:0", "127.0.0.1:0");
    let out = run_within(
        REFUSAL_LIMIT,
        RVOL,
        &[
            "engine",
            "--name",
            "x",
            "--size",
            "32M",
            "--replica",
            &r.addr,
            "--nbd-listen",
            nbd,
            "--admin-listen",
            admin,
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("hold 16777216 bytes but the volume is 33554432"),
        "{err}"
    );
    let dead = format!("127.0.0.1:{}", free_port());
    let out = run_within(
        REFUSAL_LIMIT,
        RVOL,
        &[
            "engine",
            "--name",
            "x",
            "--size",
            "16M",
            "--replica",
            &dead,
            "--nbd-listen",
            nbd,
            "--admin-listen",
            admin,
            "--replica-timeout",
            "1",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no usable replica"));
}

/// A client may read blocks while a FUA write to them is in flight. NBD
/// leaves what such a read returns open, but it must not look like bit rot:
/// the replica writes FUA data on another thread than the one that reads,
/// and before its reads checked again with no write running, a read that
/// copied a half-written block reported a checksum mismatch and the engine
/// took a healthy replica out to rebuild it.
#[test]
fn reads_racing_fua_writes_to_the_same_blocks_take_no_replica_out() {
    let tmp = tempfile::tempdir().unwrap();
    let rs = replicas_on_fixed_ports(tmp.path(), 2, "16M");
    let mut replicas = vec![format!("local:{}", tmp.path().join("r-local").display())];
    replicas.extend(addrs(&rs));
    let (_engine, uri, admin) = start_engine("race", "16M", &replicas, &[]);
    let script = format!(
        r#"
import nbd, time
h = nbd.NBD(); h.connect_uri("{uri}")
N = 1 << 20
fills = [bytes([i]) * N for i in range(1, 5)]
h.pwrite(fills[0], 0, nbd.CMD_FLAG_FUA)
pending, writes, reads = [], 0, 0
deadline = time.time() + 3
while time.time() < deadline or pending:
    while time.time() < deadline and len(pending) < 8:
        if sum(buf is None for _, buf in pending) < 2:
            pending.append((h.aio_pwrite(fills[writes % 4], 0, flags=nbd.CMD_FLAG_FUA), None))
            writes += 1
        else:
            buf = nbd.Buffer(N)
            pending.append((h.aio_pread(buf, 0), buf))
            reads += 1
    h.poll(-1)
    for cookie, buf in [p for p in pending if h.aio_command_completed(p[0])]:
        pending.remove((cookie, buf))
        if buf is not None:
            data = buf.to_bytearray()
            for b in range(0, N, 4096):
                assert data[b:b + 4096] == bytes([data[b]]) * 4096, f"block at {{b}} is torn"
h.shutdown()
print(f"race ok: {{writes}} writes, {{reads}} reads")
"#
    );
    let out = libnbd_python(&script);
    assert!(out.contains("race ok"), "{out}");
    let s = status(&admin);
    assert_eq!(s["checksum_errors"], 0, "{out}\n{s}");
    assert_eq!(modes(&admin), ["RW", "RW", "RW"], "{out}\n{s}");
}
