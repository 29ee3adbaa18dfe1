//! Per-block checksums, kept in a sidecar file beside each layer.
//!
//! `<layer>.crc` holds one 8-byte entry per 4 KiB block of `<layer>`: two
//! crc32c slots, `[older, newer]`, little-endian. A read is good when the
//! block's crc32c equals either slot; an entry of all zeros means nothing
//! was recorded (a block written before this file existed) and is not
//! checked. Holes are never checked: they are not read from the layer.
//!
//! # Why two slots
//!
//! Data and checksum cannot be written atomically together. A write first
//! shifts the entry to `[previous newer, crc of the new data]`, then writes
//! the data. If the process dies between the two, the block still holds
//! the previous data, which matches the older slot; once the data write
//! is done it matches the newer one. So a SIGKILL at any point leaves every
//! block matching its entry, and a mismatch means the bytes changed under
//! us: bit rot, or a stray writer. (Crucible answers the same problem with
//! several checksums per block, trimmed at flush.)
//!
//! Flush syncs the sidecar with the data, so after a power loss everything
//! flushed matches too. Two known gaps, both only for writes after the
//! last flush: a power loss may persist a block's data but not its entry;
//! and a second crash between the checksum and data writes of the *same*
//! block, before anything rewrote it, leaves the entry two writes ahead.
//! Either shows up as a mismatch on the affected replica, which the engine
//! repairs from another; only when every replica disagrees with its
//! checksums does it serve the stored data and report it (there is no
//! better copy left).

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::ids::BLOCK_SIZE;

/// Bytes per block in a sidecar.
pub const ENTRY: u64 = 8;

pub fn sidecar_name(layer: &str) -> String {
    format!("{layer}.crc")
}

/// Sidecar length for a volume of `size` bytes.
pub fn sidecar_len(size: u64) -> u64 {
    size / BLOCK_SIZE * ENTRY
}

fn slots(e: &[u8]) -> (u32, u32) {
    let older = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
    let newer = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
    (older, newer)
}

fn read_entries(file: &File, first_block: u64, blocks: usize) -> std::io::Result<Vec<u8>> {
    let mut entries = vec![0u8; blocks * ENTRY as usize];
    file.read_exact_at(&mut entries, first_block * ENTRY)?;
    Ok(entries)
}

/// Records the crcs of new contents for the blocks from `first_block`,
/// before the data itself is written: each entry becomes
/// `[previous newer, crc]`.
pub fn record_pending(file: &File, first_block: u64, crcs: &[u32]) -> std::io::Result<()> {
    let mut entries = read_entries(file, first_block, crcs.len())?;
    for (e, crc) in entries.chunks_mut(ENTRY as usize).zip(crcs) {
        let (_, newer) = slots(e);
        e[..4].copy_from_slice(&newer.to_le_bytes());
        e[4..].copy_from_slice(&crc.to_le_bytes());
    }
    file.write_all_at(&entries, first_block * ENTRY)
}

/// Records contents that need no older slot (copied into a layer nobody
/// reads meanwhile): each entry becomes `[crc, crc]`.
pub fn record_settled(file: &File, first_block: u64, data: &[u8]) -> std::io::Result<()> {
    let entries: Vec<u8> = data
        .chunks(BLOCK_SIZE as usize)
        .flat_map(|block| {
            let crc = crate::crc::of(block).to_le_bytes();
            [crc, crc].concat()
        })
        .collect();
    file.write_all_at(&entries, first_block * ENTRY)
}

/// Checks `data` (whole blocks read from the layer at `first_block`)
/// against its entries; returns the first block that matches neither slot.
/// `crcs` gets each block's crc32c (so a reply can be sealed without
/// another pass, see [`crate::crc`]).
pub fn verify(
    file: &File,
    first_block: u64,
    data: &[u8],
    crcs: &mut [u32],
) -> std::io::Result<Option<u64>> {
    let entries = read_entries(file, first_block, data.len() / BLOCK_SIZE as usize)?;
    for (i, ((e, block), out)) in entries
        .chunks(ENTRY as usize)
        .zip(data.chunks(BLOCK_SIZE as usize))
        .zip(crcs.iter_mut())
        .enumerate()
    {
        let (older, newer) = slots(e);
        let crc = crate::crc::of(block);
        *out = crc;
        let unrecorded = older == 0 && newer == 0;
        if !unrecorded && crc != older && crc != newer {
            return Ok(Some(first_block + i as u64));
        }
    }
    Ok(None)
}

