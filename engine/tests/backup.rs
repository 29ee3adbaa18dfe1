//! Backups through the engine and the CLI, to a real S3 server (SeaweedFS
//! on 127.0.0.1) and a directory: a 3-replica volume backed up under a
//! live writer and restored onto new replicas; incremental backups that
//! read and upload only the changed chunks; dedup, removal and the sweep;
//! the S3 server and the engine killed mid-backup; two backups at once; a
//! standby brought up to date; bad input. With `RVOL_TEST_ENCRYPTION=1`
//! the volume is encrypted and every backup holds ciphertext only.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use rvol_backup::testing::Weed;

const CHUNK: u64 = 1 << 20;
const SIZE: &str = "64M";
const LEASE_SECS: &str = "6";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Starts the S3 server; shortens the backup leases of the engines and
/// CLIs this test starts (a retry after a crash waits one out).
fn start_weed(dir: &Path) -> (Weed, tokio::runtime::Runtime) {
    std::env::set_var("RVOL_BACKUP_LEASE_SECS", LEASE_SECS);
    let rt = runtime();
    let weed = rt.block_on(Weed::start(dir));
    (weed, rt)
}

/// `rvol ARGS` with the S3 server's settings in its environment.
fn rvol(weed: &Weed, args: &[&str]) -> Output {
    let mut cmd = Command::new(RVOL);
    cmd.args(args).env("RVOL_BACKUP_LEASE_SECS", LEASE_SECS);
    for (k, v) in &weed.options().0 {
        cmd.env(k, v);
    }
    cmd.output().expect("running rvol")
}

