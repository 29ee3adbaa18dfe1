//! Certificates for tests, made with `rvol cert` as a user would, under
//! one CA per test binary.
//!
//! With `RVOL_TEST_TLS=1` every replica and engine the shared helpers
//! start runs with mutual TLS, so the same tests check the data path
//! through TLS (`scripts/test.sh` runs a selection that way).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::{run_ok, RVOL};

/// Whether the shared helpers start processes with TLS.
pub fn enabled() -> bool {
    std::env::var("RVOL_TEST_TLS").is_ok_and(|v| v == "1")
}

/// The CA's folder, made on first use.
pub fn ca_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir =
            Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("pki-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        run_ok(
            RVOL,
            &["cert", "ca", "--dir", dir.join("ca").to_str().unwrap()],
        );
        dir
    })
}

/// Issues a certificate with `rvol cert issue ARGS` and returns the
/// `--tls-*` flags that use it.
pub fn issue(args: &[&str]) -> Vec<String> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = ca_dir();
    let out = dir.join(format!("cert{}", N.fetch_add(1, Ordering::Relaxed)));
    let ca = dir.join("ca");
    let mut all = vec![
        "cert",
        "issue",
        "--ca-dir",
        ca.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    run_ok(RVOL, &all);
    flags(&out, &ca.join("ca.crt"))
}

/// The `--tls-*` flags for `PREFIX.crt`, `PREFIX.key` and a CA file.
pub fn flags(prefix: &Path, ca: &Path) -> Vec<String> {
    let p = prefix.display();
    vec![
        "--tls-cert".into(),
        format!("{p}.crt"),
        "--tls-key".into(),
        format!("{p}.key"),
        "--tls-ca".into(),
        ca.display().to_string(),
    ]
}

/// Flags for an engine of `volume`.
pub fn engine(volume: &str) -> Vec<String> {
    issue(&["--volume", volume])
}

/// Flags for a replica listening on `listen` (`host:port`): its
/// certificate names the host's address.
pub fn replica(listen: &str) -> Vec<String> {
    let host = listen.rsplit_once(':').map_or(listen, |(h, _)| h);
    issue(&["--node", "test-node", "--ip", host])
}

/// Links for a test playing an engine of `volume` against the replicas
/// the helpers started: with TLS when they run with it.
pub fn links(volume: &str) -> rvol_replica::client::Links {
    let tls = enabled().then(|| {
        let f = engine(volume);
        let files = rvol_tls::TlsFiles {
            cert: f[1].clone().into(),
            key: f[3].clone().into(),
            ca: f[5].clone().into(),
        };
        std::sync::Arc::new(rvol_tls::ClientTls::new(files).expect("test certificate"))
    });
    rvol_replica::client::Links {
        connections: 1,
        direct_reads: false,
        tls,
        encryption: None,
    }
}
