//! The CSI Node service: a published volume's device (the `/dev/ublkbN`
//! of the engine the node's agent runs) staged as a file system or left a
//! block device, and bound into pods' target paths.
//!
//! - **Stage** (mount volumes): the device gets the asked file system if
//!   it is blank (never over existing data, `crate::fs`) and is mounted on
//!   the staging path. Block volumes need no staging.
//! - **Publish**: the staging mount (or, for a block volume, the device)
//!   is bind-mounted on the target, read-only when asked.
//! - **Unpublish, unstage**: unmounted where mounted, so repeating them is
//!   harmless; the target is removed.
//! - **Stats, expansion**: usage of the mounted file system (bytes and
//!   inodes) or the device's size; the file system grown online after the
//!   controller grew the volume; the volume's condition from the cluster.

use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::Method;
use rvol_cluster::client::Client;
use rvol_cluster::controller::api::VolumeView;
use rvol_cluster::controller::nodes::NodeView;
use tonic::{Request, Response, Status};

use crate::proto::node_server::Node;
use crate::proto::node_service_capability::rpc::Type as Rpc;
use crate::proto::volume_capability::AccessType;
use crate::proto::*;
use crate::{fs, mounts, required, status, ZONE_KEY};

pub struct NodeService {
    pub client: Arc<Client>,
    pub node_id: String,
    pub keys_dir: std::path::PathBuf,
}

/// The Secret's key holding an encrypted volume's key (Longhorn's name).
pub const KEY_SECRET: &str = "CRYPTO_KEY_VALUE";

/// Publish context of an encrypted volume whose engine waits for its key
/// on the node: staging places the key, then finds the device.
pub const KEY_PENDING: &str = "keyPending";

/// How long staging waits for the device of a just-published volume.
const DEVICE_WAIT: Duration = Duration::from_secs(10);
/// How long it waits for an encrypted volume's engine to start once its
/// key is placed (the agent's next pass, then the engine's start).
const KEY_DEVICE_WAIT: Duration = Duration::from_secs(30);

fn io_status(path: &str, e: std::io::Error) -> Status {
    Status::internal(format!("{path}: {e}"))
}

fn access_type(cap: Option<&VolumeCapability>) -> Result<&AccessType, Status> {
    let cap = cap.ok_or_else(|| Status::invalid_argument("volume_capability is required"))?;
    crate::controller::check_capabilities(std::slice::from_ref(cap))
        .map_err(Status::invalid_argument)?;
    cap.access_type
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("a volume capability needs an access type"))
}

