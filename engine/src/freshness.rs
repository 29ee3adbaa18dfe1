//! Which replicas an engine may serve from when it starts.
//!
//! Every replica reports, on connect, the newest *barrier flush epoch* it
//! completed (persisted with the flush), whether the last engine shut it
//! down cleanly, whether it still knows the regions it modified since that
//! flush (its dirty map, see `rvol_replica::dirty`), and whether a rebuild
//! of it was interrupted. The generation does not enter the choice: every
//! engine raises it on all replicas it takes over, so it tells who may
//! write, not who has the data.
//!
//! # Rules
//!
//! 1. A replica being rebuilt is never a source.
//! 2. `E` is the newest flush epoch among the rest. A barrier flush `E` is
//!    sent only after every earlier write was answered by every replica in
//!    the set, so a replica that completed `E` holds all writes up to `E`
//!    (a replica being brought in also receives `E`, but `E` does not name
//!    it, and a replica takes only a flush that names it as barrier `E`).
//!    A replica that did not complete `E` may miss acknowledged and flushed
//!    data: it is stale (ERR) and needs a rebuild, unless it *received*
//!    flush `E` and still knows its dirty map. Then it was in the set when
//!    `E`'s barrier passed, so it holds every write up to `E` too. Either
//!    the last engine died while `E` was under way, or it dropped the
//!    replica after sending `E`; any write the replica missed after that is
//!    tagged above `E`, so it is in the maps of the replicas that have it.
//!    Such a replica is never a source and is reconciled as in rule 4.
//!    The same holds for a replica that a flush at or above `E` *named*
//!    as in the set (as reported by any replica that received that flush):
//!    the last engine died after sending `E` to some replicas and before
//!    sending it to this one. (A flush that failed makes the map unknown:
//!    the kernel may have dropped the pages it could not write.)
//! 3. If every replica at `E` is clean, they hold the same data (the last
//!    engine's final barrier flush came after its last write): all fresh.
//! 4. Otherwise the last engine died, or a replica was dropped after `E`.
//!    Replicas at `E` agree on every block outside the union of their dirty
//!    maps. One is chosen as the source (a clean one if any, else one that
//!    knows its dirty map); every other replica at `E` that knows its dirty
//!    map (a clean one knows it is empty) is reconciled: the union of the
//!    dirty regions is copied to it from the source. A replica that
//!    restarted uncleanly has lost its map and is stale. If the source
//!    itself does not know its map, nothing can be reconciled from it and
//!    it serves alone. Writes never flushed may be lost, as flush semantics
//!    allow; nothing a flush acknowledged is.
//!
//! The revision counter is reported and kept, but is not used here: it
//! counts applied writes, and two replicas can apply the same number of
//! different concurrent writes.

use serde::Serialize;
use uuid::Uuid;

/// What the engine learned from one replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub identity: Uuid,
    pub flush_epoch: u64,
    /// Newest barrier flush received by the replica's running process.
    pub flush_received: u64,
    /// The replicas that flush named as in the set.
    pub flush_members: Vec<Uuid>,
    pub clean: bool,
    pub dirty_known: bool,
    pub rebuilding: bool,
}

/// The verdict for one replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Verdict {
    /// Serve from it as it is.
    Fresh,
    /// Serve from it after copying the dirty regions from the source
    /// (the one [`Verdict::Fresh`] replica).
    Reconcile,
    Stale(String),
}

