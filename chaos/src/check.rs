//! The history checker: does every value a client or a snapshot saw come
//! from a write the volume's promises allow?
//!
//! The promises, per block (writes to a block come from one client, one
//! at a time, so a block's writes are ordered by when they were sent):
//!
//! - A write is **guaranteed** from time `t` to readers served by engine
//!   `e` when it was acknowledged before `t` by `e` itself, or when it was
//!   durable before `t`: acknowledged with FUA, or acknowledged before a
//!   flush was sent to the same engine and that flush was acknowledged
//!   (the export is multi-conn: a flush covers every connection).
//!   Acknowledged writes that were never flushed may be lost when their
//!   engine dies; flushed ones never are, by any engine after.
//! - A read answered by engine `e` over `[s, t]` may return the newest
//!   write guaranteed at `s` or any write of the block sent after it and
//!   before `t`, or a write whose answer never came (its engine died or
//!   the connection broke) that may still have landed after the
//!   guaranteed one was sent. Nothing older, nothing sent after `t`, and
//!   nothing no write made (torn or foreign blocks, garbage).
//! - Reads are monotonic under one engine: once a read answered by `e`
//!   returned a write, later reads by `e` return it or a newer one (a
//!   stale replica read after a fresh one is caught here even when no
//!   write was acknowledged in between).
//! - A snapshot taken over `[s, t]` holds, per block, what a read over
//!   `[s, t]` by its engine could have returned.
//!
//! Failed writes (the server answered with an error) may or may not have
//! landed, like unanswered ones, but only until their answer.
//!
//! A trim leaves its blocks unspecified until they are written again
//! (NBD_CMD_TRIM): zeroes or what they held. So it never becomes the
//! guaranteed write; reads after it may return zeroes or what they could
//! return before it.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use crate::history::{Epoch, Instance, Kind, Nanos, Op, Outcome, Snapshot, Value};

#[derive(Debug, Clone)]
pub struct Violation {
    pub at: Nanos,
    pub what: String,
}

#[derive(Debug, Default)]
pub struct Report {
    pub block_reads: u64,
    pub snapshot_blocks: u64,
    pub violations: Vec<Violation>,
}

/// One write of a block; index 0 of every block is the initial zeroes.
struct Entry {
    start: Nanos,
    end: Nanos,
    /// The latest it may still land.
    effect_end: Nanos,
    value: Option<u64>,
    trim: bool,
    acked: bool,
    epoch: Epoch,
    durable_at: Nanos,
    op: Option<usize>,
}

const NEVER: Nanos = Nanos::MAX;

impl Entry {
    fn guaranteed(&self, at: Nanos, epoch: Epoch) -> bool {
        self.op.is_none()
            || (!self.trim
                && self.acked
                && (self.durable_at < at || (self.epoch == epoch && self.end < at)))
    }
}

/// A value seen over `[start, end]` by engine `epoch`: a read's block or
/// a snapshot's.
struct Seen<'a> {
    start: Nanos,
    end: Nanos,
    epoch: Epoch,
    value: &'a Value,
    /// A read's (later reads of its engine must not go back); a
    /// snapshot's view does not bind reads.
    binds: bool,
    what: String,
}

