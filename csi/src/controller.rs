//! The CSI Controller service: volumes, their publication on nodes,
//! capacity and expansion, each a call to the cluster controller's API.
//!
//! Publication is the cluster's attachment: ControllerPublishVolume runs
//! the volume's engine on the node (a ublk device there, or an NBD export
//! with `--frontend nbd`), and refuses while another live node has it,
//! naming that node; a node that is gone is taken over, its engine fenced.
//! Every call is idempotent because the API's are: creating a volume that
//! exists with a compatible size returns it, publishing it where it is
//! published returns the same device, unpublishing or deleting what is
//! not there succeeds.
//!
//! Snapshots, clones and volume modification are not offered yet (their
//! capabilities are not advertised).

use std::collections::HashMap;
use std::sync::Arc;

use hyper::Method;
use rvol_cluster::client::{Client, ClientError};
use rvol_cluster::controller::api::{Attached, VolumeView, MAX_SIZE};
use rvol_cluster::controller::nodes::NodeView;
use rvol_cluster::view::VolumeState;
use tonic::{Request, Response, Status};

use crate::node::KEY_PENDING;
use crate::proto::controller_server::Controller;
use crate::proto::controller_service_capability::rpc::Type as Rpc;
use crate::proto::volume_capability::access_mode::Mode;
use crate::proto::volume_capability::AccessType;
use crate::proto::*;
use crate::{names, params, required, status, ZONE_KEY};

/// A volume asked for without a size gets this much.
const DEFAULT_SIZE: u64 = 1 << 30;

pub struct ControllerService {
    pub client: Arc<Client>,
    /// How published volumes are served: "ublk" (a device) or "nbd".
    pub frontend: &'static str,
}

/// Checks capabilities: single-node access modes, a block device or a
/// file system rvol makes.
pub fn check_capabilities(caps: &[VolumeCapability]) -> Result<(), String> {
    if caps.is_empty() {
        return Err("no volume capability given".into());
    }
    for c in caps {
        let mode = c
            .access_mode
            .as_ref()
            .and_then(|m| Mode::try_from(m.mode).ok())
            .unwrap_or(Mode::Unknown);
        if !matches!(
            mode,
            Mode::SingleNodeWriter
                | Mode::SingleNodeReaderOnly
                | Mode::SingleNodeSingleWriter
                | Mode::SingleNodeMultiWriter
        ) {
            return Err(format!(
                "access mode {}: rvol volumes are used on one node at a time",
                mode.as_str_name()
            ));
        }
        match &c.access_type {
            Some(AccessType::Block(_)) => {}
            Some(AccessType::Mount(m))
                if m.fs_type.is_empty() || params::FS_TYPES.contains(&m.fs_type.as_str()) => {}
            Some(AccessType::Mount(m)) => {
                return Err(format!(
                    "file system {:?}: rvol makes ext4 or xfs",
                    m.fs_type
                ))
            }
            None => return Err("a volume capability needs an access type".into()),
        }
    }
    Ok(())
}

/// The size a capacity range asks for: at least the required bytes,
/// rounded up to 4 KiB, within the limit.
fn size_of(range: Option<&CapacityRange>) -> Result<u64, Status> {
    let (required, limit) = range.map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
    if required < 0 || limit < 0 {
        return Err(Status::out_of_range("negative capacity"));
    }
    let (required, limit) = (required as u64, limit as u64);
    let mut size = if required == 0 {
        DEFAULT_SIZE.min(if limit == 0 { u64::MAX } else { limit })
    } else {
        required
    };
    size = size.div_ceil(4096) * 4096;
    if limit != 0 && size > limit {
        return Err(Status::out_of_range(format!(
            "{required} bytes rounded up to 4 KiB is {size}, above the limit of {limit}"
        )));
    }
    if size == 0 || size > MAX_SIZE {
        return Err(Status::out_of_range(format!(
            "size {size}: a volume is 4096 bytes to {MAX_SIZE}"
        )));
    }
    Ok(size)
}

/// What the cluster says of a volume's health, as CSI's volume condition.
pub(crate) fn condition(v: &VolumeView) -> VolumeCondition {
    let (abnormal, message) = match v.state {
        VolumeState::Faulted => (
            true,
            "faulted: no replica with the current data is reachable",
        ),
        VolumeState::Degraded => (true, "degraded: fewer replicas in sync than asked"),
        _ => (false, "healthy"),
    };
    VolumeCondition {
        abnormal,
        message: message.into(),
    }
}

