//! Which replicas an engine may serve from when it starts.
//!
//! Every replica reports, on connect, its persisted revision counter (the
//! number of modifications it had applied at its last flush), whether it
//! was shut down cleanly, and whether a rebuild of it was interrupted.
//!
//! # Rules
//!
//! 1. A replica that is being rebuilt, belongs to another volume or has
//!    another size is never a source.
//! 2. The best revision `R` is the highest persisted revision among the
//!    rest. Anything acknowledged by a flush was persisted with a revision
//!    at least as high on every replica that acknowledged the flush, so a
//!    replica below `R` may miss flushed data: it is stale (ERR).
//! 3. Among replicas at `R`, the clean ones hold exactly `R` modifications,
//!    all durable, and, having received the same writes in the same order
//!    (range locks serialize overlapping writes), hold the same data: they
//!    are all fresh (RW).
//! 4. If no replica at `R` is clean, the last engine died. Replicas at `R`
//!    agree on everything up to the last flush but may differ in writes
//!    after it (applied on one, not yet on another). One of them is picked
//!    as the only RW source, so every read sees one consistent history; the
//!    others are ERR until they are reconciled with it. Writes that were
//!    never flushed may be lost, which flush semantics allow.

use serde::Serialize;

/// What the engine learned from one replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub revision: u64,
    pub clean: bool,
    pub rebuilding: bool,
}

/// The verdict for one replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Verdict {
    Fresh,
    Stale(String),
}

/// Applies the rules to the candidates, in order.
pub fn choose(candidates: &[Candidate]) -> Vec<Verdict> {
    let usable = |c: &Candidate| !c.rebuilding;
    let Some(best) = candidates
        .iter()
        .filter(|c| usable(c))
        .map(|c| c.revision)
        .max()
    else {
        return candidates
            .iter()
            .map(|_| Verdict::Stale("interrupted rebuild: not a source".into()))
            .collect();
    };
    let any_clean_at_best = candidates
        .iter()
        .any(|c| usable(c) && c.revision == best && c.clean);
    let mut picked_unclean = false;
    candidates
        .iter()
        .map(|c| {
            if c.rebuilding {
                Verdict::Stale("interrupted rebuild: not a source".into())
            } else if c.revision < best {
                Verdict::Stale(format!("stale: revision {} < {best}", c.revision))
            } else if any_clean_at_best {
                if c.clean {
                    Verdict::Fresh
                } else {
                    Verdict::Stale("unclean, while a clean replica has the same revision".into())
                }
            } else if !picked_unclean {
                picked_unclean = true;
                Verdict::Fresh
            } else {
                Verdict::Stale(
                    "unclean shutdown: may differ from the chosen source after the last flush"
                        .into(),
                )
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(revision: u64, clean: bool) -> Candidate {
        Candidate {
            revision,
            clean,
            rebuilding: false,
        }
    }

    #[test]
    fn clean_replicas_at_the_best_revision_are_all_fresh() {
        let v = choose(&[c(10, true), c(10, true), c(7, true)]);
        assert_eq!(v[0], Verdict::Fresh);
        assert_eq!(v[1], Verdict::Fresh);
        assert!(matches!(v[2], Verdict::Stale(_)));
    }

    #[test]
    fn after_an_engine_crash_exactly_one_source_is_picked() {
        let v = choose(&[c(10, false), c(10, false), c(10, false)]);
        assert_eq!(v.iter().filter(|v| **v == Verdict::Fresh).count(), 1);
    }

    #[test]
    fn a_replica_that_stopped_cleanly_earlier_loses_to_a_newer_flush() {
        // r0 was dropped and shut down cleanly at 5; r1 went on and flushed at 9.
        let v = choose(&[c(5, true), c(9, false)]);
        assert!(matches!(v[0], Verdict::Stale(_)));
        assert_eq!(v[1], Verdict::Fresh);
    }

    #[test]
    fn rebuilding_replicas_are_never_sources() {
        let r = Candidate {
            revision: 100,
            clean: true,
            rebuilding: true,
        };
        let v = choose(&[r, c(3, true)]);
        assert!(matches!(v[0], Verdict::Stale(_)));
        assert_eq!(v[1], Verdict::Fresh);
        assert!(choose(&[r]).iter().all(|v| matches!(v, Verdict::Stale(_))));
    }
}
