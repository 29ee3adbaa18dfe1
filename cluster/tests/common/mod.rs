//! A real etcd for tests: one member on loopback ports.
#![allow(dead_code)]

use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rvol_cluster::etcd::EtcdStore;
use rvol_cluster::store::Store;

/// One etcd member on loopback ports, SIGKILLed when dropped.
pub struct Etcd {
    child: Child,
    pub client_port: u16,
    pub peer_port: u16,
}

pub fn free_port() -> u16 {
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
    pub fn start(dir: &Path) -> Etcd {
        Etcd::start_on(dir, free_port(), free_port())
    }

    pub fn start_on(dir: &Path, client_port: u16, peer_port: u16) -> Etcd {
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

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    pub fn kill(&mut self) {
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
pub async fn store(etcd: &Etcd) -> EtcdStore {
    let s = EtcdStore::connect(&etcd.url()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.get("/probe").await.is_err() {
        assert!(Instant::now() < deadline, "etcd did not answer");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s
}
