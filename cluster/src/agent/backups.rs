//! Running the backup a volume's record asks for, through its engine's
//! admin API (`POST /v1/backups`), and recording how it ended.
//!
//! **The engine's status is the truth.** The engine keeps the backup it
//! runs, or its last one, in its status (snapshot, target, state, name).
//! A pass that finds the job pending looks there first: the same
//! (snapshot, target) running is left to run, done or failed is
//! recorded; only when the engine has no such backup (none started, or
//! the engine restarted and lost it) is one started, and a restarted
//! backup reuses the chunks already uploaded (`rvol_backup`'s lease
//! journal). So an agent killed at any point neither loses the job nor
//! runs it twice at once.
//!
//! The target's credentials are the agent's own `AWS_*` settings, handed
//! to the engine with the request: they never enter the cluster's store.

use hyper::Method;

use super::admin;
use super::record::{update_attached, RecordError};
use crate::http::Address;
use crate::model::{BackupJob, BackupJobState, BackupProgress, NodeName, Volume};
use crate::store::Store;

/// What the engine says of the job's backup.
enum Seen {
    /// Not the engine's backup (it runs none, or another).
    Absent,
    Running(BackupProgress),
    Done(String),
    Failed(String),
}

fn seen(job: &BackupJob, status: &serde_json::Value) -> Seen {
    let b = &status["backup"];
    if b["snapshot"] != job.snapshot.as_str() || b["target"] != job.target.as_str() {
        return Seen::Absent;
    }
    match b["state"].as_str() {
        Some("running") => {
            let p = &b["progress"];
            Seen::Running(BackupProgress {
                snapshot: job.snapshot.to_string(),
                read: p["read"].as_u64().unwrap_or(0),
                to_read: p["to_read"].as_u64().unwrap_or(0),
                uploaded: p["bytes_uploaded"].as_u64().unwrap_or(0),
            })
        }
        Some("done") => match b["name"].as_str() {
            Some(name) => Seen::Done(name.to_string()),
            None => Seen::Failed("the engine finished the backup without naming it".into()),
        },
        Some("failed") => Seen::Failed(
            b["error"]
                .as_str()
                .unwrap_or("the engine gave no reason")
                .to_string(),
        ),
        _ => Seen::Absent,
    }
}

/// Brings the record's pending backup along (see the module docs); its
/// progress, for the node's report, while it runs.
pub async fn converge<S: Store>(
    store: &S,
    node: &NodeName,
    v: &Volume,
    socket: &Address,
    status: &serde_json::Value,
) -> Option<BackupProgress> {
    let job = v.backup.as_ref().filter(|b| b.pending())?;
    let next = match seen(job, status) {
        Seen::Running(p) if job.state == BackupJobState::Running => return Some(p),
        Seen::Running(_) => BackupJobState::Running,
        Seen::Done(name) => BackupJobState::Done { name },
        Seen::Failed(error) => BackupJobState::Failed { error },
        Seen::Absent => {
            let options: std::collections::BTreeMap<String, String> = std::env::vars()
                .filter(|(k, _)| k.starts_with("AWS_"))
                .collect();
            let body = serde_json::json!({
                "snapshot": job.snapshot,
                "target": job.target,
                "options": options,
                "rate_mib": job.rate_mib,
            });
            match admin(socket, Method::POST, "/v1/backups", Some(body.to_string())).await {
                Ok(_) => BackupJobState::Running,
                Err(e) => BackupJobState::Failed {
                    error: format!("the engine did not start it: {e}"),
                },
            }
        }
    };
    let recorded = update_attached(store, node, &v.name, |rec| {
        let Some(b) = rec.backup.as_mut() else {
            return Ok(false);
        };
        if b.snapshot != job.snapshot || b.target != job.target || !b.pending() || b.state == next {
            return Ok(false);
        }
        b.state = next.clone();
        let said = match &next {
            BackupJobState::Done { name } => format!("backup {name} written to {}", job.target),
            BackupJobState::Failed { error } => {
                format!("backup of snapshot {} failed: {error}", job.snapshot)
            }
            _ => format!("backup of snapshot {} started", job.snapshot),
        };
        rec.event(said);
        Ok(true)
    })
    .await;
    if let Err(e @ RecordError::Store(_)) = recorded {
        tracing::warn!(volume = %v.name, error = %e, "recording the backup");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SnapshotName;

    fn job() -> BackupJob {
        BackupJob {
            snapshot: SnapshotName::new("s1").unwrap(),
            target: "file:///b".into(),
            rate_mib: None,
            state: BackupJobState::Running,
            asked: 0,
        }
    }

    #[test]
    fn only_the_jobs_own_backup_counts() {
        let status = |snapshot: &str, target: &str, state: &str| {
            serde_json::json!({ "backup": {
                "snapshot": snapshot, "target": target, "state": state,
                "name": "v.20261207T000000Z", "progress": { "read": 5, "to_read": 9 }
            }})
        };
        assert!(matches!(seen(&job(), &serde_json::json!({})), Seen::Absent));
        assert!(matches!(
            seen(&job(), &status("s0", "file:///b", "done")),
            Seen::Absent
        ));
        assert!(matches!(
            seen(&job(), &status("s1", "file:///c", "running")),
            Seen::Absent
        ));
        assert!(
            matches!(seen(&job(), &status("s1", "file:///b", "running")), Seen::Running(p) if p.read == 5 && p.to_read == 9)
        );
        assert!(
            matches!(seen(&job(), &status("s1", "file:///b", "done")), Seen::Done(n) if n == "v.20261207T000000Z")
        );
        assert!(matches!(
            seen(&job(), &status("s1", "file:///b", "failed")),
            Seen::Failed(_)
        ));
    }
}
