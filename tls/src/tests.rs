//! Real handshakes over loopback TCP between certificates this crate's CA
//! issued.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::pki::{Ca, Issue};
use super::*;

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn files(dir: &Path, name: &str) -> TlsFiles {
    TlsFiles {
        cert: dir.join(format!("{name}.crt")),
        key: dir.join(format!("{name}.key")),
        ca: dir.join("ca.crt"),
    }
}

fn issue(ca: &Ca, dir: &Path, name: &str, ids: Vec<Identity>) -> TlsFiles {
    let mut what = Issue::new(ids, 1);
    what.ips.push(LOOPBACK);
    ca.issue_to(&what, &dir.join(name)).unwrap();
    files(dir, name)
}

/// A CA in a temporary folder, a replica's server on loopback with a
/// certificate of it, and the listener's address.
struct Setup {
    dir: tempfile::TempDir,
    ca: Ca,
    server: ServerTls,
    listener: TcpListener,
    addr: String,
}

impl Setup {
    async fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("test ca").unwrap();
        ca.write(dir.path()).unwrap();
        let replica = issue(
            &ca,
            dir.path(),
            "replica",
            vec![Identity::Node("n1".into())],
        );
        let server = ServerTls::new(replica).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        Setup {
            dir,
            ca,
            server,
            listener,
            addr,
        }
    }
}

/// Serves one connection: handshake, then echoes one byte. Returns the
/// handshake's outcome.
async fn serve_one(listener: &TcpListener, tls: &ServerTls) -> Result<Vec<Identity>> {
    let (s, peer) = listener.accept().await.unwrap();
    let (mut stream, ids) = tls.accept(s, &peer.to_string()).await?;
    let mut b = [0u8; 1];
    if stream.read_exact(&mut b).await.is_ok() {
        let _ = stream.write_all(&b).await;
        let _ = stream.flush().await;
    }
    Ok(ids)
}

async fn dial(client: &ClientTls, addr: &str) -> Result<u8> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut s = client.connect(addr, tcp).await?;
    s.write_all(&[7]).await.unwrap();
    s.flush().await.unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b)
        .await
        .map_err(|e| TlsError::Handshake {
            peer: addr.into(),
            message: e.to_string(),
        })?;
    Ok(b[0])
}

#[test]
fn rvol_uris_parse_and_others_do_not() {
    assert_eq!(
        Identity::from_uri("rvol://volume/vol-1"),
        Some(Identity::Volume("vol-1".into()))
    );
    assert_eq!(
        Identity::from_uri("rvol://node/n3"),
        Some(Identity::Node("n3".into()))
    );
    assert_eq!(
        Identity::from_uri("rvol://role/controller"),
        Some(Identity::Controller)
    );
    for bad in [
        "rvol://role/admin",
        "rvol://volume/",
        "rvol://volume/a/b",
        "https://volume/x",
        "rvol://disk/x",
    ] {
        assert_eq!(Identity::from_uri(bad), None, "{bad}");
    }
}

#[tokio::test]
async fn peers_learn_each_others_identity_and_strangers_are_refused() {
    let Setup {
        dir,
        ca,
        server,
        listener,
        addr,
    } = Setup::new().await;
    let d = dir.path();
    let engine = issue(&ca, d, "engine", vec![Identity::Volume("v1".into())]);
    let client = ClientTls::new(engine).unwrap();
    assert_eq!(
        client.own_identities().unwrap(),
        vec![Identity::Volume("v1".into())]
    );

    let (served, echoed) = tokio::join!(serve_one(&listener, &server), dial(&client, &addr));
    assert_eq!(served.unwrap(), vec![Identity::Volume("v1".into())]);
    assert_eq!(echoed.unwrap(), 7);

    // A certificate of another CA, with the same identity.
    let other = tempfile::tempdir().unwrap();
    let other_ca = Ca::generate("other ca").unwrap();
    other_ca.write(other.path()).unwrap();
    let mut stranger = issue(
        &other_ca,
        other.path(),
        "engine",
        vec![Identity::Volume("v1".into())],
    );
    stranger.ca = d.join("ca.crt");
    let stranger = ClientTls::new(stranger).unwrap();
    let (served, dialled) = tokio::join!(serve_one(&listener, &server), dial(&stranger, &addr));
    assert!(served.is_err(), "a foreign CA's certificate was accepted");
    assert!(dialled.is_err());

    // An expired certificate of the right CA.
    let mut expired = Issue::new(vec![Identity::Volume("v1".into())], 1);
    expired.not_before = SystemTime::now() - Duration::from_secs(3 * 86400);
    expired.not_after = SystemTime::now() - Duration::from_secs(86400);
    ca.issue_to(&expired, &d.join("expired")).unwrap();
    let expired = ClientTls::new(files(d, "expired")).unwrap();
    let (served, _) = tokio::join!(serve_one(&listener, &server), dial(&expired, &addr));
    let err = served.unwrap_err().to_string();
    assert!(err.contains("xpired"), "{err}");

    // A server whose certificate does not name the address dialled.
    let wrong_name = Issue::new(vec![Identity::Node("n2".into())], 1);
    ca.issue_to(&wrong_name, &d.join("noip")).unwrap();
    let server2 = ServerTls::new(files(d, "noip")).unwrap();
    let (_, dialled) = tokio::join!(serve_one(&listener, &server2), dial(&client, &addr));
    let err = dialled.unwrap_err().to_string();
    assert!(err.contains("not valid for name"), "{err}");
}

