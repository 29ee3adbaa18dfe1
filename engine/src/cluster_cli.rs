//! The cluster's commands: `rvol controller`, `rvol agent`, and the
//! `--cluster` verbs of `rvol volume` and `rvol node`, a thin layer over
//! [`rvol_cluster`] and the controller's API.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use hyper::Method;
use rvol_cluster::agent::{AgentConfig, AgentOptions};
use rvol_cluster::client::Client;
use rvol_cluster::controller::api::{Attached, VolumeView};
use rvol_cluster::controller::nodes::NodeView;
use rvol_cluster::controller::ControllerOptions;
use rvol_cluster::etcd::EtcdStore;
use rvol_cluster::http::Credentials;
use rvol_cluster::model::{
    DataLocality, Frontend, NodeName, PortRange, Snapshot, SnapshotState, VolumeName,
    ZoneAntiAffinity,
};
use rvol_cluster::placement::Policy;
use tokio::signal::unix::{signal, SignalKind};

/// Parses `90`, `90s`, `5m`, `1h`, `500ms`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration"))?;
    Ok(match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m, h)")),
    })
}

#[derive(clap::Args)]
pub struct ControllerArgs {
    #[command(flatten)]
    etcd: EtcdArgs,
    /// Where the API listens (host:port).
    #[arg(long)]
    listen: String,
    /// How other processes reach this controller (default: --listen).
    #[arg(long)]
    advertise: Option<String>,
    /// How long a replica's node may be away before it is replaced.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    replica_replenish_wait: Duration,
    /// How long a silent leader leads before another takes over.
    #[arg(long, default_value = "6s", value_parser = parse_duration)]
    leader_ttl: Duration,
    /// How far scheduled replica sizes may exceed a disk (1.0: 100 %).
    #[arg(long, default_value_t = 1.0)]
    overprovisioning: f64,
    /// Share of a disk that must stay free for it to take a replica.
    #[arg(long, default_value_t = 0.1)]
    min_free: f64,
    /// A file holding the token that controls the cluster (create,
    /// attach, delete...); without one the API is open to whoever reaches
    /// it. The CLI reads it from the file named by RVOL_CLUSTER_TOKEN_FILE.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// A file holding a token that may only read (ls, get).
    #[arg(long, requires = "token_file")]
    read_token_file: Option<PathBuf>,
    /// Anyone may read (ls, get, the dashboard at /ui/); changes still
    /// need --token-file's token.
    #[arg(long, requires = "token_file", conflicts_with = "read_token_file")]
    public_reads: bool,
    /// Serve HTTPS with this certificate (--tls-cert/--tls-key/--tls-ca;
    /// clients bring a token, not a certificate). The CLI checks it with
    /// the CA in RVOL_CLUSTER_CA_FILE, given https:// URLs.
    #[command(flatten)]
    tls: crate::cert::TlsArgs,
    /// A CA's folder (ca.crt, ca.key) to sign engine certificates with, in
    /// a cluster whose agents run with --tls-*: an engine's certificate
    /// names its volume and is signed only for the node it is attached to.
    #[arg(long)]
    issuer_dir: Option<PathBuf>,
}

/// The variables naming the files the CLI reads its cluster token and CA
/// certificate from.
pub const TOKEN_ENV: &str = "RVOL_CLUSTER_TOKEN_FILE";
pub const CA_ENV: &str = "RVOL_CLUSTER_CA_FILE";

