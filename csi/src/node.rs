//! The CSI Node service. This first step answers who the node is (its
//! name, as its agent registered it, and its zone) and undoes
//! publications and stagings (unmounting what is mounted, so a repeated
//! call is harmless); staging and publishing volumes (the device of the
//! engine the agent runs, a file system made on first use, bind mounts)
//! come next, and their capabilities are not advertised until then.

use std::path::Path;
use std::sync::Arc;

use hyper::Method;
use rvol_cluster::client::Client;
use rvol_cluster::controller::nodes::NodeView;
use tonic::{Request, Response, Status};

use crate::proto::node_server::Node;
use crate::proto::*;
use crate::{mounts, required, status, ZONE_KEY};

pub struct NodeService {
    pub client: Arc<Client>,
    pub node_id: String,
}

const NOT_YET: &str = "staging and publishing volumes on the node is not offered yet";

fn io_status(path: &str, e: std::io::Error) -> Status {
    Status::internal(format!("{path}: {e}"))
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        _: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        Err(Status::unimplemented(NOT_YET))
    }

    async fn node_unstage_volume(
        &self,
        request: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let r = request.into_inner();
        required(&r.volume_id, "volume_id")?;
        let path = required(&r.staging_target_path, "staging_target_path")?;
        mounts::unmount(Path::new(path)).map_err(|e| io_status(path, e))?;
        Ok(Response::new(NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        _: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        Err(Status::unimplemented(NOT_YET))
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
        _: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        Err(Status::unimplemented(NOT_YET))
    }

    async fn node_expand_volume(
        &self,
        _: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        Err(Status::unimplemented(NOT_YET))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        Ok(Response::new(NodeGetCapabilitiesResponse {
            capabilities: Vec::new(),
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
