//! Removing backups, and the chunks no backup needs any more.
//!
//! `rm` deletes a manifest at once: the backup is gone from lists and
//! cannot be restored. Its chunks go later, in a sweep (mark and sweep):
//!
//! 1. take the sweep lease, then look for live backup leases; if any
//!    backup runs, stop (it may reuse chunks of a manifest just removed);
//! 2. delete the expired leases of backups that died: their journals name
//!    chunks a retry would reuse without checking, and those may go now;
//! 3. mark: read every manifest (one that cannot be read stops the sweep,
//!    rather than have its chunks taken for garbage);
//! 4. sweep: delete each chunk that no manifest names and that is older
//!    than the grace period. The grace keeps what a backup that died
//!    uploaded, for its retry, and covers clocks that disagree.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde::{Deserialize, Serialize};

use crate::format::ChunkId;
use crate::lease::{self, renew_every, Lease, SWEEP_LEASE};
use crate::target::Target;

/// Deletes backup `name`'s manifest.
pub async fn remove(target: &Target, name: &str) -> anyhow::Result<()> {
    let m = target.manifest(name).await?;
    target.delete(&m.key()).await
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SweepReport {
    pub manifests: u64,
    pub chunks: u64,
    pub referenced: u64,
    pub deleted: u64,
    /// Unreferenced but younger than the grace period.
    pub kept_young: u64,
    pub leases_cleared: u64,
}

/// Runs one sweep; see the module documentation.
pub async fn sweep(target: &Arc<Target>, grace: Duration) -> anyhow::Result<SweepReport> {
    let (lease, _) = Lease::acquire(target, SWEEP_LEASE, "a sweep of unreferenced chunks").await?;
    let result = run(target, grace, &lease).await;
    lease.release().await?;
    result
}

async fn run(target: &Target, grace: Duration, lease: &Lease) -> anyhow::Result<SweepReport> {
    let mut report = SweepReport::default();
    let others = lease::live_leases(target, SWEEP_LEASE).await?;
    if let Some((_, r)) = others.first() {
        bail!(
            "{}: {} runs; sweep when it has finished",
            target.url(),
            r.what
        );
    }
    for (key, _) in target.list("leases/").await? {
        if key != SWEEP_LEASE {
            target.delete(&key).await?;
            report.leases_cleared += 1;
        }
    }
    let (manifests, unreadable) = target.manifests(None).await?;
    if let Some(e) = unreadable.into_iter().next() {
        return Err(e.context("a manifest cannot be read; nothing swept"));
    }
    report.manifests = manifests.len() as u64;
    let referenced: HashSet<ChunkId> = manifests
        .iter()
        .flat_map(|m| m.chunks.iter().map(|c| c.1))
        .collect();
    report.referenced = referenced.len() as u64;
    let cutoff = lease::now() as i64 - grace.as_secs() as i64;
    let mut renewed = Instant::now();
    for (key, meta) in target.list("chunks/").await? {
        report.chunks += 1;
        let id = key.rsplit('/').next().and_then(ChunkId::parse);
        if id.is_some_and(|id| referenced.contains(&id)) {
            continue;
        }
        if meta.last_modified.timestamp() > cutoff {
            report.kept_young += 1;
            continue;
        }
        if renewed.elapsed() > renew_every() {
            lease.renew(Vec::new()).await?;
            renewed = Instant::now();
        }
        target.delete(&key).await?;
        report.deleted += 1;
    }
    Ok(report)
}