/// Whether every block of `data` (whole blocks read from the layer at
/// `first_block`) needs no other check to be served: its entry is recorded
/// and matches one of its slots, or, where `unwritten_reads_as_zeros` (the
/// layer is the only one), it records nothing and the block is all zeros,
/// which is what a block never written there reads as.
pub fn verify_recorded(
    file: &File,
    first_block: u64,
    data: &[u8],
    unwritten_reads_as_zeros: bool,
) -> std::io::Result<bool> {
    let entries = read_entries(file, first_block, data.len() / BLOCK_SIZE as usize)?;
    Ok(entries
        .chunks(ENTRY as usize)
        .zip(data.chunks(BLOCK_SIZE as usize))
        .all(|(e, block)| match slots(e) {
            (0, 0) => unwritten_reads_as_zeros && block.iter().all(|&b| b == 0),
            (older, newer) => {
                let crc = crate::crc::of(block);
                crc == older || crc == newer
            }
        }))
}

/// Puts the newer slot of each entry from `first_block` into `crcs`: the
/// crc the block has unless a write to it is under way or was cut short.
/// False if an entry records nothing.
pub fn newer(file: &File, first_block: u64, crcs: &mut [u32]) -> std::io::Result<bool> {
    let entries = read_entries(file, first_block, crcs.len())?;
    for (e, out) in entries.chunks(ENTRY as usize).zip(crcs.iter_mut()) {
        match slots(e) {
            (0, 0) => return Ok(false),
            (_, newer) => *out = newer,
        }
    }
    Ok(true)
}

/// Copies the entries of `blocks` blocks from one sidecar to another (the
/// data moved with them).
pub fn copy_entries(from: &File, to: &File, first_block: u64, blocks: u64) -> std::io::Result<()> {
    let entries = read_entries(from, first_block, blocks as usize)?;
    to.write_all_at(&entries, first_block * ENTRY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn either_slot_verifies_and_a_flipped_byte_does_not() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(sidecar_len(4 * BLOCK_SIZE)).unwrap();
        let a = vec![1u8; 4096];
        let b = vec![2u8; 4096];
        let check = |first, data: &[u8]| {
            let mut crc = [0u32];
            let bad = verify(&f, first, data, &mut crc).unwrap();
            assert_eq!(
                crc[0],
                crate::crc::of(data),
                "the block's crc is handed back"
            );
            bad
        };
        // Nothing recorded: not checked.
        assert_eq!(check(1, &a), None);
        record_pending(&f, 1, &[crate::crc::of(&a)]).unwrap();
        assert_eq!(check(1, &a), None);
        // A crash before the data write of `b`: the old data still verifies.
        record_pending(&f, 1, &[crate::crc::of(&b)]).unwrap();
        assert_eq!(check(1, &a), None);
        assert_eq!(check(1, &b), None);
        let mut rotten = b.clone();
        rotten[100] ^= 0x10;
        assert_eq!(check(1, &rotten), Some(1));
        for only_layer in [false, true] {
            assert!(verify_recorded(&f, 1, &a, only_layer).unwrap());
            assert!(verify_recorded(&f, 1, &b, only_layer).unwrap());
            assert!(!verify_recorded(&f, 1, &rotten, only_layer).unwrap());
            assert!(
                !verify_recorded(&f, 3, &a, only_layer).unwrap(),
                "nothing recorded"
            );
        }
        // Nothing recorded and zeros: a block never written, which reads as
        // zeros only where no layer lies below.
        let zeros = vec![0u8; 4096];
        assert!(verify_recorded(&f, 3, &zeros, true).unwrap());
        assert!(!verify_recorded(&f, 3, &zeros, false).unwrap());
        // Recorded, and zeros that match neither slot: a trimmed block or one
        // whose write is under way, not served.
        assert!(!verify_recorded(&f, 1, &zeros, true).unwrap());
        record_settled(&f, 2, &rotten).unwrap();
        assert_eq!(check(2, &rotten), None);
        assert_eq!(check(2, &b), Some(2));
    }
}
