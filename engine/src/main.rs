//! `rvol`: replicated block storage.
//!
//! ```text
//! rvol replica --dir DIR --listen ADDR [--size SIZE]
//! rvol replica add|rm ADDR --admin ADMIN;  rvol replica ls --admin ADMIN [--json]
//! rvol engine  --name VOL --size SIZE --replica ADDR... --nbd-listen ADDR --admin-listen ADDR
//!              [--frontend nbd|ublk|none]
//! rvol volume status --admin ADDR [--json];  rvol expand SIZE --admin ADDR
//! rvol snapshot create [NAME] | ls | rm NAME | revert NAME | verify  --admin ADDR
//! rvol demo
//! rvol controller --etcd URLS --listen ADDR;  rvol agent --node N --etcd URLS --listen ADDR --disk DIR
//! rvol volume create|ls|get|rm|attach|detach|expand|snapshot ... --cluster URL;  rvol node ls|cordon|uncordon|drain --cluster URL
//! rvol cert ca --dir DIR;  rvol cert issue --ca-dir DIR --out PREFIX --volume V|--node N|--controller
//! ```
//! Engines and replicas take `--tls-cert --tls-key --tls-ca` (mutual TLS).
//!
//! Exit status: 0 clean stop; 1 could not start or failed; 2 bad usage;
//! 3 (engine) fenced by a newer engine.

mod admin;
mod backup;
mod backup_cli;
mod cert;
mod chain;
mod cluster_cli;
mod crypt;
mod csi_cli;
mod demo;
mod engine;
mod epoch;
mod events;
mod freshness;
mod in_sync;
mod metrics;
mod range_lock;
mod rebuild;
mod reconcile;
mod scrub;
mod slow;
mod volume;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use rvol_replica::server::{Endpoint, Listener};
use rvol_replica::Replica;
use tokio::signal::unix::{signal, SignalKind};

