//! Encryption at rest, checked the way the security issue asks: through a
//! real engine over three replica processes, with the replicas' files
//! read and altered as someone holding a replica's disk would.
//!
//! - What was written reads back through the engine, and no replica file
//!   holds any of it.
//! - A block altered in one replica's layer, with its checksum fixed up to
//!   match (what a deliberate attacker does, unlike bit rot), fails its tag:
//!   the engine reads another replica's copy and rebuilds that replica.
//! - A block copied over another inside a layer, checksum entry and nonce
//!   and tag along, fails too: the tag binds the block's number.
//! - An engine with another key, or with none, refuses to start and says
//!   why; with the right key it serves again.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

const NAME: &str = "vol-enc";
const BLOCK: usize = 4096;
/// Nonce and tag per block, as the replicas keep them.
const AUTH: usize = 28;
/// The sidecar entry of an encrypted layer: two crcs, two auths.
const ENTRY: usize = 8 + 2 * AUTH;

/// Recognizable plaintext for block `i`: a marker no cipher output holds.
fn plain_block(i: usize) -> Vec<u8> {
    let mark = format!("rvol-plaintext-marker-{i:06}|");
    mark.bytes().cycle().take(BLOCK).collect()
}

fn head(dir: &Path) -> std::path::PathBuf {
    dir.join("volume-head-000.img")
}

/// Sets block `b`'s sidecar entry in `dir`'s head to `entry`.
fn write_entry(dir: &Path, b: usize, entry: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("volume-head-000.img.crc"))
        .unwrap();
    f.write_all_at(entry, (b * ENTRY) as u64).unwrap();
}

fn read_entry(dir: &Path, b: usize) -> Vec<u8> {
    let all = std::fs::read(dir.join("volume-head-000.img.crc")).unwrap();
    all[b * ENTRY..(b + 1) * ENTRY].to_vec()
}

fn write_block(path: &Path, b: usize, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, (b * BLOCK) as u64).unwrap();
}

fn read_block(path: &Path, b: usize) -> Vec<u8> {
    std::fs::read(path).unwrap()[b * BLOCK..(b + 1) * BLOCK].to_vec()
}

/// Reads block `b` through the engine once per replica, so that every
/// replica serves it once, and checks each read.
fn read_through(uri: &str, b: usize) {
    for _ in 0..3 {
        let out = qemu_io(uri, &[&format!("read -v {} 64", b * BLOCK)]);
        // qemu-io's dump of bytes 16..32 (the block's number), in hex.
        let want: Vec<String> = plain_block(b)[16..32]
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect();
        assert!(
            out.contains(&want.join(" ")),
            "block {b} reads back as written: {out}"
        );
    }
}

fn wait_all_rw(admin: &str) {
    wait_until("every replica RW", Duration::from_secs(60), || {
        modes(admin).iter().all(|m| m == "RW")
    });
}

#[test]
fn replicas_hold_only_ciphertext_and_tampering_is_caught_and_repaired() {
    let base = tempfile::tempdir().unwrap();
    let key = new_key_file("enc");
    let key_flag = key.to_str().unwrap();
    let replicas = three_replicas(base.path(), "16M");
    let addrs = addrs(&replicas);
    let (mut engine, uri, _) =
        start_engine(NAME, "16M", &addrs, &["--encryption-key-file", key_flag]);

    // 64 blocks of recognizable plaintext, flushed.
    let src = base.path().join("plain.img");
    let plain: Vec<u8> = (0..64).flat_map(plain_block).collect();
    std::fs::write(&src, &plain).unwrap();
    import_file(&src, &uri);
    let back = base.path().join("back.img");
    export_to_file(&uri, &back);
    assert_eq!(&std::fs::read(&back).unwrap()[..plain.len()], &plain[..]);

    // No replica file holds any of it.
    for r in &replicas {
        for f in std::fs::read_dir(&r.dir).unwrap() {
            let path = f.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            assert!(
                !bytes.windows(22).any(|w| w == b"rvol-plaintext-marker-"),
                "{} holds plaintext",
                path.display()
            );
        }
    }
    // The three replicas hold the same ciphertext (one sealing per write).
    let sealed = read_block(&head(&replicas[0].dir), 5);
    for r in &replicas[1..] {
        assert_eq!(read_block(&head(&r.dir), 5), sealed);
    }
    assert_eq!(engine.stop(), 0);

    // Wrong key, and no key: refused at start, saying why.
    let other = new_key_file("enc-other");
    let refused = |extra: &[&str]| {
        let args = engine_args_as_run(NAME, "16M", &addrs, extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run_within(Duration::from_secs(60), RVOL, &args);
        assert!(!out.status.success(), "started: {out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let wrong = refused(&["--encryption-key-file", other.to_str().unwrap()]);
    assert!(wrong.contains("the key is not the volume's"), "{wrong}");
    if !encryption_enabled() {
        let none = refused(&[]);
        assert!(none.contains("the volume is encrypted"), "{none}");
    }

    // Replica 0: block 5 altered, its crcs fixed up to match, so only the
    // tag can tell.
    let mut altered = sealed.clone();
    altered[100] ^= 0x5a;
    write_block(&head(&replicas[0].dir), 5, &altered);
    let mut entry = read_entry(&replicas[0].dir, 5);
    let crc = rvol_replica::crc::of(&altered).to_le_bytes();
    entry[..4].copy_from_slice(&crc);
    entry[4..8].copy_from_slice(&crc);
    write_entry(&replicas[0].dir, 5, &entry);
    // Replica 1: block 7 replaced by block 6, entry and all: a whole,
    // well-formed sealed block, at the wrong number.
    let r1 = &replicas[1].dir;
    write_block(&head(r1), 7, &read_block(&head(r1), 6));
    write_entry(r1, 7, &read_entry(r1, 6));

    let (_engine, uri, admin) =
        start_engine(NAME, "16M", &addrs, &["--encryption-key-file", key_flag]);
    read_through(&uri, 5);
    read_through(&uri, 7);
    let st = status(&admin);
    assert_eq!(st["encryption"], "aes-256-gcm-siv", "{st}");
    assert!(
        st["checksum_errors"].as_u64().unwrap() >= 2,
        "both replicas caught: {st}"
    );
    // Both were taken out and rebuilt from a good copy: every replica
    // serves both blocks again, and nothing more fails.
    wait_all_rw(&admin);
    let caught = status(&admin)["checksum_errors"].as_u64().unwrap();
    read_through(&uri, 5);
    read_through(&uri, 7);
    assert_eq!(status(&admin)["checksum_errors"].as_u64().unwrap(), caught);
    export_to_file(&uri, &back);
    assert_eq!(&std::fs::read(&back).unwrap()[..plain.len()], &plain[..]);
}

#[test]
fn a_key_file_too_short_is_refused() {
    let base = tempfile::tempdir().unwrap();
    let short = base.path().join("short.key");
    std::fs::write(&short, b"only sixteen byt").unwrap();
    let replicas = three_replicas(base.path(), "16M");
    let args = engine_args(
        "vol-short",
        "16M",
        &addrs(&replicas),
        &["--encryption-key-file", short.to_str().unwrap()],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_within(Duration::from_secs(30), RVOL, &args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("at least 32"), "{err}");
}