fn rvol_ok(weed: &Weed, args: &[&str]) -> String {
    let out = rvol(weed, args);
    assert!(
        out.status.success(),
        "rvol {args:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn rvol_err(weed: &Weed, args: &[&str]) -> String {
    let out = rvol(weed, args);
    assert!(!out.status.success(), "rvol {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Backs snapshot `snap` up; returns the manifest summary (`backup ls`).
fn backup(weed: &Weed, volume: &str, snap: &str, target: &str, admin: &str) -> serde_json::Value {
    let chunk = CHUNK.to_string();
    let out = rvol_ok(
        weed,
        &[
            "backup",
            "create",
            volume,
            "--snapshot",
            snap,
            "--target",
            target,
            "--admin",
            admin,
            "--chunk-size",
            &chunk,
            "--json",
        ],
    );
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    let name = status["name"].as_str().expect("a backup name").to_string();
    listed(weed, target)
        .into_iter()
        .find(|b| b["name"] == name.as_str())
        .expect("the backup is listed")
}

fn listed(weed: &Weed, target: &str) -> Vec<serde_json::Value> {
    let out = rvol_ok(weed, &["backup", "ls", "--target", target, "--json"]);
    serde_json::from_str::<serde_json::Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// Restores `backup` onto `replicas` as `volume` (a standby holding
/// backup `from`, with it); returns what the CLI said.
fn restore(
    weed: &Weed,
    target: &str,
    backup: &str,
    volume: &str,
    replicas: &[String],
    from: Option<&str>,
) -> String {
    let mut args: Vec<String> = [
        "backup", "restore", backup, "--target", target, "--volume", volume,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for a in replicas {
        args.extend(["--replica".into(), a.clone()]);
    }
    if let Some(f) = from {
        args.extend(["--from".into(), f.into()]);
    }
    if tls::enabled() {
        args.extend(tls::engine(volume));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = rvol_ok(weed, &args);
    assert!(out.contains("restored"), "{out}");
    out
}

/// Serves `volume` on `replicas` and returns the sha256 of its contents.
fn serve_and_hash(volume: &str, replicas: &[String], scratch: &Path) -> String {
    let (mut engine, uri, _) = start_engine(volume, SIZE, replicas, &[]);
    let sha = export_sha(&uri, scratch);
    engine.stop();
    sha
}

/// Restores `backup` onto three new replicas under `base` as `volume`;
/// serves it and returns the sha256 of its contents.
fn restore_and_hash(weed: &Weed, target: &str, backup: &str, volume: &str, base: &Path) -> String {
    std::fs::create_dir_all(base).unwrap();
    let rs = three_replicas(base, SIZE);
    restore(weed, target, backup, volume, &addrs(&rs), None);
    serve_and_hash(volume, &addrs(&rs), base)
}

/// Writes `mib` MiB of pseudo-random data at the start of the volume,
/// takes snapshot `snap`, and returns the volume's sha256 then.
fn fill_and_snapshot(
    uri: &str,
    admin: &str,
    tmp: &Path,
    seed: u64,
    mib: usize,
    snap: &str,
) -> String {
    let data = tmp.join("data.img");
    std::fs::write(&data, pseudo_random(seed, mib << 20)).unwrap();
    let (src, dst, count) = (
        format!("if={}", data.display()),
        format!("of={uri}"),
        format!("count={mib}"),
    );
    run_ok(
        "qemu-img",
        &["dd", "-f", "raw", "-O", "raw", &src, &dst, "bs=1M", &count],
    );
    std::fs::remove_file(&data).unwrap();
    run_ok(RVOL, &["snapshot", "create", snap, "--admin", admin]);
    export_sha(uri, tmp)
}

/// Chunks (of `CHUNK` bytes) that 4 KiB writes at `blocks` touch.
fn chunks_of(blocks: &[u64]) -> BTreeSet<u64> {
    blocks.iter().map(|b| b * 4096 / CHUNK).collect()
}

#[test]
fn a_volume_under_a_live_writer_is_backed_up_incrementally_and_restored_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let (weed, _rt) = start_weed(&tmp.path().join("weed"));
    let target = weed.url("cycle");
    let rs = three_replicas(&tmp.path().join("a"), SIZE);
    let (_engine, uri, admin) = start_engine("bk", SIZE, &addrs(&rs), &[]);

    // 32 MiB of data in the first half; the rest never written.
    let sha1 = fill_and_snapshot(&uri, &admin, tmp.path(), 11, 32, "s1");

    // The backup runs while a writer keeps writing (after the snapshot).
    let w = Writer::start(&uri, 4096);
    w.wait_progress(100, Duration::from_secs(20));
    let b1 = backup(&weed, "bk", "s1", &target, &admin);
    w.wait_progress(100, Duration::from_secs(20));
    w.finish();
    assert_eq!(b1["chunks"], 32, "{b1}");
    assert_eq!(b1["stats"]["chunks_uploaded"], 32, "{b1}");
    let status = status(&admin);
    assert_eq!(status["backup"]["state"], "done", "{status}");
    let metrics = http_get(&admin, "/metrics");
    for line in [
        "rvol_backup_in_progress{volume=\"bk\"} 0",
        "rvol_backup_read_bytes{volume=\"bk\"} 33554432",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }

    // Incremental: scattered 4 KiB writes; the next backup reads and
    // uploads exactly the chunks they touched (and the writer's).
    let mut rnd = xorshift(5);
    let blocks: Vec<u64> = (0..300).map(|_| rnd() % (16384 - 4096) + 4096).collect();
    let cmds: Vec<String> = blocks
        .iter()
        .map(|b| format!("write -P 0x{:02x} {} 4k", b % 251, b * 4096))
        .collect();
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(&uri, &cmds);
    run_ok(RVOL, &["snapshot", "create", "s2", "--admin", &admin]);
    let sha2 = export_sha(&uri, tmp.path());
    let b2 = backup(&weed, "bk", "s2", &target, &admin);
    // The writer wrote blocks 0..4096 (the first 16 chunks) after s1.
    let mut changed = chunks_of(&blocks);
    changed.extend(0..16);
    assert_eq!(b2["base"], b1["name"]);
    assert_eq!(b2["stats"]["chunks_read"], changed.len(), "{b2}");
    assert_eq!(
        b2["stats"]["bytes_read"],
        changed.len() as u64 * CHUNK,
        "{b2}"
    );
    assert_eq!(b2["stats"]["chunks_uploaded"], changed.len(), "{b2}");
    assert!(
        b2["stats"]["requests"].as_u64().unwrap() < changed.len() as u64 + 20,
        "{b2}"
    );

    // The same snapshot again: nothing read, nothing uploaded.
    let b3 = backup(&weed, "bk", "s2", &target, &admin);
    assert_eq!(b3["stats"]["bytes_read"], 0, "{b3}");
    assert_eq!(b3["stats"]["chunks_uploaded"], 0, "{b3}");

    // A standby: restored from backup 1, brought to backup 2 with only the
    // chunks that differ, then activated, it reads as snapshot 2 did.
    let (b1_name, b2_name) = (b1["name"].as_str().unwrap(), b2["name"].as_str().unwrap());
    let sb = tmp.path().join("sb");
    std::fs::create_dir_all(&sb).unwrap();
    let standby = three_replicas(&sb, SIZE);
    restore(&weed, &target, b1_name, "bk", &addrs(&standby), None);
    let out = restore(
        &weed,
        &target,
        b2_name,
        "bk",
        &addrs(&standby),
        Some(b1_name),
    );
    assert!(out.contains(&format!("{} chunks", changed.len())), "{out}");
    assert_eq!(serve_and_hash("bk", &addrs(&standby), &sb), sha2);

    // Remove backup 1; 2 still restores, and a sweep takes exactly the
    // chunks only backup 1 named.
    rvol_ok(
        &weed,
        &[
            "backup",
            "rm",
            b1["name"].as_str().unwrap(),
            "--target",
            &target,
        ],
    );
    assert_eq!(listed(&weed, &target).len(), 2);
    let swept: serde_json::Value = serde_json::from_str(&rvol_ok(
        &weed,
        &[
            "backup", "sweep", "--target", &target, "--grace", "0s", "--json",
        ],
    ))
    .unwrap();
    // Backup 1 held chunks 0..32; those that changed are backup 1's alone.
    let only_b1 = changed.iter().filter(|&&c| c < 32).count();
    assert_eq!(swept["deleted"], only_b1, "{swept}");
    assert_eq!(
        swept["chunks"].as_u64().unwrap() - swept["deleted"].as_u64().unwrap(),
        64
    );
    let verify = rvol_ok(&weed, &["backup", "verify", b2_name, "--target", &target]);
    assert!(verify.contains("64 chunks checked, 0 bad"), "{verify}");

    // Restored onto new replicas, it reads as the snapshot did.
    assert_eq!(
        restore_and_hash(&weed, &target, b2_name, "bk", &tmp.path().join("r")),
        sha2
    );
    assert_ne!(sha1, sha2);

    if encryption_enabled() {
        // Ciphertext only: no chunk holds the plaintext's bytes.
        let t = tmp.path().join("t");
        let dir_target = format!("file://{}", t.display());
        backup(&weed, "bk", "s2", &dir_target, &admin);
        let needle = &pseudo_random(11, 1 << 20)[4096..4096 + 64];
        for entry in walk(&t.join("chunks")) {
            let object = std::fs::read(&entry).unwrap();
            let content = zstd::bulk::decompress(&object, 2 * CHUNK as usize).unwrap();
            assert!(
                !content.windows(64).any(|w| w == needle),
                "plaintext in {entry:?}"
            );
        }
        let e = rvol_err(
            &weed,
            &[
                "backup",
                "restore",
                b2_name,
                "--target",
                &target,
                "--volume",
                "other",
                "--replica",
                "127.0.0.1:1",
            ],
        );
        assert!(e.contains("restore it as --volume bk"), "{e}");
    } else {
        // A plain volume restores under any name.
        assert_eq!(
            restore_and_hash(&weed, &target, b2_name, "copy", &tmp.path().join("c")),
            sha2
        );
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn create_args(target: &str, admin: &str, rate: &str) -> Vec<String> {
    [
        "backup",
        "create",
        "flt",
        "--snapshot",
        "s",
        "--target",
        target,
        "--admin",
        admin,
        "--chunk-size",
        "1M",
        "--rate-mib",
        rate,
        "--parallel",
        "1",
        "--json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Starts `rvol ARGS` with the S3 settings, in the background.
fn spawn_rvol(weed: &Weed, args: &[String]) -> std::process::Child {
    let mut cmd = Command::new(RVOL);
    cmd.args(args).env("RVOL_BACKUP_LEASE_SECS", LEASE_SECS);
    for (k, v) in &weed.options().0 {
        cmd.env(k, v);
    }
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn chunks_stored(weed: &Weed, rt: &tokio::runtime::Runtime, target: &str) -> usize {
    rt.block_on(async {
        let t = rvol_backup::Target::open(target, &weed.options()).unwrap();
        t.list("chunks/").await.unwrap().len()
    })
}

#[test]
fn a_backup_cut_short_by_the_store_or_the_engine_leaves_nothing_and_its_retry_sends_only_the_rest()
{
    let tmp = tempfile::tempdir().unwrap();
    let (mut weed, rt) = start_weed(&tmp.path().join("weed"));
    let target = weed.url("faults");
    let rs = three_replicas(&tmp.path().join("a"), SIZE);
    let (mut engine, uri, admin) = start_engine("flt", SIZE, &addrs(&rs), &[]);
    let sha = fill_and_snapshot(&uri, &admin, tmp.path(), 21, 48, "s");

    // The S3 server dies a few chunks in: the backup fails, naming the
    // target, and nothing lists.
    let child = spawn_rvol(&weed, &create_args(&target, &admin, "8"));
    std::thread::sleep(Duration::from_secs(2));
    weed.kill();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("backup failed") && err.contains("faults"),
        "{err}"
    );
    rt.block_on(weed.restart());
    assert!(
        listed(&weed, &target).is_empty(),
        "a cut-short backup is listed"
    );
    assert!(
        chunks_stored(&weed, &rt, &target) > 0,
        "no chunk went up before the kill"
    );
    // Its lease could not be released with the store down: it expires.
    std::thread::sleep(Duration::from_secs(7));

    // The engine is SIGKILLed mid-backup: the CLI fails, nothing lists.
    let child = spawn_rvol(&weed, &create_args(&target, &admin, "8"));
    std::thread::sleep(Duration::from_secs(1));
    // Meanwhile the snapshot it reads stays, and a second backup waits.
    let e = String::from_utf8_lossy(&run(RVOL, &["snapshot", "rm", "s", "--admin", &admin]).stderr)
        .into_owned();
    assert!(e.contains("a backup of snapshot s is running"), "{e}");
    let args = create_args(&target, &admin, "0");
    let e = rvol_err(&weed, &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        e.contains("a backup of snapshot s to") && e.contains("is running"),
        "{e}"
    );
    std::thread::sleep(Duration::from_secs(1));
    engine.kill9();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("busy"), "{err}");
    assert!(listed(&weed, &target).is_empty());
    let (_engine, _uri, admin) = start_engine("flt", SIZE, &addrs(&rs), &[]);

    // Its lease holds a retry off until it expires, naming what holds it.
    let args = create_args(&target, &admin, "0");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let e = rvol_err(&weed, &args);
    assert!(e.contains("busy") && e.contains("a backup of flt"), "{e}");
    std::thread::sleep(Duration::from_secs(7));
    let stored = chunks_stored(&weed, &rt, &target);

    // The retry completes and uploads only what was missing.
    let done: serde_json::Value = serde_json::from_str(&rvol_ok(&weed, &args)).unwrap();
    assert_eq!(
        done["stats"]["chunks_uploaded"].as_u64().unwrap() as usize,
        48 - stored,
        "{done}"
    );
    let name = done["name"].as_str().unwrap();
    assert_eq!(
        restore_and_hash(&weed, &target, name, "flt", &tmp.path().join("r")),
        sha
    );
}

#[test]
fn bad_targets_credentials_backups_and_snapshots_get_clear_errors_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (weed, rt) = start_weed(&tmp.path().join("weed"));
    let rs = three_replicas(&tmp.path().join("a"), SIZE);
    let (_engine, uri, admin) = start_engine("bad", SIZE, &addrs(&rs), &[]);
    qemu_io(&uri, &["write -P 0x33 0 1M"]);
    run_ok(RVOL, &["snapshot", "create", "s", "--admin", &admin]);
    let target = weed.url("bad");
    let create = |target: &str, snap: &str| {
        rvol_err(
            &weed,
            &[
                "backup",
                "create",
                "bad",
                "--snapshot",
                snap,
                "--target",
                target,
                "--admin",
                &admin,
            ],
        )
    };
    let e = create("ftp://x/y", "s");
    assert!(e.contains("unknown scheme"), "{e}");
    let e = create("s3://no-such-bucket/x", "s");
    assert!(e.contains("bucket does not exist"), "{e}");
    let e = create(&target, "nosuch");
    assert!(e.contains("no snapshot nosuch"), "{e}");
    let e = rvol_err(
        &weed,
        &[
            "backup",
            "create",
            "other",
            "--snapshot",
            "s",
            "--target",
            &target,
            "--admin",
            &admin,
        ],
    );
    assert!(e.contains("serves volume bad, not other"), "{e}");
    let mut cmd = Command::new(RVOL);
    cmd.args(["backup", "ls", "--target", &target]);
    for (k, v) in &weed.options().0 {
        cmd.env(
            k,
            if k == "AWS_SECRET_ACCESS_KEY" {
                "wrong"
            } else {
                v
            },
        );
    }
    let e = String::from_utf8_lossy(&cmd.output().unwrap().stderr).into_owned();
    assert!(e.contains("access denied"), "{e}");
    let e = rvol_err(
        &weed,
        &[
            "backup",
            "restore",
            "bad.20260101T000000Z",
            "--target",
            &target,
            "--volume",
            "x",
            "--replica",
            "127.0.0.1:1",
        ],
    );
    assert!(e.contains("no backup bad.20260101T000000Z"), "{e}");
    let e = rvol_err(
        &weed,
        &["backup", "verify", "nonsense", "--target", &target],
    );
    assert!(e.contains("not a backup name"), "{e}");
    let left = rt.block_on(async {
        rvol_backup::Target::open(&target, &weed.options())
            .unwrap()
            .list("")
            .await
            .unwrap()
    });
    assert!(left.is_empty(), "refused requests wrote {left:?}");
    // The volume is fine and the snapshot stays removable afterwards.
    run_ok(RVOL, &["snapshot", "rm", "s", "--admin", &admin]);
}
