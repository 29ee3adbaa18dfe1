//! Per-block checksums, kept in a sidecar file beside each layer.
//!
//! `<layer>.crc` holds one entry per 4 KiB block of `<layer>`: two crc32c
//! slots, `[older, newer]`, little-endian. A read is good when the block's
//! crc32c equals either slot; an entry of all zeros means nothing was
//! recorded (a block written before this file existed) and is not checked.
//! Holes are never checked: they are not read from the layer.
//!
//! # Encrypted volumes
//!
//! A block of an encrypted volume arrives sealed by the engine with its
//! nonce and tag (`auth`, [`crate::meta::Encryption::auth_bytes`] bytes),
//! which the replica keeps but cannot check: it holds no key. The entry
//! then carries an auth slot beside each crc slot,
//! `[older crc, newer crc, older auth, newer auth]`, shifted together, and
//! a read returns the auth of the slot whose crc the data matches. So the
//! argument below holds for the pair: after a crash between the sidecar
//! and the data write, the old ciphertext is returned with its own nonce
//! and tag, never with the new ones. The crcs cover the ciphertext, so
//! scrub, rebuild, purge and trim work without the key; the engine checks
//! the tag, which binds the block to its volume and block number.
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

pub fn sidecar_name(layer: &str) -> String {
    format!("{layer}.crc")
}

/// Bytes per block in a sidecar whose blocks carry `auth` bytes of nonce
/// and tag (0 for a plain volume: 8).
pub fn entry_len(auth: usize) -> u64 {
    8 + 2 * auth as u64
}

/// Sidecar length for a volume of `size` bytes.
pub fn sidecar_len(size: u64, auth: usize) -> u64 {
    size / BLOCK_SIZE * entry_len(auth)
}

fn slots(e: &[u8]) -> (u32, u32) {
    let older = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
    let newer = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
    (older, newer)
}

/// The auth slots of an entry: `(older, newer)`.
fn auth_slots(e: &[u8], auth: usize) -> (&[u8], &[u8]) {
    (&e[8..8 + auth], &e[8 + auth..8 + 2 * auth])
}

fn read_entries(
    file: &File,
    auth: usize,
    first_block: u64,
    blocks: usize,
) -> std::io::Result<Vec<u8>> {
    let mut entries = vec![0u8; blocks * entry_len(auth) as usize];
    file.read_exact_at(&mut entries, first_block * entry_len(auth))?;
    Ok(entries)
}

/// Records the crcs (and auths, `auth` bytes per block) of new contents
/// for the blocks from `first_block`, before the data itself is written:
/// each entry becomes `[previous newer, new]`.
pub fn record_pending(
    file: &File,
    auth: usize,
    first_block: u64,
    crcs: &[u32],
    auths: &[u8],
) -> std::io::Result<()> {
    let mut entries = read_entries(file, auth, first_block, crcs.len())?;
    for (i, (e, crc)) in entries
        .chunks_mut(entry_len(auth) as usize)
        .zip(crcs)
        .enumerate()
    {
        let (_, newer) = slots(e);
        e[..4].copy_from_slice(&newer.to_le_bytes());
        e[4..8].copy_from_slice(&crc.to_le_bytes());
        if auth > 0 {
            e.copy_within(8 + auth..8 + 2 * auth, 8);
            e[8 + auth..].copy_from_slice(&auths[i * auth..(i + 1) * auth]);
        }
    }
    file.write_all_at(&entries, first_block * entry_len(auth))
}

/// Records contents that need no older slot (copied into a layer nobody
/// reads meanwhile): each entry becomes `[crc, crc]` (and `[auth, auth]`).
pub fn record_settled(
    file: &File,
    auth: usize,
    first_block: u64,
    data: &[u8],
    auths: &[u8],
) -> std::io::Result<()> {
    let mut entries =
        Vec::with_capacity(data.len() / BLOCK_SIZE as usize * entry_len(auth) as usize);
    for (i, block) in data.chunks(BLOCK_SIZE as usize).enumerate() {
        let crc = crate::crc::of(block).to_le_bytes();
        entries.extend_from_slice(&crc);
        entries.extend_from_slice(&crc);
        for _ in 0..2 {
            entries.extend_from_slice(&auths[i * auth..(i + 1) * auth]);
        }
    }
    file.write_all_at(&entries, first_block * entry_len(auth))
}

