//! The CSI Identity service: who the driver is, what it offers, and
//! whether it is ready (the cluster controller answers).

use std::sync::Arc;

use hyper::Method;
use rvol_cluster::client::Client;
use tonic::{Request, Response, Status};

use crate::proto::identity_server::Identity;
use crate::proto::plugin_capability::{service, volume_expansion, Service, Type, VolumeExpansion};
use crate::proto::*;
use crate::DRIVER;

pub struct IdentityService {
    pub client: Arc<Client>,
    pub controller: bool,
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: DRIVER.into(),
            vendor_version: env!("CARGO_PKG_VERSION").into(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        // Offline: a ublk device's size is fixed when it is made (the
        // kernels rvol runs on lack UBLK_U_CMD_UPDATE_SIZE), so a volume
        // grows while unpublished and its next engine serves the new size.
        let mut capabilities = vec![PluginCapability {
            r#type: Some(Type::VolumeExpansion(VolumeExpansion {
                r#type: volume_expansion::Type::Offline as i32,
            })),
        }];
        if self.controller {
            capabilities.push(PluginCapability {
                r#type: Some(Type::Service(Service {
                    r#type: service::Type::ControllerService as i32,
                })),
            });
        }
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        let ready = self
            .client
            .call(Method::GET, "/v1/leader", None)
            .await
            .is_ok();
        Ok(Response::new(ProbeResponse { ready: Some(ready) }))
    }
}