#[derive(clap::Args)]
pub struct AgentArgs {
    #[arg(long)]
    node: String,
    #[command(flatten)]
    etcd: EtcdArgs,
    /// Where the agent's API listens (host:port).
    #[arg(long)]
    listen: String,
    /// A directory for replicas; repeat for several disks.
    #[arg(long = "disk", required = true)]
    disks: Vec<PathBuf>,
    #[arg(long)]
    zone: Option<String>,
    /// A label KEY=VALUE for node selectors; repeat for several.
    #[arg(long = "label", value_parser = crate::parse_label)]
    labels: Vec<(String, String)>,
    /// The IP replicas and NBD exports listen on (default: --listen's).
    #[arg(long)]
    advertise: Option<std::net::IpAddr>,
    /// The ports replicas and NBD exports may use.
    #[arg(long, default_value = "10100-10999")]
    ports: PortRange,
    /// How long the node stays registered after the agent falls silent.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    ttl: Duration,
    /// The node's certificate (naming rvol://node/NAME and the --advertise
    /// IP), its key and the cluster's CA: replicas then serve mutual TLS
    /// only, and engines run with certificates the controller signs.
    #[command(flatten)]
    tls: crate::cert::TlsArgs,
    /// Where this node finds the keys of encrypted volumes (VOLUME.key,
    /// 0600; the CSI node plugin puts them there from the StorageClass's
    /// Secret): an engine waits for its volume's key.
    #[arg(long, default_value = KEYS_DIR)]
    keys_dir: PathBuf,
    /// The most MiB/s each engine on this node copies to rebuild a
    /// replica (0: no limit).
    #[arg(long, default_value_t = 0.0)]
    rebuild_rate_mib: f64,
    /// Engines on this node evict a replica that stays this many seconds
    /// far slower than its peers (see `rvol engine --evict-slow-replicas`),
    /// and the controller replaces it on another node; without it they
    /// only report it.
    #[arg(long, value_name = "SECONDS")]
    evict_slow_replicas: Option<f64>,
    /// A file holding the token that the agent's API (what the node runs)
    /// requires; without one, anyone who reaches --listen may read it.
    #[arg(long)]
    token_file: Option<PathBuf>,
}

/// Where clients of the agent's API find its token file.
pub const AGENT_TOKEN_ENV: &str = "RVOL_AGENT_TOKEN_FILE";

/// Where nodes keep encrypted volumes' keys by default (agent and CSI
/// node plugin alike).
pub const KEYS_DIR: &str = "/var/lib/rvol/keys";

/// `--cluster`: the controllers' URLs, comma-separated.
#[derive(clap::Args, Clone)]
pub struct ClusterArg {
    #[arg(long, env = "RVOL_CLUSTER")]
    pub cluster: String,
}

#[derive(clap::Subcommand)]
pub enum NodeCommand {
    /// The nodes, live or holding replicas.
    Ls {
        #[command(flatten)]
        cluster: ClusterArg,
        #[arg(long)]
        json: bool,
    },
    /// No new replica is placed on the node.
    Cordon {
        node: String,
        #[command(flatten)]
        cluster: ClusterArg,
    },
    /// Also stops a drain.
    Uncordon {
        node: String,
        #[command(flatten)]
        cluster: ClusterArg,
    },
    /// Cordons the node and moves its replicas away (each rebuilt
    /// elsewhere before it is removed); waits until none is left.
    Drain {
        node: String,
        #[command(flatten)]
        cluster: ClusterArg,
        /// How long to wait; the drain goes on after the command gives up.
        #[arg(long, default_value = "10m", value_parser = parse_duration)]
        timeout: Duration,
    },
}

#[derive(clap::Subcommand)]
pub enum SnapshotCommand {
    /// Take a snapshot (through the volume's engine; a maintenance engine
    /// while it is detached). Asking again for one taken is no error.
    Create {
        volume: String,
        snapshot: String,
        #[command(flatten)]
        cluster: ClusterArg,
    },
    /// The volume's snapshots, oldest first.
    Ls {
        volume: String,
        #[command(flatten)]
        cluster: ClusterArg,
        #[arg(long)]
        json: bool,
    },
    /// Remove a snapshot from every replica's chain.
    Rm {
        volume: String,
        snapshot: String,
        #[command(flatten)]
        cluster: ClusterArg,
    },
}

#[derive(clap::Args)]
pub struct CreateArgs {
    name: String,
    #[arg(long, value_parser = crate::parse_size)]
    size: u64,
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    #[arg(long, default_value = "soft")]
    zone_anti_affinity: ZoneAntiAffinity,
    #[arg(long, default_value = "disabled")]
    data_locality: DataLocality,
    /// Only nodes with this label KEY=VALUE; repeat for several.
    #[arg(long = "node-selector", value_parser = crate::parse_label)]
    node_selector: Vec<(String, String)>,
    /// How long a replica's node may be away before the replica is
    /// replaced (default: the controller's --replica-replenish-wait).
    #[arg(long, value_parser = parse_duration)]
    replenish_wait: Option<Duration>,
    /// Encrypt the volume at rest: its engines need its key on their node
    /// (the agents' --keys-dir, VOLUME.key).
    #[arg(long)]
    encrypted: bool,
    #[command(flatten)]
    cluster: ClusterArg,
    #[arg(long)]
    json: bool,
}

