//! What the soak did and saw: every client operation with when it was
//! sent, when its answer came and what the answer was, and the engines
//! that served them. The checker ([`crate::check`]) judges this record
//! alone, so it is all a failure report needs.
//!
//! Block contents name the write that made them: a written block holds
//! the write's id and the block's number in its first 16 bytes and a
//! pattern derived from both after them, so a read tells which write it
//! returned, and a torn block, a block written elsewhere or bytes no
//! one wrote are told apart from old data.

use serde::Serialize;

pub const BLOCK: u64 = 4096;

/// Nanoseconds since the soak started (one clock for every thread).
pub type Nanos = u64;

/// The engine process a client operation was served by: its number in
/// the run (0, 1, ...). Acknowledged writes are guaranteed to reads of the
/// same engine; across engines only what was flushed is (see `check`).
pub type Epoch = u32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Outcome {
    Ok,
    /// The server answered with this NBD error.
    Failed(u32),
    /// No answer: the connection broke or timed out.
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Value {
    Zero,
    Write(u64),
    /// Bytes no write made (torn, foreign or garbage); what was seen.
    Bad(String),
}

#[derive(Debug, Clone, Serialize)]
pub enum Kind {
    /// `zero`: write-zeroes, or a trim when `trim` (NBD: the blocks'
    /// content is unspecified until written again; rvol's replicas punch
    /// them or, under a kept snapshot, leave them as they were).
    Write {
        id: u64,
        fua: bool,
        zero: bool,
        #[serde(default)]
        trim: bool,
    },
    Read {
        values: Vec<Value>,
    },
    Flush,
}

#[derive(Debug, Clone, Serialize)]
pub struct Op {
    pub client: u32,
    pub epoch: Epoch,
    pub kind: Kind,
    pub block: u64,
    pub blocks: u64,
    pub start: Nanos,
    pub end: Nanos,
    pub outcome: Outcome,
}

/// An engine process of the run.
#[derive(Debug, Clone, Serialize)]
pub struct Instance {
    pub epoch: Epoch,
    pub node: String,
    pub started: Nanos,
    /// When it was seen gone (killed and reaped, or exited); `None` while
    /// it runs. Writes it never answered may land until then.
    pub ended: Option<Nanos>,
}

/// A snapshot taken through the admin API, and what a backup of it
/// read back (the working set's blocks), once verified.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub name: String,
    pub epoch: Epoch,
    pub start: Nanos,
    pub end: Nanos,
    #[serde(skip)]
    pub view: Option<Vec<Value>>,
}

/// The content of `block` written by write `id`.
pub fn block_data(id: u64, block: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(BLOCK as usize);
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&block.to_le_bytes());
    let mut s = id.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ block;
    while out.len() < BLOCK as usize {
        out.extend_from_slice(&crate::rng::splitmix(&mut s).to_le_bytes());
    }
    out
}

/// Which write made `data`, read from `block`.
pub fn value_of(data: &[u8], block: u64) -> Value {
    if data.iter().all(|&b| b == 0) {
        return Value::Zero;
    }
    let word = |i: usize| {
        data.get(i..i + 8)
            .and_then(|w| w.try_into().ok())
            .map(u64::from_le_bytes)
    };
    let (Some(id), Some(at)) = (word(0), word(8)) else {
        return Value::Bad(format!("{} bytes", data.len()));
    };
    if at != block {
        return Value::Bad(format!("write {id}'s data for block {at}"));
    }
    if data != block_data(id, block) {
        return Value::Bad(format!("write {id}'s header over other bytes (torn)"));
    }
    Value::Write(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_name_their_write_and_nothing_else_passes() {
        let d = block_data(7, 3);
        assert_eq!(value_of(&d, 3), Value::Write(7));
        assert!(matches!(value_of(&d, 4), Value::Bad(_)));
        let mut torn = d.clone();
        torn[2048..].copy_from_slice(&block_data(8, 3)[2048..]);
        assert!(matches!(value_of(&torn, 3), Value::Bad(_)));
        assert_eq!(value_of(&[0; 4096], 3), Value::Zero);
    }
}
