//! What the soak does to the volume, and when: a list drawn from the seed
//! alone before the run starts, so a seed names the schedule exactly (the
//! run may skip an entry whose target is busy with another fault; it says
//! so in its log).

use serde::Serialize;

use crate::rng::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// SIGKILL a replica, restart it after the hold.
    ReplicaKill,
    /// SIGSTOP a replica for the hold (frozen, not dead).
    ReplicaStop,
    /// SIGKILL the engine, restart it on its node.
    EngineKill,
    /// SIGSTOP the engine for the hold.
    EngineStop,
    /// Stop the engine and start it on the other engine node (re-attach).
    EngineMove,
    /// Freeze the engine, start another on the other node (it fences the
    /// frozen one), thaw the frozen one after the hold: it must not serve.
    EngineTakeover,
    /// Cut a replica node's link for the hold.
    LinkDown,
    /// Drop a share of the packets reaching a replica node.
    LossIn,
    /// Drop a share of the packets leaving a replica node.
    LossOut,
    /// Throttle a replica node's link (`tc tbf`).
    Throttle,
    /// Fill a replica node's file system for the hold.
    DiskFull,
    /// Take a snapshot (checked later through a backup of it).
    Snapshot,
    /// Remove a snapshot.
    SnapshotRemove,
    /// Back a snapshot up (to a directory).
    Backup,
    /// Grow the volume by 16 MiB.
    Expand,
    /// Remove a replica from the set and add a new, empty one elsewhere.
    ReplicaReplace,
}

impl Fault {
    pub const ALL: [Fault; 16] = [
        Fault::ReplicaKill,
        Fault::ReplicaStop,
        Fault::EngineKill,
        Fault::EngineStop,
        Fault::EngineMove,
        Fault::EngineTakeover,
        Fault::LinkDown,
        Fault::LossIn,
        Fault::LossOut,
        Fault::Throttle,
        Fault::DiskFull,
        Fault::Snapshot,
        Fault::SnapshotRemove,
        Fault::Backup,
        Fault::Expand,
        Fault::ReplicaReplace,
    ];

    pub fn name(self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default()
    }

    /// Whether it acts on a replica node (one fault per node at a time).
    pub fn on_replica(self) -> bool {
        matches!(
            self,
            Fault::ReplicaKill
                | Fault::ReplicaStop
                | Fault::LinkDown
                | Fault::LossIn
                | Fault::LossOut
                | Fault::Throttle
                | Fault::DiskFull
                | Fault::ReplicaReplace
        )
    }

    pub fn on_engine(self) -> bool {
        matches!(
            self,
            Fault::EngineKill | Fault::EngineStop | Fault::EngineMove | Fault::EngineTakeover
        )
    }

    /// Operations on a healthy system rather than faults.
    pub fn is_operation(self) -> bool {
        matches!(
            self,
            Fault::Snapshot
                | Fault::SnapshotRemove
                | Fault::Backup
                | Fault::Expand
                | Fault::ReplicaReplace
        )
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Planned {
    /// Seconds into the run.
    pub at: f64,
    pub fault: Fault,
    /// Chooses the target among those free at the time.
    pub pick: u64,
    /// Seconds the fault lasts (or, for a kill, before the restart).
    pub hold: f64,
    /// A share for loss faults, percent.
    pub percent: u32,
}

/// Events every 1–4 s over `seconds`, each fault drawn from `faults`.
pub fn plan(seed: u64, seconds: f64, faults: &[Fault]) -> Vec<Planned> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::new();
    let mut at = 3.0;
    while at < seconds && !faults.is_empty() {
        let fault = faults[rng.below(faults.len() as u64) as usize];
        let hold = match fault {
            Fault::EngineKill | Fault::ReplicaKill => rng.between(0, 4000),
            Fault::EngineStop => rng.between(500, 6000),
            _ => rng.between(1000, 9000),
        } as f64
            / 1000.0;
        out.push(Planned {
            at,
            fault,
            pick: rng.next(),
            hold,
            percent: rng.between(30, 100) as u32,
        });
        at += rng.between(1000, 4000) as f64 / 1000.0;
    }
    out
}
