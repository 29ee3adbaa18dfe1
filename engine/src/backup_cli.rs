//! `rvol backup`: back snapshots up to a target, list, restore, verify and
//! remove backups, sweep unreferenced chunks. A thin layer over
//! [`rvol_backup`]: `create` asks the volume's engine (which reads its
//! replicas) and follows its progress; the other verbs talk to the target
//! from this process. S3 settings come from this process's `AWS_*`
//! variables (`create` hands them to the engine with the request).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use rvol_backup::{Manifest, Sink, StoreOptions, Target};
use rvol_frontend::BlockVolume;
use rvol_replica::server::Endpoint;

use crate::admin;
use crate::backup::{BackupStart, BackupState, BackupStatus};
use crate::volume::ReplicatedVolume;

#[derive(clap::Subcommand)]
pub enum BackupCommand {
    /// Back snapshot SNAPSHOT of a running volume up to a target,
    /// incrementally against the volume's newest backup whose snapshot
    /// still exists; prints the backup's name.
    Create {
        volume: String,
        #[arg(long)]
        snapshot: String,
        /// s3://BUCKET/PREFIX (settings from AWS_*) or file:///DIR.
        #[arg(long)]
        target: String,
        /// The volume engine's admin address.
        #[arg(long, required_unless_present = "cluster", conflicts_with = "cluster")]
        admin: Option<Endpoint>,
        /// Or the cluster's controller(s), which have the volume's engine
        /// (a maintenance engine while it is detached) run it; the S3
        /// settings are then the agents' own AWS_* variables.
        #[arg(long)]
        cluster: Option<String>,
        /// Read rate limit in MiB/s (0: none).
        #[arg(long, default_value_t = 0.0)]
        rate_mib: f64,
        /// Chunks read and uploaded at once.
        #[arg(long, default_value_t = 4)]
        parallel: usize,
        /// Chunk size (default: that of the volume's newest backup in the
        /// target, 2M for a first; a backup is incremental only against
        /// one of the same chunk size).
        #[arg(long, value_parser = crate::parse_size)]
        chunk_size: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// List the backups in a target, oldest first.
    Ls {
        #[arg(long)]
        target: String,
        #[arg(long)]
        volume: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Restore a backup onto new, empty replicas (no cluster needed; then
    /// serve it with `rvol engine --name VOLUME --replica ...`), or as a
    /// new volume of the cluster (`--cluster`).
    Restore {
        backup: String,
        #[arg(long)]
        target: String,
        /// The restored volume's name.
        #[arg(long)]
        volume: String,
        /// A replica's address; repeat for each.
        #[arg(
            long = "replica",
            required_unless_present = "cluster",
            conflicts_with = "cluster"
        )]
        replicas: Vec<Endpoint>,
        /// Or the cluster's controller(s): the volume is created there
        /// (placed as any other) and restored onto its new replicas from
        /// this process, which must reach them.
        #[arg(long)]
        cluster: Option<String>,
        /// With --cluster: how many replicas the new volume has.
        #[arg(long = "replicas", default_value_t = 3)]
        replica_count: usize,
        /// Bring a standby that holds backup FROM up to BACKUP: only the
        /// chunks that differ are written.
        #[arg(long)]
        from: Option<String>,
        #[arg(long, default_value_t = 8)]
        parallel: usize,
        #[command(flatten)]
        tls: crate::cert::TlsArgs,
        #[arg(long)]
        json: bool,
    },
    /// Remove a backup at once; its chunks go at the next sweep.
    Rm {
        backup: String,
        #[arg(long)]
        target: String,
    },
    /// Read every chunk of a backup and check it against its name.
    Verify {
        backup: String,
        #[arg(long)]
        target: String,
        #[arg(long, default_value_t = 8)]
        parallel: usize,
        #[arg(long)]
        json: bool,
    },
    /// Delete the chunks no backup names, older than the grace period.
    Sweep {
        #[arg(long)]
        target: String,
        /// e.g. 24h, 30m, 0s.
        #[arg(long, default_value = "24h", value_parser = crate::cluster_cli::parse_duration)]
        grace: Duration,
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(c: BackupCommand) -> anyhow::Result<u8> {
    let options = StoreOptions::from_env();
    match c {
        BackupCommand::Create {
            volume,
            snapshot,
            target,
            admin,
            cluster,
            rate_mib,
            parallel,
            chunk_size,
            json,
        } => {
            let Some(admin) = admin else {
                let cluster = crate::cluster_cli::ClusterArg {
                    cluster: cluster.unwrap_or_default(),
                };
                // Whole MiB/s in the cluster's record.
                let rate = (rate_mib > 0.0).then(|| rate_mib.ceil() as u32);
                return create_in_cluster(&cluster, &volume, &snapshot, &target, rate, json).await;
            };
            let status: admin::VolumeStatus =
                serde_json::from_str(&admin::get(&admin, "/v1/volume").await?)
                    .context("parsing the volume's status")?;
            if status.volume != volume {
                bail!(
                    "the engine at {admin} serves volume {}, not {volume}",
                    status.volume
                );
            }
            let start = BackupStart {
                snapshot,
                target,
                options,
                chunk_size,
                parallel: Some(parallel),
                rate_mib: Some(rate_mib),
            };
            admin::request(
                &admin,
                "POST",
                "/v1/backups",
                Some(&serde_json::to_string(&start)?),
            )
            .await?;
            let done = follow(&admin).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&done)?);
            }
            match (done.state, &done.name) {
                (BackupState::Done, Some(name)) => {
                    if !json {
                        println!("{name}");
                    }
                    Ok(0)
                }
                _ => bail!(
                    "backup failed: {}",
                    done.error.as_deref().unwrap_or("no reason given")
                ),
            }
        }
        BackupCommand::Ls {
            target,
            volume,
            json,
        } => {
            let t = Target::open_checked(&target, &options).await?;
            let (list, unreadable) = t.manifests(volume.as_deref()).await?;
            for e in &unreadable {
                eprintln!("warning: {e:#}");
            }
            if json {
                let brief: Vec<serde_json::Value> = list.iter().map(summary).collect();
                println!("{}", serde_json::to_string_pretty(&brief)?);
                return Ok(0);
            }
            println!(
                "{:<44} {:<20} {:>12} {:>8} {:>12}  BASE",
                "NAME", "SNAPSHOT", "SIZE", "CHUNKS", "UPLOADED"
            );
            for m in &list {
                println!(
                    "{:<44} {:<20} {:>12} {:>8} {:>12}  {}",
                    m.name,
                    m.snapshot,
                    m.size,
                    m.chunks.len(),
                    m.stats.bytes_uploaded,
                    m.base.as_deref().unwrap_or("-")
                );
            }
            Ok(0)
        }
        BackupCommand::Restore {
            backup,
            target,
            volume,
            replicas,
            cluster,
            replica_count,
            from,
            parallel,
            tls,
            json,
        } => {
            let t = Target::open_checked(&target, &options).await?;
            let m = t.manifest(&backup).await?;
            let replicas = match cluster {
                None => replicas,
                Some(cluster) => {
                    let cluster = crate::cluster_cli::ClusterArg { cluster };
                    new_cluster_volume(&cluster, &volume, &m, replica_count).await?
                }
            };
            let previous = match &from {
                Some(f) => Some(t.manifest(f).await?),
                None => None,
            };
            let stats =
                restore_onto(&t, &m, previous.as_ref(), &volume, replicas, parallel, &tls).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&stats)?);
            } else {
                println!(
                    "backup {} restored as volume {volume}: {} chunks ({} bytes) written, {} unchanged, in {:.1} s",
                    m.name, stats.chunks_written, stats.bytes_written, stats.chunks_unchanged, stats.seconds
                );
            }
            Ok(0)
        }
        BackupCommand::Rm { backup, target } => {
            let t = Target::open_checked(&target, &options).await?;
            rvol_backup::remove(&t, &backup).await?;
            println!("backup {backup} removed; its chunks go at the next sweep");
            Ok(0)
        }
        BackupCommand::Verify {
            backup,
            target,
            parallel,
            json,
        } => {
            let t = Target::open_checked(&target, &options).await?;
            let m = t.manifest(&backup).await?;
            let report = rvol_backup::verify(&t, &m, parallel).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                for bad in &report.bad {
                    println!("BAD {bad}");
                }
                println!(
                    "backup {backup}: {} chunks checked, {} bad",
                    report.chunks,
                    report.bad.len()
                );
            }
            Ok(if report.bad.is_empty() { 0 } else { 1 })
        }
        BackupCommand::Sweep {
            target,
            grace,
            json,
        } => {
            let t = Arc::new(Target::open_checked(&target, &options).await?);
            let r = rvol_backup::sweep(&t, grace).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "{} manifests name {} chunks; {} deleted, {} unreferenced kept for the grace period",
                    r.manifests, r.referenced, r.deleted, r.kept_young
                );
            }
            Ok(0)
        }
    }
}