/// Checks `data` (whole blocks read from the layer at `first_block`)
/// against its entries; returns the first block that matches neither slot.
/// `crcs` gets each block's crc32c (so a reply can be sealed without
/// another pass, see [`crate::crc`]); `auths` (`auth` bytes per block)
/// gets the auth of the slot each block matches, of the newer slot where
/// it matches neither, zeros where nothing is recorded (or nothing, if it
/// is empty).
pub fn verify(
    file: &File,
    auth: usize,
    first_block: u64,
    data: &[u8],
    crcs: &mut [u32],
    auths: &mut [u8],
) -> std::io::Result<Option<u64>> {
    let entries = read_entries(file, auth, first_block, data.len() / BLOCK_SIZE as usize)?;
    let mut bad = None;
    for (i, ((e, block), out)) in entries
        .chunks(entry_len(auth) as usize)
        .zip(data.chunks(BLOCK_SIZE as usize))
        .zip(crcs.iter_mut())
        .enumerate()
    {
        let (older, newer) = slots(e);
        let crc = crate::crc::of(block);
        *out = crc;
        let unrecorded = older == 0 && newer == 0;
        let matches_older = crc == older && crc != newer;
        if !unrecorded && !matches_older && crc != newer {
            bad.get_or_insert(first_block + i as u64);
        }
        if auth > 0 && !auths.is_empty() {
            let (a_older, a_newer) = auth_slots(e, auth);
            let a = if matches_older { a_older } else { a_newer };
            auths[i * auth..(i + 1) * auth].copy_from_slice(a);
        }
    }
    Ok(bad)
}