#[derive(Parser)]
#[command(
    name = "rvol",
    version,
    about = "Replicated block storage: engines, replicas and their tools"
)]
struct Cli {
    /// Async runtime threads of this process. One suits a node running a
    /// process per replica and per engine: on a 2-core machine it gave
    /// 3-replica 4 KiB writes a quarter lower qd1 latency and 1-replica
    /// qd32 writes 1.4x the IOPS of two (fewer cross-thread wake-ups).
    /// Raise it for one busy volume on a many-core node.
    #[arg(long, global = true, env = "RVOL_WORKER_THREADS", default_value_t = 1)]
    worker_threads: usize,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve one replica directory to engines (`--dir`, `--listen`), or
    /// manage a running volume's replicas (`add`, `rm`, `ls`).
    Replica(ReplicaArgs),
    /// Serve a replicated volume.
    Engine {
        #[arg(long)]
        name: String,
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Grow the replicas to at least this many bytes before serving
        /// (the volume was expanded while no engine ran).
        #[arg(long, value_parser = parse_size, default_value = "0")]
        grow_to: u64,
        /// A replica's address (host:port or unix:PATH); repeat for each.
        #[arg(long = "replica", required = true)]
        replicas: Vec<Endpoint>,
        /// `nbd`: serve NBD on --nbd-listen. `ublk`: create /dev/ublkbN
        /// (NBD listeners may be added beside it). `none`: maintenance
        /// mode, the admin API only (needed for snapshot revert).
        #[arg(long, default_value = "nbd", value_parser = ["nbd", "ublk", "none"])]
        frontend: String,
        /// Where NBD clients connect; repeat to listen on several.
        #[arg(long = "nbd-listen", required_if_eq("frontend", "nbd"))]
        nbd_listen: Vec<Endpoint>,
        /// Require TLS (STARTTLS) of NBD clients on TCP, with the --tls-*
        /// certificate; a client must present one of the CA naming the
        /// volume. Unix sockets (0600) are served without.
        #[arg(long, requires = "tls_cert")]
        nbd_tls: bool,
        /// ublk device id (/dev/ublkbN). A device with this id left by an
        /// engine that died is recovered (or, if it cannot be, replaced).
        #[arg(long)]
        ublk_id: Option<u32>,
        /// ublk hardware queues, each served by its own thread (default:
        /// one per CPU).
        #[arg(long)]
        queues: Option<u16>,
        /// ublk queue depth.
        #[arg(long, default_value_t = 128)]
        depth: u16,
        /// Logical block size of the ublk device: 4096 or 512.
        #[arg(long, default_value_t = 4096)]
        block_size: u32,
        /// Delete the ublk device when the engine dies instead of keeping
        /// it for a new engine to recover.
        #[arg(long)]
        no_user_recovery: bool,
        #[arg(long)]
        admin_listen: Endpoint,
        /// A file holding the token that controls the volume through the
        /// admin API (Authorization: Bearer); without one the API is open.
        #[arg(long)]
        admin_token_file: Option<PathBuf>,
        /// A file holding a token that may only read (status, metrics).
        #[arg(long)]
        admin_read_token_file: Option<PathBuf>,
        /// Anyone may read the admin API (status, metrics, the dashboard
        /// at /ui/); control still needs --admin-token-file's token.
        #[arg(
            long,
            requires = "admin_token_file",
            conflicts_with = "admin_read_token_file"
        )]
        admin_public_reads: bool,
        /// Serve the admin API on TCP as HTTPS only, with the --tls-*
        /// certificate (clients verify it; they bring a token, not one of
        /// their own). The CLI reads the CA from RVOL_ADMIN_CA_FILE.
        #[arg(long, requires = "tls_cert")]
        admin_tls: bool,
        /// A replica that does not answer within this many seconds is dropped.
        #[arg(long, default_value_t = 5.0)]
        replica_timeout: f64,
        /// The same for flushes and FUA writes, which wait for the disk: a
        /// flush after gigabytes of scattered writes can take a minute.
        #[arg(long, default_value_t = 120.0)]
        flush_timeout: f64,
        /// Pipelined connections to each replica. One batches every
        /// request and reply of a replica into the fewest socket calls: on
        /// a CPU-bound node that made 4k reads faster than two and writes
        /// no slower (docs/benchmarks.md).
        #[arg(long, default_value_t = 1)]
        connections_per_replica: usize,
        /// Whether reads from a replica process on this node come straight
        /// from its files, checked against its recorded checksums, instead
        /// of through its socket: blocks in its head always, others of 64
        /// KiB or more after it says where they are.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        direct_reads: bool,
        /// With no healthy replica left, I/O waits this many seconds for one
        /// with current data to return before failing.
        #[arg(long, default_value_t = 60.0)]
        io_hold_timeout: f64,
        /// Rebuild copy rate limit in MiB/s (0: unlimited).
        #[arg(long, default_value_t = 0.0)]
        rebuild_rate_mib: f64,
        /// A replica whose writes and flushes take this many times its
        /// peers'...
        #[arg(long, default_value_t = 4.0)]
        slow_replica_factor: f64,
        /// ...and at least this many milliseconds more...
        #[arg(long, default_value_t = 5.0)]
        slow_replica_min_ms: f64,
        /// ...for this many seconds is slow: reported in status, metrics
        /// and the log.
        #[arg(long, default_value_t = 20.0)]
        slow_replica_seconds: f64,
        /// Take a slow replica out of the set (never the last RW one,
        /// one at a time); it stays out until removed and added again.
        #[arg(long)]
        evict_slow_replicas: bool,
        /// Mutual TLS to the replicas (TCP); the certificate must name
        /// the volume (rvol://volume/NAME).
        #[command(flatten)]
        tls: cert::TlsArgs,
        /// The node agent's socket (unix:PATH) that records the in-sync
        /// replicas before a flush after a replica change is acknowledged.
        /// Set by the agent that runs the engine.
        #[arg(long)]
        in_sync_hook: Option<rvol_cluster::http::Address>,
        /// Encrypt the volume at rest with the secret in this file (at
        /// least 32 bytes, e.g. `head -c 32 /dev/urandom`): a new volume's
        /// replicas are bound to it, an encrypted one's refuse any other.
        #[arg(long, env = "RVOL_ENCRYPTION_KEY_FILE")]
        encryption_key_file: Option<PathBuf>,
        /// Maintain an encrypted volume without its key (needs --frontend
        /// none): rebuilds and snapshots copy sealed blocks as they are.
        /// The encryption is learnt from the replicas already bound.
        #[arg(long, conflicts_with = "encryption_key_file")]
        encryption_keyless: bool,
    },
    /// Make a cluster CA and issue certificates for rvol's processes.
    Cert {
        #[command(subcommand)]
        command: cert::CertCommand,
    },
    /// Grow a running volume to SIZE on every replica.
    Expand {
        #[arg(value_parser = parse_size)]
        size: u64,
        #[arg(long)]
        admin: Endpoint,
    },
    /// Take, list, remove and revert to snapshots of a running volume.
    Snapshot {
        #[command(subcommand)]
        command: SnapshotCommand,
    },
    /// Back snapshots up to S3 or a directory; list, restore, verify,
    /// remove backups.
    Backup {
        #[command(subcommand)]
        command: backup_cli::BackupCommand,
    },
    /// Inspect a running volume.
    Volume {
        #[command(subcommand)]
        command: VolumeCommand,
    },
    /// Run 3 replicas and an engine under a temporary directory, serving NBD.
    Demo(demo::DemoArgs),
    /// Serve the cluster's API; the leader places and heals replicas.
    Controller(cluster_cli::ControllerArgs),
    /// Run a node's replicas and engines, as the cluster places them.
    Agent(cluster_cli::AgentArgs),
    /// Serve the CSI driver (Kubernetes' storage interface) over the cluster.
    Csi(csi_cli::CsiArgs),
    /// List, cordon, uncordon and drain the cluster's nodes.
    Node {
        #[command(subcommand)]
        command: cluster_cli::NodeCommand,
    },
}

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
struct ReplicaArgs {
    #[command(subcommand)]
    command: Option<ReplicaCommand>,
    /// The replica directory (created with --size if it holds no replica).
    #[arg(long, required = true)]
    dir: Option<PathBuf>,
    /// host:port or unix:PATH.
    #[arg(long, required = true)]
    listen: Option<Endpoint>,
    /// Create a replica of this size (e.g. 1G) if DIR holds none.
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// With these, TCP callers must present a certificate of the CA naming
    /// this replica's volume (or the controller); nothing else is served.
    #[command(flatten)]
    tls: cert::TlsArgs,
}

