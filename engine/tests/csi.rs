//! The CSI driver against the Kubernetes storage SIG's conformance suite
//! (csi-sanity), with real etcd, a controller and agents. On this host
//! (no ublk or nbd driver) volumes are published as NBD exports and the
//! Node service's staging specs are left to the guest.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::cluster::Cluster;
use common::Proc;

/// csi-sanity: `$CSI_SANITY`, the copy beside the project
/// (`../shared/tools`), or one on the PATH.
fn csi_sanity() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CSI_SANITY") {
        return Some(PathBuf::from(p));
    }
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/tools/csi-sanity");
    if shared.exists() {
        return Some(shared);
    }
    let on_path = Command::new("csi-sanity").arg("--help").output().is_ok();
    on_path.then(|| PathBuf::from("csi-sanity"))
}

fn start_csi(c: &Cluster, socket: &Path, extra: &[&str]) -> Proc {
    let endpoint = format!("unix://{}", socket.display());
    let mut args = vec![
        "csi",
        "--endpoint",
        &endpoint,
        "--cluster",
        &c.url,
        "--controller",
        "--frontend",
        "nbd",
        "--node",
        "--node-id",
        "n1",
    ];
    args.extend(extra);
    Proc::start(&args)
}

/// The Identity and Controller specs pass; the Node specs that stage and
/// publish need kernel block devices and run in the guest.
#[test]
fn csi_sanity_controller_and_identity_specs_pass() {
    let Some(sanity) = csi_sanity() else {
        eprintln!("SKIPPED: csi-sanity not found (../shared/tools/csi-sanity)");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let c = Cluster::local(
        tmp.path(),
        &[("n1", "za"), ("n2", "zb"), ("n3", "zc")],
        "10m",
    );
    let socket = tmp.path().join("csi.sock");
    let _csi = start_csi(&c, &socket, &[]);
    let params = tmp.path().join("params.yaml");
    std::fs::write(&params, "numberOfReplicas: \"2\"\n").unwrap();
    let out = Command::new(sanity)
        .arg(format!("--csi.endpoint=unix://{}", socket.display()))
        .arg(format!(
            "--csi.stagingdir={}",
            tmp.path().join("staging").display()
        ))
        .arg(format!(
            "--csi.mountdir={}",
            tmp.path().join("mount").display()
        ))
        .arg(format!("--csi.testvolumeparameters={}", params.display()))
        .arg("--csi.testvolumesize=16777216")
        .arg("--csi.testvolumeexpandsize=33554432")
        .arg("--ginkgo.skip=Node Service")
        .arg("--ginkgo.no-color")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let summary: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("Passed") || l.starts_with("Ran "))
        .collect();
    eprintln!("csi-sanity: {}", summary.join(" / "));
    assert!(
        out.status.success(),
        "csi-sanity failed:\n{}\n{}",
        text.lines()
            .filter(|l| l.contains("[FAIL]") || l.contains("FAIL!"))
            .collect::<Vec<_>>()
            .join("\n"),
        &text[text.len().saturating_sub(6000)..]
    );
}