pub fn check(ops: &[Op], instances: &[Instance], snapshots: &[Snapshot]) -> Report {
    let ended: HashMap<Epoch, Nanos> = instances
        .iter()
        .map(|i| (i.epoch, i.ended.unwrap_or(NEVER)))
        .collect();
    let durable = durability(ops);
    let mut blocks: HashMap<u64, Vec<Entry>> = HashMap::new();
    let mut order: Vec<usize> = (0..ops.len()).collect();
    order.sort_by_key(|&i| ops[i].start);
    for &i in &order {
        let op = &ops[i];
        let Kind::Write {
            id,
            fua,
            zero,
            trim,
        } = op.kind
        else {
            continue;
        };
        let acked = op.outcome == Outcome::Ok;
        let entry = || Entry {
            start: op.start,
            end: op.end,
            effect_end: match op.outcome {
                Outcome::Unknown => ended.get(&op.epoch).copied().unwrap_or(NEVER),
                _ => op.end,
            },
            value: (!zero).then_some(id),
            trim,
            acked,
            epoch: op.epoch,
            durable_at: match (acked, fua) {
                (false, _) => NEVER,
                (true, true) => op.end,
                (true, false) => durable.at(op.epoch, op.end),
            },
            op: Some(i),
        };
        for b in op.block..op.block + op.blocks {
            blocks
                .entry(b)
                .or_insert_with(|| vec![initial()])
                .push(entry());
        }
    }

    let mut seen: HashMap<u64, Vec<Seen>> = HashMap::new();
    for &i in &order {
        let op = &ops[i];
        if let (Kind::Read { values }, Outcome::Ok) = (&op.kind, op.outcome) {
            for (k, v) in values.iter().enumerate() {
                seen.entry(op.block + k as u64).or_default().push(Seen {
                    start: op.start,
                    end: op.end,
                    epoch: op.epoch,
                    value: v,
                    binds: true,
                    what: format!(
                        "read by client {} (engine {}) over {} of block {}",
                        op.client,
                        op.epoch,
                        span(op.start, op.end),
                        op.block + k as u64
                    ),
                });
            }
        }
    }
    let mut report = Report::default();
    for s in snapshots {
        let Some(view) = &s.view else { continue };
        for (b, v) in view.iter().enumerate() {
            report.snapshot_blocks += 1;
            seen.entry(b as u64).or_default().push(Seen {
                start: s.start,
                end: s.end,
                epoch: s.epoch,
                value: v,
                binds: false,
                what: format!(
                    "snapshot {} (engine {}) taken over {} at block {b}",
                    s.name,
                    s.epoch,
                    span(s.start, s.end)
                ),
            });
        }
    }

    let empty = vec![initial()];
    for (b, mut list) in seen {
        list.sort_by_key(|s| s.start);
        let entries = blocks.get(&b).unwrap_or(&empty);
        let unknown: Vec<usize> = (0..entries.len())
            .filter(|&i| entries[i].effect_end > entries[i].end)
            .collect();
        // Reads answered so far, by when they were answered, and the
        // newest write each engine's reads have returned.
        let mut answered: BinaryHeap<Reverse<(Nanos, Epoch, usize)>> = BinaryHeap::new();
        let mut newest_read: HashMap<Epoch, usize> = HashMap::new();
        for s in list {
            while let Some(Reverse((end, epoch, idx))) = answered.peek().copied() {
                if end >= s.start {
                    break;
                }
                answered.pop();
                let n = newest_read.entry(epoch).or_insert(0);
                *n = (*n).max(idx);
            }
            if s.binds {
                report.block_reads += 1;
            }
            let top = entries.partition_point(|e| e.start < s.end);
            let mut low = (0..top)
                .rev()
                .find(|&i| entries[i].guaranteed(s.start, s.epoch))
                .unwrap_or(0);
            let from_read = newest_read.get(&s.epoch).copied().unwrap_or(0);
            let by_read = from_read > low;
            low = low.max(from_read.min(top.saturating_sub(1)));
            let candidate = |i: usize| {
                (low..top).contains(&i)
                    || (i < low
                        && unknown.contains(&i)
                        && entries[i].effect_end > entries[low].start)
            };
            let matched = match s.value {
                Value::Zero => (0..top).find(|&i| candidate(i) && entries[i].value.is_none()),
                Value::Write(id) => {
                    (0..top).find(|&i| candidate(i) && entries[i].value == Some(*id))
                }
                Value::Bad(_) => None,
            };
            match matched {
                Some(i) => {
                    if s.binds {
                        answered.push(Reverse((s.end, s.epoch, i)));
                    }
                }
                None => report.violations.push(Violation {
                    at: s.start,
                    what: explain(&s, entries, low, top, by_read, ops),
                }),
            }
        }
    }
    report.violations.sort_by_key(|v| v.at);
    report
}

fn initial() -> Entry {
    Entry {
        start: 0,
        end: 0,
        effect_end: 0,
        value: None,
        trim: false,
        acked: true,
        epoch: 0,
        durable_at: 0,
        op: None,
    }
}

fn span(start: Nanos, end: Nanos) -> String {
    format!("{:.3}–{:.3} s", start as f64 / 1e9, end as f64 / 1e9)
}

fn describe(e: &Entry, ops: &[Op]) -> String {
    let Some(i) = e.op else {
        return "the volume's initial zeroes".into();
    };
    let op = &ops[i];
    let what = match (&op.kind, e.value) {
        (Kind::Write { fua: true, .. }, Some(id)) => format!("FUA write {id}"),
        (_, Some(id)) => format!("write {id}"),
        (Kind::Write { trim: true, .. }, _) => "a trim".into(),
        (_, None) => "write-zeroes".into(),
    };
    let durable = if e.durable_at == NEVER {
        "never flushed".to_string()
    } else {
        format!("durable at {:.3} s", e.durable_at as f64 / 1e9)
    };
    format!(
        "{what} by client {} (engine {}) over {}, {:?}, {durable}",
        op.client,
        op.epoch,
        span(op.start, op.end),
        op.outcome
    )
}

