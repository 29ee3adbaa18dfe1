//! Mutual TLS between engines and replicas, attacked the way the security
//! issue's script did: a stranger on the network connects to a replica's
//! port and tries to read the volume or take it over.
//!
//! A live engine serves a 3-replica volume over TLS while each attack
//! runs; after each one the engine must still serve, with every replica
//! RW and the data intact. The last step is the control: the same attack
//! with a valid certificate of the volume does take the replica over
//! (fencing the engine), so the refusals above are the certificates'
//! doing and nothing else.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use common::*;
use rvol_replica::client::{ClientError, Links, ReplicaClient};
use rvol_replica::proto::Status;
use rvol_replica::server::Endpoint;
use rvol_replica::{volume_uuid, Generation, Owner};
use rvol_tls::pki::{Ca, Issue};
use rvol_tls::{ClientTls, Identity, TlsFiles};

const VOLUME: &str = "vol-tls";

/// A HELLO frame taking the replica over with `generation` (0: a probe).
fn hello(generation: u64) -> Vec<u8> {
    common::direct::hello_frame(volume_uuid(VOLUME), generation, 0xbad)
}

/// Sends `bytes` on a plain TCP connection and returns all it gets back.
fn raw_exchange(addr: &str, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let _ = s.write_all(bytes);
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    got
}

/// Takes the replica at `addr` over with the real client and `tls`.
fn take_over(addr: &str, tls: Option<ClientTls>) -> Result<(), ClientError> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ep: Endpoint = addr.parse().unwrap();
        let links = Links {
            connections: 1,
            direct_reads: false,
            tls: tls.map(std::sync::Arc::new),
            encryption: None,
        };
        let owner = Owner {
            generation: Generation(1 << 40),
            engine_id: 0xbad,
        };
        let (client, _) = ReplicaClient::connect(&ep, volume_uuid(VOLUME), owner, links).await?;
        client.read(0, 4096).await.map(|_| ())
    })
}

fn client_tls(prefix: &Path, ca: &Path) -> ClientTls {
    let with = |ext: &str| prefix.with_extension(ext);
    ClientTls::new(TlsFiles {
        cert: with("crt"),
        key: with("key"),
        ca: ca.to_path_buf(),
    })
    .unwrap()
}

/// Issues a certificate for `ids` from `ca` and returns a client using it
/// (trusting `trust`).
fn issued(ca: &Ca, dir: &Path, name: &str, what: Issue, trust: &Path) -> ClientTls {
    let prefix = dir.join(name);
    ca.issue_to(&what, &prefix).unwrap();
    client_tls(&prefix, trust)
}

fn assert_unharmed(engine: &mut Proc, admin: &str, nbd: &str, after: &str) {
    assert!(engine.is_running(), "the engine stopped after {after}");
    assert_eq!(modes(admin), ["RW", "RW", "RW"], "after {after}");
    qemu_io(nbd, &["read -P 0xab 0 1M"]);
}

