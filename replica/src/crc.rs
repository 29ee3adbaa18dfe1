//! crc32c arithmetic: the crc of a concatenation from the crcs of its parts.
//!
//! Every byte of a write is checksummed in three roles: the engine seals
//! the frame it sends to each replica (header and payload), the replica
//! checks that seal, and the replica records each 4 KiB block's crc in the
//! layer's sidecar ([`crate::checksum`]). Done naively that is one pass over
//! the payload per replica in the engine and two in each replica. With
//! [`concat`], the engine computes the payload's crc once and seals every
//! replica's frame from it, and a replica computes the block crcs once and
//! derives the payload's crc from them ([`of_blocks`]): one pass per
//! process. The engine derives its seal from block crcs too
//! ([`crate::proto::Sealed::new`]), so a replica in its process
//! ([`crate::local`]) records those and makes no pass of its own. Reads go
//! the same way: checking each block against the sidecar yields its crc,
//! a hole's is [`zero_block`], and the reply is sealed from those. Large
//! reads skip even that pass: they are sent from the files and sealed
//! from the crcs recorded in the sidecar
//! ([`crate::store::Replica::read_stored`]), and the engine's check of the
//! seal is the only pass over the data.
//!
//! # Why it works
//!
//! crc32c (reflected, initial value and final xor all ones) satisfies
//! `crc(A ‖ B) = Z_|B|(crc(A)) ^ crc(B)`, where `Z_n` is the linear map of
//! feeding `n` zero bytes through the raw register (the same identity as
//! zlib's `crc32_combine`). `Z_n` for `n` a power of two is kept as four
//! 256-entry tables, one per byte of the register, so applying it costs
//! four lookups; any `n` is the composition of the powers in its binary
//! form. Tables are built on first use, from the polynomial alone.

use std::sync::OnceLock;

use crate::ids::BLOCK_SIZE;

/// crc32c's polynomial, reflected.
const POLY: u32 = 0x82F6_3B78;

/// `Z_n` as lookup tables: `Z_n(x) = t[0][x & 0xff] ^ t[1][(x >> 8) & 0xff] ^ ...`.
type ZeroOp = [[u32; 256]; 4];

fn apply(op: &ZeroOp, x: u32) -> u32 {
    op[0][(x & 0xff) as usize]
        ^ op[1][((x >> 8) & 0xff) as usize]
        ^ op[2][((x >> 16) & 0xff) as usize]
        ^ op[3][(x >> 24) as usize]
}

/// Tables for a linear map given by its images of the 32 unit vectors.
fn tables(basis: &[u32; 32]) -> Box<ZeroOp> {
    let mut op = Box::new([[0u32; 256]; 4]);
    for (k, table) in op.iter_mut().enumerate() {
        for (b, slot) in table.iter_mut().enumerate() {
            *slot = (0..8)
                .filter(|bit| b & (1 << bit) != 0)
                .fold(0, |acc, bit| acc ^ basis[8 * k + bit]);
        }
    }
    op
}

/// `Z_{2^k}` for `k` in `0..32`.
fn zero_op(k: usize) -> &'static ZeroOp {
    static OPS: [OnceLock<Box<ZeroOp>>; 32] = [const { OnceLock::new() }; 32];
    OPS[k].get_or_init(|| {
        let basis: [u32; 32] = std::array::from_fn(|i| {
            let unit = 1u32 << i;
            if k == 0 {
                // One zero byte: eight shifts of the raw register.
                (0..8).fold(
                    unit,
                    |c, _| if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 },
                )
            } else {
                let half = zero_op(k - 1);
                apply(half, apply(half, unit))
            }
        });
        tables(&basis)
    })
}

/// `Z_len(x)`: `x` as if `len` zero bytes followed.
fn shift(mut x: u32, len: u64) -> u32 {
    let mut k = 0;
    let mut rest = len;
    while rest != 0 {
        if rest & 1 != 0 {
            x = apply(zero_op(k), x);
        }
        rest >>= 1;
        k += 1;
    }
    x
}

/// crc32c of `data`. The one place that names the implementation:
/// crc-fast folds the data with carry-less multiplication (VPCLMULQDQ
/// where the CPU has it), 2 to 2.5 times the speed of the `crc32`
/// instruction on this project's machines (see docs/benchmarks.md).
pub fn of(data: &[u8]) -> u32 {
    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, data) as u32
}

/// crc32c of `A ‖ B` from crc32c of `A`, crc32c of `B` and `B`'s length.
pub fn concat(crc_a: u32, crc_b: u32, len_b: u64) -> u32 {
    shift(crc_a, len_b) ^ crc_b
}

/// crc32c of each whole 4 KiB block of `data` (a trailing part is ignored).
pub fn blocks(data: &[u8], out: &mut Vec<u32>) {
    out.clear();
    out.extend(data.chunks_exact(BLOCK_SIZE as usize).map(of));
}

/// crc32c of one 4 KiB block of zeros (a hole).
pub fn zero_block() -> u32 {
    static ZERO: OnceLock<u32> = OnceLock::new();
    *ZERO.get_or_init(|| of(&[0; BLOCK_SIZE as usize]))
}

/// crc32c of the concatenation of blocks from their crcs.
pub fn of_blocks(block_crcs: &[u32]) -> u32 {
    let block = zero_op(BLOCK_SIZE.trailing_zeros() as usize);
    let mut crcs = block_crcs.iter();
    let first = crcs.next().copied().unwrap_or(0);
    crcs.fold(first, |acc, &c| apply(block, acc) ^ c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// crc32c one bit at a time, from its definition.
    fn reference(data: &[u8]) -> u32 {
        !data.iter().fold(!0u32, |crc, &b| {
            (0..8).fold(crc ^ b as u32, |c, _| {
                if c & 1 != 0 {
                    (c >> 1) ^ POLY
                } else {
                    c >> 1
                }
            })
        })
    }

    #[test]
    fn of_matches_the_definition() {
        // Lengths around the SIMD paths' strides and tails.
        for n in [
            0,
            1,
            3,
            15,
            16,
            17,
            63,
            64,
            65,
            255,
            256,
            257,
            4095,
            4096,
            4097,
            65536 + 7,
        ] {
            for skew in [0, 1, 5] {
                let data = noise(n + skew, n as u64 + 11);
                assert_eq!(
                    of(&data[skew..]),
                    reference(&data[skew..]),
                    "length {n}, offset {skew}"
                );
            }
        }
        assert_eq!(of(b"123456789"), 0xE306_9283, "the standard check value");
    }

    #[test]
    fn concat_matches_a_straight_pass() {
        for (la, lb) in [
            (0, 0),
            (0, 5),
            (48, 0),
            (48, 1),
            (44, 4096),
            (28, 1 << 20),
            (7, 12345),
        ] {
            let a = noise(la, la as u64 + 1);
            let b = noise(lb, lb as u64 + 7);
            let whole = of(&[a.as_slice(), &b].concat());
            let parts = concat(of(&a), of(&b), lb as u64);
            assert_eq!(parts, whole, "lengths {la} and {lb}");
        }
    }

    #[test]
    fn blocks_add_up_to_the_payload() {
        let data = noise(64 * BLOCK_SIZE as usize, 3);
        let mut crcs = Vec::new();
        blocks(&data, &mut crcs);
        assert_eq!(crcs.len(), 64);
        assert_eq!(crcs[5], of(&data[5 * 4096..6 * 4096]));
        assert_eq!(of_blocks(&crcs), of(&data));
        assert_eq!(of_blocks(&crcs[..1]), of(&data[..4096]));
        assert_eq!(of_blocks(&[]), of(&[]));
    }
}
