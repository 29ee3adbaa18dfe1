//! The soak: runs the schedule against the system while the clients
//! work, lifts each fault after its hold, measures how long the volume
//! takes to be healthy again, and at checkpoints and at the end lifts
//! every fault, waits for health, reads the whole working set and scrubs.
//! At the very end it stops every process and compares the replicas'
//! directories byte for byte, reads back each snapshot that a backup
//! holds, and hands everything to the checker.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::json;

use crate::history::{value_of, Op, Snapshot, Value, BLOCK};
use crate::lab::Lab;
use crate::schedule::{Fault, Planned};
use crate::system::{Proc, System, VOLUME};
use crate::workload::{read_all, Client};

pub struct Config {
    pub seed: u64,
    pub seconds: f64,
    pub clients: u32,
    pub blocks: u64,
    pub work: PathBuf,
    pub rvol: PathBuf,
    pub checkpoint_seconds: f64,
    pub max_faults: usize,
    pub engine_args: Vec<String>,
}

const MIB: u64 = 1 << 20;
const REPLICA_NODES: [&str; 4] = ["r1", "r2", "r3", "r4"];
const ENGINE_NODES: [&str; 2] = ["e1", "e2"];
const HEALTHY_WITHIN: Duration = Duration::from_secs(180);

/// An engine the soak waits to start.
struct Wanted {
    node: String,
    since: Instant,
    tried: Option<Instant>,
}

struct Active {
    fault: Fault,
    node: String,
    heal_at: Instant,
    /// A frozen engine that another took over.
    frozen: Option<(Proc, u32)>,
}

/// What the run measured and found.
#[derive(Default, serde::Serialize)]
pub struct Summary {
    pub seed: u64,
    pub seconds: f64,
    pub operations: BTreeMap<String, u64>,
    pub injected: BTreeMap<String, u64>,
    pub skipped: BTreeMap<String, u64>,
    /// Seconds from a fault's end to the volume's health, per fault.
    pub recovery: BTreeMap<String, Vec<f64>>,
    pub rebuilt_bytes: BTreeMap<String, Vec<u64>>,
    pub engines: usize,
    pub block_reads_checked: u64,
    pub snapshot_blocks_checked: u64,
    pub snapshots_checked: usize,
    pub replica_bytes_compared: u64,
    pub scrubs: u64,
    /// History violations, first first.
    pub violations: Vec<String>,
    /// Other failures: replicas that differ, engines that would not come
    /// back, scrub errors, a fenced engine that kept running.
    pub findings: Vec<String>,
}

struct Soak {
    sys: System,
    cfg: Config,
    active: Vec<Active>,
    wanted: Option<Wanted>,
    spare: String,
    size: u64,
    snapshots: Vec<Snapshot>,
    live: Vec<String>,
    /// Faults lifted and not yet followed by health: (fault, lifted,
    /// engine, rebuilt bytes then).
    pending: Vec<(Fault, Instant, u32, u64)>,
    summary: Summary,
    checkpoint_ops: Vec<Op>,
    log: std::fs::File,
}