#[derive(Subcommand)]
enum ReplicaCommand {
    /// Add a replica to a running volume; it is rebuilt online.
    Add {
        address: Endpoint,
        #[arg(long)]
        admin: Endpoint,
    },
    /// Remove a replica from a running volume (never the last RW one).
    Rm {
        address: Endpoint,
        #[arg(long)]
        admin: Endpoint,
    },
    /// List a running volume's replicas.
    Ls {
        #[arg(long)]
        admin: Endpoint,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum SnapshotCommand {
    /// A crash-consistent snapshot on every replica (writes pause briefly).
    Create {
        /// Unique name of [A-Za-z0-9._-]; generated when absent.
        name: Option<String>,
        /// A label KEY=VALUE; repeat for several.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        #[arg(long)]
        admin: Endpoint,
    },
    /// The chain, oldest first, the writable head last.
    Ls {
        #[arg(long)]
        admin: Endpoint,
        #[arg(long)]
        json: bool,
    },
    /// Remove a snapshot; its data is purged in the background (see status).
    Rm {
        name: String,
        #[arg(long)]
        admin: Endpoint,
    },
    /// Read every block on every replica and check it against its
    /// checksums; a replica with bad blocks is rebuilt.
    Verify {
        #[arg(long)]
        admin: Endpoint,
        #[arg(long)]
        json: bool,
    },
    /// Make the volume read as snapshot NAME again (engine started with
    /// --frontend none; newer snapshots must be removed first).
    Revert {
        name: String,
        #[arg(long)]
        admin: Endpoint,
    },
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

#[derive(Subcommand)]
enum VolumeCommand {
    /// Show a running engine's status and its replicas.
    Status {
        #[arg(long)]
        admin: Endpoint,
        #[arg(long)]
        json: bool,
    },
    /// Create a volume in the cluster; its replicas are placed at once.
    Create(cluster_cli::CreateArgs),
    /// The cluster's volumes.
    Ls {
        #[command(flatten)]
        cluster: cluster_cli::ClusterArg,
        #[arg(long)]
        json: bool,
    },
    /// One volume: state, replicas, attachment, events.
    Get {
        name: String,
        #[command(flatten)]
        cluster: cluster_cli::ClusterArg,
        #[arg(long)]
        json: bool,
    },
    /// Delete a detached volume and its replicas' data.
    Rm {
        name: String,
        #[command(flatten)]
        cluster: cluster_cli::ClusterArg,
    },
    /// Serve the volume on a node; prints {"nbd": URL} or {"device": PATH}.
    Attach {
        name: String,
        #[arg(long)]
        node: String,
        #[arg(long, default_value = "nbd")]
        frontend: rvol_cluster::model::Frontend,
        #[command(flatten)]
        cluster: cluster_cli::ClusterArg,
    },
    /// Snapshots of a cluster volume, attached or not.
    Snapshot {
        #[command(subcommand)]
        command: cluster_cli::SnapshotCommand,
    },
    /// Grow a cluster volume to --size, attached or not.
    Expand {
        name: String,
        #[arg(long, value_parser = parse_size)]
        size: u64,
        #[command(flatten)]
        cluster: cluster_cli::ClusterArg,
    },
    /// Stop serving the volume (its engine flushes and stops).
    Detach {
        name: String,
        #[command(flatten)]
        cluster: cluster_cli::ClusterArg,
    },
}

/// Parses `4096`, `64M`, `1G`, `1GiB`, `2T`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size"))?;
    let shift = match unit
        .trim()
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("{s:?}: unknown unit {unit:?}")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

fn main() -> ExitCode {
    // Keep large I/O buffers on the heap: glibc would mmap every buffer of
    // 128 KiB or more and unmap it when freed, paying page faults and page
    // zeroing on every large request (a quarter of the CPU of 1 MiB reads).
    // The threshold must stay within glibc's maximum (32 MiB) or the call
    // is ignored; it covers the largest frame (8 MiB). Trimming is raised
    // with it, so freed buffers stay for the next request.
    // SAFETY: mallopt only tunes the allocator; called before any thread.
    let tuned = unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 16 << 20) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20) == 1
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colour only on a terminal: logs that go to files stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if !tuned {
        tracing::warn!("mallopt refused the buffer settings; large requests will be slower");
    }
    let cli = Cli::parse();
    if let Command::Engine { frontend, .. } = &cli.command {
        // Must happen before the runtime starts threads.
        if frontend == "ublk" {
            if let Err(e) = rvol_frontend::ublk::isolate_mount_namespace() {
                eprintln!("rvol: cannot get a private mount namespace for ublk: {e}");
                return ExitCode::from(engine::EXIT_START_FAILED);
            }
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.worker_threads.max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rvol: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli.command)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("rvol: {e:#}");
            ExitCode::from(engine::EXIT_START_FAILED)
        }
    }
}

