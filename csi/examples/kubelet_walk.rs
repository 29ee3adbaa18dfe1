//! The kubelet's walk through a volume's life, as a CSI client against
//! `rvol csi` (run in the guest by `scripts/vm/guest-tests.sh`, where
//! published volumes are real `/dev/ublkbN` devices):
//!
//! create (3 replicas) → publish on g1 → stage (ext4) → publish → write
//! files → unpublish → unstage → unpublish → publish on g2 → stage → the
//! files are there → unpublish, expand, publish, grow the file system →
//! df shows it larger → stats → tear down → delete → no replica data left
//! on any disk. Then an encrypted volume: staged with its Secret on g1,
//! written, and no replica file holds what was written; staged without the
//! Secret on g2, refused.
//!
//!     kubelet_walk CONTROLLER_SOCK G1_SOCK G2_SOCK WORKDIR DISK...

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rvol_csi::proto::controller_client::ControllerClient;
use rvol_csi::proto::node_client::NodeClient;
use rvol_csi::proto::volume_capability::{access_mode, AccessMode, AccessType, MountVolume};
use rvol_csi::proto::*;
use tonic::transport::{Channel, Endpoint};

type Error = Box<dyn std::error::Error>;

async fn channel(socket: &str) -> Result<Channel, Error> {
    Ok(Endpoint::from_shared(format!("unix://{socket}"))?
        .connect()
        .await?)
}

fn capability() -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: "ext4".into(),
            ..Default::default()
        })),
        access_mode: Some(AccessMode {
            mode: access_mode::Mode::SingleNodeWriter as i32,
        }),
    }
}

struct Staged {
    staging: String,
    target: String,
}

/// ControllerPublish on `node`, then NodeStage and NodePublish on its
/// Node service; the times of the three.
async fn bring_up(
    ctl: &mut ControllerClient<Channel>,
    node: &mut NodeClient<Channel>,
    id: &str,
    node_id: &str,
    work: &Path,
    secrets: &HashMap<String, String>,
) -> Result<(Staged, [Duration; 3]), Error> {
    let t = Instant::now();
    let published = ctl
        .controller_publish_volume(ControllerPublishVolumeRequest {
            volume_id: id.into(),
            node_id: node_id.into(),
            volume_capability: Some(capability()),
            ..Default::default()
        })
        .await?
        .into_inner();
    let publish = t.elapsed();
    let staged = Staged {
        staging: work
            .join(format!("staging-{node_id}"))
            .display()
            .to_string(),
        target: work.join(format!("target-{node_id}")).display().to_string(),
    };
    let t = Instant::now();
    node.node_stage_volume(NodeStageVolumeRequest {
        volume_id: id.into(),
        publish_context: published.publish_context.clone(),
        staging_target_path: staged.staging.clone(),
        volume_capability: Some(capability()),
        secrets: secrets.clone(),
        ..Default::default()
    })
    .await?;
    let stage = t.elapsed();
    let t = Instant::now();
    node.node_publish_volume(NodePublishVolumeRequest {
        volume_id: id.into(),
        publish_context: published.publish_context,
        staging_target_path: staged.staging.clone(),
        target_path: staged.target.clone(),
        volume_capability: Some(capability()),
        ..Default::default()
    })
    .await?;
    Ok((staged, [publish, stage, t.elapsed()]))
}

async fn tear_down(
    ctl: &mut ControllerClient<Channel>,
    node: &mut NodeClient<Channel>,
    id: &str,
    node_id: &str,
    s: &Staged,
) -> Result<(), Error> {
    node.node_unpublish_volume(NodeUnpublishVolumeRequest {
        volume_id: id.into(),
        target_path: s.target.clone(),
    })
    .await?;
    node.node_unstage_volume(NodeUnstageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: s.staging.clone(),
    })
    .await?;
    ctl.controller_unpublish_volume(ControllerUnpublishVolumeRequest {
        volume_id: id.into(),
        node_id: node_id.into(),
        ..Default::default()
    })
    .await?;
    Ok(())
}

