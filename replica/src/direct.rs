//! Direct reads: the engine reads a same-node replica's layer files itself.
//!
//! On a CPU-bound node a large read from a replica process costs more in
//! the loopback hop than in the disk: the replica sends from its files
//! without copying ([`Replica::read_stored`](crate::Replica::read_stored)),
//! yet the sender runs the receiver's TCP processing and the engine copies
//! the data out of the socket, so each GiB cost about as much CPU as a
//! plain NBD server's whole read (see `docs/benchmarks.md`). When the
//! replica runs on the engine's node, only where the data is needs to
//! cross the socket:
//!
//! 1. LOCATE asks the replica where a range is stored: for each piece a
//!    layer's position in the chain and an offset, or a hole, with the
//!    chain's version and the crc32c the data should have (from the
//!    checksums recorded for those blocks, exactly the claim a stored read
//!    is sealed with). It runs under the engine's lease like a READ.
//! 2. The engine `pread`s the pieces from the layer files, which it opened
//!    after LAYERS told it their names, device and inode numbers, and the
//!    chain version they belong to.
//! 3. It checks the data against the claimed crc. A mismatch is handled as
//!    for a stored read: read again, verified by the replica, which names
//!    a rotten block or returns data that is good.
//!
//! Blocks in the head need not even that: see "Reads answered without
//! asking" below.
//!
//! # Why what the engine reads is right
//!
//! - **Same node.** LAYERS reports the replica's boot id, which the engine
//!   compares with its own; it opens the files by path and keeps only
//!   those whose device and inode numbers are the ones reported. A file
//!   the engine holds open keeps its inode number, so the files it keeps
//!   are the replica's, whatever is renamed or created since.
//! - **Same chain.** The replica bumps its chain version under the chain's
//!   write lock whenever it takes that lock, and reads it under the read
//!   lock with the positions, so a version and a position name one file.
//!   The engine uses its files only for LOCATE replies of the version they
//!   were listed for, and lists them again when a reply names another.
//! - **Same data.** Between LOCATE and the `pread` the replica may change
//!   what the pieces hold: a write into the head, a trim, a purge
//!   punching a layer below. The replica's own stored reads have the same
//!   window (the send happens after the chain's locks are released), and
//!   the same answer: the crc was computed from the checksums recorded at
//!   LOCATE, so data that changed fails it and is read again, verified.
//!   A file removed from the chain stays readable through the engine's
//!   descriptor, holding the data it held.
//!
//! # Reads answered without asking
//!
//! LOCATE is a round trip, as dear as the READ it replaces when the read
//! is small. Blocks in the head need none: every write goes to the head,
//! so where the head's file holds data, that data is the block; where the
//! head is the only layer, a hole in it reads as zeros. The engine reads
//! such blocks from the head file it holds open, and serves them only if
//! each has an entry in the head's checksum sidecar and matches one of its
//! slots ([`crate::checksum`]), or, where the head is the only layer, has
//! no entry and reads as zeros: a block never written, which the replica
//! would answer with zeros too. Three things keep that right without the
//! replica:
//!
//! - **The lease.** Each such read first reads the replica's state file
//!   and goes on only if its newest record still names this engine's
//!   generation and id. Once a newer engine's takeover is written there,
//!   this engine's reads go to the replica, which refuses them.
//! - **The chain.** The client closes its files before and after every
//!   request that may change the chain or write below the head (snapshot,
//!   revert, purge, rebuild, expansion), so a head read never uses files
//!   listed before such a change. Writes, trims and write-zeroes change
//!   only the head; a read racing one may see either side, as a READ may,
//!   and a block caught half-written fails its checksum.
//! - **The data.** A block that fails its checksum, or has none recorded
//!   and holds data, is not served from here: the whole read goes to the
//!   replica, which tells bit rot from a racing write. A write records the
//!   block's checksum before it writes the data, and the engine reads the
//!   data before the checksums, so zeros with nothing recorded were read
//!   before any write to that block began.
//!
//! # What it costs the replica
//!
//! The engine holds descriptors of the chain's files, so a layer the
//! replica deletes keeps its blocks while the engine holds it. Layers are
//! deleted by purge steps, which the engine asks for: the client closes
//! its files after each, drops any listing asked for before that, and lists
//! them again at its next direct read.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::checksum::verify_recorded;
use crate::ids::BLOCK_SIZE;
use crate::state::{newest, STATE_LEN};
use crate::store::{data_extents_upto, read_appending, Owner, Segment, Stored};

