//! `rvol agent`: one per node. It registers the node ([`registration`]),
//! runs the replicas the controller placed on it and the engine of each
//! volume attached to it ([`supervisor`]), keeps each engine's replica set
//! to the volume's record, records which replicas are in sync, and reports
//! all of it under its lease (`reports/NODE`).
//!
//! Every pass reads the whole cluster ([`ClusterView`]) and brings the
//! node to it, so a missed change or a restarted agent costs one pass, not
//! a wrong state.
//!
//! **Data is deleted only for replicas no volume holds.** A replica
//! directory on the agent's disks is removed when a complete, fully
//! decoded read of the store shows no volume with that replica (the
//! directory's name carries the volume's name, its uid and the replica's
//! id, none of which are reused) and its process has stopped. A read with
//! any record that did not decode deletes nothing, since that record
//! could be the owner.
//!
//! **An engine starts only on current data.** Before starting a volume's
//! engine the agent requires one replica of the volume's in-sync set to
//! run on a live node; otherwise it waits and says which replicas it waits
//! for. Once running, the engine's RW replicas are written back as the
//! in-sync set whenever they change (for this attachment only), so a
//! replica left behind is never again taken as current.
//!
//! **With mutual TLS** (`--tls-*`), replicas serve with the node's
//! certificate, and an engine starts only once the controller has signed
//! a certificate naming its volume for this attachment ([`certs`]).

mod backups;
mod certs;
mod in_sync;
pub mod process;
mod record;
mod registration;
mod snapshots;
pub mod supervisor;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::stream::BoxStream;
use hyper::Method;
pub use registration::{AgentConfig, AgentError, Registration};
use tokio::sync::watch;

use crate::http::{self, Address};
use crate::model::{
    check_version, encode, report_key, Attachment, EngineReplica, EngineReport, Frontend,
    ProcessState, RebuildProgress, ReplicaId, ReplicaPlace, ReplicaReport, Report, Volume, PREFIX,
    PROTOCOL,
};
use crate::store::{Change, Expect, LeaseId, Revision, Store, StoreError};
use crate::view::{join_host_port, ClusterView};
use process::{argv, Spec};
use supervisor::{Supervisor, Wanted};

/// Where replicas live on each disk.
pub const REPLICA_ROOT: &str = "rvol-replicas";
/// The agent's socket for its engines' in-sync hook, in its run directory.
const HOOK_SOCKET: &str = "agent.sock";
/// An engine's exit status when a newer engine fenced it.
const EXIT_FENCED: i32 = 3;

pub struct AgentOptions {
    pub config: AgentConfig,
    /// The `rvol` program that runs replicas and engines.
    pub rvol: PathBuf,
    /// How often the node is brought to the cluster's state.
    pub tick: Duration,
    /// Its passes, for `/metrics` ([`router`]).
    pub metrics: std::sync::Arc<crate::metrics::LoopMetrics>,
}

struct Agent<S> {
    store: Arc<S>,
    config: AgentConfig,
    rvol: PathBuf,
    sup: Supervisor,
    /// Engines started, by key, so that one stopping is still reported
    /// (a detach is done when its engine has flushed and exited).
    engines: BTreeMap<String, EngineReport>,
    /// What was last reported, so an unchanged report is not rewritten.
    reported: Option<(Report, LeaseId)>,
    report: watch::Sender<Option<Report>>,
}

