//! The replica's state record: generation, revision counter, clean flag.
//!
//! These change at every flush and every takeover, far too often for the
//! rename dance of [`crate::meta`], so they live in `replica.state`, a
//! 2-slot file in the spirit of Crucible's two-slot metadata. Each slot is
//! one 512-byte sector holding a sequence number, the values and a crc32c.
//! An update writes the slot *not* holding the newest record, then
//! fdatasyncs. On open the valid slot with the highest sequence number wins.
//!
//! A crash mid-update can tear only the slot being written; its crc then
//! fails and the other slot, untouched since its own sync, still holds the
//! previous state. So the file always yields either the old or the new
//! record, and an update costs one 512-byte write and one fdatasync.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{Error, Result};
use crate::ids::{Generation, Revision};

pub const STATE_FILE: &str = "replica.state";

const SLOT: u64 = 512;
/// Bytes of both slots: what [`newest`] decodes.
pub const STATE_LEN: usize = 2 * SLOT as usize;
const MAGIC: u64 = 0x5256_4f4c_5354_4154; // "RVOLSTAT"

/// One record of the state file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StateRecord {
    pub generation: Generation,
    pub revision: Revision,
    /// True only after a clean shutdown: every write applied was flushed and
    /// `revision` counts them exactly.
    pub clean: bool,
    /// Identity of the engine holding `generation` (0: none yet).
    pub engine_id: u64,
    /// The newest barrier flush epoch this replica completed.
    pub flush_epoch: u64,
}

impl StateRecord {
    fn encode(&self, seq: u64) -> [u8; SLOT as usize] {
        let mut b = [0u8; SLOT as usize];
        b[0..8].copy_from_slice(&MAGIC.to_le_bytes());
        b[8..16].copy_from_slice(&seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.generation.0.to_le_bytes());
        b[24..32].copy_from_slice(&self.revision.0.to_le_bytes());
        b[32] = self.clean as u8;
        b[40..48].copy_from_slice(&self.engine_id.to_le_bytes());
        b[48..56].copy_from_slice(&self.flush_epoch.to_le_bytes());
        let crc = crate::crc::of(&b[..SLOT as usize - 4]);
        b[SLOT as usize - 4..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes a slot; `None` if it is torn, blank or not ours.
    pub fn decode(b: &[u8]) -> Option<(u64, StateRecord)> {
        if b.len() != SLOT as usize {
            return None;
        }
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let crc = u32::from_le_bytes(b[SLOT as usize - 4..].try_into().expect("4 bytes"));
        if u64_at(0) != MAGIC || crate::crc::of(&b[..SLOT as usize - 4]) != crc || b[32] > 1 {
            return None;
        }
        Some((
            u64_at(8),
            StateRecord {
                generation: Generation(u64_at(16)),
                revision: Revision(u64_at(24)),
                clean: b[32] == 1,
                engine_id: u64_at(40),
                flush_epoch: u64_at(48),
            },
        ))
    }
}

/// The newest valid record of a state file's [`STATE_LEN`] bytes, with its
/// sequence number; `None` if neither slot holds one.
pub fn newest(both: &[u8]) -> Option<(u64, StateRecord)> {
    both.chunks_exact(SLOT as usize)
        .filter_map(StateRecord::decode)
        .max_by_key(|&(seq, _)| seq)
}

/// The open state file.
pub struct StateFile {
    file: File,
    seq: u64,
    current: StateRecord,
}

impl StateFile {
    pub fn create(dir: &Path, record: StateRecord) -> Result<StateFile> {
        let path = dir.join(STATE_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
        let mut s = StateFile {
            file,
            seq: 0,
            current: record,
        };
        // Both slots valid from the start.
        s.store(record)?;
        s.store(record)?;
        Ok(s)
    }

    pub fn open(dir: &Path) -> Result<StateFile> {
        let path = dir.join(STATE_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        // A short file leaves the missing slot blank, which decodes to none.
        let mut b = [0u8; STATE_LEN];
        let mut got = 0;
        while got < STATE_LEN {
            match file.read_at(&mut b[got..], got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
            }
        }
        let (seq, current) = newest(&b).ok_or_else(|| {
            Error::Corrupt(format!(
                "{}: no valid state record in either slot",
                path.display()
            ))
        })?;
        Ok(StateFile { file, seq, current })
    }

    pub fn current(&self) -> StateRecord {
        self.current
    }

    /// Durably replaces the record; see the module documentation.
    pub fn store(&mut self, record: StateRecord) -> Result<()> {
        let seq = self.seq + 1;
        let slot = seq % 2;
        self.file
            .write_all_at(&record.encode(seq), slot * SLOT)
            .and_then(|_| self.file.sync_data())
            .map_err(|e| Error::io("writing replica.state", e))?;
        self.seq = seq;
        self.current = record;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_valid_slot_wins_and_a_torn_slot_falls_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = StateFile::create(dir.path(), StateRecord::default()).unwrap();
        let r1 = StateRecord {
            generation: Generation(3),
            revision: Revision(10),
            clean: false,
            engine_id: 7,
            flush_epoch: 2,
        };
        s.store(r1).unwrap();
        let r2 = StateRecord {
            revision: Revision(11),
            ..r1
        };
        s.store(r2).unwrap();
        assert_eq!(StateFile::open(dir.path()).unwrap().current(), r2);
        // Tear the newest slot: the previous record comes back.
        let seq = s.seq;
        s.file
            .write_all_at(&[0xff; 16], (seq % 2) * SLOT + 20)
            .unwrap();
        assert_eq!(StateFile::open(dir.path()).unwrap().current(), r1);
        // Tear both: a clear error.
        s.file
            .write_all_at(&[0xff; 16], ((seq + 1) % 2) * SLOT + 20)
            .unwrap();
        assert!(matches!(
            StateFile::open(dir.path()),
            Err(Error::Corrupt(_))
        ));
    }
}