/// Reads not answered from the head are located and read from the files
/// from this size on. Below it the bytes saved are fewer than a LOCATE
/// costs beside a READ (both are one round trip).
pub const DIRECT_READ_MIN: u64 = 64 << 10;

/// The files of a replica's chain, oldest first, as of `chain_version`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerFiles {
    pub chain_version: u64,
    pub boot_id: String,
    /// The replica's directory, absolute.
    pub dir: PathBuf,
    pub files: Vec<LayerFile>,
    /// Inode of its `replica.state` (on the device of the layer files).
    #[serde(default)]
    pub state_ino: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerFile {
    pub name: String,
    pub dev: u64,
    pub ino: u64,
    /// Inode of its checksum sidecar (same device).
    #[serde(default)]
    pub sidecar_ino: Option<u64>,
}

/// This machine's boot id; empty if it cannot be read (then nothing is
/// taken to be on the same node).
pub fn boot_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    })
}

/// A piece of a located range: `len` bytes of layer `layer` at `at`, or a
/// hole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub layer: Option<u32>,
    pub at: u64,
    pub len: u64,
}

/// Where a range is stored, as a LOCATE reply tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub chain_version: u64,
    pub crc: u32,
    pub pieces: Vec<Piece>,
}

const HOLE: u32 = u32::MAX;
const PIECE_LEN: usize = 16;

/// LOCATE's reply payload: `[crc u32][pieces u32]`, then per piece
/// `[layer u32 (u32::MAX: a hole)][at u64][len u32]`, little-endian. The
/// chain version travels in the reply's value.
pub fn encode_located(stored: &Stored) -> Bytes {
    let mut b = Vec::with_capacity(8 + PIECE_LEN * stored.segments.len());
    b.extend_from_slice(&stored.crc.to_le_bytes());
    b.extend_from_slice(&(stored.segments.len() as u32).to_le_bytes());
    for s in &stored.segments {
        let (layer, at, len) = match s {
            Segment::File { layer, at, len, .. } => (layer.0, *at, *len),
            Segment::Zeros(len) => (HOLE, 0, *len),
        };
        b.extend_from_slice(&layer.to_le_bytes());
        b.extend_from_slice(&at.to_le_bytes());
        b.extend_from_slice(&(len as u32).to_le_bytes());
    }
    b.into()
}

/// Decodes a LOCATE reply for a read of `length` bytes. `Ok(None)`: the
/// replica could not locate it (a block without a recorded checksum).
pub fn decode_located(
    chain_version: u64,
    payload: &[u8],
    length: u64,
) -> Result<Option<Located>, String> {
    if payload.is_empty() {
        return Ok(None);
    }
    let bad = |why: &str| format!("bad LOCATE reply: {why}");
    let (head, rest) = payload.split_at_checked(8).ok_or_else(|| bad("short"))?;
    let crc = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    let count = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
    if rest.len() != count.saturating_mul(PIECE_LEN) {
        return Err(bad("length disagrees with its count"));
    }
    let mut pieces = Vec::with_capacity(count);
    let mut total = 0u64;
    for p in rest.chunks_exact(PIECE_LEN) {
        let layer = u32::from_le_bytes([p[0], p[1], p[2], p[3]]);
        let at = u64::from_le_bytes([p[4], p[5], p[6], p[7], p[8], p[9], p[10], p[11]]);
        let len = u32::from_le_bytes([p[12], p[13], p[14], p[15]]) as u64;
        at.checked_add(len)
            .ok_or_else(|| bad("piece past the end"))?;
        total += len;
        pieces.push(Piece {
            layer: (layer != HOLE).then_some(layer),
            at,
            len,
        });
    }
    if total != length {
        return Err(bad(&format!("{total} bytes located, {length} asked")));
    }
    Ok(Some(Located {
        chain_version,
        crc,
        pieces,
    }))
}