/// Whether every block of `data` (whole blocks read from the layer at
/// `first_block`) needs no other check to be served: its entry is recorded
/// and matches one of its slots, or, where `unwritten_reads_as_zeros` (the
/// layer is the only one), it records nothing and the block is all zeros,
/// which is what a block never written there reads as.
pub fn verify_recorded(
    file: &File,
    auth: usize,
    first_block: u64,
    data: &[u8],
    unwritten_reads_as_zeros: bool,
) -> std::io::Result<bool> {
    let entries = read_entries(file, auth, first_block, data.len() / BLOCK_SIZE as usize)?;
    Ok(entries
        .chunks(entry_len(auth) as usize)
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
pub fn newer(
    file: &File,
    auth: usize,
    first_block: u64,
    crcs: &mut [u32],
) -> std::io::Result<bool> {
    let entries = read_entries(file, auth, first_block, crcs.len())?;
    for (e, out) in entries
        .chunks(entry_len(auth) as usize)
        .zip(crcs.iter_mut())
    {
        match slots(e) {
            (0, 0) => return Ok(false),
            (_, newer) => *out = newer,
        }
    }
    Ok(true)
}

/// Copies the entries of `blocks` blocks from one sidecar to another (the
/// data moved with them).
pub fn copy_entries(
    from: &File,
    to: &File,
    auth: usize,
    first_block: u64,
    blocks: u64,
) -> std::io::Result<()> {
    let entries = read_entries(from, auth, first_block, blocks as usize)?;
    to.write_all_at(&entries, first_block * entry_len(auth))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn either_slot_verifies_and_a_flipped_byte_does_not() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(sidecar_len(4 * BLOCK_SIZE, 0)).unwrap();
        let a = vec![1u8; 4096];
        let b = vec![2u8; 4096];
        let check = |first, data: &[u8]| {
            let mut crc = [0u32];
            let bad = verify(&f, 0, first, data, &mut crc, &mut []).unwrap();
            assert_eq!(
                crc[0],
                crate::crc::of(data),
                "the block's crc is handed back"
            );
            bad
        };
        // Nothing recorded: not checked.
        assert_eq!(check(1, &a), None);
        record_pending(&f, 0, 1, &[crate::crc::of(&a)], &[]).unwrap();
        assert_eq!(check(1, &a), None);
        // A crash before the data write of `b`: the old data still verifies.
        record_pending(&f, 0, 1, &[crate::crc::of(&b)], &[]).unwrap();
        assert_eq!(check(1, &a), None);
        assert_eq!(check(1, &b), None);
        let mut rotten = b.clone();
        rotten[100] ^= 0x10;
        assert_eq!(check(1, &rotten), Some(1));
        for only_layer in [false, true] {
            assert!(verify_recorded(&f, 0, 1, &a, only_layer).unwrap());
            assert!(verify_recorded(&f, 0, 1, &b, only_layer).unwrap());
            assert!(!verify_recorded(&f, 0, 1, &rotten, only_layer).unwrap());
            assert!(
                !verify_recorded(&f, 0, 3, &a, only_layer).unwrap(),
                "nothing recorded"
            );
        }
        // Nothing recorded and zeros: a block never written, which reads as
        // zeros only where no layer lies below.
        let zeros = vec![0u8; 4096];
        assert!(verify_recorded(&f, 0, 3, &zeros, true).unwrap());
        assert!(!verify_recorded(&f, 0, 3, &zeros, false).unwrap());
        // Recorded, and zeros that match neither slot: a trimmed block or one
        // whose write is under way, not served.
        assert!(!verify_recorded(&f, 0, 1, &zeros, true).unwrap());
        record_settled(&f, 0, 2, &rotten, &[]).unwrap();
        assert_eq!(check(2, &rotten), None);
        assert_eq!(check(2, &b), Some(2));
    }

    #[test]
    fn a_read_gets_the_auth_of_the_slot_its_data_matches() {
        const AUTH: usize = 28;
        let f = tempfile::tempfile().unwrap();
        f.set_len(sidecar_len(4 * BLOCK_SIZE, AUTH)).unwrap();
        let a = vec![1u8; 4096];
        let b = vec![2u8; 4096];
        let (auth_a, auth_b) = ([0xaa; AUTH], [0xbb; AUTH]);
        let read = |data: &[u8]| {
            let mut auth = [0u8; AUTH];
            let bad = verify(&f, AUTH, 1, data, &mut [0], &mut auth).unwrap();
            (bad, auth)
        };
        assert_eq!(read(&a), (None, [0; AUTH]), "nothing recorded: no auth");
        record_pending(&f, AUTH, 1, &[crate::crc::of(&a)], &auth_a).unwrap();
        assert_eq!(read(&a), (None, auth_a));
        // `b` recorded, its data not written yet (a crash here): the old
        // ciphertext still comes with its own nonce and tag.
        record_pending(&f, AUTH, 1, &[crate::crc::of(&b)], &auth_b).unwrap();
        assert_eq!(read(&a), (None, auth_a));
        assert_eq!(read(&b), (None, auth_b));
        let mut rotten = b.clone();
        rotten[9] ^= 1;
        assert_eq!(read(&rotten), (Some(1), auth_b));
        // Entries move whole: a copy carries the auths with the crcs.
        let g = tempfile::tempfile().unwrap();
        g.set_len(sidecar_len(4 * BLOCK_SIZE, AUTH)).unwrap();
        copy_entries(&f, &g, AUTH, 1, 1).unwrap();
        let mut auth = [0u8; AUTH];
        assert_eq!(verify(&g, AUTH, 1, &a, &mut [0], &mut auth).unwrap(), None);
        assert_eq!(auth, auth_a);
        record_settled(&g, AUTH, 2, &b, &auth_b).unwrap();
        assert_eq!(verify(&g, AUTH, 2, &b, &mut [0], &mut auth).unwrap(), None);
        assert_eq!(auth, auth_b);
        // The neighbours' entries are untouched.
        assert_eq!(verify(&g, AUTH, 1, &a, &mut [0], &mut auth).unwrap(), None);
        assert_eq!(auth, auth_a);
    }
}