fn fs_size(path: &str) -> Result<u64, Error> {
    let out = std::process::Command::new("df")
        .args(["--output=size", "-B1", path])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .nth(1)
        .ok_or("df said nothing")?
        .trim()
        .parse()?)
}

fn replica_dirs(disks: &[PathBuf], volume: &str) -> Vec<PathBuf> {
    disks
        .iter()
        .flat_map(|d| {
            std::fs::read_dir(d.join("rvol-replicas"))
                .into_iter()
                .flatten()
        })
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{volume}.")))
        })
        .collect()
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [ctl_sock, g1_sock, g2_sock, work, disks @ ..] = args.as_slice() else {
        return Err("usage: kubelet_walk CONTROLLER_SOCK G1_SOCK G2_SOCK WORKDIR DISK...".into());
    };
    let work = Path::new(work);
    let disks: Vec<PathBuf> = disks.iter().map(PathBuf::from).collect();
    let mut ctl = ControllerClient::new(channel(ctl_sock).await?);
    let mut g1 = NodeClient::new(channel(g1_sock).await?);
    let mut g2 = NodeClient::new(channel(g2_sock).await?);

    let t = Instant::now();
    let created = ctl
        .create_volume(CreateVolumeRequest {
            name: "walk".into(),
            capacity_range: Some(CapacityRange {
                required_bytes: 64 << 20,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![capability()],
            parameters: HashMap::from([("numberOfReplicas".into(), "3".into())]),
            ..Default::default()
        })
        .await?
        .into_inner();
    let create = t.elapsed();
    let id = created.volume.ok_or("no volume")?.volume_id;

    let none = HashMap::new();
    let (s1, [publish, stage, bind]) = bring_up(&mut ctl, &mut g1, &id, "g1", work, &none).await?;
    println!(
        "walk: create {create:?}, publish {publish:?}, stage (mkfs and mount) {stage:?}, publish (bind) {bind:?}"
    );
    let content: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let file = Path::new(&s1.target).join("data.bin");
    std::fs::write(&file, &content)?;
    std::fs::File::open(&file)?.sync_all()?;
    tear_down(&mut ctl, &mut g1, &id, "g1", &s1).await?;

    let (s2, _) = bring_up(&mut ctl, &mut g2, &id, "g2", work, &none).await?;
    let read = std::fs::read(Path::new(&s2.target).join("data.bin"))?;
    if read != content {
        return Err("the file written on g1 differs on g2".into());
    }
    println!("walk: the file written on g1 reads back on g2");

    // Expansion is offline (see the Identity service): unpublished, grown,
    // published again, and the file system grown on the node.
    let before = fs_size(&s2.target)?;
    tear_down(&mut ctl, &mut g2, &id, "g2", &s2).await?;
    ctl.controller_expand_volume(ControllerExpandVolumeRequest {
        volume_id: id.clone(),
        capacity_range: Some(CapacityRange {
            required_bytes: 128 << 20,
            limit_bytes: 0,
        }),
        volume_capability: Some(capability()),
        ..Default::default()
    })
    .await?;
    let (s2, _) = bring_up(&mut ctl, &mut g2, &id, "g2", work, &none).await?;
    g2.node_expand_volume(NodeExpandVolumeRequest {
        volume_id: id.clone(),
        volume_path: s2.target.clone(),
        volume_capability: Some(capability()),
        ..Default::default()
    })
    .await?;
    let after = fs_size(&s2.target)?;
    if after < before + (48 << 20) {
        return Err(format!("df: {before} bytes before the expansion, {after} after").into());
    }
    println!("walk: expanded, df {before} -> {after} bytes");
    // A replica may still be catching up after the move (the kubelet
    // polls stats; so does the walk, for a while).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let stats = g2
            .node_get_volume_stats(NodeGetVolumeStatsRequest {
                volume_id: id.clone(),
                volume_path: s2.target.clone(),
                ..Default::default()
            })
            .await?
            .into_inner();
        let normal = stats.volume_condition.as_ref().is_some_and(|c| !c.abnormal);
        if stats.usage.len() == 2 && normal {
            break;
        }
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "stats: expected bytes and inodes and a normal condition within 30 s: {stats:?}"
            )
            .into());
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }

    tear_down(&mut ctl, &mut g2, &id, "g2", &s2).await?;
    ctl.delete_volume(DeleteVolumeRequest {
        volume_id: id.clone(),
        ..Default::default()
    })
    .await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !replica_dirs(&disks, &id).is_empty() {
        if Instant::now() > deadline {
            return Err(format!("replica data left: {:?}", replica_dirs(&disks, &id)).into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("walk: deleted; no replica data left on any disk");
    sealed_walk(&mut ctl, &mut g1, &mut g2, work, &disks).await?;
    println!("kubelet walk passed");
    Ok(())
}

/// An encrypted volume through the same walk, its key from a Secret.
async fn sealed_walk(
    ctl: &mut ControllerClient<Channel>,
    g1: &mut NodeClient<Channel>,
    g2: &mut NodeClient<Channel>,
    work: &Path,
    disks: &[PathBuf],
) -> Result<(), Error> {
    let id = ctl
        .create_volume(CreateVolumeRequest {
            name: "walk-sealed".into(),
            capacity_range: Some(CapacityRange {
                required_bytes: 64 << 20,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![capability()],
            parameters: HashMap::from([
                ("numberOfReplicas".into(), "2".into()),
                ("encrypted".into(), "true".into()),
            ]),
            ..Default::default()
        })
        .await?
        .into_inner()
        .volume
        .ok_or("no volume")?
        .volume_id;
    let secrets = HashMap::from([(
        "CRYPTO_KEY_VALUE".to_string(),
        "a key of the walk, forty-odd bytes long, from a Secret".to_string(),
    )]);
    let (s, _) = bring_up(ctl, g1, &id, "g1", work, &secrets).await?;
    let marker = b"rvol-walk-plaintext-marker|";
    let content: Vec<u8> = marker.iter().copied().cycle().take(1 << 20).collect();
    let file = Path::new(&s.target).join("secret.bin");
    std::fs::write(&file, &content)?;
    std::fs::File::open(&file)?.sync_all()?;
    if std::fs::read(&file)? != content {
        return Err("the encrypted volume's file reads back differently".into());
    }
    for dir in replica_dirs(disks, &id) {
        for f in std::fs::read_dir(&dir)?.flatten() {
            if std::fs::read(f.path())?
                .windows(marker.len())
                .any(|w| w == marker)
            {
                return Err(format!("{} holds plaintext", f.path().display()).into());
            }
        }
    }
    tear_down(ctl, g1, &id, "g1", &s).await?;
    // On g2 without the Secret: refused, saying what is missing.
    let published = ctl
        .controller_publish_volume(ControllerPublishVolumeRequest {
            volume_id: id.clone(),
            node_id: "g2".into(),
            volume_capability: Some(capability()),
            ..Default::default()
        })
        .await?
        .into_inner();
    let refused = g2
        .node_stage_volume(NodeStageVolumeRequest {
            volume_id: id.clone(),
            publish_context: published.publish_context,
            staging_target_path: work.join("staging-sealed").display().to_string(),
            volume_capability: Some(capability()),
            ..Default::default()
        })
        .await
        .err()
        .ok_or("staged an encrypted volume without its key")?;
    if refused.code() != tonic::Code::FailedPrecondition
        || !refused.message().contains("CRYPTO_KEY_VALUE")
    {
        return Err(format!("staging without the key: {refused}").into());
    }
    ctl.controller_unpublish_volume(ControllerUnpublishVolumeRequest {
        volume_id: id.clone(),
        node_id: "g2".into(),
        ..Default::default()
    })
    .await?;
    ctl.delete_volume(DeleteVolumeRequest {
        volume_id: id,
        ..Default::default()
    })
    .await?;
    println!("walk: an encrypted volume written with its key holds no plaintext on any replica; without the key, staging is refused");
    Ok(())
}