fn csi_volume(v: &VolumeView, context: HashMap<String, String>) -> Volume {
    Volume {
        capacity_bytes: v.size as i64,
        volume_id: v.name.to_string(),
        volume_context: context,
        content_source: None,
        accessible_topology: Vec::new(),
    }
}

impl ControllerService {
    /// The volume, or None when it does not exist.
    async fn find(&self, id: &str) -> Result<Option<VolumeView>, Status> {
        if rvol_cluster::model::VolumeName::new(id).is_err() {
            return Ok(None);
        }
        match self
            .client
            .call(Method::GET, &format!("/v1/volumes/{id}"), None)
            .await
        {
            Ok(v) => Ok(Some(serde_json::from_value(v).map_err(internal)?)),
            Err(ClientError::Refused { status, .. }) if status == 404 => Ok(None),
            Err(e) => Err(status::from(e)),
        }
    }

    async fn existing(&self, id: &str) -> Result<VolumeView, Status> {
        self.find(id)
            .await?
            .ok_or_else(|| Status::not_found(format!("volume {id} does not exist")))
    }
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        request: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        let r = request.into_inner();
        let name = names::volume_name(required(&r.name, "name")?);
        check_capabilities(&r.volume_capabilities).map_err(Status::invalid_argument)?;
        if r.volume_content_source.is_some() {
            return Err(Status::invalid_argument(
                "creating a volume from a snapshot or another volume is not supported yet",
            ));
        }
        let p = params::parse(&r.parameters).map_err(Status::invalid_argument)?;
        let size = size_of(r.capacity_range.as_ref())?;
        let mut context = HashMap::from([("fsType".to_string(), p.fs_type.clone())]);
        if p.encrypted {
            context.insert("encrypted".into(), "true".into());
        }
        let compatible = |v: &VolumeView| {
            let limit = r
                .capacity_range
                .as_ref()
                .map_or(0, |c| c.limit_bytes as u64);
            v.spec.size >= size
                && (limit == 0 || v.spec.size <= limit)
                && v.spec.replicas == p.replicas
                && v.spec.encrypted == p.encrypted
        };
        if let Some(v) = self.find(&name).await? {
            if compatible(&v) {
                return Ok(Response::new(CreateVolumeResponse {
                    volume: Some(csi_volume(&v, context)),
                }));
            }
            return Err(Status::already_exists(format!(
                "volume {name} exists with {} bytes and {} replica(s)",
                v.spec.size, v.spec.replicas
            )));
        }
        let body = serde_json::json!({
            "name": name,
            "size": size,
            "replicas": p.replicas,
            "zone_anti_affinity": p.zone_anti_affinity,
            "data_locality": p.data_locality,
            "node_selector": p.node_selector,
            "replenish_wait_secs": p.replenish_wait_secs,
            "encrypted": p.encrypted,
        });
        let v = match self
            .client
            .call(Method::POST, "/v1/volumes", Some(body))
            .await
        {
            Ok(v) => serde_json::from_value(v).map_err(internal)?,
            // Made meanwhile by a repeated request: the same answer as above.
            Err(ClientError::Refused { status, .. }) if status == 409 => {
                let v = self.existing(&name).await?;
                if !compatible(&v) {
                    return Err(Status::already_exists(format!("volume {name} exists")));
                }
                v
            }
            Err(e) => return Err(status::from(e)),
        };
        tracing::info!(volume = %name, size, replicas = p.replicas, "volume created");
        Ok(Response::new(CreateVolumeResponse {
            volume: Some(csi_volume(&v, context)),
        }))
    }

    async fn delete_volume(
        &self,
        request: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        let id = request.into_inner().volume_id;
        required(&id, "volume_id")?;
        if self.find(&id).await?.is_some() {
            match self
                .client
                .call(Method::DELETE, &format!("/v1/volumes/{id}"), None)
                .await
            {
                Ok(_) => tracing::info!(volume = %id, "volume deleted"),
                Err(ClientError::Refused { status, .. }) if status == 404 => {}
                Err(e) => return Err(status::from(e)),
            }
        }
        Ok(Response::new(DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        request: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        let r = request.into_inner();
        let id = required(&r.volume_id, "volume_id")?;
        let node = required(&r.node_id, "node_id")?;
        let cap = r
            .volume_capability
            .ok_or_else(|| Status::invalid_argument("volume_capability is required"))?;
        check_capabilities(std::slice::from_ref(&cap)).map_err(Status::invalid_argument)?;
        let v = self.existing(id).await?;
        if v.attached_node.as_ref().is_some_and(|n| n.as_str() == node) && v.readonly != r.readonly
        {
            return Err(Status::already_exists(format!(
                "volume {id} is published on {node} {}",
                if v.readonly {
                    "read-only"
                } else {
                    "read-write"
                }
            )));
        }
        let body = serde_json::json!({
            "node": node,
            "frontend": self.frontend,
            "readonly": r.readonly,
        });
        let path = format!("/v1/volumes/{id}/attach");
        let a: Attached = match self.client.call(Method::POST, &path, Some(body)).await {
            Ok(a) => serde_json::from_value(a).map_err(internal)?,
            Err(ClientError::Refused { status, message }) if status == 404 => {
                return Err(Status::not_found(message))
            }
            Err(ClientError::Refused { status, message }) if status == 409 => {
                return Err(Status::failed_precondition(message))
            }
            // Published: the engine starts once staging brings its key,
            // and staging finds the device then.
            Err(ClientError::Refused { message, .. })
                if message.starts_with(rvol_cluster::keys::WAITING) =>
            {
                let context = HashMap::from([(KEY_PENDING.to_string(), "true".to_string())]);
                return Ok(Response::new(ControllerPublishVolumeResponse {
                    publish_context: context,
                }));
            }
            Err(e) => return Err(status::from(e)),
        };
        let mut context = HashMap::new();
        if let Some(d) = a.device {
            context.insert("device".to_string(), d);
        }
        if let Some(n) = a.nbd {
            context.insert("nbd".to_string(), n);
        }
        Ok(Response::new(ControllerPublishVolumeResponse {
            publish_context: context,
        }))
    }

    async fn controller_unpublish_volume(
        &self,
        request: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        let r = request.into_inner();
        let id = required(&r.volume_id, "volume_id")?;
        if let Some(v) = self.find(id).await? {
            let here = v
                .attached_node
                .as_ref()
                .is_some_and(|n| r.node_id.is_empty() || n.as_str() == r.node_id);
            if here {
                self.client
                    .call(Method::POST, &format!("/v1/volumes/{id}/detach"), None)
                    .await
                    .map_err(status::from)?;
            }
        }
        Ok(Response::new(ControllerUnpublishVolumeResponse {}))
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        let r = request.into_inner();
        let id = required(&r.volume_id, "volume_id")?;
        if r.volume_capabilities.is_empty() {
            return Err(Status::invalid_argument("volume_capabilities is required"));
        }
        self.existing(id).await?;
        let answer = match check_capabilities(&r.volume_capabilities) {
            Ok(()) => ValidateVolumeCapabilitiesResponse {
                confirmed: Some(validate_volume_capabilities_response::Confirmed {
                    volume_context: r.volume_context,
                    volume_capabilities: r.volume_capabilities,
                    parameters: r.parameters,
                    mutable_parameters: HashMap::new(),
                }),
                message: String::new(),
            },
            Err(why) => ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: why,
            },
        };
        Ok(Response::new(answer))
    }

    async fn list_volumes(
        &self,
        request: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        let r = request.into_inner();
        let all: Vec<VolumeView> = serde_json::from_value(
            self.client
                .call(Method::GET, "/v1/volumes", None)
                .await
                .map_err(status::from)?,
        )
        .map_err(internal)?;
        let start: usize = if r.starting_token.is_empty() {
            0
        } else {
            r.starting_token
                .parse()
                .ok()
                .filter(|s| *s <= all.len())
                .ok_or_else(|| {
                    Status::aborted(format!(
                        "starting_token {:?} is not one of ours",
                        r.starting_token
                    ))
                })?
        };
        let count = if r.max_entries > 0 {
            r.max_entries as usize
        } else {
            usize::MAX
        };
        let entries: Vec<_> = all
            .iter()
            .skip(start)
            .take(count)
            .map(|v| list_volumes_response::Entry {
                volume: Some(csi_volume(v, HashMap::new())),
                status: Some(list_volumes_response::VolumeStatus {
                    published_node_ids: v.attached_node.iter().map(|n| n.to_string()).collect(),
                    volume_condition: Some(condition(v)),
                }),
            })
            .collect();
        let end = start + entries.len();
        Ok(Response::new(ListVolumesResponse {
            entries,
            next_token: if end < all.len() {
                end.to_string()
            } else {
                String::new()
            },
        }))
    }

    async fn get_capacity(
        &self,
        request: Request<GetCapacityRequest>,
    ) -> Result<Response<GetCapacityResponse>, Status> {
        let r = request.into_inner();
        if !r.volume_capabilities.is_empty() {
            check_capabilities(&r.volume_capabilities).map_err(Status::invalid_argument)?;
        }
        let nodes: Vec<NodeView> = serde_json::from_value(
            self.client
                .call(Method::GET, "/v1/nodes", None)
                .await
                .map_err(status::from)?,
        )
        .map_err(internal)?;
        // The free bytes of the live, uncordoned nodes in the segment.
        let zone = r
            .accessible_topology
            .as_ref()
            .and_then(|t| t.segments.get(ZONE_KEY).cloned());
        let free: u64 = nodes
            .iter()
            .filter(|n| n.alive && !n.cordoned)
            .filter(|n| zone.is_none() || n.zone == zone)
            .flat_map(|n| &n.disks)
            .map(|d| d.free_bytes)
            .sum();
        Ok(Response::new(GetCapacityResponse {
            available_capacity: free.min(i64::MAX as u64) as i64,
            maximum_volume_size: Some(MAX_SIZE as i64),
            minimum_volume_size: Some(4096),
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        let rpcs = [
            Rpc::CreateDeleteVolume,
            Rpc::PublishUnpublishVolume,
            Rpc::ListVolumes,
            Rpc::GetCapacity,
            Rpc::ExpandVolume,
            Rpc::ListVolumesPublishedNodes,
            Rpc::VolumeCondition,
            Rpc::GetVolume,
            Rpc::PublishReadonly,
        ];
        Ok(Response::new(ControllerGetCapabilitiesResponse {
            capabilities: rpcs
                .iter()
                .map(|t| ControllerServiceCapability {
                    r#type: Some(controller_service_capability::Type::Rpc(
                        controller_service_capability::Rpc { r#type: *t as i32 },
                    )),
                })
                .collect(),
        }))
    }

    async fn create_snapshot(
        &self,
        _: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        Err(Status::unimplemented(
            "snapshots through CSI are not offered yet",
        ))
    }

    async fn delete_snapshot(
        &self,
        _: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        Err(Status::unimplemented(
            "snapshots through CSI are not offered yet",
        ))
    }

    async fn list_snapshots(
        &self,
        _: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        Err(Status::unimplemented(
            "snapshots through CSI are not offered yet",
        ))
    }

    async fn controller_expand_volume(
        &self,
        request: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        let r = request.into_inner();
        let id = required(&r.volume_id, "volume_id")?;
        let range = r
            .capacity_range
            .ok_or_else(|| Status::invalid_argument("capacity_range is required"))?;
        let size = size_of(Some(&range))?;
        let v = self.existing(id).await?;
        let v = if size > v.spec.size {
            let body = serde_json::json!({ "size": size });
            let path = format!("/v1/volumes/{id}/expand");
            let grown = self
                .client
                .call(Method::POST, &path, Some(body))
                .await
                .map_err(status::from)?;
            serde_json::from_value(grown).map_err(internal)?
        } else {
            v
        };
        let block = matches!(
            r.volume_capability.and_then(|c| c.access_type),
            Some(AccessType::Block(_))
        );
        Ok(Response::new(ControllerExpandVolumeResponse {
            capacity_bytes: v.spec.size as i64,
            node_expansion_required: !block,
        }))
    }

    async fn controller_get_volume(
        &self,
        request: Request<ControllerGetVolumeRequest>,
    ) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        let id = request.into_inner().volume_id;
        let v = self.existing(required(&id, "volume_id")?).await?;
        Ok(Response::new(ControllerGetVolumeResponse {
            volume: Some(csi_volume(&v, HashMap::new())),
            status: Some(controller_get_volume_response::VolumeStatus {
                published_node_ids: v.attached_node.iter().map(|n| n.to_string()).collect(),
                volume_condition: Some(condition(&v)),
            }),
        }))
    }

    async fn controller_modify_volume(
        &self,
        _: Request<ControllerModifyVolumeRequest>,
    ) -> Result<Response<ControllerModifyVolumeResponse>, Status> {
        Err(Status::unimplemented("volume modification is not offered"))
    }
}