async fn run(command: Command) -> anyhow::Result<u8> {
    match command {
        Command::Replica(ReplicaArgs {
            command: Some(c), ..
        }) => replica_command(c).await,
        Command::Replica(ReplicaArgs {
            command: None,
            dir: Some(dir),
            listen: Some(listen),
            size,
            tls,
        }) => run_replica(dir, listen, size, tls).await,
        Command::Replica(_) => {
            anyhow::bail!("rvol replica needs --dir and --listen, or a subcommand")
        }
        Command::Engine {
            name,
            grow_to,
            size,
            replicas,
            frontend,
            nbd_listen,
            nbd_tls,
            ublk_id,
            queues,
            depth,
            block_size,
            no_user_recovery,
            admin_listen,
            admin_token_file,
            admin_read_token_file,
            admin_public_reads,
            admin_tls,
            replica_timeout,
            flush_timeout,
            connections_per_replica,
            direct_reads,
            io_hold_timeout,
            rebuild_rate_mib,
            slow_replica_factor,
            slow_replica_min_ms,
            slow_replica_seconds,
            evict_slow_replicas,
            tls,
            in_sync_hook,
            encryption_key_file,
            encryption_keyless,
        } => {
            if frontend == "none" && !nbd_listen.is_empty() {
                anyhow::bail!("--frontend none serves no NBD: drop --nbd-listen");
            }
            if encryption_keyless && frontend != "none" {
                anyhow::bail!("--encryption-keyless serves no data: it needs --frontend none");
            }
            let nbd_tls = if nbd_tls { tls.server()? } else { None };
            let admin_tls = if admin_tls {
                tls.anonymous_clients_server()?
            } else {
                None
            };
            let tls = tls.engine_client(&name)?;
            let key = encryption_key_file
                .map(|f| crypt::VolumeKey::load(&f, rvol_replica::volume_uuid(&name)))
                .transpose()?
                .map(Arc::new);
            let admin_tokens = Arc::new(
                rvol_access::Tokens::load(
                    admin_token_file.as_deref(),
                    admin_read_token_file.as_deref(),
                    admin::ADMIN_TOKEN_ENV,
                )?
                .with_public_reads(admin_public_reads)?,
            );
            engine::run(engine::EngineConfig {
                name,
                size,
                grow_to,
                replicas,
                nbd_listen,
                nbd_tls,
                ublk: (frontend == "ublk").then(|| {
                    let default = rvol_frontend::ublk::UblkConfig::default();
                    rvol_frontend::ublk::UblkConfig {
                        id: ublk_id,
                        queues: queues.unwrap_or(default.queues),
                        depth,
                        logical_block_size: block_size,
                        user_recovery: !no_user_recovery,
                    }
                }),
                admin_listen,
                admin_tokens,
                admin_tls,
                replica_timeout: Duration::from_secs_f64(replica_timeout),
                flush_timeout: Duration::from_secs_f64(flush_timeout),
                links: rvol_replica::client::Links {
                    connections: connections_per_replica,
                    direct_reads,
                    tls,
                    encryption: key.as_ref().map(|k| k.encryption()),
                },
                key,
                keyless: encryption_keyless,
                io_hold: Duration::from_secs_f64(io_hold_timeout),
                rebuild_rate_mib,
                in_sync_hook,
                slow: slow::SlowPolicy {
                    factor: slow_replica_factor,
                    min: Duration::from_secs_f64(slow_replica_min_ms / 1e3),
                    sustain: Duration::from_secs_f64(slow_replica_seconds),
                    evict: evict_slow_replicas,
                },
            })
            .await
        }
        Command::Snapshot { command } => snapshot_command(command).await,
        Command::Cert { command } => cert::run(command),
        Command::Expand { size, admin } => {
            let body = serde_json::json!({ "size": size }).to_string();
            admin::request(&admin, "POST", "/v1/volume/expand", Some(&body)).await?;
            println!("volume grown to {size} bytes");
            Ok(0)
        }
        Command::Volume { command } => volume_command(command).await,
        Command::Backup { command } => backup_cli::run(command).await,
        Command::Demo(args) => demo::run(args).await,
        Command::Controller(args) => cluster_cli::controller(args).await,
        Command::Agent(args) => cluster_cli::agent(args).await,
        Command::Csi(args) => csi_cli::run(args).await,
        Command::Node { command } => cluster_cli::node(command).await,
    }
}