/// Applies the rules to the candidates, in order.
pub fn choose(candidates: &[Candidate]) -> Vec<Verdict> {
    let Some(newest) = candidates
        .iter()
        .filter(|c| !c.rebuilding)
        .map(|c| c.flush_epoch)
        .max()
    else {
        return candidates
            .iter()
            .map(|_| Verdict::Stale("interrupted rebuild: not a source".into()))
            .collect();
    };
    let at_newest = |c: &Candidate| !c.rebuilding && c.flush_epoch == newest;
    let all_clean = candidates.iter().filter(|c| at_newest(c)).all(|c| c.clean);
    let source = candidates
        .iter()
        .position(|c| at_newest(c) && c.clean)
        .or_else(|| {
            candidates
                .iter()
                .position(|c| at_newest(c) && c.dirty_known)
        })
        .or_else(|| candidates.iter().position(at_newest));
    let source_knows = source.is_some_and(|s| candidates[s].clean || candidates[s].dirty_known);
    let named_at_newest = |c: &Candidate| {
        candidates
            .iter()
            .any(|o| o.flush_received >= newest && o.flush_members.contains(&c.identity))
    };
    candidates
        .iter()
        .enumerate()
        .map(|(i, c)| {
            if c.rebuilding {
                Verdict::Stale("interrupted rebuild: not a source".into())
            } else if c.flush_epoch < newest {
                if (c.flush_received >= newest || named_at_newest(c))
                    && c.dirty_known
                    && source_knows
                {
                    Verdict::Reconcile
                } else {
                    Verdict::Stale(format!(
                        "stale: missed flush epoch {newest} (completed {})",
                        c.flush_epoch
                    ))
                }
            } else if all_clean || Some(i) == source {
                Verdict::Fresh
            } else if !source_knows {
                Verdict::Stale(
                    "the source restarted uncleanly; no dirty map to reconcile from".into(),
                )
            } else if c.clean || c.dirty_known {
                Verdict::Reconcile
            } else {
                Verdict::Stale("restarted uncleanly: its dirty map is lost, needs a rebuild".into())
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(flush_epoch: u64, clean: bool, dirty_known: bool) -> Candidate {
        Candidate {
            identity: Uuid::new_v4(),
            flush_epoch,
            flush_received: flush_epoch,
            flush_members: Vec::new(),
            clean,
            dirty_known,
            rebuilding: false,
        }
    }

    #[test]
    fn clean_replicas_at_the_newest_epoch_are_all_fresh() {
        let v = choose(&[c(10, true, true), c(10, true, true), c(7, true, true)]);
        assert_eq!(v[..2], [Verdict::Fresh, Verdict::Fresh]);
        assert!(matches!(v[2], Verdict::Stale(_)));
    }

    #[test]
    fn after_an_engine_crash_one_source_and_the_rest_reconciled() {
        let v = choose(&[c(10, false, true), c(10, false, true), c(10, false, true)]);
        assert_eq!(v, [Verdict::Fresh, Verdict::Reconcile, Verdict::Reconcile]);
    }

    #[test]
    fn a_clean_replica_is_the_preferred_source() {
        let v = choose(&[c(4, false, true), c(4, true, true)]);
        assert_eq!(v, [Verdict::Reconcile, Verdict::Fresh]);
    }

    #[test]
    fn replicas_that_lost_their_dirty_map_are_not_reconciled() {
        let v = choose(&[c(4, false, true), c(4, false, false)]);
        assert_eq!(v[0], Verdict::Fresh);
        assert!(matches!(v[1], Verdict::Stale(_)));
        // Nobody knows: one serves alone.
        let v = choose(&[c(4, false, false), c(4, false, false)]);
        assert_eq!(v[0], Verdict::Fresh);
        assert!(matches!(v[1], Verdict::Stale(_)));
    }

    #[test]
    fn a_replica_that_missed_the_newest_flush_is_stale_even_if_clean() {
        // r0 was dropped and shut down cleanly at 5; r1 went on and flushed at 9.
        let v = choose(&[c(5, true, true), c(9, false, true)]);
        assert!(matches!(v[0], Verdict::Stale(_)));
        assert_eq!(v[1], Verdict::Fresh);
    }

    #[test]
    fn a_replica_that_received_the_newest_flush_but_had_not_finished_it_is_reconciled() {
        // The engine died while flush 9 was under way: r0 had received it
        // and was still syncing; r1 and r2 had completed it.
        let mid_flush = Candidate {
            flush_received: 9,
            ..c(8, false, true)
        };
        let v = choose(&[mid_flush.clone(), c(9, false, true), c(9, true, true)]);
        assert_eq!(v, [Verdict::Reconcile, Verdict::Reconcile, Verdict::Fresh]);
        // Received it but lost its map (it restarted): stale.
        let lost_map = Candidate {
            dirty_known: false,
            ..mid_flush.clone()
        };
        assert!(matches!(
            choose(&[lost_map, c(9, false, true)])[0],
            Verdict::Stale(_)
        ));
        // Never received it (dropped before the barrier): stale.
        assert!(matches!(
            choose(&[c(8, false, true), c(9, false, true)])[0],
            Verdict::Stale(_)
        ));
        // Behind even a clean set, it is still copied to, never trusted.
        assert_eq!(
            choose(&[mid_flush, c(9, true, true)])[0],
            Verdict::Reconcile
        );
    }

    #[test]
    fn a_replica_named_by_the_newest_flush_is_reconciled_though_it_never_received_it() {
        // The engine died after sending flush 9 to r1 and r2, before r0:
        // r1's flush names r0 as in the set when its barrier passed.
        let r0 = c(8, false, true);
        let named = |by: Candidate, who: &[&Candidate]| Candidate {
            flush_members: who.iter().map(|c| c.identity).collect(),
            ..by
        };
        let r1 = named(c(9, false, true), &[&r0]);
        let v = choose(&[r0.clone(), r1.clone(), c(9, false, true)]);
        assert_eq!(v, [Verdict::Reconcile, Verdict::Fresh, Verdict::Reconcile]);
        // Not named (dropped before the barrier): stale.
        let r1_without = named(c(9, false, true), &[]);
        assert!(matches!(
            choose(&[r0.clone(), r1_without])[0],
            Verdict::Stale(_)
        ));
        // Named, but it lost its map (restarted since): stale.
        let lost = Candidate {
            dirty_known: false,
            ..r0.clone()
        };
        let r1_naming_lost = named(c(9, false, true), &[&lost]);
        assert!(matches!(
            choose(&[lost, r1_naming_lost])[0],
            Verdict::Stale(_)
        ));
        // Named by an older flush than the newest: stale.
        let old = Candidate {
            flush_received: 8,
            ..named(c(8, false, true), &[&r0])
        };
        assert!(matches!(
            choose(&[r0, old, c(9, false, true)])[0],
            Verdict::Stale(_)
        ));
    }

    #[test]
    fn rebuilding_replicas_are_never_sources() {
        let r = Candidate {
            identity: Uuid::new_v4(),
            flush_members: Vec::new(),
            flush_epoch: 100,
            flush_received: 100,
            clean: true,
            dirty_known: true,
            rebuilding: true,
        };
        let v = choose(&[r.clone(), c(3, true, true)]);
        assert!(matches!(v[0], Verdict::Stale(_)));
        assert_eq!(v[1], Verdict::Fresh);
        assert!(choose(&[r]).iter().all(|v| matches!(v, Verdict::Stale(_))));
    }
}