fn explain(
    s: &Seen,
    entries: &[Entry],
    low: usize,
    top: usize,
    by_read: bool,
    ops: &[Op],
) -> String {
    let got = match s.value {
        Value::Bad(what) => return format!("{} returned bytes no write made: {what}", s.what),
        Value::Zero => "zeroes".to_string(),
        Value::Write(id) => match entries.iter().position(|e| e.value == Some(*id)) {
            None => {
                return format!(
                    "{} returned write {id}, which never wrote that block",
                    s.what
                )
            }
            Some(i) if i >= top => {
                return format!(
                    "{} returned {}, sent after the read was answered",
                    s.what,
                    describe(&entries[i], ops)
                )
            }
            Some(i) => describe(&entries[i], ops),
        },
    };
    let why = if by_read {
        "an earlier read by the same engine returned it"
    } else {
        "it was guaranteed when the read was sent"
    };
    format!(
        "{} returned {got}, older than {} ({why})",
        s.what,
        describe(&entries[low], ops)
    )
}

/// When each engine's acknowledged writes became durable: the answer of
/// the first acknowledged flush sent after them.
struct Durability(HashMap<Epoch, Vec<(Nanos, Nanos)>>);

fn durability(ops: &[Op]) -> Durability {
    let mut by_epoch: HashMap<Epoch, Vec<(Nanos, Nanos)>> = HashMap::new();
    for op in ops {
        if matches!(op.kind, Kind::Flush) && op.outcome == Outcome::Ok {
            by_epoch
                .entry(op.epoch)
                .or_default()
                .push((op.start, op.end));
        }
    }
    for flushes in by_epoch.values_mut() {
        flushes.sort();
        // Each entry's end becomes the earliest answer of it or any later
        // flush.
        for i in (0..flushes.len().saturating_sub(1)).rev() {
            flushes[i].1 = flushes[i].1.min(flushes[i + 1].1);
        }
    }
    Durability(by_epoch)
}

