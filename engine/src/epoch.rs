//! Flush epochs: the engine's half of dirty-region tracking.
//!
//! Every modification is sent tagged with the current epoch and holds a
//! [`Ticket`] until every replica has answered it. A flush is a barrier:
//! [`EpochGate::barrier`] moves new modifications on to the next epoch,
//! waits until no ticket of the closed epochs is left, and returns the
//! closed epoch `F`; the flush sent to replicas carries `F`. When a replica
//! completes it, every write tagged `<= F` is on every replica in the set,
//! so the replica may forget those regions (`rvol_replica::dirty`). New
//! writes are never held up by a barrier; only the flush waits.

use std::collections::BTreeMap;
use std::sync::Mutex;

use tokio::sync::Notify;

pub struct EpochGate {
    /// Current epoch and the modifications in flight per epoch.
    state: Mutex<(u64, BTreeMap<u64, usize>)>,
    drained: Notify,
}

/// One modification in flight in `epoch`.
pub struct Ticket<'a> {
    gate: &'a EpochGate,
    pub epoch: u64,
}

impl EpochGate {
    pub fn new(start: u64) -> Self {
        EpochGate {
            state: Mutex::new((start.max(1), BTreeMap::new())),
            drained: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, BTreeMap<u64, usize>)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn enter(&self) -> Ticket<'_> {
        let mut s = self.lock();
        let epoch = s.0;
        *s.1.entry(epoch).or_insert(0) += 1;
        Ticket { gate: self, epoch }
    }

    /// Closes the current epoch and waits until its modifications (and
    /// those of every older epoch) are done; returns the closed epoch.
    pub async fn barrier(&self) -> u64 {
        let closed = {
            let mut s = self.lock();
            s.0 += 1;
            s.0 - 1
        };
        loop {
            let drained = self.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            if self.lock().1.range(..=closed).next().is_none() {
                return closed;
            }
            drained.await;
        }
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let mut s = self.gate.lock();
        if let Some(n) = s.1.get_mut(&self.epoch) {
            *n -= 1;
            if *n == 0 {
                s.1.remove(&self.epoch);
            }
        }
        drop(s);
        self.gate.drained.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn barrier_waits_for_older_tickets_only() {
        let gate = Arc::new(EpochGate::new(5));
        let old = gate.enter();
        assert_eq!(old.epoch, 5);
        let g = gate.clone();
        let flush = tokio::spawn(async move { g.barrier().await });
        tokio::time::sleep(Duration::from_millis(30)).await;
        // New writes land in the next epoch and do not block the barrier.
        let new = gate.enter();
        assert_eq!(new.epoch, 6);
        assert!(!flush.is_finished());
        drop(old);
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(1), flush)
                .await
                .unwrap()
                .unwrap(),
            5
        );
        drop(new);
    }
}
