//! The cluster store against a real etcd (Debian's etcd-server): the
//! conditional writes the controllers rely on, list-then-watch from a
//! revision, leases, and etcd going away and coming back.

mod common;

use std::time::{Duration, Instant};

use common::{store, Etcd};
use futures::StreamExt;
use rvol_cluster::store::{Change, Expect, Store, StoreError};

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
