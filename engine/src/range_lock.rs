//! Block-range locks: writes that overlap run one after the other.
//!
//! Every modifying request holds the lock on the blocks it touches from
//! before its read-modify-write read until every replica has answered. That
//! gives two guarantees: a sub-block write never merges into a block
//! another write is changing (the Longhorn sub-4 KiB corruption), and two
//! overlapping writes reach all replicas in the same order, so replicas
//! never disagree about which one won. Non-overlapping requests do not wait
//! for each other.

use std::sync::Mutex;

use tokio::sync::Notify;

#[derive(Default)]
pub struct RangeLocks {
    held: Mutex<Vec<(u64, u64, u64)>>,
    next_id: Mutex<u64>,
    released: Notify,
    /// Whole-volume lockers waiting: new range locks queue behind them so
    /// a steady stream of writes cannot starve a snapshot cut.
    exclusive_waiting: std::sync::atomic::AtomicUsize,
}

/// Held range `[start, end)` of blocks; released on drop.
pub struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    id: u64,
}

impl RangeLocks {
    /// Waits until no held range overlaps blocks `[start, end)`, then holds it.
    pub async fn lock(&self, start: u64, end: u64) -> RangeGuard<'_> {
        let id = {
            let mut n = self.next_id.lock().unwrap_or_else(|e| e.into_inner());
            *n += 1;
            *n
        };
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            {
                let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
                let whole = start == 0 && end == u64::MAX;
                let yielding = !whole
                    && self
                        .exclusive_waiting
                        .load(std::sync::atomic::Ordering::Acquire)
                        > 0;
                if !yielding && !held.iter().any(|&(s, e, _)| s < end && start < e) {
                    held.push((start, end, id));
                    return RangeGuard { locks: self, id };
                }
            }
            released.await;
        }
    }
}

impl RangeLocks {
    /// Holds every block: waits for all modifications in flight and keeps
    /// new ones out until dropped.
    pub async fn lock_all(&self) -> RangeGuard<'_> {
        use std::sync::atomic::Ordering;
        self.exclusive_waiting.fetch_add(1, Ordering::AcqRel);
        let g = self.lock(0, u64::MAX).await;
        self.exclusive_waiting.fetch_sub(1, Ordering::AcqRel);
        g
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.locks.held.lock().unwrap_or_else(|e| e.into_inner());
        held.retain(|&(_, _, id)| id != self.id);
        drop(held);
        self.locks.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn overlapping_ranges_wait_disjoint_do_not() {
        let locks = Arc::new(RangeLocks::default());
        let g = locks.lock(0, 10).await;
        // Disjoint: immediate.
        let _d = tokio::time::timeout(Duration::from_millis(100), locks.lock(10, 20))
            .await
            .unwrap();
        // Overlapping: waits until the first is dropped.
        let l2 = locks.clone();
        let waiter = tokio::spawn(async move {
            let _g = l2.lock(5, 6).await;
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        drop(g);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
    }
}