/// How the controller and agents reach etcd.
#[derive(clap::Args)]
pub struct EtcdArgs {
    /// etcd client URLs, comma-separated (https:// with --etcd-ca-file).
    #[arg(long, env = "RVOL_ETCD")]
    etcd: String,
    /// The CA of etcd's certificates: talk to etcd over TLS only.
    #[arg(long, env = "RVOL_ETCD_CA_FILE")]
    etcd_ca_file: Option<PathBuf>,
    /// This process's certificate for etcd's --client-cert-auth (with
    /// etcd's auth on, its CN is the etcd user).
    #[arg(long, env = "RVOL_ETCD_CERT_FILE", requires = "etcd_key_file")]
    etcd_cert_file: Option<PathBuf>,
    #[arg(long, env = "RVOL_ETCD_KEY_FILE", requires = "etcd_cert_file")]
    etcd_key_file: Option<PathBuf>,
}

async fn store(a: &EtcdArgs) -> anyhow::Result<Arc<EtcdStore>> {
    let tls = rvol_cluster::etcd::EtcdTls {
        ca: a.etcd_ca_file.clone(),
        cert: a.etcd_cert_file.clone(),
        key: a.etcd_key_file.clone(),
    };
    Ok(Arc::new(
        EtcdStore::connect_with(&a.etcd, &tls)
            .await
            .with_context(|| format!("connecting to etcd at {}", a.etcd))?,
    ))
}