#[tokio::test]
async fn rotated_files_serve_the_next_connection_and_a_half_written_rotation_is_ignored() {
    let Setup {
        dir,
        ca,
        server,
        listener,
        addr,
    } = Setup::new().await;
    let d = dir.path();
    let client = ClientTls::new(issue(
        &ca,
        d,
        "engine",
        vec![Identity::Volume("old".into())],
    ))
    .unwrap();

    // Rotate the engine's certificate by rename, as Kubernetes does.
    ca.issue_to(
        &Issue::new(vec![Identity::Volume("new".into())], 1),
        &d.join("next"),
    )
    .unwrap();
    std::fs::rename(d.join("next.crt"), d.join("engine.crt")).unwrap();
    std::fs::rename(d.join("next.key"), d.join("engine.key")).unwrap();
    let (served, _) = tokio::join!(serve_one(&listener, &server), dial(&client, &addr));
    assert_eq!(served.unwrap(), vec![Identity::Volume("new".into())]);

    // Half a rotation: a new certificate whose key has not arrived yet.
    ca.issue_to(
        &Issue::new(vec![Identity::Volume("newer".into())], 1),
        &d.join("half"),
    )
    .unwrap();
    std::fs::rename(d.join("half.crt"), d.join("engine.crt")).unwrap();
    let (served, _) = tokio::join!(serve_one(&listener, &server), dial(&client, &addr));
    assert_eq!(served.unwrap(), vec![Identity::Volume("new".into())]);
    // The key arrives: the rotation completes.
    std::fs::rename(d.join("half.key"), d.join("engine.key")).unwrap();
    let (served, _) = tokio::join!(serve_one(&listener, &server), dial(&client, &addr));
    assert_eq!(served.unwrap(), vec![Identity::Volume("newer".into())]);
}

#[tokio::test]
async fn a_silent_or_plaintext_caller_gets_nothing() {
    let Setup {
        server,
        listener,
        addr,
        ..
    } = Setup::new().await;
    let garbage = async {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.write_all(b"RVOL\x00\x01 not a TLS record at all")
            .await
            .unwrap();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got).await;
        got
    };
    let (served, got) = tokio::join!(serve_one(&listener, &server), garbage);
    assert!(served.is_err());
    // At most a TLS alert record (content type 21), never data.
    assert!(got.is_empty() || got[0] == 21, "{got:?}");
}

/// A request's key is certified with the identities the signer chose,
/// whatever the request asked; the holder of the key then proves it in a
/// handshake. Garbage is refused.
#[tokio::test]
async fn a_signed_request_names_what_the_signer_chose() {
    let s = Setup::new().await;
    let (csr, key) = pki::request().unwrap();
    let cert =
        s.ca.sign_request(&csr, &Issue::new(vec![Identity::Volume("v1".into())], 1))
            .unwrap();
    let pem = rustls::pki_types::CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
    assert_eq!(identities(&pem).unwrap(), [Identity::Volume("v1".into())]);
    std::fs::write(s.dir.path().join("signed.crt"), &cert).unwrap();
    std::fs::write(s.dir.path().join("signed.key"), &key).unwrap();
    let client = ClientTls::new(files(s.dir.path(), "signed")).unwrap();
    let (served, dialled) = tokio::join!(serve_one(&s.listener, &s.server), dial(&client, &s.addr));
    assert_eq!(served.unwrap(), [Identity::Volume("v1".into())]);
    dialled.unwrap();
    let what = Issue::new(vec![Identity::Volume("v1".into())], 1);
    assert!(s.ca.sign_request("not a request", &what).is_err());
    let other = pki::request().unwrap().0.replace('A', "B");
    assert!(s.ca.sign_request(&other, &what).is_err());
}