async fn volume_command(c: VolumeCommand) -> anyhow::Result<u8> {
    match c {
        VolumeCommand::Status { admin, json } => {
            let body = admin::get(&admin, "/v1/volume").await?;
            if json {
                println!("{body}");
            } else {
                let s: admin::VolumeStatus =
                    serde_json::from_str(&body).context("parsing the status")?;
                print_status(&s);
            }
            Ok(0)
        }
        VolumeCommand::Create(args) => cluster_cli::create(args).await,
        VolumeCommand::Ls { cluster, json } => cluster_cli::list(cluster, json).await,
        VolumeCommand::Get {
            name,
            cluster,
            json,
        } => cluster_cli::get(name, cluster, json).await,
        VolumeCommand::Rm { name, cluster } => cluster_cli::remove(name, cluster).await,
        VolumeCommand::Attach {
            name,
            node,
            frontend,
            cluster,
        } => cluster_cli::attach(name, node, frontend, cluster).await,
        VolumeCommand::Detach { name, cluster } => cluster_cli::detach(name, cluster).await,
        VolumeCommand::Expand {
            name,
            size,
            cluster,
        } => cluster_cli::expand(name, size, cluster).await,
        VolumeCommand::Snapshot { command } => cluster_cli::snapshot(command).await,
    }
}

/// Every layer of the chain stays open: lift the soft file limit to the
/// hard one so long chains (10,000 layers and more) open.
fn raise_file_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

