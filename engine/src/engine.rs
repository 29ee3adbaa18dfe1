//! `rvol engine`: start-up, serving, and shutdown of one volume.
//!
//! Start-up: probe every replica (HELLO with generation 0), serve the
//! largest size any reports or `--grow-to` asks (`rvol expand` grows
//! replicas past `--size`; one that missed that is grown too), take every reachable replica over
//! with a generation above all of theirs (which fences any older engine),
//! choose the fresh set by the [`freshness`](crate::freshness) rules, and
//! [`reconcile`](crate::reconcile) replicas an unclean stop left different.
//! Serving: the NBD frontend and the admin API; one JSON line on stdout
//! says where. Shutdown on SIGTERM/SIGINT: stop accepting, let in-flight
//! requests finish, flush every replica and mark it clean, exit 0. If a
//! newer engine fences this one, it stops serving and exits with
//! [`EXIT_FENCED`].

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use futures::future::join_all;
use rvol_frontend::nbd::{NbdListener, NbdServer};
use rvol_frontend::ublk::{UblkConfig, UblkTarget};
use rvol_frontend::BlockVolume;
use rvol_replica::client::{Links, ReplicaClient};
use rvol_replica::server::{Endpoint, Listener};
use rvol_replica::{volume_uuid, Generation, Owner, ReplicaInfo};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use uuid::Uuid;

use crate::admin::{self, AdminState};
use crate::freshness::{choose, Candidate, Verdict};
use crate::reconcile::reconcile;
use crate::volume::{AttachInfo, Mode, ReplicaSlot, ReplicatedVolume, VolumeParams};

/// Exit status: stopped cleanly.
pub const EXIT_OK: u8 = 0;
/// Exit status: could not start (bad arguments, no usable replica, ...).
pub const EXIT_START_FAILED: u8 = 1;
/// Exit status: a newer engine took the replicas over; this one stopped.
pub const EXIT_FENCED: u8 = 3;

pub struct EngineConfig {
    pub name: String,
    pub size: u64,
    /// Grow the replicas to at least this before serving (an expansion
    /// made while no engine ran), so that a ublk device, whose size is
    /// fixed when it is made, starts at the volume's size.
    pub grow_to: u64,
    pub replicas: Vec<Endpoint>,
    pub nbd_listen: Vec<Endpoint>,
    /// Required of NBD clients on TCP when set.
    pub nbd_tls: Option<Arc<rvol_tls::ServerTls>>,
    /// Serve the volume as /dev/ublkbN too.
    pub ublk: Option<UblkConfig>,
    pub admin_listen: Endpoint,
    /// Who may use the admin API.
    pub admin_tokens: Arc<rvol_access::Tokens>,
    /// HTTPS on a TCP admin listener when set.
    pub admin_tls: Option<Arc<rvol_tls::ServerTls>>,
    pub replica_timeout: Duration,
    /// The same for requests that wait for the disk (flush, FUA writes).
    pub flush_timeout: Duration,
    /// Connections to each replica, and whether to read from its files.
    pub links: Links,
    /// How long I/O waits for a current replica when none is left.
    pub io_hold: Duration,
    /// Rebuild copy rate limit in MiB/s (0: none).
    pub rebuild_rate_mib: f64,
    /// Where the cluster records the in-sync replicas (`crate::in_sync`).
    pub in_sync_hook: Option<rvol_cluster::http::Address>,
    /// Encryption at rest ([`crate::crypt`]); `links.encryption` announces
    /// it to the replicas.
    pub key: Option<Arc<crate::crypt::VolumeKey>>,
    /// When a replica counts as slow, and whether it is then evicted.
    pub slow: crate::slow::SlowPolicy,
    /// Maintain an encrypted volume without its key (no frontend): the
    /// encryption is taken from the replicas already bound, and sealed
    /// blocks are copied as they are (rebuilds, reconciliation, snapshots).
    pub keyless: bool,
}

/// Asks a replica what it holds; see [`rvol_replica::local::prepare`].
async fn probe(ep: &Endpoint, cfg: &EngineConfig) -> Result<ReplicaInfo, String> {
    rvol_replica::local::prepare(ep, cfg.size)
        .await
        .map_err(|e| e.to_string())?;
    ReplicaClient::probe(ep, volume_uuid(&cfg.name), &cfg.links)
        .await
        .map_err(|e| e.to_string())
}

