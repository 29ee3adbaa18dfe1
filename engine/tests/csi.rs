//! The CSI driver with real etcd, a controller and agents: the Kubernetes
//! storage SIG's conformance suite (csi-sanity), and a published volume's
//! node cut off. On this host (no ublk or nbd driver) volumes are
//! published as NBD exports; the Node service's staging specs run in the
//! guest (`scripts/vm/guest-tests.sh`).

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

/// `rvol csi` serving every service (the Node service as n1), publishing
/// volumes as NBD exports, where the controller runs.
fn start_csi(c: &Cluster, socket: &Path) -> Proc {
    let endpoint = format!("unix://{}", socket.display());
    let args = [
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
    match &c.ctl_ns {
        Some(ns) => Proc::start_in(ns, &args),
        None => Proc::start(&args),
    }
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
    let _csi = start_csi(&c, &socket);
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

/// The node a volume is published on is cut off (its link down): a
/// ControllerPublish on another node is refused, naming the first, while
/// that node's lease lives; then it succeeds, and the data written and
/// flushed before the cut is there (the cluster's takeover, through CSI).
#[test]
fn a_volume_published_on_a_cut_off_node_is_published_elsewhere() {
    use rvol_csi::proto::controller_client::ControllerClient;
    use rvol_csi::proto::volume_capability::{access_mode, AccessMode, AccessType, BlockVolume};
    use rvol_csi::proto::*;

    if !common::netns::Lab::available() {
        eprintln!("SKIPPED: network namespaces need root and iproute2");
        return;
    }
    let lab = common::netns::Lab::new(&["ctl", "n1", "n2", "n3"]);
    let tmp = tempfile::tempdir().unwrap();
    let c = Cluster::in_lab(
        tmp.path(),
        &lab,
        &[("n1", "z1"), ("n2", "z2"), ("n3", "z3")],
        "10m",
    );
    let socket = tmp.path().join("csi.sock");
    let _csi = start_csi(&c, &socket);
    let endpoint = format!("unix://{}", socket.display());
    let capability = VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode {
            mode: access_mode::Mode::SingleNodeWriter as i32,
        }),
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut ctl = rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(endpoint.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        ControllerClient::new(channel)
    });
    let publish = |ctl: &mut ControllerClient<_>, id: &str, node: &str| {
        rt.block_on(
            ctl.controller_publish_volume(ControllerPublishVolumeRequest {
                volume_id: id.into(),
                node_id: node.into(),
                volume_capability: Some(capability.clone()),
                ..Default::default()
            }),
        )
        .map(|r| r.into_inner().publish_context["nbd"].clone())
    };
    let created = rt
        .block_on(ctl.create_volume(CreateVolumeRequest {
            name: "lost".into(),
            capacity_range: Some(CapacityRange {
                required_bytes: 64 << 20,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![capability.clone()],
            parameters: [("numberOfReplicas".to_string(), "3".to_string())].into(),
            ..Default::default()
        }))
        .unwrap()
        .into_inner();
    let id = created.volume.unwrap().volume_id;
    let uri = publish(&mut ctl, &id, "n1").unwrap();
    let io = |node: usize, uri: &str, cmds: &[&str]| {
        let out = c.qemu_io(node, uri, cmds);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success() && !text.contains("Pattern verification failed"),
            "qemu-io {cmds:?}: {text}"
        );
    };
    io(0, &uri, &["write -P 0xc3 0 4M", "flush"]);

    lab.link(1, false);
    let refused = publish(&mut ctl, &id, "n2").unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(refused.message().contains("n1"), "{refused:?}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let uri = loop {
        match publish(&mut ctl, &id, "n2") {
            Ok(uri) => break uri,
            Err(e) if std::time::Instant::now() < deadline => {
                assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
            Err(e) => panic!("publish on n2 still refused: {e:?}"),
        }
    };
    io(1, &uri, &["read -P 0xc3 0 4M"]);
    lab.link(1, true);
}