/// The engine's side: the files of one replica's chain it holds open.
#[derive(Default)]
pub struct DirectReads {
    /// The engine whose lease head reads check ([`DirectReads::read_head`]).
    owner: Owner,
    chain: Mutex<Option<OpenChain>>,
    /// Set once direct reads turn out impossible (another node, files not
    /// reachable from here): the client stops asking.
    off: AtomicBool,
    /// Bumped (under `chain`) by every close: a listing asked for before a
    /// close may name a layer the purge step behind that close deleted, so
    /// it is not installed.
    closes: AtomicU64,
}

#[derive(Clone)]
struct OpenChain {
    chain_version: u64,
    /// By position; `None` where the file could not be opened as listed.
    files: Arc<[Option<File>]>,
    /// What head reads need besides the head; `None` if any of it could
    /// not be opened as listed.
    head: Option<Arc<HeadFiles>>,
}

struct HeadFiles {
    data: File,
    checksums: File,
    state: File,
    /// No layer below the head: a hole in it reads as zeros.
    only_layer: bool,
}

/// What a direct read came to.
pub enum DirectRead {
    Data(Bytes),
    /// The data does not match its claimed crc: read it again, verified.
    Mismatch(String),
    /// Not served here (files not open for that chain, or unreadable).
    NotHere,
}

impl DirectReads {
    /// Direct reads for the engine holding `owner`'s lease.
    pub fn new(owner: Owner) -> DirectReads {
        DirectReads {
            owner,
            ..Default::default()
        }
    }

    pub fn is_on(&self) -> bool {
        !self.off.load(Ordering::Relaxed)
    }

    fn turn_off(&self, why: &str) {
        if !self.off.swap(true, Ordering::Relaxed) {
            tracing::info!(%why, "reading through the replica, not from its files");
        }
        self.close();
    }

    /// Closes the files held (the next direct read lists them again).
    pub fn close(&self) {
        let mut chain = self.chain.lock().unwrap_or_else(|e| e.into_inner());
        self.closes.fetch_add(1, Ordering::Relaxed);
        *chain = None;
    }

    /// What to pass to [`DirectReads::open`] for a listing asked for now.
    pub fn closes(&self) -> u64 {
        self.closes.load(Ordering::Relaxed)
    }