/// Connects to the replicas and builds the volume; see the module docs.
pub async fn open_volume(cfg: &EngineConfig) -> anyhow::Result<ReplicatedVolume> {
    let uuid = volume_uuid(&cfg.name);
    let t = cfg.replica_timeout;
    let probes = join_all(
        cfg.replicas
            .iter()
            .map(|ep| tokio::time::timeout(t, probe(ep, cfg))),
    )
    .await;
    let mut links = cfg.links.clone();
    if cfg.keyless {
        links.encryption = keyless_encryption(&probes)?;
    }
    let mut reachable = Vec::new();
    let mut slots: Vec<Option<Arc<ReplicaSlot>>> = vec![None; cfg.replicas.len()];
    let mut max_generation = Generation(0);
    // `--size` is what the volume was created with; `rvol expand` may have
    // grown its replicas since.
    let mut size = 0;
    for (i, (ep, probe)) in cfg.replicas.iter().zip(probes).enumerate() {
        let err = match probe {
            Err(_) => format!("no answer within {t:?}"),
            Ok(Err(e)) => e.to_string(),
            Ok(Ok(info)) if !info.volume_uuid.is_nil() && info.volume_uuid != uuid => {
                format!("belongs to another volume ({})", info.volume_uuid)
            }
            // Never served with the wrong key, or unencrypted: refuse to
            // start rather than leave the volume to replicas of the other
            // kind.
            Ok(Ok(info)) if !info.volume_uuid.is_nil() && info.encryption != links.encryption => {
                bail!(
                    "replica {ep}: {}; refusing to start",
                    match (&info.encryption, &links.encryption) {
                        (Some(_), None) =>
                            "the volume is encrypted: pass its key with --encryption-key-file",
                        (None, _) => "the volume is not encrypted, and a key was given",
                        _ => "the key is not the volume's (its key check differs)",
                    }
                )
            }
            Ok(Ok(info)) => {
                max_generation = max_generation.max(info.generation);
                size = size.max(info.size);
                reachable.push(i);
                continue;
            }
        };
        tracing::warn!(replica = %ep, error = %err, "replica not usable");
        slots[i] = Some(Arc::new(ReplicaSlot::failed(ep.clone(), err)));
    }
    if !reachable.is_empty() && size < cfg.size {
        bail!(
            "the replicas hold {size} bytes but the volume is {} bytes; refusing to start \
             (grow a volume with rvol expand)",
            cfg.size
        );
    }
    let size = size.max(cfg.size).max(cfg.grow_to);
    if size > cfg.size {
        tracing::info!(
            size,
            "the volume was expanded beyond --size; serving its current size"
        );
    }
    let owner = Owner {
        generation: max_generation.next(),
        engine_id: rand_u64(),
    };
    let connected = join_all(reachable.iter().map(|&i| {
        let ep = &cfg.replicas[i];
        tokio::time::timeout(t, ReplicaClient::connect(ep, uuid, owner, links.clone()))
    }))
    .await;
    let mut taken = Vec::new();
    for (&i, r) in reachable.iter().zip(connected) {
        let ep = &cfg.replicas[i];
        match r {
            // It missed an expansion: the tail it lacks is a hole everywhere
            // it was not written, and freshness decides about the rest.
            Ok(Ok((client, mut info))) if info.size < size => match client.expand(size).await {
                Ok(()) => {
                    info.size = size;
                    taken.push((i, client, info))
                }
                Err(e) => {
                    slots[i] = Some(Arc::new(ReplicaSlot::failed(
                        ep.clone(),
                        format!("growing it to {size} bytes: {e}"),
                    )))
                }
            },
            Ok(Ok((client, info))) => taken.push((i, client, info)),
            Ok(Err(e)) => slots[i] = Some(Arc::new(ReplicaSlot::failed(ep.clone(), e.to_string()))),
            Err(_) => {
                slots[i] = Some(Arc::new(ReplicaSlot::failed(
                    ep.clone(),
                    format!("no answer within {t:?}"),
                )))
            }
        }
    }
    let candidates: Vec<Candidate> = taken
        .iter()
        .map(|(_, _, info)| Candidate {
            identity: info.replica_uuid,
            flush_members: info.flush_members.clone(),
            flush_epoch: info.flush_epoch,
            flush_received: info.flush_received,
            clean: info.clean,
            dirty_known: info.dirty_known,
            rebuilding: info.rebuilding,
        })
        .collect();
    // Above every epoch any replica saw, so old tags never look current.
    let reconcile_epoch = taken
        .iter()
        .map(|(_, _, i)| i.epoch_seen)
        .max()
        .unwrap_or(0)
        + 1;
    let verdicts = choose(&candidates);
    let mut outcome: Vec<Result<(), String>> = verdicts
        .iter()
        .map(|v| match v {
            Verdict::Stale(why) => Err(why.clone()),
            Verdict::Fresh | Verdict::Reconcile => Ok(()),
        })
        .collect();
    let targets: Vec<usize> = (0..verdicts.len())
        .filter(|&i| verdicts[i] == Verdict::Reconcile)
        .collect();
    let mut reconciled_bytes = 0;
    if let (false, Some(source)) = (
        targets.is_empty(),
        verdicts.iter().position(|v| *v == Verdict::Fresh),
    ) {
        let member = |i: usize| (&taken[i].1, taken[i].2.replica_uuid);
        let members: Vec<_> = targets.iter().map(|&i| member(i)).collect();
        let limits = crate::reconcile::Limits {
            call: t,
            flush: cfg.flush_timeout,
        };
        let results = reconcile(member(source), &members, reconcile_epoch, limits)
            .await
            .with_context(|| {
                format!("reconciling from source {}", cfg.replicas[taken[source].0])
            })?;
        for (&i, r) in targets.iter().zip(results) {
            match r {
                Ok(n) => reconciled_bytes += n,
                Err(e) => outcome[i] = Err(format!("reconciliation failed: {e}")),
            }
        }
        tracing::info!(
            source = %cfg.replicas[taken[source].0],
            targets = targets.len(),
            bytes = reconciled_bytes,
            "reconciled replicas after an unclean stop"
        );
    }
    // A cut that an engine dying mid-rebuild left on some replicas and not
    // on others makes their chains differ, and a trim punches a head only
    // where nothing kept lies below: those replicas would read differently
    // after a trim (the chaos soak saw zeroes, then the older data). Each
    // replica in the set removes its own before anything is served.
    for ((i, client, info), outcome) in taken.iter().zip(outcome.iter_mut()) {
        if outcome.is_err() {
            continue;
        }
        for name in crate::rebuild::kept_cuts(&info.chain) {
            if let Err(e) = tokio::time::timeout(t, client.remove_snapshot(name))
                .await
                .map_err(|_| "no answer".to_string())
                .and_then(|r| r.map_err(|e| e.to_string()))
            {
                tracing::warn!(replica = %cfg.replicas[*i], snapshot = name, error = %e, "could not remove a rebuild's cut left behind");
                *outcome = Err(format!("could not remove the rebuild cut {name}: {e}"));
                break;
            }
        }
    }
    let serving = outcome.iter().any(Result::is_ok);
    for ((i, client, info), outcome) in taken.into_iter().zip(outcome) {
        let ep = cfg.replicas[i].clone();
        let slot = match outcome {
            Ok(()) => ReplicaSlot::new(ep, client, info.replica_uuid, Mode::RW, info.revision.0),
            Err(why) => {
                tracing::warn!(replica = %ep, %why, "replica left out of the set");
                // What this engine writes from now on, the replica lacks,
                // but nothing on it says so: an engine that later found it
                // alone (the others unreachable) would take it for current
                // and serve old data (the chaos soak saw durable writes
                // read back older so). Marked as being rebuilt, it is never
                // a source again until a rebuild completes it.
                if serving && !info.rebuilding {
                    let chain = info.chain_below_head();
                    let marked = tokio::time::timeout(t, client.prepare_rebuild(&chain)).await;
                    if !matches!(marked, Ok(Ok(()))) {
                        tracing::warn!(replica = %ep, "could not mark the stale replica as being rebuilt");
                    }
                }
                ReplicaSlot::failed(ep, why)
            }
        };
        slots[i] = Some(Arc::new(slot));
    }
    let slots: Vec<Arc<ReplicaSlot>> = slots.into_iter().flatten().collect();
    if !slots.iter().any(|s| s.mode() == Mode::RW) {
        let reasons: Vec<String> = slots
            .iter()
            .map(|s| format!("{}: {}", s.endpoint, s.last_error().unwrap_or_default()))
            .collect();
        bail!(
            "no usable replica; refusing to start ({})",
            reasons.join("; ")
        );
    }
    tracing::info!(
        volume = %cfg.name,
        generation = %owner.generation,
        fresh = slots.iter().filter(|s| s.mode() == Mode::RW).count(),
        total = slots.len(),
        "took the replicas over"
    );
    let params = VolumeParams {
        name: cfg.name.clone(),
        size,
        generation: owner.generation,
        first_epoch: reconcile_epoch + 1,
        reconciled_bytes,
        timeout: cfg.replica_timeout,
        flush_timeout: cfg.flush_timeout,
        attach: AttachInfo {
            volume: uuid,
            owner,
            links,
        },
        hold: cfg.io_hold,
        in_sync_hook: cfg
            .in_sync_hook
            .clone()
            .map(|a| crate::in_sync::InSyncHook::new(a, &cfg.name)),
        key: cfg.key.clone(),
    };
    Ok(ReplicatedVolume::new(params, slots))
}