pub fn run(cfg: Config, plan: &[Planned]) -> Result<Summary> {
    std::fs::create_dir_all(&cfg.work)?;
    let lab = Lab::new(
        &cfg.work,
        &["r1", "r2", "r3", "r4", "e1", "e2"],
        &REPLICA_NODES,
        768,
    )?;
    let size = 4 * cfg.blocks * BLOCK;
    let members: Vec<String> = REPLICA_NODES[..3].iter().map(|s| s.to_string()).collect();
    let sys = System::new(
        lab,
        cfg.rvol.clone(),
        cfg.work.clone(),
        size,
        members,
        cfg.engine_args.clone(),
    );
    let log = std::fs::File::create(cfg.work.join("soak.log"))?;
    let mut soak = Soak {
        sys,
        active: Vec::new(),
        wanted: None,
        spare: "r4".into(),
        size,
        snapshots: Vec::new(),
        live: Vec::new(),
        pending: Vec::new(),
        summary: Summary {
            seed: cfg.seed,
            seconds: cfg.seconds,
            ..Summary::default()
        },
        checkpoint_ops: Vec::new(),
        log,
        cfg,
    };
    for node in REPLICA_NODES {
        soak.sys.start_replica(node, false)?;
    }
    soak.start_engine("e1")?;
    let ids = std::sync::Arc::new(AtomicU64::new(1));
    let clients: Vec<_> = (0..soak.cfg.clients)
        .map(|id| {
            let c = Client {
                id,
                clients: soak.cfg.clients,
                blocks: soak.cfg.blocks,
                seed: soak.cfg.seed,
                shared: soak.sys.shared.clone(),
                ids: ids.clone(),
            };
            std::thread::spawn(move || c.run())
        })
        .collect();

    let t0 = Instant::now();
    let mut next = 0;
    let mut checkpoint = soak.cfg.checkpoint_seconds;
    while t0.elapsed().as_secs_f64() < soak.cfg.seconds {
        soak.heal_due()?;
        soak.watch()?;
        while next < plan.len() && plan[next].at <= t0.elapsed().as_secs_f64() {
            soak.apply(&plan[next])?;
            next += 1;
        }
        if t0.elapsed().as_secs_f64() >= checkpoint {
            soak.checkpoint(false)?;
            checkpoint += soak.cfg.checkpoint_seconds;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    soak.checkpoint(true)?;
    let mut ops: Vec<Op> = Vec::new();
    for c in clients {
        ops.extend(c.join().map_err(|_| anyhow::anyhow!("a client panicked"))?);
    }
    ops.append(&mut soak.checkpoint_ops);
    soak.finish(ops)
}

impl Soak {
    fn note(&mut self, what: &str) {
        let t = self.sys.shared.now() as f64 / 1e9;
        let _ = writeln!(self.log, "{t:9.3} {what}");
    }

    fn finding(&mut self, what: String) {
        self.note(&format!("FINDING: {what}"));
        eprintln!("chaos: finding: {what}");
        self.summary.findings.push(what);
    }

    /// Wants an engine on `node` and tries once; [`Soak::watch`] tries
    /// again every 2 s while the soak goes on lifting faults (an engine may
    /// rightly refuse to start while the only current replica is cut off).
    fn start_engine(&mut self, node: &str) -> Result<()> {
        self.wanted = Some(Wanted {
            node: node.to_string(),
            since: Instant::now(),
            tried: None,
        });
        self.ensure_engine()
    }

    fn ensure_engine(&mut self) -> Result<()> {
        let Some(w) = self.wanted.as_mut() else {
            return Ok(());
        };
        if self.sys.engine.is_some() {
            self.wanted = None;
            return Ok(());
        }
        if w.tried
            .is_some_and(|t| t.elapsed() < Duration::from_secs(2))
        {
            return Ok(());
        }
        w.tried = Some(Instant::now());
        let (node, since) = (w.node.clone(), w.since);
        match self.sys.start_engine(&node) {
            Ok(()) => {
                self.wanted = None;
                let epoch = self.sys.instances.len() - 1;
                self.note(&format!("engine {epoch} serves on {node}"));
                Ok(())
            }
            Err(e) if since.elapsed() < HEALTHY_WITHIN => {
                self.note(&format!("engine on {node} not up: {e:#}"));
                Ok(())
            }
            Err(e) => Err(e.context(format!(
                "no engine could start for {} s",
                HEALTHY_WITHIN.as_secs()
            ))),
        }
    }

    fn busy(&self, node: &str) -> bool {
        self.active.iter().any(|a| a.node == node)
    }

    fn engine_free(&self) -> bool {
        self.sys.engine.as_ref().is_some_and(|e| !e.proc.stopped)
            && !self.active.iter().any(|a| a.fault.on_engine())
    }

    fn apply(&mut self, p: &Planned) -> Result<()> {
        let name = p.fault.name();
        let faults = self
            .active
            .iter()
            .filter(|a| !a.fault.is_operation())
            .count();
        let free: Vec<String> = self
            .sys
            .members
            .iter()
            .filter(|m| !self.busy(m))
            .cloned()
            .collect();
        let target =
            (!free.is_empty()).then(|| free[(p.pick % free.len() as u64) as usize].clone());
        let possible = if p.fault.is_operation() {
            self.engine_free() && (p.fault != Fault::ReplicaReplace || target.is_some())
        } else if p.fault.on_engine() {
            faults < self.cfg.max_faults && self.engine_free()
        } else {
            faults < self.cfg.max_faults && target.is_some()
        };
        if !possible {
            *self.summary.skipped.entry(name.clone()).or_default() += 1;
            self.note(&format!("skip {name}: its target is busy"));
            return Ok(());
        }
        let node = if p.fault.on_replica() {
            target.unwrap_or_default()
        } else {
            self.sys
                .engine
                .as_ref()
                .map(|e| e.node.clone())
                .unwrap_or_default()
        };
        let heal_at = Instant::now() + Duration::from_secs_f64(p.hold);
        let other = |n: &str| {
            if n == ENGINE_NODES[0] {
                ENGINE_NODES[1]
            } else {
                ENGINE_NODES[0]
            }
        };
        let mut frozen = None;
        let done = match p.fault {
            Fault::ReplicaKill => {
                if let Some(r) = self.sys.replicas.get_mut(&node) {
                    r.kill();
                }
                true
            }
            Fault::ReplicaStop => {
                if let Some(r) = self.sys.replicas.get_mut(&node) {
                    r.signal(libc::SIGSTOP);
                }
                true
            }
            Fault::EngineKill => {
                self.sys.hide_engine();
                if let Some(mut e) = self.sys.engine_gone() {
                    e.proc.kill();
                }
                true
            }
            Fault::EngineStop => {
                if let Some(e) = self.sys.engine.as_mut() {
                    e.proc.signal(libc::SIGSTOP);
                }
                true
            }
            Fault::EngineMove => {
                self.sys.hide_engine();
                // A stop waits for requests in flight, which may wait for
                // replicas other faults cut off: a detach that hangs is
                // killed, as an agent would.
                if let Some(e) = self.sys.engine.as_mut() {
                    e.proc.terminate(Duration::from_secs(10));
                }
                self.sys.engine_gone();
                self.start_engine(other(&node))?;
                self.pending
                    .push((p.fault, Instant::now(), self.epoch(), 0));
                false
            }
            Fault::EngineTakeover => {
                let Some(mut old) = self.sys.engine.take() else {
                    return Ok(());
                };
                old.proc.signal(libc::SIGSTOP);
                self.sys.hide_engine();
                frozen = Some((old.proc, old.epoch));
                self.start_engine(other(&node))?;
                true
            }
            Fault::LinkDown => self.sys.lab.link(&node, false).map(|_| true)?,
            Fault::LossIn | Fault::LossOut => self
                .sys
                .lab
                .loss(&node, p.fault == Fault::LossIn, p.percent)
                .map(|_| true)?,
            Fault::Throttle => self
                .sys
                .lab
                .throttle(&node, 200 + (p.pick % 2000) as u32)
                .map(|_| true)?,
            Fault::DiskFull => self.sys.lab.fill(&node, true).map(|_| true)?,
            Fault::Snapshot => {
                self.snapshot();
                false
            }
            Fault::SnapshotRemove | Fault::Backup if self.live.is_empty() => false,
            Fault::SnapshotRemove => {
                let i = (p.pick % self.live.len() as u64) as usize;
                let snap = self.live[i].clone();
                let answer = self
                    .sys
                    .admin("DELETE", &format!("/v1/snapshots/{snap}"), None);
                if matches!(answer, Ok((200, _))) {
                    self.live.remove(i);
                }
                self.note(&format!("remove snapshot {snap}: {}", show(&answer)));
                false
            }
            Fault::Backup => {
                let snap = self.live[(p.pick % self.live.len() as u64) as usize].clone();
                let target = format!("file://{}", self.cfg.work.join("backups").display());
                let body = json!({"snapshot": snap, "target": target});
                let answer = self.sys.admin("POST", "/v1/backups", Some(&body));
                self.note(&format!("backup of {snap}: {}", show(&answer)));
                false
            }
            Fault::Expand => {
                if self.size < 4 * self.sys.initial_size {
                    let body = json!({"size": self.size + 16 * MIB});
                    let answer = self.sys.admin("POST", "/v1/volume/expand", Some(&body));
                    if matches!(answer, Ok((200, _))) {
                        self.size += 16 * MIB;
                    }
                    self.note(&format!("expand to {}: {}", self.size, show(&answer)));
                }
                false
            }
            Fault::ReplicaReplace => {
                self.replace(&node)?;
                false
            }
        };
        *self.summary.injected.entry(name.clone()).or_default() += 1;
        if done {
            self.note(&format!("{name} on {node} for {:.1} s", p.hold));
        }
        if done {
            self.active.push(Active {
                fault: p.fault,
                node,
                heal_at,
                frozen,
            });
        }
        Ok(())
    }

    fn epoch(&self) -> u32 {
        self.sys
            .engine
            .as_ref()
            .map(|e| e.epoch)
            .unwrap_or(u32::MAX)
    }

    fn snapshot(&mut self) {
        let name = format!("chaos-{}", self.snapshots.len());
        let epoch = self.epoch();
        let start = self.sys.shared.now();
        let answer = self
            .sys
            .admin("POST", "/v1/snapshots", Some(&json!({"name": name})));
        let end = self.sys.shared.now();
        if matches!(answer, Ok((200, _))) {
            self.live.push(name.clone());
            self.snapshots.push(Snapshot {
                name: name.clone(),
                epoch,
                start,
                end,
                view: None,
            });
        }
        self.note(&format!("snapshot {name}: {}", show(&answer)));
    }

    /// Takes `node`'s replica out of the set and adds a new, empty one on
    /// the spare node; `node` becomes the spare.
    fn replace(&mut self, node: &str) -> Result<()> {
        let gone = json!({"address": self.sys.replica_addr(node)});
        let answer = self.sys.admin("DELETE", "/v1/replicas", Some(&gone));
        self.note(&format!("remove replica {node}: {}", show(&answer)));
        if !matches!(answer, Ok((200, _))) {
            return Ok(());
        }
        self.sys.members.retain(|m| m != node);
        if let Some(r) = self.sys.replicas.get_mut(node) {
            r.kill();
        }
        let spare = std::mem::replace(&mut self.spare, node.to_string());
        if let Some(r) = self.sys.replicas.get_mut(&spare) {
            r.kill();
        }
        self.sys.start_replica(&spare, true)?;
        self.sys.members.push(spare.clone());
        let added = json!({"address": self.sys.replica_addr(&spare)});
        let answer = self.sys.admin("POST", "/v1/replicas", Some(&added));
        self.note(&format!("add replica {spare}: {}", show(&answer)));
        self.pending
            .push((Fault::ReplicaReplace, Instant::now(), self.epoch(), 0));
        self.sys.start_replica(node, true)
    }

    fn heal_due(&mut self) -> Result<()> {
        let now = Instant::now();
        let due: Vec<usize> = (0..self.active.len())
            .filter(|&i| self.active[i].heal_at <= now)
            .collect();
        for i in due.into_iter().rev() {
            let a = self.active.remove(i);
            self.heal(a)?;
        }
        Ok(())
    }

    fn heal(&mut self, a: Active) -> Result<()> {
        let node = a.node.clone();
        match a.fault {
            Fault::ReplicaKill => self.sys.start_replica(&node, false)?,
            Fault::ReplicaStop => {
                if let Some(r) = self.sys.replicas.get_mut(&node) {
                    r.signal(libc::SIGCONT);
                }
            }
            Fault::EngineKill => self.start_engine(&node)?,
            Fault::EngineStop => {
                if let Some(e) = self.sys.engine.as_mut() {
                    e.proc.signal(libc::SIGCONT);
                }
            }
            Fault::EngineTakeover => {
                if let Some((mut old, epoch)) = a.frozen {
                    old.signal(libc::SIGCONT);
                    let deadline = Instant::now() + Duration::from_secs(30);
                    while !old.exited() && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    if !old.exited() {
                        self.finding(format!(
                            "engine {epoch}, taken over on another node, still runs 30 s after it was thawed"
                        ));
                        old.kill();
                    }
                    let now = self.sys.shared.now();
                    if let Some(i) = self.sys.instances.iter_mut().find(|i| i.epoch == epoch) {
                        i.ended = Some(now);
                    }
                }
            }
            Fault::LinkDown => self.sys.lab.link(&node, true)?,
            Fault::LossIn | Fault::LossOut => self.sys.lab.loss(&node, true, 0)?,
            Fault::Throttle => self.sys.lab.throttle(&node, 0)?,
            Fault::DiskFull => self.sys.lab.fill(&node, false)?,
            _ => {}
        }
        let rebuilt = self
            .status()
            .map(|s| s["rebuilt_bytes"].as_u64().unwrap_or(0))
            .unwrap_or(0);
        self.pending
            .push((a.fault, Instant::now(), self.epoch(), rebuilt));
        self.note(&format!("lifted {} on {node}", a.fault.name()));
        Ok(())
    }

    fn status(&self) -> Option<serde_json::Value> {
        if self.sys.engine.as_ref().is_none_or(|e| e.proc.stopped) {
            return None;
        }
        match self.sys.admin("GET", "/v1/volume", None) {
            Ok((200, s)) => Some(s),
            _ => None,
        }
    }

    fn healthy(&self, s: &serde_json::Value) -> bool {
        s["state"] == "healthy"
            && s["rebuild"].is_null()
            && s["replicas"].as_array().map(Vec::len) == Some(self.sys.members.len())
    }

    /// Notices an engine that exited on its own, and the volume's return
    /// to health after lifted faults.
    fn watch(&mut self) -> Result<()> {
        self.ensure_engine()?;
        let exited = self.sys.engine.as_mut().is_some_and(|e| e.proc.exited());
        if exited {
            let node = self
                .sys
                .engine
                .as_ref()
                .map(|e| e.node.clone())
                .unwrap_or_default();
            let epoch = self.epoch();
            self.sys.engine_gone();
            self.finding(format!("engine {epoch} on {node} exited on its own"));
            self.start_engine(&node)?;
        }
        if self.pending.is_empty() {
            return Ok(());
        }
        let Some(s) = self.status() else {
            return Ok(());
        };
        if !self.healthy(&s) {
            return Ok(());
        }
        let rebuilt = s["rebuilt_bytes"].as_u64().unwrap_or(0);
        let epoch = self.epoch();
        for (fault, lifted, at_epoch, before) in std::mem::take(&mut self.pending) {
            let name = fault.name();
            self.summary
                .recovery
                .entry(name.clone())
                .or_default()
                .push(lifted.elapsed().as_secs_f64());
            let bytes = if at_epoch == epoch {
                rebuilt.saturating_sub(before)
            } else {
                rebuilt
            };
            self.summary
                .rebuilt_bytes
                .entry(name)
                .or_default()
                .push(bytes);
        }
        Ok(())
    }

    /// Lifts every fault, waits for health, reads everything back (with
    /// the clients paused) and scrubs.
    fn checkpoint(&mut self, last: bool) -> Result<()> {
        self.note("checkpoint");
        for a in std::mem::take(&mut self.active) {
            self.heal(a)?;
        }
        let deadline = Instant::now() + HEALTHY_WITHIN;
        loop {
            self.watch()?;
            if self.status().is_some_and(|s| self.healthy(&s)) {
                break;
            }
            if Instant::now() > deadline {
                let s = self.status();
                self.finding(format!(
                    "not healthy {} s after every fault was lifted: {}",
                    HEALTHY_WITHIN.as_secs(),
                    s.map(|s| s.to_string()).unwrap_or("no engine".into())
                ));
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        let shared = self.sys.shared.clone();
        let _quiet = shared.gate.write().unwrap_or_else(|e| e.into_inner());
        match read_all(&shared, self.cfg.blocks, 1000) {
            Ok(ops) => self.checkpoint_ops.extend(ops),
            Err(e) => self.finding(format!("the checkpoint's read failed: {e:#}")),
        }
        match self.sys.admin("POST", "/v1/verify", None) {
            Ok((200, serde_json::Value::Array(rs))) => {
                self.summary.scrubs += 1;
                for r in rs
                    .iter()
                    .filter(|r| r["bad_blocks"] != 0 || !r["error"].is_null())
                {
                    self.finding(format!("scrub: {r}"));
                }
            }
            other => self.finding(format!("scrub failed: {other:?}")),
        }
        if last {
            shared.stop.store(true, Ordering::Release);
        }
        Ok(())
    }

    fn finish(mut self, ops: Vec<Op>) -> Result<Summary> {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self
            .sys
            .admin("GET", "/v1/backups", None)
            .is_ok_and(|(_, b)| b["state"] == "running")
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(500));
        }
        if let Some(e) = self.sys.engine.as_mut() {
            e.proc.terminate(Duration::from_secs(30));
        }
        self.sys.engine_gone();
        for r in self.sys.replicas.values_mut() {
            r.terminate(Duration::from_secs(30));
        }
        self.compare_replicas();
        self.read_backups()?;
        for op in &ops {
            let kind = match (&op.kind, op.outcome) {
                (crate::history::Kind::Write { zero: true, .. }, _) => "zero",
                (crate::history::Kind::Write { fua: true, .. }, _) => "write-fua",
                (crate::history::Kind::Write { .. }, _) => "write",
                (crate::history::Kind::Read { .. }, _) => "read",
                (crate::history::Kind::Flush, _) => "flush",
            };
            let outcome = match op.outcome {
                crate::history::Outcome::Ok => "ok",
                crate::history::Outcome::Failed(_) => "failed",
                crate::history::Outcome::Unknown => "unanswered",
            };
            *self
                .summary
                .operations
                .entry(format!("{kind} {outcome}"))
                .or_default() += 1;
        }
        let report = crate::check::check(&ops, &self.sys.instances, &self.snapshots);
        self.summary.engines = self.sys.instances.len();
        self.summary.block_reads_checked = report.block_reads;
        self.summary.snapshot_blocks_checked = report.snapshot_blocks;
        self.summary.violations = report
            .violations
            .iter()
            .map(|v| format!("at {:.3} s: {}", v.at as f64 / 1e9, v.what))
            .collect();
        if !self.summary.violations.is_empty() || !self.summary.findings.is_empty() {
            let f = std::fs::File::create(self.cfg.work.join("history.json"))?;
            serde_json::to_writer(
                std::io::BufWriter::new(f),
                &(&ops, &self.sys.instances, &self.snapshots),
            )?;
        }
        Ok(self.summary)
    }

    /// The replicas of the set, offline: the same size, the same chain and
    /// the same bytes in their head.
    fn compare_replicas(&mut self) {
        let members = self.sys.members.clone();
        let mut opened = Vec::new();
        for m in &members {
            let Some(dir) = self.sys.replica_dir(m).cloned() else {
                continue;
            };
            match rvol_replica::Replica::open(&dir) {
                Ok(r) => opened.push((m.clone(), r)),
                Err(e) => self.finding(format!("replica {m} does not open: {e}")),
            }
        }
        let Some((first, r0)) = opened.first() else {
            return;
        };
        let chain = |r: &rvol_replica::Replica| -> Vec<String> {
            // The head's file name counts its rebuilds, not its content.
            let chain = r.info().chain;
            chain[..chain.len().saturating_sub(1)]
                .iter()
                .filter(|l| !l.removed)
                .map(|l| l.name.clone())
                .collect()
        };
        for (m, r) in &opened[1..] {
            if r.size() != r0.size() || chain(r) != chain(r0) {
                let what = format!(
                    "replicas {first} and {m} differ: sizes {} and {}, chains {:?} and {:?}",
                    r0.size(),
                    r.size(),
                    chain(r0),
                    chain(r)
                );
                self.finding(what);
                return;
            }
        }
        let size = r0.size();
        let mut at = 0;
        while at < size {
            let n = MIB.min(size - at);
            let reads: Vec<_> = opened
                .iter()
                .map(|(m, r)| (m.clone(), r.read(at, n)))
                .collect();
            let (m0, d0) = &reads[0];
            for (m, d) in &reads {
                match (d0, d) {
                    (Ok(a), Ok(b)) if a == b => {}
                    (Ok(a), Ok(b)) => {
                        let i = a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(0) as u64;
                        let block = (at + i) / BLOCK;
                        let what = format!(
                            "replicas {m0} and {m} differ at block {block}: {:?} and {:?}",
                            value_of(&a[(i / BLOCK * BLOCK) as usize..][..BLOCK as usize], block),
                            value_of(&b[(i / BLOCK * BLOCK) as usize..][..BLOCK as usize], block)
                        );
                        self.finding(what);
                        return;
                    }
                    (Err(e), _) | (_, Err(e)) => {
                        self.finding(format!("reading replica at {at}: {e}"));
                        return;
                    }
                }
            }
            at += n;
            self.summary.replica_bytes_compared += n * opened.len() as u64;
        }
    }

    /// Reads each backup's snapshot (the working set) into its record.
    fn read_backups(&mut self) -> Result<()> {
        let dir = self.cfg.work.join("backups");
        if !dir.exists() {
            return Ok(());
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let url = format!("file://{}", dir.display());
        let blocks = self.cfg.blocks;
        let views = rt.block_on(async {
            let target = rvol_backup::Target::open(&url, &rvol_backup::StoreOptions::default())?;
            let (manifests, bad) = target.manifests(Some(VOLUME)).await?;
            let mut views = Vec::new();
            for e in bad {
                views.push(Err(format!("unreadable manifest: {e:#}")));
            }
            for m in manifests {
                let mut view = Vec::new();
                let mut chunk: Option<(u64, Vec<u8>)> = None;
                for b in 0..blocks {
                    let index = b * BLOCK / m.chunk_size;
                    let Some((_, id)) = m.chunks.iter().find(|(i, _)| *i == index) else {
                        view.push(Value::Zero);
                        continue;
                    };
                    if chunk.as_ref().map(|c| c.0) != Some(index) {
                        let data = target
                            .chunk(id, m.content_len(index))
                            .await
                            .context("a backup chunk")?;
                        chunk = Some((index, data));
                    }
                    let data = &chunk.as_ref().map(|c| &c.1).context("chunk")?;
                    let at = (b * BLOCK - index * m.chunk_size) as usize;
                    view.push(value_of(&data[at..at + BLOCK as usize], b));
                }
                views.push(Ok((m.snapshot.clone(), view)));
            }
            anyhow::Ok(views)
        })?;
        for v in views {
            match v {
                Err(e) => self.finding(e),
                Ok((snap, view)) => {
                    if let Some(s) = self.snapshots.iter_mut().find(|s| s.name == snap) {
                        s.view = Some(view);
                        self.summary.snapshots_checked += 1;
                    }
                }
            }
        }
        Ok(())
    }
}

/// An admin answer for the log: the status and JSON, or the error.
fn show(answer: &Result<(u16, serde_json::Value)>) -> String {
    match answer {
        Ok((code, body)) => format!("{code} {body}"),
        Err(e) => format!("{e:#}"),
    }
}
