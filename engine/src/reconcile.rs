//! Crash reconciliation: making replicas identical again after an unclean
//! stop, by copying only the regions that may differ.
//!
//! The regions are the union of the replicas' dirty maps (see
//! `rvol_replica::dirty` for why that union covers every difference). They
//! are read from the source and written to every target, then a barrier
//! flush in the same epoch makes the copies durable and empties every
//! map. No frontend is serving yet, so nothing races the copy.
//!
//! Every call is bounded (the replica timeout; the flush timeout for the
//! barrier): a target that stops answering fails alone and is left out
//! as stale, and a source that does fails the start, instead of the
//! engine hanging in its start while the volume is down (the chaos soak
//! met one waiting on a replica behind a link dropping its packets).

use std::future::Future;
use std::time::Duration;

use rvol_replica::client::{ClientError, ReplicaClient};
use rvol_replica::proto::{Sealed, MAX_PAYLOAD};
use uuid::Uuid;

/// How long a reconciliation waits for one answer: `call` for reads,
/// writes and maps, `flush` for the barrier.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub call: Duration,
    pub flush: Duration,
}

async fn within<T>(
    limit: Duration,
    f: impl Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or_else(|_| Err(ClientError::Lost(format!("no answer within {limit:?}"))))
}

/// Byte ranges `(offset, len)` dirty on any of the maps, merged.
pub fn union(maps: &[Vec<(u64, bool)>]) -> Vec<(u64, u64)> {
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for runs in maps {
        let mut at = 0;
        for &(len, dirty) in runs {
            if dirty {
                ranges.push((at, at + len));
            }
            at += len;
        }
    }
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (s, e) in ranges {
        match merged.last_mut() {
            Some((_, end)) if s <= *end => *end = (*end).max(e),
            _ => merged.push((s, e)),
        }
    }
    merged.into_iter().map(|(s, e)| (s, e - s)).collect()
}

/// A replica taking part in a reconciliation: its client and identity.
pub type Member<'a> = (&'a ReplicaClient, Uuid);

/// Copies the union of dirty regions from `source` to `targets` in flush
/// epoch `epoch`, then barrier-flushes everyone, naming the source and the
/// targets the copy reached. Returns the bytes copied to each target, or
/// why that target failed; an error of the source fails the whole
/// reconciliation.
pub async fn reconcile(
    source: Member<'_>,
    targets: &[Member<'_>],
    epoch: u64,
    limits: Limits,
) -> Result<Vec<Result<u64, ClientError>>, ClientError> {
    let call = limits.call;
    let mut maps = vec![within(call, source.0.dirty_runs()).await?];
    let mut results: Vec<Result<u64, ClientError>> = Vec::with_capacity(targets.len());
    for (t, _) in targets {
        match within(call, t.dirty_runs()).await {
            Ok(m) => {
                maps.push(m);
                results.push(Ok(0));
            }
            Err(e) => results.push(Err(e)),
        }
    }
    const PIECE: u64 = 1 << 20;
    debug_assert!(PIECE <= MAX_PAYLOAD as u64);
    for (offset, len) in union(&maps) {
        let mut at = offset;
        while at < offset + len {
            let n = PIECE.min(offset + len - at);
            // As read, so as written: the blocks, then in an encrypted
            // volume their nonces and tags (copied sealed, never opened).
            let payload = within(call, source.0.read(at, n)).await?;
            let tail = payload.len() - n as usize;
            let data = Sealed::blocks_then(payload, tail);
            for ((t, _), r) in targets.iter().zip(results.iter_mut()) {
                if let Ok(copied) = r {
                    match within(call, t.write(at, data.clone(), false, epoch)).await {
                        Ok(()) => *copied += n,
                        Err(e) => *r = Err(e),
                    }
                }
            }
            at += n;
        }
    }
    // Only these now hold every write tagged <= epoch.
    let members: Vec<Uuid> = std::iter::once(source.1)
        .chain(
            targets
                .iter()
                .zip(&results)
                .filter(|(_, r)| r.is_ok())
                .map(|((_, id), _)| *id),
        )
        .collect();
    within(limits.flush, source.0.flush_barrier(epoch, &members)).await?;
    for ((t, _), r) in targets.iter().zip(results.iter_mut()) {
        if r.is_ok() {
            if let Err(e) = within(limits.flush, t.flush_barrier(epoch, &members)).await {
                *r = Err(e);
            }
        }
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::union;

    #[test]
    fn union_merges_overlapping_and_adjacent_ranges() {
        let a = vec![(10, false), (5, true), (20, false), (5, true)];
        let b = vec![(12, false), (8, true), (30, false)];
        assert_eq!(union(&[a, b]), vec![(10, 10), (35, 5)]);
        assert_eq!(union(&[vec![(100, false)]]), vec![]);
    }
}
