//! Which regions of a replica may differ from its peers.
//!
//! After an engine dies, its replicas can disagree about writes that were
//! in flight: applied on one, never sent to another. To make them identical
//! again without copying the whole volume, each replica remembers the
//! regions it modified since the last *barrier flush*, and the next engine
//! copies just the union of those regions from one source to the others.
//!
//! # Epochs
//!
//! The engine tags every modification with its current flush epoch `e`.
//! To flush, it moves on to epoch `F + 1` for new writes, waits until every
//! write tagged `<= F` has been answered by every replica in the set, then
//! sends FLUSH tagged `F`. So when a replica completes flush `F`, every
//! write tagged `<= F` is on every replica still in the set, and the
//! replica forgets its regions tagged `<= F`. What it still remembers
//! covers every write that some replica may lack.
//!
//! FLUSH `F` also names the replicas in the set when its barrier passed
//! (their UUIDs). A replica keeps the names of the newest barrier flush it
//! received: if the engine dies while sending `F`, a replica that `F`
//! never reached is still known to hold every write tagged `<= F`,
//! because a replica that did receive it names it.
//!
//! FLUSH `F` also goes to replicas the engine is bringing in (WO), which
//! may lack writes tagged `<= F`. `F` does not name them, and a replica
//! that is not named takes `F` as a plain flush: it neither completes nor
//! receives barrier `F`, and forgets nothing.
//!
//! # What is kept, and when it is lost
//!
//! The map lives in memory: keeping it costs no I/O on the write path, and
//! an engine crash leaves the replica process, and so the map, alive.
//! A replica that restarts after an unclean stop has lost its map; it
//! reports the map as unknown and the engine does not reconcile it (it
//! needs a rebuild instead). So does a replica whose flush failed: the
//! kernel may have dropped the pages it could not write, so the map no
//! longer says where the replica may differ. A clean shutdown ends with an
//! empty map, which is then known. A map that grows past [`MAX_REGIONS`]
//! between two flushes is dropped and reported unknown, which bounds its
//! memory.

use std::collections::HashMap;

use uuid::Uuid;

use crate::ids::BLOCK_SIZE;

/// Granularity of the map: 64 KiB.
pub const REGION_SIZE: u64 = 16 * BLOCK_SIZE;
/// Largest map kept (64 GiB of distinct dirty regions, about 24 MiB).
pub const MAX_REGIONS: usize = 1 << 20;

#[derive(Debug, Default)]
pub struct DirtyMap {
    /// Region index -> newest epoch that modified it.
    regions: HashMap<u64, u64>,
    known: bool,
    /// Newest epoch seen in any request.
    epoch_seen: u64,
    /// Newest barrier flush received, completed or not. Receiving flush
    /// `F` proves this replica was in the set when `F`'s barrier passed, so
    /// it holds every write tagged `<= F` even if the flush never finished.
    flush_received: u64,
    /// The replicas named by flush `flush_received`.
    flush_members: Vec<Uuid>,
}

impl DirtyMap {
    pub fn new(known: bool) -> Self {
        DirtyMap {
            known,
            ..Default::default()
        }
    }

    pub fn known(&self) -> bool {
        self.known
    }

    pub fn epoch_seen(&self) -> u64 {
        self.epoch_seen
    }

    pub fn flush_received(&self) -> u64 {
        self.flush_received
    }

    pub fn flush_members(&self) -> &[Uuid] {
        &self.flush_members
    }

    /// Barrier flush `epoch`, naming `members` (this replica among them),
    /// arrived (before its sync starts).
    pub fn flush_arrived(&mut self, epoch: u64, members: &[Uuid]) {
        if epoch >= self.flush_received {
            self.flush_received = epoch;
            self.flush_members = members.to_vec();
        }
    }

    /// A flush failed: the kernel may have dropped the dirty pages, so what
    /// this replica holds since its last completed flush is unknown.
    pub fn lose(&mut self) {
        self.regions = HashMap::new();
        self.known = false;
    }

    /// Records a modification of `[offset, offset + len)` in `epoch`.
    pub fn mark(&mut self, offset: u64, len: u64, epoch: u64) {
        self.epoch_seen = self.epoch_seen.max(epoch);
        if !self.known || len == 0 {
            return;
        }
        for r in offset / REGION_SIZE..(offset + len).div_ceil(REGION_SIZE) {
            let e = self.regions.entry(r).or_insert(epoch);
            *e = (*e).max(epoch);
        }
        if self.regions.len() > MAX_REGIONS {
            tracing::warn!("dirty map overflowed between flushes; it is now unknown");
            self.regions = HashMap::new();
            self.known = false;
        }
    }

    /// A barrier flush of `epoch` completed: forget what it covers.
    pub fn flushed(&mut self, epoch: u64) {
        self.epoch_seen = self.epoch_seen.max(epoch);
        self.regions.retain(|_, e| *e > epoch);
    }

    /// Everything is identical again (clean shutdown, reconciliation).
    pub fn clear(&mut self) {
        self.regions.clear();
        self.known = true;
    }

    /// Dirty runs over a volume of `size` bytes: `(bytes, dirty)`, in order.
    pub fn runs(&self, size: u64) -> Vec<(u64, bool)> {
        let mut dirty: Vec<u64> = self.regions.keys().copied().collect();
        dirty.sort_unstable();
        let mut out: Vec<(u64, bool)> = Vec::new();
        let mut push = |n: u64, d: bool| match out.last_mut() {
            Some((m, last)) if *last == d => *m += n,
            _ if n > 0 => out.push((n, d)),
            _ => {}
        };
        let mut at = 0u64;
        for r in dirty {
            let start = (r * REGION_SIZE).min(size);
            let end = (start + REGION_SIZE).min(size);
            push(start - at, false);
            push(end - start, true);
            at = end;
        }
        push(size - at, false);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn barrier_flush_forgets_only_older_epochs() {
        let mut m = DirtyMap::new(true);
        m.mark(0, 4096, 1);
        m.mark(REGION_SIZE * 3, 4096, 2);
        m.mark(REGION_SIZE * 3 + 8192, 4096, 1);
        m.flushed(1);
        let size = REGION_SIZE * 8;
        assert_eq!(
            m.runs(size),
            vec![
                (REGION_SIZE * 3, false),
                (REGION_SIZE, true),
                (REGION_SIZE * 4, false)
            ]
        );
        m.flushed(2);
        assert_eq!(m.runs(size), vec![(size, false)]);
        assert_eq!(m.epoch_seen(), 2);
    }

    #[test]
    fn an_unknown_map_stays_unknown_until_cleared() {
        let mut m = DirtyMap::new(false);
        m.mark(0, 4096, 5);
        assert!(!m.known());
        assert_eq!(m.epoch_seen(), 5);
        m.clear();
        assert!(m.known());
    }
}
