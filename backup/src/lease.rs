//! Leases: who works on a target now.
//!
//! A lease is an object under `leases/`, created with a create-only put
//! and renewed six times per ttl ([`lease_ttl`]) with a put conditional on the version
//! last written (S3's If-Match; a directory overwrites after a read). A
//! lease not renewed for its `ttl` has expired and may be taken over.
//!
//! - One backup of a volume at a time: `leases/backup-VOLUME.json`. A
//!   second one started at once is refused, naming the first.
//! - No sweep while a backup runs: a backup reuses chunks of earlier
//!   backups without uploading them, and a sweep could take those for
//!   garbage if their manifest was removed meanwhile. Each side creates
//!   its own lease *before* looking for the other's, so of two that start
//!   together at least one sees the other and backs off.
//! - A holder that could not renew within the ttl has lost its lease,
//!   even if no one took it: it stops before committing anything.
//!
//! A backup's lease also carries the chunks it uploaded so far, so that a
//! retry after a crash reuses them without asking the store about each.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::format::ChunkId;
use crate::target::{PutRefused, Target, Version};

/// A lease not renewed for this long has expired: 60 s, or
/// `RVOL_BACKUP_LEASE_SECS` (tests shorten it; a retry after a crash waits
/// this long).
pub fn lease_ttl() -> Duration {
    let secs = std::env::var("RVOL_BACKUP_LEASE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&s: &u64| s >= 3)
        .unwrap_or(60);
    Duration::from_secs(secs)
}

/// How often a holder renews: six times per ttl.
pub fn renew_every() -> Duration {
    lease_ttl() / 6
}

pub const SWEEP_LEASE: &str = "leases/sweep.json";

pub fn backup_lease(volume: &str) -> String {
    format!("leases/backup-{volume}.json")
}

pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub holder: Uuid,
    /// What the holder does, for the error a contender gets.
    pub what: String,
    /// Seconds since the Unix epoch.
    pub started: u64,
    pub renewed: u64,
    pub ttl: u64,
    /// Chunks uploaded so far (a backup's journal).
    #[serde(default)]
    pub uploaded: Vec<ChunkId>,
}

impl LeaseRecord {
    pub fn live(&self) -> bool {
        now() < self.renewed.saturating_add(self.ttl)
    }
}

pub struct Lease {
    target: Arc<Target>,
    key: String,
    record: Mutex<LeaseRecord>,
    version: tokio::sync::Mutex<Version>,
    renewed: Mutex<Instant>,
}

impl Lease {
    /// Takes lease `key` for `what`; fails naming the holder if someone
    /// holds it. Returns the expired record it took over, if any.
    pub async fn acquire(
        target: &Arc<Target>,
        key: &str,
        what: &str,
    ) -> anyhow::Result<(Lease, Option<LeaseRecord>)> {
        let record = LeaseRecord {
            holder: Uuid::new_v4(),
            what: what.to_string(),
            started: now(),
            renewed: now(),
            ttl: lease_ttl().as_secs(),
            uploaded: Vec::new(),
        };
        let body = Bytes::from(serde_json::to_vec(&record)?);
        for _ in 0..3 {
            let (version, previous) = match target.put_if(key, body.clone(), None).await {
                Ok(v) => (v, None),
                Err(PutRefused::Other(e)) => return Err(e),
                Err(PutRefused::Conflict) => {
                    let Some((bytes, version)) = target.get(key).await? else {
                        continue;
                    };
                    // An unreadable lease is no one's.
                    let old: Option<LeaseRecord> = serde_json::from_slice(&bytes).ok();
                    if let Some(old) = old.as_ref().filter(|o| o.live()) {
                        bail!(
                            "{} is busy: {} (started {}s ago, lease {key})",
                            target.url(),
                            old.what,
                            now().saturating_sub(old.started)
                        );
                    }
                    match target.put_if(key, body.clone(), Some(&version)).await {
                        Ok(v) => (v, old),
                        Err(PutRefused::Conflict) => continue,
                        Err(PutRefused::Other(e)) => return Err(e),
                    }
                }
            };
            let lease = Lease {
                target: target.clone(),
                key: key.to_string(),
                record: Mutex::new(record),
                version: tokio::sync::Mutex::new(version),
                renewed: Mutex::new(Instant::now()),
            };
            return Ok((lease, previous));
        }
        bail!("{}: lease {key} keeps changing under us", target.url())
    }

    /// Fails once the lease may have expired without a renewal.
    pub fn check(&self) -> anyhow::Result<()> {
        let since = self
            .renewed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed();
        if since >= lease_ttl() - renew_every() {
            bail!(
                "lost the lease {} on {}: not renewed for {since:?}",
                self.key,
                self.target.url()
            );
        }
        Ok(())
    }

    /// Renews the lease, recording `uploaded` as its journal.
    pub async fn renew(&self, uploaded: Vec<ChunkId>) -> anyhow::Result<()> {
        self.check()?;
        let mut version = self.version.lock().await;
        let body = {
            let mut r = self.record.lock().unwrap_or_else(|e| e.into_inner());
            r.renewed = now();
            r.uploaded = uploaded;
            Bytes::from(serde_json::to_vec(&*r)?)
        };
        let sent = Instant::now();
        match self.target.put_if(&self.key, body, Some(&version)).await {
            Ok(v) => {
                *version = v;
                *self.renewed.lock().unwrap_or_else(|e| e.into_inner()) = sent;
                Ok(())
            }
            Err(PutRefused::Conflict) => bail!(
                "lost the lease {} on {}: someone else took it",
                self.key,
                self.target.url()
            ),
            Err(PutRefused::Other(e)) => Err(e),
        }
    }

    pub async fn release(self) -> anyhow::Result<()> {
        self.target
            .delete(&self.key)
            .await
            .with_context(|| format!("releasing lease {}", self.key))
    }
}

/// The live leases of the target other than `except`, as `(key, record)`.
pub async fn live_leases(
    target: &Target,
    except: &str,
) -> anyhow::Result<Vec<(String, LeaseRecord)>> {
    let mut out = Vec::new();
    for (key, _) in target.list("leases/").await? {
        if key == except {
            continue;
        }
        if let Some((bytes, _)) = target.get(&key).await? {
            if let Ok(r) = serde_json::from_slice::<LeaseRecord>(&bytes) {
                if r.live() {
                    out.push((key, r));
                }
            }
        }
    }
    Ok(out)
}