fn summary(m: &Manifest) -> serde_json::Value {
    serde_json::json!({
        "name": m.name,
        "volume": m.volume,
        "snapshot": m.snapshot,
        "created": m.created,
        "size": m.size,
        "chunk_size": m.chunk_size,
        "chunks": m.chunks.len(),
        "encrypted": m.encryption.is_some(),
        "base": m.base,
        "stats": m.stats,
    })
}

/// Follows the engine's backup to its end, with a progress bar on a
/// terminal.
fn progress_bar() -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} backup [{bar:30}] {bytes}/{total_bytes} read, {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// Creates volume `name` in the cluster for backup `m` (its size, and
/// encrypted if it was) and waits for its replicas to run; their
/// addresses.
async fn new_cluster_volume(
    cluster: &crate::cluster_cli::ClusterArg,
    name: &str,
    m: &Manifest,
    replicas: usize,
) -> anyhow::Result<Vec<Endpoint>> {
    use hyper::Method;
    use rvol_cluster::controller::api::VolumeView;
    use rvol_cluster::model::ProcessState;
    let body = serde_json::json!({
        "name": name,
        "size": m.size,
        "replicas": replicas,
        "encrypted": m.encryption.is_some(),
    });
    crate::cluster_cli::call(cluster, Method::POST, "/v1/volumes", Some(body))
        .await
        .with_context(|| format!("creating volume {name} in the cluster"))?;
    let deadline = std::time::Instant::now() + NOT_STARTED;
    loop {
        let v: VolumeView = serde_json::from_value(
            crate::cluster_cli::call(cluster, Method::GET, &format!("/v1/volumes/{name}"), None)
                .await?,
        )
        .context("parsing the volume")?;
        let running = v
            .replicas
            .iter()
            .all(|r| matches!(r.process, Some(ProcessState::Running { .. })));
        if v.replicas.len() == replicas && running {
            return v
                .replicas
                .iter()
                .map(|r| r.address.parse().map_err(anyhow::Error::msg))
                .collect();
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "volume {name} was created, but its replicas did not all run within \
                 {NOT_STARTED:?}: {:?} (remove it with rvol volume rm {name})",
                v.replicas
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// How long `backup create --cluster` waits for an engine to show it
/// running.
const NOT_STARTED: Duration = Duration::from_secs(60);

/// `backup create --cluster`: asks the controller, then follows the job
/// in the volume's record (and its engine's progress) until it ends.
async fn create_in_cluster(
    cluster: &crate::cluster_cli::ClusterArg,
    volume: &str,
    snapshot: &str,
    target: &str,
    rate_mib: Option<u32>,
    json: bool,
) -> anyhow::Result<u8> {
    use hyper::Method;
    use rvol_cluster::model::{BackupJob, BackupJobState};
    let body = serde_json::json!({ "snapshot": snapshot, "target": target, "rate_mib": rate_mib });
    let path = format!("/v1/volumes/{volume}");
    let asked: BackupJob = serde_json::from_value(
        crate::cluster_cli::call(
            cluster,
            Method::POST,
            &format!("{path}/backups"),
            Some(body),
        )
        .await?,
    )
    .context("parsing the controller's answer")?;
    let bar = progress_bar();
    // When an engine last showed the job running (or it was asked for).
    let mut last_sign = std::time::Instant::now();
    let job = loop {
        let v: rvol_cluster::controller::api::VolumeView = serde_json::from_value(
            crate::cluster_cli::call(cluster, Method::GET, &path, None).await?,
        )
        .context("parsing the volume")?;
        let job = v
            .backup
            .filter(|b| {
                b.snapshot == asked.snapshot && b.target == asked.target && b.asked == asked.asked
            })
            .context("the volume's backup request was replaced by another")?;
        if let Some(p) = v.backup_progress.filter(|p| p.snapshot == snapshot) {
            last_sign = std::time::Instant::now();
            bar.set_length(p.to_read);
            bar.set_position(p.read);
            bar.set_message(format!("{} bytes uploaded", p.uploaded));
        } else {
            bar.set_message(format!("{:?}", job.state).to_lowercase());
        }
        if !job.pending() {
            bar.finish_and_clear();
            break job;
        }
        if last_sign.elapsed() > NOT_STARTED {
            bar.finish_and_clear();
            let last = v.events.last().map_or("", |e| e.message.as_str());
            bail!(
                "no engine has run the backup for {NOT_STARTED:?}; it stays asked for, and \
                 runs when the volume's engine can (its last event: {last})"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&job)?);
    }
    match job.state {
        BackupJobState::Done { name } => {
            if !json {
                println!("{name}");
            }
            Ok(0)
        }
        BackupJobState::Failed { error } => bail!("backup failed: {error}"),
        _ => bail!("the backup ended in no known state"),
    }
}

async fn follow(admin: &Endpoint) -> anyhow::Result<BackupStatus> {
    let bar = progress_bar();
    loop {
        let s: Option<BackupStatus> =
            serde_json::from_str(&admin::get(admin, "/v1/backups").await?)
                .context("parsing the backup's status")?;
        let s = s.context("the engine has no backup to report")?;
        let p = &s.progress;
        bar.set_length(p.to_read);
        bar.set_position(p.read);
        bar.set_message(format!(
            "{} chunks uploaded ({:.1} MiB/s)",
            p.chunks_uploaded, p.mib_per_s
        ));
        if s.state != BackupState::Running {
            bar.finish_and_clear();
            return Ok(s);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Writes a restore into a volume served by this process.
struct VolumeSink(Arc<ReplicatedVolume>);

impl Sink for VolumeSink {
    async fn write(&self, offset: u64, content: Bytes) -> anyhow::Result<()> {
        let written = match self.0.encryption() {
            Some(_) => self.0.write_sealed(offset, content).await,
            None => self.0.write(offset, content, false).await,
        };
        written.with_context(|| format!("writing byte {offset} of the volume"))
    }

    async fn zero(&self, offset: u64, len: u64) -> anyhow::Result<()> {
        self.0
            .write_zeroes(offset, len, true, false)
            .await
            .with_context(|| format!("zeroing byte {offset} of the volume"))
    }
}

/// Restores `m` onto replicas that hold nothing yet (or, with `previous`,
/// a standby that holds that backup), as volume `name`.
async fn restore_onto(
    t: &Target,
    m: &Manifest,
    previous: Option<&Manifest>,
    name: &str,
    replicas: Vec<Endpoint>,
    parallel: usize,
    tls: &crate::cert::TlsArgs,
) -> anyhow::Result<rvol_backup::RestoreStats> {
    let uuid = rvol_replica::volume_uuid(name);
    // An encrypted volume's blocks are bound to its identity (their
    // associated data), so they restore only under the volume's name; the
    // replicas are bound to its encryption as the backup records it, and
    // no key is needed: sealed blocks are written as they are.
    let encryption: Option<rvol_replica::meta::Encryption> = match &m.encryption {
        None => None,
        Some(e) if uuid == m.volume_uuid => Some(
            serde_json::from_value(e.clone())
                .with_context(|| format!("backup {}: its encryption record", m.name))?,
        ),
        Some(_) => bail!(
            "backup {} is of the encrypted volume {}: its blocks are bound to that name, \
             so restore it as --volume {}",
            m.name,
            m.volume,
            m.volume
        ),
    };
    let links = rvol_replica::client::Links {
        connections: 1,
        direct_reads: false,
        tls: tls.engine_client(name)?,
        encryption,
    };
    for ep in &replicas {
        rvol_replica::local::prepare(ep, m.size).await?;
        let info = rvol_replica::client::ReplicaClient::probe(ep, uuid, &links)
            .await
            .with_context(|| format!("replica {ep}"))?;
        match previous {
            None if !info.volume_uuid.is_nil() => bail!(
                "replica {ep} already holds a volume ({}); restore needs new, empty replicas",
                info.volume_uuid
            ),
            Some(_) if info.volume_uuid != uuid => bail!(
                "replica {ep} does not hold volume {name}: --from needs the standby's replicas"
            ),
            _ => {}
        }
    }
    let cfg = crate::engine::EngineConfig {
        name: name.to_string(),
        size: m.size,
        grow_to: m.size,
        replicas,
        nbd_listen: Vec::new(),
        nbd_tls: None,
        ublk: None,
        admin_listen: Endpoint::Local(PathBuf::new()),
        admin_tokens: Arc::new(rvol_access::Tokens::default()),
        admin_tls: None,
        replica_timeout: Duration::from_secs(30),
        flush_timeout: Duration::from_secs(300),
        links,
        io_hold: Duration::ZERO,
        rebuild_rate_mib: 0.0,
        in_sync_hook: None,
        key: None,
        keyless: false,
        slow: Default::default(),
    };
    let volume = Arc::new(crate::engine::open_volume(&cfg).await?);
    let written = AtomicU64::new(0);
    let sink = VolumeSink(volume.clone());
    let result = rvol_backup::restore(t, m, previous, &sink, parallel, &written).await;
    let result = match result {
        Ok(stats) => volume
            .flush()
            .await
            .context("flushing the restored volume")
            .map(|()| stats),
        Err(e) if previous.is_none() && written.load(Ordering::Relaxed) > 0 => {
            // Leave nothing that reads as a whole volume.
            let wiped = volume.write_zeroes(0, volume.size(), true, false).await;
            Err(e.context(match wiped {
                Ok(()) => "the restore stopped; what it wrote was zeroed again",
                Err(_) => "the restore stopped, and zeroing what it wrote failed: do not serve these replicas",
            }))
        }
        Err(e) => Err(e),
    };
    volume
        .shutdown_clean()
        .await
        .context("closing the replicas")?;
    result
}