/// The encryption of a volume maintained without its key: that of the
/// replicas already bound to it, which must agree. With none bound there is
/// nothing to learn it from, and a keyless engine must not bind a new
/// volume as a plain one.
fn keyless_encryption(
    probes: &[Result<Result<ReplicaInfo, String>, tokio::time::error::Elapsed>],
) -> anyhow::Result<Option<rvol_replica::meta::Encryption>> {
    let mut bound = probes
        .iter()
        .filter_map(|p| p.as_ref().ok()?.as_ref().ok())
        .filter(|info| !info.volume_uuid.is_nil())
        .map(|info| info.encryption.clone());
    let Some(first) = bound.next() else {
        bail!("--encryption-keyless: no reachable replica is bound to the volume yet; refusing to start");
    };
    if bound.any(|e| e != first) {
        bail!("--encryption-keyless: the replicas disagree on the volume's encryption; refusing to start");
    }
    if first.is_none() {
        bail!("--encryption-keyless: the volume is not encrypted; refusing to start");
    }
    Ok(first)
}

fn rand_u64() -> u64 {
    // Engine identities only need to differ between engines.
    (Uuid::new_v4().as_u128() as u64).max(1)
}

/// Runs the engine to completion; returns its exit status.
pub async fn run(cfg: EngineConfig) -> anyhow::Result<u8> {
    let volume = Arc::new(open_volume(&cfg).await?);
    let (stop_tx, stop_rx) = watch::channel(false);

    let nbd = NbdServer::new(
        volume.clone(),
        cfg.name.clone(),
        format!("rvol volume {}", cfg.name),
        cfg.nbd_tls.clone(),
    );
    let mut nbd_tasks = Vec::new();
    let mut nbd_addrs = Vec::new();
    for ep in &cfg.nbd_listen {
        let listener = Listener::bind(ep)
            .await
            .with_context(|| format!("binding NBD listener {ep}"))?;
        nbd_addrs.push(listener.local_endpoint()?.to_string());
        let listener = match listener {
            Listener::Tcp(l) => NbdListener::Tcp(l),
            Listener::Unix(l, _) => NbdListener::Unix(l),
        };
        nbd_tasks.push(tokio::spawn(nbd.clone().serve(listener, stop_rx.clone())));
    }
    let ublk = match &cfg.ublk {
        Some(ucfg) => {
            let (v, rt, ucfg) = (
                volume.clone(),
                tokio::runtime::Handle::current(),
                ucfg.clone(),
            );
            let target = tokio::task::spawn_blocking(move || UblkTarget::start(v, rt, &ucfg))
                .await?
                .context("starting the ublk frontend")?;
            Some(target)
        }
        None => None,
    };
    let device = ublk.as_ref().map(|t| t.device().clone());
    let admin_listener = Listener::bind(&cfg.admin_listen)
        .await
        .with_context(|| format!("binding admin listener {}", cfg.admin_listen))?;
    let admin_addr = admin_listener.local_endpoint()?.to_string();
    let frontend = match (&device, nbd_addrs.is_empty()) {
        (Some(_), _) => "ublk",
        (None, false) => "nbd",
        (None, true) => "none",
    };
    volume
        .chain
        .frontend_attached
        .store(frontend != "none", std::sync::atomic::Ordering::Release);
    let admin_state = Arc::new(AdminState {
        volume: volume.clone(),
        frontend: frontend.into(),
        nbd: nbd_addrs.clone(),
        device: device.as_ref().map(|d| d.path.clone()),
    });
    let mut admin_stop = stop_rx.clone();
    let tokens = cfg.admin_tokens.clone();
    let admin_task = tokio::spawn(admin::serve(
        admin_listener,
        admin_state,
        tokens,
        cfg.admin_tls.clone(),
        async move {
            let _ = admin_stop.wait_for(|s| *s).await;
        },
    ));

    println!(
        "{}",
        serde_json::json!({
            "event": "ready",
            "volume": cfg.name,
            "size": volume.size(),
            "generation": volume.generation.0,
            "reconciled_bytes": volume.reconciled_bytes,
            "nbd": nbd_addrs,
            "device": device.as_ref().map(|d| &d.path),
            "ublk_id": device.as_ref().map(|d| d.id),
            "recovered": device.as_ref().is_some_and(|d| d.recovered),
            "admin": admin_addr,
        })
    );

    // Removed snapshots left from before (or by a crash mid-purge).
    let purge = tokio::spawn(volume.clone().purge_task());
    volume.chain.request_purge();

    // Replicas that dropped out come back by themselves: as they are if
    // they missed nothing, through a rebuild otherwise.
    let retry = {
        let v = volume.clone();
        let rate = cfg.rebuild_rate_mib;
        let slow = cfg.slow.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                v.check_slow(&slow);
                v.check_connections();
                v.reattach_current().await;
                v.rebuild_stale(rate).await;
            }
        })
    };

    // Apart from the loop above, which a rebuild can hold for minutes: an
    // engine taken over in the meantime must learn it all the same.
    let owner = {
        let v = volume.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                v.check_owner().await;
            }
        })
    };

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut fenced = volume.fenced_watch();
    let fenced_now = tokio::select! {
        _ = sigterm.recv() => false,
        _ = sigint.recv() => false,
        _ = fenced.wait_for(|f| *f) => true,
    };
    tracing::info!(
        fenced = fenced_now,
        "stopping: no new requests, finishing those in flight"
    );
    let _ = stop_tx.send(true);
    retry.abort();
    owner.abort();
    purge.abort();
    if let Some(target) = ublk {
        // The kernel drains the device through our queues while it stops.
        match tokio::task::spawn_blocking(move || target.stop()).await? {
            Ok(()) => tracing::info!("ublk device stopped and deleted"),
            Err(e) => tracing::error!(error = %e, "stopping the ublk device"),
        }
    }
    let drained = async {
        for t in nbd_tasks {
            let _ = t.await;
        }
    };
    // A fenced engine's requests can only fail, but one waiting on a
    // replica that does not answer (a flush waits up to --flush-timeout)
    // would keep the engine, and its clients, from going: once fenced, it
    // gives them a second and goes (the chaos soak found one lingering).
    let fenced_grace = async {
        let _ = fenced.wait_for(|f| *f).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    tokio::select! {
        _ = drained => {}
        _ = fenced_grace => {}
    }
    if fenced_now || volume.is_fenced() {
        tracing::error!("fenced by a newer engine; exiting without touching the replicas");
        return Ok(EXIT_FENCED);
    }
    let _ = admin_task.await;
    match volume.shutdown_clean().await {
        Ok(()) => tracing::info!("replicas flushed and marked clean"),
        Err(e) => {
            tracing::error!(error = %e, "clean shutdown failed; the next start will treat replicas as unclean")
        }
    }
    Ok(EXIT_OK)
}