async fn run_replica(
    dir: PathBuf,
    listen: Endpoint,
    size: Option<u64>,
    tls: cert::TlsArgs,
) -> anyhow::Result<u8> {
    let tls = tls.server()?;
    if tls.is_some() && matches!(listen, Endpoint::Unix(_)) {
        tracing::warn!(%listen, "--tls-* does not apply to a Unix socket: it is served without TLS, mode 0600");
    }
    raise_file_limit();
    let d = dir.clone();
    let replica = tokio::task::spawn_blocking(move || Replica::open_or_create(&d, size))
        .await?
        .with_context(|| format!("opening replica {}", dir.display()))?;
    let replica = Arc::new(replica);
    let listener = Listener::bind(&listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let info = replica.info();
    println!(
        "{}",
        serde_json::json!({
            "event": "ready",
            "replica": dir,
            "listen": listener.local_endpoint()?.to_string(),
            "size": info.size,
            "generation": info.generation,
            "revision": info.revision,
            "clean": info.clean,
            "layers": info.chain.len(),
            "index_bytes": replica.index_memory_bytes(),
        })
    );
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    rvol_replica::server::serve(replica, listener, tls, async move {
        tokio::select! {
            _ = sigterm.recv() => {}
            _ = sigint.recv() => {}
        }
    })
    .await?;
    Ok(0)
}

async fn snapshot_command(c: SnapshotCommand) -> anyhow::Result<u8> {
    match c {
        SnapshotCommand::Create {
            name,
            labels,
            admin,
        } => {
            let req = admin::SnapshotRequest {
                name,
                labels: labels.into_iter().collect(),
            };
            let body = admin::request(
                &admin,
                "POST",
                "/v1/snapshots",
                Some(&serde_json::to_string(&req)?),
            )
            .await?;
            let r: serde_json::Value = serde_json::from_str(&body).context("parsing the answer")?;
            println!(
                "snapshot {} taken; writes paused {:.1} ms",
                r["name"].as_str().unwrap_or("?"),
                r["paused_ms"].as_f64().unwrap_or(0.0)
            );
        }
        SnapshotCommand::Ls { admin, json } => {
            let body = admin::get(&admin, "/v1/snapshots").await?;
            let chain: Vec<rvol_replica::store::LayerInfo> =
                serde_json::from_str(&body).context("parsing the chain")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&chain)?);
                return Ok(0);
            }
            println!(
                "{:<32} {:<7} {:>12} {:>14} LABELS",
                "NAME", "KIND", "CREATED", "BYTES"
            );
            for l in &chain {
                let (name, kind) = match l
                    .name
                    .strip_prefix("volume-snap-")
                    .and_then(|n| n.strip_suffix(".img"))
                {
                    Some(n) if l.removed => (n, "removed"),
                    Some(n) => (n, if l.user_created { "user" } else { "system" }),
                    None => ("(head)", "head"),
                };
                let labels: Vec<String> =
                    l.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                println!(
                    "{:<32} {:<7} {:>12} {:>14} {}",
                    name,
                    kind,
                    l.created,
                    l.allocated_bytes,
                    labels.join(",")
                );
            }
        }
        SnapshotCommand::Verify { admin, json } => {
            let body = admin::request(&admin, "POST", "/v1/verify", None).await?;
            if json {
                println!("{body}");
                return Ok(0);
            }
            let reports: Vec<scrub::ReplicaScrub> =
                serde_json::from_str(&body).context("parsing the answer")?;
            for r in reports {
                match r.error {
                    Some(e) => println!("{}: not verified: {e}", r.address),
                    None if r.bad_blocks == 0 => {
                        println!(
                            "{}: {} blocks checked, all good",
                            r.address, r.blocks_checked
                        )
                    }
                    None => println!(
                        "{}: {} blocks checked, {} bad (first: {:?}); it is being rebuilt",
                        r.address,
                        r.blocks_checked,
                        r.bad_blocks,
                        r.bad.first()
                    ),
                }
            }
        }
        SnapshotCommand::Rm { name, admin } => {
            let path = format!("/v1/snapshots/{name}");
            admin::request(&admin, "DELETE", &path, None).await?;
            println!("snapshot {name} removed; its data is purged in the background");
        }
        SnapshotCommand::Revert { name, admin } => {
            let path = format!("/v1/snapshots/{name}/revert");
            admin::request(&admin, "POST", &path, None).await?;
            println!("volume reverted to snapshot {name}");
        }
    }
    Ok(0)
}