#[test]
fn strangers_cannot_read_or_take_over_a_replica() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    // Three replicas and an engine with certificates of the test CA.
    let replicas: Vec<ReplicaProc> = (0..3)
        .map(|i| {
            let mut args = vec![
                "replica".to_string(),
                "--dir".into(),
                base.join(format!("r{i}")).display().to_string(),
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--size".into(),
                "64M".into(),
            ];
            args.extend(tls::replica("127.0.0.1:0"));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let proc = Proc::start(&args);
            let addr = proc.ready["listen"].as_str().unwrap().to_string();
            ReplicaProc {
                dir: base.join(format!("r{i}")),
                proc,
                addr,
            }
        })
        .collect();
    let engine_tls = tls::engine(VOLUME);
    let extra: Vec<&str> = engine_tls.iter().map(String::as_str).collect();
    let (mut engine, nbd, admin) = start_engine(VOLUME, "64M", &addrs(&replicas), &extra);
    qemu_io(&nbd, &["write -P 0xab 0 1M"]);
    assert_unharmed(&mut engine, &admin, &nbd, "start");
    let target = replicas[0].addr.clone();

    let ca_dir = tls::ca_dir().join("ca");
    let ca_crt = ca_dir.join("ca.crt");
    let ca = Ca::load(&ca_dir).unwrap();
    let certs = tempfile::tempdir().unwrap();
    let certs = certs.path();

    // 1. The script of the issue: plaintext HELLOs, a probe then a takeover.
    for generation in [0, 1 << 40] {
        let got = raw_exchange(&target, &hello(generation));
        // Nothing but, at most, a TLS alert record (content type 21).
        assert!(
            got.is_empty() || got[0] == 21,
            "plaintext HELLO got {got:?}"
        );
    }
    assert!(take_over(&target, None).is_err());
    assert_unharmed(&mut engine, &admin, &nbd, "plaintext HELLOs");

    // 2. Garbage where the handshake should be.
    let got = raw_exchange(&target, &[0x16, 0x03, 0x01, 0xff, 0xff, 1, 2, 3, 4, 5]);
    assert!(got.is_empty() || got[0] == 21, "garbage got {got:?}");
    assert_unharmed(&mut engine, &admin, &nbd, "garbage");

    // 3. TLS without a client certificate (openssl, an independent client).
    if tool_available("openssl") {
        let mut child = Command::new("openssl")
            .args(["s_client", "-quiet", "-connect", &target, "-CAfile"])
            .arg(&ca_crt)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(&hello(1 << 40))
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.stdout.is_empty(),
            "a caller without a certificate was answered: {:?}",
            out.stdout
        );
        assert_unharmed(&mut engine, &admin, &nbd, "no client certificate");
    }

    // 4. A certificate naming the volume, from another CA.
    let other_dir = certs.join("other-ca");
    let other = Ca::generate("another CA").unwrap();
    other.write(&other_dir).unwrap();
    let volume_id = || vec![Identity::Volume(VOLUME.into())];
    let foreign = issued(
        &other,
        certs,
        "foreign",
        Issue::new(volume_id(), 1),
        &ca_crt,
    );
    let err = take_over(&target, Some(foreign)).unwrap_err();
    assert!(
        matches!(err, ClientError::Connect { .. } | ClientError::Lost(_)),
        "{err}"
    );
    assert_unharmed(&mut engine, &admin, &nbd, "another CA's certificate");

    // 5. An expired certificate of the right CA, naming the volume.
    let mut expired = Issue::new(volume_id(), 1);
    expired.not_before = SystemTime::now() - Duration::from_secs(3 * 86400);
    expired.not_after = SystemTime::now() - Duration::from_secs(86400);
    let expired = issued(&ca, certs, "expired", expired, &ca_crt);
    assert!(take_over(&target, Some(expired)).is_err());
    assert_unharmed(&mut engine, &admin, &nbd, "an expired certificate");

    // 6. Valid certificates of the CA that do not name this volume: another
    //    volume's engine, and a node's (a replica's own certificate).
    for (name, id) in [
        ("other-volume", Identity::Volume("another-volume".into())),
        ("node", Identity::Node("test-node".into())),
    ] {
        let tls = issued(&ca, certs, name, Issue::new(vec![id], 1), &ca_crt);
        match take_over(&target, Some(tls)) {
            Err(ClientError::Remote {
                status: Status::Denied,
                message,
            }) => assert!(message.contains("does not name volume"), "{message}"),
            other => panic!("{name}: {other:?}"),
        }
        assert_unharmed(&mut engine, &admin, &nbd, name);
    }

    // 7. The control: the volume's own certificate takes the replica over,
    //    and the engine, fenced by it, stops (exit status 3).
    let own = issued(&ca, certs, "own", Issue::new(volume_id(), 1), &ca_crt);
    take_over(&target, Some(own)).expect("a valid certificate of the volume takes over");
    let _ = qemu_io_status(&nbd, "write -P 0xcd 0 4k");
    assert_eq!(engine.wait_exit(Duration::from_secs(30)), 3);
}

/// Runs one qemu-io command; returns whether it succeeded.
fn qemu_io_status(uri: &str, cmd: &str) -> bool {
    run("qemu-io", &["-f", "raw", uri, "-c", cmd])
        .status
        .success()
}

#[test]
fn an_engine_whose_certificate_names_another_volume_does_not_start() {
    let tmp = tempfile::tempdir().unwrap();
    let r = ReplicaProc::start(&tmp.path().join("r0"), "16M", "127.0.0.1:0");
    let flags = tls::engine("some-other-volume");
    let mut extra = vec!["--nbd-listen", "127.0.0.1:0"];
    extra.extend(flags.iter().map(String::as_str));
    let args = engine_args(VOLUME, "16M", std::slice::from_ref(&r.addr), &extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run(RVOL, &args);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not name rvol://volume/vol-tls"), "{err}");
}
