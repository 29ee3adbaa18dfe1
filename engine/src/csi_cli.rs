//! `rvol csi`: the CSI driver's command line (the services are in
//! `rvol-csi`).

use std::path::PathBuf;
use std::sync::Arc;

use crate::cluster_cli::{self, ClusterArg};

#[derive(clap::Args)]
pub struct CsiArgs {
    /// Where to serve: unix:///PATH/csi.sock (or a path).
    #[arg(long, env = "CSI_ENDPOINT")]
    endpoint: String,
    #[command(flatten)]
    cluster: ClusterArg,
    /// Serve the Controller service (in the controller's Deployment).
    #[arg(long)]
    controller: bool,
    /// How the Controller service has published volumes served: ublk (a
    /// /dev/ublkbN device) or nbd (an NBD export, where ublk is missing).
    #[arg(long, default_value = "ublk", value_parser = ["ublk", "nbd"])]
    frontend: String,
    /// Serve the Node service (on every node).
    #[arg(long, requires = "node_id")]
    node: bool,
    /// This node's name, as its agent registered it.
    #[arg(long, env = "NODE_NAME")]
    node_id: Option<String>,
    /// Where the node's agent finds encrypted volumes' keys (its
    /// --keys-dir): staging writes a volume's key there from its Secret.
    #[arg(long, default_value = cluster_cli::KEYS_DIR)]
    keys_dir: PathBuf,
}

pub async fn run(a: CsiArgs) -> anyhow::Result<u8> {
    if !a.controller && !a.node {
        anyhow::bail!("serve --controller, --node, or both");
    }
    let path = PathBuf::from(a.endpoint.strip_prefix("unix://").unwrap_or(&a.endpoint));
    let client = Arc::new(cluster_cli::client(&a.cluster)?);
    let opts = rvol_csi::Options {
        client,
        controller: a
            .controller
            .then_some(if a.frontend == "nbd" { "nbd" } else { "ublk" }),
        node_id: if a.node { a.node_id } else { None },
        keys_dir: a.keys_dir,
    };
    let listener = rvol_csi::listen(&path).map_err(anyhow::Error::msg)?;
    println!(
        "{}",
        serde_json::json!({ "event": "ready", "csi": path.display().to_string() })
    );
    rvol_csi::serve(listener, opts, cluster_cli::stopped())
        .await
        .map_err(|e| anyhow::anyhow!("serving CSI on {}: {e}", path.display()))?;
    Ok(0)
}