/// The published device, once it exists.
async fn device(
    publish_context: &std::collections::HashMap<String, String>,
) -> Result<String, Status> {
    let Some(device) = publish_context.get("device") else {
        return Err(Status::failed_precondition(
            "the volume was published without a device (an NBD export): publish it with \
             `rvol csi --controller --frontend ublk`",
        ));
    };
    let deadline = Instant::now() + DEVICE_WAIT;
    while !Path::new(device).exists() {
        if Instant::now() > deadline {
            return Err(Status::unavailable(format!(
                "{device} did not appear within {DEVICE_WAIT:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(device.clone())
}

fn blocking_err(e: String) -> Status {
    Status::internal(e)
}

impl NodeService {
    /// The cluster's record of volume `id`.
    async fn volume(&self, id: &str) -> Result<VolumeView, Status> {
        let v = self
            .client
            .call(Method::GET, &format!("/v1/volumes/{id}"), None)
            .await
            .map_err(crate::status::from)?;
        serde_json::from_value(v).map_err(|e| Status::internal(e.to_string()))
    }

    async fn condition(&self, id: &str) -> Option<VolumeCondition> {
        let v = self.volume(id).await.ok()?;
        Some(crate::controller::condition(&v))
    }

    /// Puts an encrypted volume's key, from the Secret staging was given,
    /// where the agent starts its engine with it (`rvol_cluster::keys`).
    async fn place_key(
        &self,
        id: &str,
        secrets: &std::collections::HashMap<String, String>,
    ) -> Result<(), Status> {
        let v = self.volume(id).await?;
        if !v.spec.encrypted {
            return Ok(());
        }
        let Some(secret) = secrets.get(KEY_SECRET).filter(|s| !s.is_empty()) else {
            return Err(Status::failed_precondition(format!(
                "volume {id} is encrypted: its StorageClass must name a Secret with \
                 {KEY_SECRET} (csi.storage.k8s.io/node-stage-secret-name and -namespace)"
            )));
        };
        if secret.len() < 32 {
            return Err(Status::invalid_argument(format!(
                "the Secret's {KEY_SECRET} holds {} bytes; a key needs at least 32",
                secret.len()
            )));
        }
        rvol_cluster::keys::write(&self.keys_dir, &v.name, secret.as_bytes())
            .map_err(|e| Status::internal(format!("writing the key of {id}: {e}")))
    }

    /// The device a publish named, or, where the engine was waiting for
    /// the key staging just placed, the one it reports once it serves.
    async fn device(
        &self,
        id: &str,
        publish_context: &std::collections::HashMap<String, String>,
    ) -> Result<String, Status> {
        if !publish_context.contains_key(KEY_PENDING) {
            return device(publish_context).await;
        }
        let deadline = Instant::now() + KEY_DEVICE_WAIT;
        loop {
            let v = self.volume(id).await?;
            let here = v
                .attached_node
                .as_ref()
                .is_some_and(|n| n.as_str() == self.node_id);
            if let (true, Some(d)) = (here, v.device) {
                let context = std::collections::HashMap::from([("device".to_string(), d)]);
                return device(&context).await;
            }
            if Instant::now() > deadline {
                return Err(Status::unavailable(format!(
                    "the engine of {id} did not start within {KEY_DEVICE_WAIT:?} of its key being placed"
                )));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        let r = request.into_inner();
        required(&r.volume_id, "volume_id")?;
        let staging = required(&r.staging_target_path, "staging_target_path")?.to_string();
        let access = access_type(r.volume_capability.as_ref())?;
        // Before anything waits for the device: the engine waits for this.
        self.place_key(&r.volume_id, &r.secrets).await?;
        let AccessType::Mount(m) = access else {
            return Ok(Response::new(NodeStageVolumeResponse {}));
        };
        let fs_type = [
            m.fs_type.as_str(),
            r.volume_context.get("fsType").map_or("", |s| s),
        ]
        .into_iter()
        .find(|f| !f.is_empty())
        .unwrap_or("ext4")
        .to_string();
        let flags = m.mount_flags.clone();
        let device = self.device(&r.volume_id, &r.publish_context).await?;
        tokio::task::spawn_blocking(move || {
            let path = Path::new(&staging);
            if mounts::is_mounted(path).map_err(|e| e.to_string())? {
                return Ok(());
            }
            std::fs::create_dir_all(path).map_err(|e| format!("{staging}: {e}"))?;
            fs::format_if_blank(&device, &fs_type)?;
            fs::mount(&device, path, &fs_type, &flags)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| {
            if e.contains("is not reformatted") {
                Status::failed_precondition(e)
            } else {
                blocking_err(e)
            }
        })?;
        tracing::info!(volume = %r.volume_id, "staged");
        Ok(Response::new(NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        request: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let r = request.into_inner();
        required(&r.volume_id, "volume_id")?;
        let path = required(&r.staging_target_path, "staging_target_path")?;
        mounts::unmount(Path::new(path)).map_err(|e| io_status(path, e))?;
        // The running engine has read it; a later one gets it again from
        // the next staging.
        if let Ok(name) = rvol_cluster::model::VolumeName::new(&r.volume_id) {
            rvol_cluster::keys::remove(&self.keys_dir, &name).map_err(|e| {
                Status::internal(format!("removing the key of {}: {e}", r.volume_id))
            })?;
        }
        Ok(Response::new(NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let r = request.into_inner();
        required(&r.volume_id, "volume_id")?;
        let target = required(&r.target_path, "target_path")?.to_string();
        let staging = required(&r.staging_target_path, "staging_target_path")?.to_string();
        let block = matches!(
            access_type(r.volume_capability.as_ref())?,
            AccessType::Block(_)
        );
        let source = if block {
            device(&r.publish_context).await?
        } else {
            if !mounts::is_mounted(Path::new(&staging)).map_err(|e| io_status(&staging, e))? {
                return Err(Status::failed_precondition(format!(
                    "{staging} is not staged: NodeStageVolume first"
                )));
            }
            staging
        };
        let readonly = r.readonly;
        tokio::task::spawn_blocking(move || {
            let t = Path::new(&target);
            if mounts::is_mounted(t).map_err(|e| e.to_string())? {
                return Ok(());
            }
            if block {
                if let Some(parent) = t.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
                }
                std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(t)
                    .map_err(|e| format!("{target}: {e}"))?;
            } else {
                std::fs::create_dir_all(t).map_err(|e| format!("{target}: {e}"))?;
            }
            fs::bind(Path::new(&source), t, readonly)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(blocking_err)?;
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    /// Unmounts the target and removes it (the kubelet made it; the spec
    /// has the driver remove it); nothing there is no error.
    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let r = request.into_inner();
        required(&r.volume_id, "volume_id")?;
        let path = required(&r.target_path, "target_path")?;
        let target = Path::new(path);
        mounts::unmount(target).map_err(|e| io_status(path, e))?;
        let removed = match std::fs::symlink_metadata(target) {
            Ok(m) if m.is_dir() => std::fs::remove_dir(target),
            Ok(_) => std::fs::remove_file(target),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        };
        removed.map_err(|e| io_status(path, e))?;
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let r = request.into_inner();
        required(&r.volume_id, "volume_id")?;
        let path = required(&r.volume_path, "volume_path")?;
        let meta = std::fs::metadata(path)
            .map_err(|_| Status::not_found(format!("{path} does not exist")))?;
        use volume_usage::Unit;
        let usage = if meta.file_type().is_block_device() {
            let total = fs::device_size(Path::new(path)).map_err(blocking_err)?;
            vec![VolumeUsage {
                available: 0,
                total: total as i64,
                used: 0,
                unit: Unit::Bytes as i32,
            }]
        } else {
            let [bytes, inodes] = fs::usage(Path::new(path)).map_err(blocking_err)?;
            [(bytes, Unit::Bytes), (inodes, Unit::Inodes)]
                .into_iter()
                .map(|((total, available, used), unit)| VolumeUsage {
                    available: available as i64,
                    total: total as i64,
                    used: used as i64,
                    unit: unit as i32,
                })
                .collect()
        };
        Ok(Response::new(NodeGetVolumeStatsResponse {
            usage,
            volume_condition: self.condition(&r.volume_id).await,
        }))
    }

    async fn node_expand_volume(
        &self,
        request: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let r = request.into_inner();
        required(&r.volume_id, "volume_id")?;
        let path = required(&r.volume_path, "volume_path")?.to_string();
        let meta = std::fs::metadata(&path)
            .map_err(|_| Status::not_found(format!("{path} does not exist")))?;
        let size = tokio::task::spawn_blocking(move || {
            let p = Path::new(&path);
            if meta.file_type().is_block_device() {
                return fs::device_size(p);
            }
            let device = mounts::source(p)
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("nothing is mounted at {path}"))?;
            fs::grow(&device, p)?;
            fs::device_size(Path::new(&device))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(blocking_err)?;
        Ok(Response::new(NodeExpandVolumeResponse {
            capacity_bytes: size as i64,
        }))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        let rpcs = [
            Rpc::StageUnstageVolume,
            Rpc::GetVolumeStats,
            Rpc::ExpandVolume,
            Rpc::VolumeCondition,
        ];
        Ok(Response::new(NodeGetCapabilitiesResponse {
            capabilities: rpcs
                .iter()
                .map(|t| NodeServiceCapability {
                    r#type: Some(node_service_capability::Type::Rpc(
                        node_service_capability::Rpc { r#type: *t as i32 },
                    )),
                })
                .collect(),
        }))
    }

    async fn node_get_info(
        &self,
        _: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        let nodes: Vec<NodeView> = serde_json::from_value(
            self.client
                .call(Method::GET, "/v1/nodes", None)
                .await
                .map_err(status::from)?,
        )
        .map_err(|e| Status::internal(e.to_string()))?;
        let me = nodes
            .iter()
            .find(|n| n.name.as_str() == self.node_id)
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "node {} has no agent in the cluster: start `rvol agent --node {}` first",
                    self.node_id, self.node_id
                ))
            })?;
        let accessible_topology = me.zone.as_ref().map(|z| Topology {
            segments: [(ZONE_KEY.to_string(), z.clone())].into(),
        });
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology,
        }))
    }
}