    /// Whether files of any chain are open.
    pub fn is_open(&self) -> bool {
        self.chain
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Whether the files of `chain_version` are open.
    pub fn has(&self, chain_version: u64) -> bool {
        self.open_chain()
            .is_some_and(|c| c.chain_version == chain_version)
    }

    fn open_chain(&self) -> Option<OpenChain> {
        self.chain.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Opens the files LAYERS listed, replacing those held (which closes
    /// them), unless they were closed since the listing was asked for
    /// (`closes`: [`DirectReads::closes`] then). Turns direct reads off if
    /// they are on another node or none can be opened from here.
    pub fn open(&self, listed: LayerFiles, closes: u64) {
        if listed.boot_id.is_empty() || listed.boot_id != boot_id() {
            return self.turn_off("the replica runs on another node");
        }
        let files: Arc<[Option<File>]> = listed
            .files
            .iter()
            .map(|f| open_listed(&listed.dir, &f.name, f.dev, Some(f.ino)))
            .collect();
        let head = open_head(&listed, &files).map(Arc::new);
        if !listed.files.is_empty() && files.iter().all(Option::is_none) {
            return self.turn_off(&format!(
                "its files in {} are not reachable from here",
                listed.dir.display()
            ));
        }
        let mut chain = self.chain.lock().unwrap_or_else(|e| e.into_inner());
        // Keep the newer of two concurrent listings.
        if self.closes.load(Ordering::Relaxed) == closes
            && chain
                .as_ref()
                .is_none_or(|c| c.chain_version <= listed.chain_version)
        {
            *chain = Some(OpenChain {
                chain_version: listed.chain_version,
                files,
                head,
            });
        }
    }

    /// Reads a located range from the files, checking it against its
    /// claimed crc.
    pub fn read(&self, located: &Located) -> DirectRead {
        let Some(chain) = self
            .open_chain()
            .filter(|c| c.chain_version == located.chain_version)
        else {
            return DirectRead::NotHere;
        };
        let length: u64 = located.pieces.iter().map(|p| p.len).sum();
        let mut buf = Vec::with_capacity(length as usize);
        for p in &located.pieces {
            let Some(layer) = p.layer else {
                buf.resize(buf.len() + p.len as usize, 0);
                continue;
            };
            let Some(Some(file)) = chain.files.get(layer as usize) else {
                return DirectRead::NotHere;
            };
            if let Err(e) = read_appending(file, p.at, p.len as usize, &mut buf) {
                tracing::debug!(error = %e, at = p.at, "direct read failed; reading through the replica");
                return DirectRead::NotHere;
            }
        }
        let crc = crate::crc::of(&buf);
        if crc != located.crc {
            return DirectRead::Mismatch(format!(
                "read from the files: crc {crc:#010x}, recorded {:#010x}",
                located.crc
            ));
        }
        DirectRead::Data(buf.into())
    }

    /// Reads whole blocks from the head without asking the replica, where
    /// that is sure to return what a READ would (see the module
    /// documentation). `None` for anything else, data that fails its
    /// checksum included: the replica then reads it and tells bit rot from
    /// a racing write.
    pub fn read_head(&self, offset: u64, len: u64) -> Option<Bytes> {
        let head = self.open_chain()?.head?;
        match head.read(self.owner, offset, len) {
            Ok(data) => data.map(Bytes::from),
            Err(e) => {
                tracing::debug!(error = %e, offset, "head read failed; reading through the replica");
                None
            }
        }
    }
}

impl HeadFiles {
    /// Whole blocks from the head, if every one of them is certain to be
    /// what a READ returns; see the module documentation.
    fn read(&self, owner: Owner, offset: u64, len: u64) -> std::io::Result<Option<Vec<u8>>> {
        let aligned = offset.is_multiple_of(BLOCK_SIZE) && len.is_multiple_of(BLOCK_SIZE);
        if !aligned || !self.leased_to(owner)? {
            return Ok(None);
        }
        let end = offset + len;
        if !self.only_layer && data_extents_upto(&self.data, offset, end, len)? != [(offset, end)] {
            return Ok(None);
        }
        let mut buf = Vec::with_capacity(len as usize);
        read_appending(&self.data, offset, len as usize, &mut buf)?;
        let first_block = offset / BLOCK_SIZE;
        Ok(verify_recorded(&self.checksums, 0, first_block, &buf, self.only_layer)?.then_some(buf))
    }

    /// Whether the replica's newest state record names `owner`.
    fn leased_to(&self, owner: Owner) -> std::io::Result<bool> {
        let mut both = [0u8; STATE_LEN];
        self.state.read_exact_at(&mut both, 0)?;
        Ok(newest(&both).is_some_and(|(_, r)| {
            owner.generation.0 > 0
                && r.generation == owner.generation
                && r.engine_id == owner.engine_id
        }))
    }
}

/// Opens `dir/name` read-only if it is the file listed (same device and
/// inode) and named as a replica's files are (nothing outside `dir`).
fn open_listed(dir: &std::path::Path, name: &str, dev: u64, ino: Option<u64>) -> Option<File> {
    use std::os::unix::fs::MetadataExt;
    let ours = name.starts_with("volume-") || name == crate::state::STATE_FILE;
    if !ours || name.contains('/') {
        return None;
    }
    let file = File::open(dir.join(name)).ok()?;
    let m = file.metadata().ok()?;
    (m.dev() == dev && Some(m.ino()) == ino).then_some(file)
}

/// The head's data, its checksums and the state file, as listed.
fn open_head(listed: &LayerFiles, files: &[Option<File>]) -> Option<HeadFiles> {
    let head = listed.files.last()?;
    let data = files.last()?.as_ref()?.try_clone().ok()?;
    let sidecar = crate::checksum::sidecar_name(&head.name);
    let checksums = open_listed(&listed.dir, &sidecar, head.dev, head.sidecar_ino)?;
    let state = open_listed(
        &listed.dir,
        crate::state::STATE_FILE,
        head.dev,
        listed.state_ino,
    )?;
    Some(HeadFiles {
        data,
        checksums,
        state,
        only_layer: listed.files.len() == 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(dir: &std::path::Path, boot: &str, names: &[&str]) -> LayerFiles {
        use std::os::unix::fs::MetadataExt;
        let files = names
            .iter()
            .map(|name| {
                let m = std::fs::metadata(dir.join("volume-head-000.img")).unwrap();
                LayerFile {
                    name: name.to_string(),
                    dev: m.dev(),
                    ino: m.ino(),
                    sidecar_ino: None,
                }
            })
            .collect();
        LayerFiles {
            chain_version: 5,
            boot_id: boot.into(),
            dir: dir.into(),
            files,
            state_ino: None,
        }
    }

    #[test]
    fn only_the_listed_files_of_this_boot_are_opened() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("volume-head-000.img"), [7u8; 4096]).unwrap();
        std::fs::write(tmp.path().join("volume-head-001.img"), [7u8; 4096]).unwrap();
        let located = Located {
            chain_version: 5,
            crc: crate::crc::of(&[7u8; 4096]),
            pieces: vec![Piece {
                layer: Some(0),
                at: 0,
                len: 4096,
            }],
        };

        let d = DirectReads::default();
        d.open(
            listing(tmp.path(), boot_id(), &["volume-head-000.img"]),
            d.closes(),
        );
        assert!(d.has(5) && d.is_on());
        assert!(matches!(d.read(&located), DirectRead::Data(b) if b[..] == [7u8; 4096]));
        let other = Located {
            crc: 1,
            ..located.clone()
        };
        assert!(matches!(d.read(&other), DirectRead::Mismatch(_)));
        let newer = Located {
            chain_version: 6,
            ..located.clone()
        };
        assert!(matches!(d.read(&newer), DirectRead::NotHere));

        // A listing asked for before a close (a purge step) is not kept.
        let asked = d.closes();
        d.close();
        d.open(
            listing(tmp.path(), boot_id(), &["volume-head-000.img"]),
            asked,
        );
        assert!(!d.has(5) && d.is_on());

        // Another node's replica.
        let d = DirectReads::default();
        d.open(
            listing(tmp.path(), "another-boot", &["volume-head-000.img"]),
            0,
        );
        assert!(!d.is_on() && !d.has(5));

        // Same name, another inode; a name reaching outside the directory.
        for name in ["volume-head-001.img", "../volume-head-000.img"] {
            let d = DirectReads::default();
            d.open(listing(tmp.path(), boot_id(), &[name]), 0);
            assert!(!d.is_on(), "{name}");
        }
    }

    #[test]
    fn a_located_range_decodes_as_encoded_and_bad_ones_are_refused() {
        let mut b = Vec::new();
        b.extend_from_slice(&7u32.to_le_bytes());
        b.extend_from_slice(&2u32.to_le_bytes());
        for (layer, at, len) in [(1u32, 8192u64, 4096u32), (HOLE, 0, 8192)] {
            b.extend_from_slice(&layer.to_le_bytes());
            b.extend_from_slice(&at.to_le_bytes());
            b.extend_from_slice(&len.to_le_bytes());
        }
        let l = decode_located(3, &b, 12288).unwrap().unwrap();
        assert_eq!(l.crc, 7);
        assert_eq!(l.chain_version, 3);
        assert_eq!(
            l.pieces,
            vec![
                Piece {
                    layer: Some(1),
                    at: 8192,
                    len: 4096
                },
                Piece {
                    layer: None,
                    at: 0,
                    len: 8192
                }
            ]
        );
        assert_eq!(decode_located(3, &[], 4096), Ok(None));
        assert!(decode_located(3, &b, 4096).is_err(), "wrong total");
        assert!(decode_located(3, &b[..b.len() - 1], 12288).is_err());
        assert!(decode_located(3, &b[..5], 12288).is_err());
    }
}