pub async fn stopped() {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

pub async fn controller(a: ControllerArgs) -> anyhow::Result<u8> {
    let tokens = rvol_access::Tokens::load(
        a.token_file.as_deref(),
        a.read_token_file.as_deref(),
        TOKEN_ENV,
    )?
    .with_public_reads(a.public_reads)?;
    let tls = a.tls.anonymous_clients_server()?;
    let issuer = a
        .issuer_dir
        .as_deref()
        .map(|d| rvol_tls::pki::Ca::load(d).map(Arc::new))
        .transpose()
        .context("loading the --issuer-dir CA")?;
    let store = store(&a.etcd).await?;
    let listener = tokio::net::TcpListener::bind(&a.listen)
        .await
        .with_context(|| format!("binding {}", a.listen))?;
    let address = a.advertise.unwrap_or_else(|| {
        format!(
            "{}://{}",
            if tls.is_some() { "https" } else { "http" },
            listener
                .local_addr()
                .map_or(a.listen.clone(), |l| l.to_string())
        )
    });
    println!(
        "{}",
        serde_json::json!({ "event": "ready", "controller": address })
    );
    rvol_cluster::controller::run(
        store,
        ControllerOptions {
            address,
            replenish_wait: a.replica_replenish_wait,
            leader_ttl: a.leader_ttl,
            policy: Policy {
                overprovisioning: a.overprovisioning,
                min_free: a.min_free,
            },
            tick: Duration::from_secs(1),
            tokens: Arc::new(tokens),
            tls,
            issuer,
        },
        listener,
        stopped(),
    )
    .await?;
    Ok(0)
}

pub async fn agent(a: AgentArgs) -> anyhow::Result<u8> {
    let node = NodeName::new(&a.node).map_err(anyhow::Error::msg)?;
    let listener = tokio::net::TcpListener::bind(&a.listen)
        .await
        .with_context(|| format!("binding {}", a.listen))?;
    let local = listener.local_addr()?;
    let advertise = match a.advertise {
        Some(ip) => ip.to_string(),
        None if local.ip().is_unspecified() => bail!(
            "--listen {} is every address: name the one other nodes reach with --advertise",
            a.listen
        ),
        None => local.ip().to_string(),
    };
    let tls = a.tls.node_files(node.as_str())?;
    for d in &a.disks {
        std::fs::create_dir_all(d).with_context(|| format!("disk {}", d.display()))?;
    }
    let store = store(&a.etcd).await?;
    let tokens = Arc::new(rvol_access::Tokens::load(
        a.token_file.as_deref(),
        None,
        AGENT_TOKEN_ENV,
    )?);
    if tokens.is_open() {
        tracing::warn!(listen = %local, "the agent's API needs no token: whoever reaches it reads what this node runs (--token-file)");
    }
    let (report_tx, report_rx) = tokio::sync::watch::channel(None);
    let metrics = Arc::new(rvol_cluster::metrics::LoopMetrics::default());
    let app = rvol_cluster::agent::router(report_rx, metrics.clone(), tokens);
    let api = tokio::spawn(async move { axum::serve(listener, app).await });
    println!(
        "{}",
        serde_json::json!({ "event": "ready", "node": node, "listen": local.to_string() })
    );
    let result = rvol_cluster::agent::run(
        store,
        AgentOptions {
            config: AgentConfig {
                node,
                address: local.to_string(),
                advertise,
                ports: a.ports,
                zone: a.zone,
                labels: a.labels.into_iter().collect(),
                disks: a.disks,
                ttl: a.ttl,
                tls,
                keys_dir: a.keys_dir,
                rebuild_rate_mib: a.rebuild_rate_mib,
                evict_slow_replicas: a.evict_slow_replicas,
            },
            rvol: std::env::current_exe().context("finding the rvol program")?,
            tick: Duration::from_secs(1),
            metrics,
        },
        report_tx,
        stopped(),
    )
    .await;
    api.abort();
    result?;
    Ok(0)
}

/// The cluster's client, with the token and CA files the environment
/// names.
pub fn client(cluster: &ClusterArg) -> anyhow::Result<Client> {
    let credentials = Credentials {
        bearer: rvol_access::tokens::client_token(TOKEN_ENV)?,
        ca: std::env::var_os(CA_ENV).map(PathBuf::from),
    };
    Client::new(&cluster.cluster, credentials).map_err(anyhow::Error::msg)
}

/// One API call through the cluster's client (leader failover, election
/// wait).
pub async fn call(
    cluster: &ClusterArg,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<serde_json::Value> {
    Ok(client(cluster)?.call(method, path, body).await?)
}

fn print_json(v: &serde_json::Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

pub async fn create(a: CreateArgs) -> anyhow::Result<u8> {
    let body = serde_json::json!({
        "name": a.name,
        "size": a.size,
        "replicas": a.replicas,
        "zone_anti_affinity": a.zone_anti_affinity,
        "data_locality": a.data_locality,
        "node_selector": a.node_selector.into_iter().collect::<BTreeMap<_, _>>(),
        "replenish_wait_secs": a.replenish_wait.map(|d| d.as_secs()),
        "encrypted": a.encrypted,
    });
    let v = call(&a.cluster, Method::POST, "/v1/volumes", Some(body)).await?;
    if a.json {
        return print_json(&v).map(|_| 0);
    }
    let view: VolumeView = serde_json::from_value(v)?;
    let places: Vec<String> = view
        .replicas
        .iter()
        .map(|r| format!("{} on {}", r.id, r.node))
        .collect();
    println!("volume {} created: {}", view.name, places.join(", "));
    Ok(0)
}

pub async fn list(cluster: ClusterArg, json: bool) -> anyhow::Result<u8> {
    let v = call(&cluster, Method::GET, "/v1/volumes", None).await?;
    if json {
        return print_json(&v).map(|_| 0);
    }
    let volumes: Vec<VolumeView> = serde_json::from_value(v)?;
    println!(
        "{:<24} {:>14} {:<10} {:<12} REPLICAS",
        "NAME", "SIZE", "STATE", "ATTACHED"
    );
    for v in volumes {
        let replicas: Vec<String> = v
            .replicas
            .iter()
            .map(|r| format!("{}@{}", r.id, r.node))
            .collect();
        println!(
            "{:<24} {:>14} {:<10} {:<12} {}",
            v.name,
            v.size,
            serde_json::to_value(v.state)?.as_str().unwrap_or("?"),
            v.attached_node.map_or("-".into(), |n| n.to_string()),
            replicas.join(" ")
        );
    }
    Ok(0)
}

/// A name checked before it goes into a URL.
fn checked(name: &str) -> anyhow::Result<String> {
    VolumeName::new(name).map_err(anyhow::Error::msg)?;
    Ok(name.to_string())
}

pub async fn get(name: String, cluster: ClusterArg, json: bool) -> anyhow::Result<u8> {
    let name = checked(&name)?;
    let v = call(&cluster, Method::GET, &format!("/v1/volumes/{name}"), None).await?;
    if json {
        return print_json(&v).map(|_| 0);
    }
    let v: VolumeView = serde_json::from_value(v)?;
    println!(
        "volume {}  size {}  state {}  replicas {}  attached {}{}",
        v.name,
        v.size,
        serde_json::to_value(v.state)?.as_str().unwrap_or("?"),
        v.spec.replicas,
        v.attached_node.map_or("-".into(), |n| n.to_string()),
        v.maintenance
            .map_or(String::new(), |n| format!("  (maintenance engine on {n})"))
    );
    for r in &v.replicas {
        println!(
            "  {:<4} {:<16} {:<22} mode {:<4} in-sync {:<5} {}",
            r.id.to_string(),
            r.node.to_string(),
            r.address,
            r.mode.as_deref().unwrap_or("-"),
            r.in_sync,
            r.disk
        );
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for e in &v.events {
        println!("  {:>6}s ago  {}", now.saturating_sub(e.at), e.message);
    }
    Ok(0)
}

pub async fn remove(name: String, cluster: ClusterArg) -> anyhow::Result<u8> {
    let name = checked(&name)?;
    call(
        &cluster,
        Method::DELETE,
        &format!("/v1/volumes/{name}"),
        None,
    )
    .await?;
    println!("volume {name} deleted; its replicas' data is deleted by their agents");
    Ok(0)
}

pub async fn attach(
    name: String,
    node: String,
    frontend: Frontend,
    cluster: ClusterArg,
) -> anyhow::Result<u8> {
    let name = checked(&name)?;
    let body = serde_json::json!({ "node": node, "frontend": frontend });
    let v = call(
        &cluster,
        Method::POST,
        &format!("/v1/volumes/{name}/attach"),
        Some(body),
    )
    .await?;
    let a: Attached = serde_json::from_value(v)?;
    let out = match (a.device, a.nbd) {
        (Some(d), _) => serde_json::json!({ "device": d }),
        (None, Some(n)) => serde_json::json!({ "nbd": n }),
        (None, None) => bail!("attached to {}, but it reports no device or export", a.node),
    };
    println!("{out}");
    Ok(0)
}

pub async fn expand(name: String, size: u64, cluster: ClusterArg) -> anyhow::Result<u8> {
    let name = checked(&name)?;
    let body = serde_json::json!({ "size": size });
    let v = call(
        &cluster,
        Method::POST,
        &format!("/v1/volumes/{name}/expand"),
        Some(body),
    )
    .await?;
    let v: VolumeView = serde_json::from_value(v)?;
    match v.attached_node {
        Some(n) => println!("volume {name} grown to {size} bytes (served on {n})"),
        None => {
            println!("volume {name} grown to {size} bytes; its replicas grow when it is attached")
        }
    }
    Ok(0)
}

pub async fn detach(name: String, cluster: ClusterArg) -> anyhow::Result<u8> {
    let name = checked(&name)?;
    call(
        &cluster,
        Method::POST,
        &format!("/v1/volumes/{name}/detach"),
        None,
    )
    .await?;
    println!("volume {name} detached");
    Ok(0)
}

pub async fn node(c: NodeCommand) -> anyhow::Result<u8> {
    match c {
        NodeCommand::Ls { cluster, json } => {
            let v = call(&cluster, Method::GET, "/v1/nodes", None).await?;
            if json {
                return print_json(&v).map(|_| 0);
            }
            let nodes: Vec<NodeView> = serde_json::from_value(v)?;
            println!(
                "{:<16} {:<6} {:<9} {:<10} {:>8} {:>7} {:>10}",
                "NODE", "ALIVE", "CORDONED", "ZONE", "REPLICAS", "ENGINES", "FREE GiB"
            );
            for n in nodes {
                let free: u64 = n.disks.iter().map(|d| d.free_bytes).sum();
                println!(
                    "{:<16} {:<6} {:<9} {:<10} {:>8} {:>7} {:>10.1}",
                    n.name.to_string(),
                    n.alive,
                    if n.draining {
                        "draining".to_string()
                    } else {
                        n.cordoned.to_string()
                    },
                    n.zone.as_deref().unwrap_or("-"),
                    n.replicas,
                    n.engines,
                    free as f64 / (1u64 << 30) as f64
                );
            }
        }
        NodeCommand::Cordon { node, cluster } => {
            NodeName::new(&node).map_err(anyhow::Error::msg)?;
            call(
                &cluster,
                Method::POST,
                &format!("/v1/nodes/{node}/cordon"),
                None,
            )
            .await?;
            println!("node {node} cordoned: no new replica goes there");
        }
        NodeCommand::Uncordon { node, cluster } => {
            NodeName::new(&node).map_err(anyhow::Error::msg)?;
            call(
                &cluster,
                Method::POST,
                &format!("/v1/nodes/{node}/uncordon"),
                None,
            )
            .await?;
            println!("node {node} uncordoned");
        }
        NodeCommand::Drain {
            node,
            cluster,
            timeout,
        } => return drain(node, cluster, timeout).await,
    }
    Ok(0)
}

pub async fn snapshot(c: SnapshotCommand) -> anyhow::Result<u8> {
    match c {
        SnapshotCommand::Create {
            volume,
            snapshot,
            cluster,
        } => {
            let volume = checked(&volume)?;
            let body = serde_json::json!({ "name": snapshot });
            let path = format!("/v1/volumes/{volume}/snapshots");
            call(&cluster, Method::POST, &path, Some(body)).await?;
            println!("snapshot {snapshot} of volume {volume} taken");
        }
        SnapshotCommand::Ls {
            volume,
            cluster,
            json,
        } => {
            let volume = checked(&volume)?;
            let path = format!("/v1/volumes/{volume}/snapshots");
            let v = call(&cluster, Method::GET, &path, None).await?;
            if json {
                return print_json(&v).map(|_| 0);
            }
            let list: Vec<Snapshot> = serde_json::from_value(v)?;
            for s in list {
                let state = match s.state {
                    SnapshotState::Taken { at } => format!("taken at {at}"),
                    other => serde_json::to_value(other)?["is"]
                        .as_str()
                        .unwrap_or("?")
                        .to_string(),
                };
                println!("{:<32} {state}", s.name.to_string());
            }
        }
        SnapshotCommand::Rm {
            volume,
            snapshot,
            cluster,
        } => {
            let volume = checked(&volume)?;
            let path = format!("/v1/volumes/{volume}/snapshots/{snapshot}");
            call(&cluster, Method::DELETE, &path, None).await?;
            println!("snapshot {snapshot} of volume {volume} removed");
        }
    }
    Ok(0)
}

/// `rvol node drain`: asks for the drain, then follows the node's replica
/// count down to zero.
async fn drain(node: String, cluster: ClusterArg, timeout: Duration) -> anyhow::Result<u8> {
    let node = NodeName::new(&node).map_err(anyhow::Error::msg)?;
    call(
        &cluster,
        Method::POST,
        &format!("/v1/nodes/{node}/drain"),
        None,
    )
    .await?;
    println!("node {node} cordoned and draining");
    let deadline = std::time::Instant::now() + timeout;
    let mut last = None;
    loop {
        let volumes: Vec<VolumeView> =
            serde_json::from_value(call(&cluster, Method::GET, "/v1/volumes", None).await?)?;
        let left: Vec<&VolumeView> = volumes
            .iter()
            .filter(|v| v.replicas.iter().any(|r| r.node == node))
            .collect();
        if left.is_empty() {
            println!("node {node} drained: it holds no replica");
            let attached: Vec<String> = volumes
                .iter()
                .filter(|v| v.attached_node.as_ref() == Some(&node))
                .map(|v| v.name.to_string())
                .collect();
            if !attached.is_empty() {
                println!(
                    "volumes still attached there (detach them to free the node): {}",
                    attached.join(", ")
                );
            }
            return Ok(0);
        }
        if last != Some(left.len()) {
            println!("{} volume(s) still have a replica on {node}", left.len());
            last = Some(left.len());
        }
        if std::time::Instant::now() > deadline {
            for v in &left {
                let why = v.events.last().map_or("", |e| e.message.as_str());
                eprintln!("  {}: {why}", v.name);
            }
            bail!("node {node} still holds replicas after {timeout:?}; the drain goes on");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
