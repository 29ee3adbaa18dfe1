//! The clients: each its own NBD connection to whichever engine serves,
//! one request at a time, writing (plain and FUA), zeroing, trimming,
//! flushing and reading, and recording every request with its times and
//! answer. A client writes only its own stripes of the working set (so a
//! block's writes are ordered, which the checker relies on) and reads
//! anywhere.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::history::{block_data, value_of, Epoch, Kind, Op, Outcome, BLOCK};
use crate::nbd::{self, Nbd};
use crate::rng::Rng;
use crate::system::Shared;

const STRIPE: u64 = 8;
/// Longer than the engine holds I/O with no replica (60 s): a request
/// without an answer by then is reported, not waited for.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(90);

pub struct Client {
    pub id: u32,
    pub clients: u32,
    pub blocks: u64,
    pub seed: u64,
    pub shared: Arc<Shared>,
    pub ids: Arc<AtomicU64>,
}

/// Connects to the engine serving now; `None` while none does.
pub fn connect(shared: &Shared) -> Option<(Epoch, Nbd)> {
    let (epoch, addr) = (*shared.engine.lock().unwrap_or_else(|e| e.into_inner()))?;
    let c = Nbd::connect(addr, ANSWER_TIMEOUT).ok()?;
    // The engine may have been replaced while we connected.
    let now = *shared.engine.lock().unwrap_or_else(|e| e.into_inner());
    (now.map(|n| n.0) == Some(epoch)).then_some((epoch, c))
}

impl Client {
    pub fn run(self) -> Vec<Op> {
        let mut rng = Rng::new(self.seed ^ (u64::from(self.id) << 32));
        let mut history = Vec::new();
        let mut conn: Option<(Epoch, Nbd)> = None;
        let owned = (self.blocks / STRIPE - u64::from(self.id)).div_ceil(u64::from(self.clients));
        loop {
            let quiet = self.shared.gate.read().unwrap_or_else(|e| e.into_inner());
            if self.shared.stop.load(Ordering::Acquire) {
                break;
            }
            let Some((epoch, c)) = conn.as_mut().map(|(e, c)| (*e, c)) else {
                drop(quiet);
                conn = connect(&self.shared);
                if conn.is_none() {
                    std::thread::sleep(Duration::from_millis(100));
                }
                continue;
            };
            let stripe = u64::from(self.id) + u64::from(self.clients) * rng.below(owned);
            let at = stripe * STRIPE + rng.below(STRIPE);
            let write_len = rng.between(1, STRIPE - at % STRIPE);
            let (cmd, flags, kind, block, blocks) = match rng.below(100) {
                0..30 => {
                    let block = rng.below(self.blocks);
                    let n = rng.between(1, 16.min(self.blocks - block));
                    (
                        nbd::CMD_READ,
                        0,
                        Kind::Read { values: Vec::new() },
                        block,
                        n,
                    )
                }
                30..42 => (nbd::CMD_FLUSH, 0, Kind::Flush, 0, 0),
                p => {
                    let (cmd, flags, zero) = match p {
                        42..48 => {
                            let flags = if rng.chance(50) { nbd::FLAG_NO_HOLE } else { 0 };
                            (nbd::CMD_WRITE_ZEROES, flags, true)
                        }
                        48..54 => (nbd::CMD_TRIM, 0, true),
                        54..62 => (nbd::CMD_WRITE, nbd::FLAG_FUA, false),
                        _ => (nbd::CMD_WRITE, 0, false),
                    };
                    let id = self.ids.fetch_add(1, Ordering::Relaxed);
                    let fua = flags & nbd::FLAG_FUA != 0;
                    let trim = cmd == nbd::CMD_TRIM;
                    (
                        cmd,
                        flags,
                        Kind::Write {
                            id,
                            fua,
                            zero,
                            trim,
                        },
                        at,
                        write_len,
                    )
                }
            };
            let payload: Vec<u8> = match kind {
                Kind::Write {
                    id, zero: false, ..
                } => (block..block + blocks)
                    .flat_map(|b| block_data(id, b))
                    .collect(),
                _ => Vec::new(),
            };
            let start = self.shared.now();
            let answer = c.request(cmd, flags, block * BLOCK, (blocks * BLOCK) as u32, &payload);
            let end = self.shared.now();
            drop(quiet);
            let (outcome, kind) = match (answer, kind) {
                (Ok(Ok(data)), Kind::Read { .. }) => {
                    let values = (0..blocks)
                        .map(|k| {
                            let at = (k * BLOCK) as usize;
                            value_of(&data[at..at + BLOCK as usize], block + k)
                        })
                        .collect();
                    (Outcome::Ok, Kind::Read { values })
                }
                (Ok(Ok(_)), kind) => (Outcome::Ok, kind),
                (Ok(Err(errno)), kind) => (Outcome::Failed(errno), kind),
                (Err(_), kind) => (Outcome::Unknown, kind),
            };
            if outcome == Outcome::Unknown {
                conn = None;
            }
            history.push(Op {
                client: self.id,
                epoch,
                kind,
                block,
                blocks,
                start,
                end,
                outcome,
            });
        }
        history
    }
}

/// Reads the whole working set through a connection of its own
/// (recorded as client `client`'s reads), when the clients are paused.
pub fn read_all(shared: &Shared, blocks: u64, client: u32) -> anyhow::Result<Vec<Op>> {
    let (epoch, mut c) =
        connect(shared).ok_or_else(|| anyhow::anyhow!("no engine to read from"))?;
    let mut out = Vec::new();
    let mut block = 0;
    while block < blocks {
        let n = 64.min(blocks - block);
        let start = shared.now();
        let data = c
            .request(nbd::CMD_READ, 0, block * BLOCK, (n * BLOCK) as u32, &[])?
            .map_err(|e| anyhow::anyhow!("read of block {block} failed: errno {e}"))?;
        let values = (0..n)
            .map(|k| {
                value_of(
                    &data[(k * BLOCK) as usize..((k + 1) * BLOCK) as usize],
                    block + k,
                )
            })
            .collect();
        out.push(Op {
            client,
            epoch,
            kind: Kind::Read { values },
            block,
            blocks: n,
            start,
            end: shared.now(),
            outcome: Outcome::Ok,
        });
        block += n;
    }
    Ok(out)
}
