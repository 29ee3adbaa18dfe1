//! rvol's CSI driver (`rvol csi`): the Container Storage Interface that
//! Kubernetes speaks to storage, served over the cluster's API. It keeps
//! no state of its own: every answer comes from the cluster controller,
//! and every request is a controller call that is safe to repeat, which
//! is what CSI's idempotency asks for.

pub mod proto {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("csi.v1");
}

pub mod controller;
mod fs;
pub mod identity;
mod mounts;
pub mod names;
pub mod node;
pub mod params;
mod status;

use std::path::Path;
use std::sync::Arc;

use rvol_cluster::client::Client;

/// A field the request must carry, or INVALID_ARGUMENT.
fn required<'a>(value: &'a str, what: &str) -> Result<&'a str, tonic::Status> {
    if value.is_empty() {
        Err(tonic::Status::invalid_argument(format!(
            "{what} is required"
        )))
    } else {
        Ok(value)
    }
}

/// The driver's name, as Kubernetes' CSIDriver and StorageClasses name it.
pub const DRIVER: &str = "csi.rvol.io";
/// The topology key of a node's zone.
pub const ZONE_KEY: &str = "topology.rvol.io/zone";

pub struct Options {
    pub client: Arc<Client>,
    /// Serve the Controller service, publishing volumes with this frontend.
    pub controller: Option<&'static str>,
    /// Serve the Node service for this node.
    pub node_id: Option<String>,
    /// Where the node's agent finds encrypted volumes' keys
    /// (`rvol_cluster::keys`): staging puts them there.
    pub keys_dir: std::path::PathBuf,
}

/// Listens on the Unix socket at `path` (0600), taking over a socket an
/// earlier run left there: Kubernetes' sidecars find the driver at this
/// path.
pub fn listen(path: &Path) -> Result<tokio::net::UnixListener, String> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{}: {e}", path.display())),
    }
    let listener = tokio::net::UnixListener::bind(path)
        .map_err(|e| format!("binding {}: {e}", path.display()))?;
    // Only the driver's user (root, as the kubelet and the sidecars are)
    // may publish, mount or delete volumes through it.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(listener)
}

/// Serves the CSI services on `listener` (from [`listen`]) until `stop`.
pub async fn serve(
    listener: tokio::net::UnixListener,
    opts: Options,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    use proto::controller_server::ControllerServer;
    use proto::identity_server::IdentityServer;
    use proto::node_server::NodeServer;
    let identity = IdentityServer::new(identity::IdentityService {
        client: opts.client.clone(),
        controller: opts.controller.is_some(),
    });
    let controller = opts.controller.map(|frontend| {
        ControllerServer::new(controller::ControllerService {
            client: opts.client.clone(),
            frontend,
        })
    });
    let node = opts.node_id.map(|node_id| {
        NodeServer::new(node::NodeService {
            client: opts.client.clone(),
            node_id,
            keys_dir: opts.keys_dir.clone(),
        })
    });
    tonic::transport::Server::builder()
        .add_service(identity)
        .add_optional_service(controller)
        .add_optional_service(node)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            stop,
        )
        .await?;
    Ok(())
}
