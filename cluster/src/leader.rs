//! Leadership among several controllers, through a leased key.
//!
//! A candidate holds a lease and creates the leader key under it, but only
//! if the key is absent ([`Expect::Absent`]): of any number of candidates
//! exactly one succeeds. The others watch the key and try again when it is
//! deleted, which happens when the leader resigns (revoking its lease) or
//! stops renewing it (dies, or is cut off from the store) for one lease
//! time to live.
//!
//! **A leader that is cut off steps down before anyone replaces it.** The
//! store expires the lease no earlier than `ttl` after the last renewal it
//! received; the leader counts from when it *sent* its last successful
//! renewal, which is earlier, and declares itself lost at `ttl - margin`
//! (its [`Leadership::lost`] resolves). So it stops acting before the lease
//! can expire and a successor be elected, as long as clocks run at
//! roughly the same rate (no wall clock is compared). Even so, leadership
//! only decides who *tries*: every record a controller changes is written
//! with a revision check, so two leaders for a moment could not both win.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::watch;

use crate::store::{Change, Expect, LeaseId, Result, Revision, Store, StoreError};

/// One of several processes that may lead.
pub struct Candidate<S> {
    store: Arc<S>,
    key: String,
    id: String,
    ttl: Duration,
}

/// Held while leading; see the module docs.
pub struct Leadership {
    lease: LeaseId,
    lost: watch::Receiver<bool>,
    renewer: tokio::task::JoinHandle<()>,
}

impl<S: Store> Candidate<S> {
    /// `id` names this candidate in the leader key's value; `ttl` is how
    /// long a silent leader keeps leading (at least 3 s).
    pub fn new(store: Arc<S>, key: &str, id: &str, ttl: Duration) -> Candidate<S> {
        Candidate {
            store,
            key: key.to_string(),
            id: id.to_string(),
            ttl: ttl.max(Duration::from_secs(3)),
        }
    }

    /// Who leads now, if anyone.
    pub async fn leader(&self) -> Result<Option<String>> {
        Ok(self
            .store
            .get(&self.key)
            .await?
            .map(|v| String::from_utf8_lossy(&v.value).into_owned()))
    }

    /// Returns once this candidate leads.
    pub async fn campaign(&self) -> Result<Leadership> {
        loop {
            let lease = self.store.grant_lease(self.ttl).await?;
            let granted = Instant::now();
            match self
                .store
                .put(
                    &self.key,
                    self.id.clone().into_bytes(),
                    Expect::Absent,
                    Some(lease),
                )
                .await
            {
                Ok(_) => return Ok(self.lead(lease, granted)),
                Err(StoreError::Conflict { current, .. }) => {
                    let _ = self.store.revoke(lease).await;
                    let after = current.unwrap_or_default();
                    self.wait_for_vacancy(after).await?;
                }
                Err(e) => {
                    let _ = self.store.revoke(lease).await;
                    return Err(e);
                }
            }
        }
    }

    /// Waits until the leader key, last written at `after`, is deleted.
    async fn wait_for_vacancy(&self, after: Revision) -> Result<()> {
        // A deletion between the failed put and this watch is after `after`
        // too, so it is not missed.
        let mut changes = self.store.watch(&self.key, after).await?;
        while let Some(change) = changes.next().await {
            if let Change::Delete { key, .. } = change? {
                if key == self.key {
                    return Ok(());
                }
            }
        }
        Err(StoreError::Unavailable(
            "the watch on the leader key ended".into(),
        ))
    }

    fn lead(&self, lease: LeaseId, granted: Instant) -> Leadership {
        let (tx, lost) = watch::channel(false);
        let (store, ttl) = (self.store.clone(), self.ttl);
        let margin = ttl / 3;
        let renewer = tokio::spawn(async move {
            // Counted from when the last successful renewal was sent.
            let mut renewed = granted;
            loop {
                let deadline = renewed + ttl - margin;
                let sent = Instant::now();
                if sent >= deadline {
                    break;
                }
                let left = deadline - sent;
                match tokio::time::timeout(left, store.keep_alive(lease)).await {
                    Ok(Ok(_)) => renewed = sent,
                    Ok(Err(StoreError::LeaseExpired(_))) => break,
                    Ok(Err(e)) => tracing::warn!(error = %e, "renewing leadership failed"),
                    Err(_) => break,
                }
                tokio::time::sleep(ttl / 6).await;
            }
            tracing::warn!("leadership lost: the lease could not be renewed in time");
            let _ = tx.send(true);
        });
        Leadership {
            lease,
            lost,
            renewer,
        }
    }
}

impl Leadership {
    /// Resolves when this process must stop acting as the leader.
    pub async fn lost(&mut self) {
        let _ = self.lost.wait_for(|l| *l).await;
    }

    /// Steps down at once: the next candidate leads without waiting out
    /// the lease.
    pub async fn resign<S: Store>(self, store: &S) -> Result<()> {
        self.renewer.abort();
        store.revoke(self.lease).await
    }
}

/// Dropped without [`Leadership::resign`], a leader falls silent: the
/// others take over once its lease expires, as after a crash.
impl Drop for Leadership {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}