async fn replica_command(c: ReplicaCommand) -> anyhow::Result<u8> {
    let change = |method: &'static str, address: Endpoint, admin: Endpoint| async move {
        let body = serde_json::json!({ "address": address.to_string() }).to_string();
        admin::request(&admin, method, "/v1/replicas", Some(&body)).await
    };
    match c {
        ReplicaCommand::Add { address, admin } => {
            change("POST", address.clone(), admin).await?;
            println!("added {address}; it is being rebuilt (see rvol replica ls)");
        }
        ReplicaCommand::Rm { address, admin } => {
            change("DELETE", address.clone(), admin).await?;
            println!("removed {address}");
        }
        ReplicaCommand::Ls { admin, json } => {
            let body = admin::get(&admin, "/v1/volume").await?;
            let s: admin::VolumeStatus =
                serde_json::from_str(&body).context("parsing the status")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s.replicas)?);
            } else {
                print_replicas(&s);
            }
        }
    }
    Ok(0)
}

fn print_replicas(s: &admin::VolumeStatus) {
    println!(
        "{:<32} {:<5} {:>12} {:<6} {:>10} LAST ERROR",
        "REPLICA", "MODE", "REVISION", "STALE", "LATENCY"
    );
    for r in &s.replicas {
        let latency = r.latency_ms.map_or("-".into(), |ms| format!("{ms:.2} ms"));
        println!(
            "{:<32} {:<5} {:>12} {:<6} {:>10} {}",
            r.address,
            r.mode,
            r.revision,
            r.stale,
            latency,
            r.last_error.as_deref().unwrap_or("-")
        );
        if let Some(slow) = &r.slow {
            println!(
                "  SLOW for {} s: {:.1} ms per write or flush, its peers {:.1} ms{}",
                slow.for_secs,
                slow.mean_ms,
                slow.peers_ms,
                if slow.evicted { "; evicted" } else { "" }
            );
        }
    }
    if let Some(b) = &s.rebuild {
        println!(
            "rebuilding {}: {} of {} bytes compared, {} copied, {:.1} MiB/s",
            b.replica, b.scanned, b.total, b.copied, b.mib_per_s
        );
    }
}

fn print_status(s: &admin::VolumeStatus) {
    println!(
        "volume {}  size {}  generation {}  state {}  frontend {} {}  reconciled {} B  rebuilt {} B",
        s.volume,
        s.size,
        s.generation,
        s.state,
        s.frontend,
        s.device.iter().chain(&s.nbd).cloned().collect::<Vec<_>>().join(" "),
        s.reconciled_bytes,
        s.rebuilt_bytes
    );
    if let Some(cipher) = &s.encryption {
        println!("encrypted at rest with {cipher}");
    }
    if let Some(p) = &s.purge {
        println!(
            "purging removed snapshots: {:?} {} ({} B in {} steps so far)",
            p.action, p.layer, p.bytes, p.steps
        );
    }
    if let Some(b) = &s.backup {
        let p = &b.progress;
        let outcome = match (&b.name, &b.error) {
            (Some(name), _) => format!(": {name}"),
            (_, Some(e)) => format!(": {e}"),
            _ => String::new(),
        };
        println!(
            "backup of snapshot {} to {}: {:?}, {} of {} B read, {} chunks ({} B) uploaded, {:.1} MiB/s{outcome}",
            b.snapshot, b.target, b.state, p.read, p.to_read, p.chunks_uploaded, p.bytes_uploaded, p.mib_per_s
        );
    }
    print_replicas(s);
    if !s.events.is_empty() {
        println!("EVENTS (newest last)");
        for e in s.events.iter().rev().take(10).rev() {
            println!(
                "  {}  {:?}  {}{}",
                rvol_backup::create::utc_stamp(e.at),
                e.kind,
                e.replica
                    .as_deref()
                    .map_or(String::new(), |r| format!("{r}: ")),
                e.message
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2t"), Ok(2 << 40));
        assert!(parse_size("1X").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