/// Runs the agent until `stop` resolves or the node is lost to another
/// agent. Stopping leaves every replica and engine running, for the next
/// agent to adopt.
pub async fn run<S: Store>(
    store: Arc<S>,
    opts: AgentOptions,
    report: watch::Sender<Option<Report>>,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    let run_dir = opts
        .config
        .disks
        .first()
        .map(|d| d.join(".rvol-agent"))
        .ok_or_else(|| AgentError::Disk {
            path: String::new(),
            message: "an agent needs at least one --disk".into(),
        })?;
    std::fs::create_dir_all(&run_dir).map_err(|e| AgentError::Disk {
        path: run_dir.display().to_string(),
        message: e.to_string(),
    })?;
    // A node may boot before the store is reachable: wait for it.
    let registration = loop {
        let joined = match check_version(&*store).await {
            Ok(()) => Registration::register(store.clone(), opts.config.clone()).await,
            Err(e) => Err(e.into()),
        };
        match joined {
            Err(AgentError::Store(StoreError::Unavailable(e))) => {
                tracing::warn!(error = %e, "cannot register yet; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            r => break r?,
        }
    };
    let hook = {
        let (store, node, path) = (
            store.clone(),
            opts.config.node.clone(),
            run_dir.join(HOOK_SOCKET),
        );
        tokio::spawn(async move {
            if let Err(e) = in_sync::serve(store, node, &path).await {
                tracing::error!(error = %e, path = %path.display(), "the in-sync hook is not served: engines cannot acknowledge flushes after a replica change");
            }
        })
    };
    let _hook = AbortOnDrop(hook);
    let (lease_tx, lease) = watch::channel(registration.lease());
    let mut heartbeat = tokio::spawn(registration.heartbeat(lease_tx));
    let mut agent = Agent {
        store,
        config: opts.config,
        rvol: opts.rvol,
        sup: Supervisor::new(&run_dir),
        engines: BTreeMap::new(),
        reported: None,
        report,
    };
    tokio::pin!(stop);
    // Volume changes wake the agent at once; so does a process that is
    // starting or stopping, which is polled closely until it is done.
    let mut changes = None;
    loop {
        let lease = *lease.borrow();
        let started = std::time::Instant::now();
        let passed = agent.pass(lease).await;
        opts.metrics
            .pass(started.elapsed().as_secs_f64(), u64::from(passed.is_err()));
        let revision = match passed {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(error = %e, "pass failed; what runs keeps running");
                None
            }
        };
        if let (None, Some(r)) = (&changes, revision) {
            changes = agent
                .store
                .watch(&format!("{PREFIX}volumes/"), r)
                .await
                .ok();
        }
        let wait = if agent.sup.busy() {
            opts.tick.min(Duration::from_millis(50))
        } else {
            opts.tick
        };
        tokio::select! {
            _ = &mut stop => return Ok(()),
            lost = &mut heartbeat => {
                return Err(lost.unwrap_or_else(|e| AgentError::Disk {
                    path: String::new(),
                    message: format!("the heartbeat task failed: {e}"),
                }));
            }
            _ = tokio::time::sleep(wait) => {}
            alive = changed(&mut changes) => {
                if !alive {
                    changes = None;
                }
            }
        }
    }
}

/// Waits for a change on `changes` and takes every other one already
/// there; false when the watch ended (it is made again).
async fn changed(changes: &mut Option<BoxStream<'static, Result<Change, StoreError>>>) -> bool {
    use futures::{FutureExt, StreamExt};
    let Some(stream) = changes.as_mut() else {
        return std::future::pending().await;
    };
    match stream.next().await {
        Some(Ok(_)) => {
            while let Some(Some(next)) = stream.next().now_or_never() {
                if next.is_err() {
                    return false;
                }
            }
            true
        }
        _ => false,
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn replica_key(dir_name: &str) -> String {
    format!("replica.{dir_name}")
}

fn engine_key(v: &Volume, serial: u64) -> String {
    format!("engine.{}.{}.s{serial}", v.name, v.uid)
}

/// An engine's admin socket: one per attachment, as the engine of a new
/// attachment may start while the old one stops.
fn engine_socket(run_dir: &Path, v: &Volume, serial: u64) -> PathBuf {
    run_dir.join(format!("{}.sock", certs::stem(&v.uid, serial)))
}

impl<S: Store> Agent<S> {
    /// The process of a replica placed here, and the address it serves.
    fn replica_wanted(&self, v: &Volume, p: &ReplicaPlace) -> (Wanted, String) {
        let name = v.replica_dir(p.id);
        let dir = Path::new(&p.disk).join(REPLICA_ROOT).join(&name);
        let listen = join_host_port(&self.config.advertise, p.port);
        let args = [
            "replica".to_string(),
            "--dir".into(),
            dir.display().to_string(),
            "--listen".into(),
            listen.clone(),
            "--size".into(),
            v.spec.size.to_string(),
        ];
        let mut args = args.to_vec();
        if let Some(t) = &self.config.tls {
            args.extend(tls_args(&t.cert, &t.key, &t.ca));
        }
        let w = Wanted {
            spec: Spec {
                key: replica_key(&name),
                argv: argv(&self.rvol, args),
            },
            hold: None,
            final_exit: None,
        };
        (w, listen)
    }

    /// The engine of a volume attached here; held while no replica of its
    /// in-sync set runs (see the module docs).
    fn engine_wanted(
        &self,
        view: &ClusterView,
        v: &Volume,
        a: &Attachment,
        run_dir: &Path,
        cert_ready: bool,
    ) -> Wanted {
        let key = engine_key(v, a.serial);
        let mut args: Vec<String> = vec![
            "engine".into(),
            "--name".into(),
            v.name.to_string(),
            "--size".into(),
            v.created_size.to_string(),
        ];
        // An expansion made while detached: the engine grows the replicas
        // before it serves, so a ublk device starts at the new size.
        if v.spec.size > v.created_size {
            args.extend(["--grow-to".into(), v.spec.size.to_string()]);
        }
        for p in &v.replicas {
            args.extend(["--replica".into(), p.address.clone()]);
        }
        if self.config.rebuild_rate_mib > 0.0 {
            args.extend([
                "--rebuild-rate-mib".into(),
                self.config.rebuild_rate_mib.to_string(),
            ]);
        }
        if let Some(secs) = self.config.evict_slow_replicas {
            args.extend([
                "--evict-slow-replicas".into(),
                "--slow-replica-seconds".into(),
                secs.to_string(),
            ]);
        }
        match a.frontend {
            _ if a.maintenance => args.extend(["--frontend".into(), "none".into()]),
            Frontend::Nbd => args.extend([
                "--frontend".into(),
                "nbd".into(),
                "--nbd-listen".into(),
                join_host_port(&self.config.advertise, a.port),
            ]),
            Frontend::Ublk => args.extend(["--frontend".into(), "ublk".into()]),
        }
        args.extend([
            "--admin-listen".into(),
            format!("unix:{}", engine_socket(run_dir, v, a.serial).display()),
            "--in-sync-hook".into(),
            format!("unix:{}", run_dir.join(HOOK_SOCKET).display()),
        ]);
        if let Some(t) = &self.config.tls {
            let f = certs::files(run_dir, v, a.serial);
            args.extend(tls_args(&f.cert, &f.key, &t.ca));
        }
        // An encrypted volume's engine needs its key, except to maintain
        // it: rebuilds and snapshots copy sealed blocks as they are.
        let mut key_missing = None;
        if v.spec.encrypted && a.maintenance {
            args.push("--encryption-keyless".into());
        } else if v.spec.encrypted {
            let path = crate::keys::path(&self.config.keys_dir, &v.name);
            if !path.exists() {
                key_missing = Some(format!("{} at {}", crate::keys::WAITING, path.display()));
            }
            args.extend(["--encryption-key-file".into(), path.display().to_string()]);
        }
        // Checked before every start, restarts included: an engine that
        // crashed must not come back on stale replicas either.
        let hold = (!self.sup.runs(&key))
            .then(|| {
                waiting_for(view, v).or(key_missing).or_else(|| {
                    (!cert_ready).then(|| {
                        "waiting for the controller to sign the engine's certificate".to_string()
                    })
                })
            })
            .flatten();
        Wanted {
            spec: Spec {
                key,
                argv: argv(&self.rvol, args),
            },
            hold,
            final_exit: Some(EXIT_FENCED),
        }
    }

    /// One pass; returns the store revision it read.
    async fn pass(&mut self, lease: LeaseId) -> Result<Revision, StoreError> {
        let view = ClusterView::load(&*self.store).await?;
        let me = self.config.node.clone();
        let run_dir = self.sup.run_dir().to_path_buf();
        let mut wanted = Vec::new();
        let mut replicas = Vec::new();
        let mut engines = Vec::new();
        let mut kept_dirs = BTreeSet::new();
        for (v, _) in view.volumes.values() {
            for p in v.replicas.iter().filter(|p| p.node == me) {
                let (w, listen) = self.replica_wanted(v, p);
                kept_dirs.insert(v.replica_dir(p.id));
                replicas.push((v.clone(), p.id, listen, w.spec.key.clone()));
                wanted.push(w);
            }
            if let Some(a) = v.attachment.as_ref().filter(|a| a.node == me) {
                let cert_ready = match &self.config.tls {
                    None => true,
                    Some(_) if self.sup.runs(&engine_key(v, a.serial)) => true,
                    Some(_) => certs::ensure(&*self.store, &view, &me, &run_dir, v, a)
                        .await
                        .unwrap_or_else(|e| {
                            tracing::warn!(volume = %v.name, error = %e, "the engine's certificate");
                            false
                        }),
                };
                let w = self.engine_wanted(&view, v, a, &run_dir, cert_ready);
                engines.push((v.clone(), a.serial, w.spec.key.clone()));
                wanted.push(w);
            }
        }
        self.sup.converge(&wanted);
        if view.refused.is_empty() {
            self.delete_orphans(&kept_dirs);
        }
        let mut report = Report {
            protocol: PROTOCOL,
            node: me.clone(),
            replicas: replicas
                .into_iter()
                .map(|(v, id, address, key)| ReplicaReport {
                    volume: v.name.clone(),
                    uid: v.uid.clone(),
                    id,
                    address,
                    state: self.sup.state(&key).unwrap_or(ProcessState::Starting),
                })
                .collect(),
            engines: Vec::new(),
        };
        let wanted_engines: BTreeSet<String> = engines.iter().map(|(_, _, k)| k.clone()).collect();
        for (v, serial, key) in engines {
            let e = self.engine(&v, serial, &key).await;
            self.engines.insert(key, e.clone());
            report.engines.push(e);
        }
        self.engines
            .retain(|key, _| wanted_engines.contains(key) || self.sup.holds(key));
        if self.config.tls.is_some() {
            let keep = view
                .volumes
                .values()
                .filter_map(|(v, _)| {
                    let a = v.attachment.as_ref().filter(|a| a.node == me)?;
                    Some(certs::stem(&v.uid, a.serial))
                })
                .chain(self.engines.values().map(|e| certs::stem(&e.uid, e.serial)))
                .collect();
            certs::delete_others(&run_dir, &keep);
        }
        for (key, e) in &self.engines {
            if !wanted_engines.contains(key) {
                report.engines.push(EngineReport {
                    state: ProcessState::Stopping,
                    ..e.clone()
                });
            }
        }
        if self.reported.as_ref() != Some(&(report.clone(), lease)) {
            self.store
                .put(
                    &report_key(&me),
                    encode(&report),
                    Expect::Anything,
                    Some(lease),
                )
                .await?;
            self.report.send_replace(Some(report.clone()));
            self.reported = Some((report, lease));
        }
        Ok(view.revision)
    }

    /// Reports an engine, keeps its replica set to the record's and writes
    /// back its in-sync set.
    async fn engine(&self, v: &Volume, serial: u64, key: &str) -> EngineReport {
        let mut report = EngineReport {
            volume: v.name.clone(),
            uid: v.uid.clone(),
            serial,
            state: self.sup.state(key).unwrap_or(ProcessState::Starting),
            nbd: None,
            device: None,
            size: v.created_size,
            replicas: Vec::new(),
            rebuild: None,
            backup: None,
        };
        let Some((_, ready)) = self.sup.ready(key) else {
            return report;
        };
        report.nbd = ready["nbd"]
            .as_array()
            .and_then(|a| a.first())
            .and_then(|a| a.as_str())
            .map(|a| format!("nbd://{a}/"));
        report.device = ready["device"].as_str().map(str::to_string);
        let socket = Address::Unix(engine_socket(self.sup.run_dir(), v, serial));
        let status = match admin(&socket, Method::GET, "/v1/volume", None).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(volume = %v.name, error = %e, "engine status unavailable");
                return report;
            }
        };
        report.size = status["size"].as_u64().unwrap_or(v.created_size);
        if report.size < v.spec.size {
            let body = serde_json::json!({ "size": v.spec.size }).to_string();
            match admin(&socket, Method::POST, "/v1/volume/expand", Some(body)).await {
                Ok(_) => tracing::info!(volume = %v.name, size = v.spec.size, "engine grown"),
                Err(e) => tracing::warn!(volume = %v.name, error = %e, "growing the engine"),
            }
        }
        let id_of = |address: &str| {
            v.replicas
                .iter()
                .find(|p| p.address == address)
                .map(|p| p.id)
        };
        let rebuild = &status["rebuild"];
        report.rebuild =
            rebuild["replica"]
                .as_str()
                .and_then(id_of)
                .map(|replica| RebuildProgress {
                    replica,
                    scanned: rebuild["scanned"].as_u64().unwrap_or(0),
                    total: rebuild["total"].as_u64().unwrap_or(0),
                });
        let mut serving = BTreeSet::new();
        for r in status["replicas"].as_array().into_iter().flatten() {
            let (Some(address), Some(mode)) = (r["address"].as_str(), r["mode"].as_str()) else {
                continue;
            };
            serving.insert(address.to_string());
            if let Some(id) = id_of(address) {
                report.replicas.push(EngineReplica {
                    id,
                    mode: mode.to_string(),
                    evicted: r["slow"]["evicted"] == true,
                });
            }
        }
        // The engine's replicas follow the record: new ones are added (and
        // rebuilt), removed ones leave it (never its last RW one: the
        // engine refuses that, and the next pass tries again).
        for p in v.replicas.iter().filter(|p| !serving.contains(&p.address)) {
            let body = serde_json::json!({ "address": p.address }).to_string();
            match admin(&socket, Method::POST, "/v1/replicas", Some(body)).await {
                Ok(_) => {
                    tracing::info!(volume = %v.name, replica = %p.id, "replica added to the engine")
                }
                Err(e) => {
                    tracing::warn!(volume = %v.name, replica = %p.id, error = %e, "adding a replica")
                }
            }
        }
        for address in serving.iter().filter(|a| id_of(a).is_none()) {
            let body = serde_json::json!({ "address": address }).to_string();
            match admin(&socket, Method::DELETE, "/v1/replicas", Some(body)).await {
                Ok(_) => {
                    tracing::info!(volume = %v.name, %address, "replica removed from the engine")
                }
                Err(e) => {
                    tracing::warn!(volume = %v.name, %address, error = %e, "removing a replica")
                }
            }
        }
        let rw: Vec<String> = v
            .replicas
            .iter()
            .filter(|p| {
                report
                    .replicas
                    .iter()
                    .any(|r| r.id == p.id && r.mode == "RW")
            })
            .map(|p| p.address.clone())
            .collect();
        let recorded: BTreeSet<ReplicaId> = v.in_sync.iter().copied().collect();
        let now: BTreeSet<ReplicaId> = report
            .replicas
            .iter()
            .filter(|r| r.mode == "RW")
            .map(|r| r.id)
            .collect();
        if !rw.is_empty() && now != recorded {
            if let Err(e) = in_sync::record(&*self.store, &self.config.node, &v.name, &rw).await {
                tracing::warn!(volume = %v.name, error = %e, "recording the in-sync replicas");
            }
        }
        snapshots::converge(&*self.store, &self.config.node, v, &socket).await;
        report.backup =
            backups::converge(&*self.store, &self.config.node, v, &socket, &status).await;
        report
    }

    /// Deletes replica directories no volume holds; see the module docs.
    fn delete_orphans(&self, kept: &BTreeSet<String>) {
        for disk in &self.config.disks {
            let root = disk.join(REPLICA_ROOT);
            let Ok(entries) = std::fs::read_dir(&root) else {
                continue;
            };
            for e in entries.flatten() {
                let Ok(name) = e.file_name().into_string() else {
                    continue;
                };
                if kept.contains(&name) || self.sup.holds(&replica_key(&name)) {
                    continue;
                }
                match std::fs::remove_dir_all(e.path()) {
                    Ok(()) => {
                        tracing::info!(replica = %name, "deleted the data of a replica no volume holds")
                    }
                    Err(err) => {
                        tracing::warn!(replica = %name, error = %err, "deleting an orphan replica")
                    }
                }
            }
        }
    }
}

/// The `--tls-*` flags of a replica or engine.
fn tls_args(cert: &Path, key: &Path, ca: &Path) -> [String; 6] {
    [
        "--tls-cert".into(),
        cert.display().to_string(),
        "--tls-key".into(),
        key.display().to_string(),
        "--tls-ca".into(),
        ca.display().to_string(),
    ]
}

/// Why an engine of `v` must not start yet: no replica of its in-sync set
/// runs on a live node.
fn waiting_for(view: &ClusterView, v: &Volume) -> Option<String> {
    let in_sync: Vec<_> = v
        .replicas
        .iter()
        .filter(|p| v.in_sync.contains(&p.id))
        .collect();
    if in_sync.iter().any(|p| view.replica_running(v, p)) {
        return None;
    }
    let list: Vec<String> = in_sync
        .iter()
        .map(|p| {
            let why = if view.alive(&p.node) {
                "not running"
            } else {
                "node away"
            };
            format!("{} on {} ({why})", p.id, p.node)
        })
        .collect();
    Some(format!(
        "waiting for a replica with the volume's current data: {}",
        if list.is_empty() {
            "none is left".to_string()
        } else {
            list.join(", ")
        }
    ))
}

/// One admin API call on an engine's socket; its JSON answer.
async fn admin(
    socket: &Address,
    method: Method,
    path: &str,
    body: Option<String>,
) -> Result<serde_json::Value, String> {
    let reply = http::request(
        socket,
        method,
        path,
        body,
        &http::Credentials::default(),
        Duration::from_secs(10),
    )
    .await
    .map_err(|e| e.to_string())?;
    if reply.body.is_empty() {
        return Ok(serde_json::Value::Null);
    }
    serde_json::from_slice(&reply.body).map_err(|e| format!("{path}: not JSON: {e}"))
}

/// The agent's own API: what it runs (volumes, replicas, engines and
/// their errors) and its metrics (`/metrics`, [`crate::metrics`]), for
/// whoever holds `tokens` (anyone, if they are open).
/// `/healthz` needs none: it says nothing.
pub fn router(
    report: watch::Receiver<Option<Report>>,
    metrics: std::sync::Arc<crate::metrics::LoopMetrics>,
    tokens: std::sync::Arc<rvol_access::Tokens>,
) -> axum::Router {
    use axum::routing::get;
    let last = report.clone();
    axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let text = crate::metrics::encode_agent(&metrics, last.borrow().as_ref());
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        text,
                    )
                }
            }),
        )
        .route(
            "/v1/report",
            get(move || {
                let r = report.borrow().clone();
                async move { axum::Json(r) }
            }),
        )
        .layer(axum::middleware::from_fn_with_state(
            tokens,
            rvol_access::guard,
        ))
        .route("/healthz", get(|| async { "ok" }))
}
