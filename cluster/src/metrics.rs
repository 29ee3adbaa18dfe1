//! The control plane's metrics, in the OpenMetrics text format
//! (`prometheus-client`), at `/metrics` on the controller's API and on each
//! agent's.
//!
//! Two kinds, as in the engine: what the reconcile loops did, counted as
//! they run ([`LoopMetrics`]: passes, their durations, the store errors
//! they met), and the state, read at each scrape: on the controller, one
//! read of the store (nodes, volumes by state, replicas, disks); on an
//! agent, its last report (the processes it runs). A controller that
//! cannot read the store says so in `rvol_cluster_store_up` rather than
//! failing the scrape: an etcd outage is exactly when an operator looks.

use std::collections::BTreeMap;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::model::{ProcessState, Report};
use crate::view::ClusterView;

type Labels = Vec<(String, String)>;

/// A reconcile loop's passes: the controller's healer, an agent's pass.
pub struct LoopMetrics {
    passes: Counter,
    errors: Counter,
    seconds: Histogram,
}

impl Default for LoopMetrics {
    fn default() -> Self {
        LoopMetrics {
            passes: Counter::default(),
            errors: Counter::default(),
            // 1 ms to 16 s, doubling: a pass over a few volumes to one
            // waiting on a slow store.
            seconds: Histogram::new(exponential_buckets(1e-3, 2.0, 15)),
        }
    }
}

impl LoopMetrics {
    /// Counts a pass that took `seconds` and met `errors` store errors.
    pub fn pass(&self, seconds: f64, errors: u64) {
        self.passes.inc();
        self.errors.inc_by(errors);
        self.seconds.observe(seconds);
    }

    fn register(&self, r: &mut Registry, prefix: &str) {
        r.register(
            format!("{prefix}_passes"),
            "Reconcile passes run",
            self.passes.clone(),
        );
        r.register(
            format!("{prefix}_errors"),
            "Store reads and writes that failed in reconcile passes",
            self.errors.clone(),
        );
        r.register(
            format!("{prefix}_duration_seconds"),
            "How long each reconcile pass took",
            self.seconds.clone(),
        );
    }
}

fn family(r: &mut Registry, name: &str, help: &str, series: BTreeMap<Labels, i64>) {
    let f = Family::<Labels, Gauge>::default();
    for (labels, v) in series {
        f.get_or_create(&labels).set(v);
    }
    r.register(name, help, f);
}

fn gauge(r: &mut Registry, name: &str, help: &str, v: i64) {
    let g = Gauge::<i64>::default();
    g.set(v);
    r.register(name, help, g);
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn bytes(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn finish(r: &Registry) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, r);
    out
}

/// The controller's exposition: its loop, whether it leads, and the
/// cluster as `view` shows it (or that the store could not be read).
pub fn encode_controller(
    m: &LoopMetrics,
    leading: bool,
    view: Result<&ClusterView, String>,
) -> String {
    let mut r = Registry::default();
    m.register(&mut r, "rvol_controller_reconcile");
    gauge(
        &mut r,
        "rvol_controller_leading",
        "1 while this controller leads (runs the reconcilers, serves changes)",
        i64::from(leading),
    );
    gauge(
        &mut r,
        "rvol_cluster_store_up",
        "1 when the last read of the cluster store succeeded",
        i64::from(view.is_ok()),
    );
    if let Ok(view) = view {
        cluster_state(&mut r, view);
    }
    finish(&r)
}

fn cluster_state(r: &mut Registry, view: &ClusterView) {
    let mut nodes = BTreeMap::from([
        (labels(&[("state", "alive")]), 0),
        (labels(&[("state", "away")]), 0),
    ]);
    let mut replicas: BTreeMap<Labels, i64> = BTreeMap::new();
    let mut away = std::collections::BTreeSet::new();
    for (v, _) in view.volumes.values() {
        for p in &v.replicas {
            *replicas
                .entry(labels(&[("node", p.node.as_str())]))
                .or_default() += 1;
            if !view.alive(&p.node) {
                away.insert(p.node.clone());
            }
        }
    }
    for name in view.nodes.keys() {
        replicas
            .entry(labels(&[("node", name.as_str())]))
            .or_default();
    }
    *nodes.entry(labels(&[("state", "alive")])).or_default() = view.nodes.len() as i64;
    *nodes.entry(labels(&[("state", "away")])).or_default() = away.len() as i64;
    family(
        r,
        "rvol_cluster_nodes",
        "Nodes whose agent is registered (alive), and nodes away that hold replicas",
        nodes,
    );

    let mut volumes: BTreeMap<Labels, i64> = [
        "creating",
        "attaching",
        "healthy",
        "degraded",
        "faulted",
        "detached",
    ]
    .iter()
    .map(|s| (labels(&[("state", s)]), 0))
    .collect();
    for (v, _) in view.volumes.values() {
        let state = serde_json::to_value(view.state(v))
            .ok()
            .and_then(|s| s.as_str().map(str::to_string))
            .unwrap_or_default();
        *volumes.entry(labels(&[("state", &state)])).or_default() += 1;
    }
    family(r, "rvol_cluster_volumes", "Volumes, by state", volumes);
    family(
        r,
        "rvol_cluster_replicas",
        "Replicas placed, by node",
        replicas,
    );

    let (mut free, mut capacity) = (BTreeMap::new(), BTreeMap::new());
    for n in view.nodes.values() {
        for d in &n.disks {
            let l = labels(&[("node", n.name.as_str()), ("disk", &d.path)]);
            free.insert(l.clone(), bytes(d.free_bytes));
            capacity.insert(l, bytes(d.capacity_bytes));
        }
    }
    family(
        r,
        "rvol_node_disk_free_bytes",
        "Free space of each node's disks, as their agents report it",
        free,
    );
    family(
        r,
        "rvol_node_disk_capacity_bytes",
        "Size of each node's disks",
        capacity,
    );
    gauge(
        r,
        "rvol_cluster_records_refused",
        "Records in the store that did not decode (left out of control)",
        view.refused.len() as i64,
    );
}

/// An agent's exposition: its loop, and the processes of its last report.
pub fn encode_agent(m: &LoopMetrics, report: Option<&Report>) -> String {
    let mut r = Registry::default();
    m.register(&mut r, "rvol_agent_pass");
    let mut processes: BTreeMap<Labels, i64> = BTreeMap::new();
    for kind in ["replica", "engine"] {
        for state in ["starting", "running", "failed", "waiting", "stopping"] {
            processes.insert(labels(&[("kind", kind), ("state", state)]), 0);
        }
    }
    let state = |s: &ProcessState| match s {
        ProcessState::Starting => "starting",
        ProcessState::Running { .. } => "running",
        ProcessState::Failed { .. } => "failed",
        ProcessState::Waiting { .. } => "waiting",
        ProcessState::Stopping => "stopping",
    };
    if let Some(report) = report {
        let all = report
            .replicas
            .iter()
            .map(|p| ("replica", &p.state))
            .chain(report.engines.iter().map(|e| ("engine", &e.state)));
        for (kind, s) in all {
            *processes
                .entry(labels(&[("kind", kind), ("state", state(s))]))
                .or_default() += 1;
        }
    }
    family(
        &mut r,
        "rvol_agent_processes",
        "Replicas and engines this node's agent runs, by state",
        processes,
    );
    finish(&r)
}