impl Durability {
    fn at(&self, epoch: Epoch, acked: Nanos) -> Nanos {
        let Some(flushes) = self.0.get(&epoch) else {
            return NEVER;
        };
        let i = flushes.partition_point(|f| f.0 <= acked);
        flushes.get(i).map(|f| f.1).unwrap_or(NEVER)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(
        client: u32,
        epoch: Epoch,
        id: u64,
        block: u64,
        t: (u64, u64),
        outcome: Outcome,
    ) -> Op {
        Op {
            client,
            epoch,
            kind: Kind::Write {
                id,
                fua: false,
                zero: false,
                trim: false,
            },
            block,
            blocks: 1,
            start: t.0,
            end: t.1,
            outcome,
        }
    }

    fn read(epoch: Epoch, block: u64, t: (u64, u64), v: Value) -> Op {
        Op {
            client: 9,
            epoch,
            kind: Kind::Read { values: vec![v] },
            block,
            blocks: 1,
            start: t.0,
            end: t.1,
            outcome: Outcome::Ok,
        }
    }

    fn flush(epoch: Epoch, t: (u64, u64)) -> Op {
        Op {
            client: 0,
            epoch,
            kind: Kind::Flush,
            block: 0,
            blocks: 0,
            start: t.0,
            end: t.1,
            outcome: Outcome::Ok,
        }
    }

    fn engines(ended: &[Option<Nanos>]) -> Vec<Instance> {
        ended
            .iter()
            .enumerate()
            .map(|(i, e)| Instance {
                epoch: i as Epoch,
                node: "e".into(),
                started: 0,
                ended: *e,
            })
            .collect()
    }

    fn bad(ops: &[Op], instances: &[Instance]) -> usize {
        check(ops, instances, &[]).violations.len()
    }

    #[test]
    fn an_acknowledged_write_is_read_back_by_its_engine() {
        let e = engines(&[None]);
        let w = write(0, 0, 1, 5, (10, 20), Outcome::Ok);
        assert_eq!(
            bad(&[w.clone(), read(0, 5, (30, 40), Value::Write(1))], &e),
            0
        );
        // Older data, and zeroes, after the acknowledgement: lost.
        let r = check(&[w.clone(), read(0, 5, (30, 40), Value::Zero)], &e, &[]);
        assert_eq!(r.violations.len(), 1, "{:?}", r.violations);
        assert!(r.violations[0].what.contains("older than write 1"));
        // A read concurrent with the write may see either.
        assert_eq!(bad(&[w.clone(), read(0, 5, (15, 25), Value::Zero)], &e), 0);
        assert_eq!(bad(&[w, read(0, 5, (15, 25), Value::Write(1))], &e), 0);
    }

    #[test]
    fn unflushed_writes_may_be_lost_with_their_engine_flushed_ones_never() {
        let e = engines(&[Some(50), None]);
        let w1 = write(0, 0, 1, 5, (10, 20), Outcome::Ok);
        let w2 = write(0, 0, 2, 5, (30, 40), Outcome::Ok);
        // Engine 1 may return write 1 or 2 (2 was never flushed)...
        let ops = [w1.clone(), flush(0, (25, 28)), w2.clone()];
        let with = |r: Op| [ops.to_vec(), vec![r]].concat();
        assert_eq!(bad(&with(read(1, 5, (60, 70), Value::Write(1))), &e), 0);
        assert_eq!(bad(&with(read(1, 5, (60, 70), Value::Write(2))), &e), 0);
        // ... but not the zeroes before write 1, which was flushed.
        assert_eq!(bad(&with(read(1, 5, (60, 70), Value::Zero)), &e), 1);
        // A flush sent before write 1 was answered does not cover it.
        let early = [w1, flush(0, (15, 28)), w2];
        let r = read(1, 5, (60, 70), Value::Zero);
        assert_eq!(bad(&[early.to_vec(), vec![r]].concat(), &e), 0);
    }

    #[test]
    fn reads_of_one_engine_never_go_back() {
        let e = engines(&[Some(50), None]);
        let w1 = write(0, 0, 1, 5, (10, 20), Outcome::Ok);
        let w2 = write(0, 0, 2, 5, (30, 40), Outcome::Ok);
        let r1 = read(1, 5, (60, 70), Value::Write(2));
        let r2 = read(1, 5, (80, 90), Value::Write(1));
        assert_eq!(bad(&[w1.clone(), w2.clone(), r1.clone()], &e), 0);
        let r = check(&[w1, w2, r1, r2], &e, &[]);
        assert_eq!(r.violations.len(), 1);
        assert!(
            r.violations[0].what.contains("earlier read"),
            "{}",
            r.violations[0].what
        );
    }

    #[test]
    fn unanswered_writes_may_land_until_their_engine_is_gone() {
        let e = engines(&[Some(100), None]);
        let w1 = write(0, 0, 1, 5, (10, 20), Outcome::Ok);
        let lost = write(0, 0, 2, 5, (30, 0), Outcome::Unknown);
        let w3 = write(0, 1, 3, 5, (120, 130), Outcome::Ok);
        let mut lost_end = lost.clone();
        lost_end.end = 30;
        assert_eq!(
            bad(
                &[
                    w1.clone(),
                    lost_end.clone(),
                    read(1, 5, (110, 115), Value::Write(2))
                ],
                &e
            ),
            0
        );
        assert_eq!(
            bad(
                &[
                    w1.clone(),
                    lost_end.clone(),
                    read(1, 5, (110, 115), Value::Write(1))
                ],
                &e
            ),
            0
        );
        // After engine 0 was gone, engine 1's acknowledged write 3 covers it.
        let r = read(1, 5, (140, 150), Value::Write(2));
        assert_eq!(bad(&[w1, lost_end, w3, r], &e), 1);
    }

    #[test]
    fn a_trim_leaves_zeroes_or_what_was_there_nothing_older() {
        let e = engines(&[None]);
        let w1 = write(0, 0, 1, 5, (10, 20), Outcome::Ok);
        let w2 = write(0, 0, 2, 5, (30, 40), Outcome::Ok);
        let mut trim = write(0, 0, 3, 5, (50, 60), Outcome::Ok);
        trim.kind = Kind::Write {
            id: 3,
            fua: false,
            zero: true,
            trim: true,
        };
        let ops = [w1, w2, trim];
        let with = |r: Op| [ops.to_vec(), vec![r]].concat();
        assert_eq!(bad(&with(read(0, 5, (70, 80), Value::Zero)), &e), 0);
        assert_eq!(bad(&with(read(0, 5, (70, 80), Value::Write(2))), &e), 0);
        assert_eq!(bad(&with(read(0, 5, (70, 80), Value::Write(1))), &e), 1);
    }

    #[test]
    fn bytes_no_write_made_and_snapshots_missing_writes_are_caught() {
        let e = engines(&[None]);
        let w = write(0, 0, 1, 5, (10, 20), Outcome::Ok);
        assert_eq!(
            bad(
                &[w.clone(), read(0, 5, (30, 40), Value::Bad("torn".into()))],
                &e
            ),
            1
        );
        assert_eq!(
            bad(&[w.clone(), read(0, 5, (30, 40), Value::Write(9))], &e),
            1
        );
        let mut view = vec![Value::Zero; 6];
        let snap = |view: Vec<Value>| Snapshot {
            name: "s".into(),
            epoch: 0,
            start: 30,
            end: 40,
            view: Some(view),
        };
        assert_eq!(
            check(std::slice::from_ref(&w), &e, &[snap(view.clone())])
                .violations
                .len(),
            1
        );
        view[5] = Value::Write(1);
        let r = check(&[w], &e, &[snap(view)]);
        assert_eq!((r.violations.len(), r.snapshot_blocks), (0, 6));
    }
}
