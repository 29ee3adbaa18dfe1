//! What happened to the volume, for its status: the newest [`KEPT`]
//! events (a replica failed, rejoined, was rebuilt, turned slow or was
//! evicted; a snapshot, a revert, an expansion; fencing; backups), each
//! with its time and a sentence. The log says all of it too; this list is
//! what `rvol volume status` and `GET /v1/events` show an operator who
//! was not watching the log. Bounded, so a flapping replica cannot grow
//! it.

use std::collections::VecDeque;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// Events kept.
pub const KEPT: usize = 200;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    ReplicaFailed,
    ReplicaRejoined,
    ReplicaAdded,
    ReplicaRemoved,
    RebuildStarted,
    RebuildFinished,
    RebuildFailed,
    ReplicaSlow,
    ReplicaRecovered,
    ReplicaEvicted,
    Snapshot,
    SnapshotRemoved,
    Reverted,
    Expanded,
    Fenced,
    BackupFinished,
    BackupFailed,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    /// Seconds since the Unix epoch.
    pub at: u64,
    pub kind: EventKind,
    /// The replica it is about, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
    pub message: String,
}

#[derive(Default)]
pub struct Events(Mutex<VecDeque<Event>>);

impl Events {
    pub fn push(&self, kind: EventKind, replica: Option<String>, message: impl Into<String>) {
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() == KEPT {
            q.pop_front();
        }
        q.push_back(Event {
            at,
            kind,
            replica,
            message: message.into(),
        });
    }

    /// The newest `n`, oldest first.
    pub fn newest(&self, n: usize) -> Vec<Event> {
        let q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        q.iter().skip(q.len().saturating_sub(n)).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_keeps_the_newest_and_no_more() {
        let e = Events::default();
        for i in 0..KEPT + 5 {
            e.push(EventKind::Snapshot, None, format!("s{i}"));
        }
        let all = e.newest(usize::MAX);
        assert_eq!(all.len(), KEPT);
        assert_eq!(all[0].message, "s5");
        assert_eq!(e.newest(2)[1].message, format!("s{}", KEPT + 4));
    }
}
