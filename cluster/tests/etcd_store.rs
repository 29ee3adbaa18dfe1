//! The cluster store against a real etcd (Debian's etcd-server): the
//! conditional writes the controllers rely on, list-then-watch from a
//! revision, leases, and etcd going away and coming back.

use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use rvol_cluster::etcd::EtcdStore;
use rvol_cluster::store::{Change, Expect, Store, StoreError};

/// One etcd member on loopback ports, SIGKILLed when dropped.
struct Etcd {
    child: Child,
    client_port: u16,
    peer_port: u16,
}

fn free_port() -> u16 {
    // Below the ephemeral range, so no outgoing connection takes it.
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let start = (std::process::id() % 6000) as u16;
    loop {
        let port = 22_000 + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % 6000;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

impl Etcd {
    fn start(dir: &Path) -> Etcd {
        Etcd::start_on(dir, free_port(), free_port())
    }

    fn start_on(dir: &Path, client_port: u16, peer_port: u16) -> Etcd {
        let client = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let child = Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(dir)
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("t={peer}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd (Debian's etcd-server) must be installed");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", client_port)).is_err() {
            assert!(Instant::now() < deadline, "etcd did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        Etcd {
            child,
            client_port,
            peer_port,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A store on `etcd` once it answers (a new member takes a moment to elect
/// itself).
async fn store(etcd: &Etcd) -> EtcdStore {
    let s = EtcdStore::connect(&etcd.url()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.get("/probe").await.is_err() {
        assert!(Instant::now() < deadline, "etcd did not answer");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s
}

#[tokio::test]
async fn writes_win_only_against_what_they_expect() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(dir.path());
    let s = store(&etcd).await;

    let r1 = s
        .put("/v/a", b"1".to_vec(), Expect::Absent, None)
        .await
        .unwrap();
    // Creating it again fails and says where it is.
    let err = s
        .put("/v/a", b"x".to_vec(), Expect::Absent, None)
        .await
        .unwrap_err();
    assert_eq!(
        err,
        StoreError::Conflict {
            key: "/v/a".into(),
            current: Some(r1)
        }
    );
    let r2 = s
        .put("/v/a", b"2".to_vec(), Expect::At(r1), None)
        .await
        .unwrap();
    assert!(r2 > r1);
    // A writer that read r1 lost.
    assert!(matches!(
        s.put("/v/a", b"3".to_vec(), Expect::At(r1), None).await,
        Err(StoreError::Conflict { current: Some(r), .. }) if r == r2
    ));
    assert!(matches!(
        s.delete("/v/a", Expect::At(r1)).await,
        Err(StoreError::Conflict { .. })
    ));
    let got = s.get("/v/a").await.unwrap().unwrap();
    assert_eq!((got.value.as_slice(), got.revision), (&b"2"[..], r2));

    assert!(s.delete("/v/a", Expect::At(r2)).await.unwrap());
    assert_eq!(s.get("/v/a").await.unwrap(), None);
    assert!(!s.delete("/v/a", Expect::Anything).await.unwrap());
    // Expecting a key that is gone is a conflict with nothing there.
    assert_eq!(
        s.put("/v/a", b"4".to_vec(), Expect::At(r2), None).await,
        Err(StoreError::Conflict {
            key: "/v/a".into(),
            current: None
        })
    );
}

#[tokio::test]
async fn a_watch_from_a_listing_sees_every_later_change_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(dir.path());
    let s = store(&etcd).await;
    for k in ["/n/b", "/n/a", "/other/x"] {
        s.put(k, k.as_bytes().to_vec(), Expect::Absent, None)
            .await
            .unwrap();
    }
    let listing = s.list("/n/").await.unwrap();
    let keys: Vec<&str> = listing.items.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["/n/a", "/n/b"]);

    // Changes made after the listing but before the watch starts are seen.
    let rc = s
        .put("/n/c", b"c".to_vec(), Expect::Absent, None)
        .await
        .unwrap();
    s.put("/other/y", b"y".to_vec(), Expect::Absent, None)
        .await
        .unwrap();
    let mut watch = s.watch("/n/", listing.revision).await.unwrap();
    s.delete("/n/a", Expect::Anything).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let change = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .expect("a change within 10 s")
            .expect("the watch goes on")
            .unwrap();
        seen.push(change);
    }
    assert_eq!(
        seen[0],
        Change::Put {
            key: "/n/c".into(),
            value: b"c".to_vec(),
            revision: rc
        }
    );
    assert!(
        matches!(&seen[1], Change::Delete { key, revision } if key == "/n/a" && *revision > rc)
    );
}

#[tokio::test]
async fn leased_keys_vanish_when_the_lease_ends() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(dir.path());
    let s = store(&etcd).await;

    let kept = s.grant_lease(Duration::from_secs(5)).await.unwrap();
    s.put("/nodes/n1", b"alive".to_vec(), Expect::Absent, Some(kept))
        .await
        .unwrap();
    assert!(s.keep_alive(kept).await.unwrap() > Duration::ZERO);
    s.revoke(kept).await.unwrap();
    assert_eq!(s.get("/nodes/n1").await.unwrap(), None);
    assert_eq!(
        s.keep_alive(kept).await,
        Err(StoreError::LeaseExpired(kept))
    );

    // Not renewed: gone after its time to live.
    let lapsed = s.grant_lease(Duration::from_secs(1)).await.unwrap();
    s.put("/nodes/n2", b"alive".to_vec(), Expect::Absent, Some(lapsed))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.get("/nodes/n2").await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "the key outlived its lease");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        s.keep_alive(lapsed).await,
        Err(StoreError::LeaseExpired(lapsed))
    );
}

#[tokio::test]
async fn a_lost_etcd_is_a_prompt_clear_error_and_its_return_is_seamless() {
    let dir = tempfile::tempdir().unwrap();
    let mut etcd = Etcd::start(dir.path());
    let s = store(&etcd).await;
    let r = s
        .put("/v/kept", b"data".to_vec(), Expect::Absent, None)
        .await
        .unwrap();

    etcd.kill();
    let t = Instant::now();
    let err = s.get("/v/kept").await.unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "took {:?}",
        t.elapsed()
    );
    assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
    assert!(err.to_string().contains(&etcd.url()), "{err}");
    assert!(s.put("/v/new", vec![], Expect::Absent, None).await.is_err());

    // The same member comes back on its data: the same handle works again.
    let (client, peer) = (etcd.client_port, etcd.peer_port);
    let _etcd = Etcd::start_on(dir.path(), client, peer);
    let deadline = Instant::now() + Duration::from_secs(30);
    let got = loop {
        match s.get("/v/kept").await {
            Ok(v) => break v,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("etcd did not come back: {e}"),
        }
    };
    assert_eq!(got.map(|v| v.revision), Some(r));
}
