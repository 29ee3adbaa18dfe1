//! The NBD export with TLS required (`--nbd-tls`), through real clients:
//! libnbd's nbdinfo and qemu-io with x509 certificates read and write; a
//! client without TLS, with another CA's certificate or with one for
//! another volume gets nothing. With the TLS requirement removed the
//! plaintext checks below fail (checked once by hand: nbdinfo answers).

mod common;

use std::path::Path;

use common::*;

const VOLUME: &str = "vol-nbd";
const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
const OPT_STARTTLS: u32 = 5;

/// A folder the way libnbd and qemu want client credentials:
/// ca-cert.pem, client-cert.pem and client-key.pem.
fn client_dir(base: &Path, name: &str, flags: &[String]) -> String {
    let dir = base.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    // flags: --tls-cert C --tls-key K --tls-ca CA
    std::fs::copy(&flags[1], dir.join("client-cert.pem")).unwrap();
    std::fs::copy(&flags[3], dir.join("client-key.pem")).unwrap();
    std::fs::copy(&flags[5], dir.join("ca-cert.pem")).unwrap();
    dir.display().to_string()
}

fn nbdinfo(uri: &str) -> std::process::Output {
    run_within(
        std::time::Duration::from_secs(60),
        "nbdinfo",
        &["--size", uri],
    )
}

fn qemu_io_tls(port: &str, dir: &str, cmds: &[&str]) -> std::process::Output {
    let object = format!("tls-creds-x509,id=tls0,dir={dir},endpoint=client");
    let image = format!("driver=nbd,host=127.0.0.1,port={port},export={VOLUME},tls-creds=tls0");
    let mut args = vec!["--object", object.as_str(), "--image-opts", image.as_str()];
    for c in cmds {
        args.extend(["-c", c]);
    }
    run_within(std::time::Duration::from_secs(60), "qemu-io", &args)
}

#[test]
fn nbd_clients_must_start_tls_with_a_certificate_of_the_volume() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    let rs = unix_replicas(base, 2, "16M");
    let engine_tls = tls::issue(&["--volume", VOLUME, "--ip", "127.0.0.1"]);
    let mut extra: Vec<&str> = engine_tls.iter().map(String::as_str).collect();
    extra.push("--nbd-tls");
    let (mut engine, uri, _admin) = start_engine(VOLUME, "16M", &addrs(&rs), &extra);
    let addr = uri.trim_start_matches("nbd://").to_string();
    let port = addr.rsplit_once(':').unwrap().1.to_string();

    // A client of the volume: reads and writes through TLS.
    let good = client_dir(base, "good", &tls::issue(&["--volume", VOLUME]));
    let tls_uri = format!("nbds://{addr}/{VOLUME}?tls-certificates={good}");
    let out = nbdinfo(&tls_uri);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        (16 << 20).to_string()
    );
    let out = qemu_io_tls(&port, &good, &["write -P 0x5a 0 1M", "read -P 0x5a 0 1M"]);
    assert!(
        out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("fail"),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Without TLS: refused by libnbd and qemu, and on the wire nothing but
    // "TLS required" (and the connection closed on EXPORT_NAME).
    assert!(!nbdinfo(&format!("nbd://{addr}/{VOLUME}")).status.success());
    assert!(!run_within(
        std::time::Duration::from_secs(60),
        "qemu-io",
        &["-f", "raw", &uri, "-c", "read 0 4k"]
    )
    .status
    .success());
    let mut raw = RawNbd::connect(&uri);
    assert_eq!(raw.go(VOLUME), REP_ERR_TLS_REQD);
    raw.option(OPT_STARTTLS, b"unexpected");
    assert_eq!(raw.option_reply().0, (1 << 31) + 3);
    raw.option(OPT_EXPORT_NAME, VOLUME.as_bytes());
    assert!(raw.is_closed());

    // A certificate of the CA for another volume, and one of another CA.
    let other = client_dir(base, "other", &tls::issue(&["--volume", "another"]));
    let out = nbdinfo(&format!("nbds://{addr}/{VOLUME}?tls-certificates={other}"));
    assert!(!out.status.success());
    let stranger_ca = base.join("stranger-ca");
    run_ok(
        RVOL,
        &["cert", "ca", "--dir", stranger_ca.to_str().unwrap()],
    );
    let prefix = base.join("stranger");
    run_ok(
        RVOL,
        &[
            "cert",
            "issue",
            "--ca-dir",
            stranger_ca.to_str().unwrap(),
            "--out",
            prefix.to_str().unwrap(),
            "--volume",
            VOLUME,
        ],
    );
    let mut flags = tls::flags(&prefix, &stranger_ca.join("ca.crt"));
    // It trusts the real CA, so only its own certificate is foreign.
    flags[5] = engine_tls[5].clone();
    let stranger = client_dir(base, "stranger-client", &flags);
    let out = nbdinfo(&format!(
        "nbds://{addr}/{VOLUME}?tls-certificates={stranger}"
    ));
    assert!(!out.status.success());
    let out = qemu_io_tls(&port, &stranger, &["read 0 4k"]);
    assert!(!out.status.success());

    // None of it harmed the engine or the data.
    assert!(engine.is_running());
    let out = qemu_io_tls(&port, &good, &["read -P 0x5a 0 1M"]);
    assert!(out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("fail"));
}
