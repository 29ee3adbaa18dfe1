//! The replica wire protocol.
//!
//! Every message is a frame: a fixed-layout little-endian header, then
//! `payload_len` bytes of payload. A crc32c covers the header (without its
//! crc field) and the payload; it is checked before anything in the frame
//! is acted on. Frames longer than [`MAX_PAYLOAD`] are refused before their
//! payload is read.
//!
//! Why a hand-written fixed layout and not a serialization crate: the data
//! path wants a header it can decode with bounds-checked slices and no
//! allocation, whose size is known before the payload arrives, and whose
//! format is stable across compiler and crate versions. (`bincode` 3.0 is a
//! deliberate compile error and 2.x is unmaintained.) The two control-path
//! payloads that carry structure (the [`ReplicaInfo`](crate::ReplicaInfo)
//! in replies to HELLO and INFO) are JSON.
//!
//! ```text
//! request  (48 bytes): magic u32 "RVQ1" | op u8 | flags u8 | 0 u16 | id u64
//!                      | offset u64 | length u64 | epoch u64
//!                      | payload_len u32 | crc u32
//! reply    (32 bytes): magic u32 "RVR1" | status u16 | flags u16 | id u64
//!                      | value u64 | payload_len u32 | crc u32
//! ```
//!
//! A reply's crc normally comes from the bytes sent. A READ asked with
//! [`FLAG_STORED_CRC`] may instead be answered straight from the layer
//! files (sendfile), sealed with the checksums recorded for those blocks
//! and marked [`REPLY_STORED_CRC`]: the replica never looked at the data,
//! so a mismatch there means the data is not what was recorded (or
//! changed under the send), not that the stream is broken. The client
//! hands such a mismatch to the caller, which reads again verified.
//!
//! # Encrypted volumes
//!
//! The blocks of an encrypted volume travel sealed, each with its nonce
//! and tag (`auth`, a size fixed by the cipher the volume was bound with).
//! A payload of data, a WRITE's or WRITE_LAYER's or the reply to a READ or
//! READ_LAYER, is then the blocks followed by their auths in the same
//! order: `[block 0]..[block n-1][auth 0]..[auth n-1]`. The header's
//! `length` still counts the blocks only. A hole, or a block made zeros by
//! WRITE_ZEROES, has an auth of zeros.
//!
//! The first request on a connection must be HELLO (payload: [`Hello`]).
//! A HELLO with generation 0 is a probe: the replica answers with its
//! [`ReplicaInfo`](crate::ReplicaInfo) and closes, taking nothing over, so
//! an engine can learn every replica's generation before it picks its own.
//! After it, requests are pipelined: the client may send many before the
//! first reply, and replies may come back in any order, matched by `id`.
//!
//! `epoch` tags modifications and flushes with the engine's flush epoch;
//! see [`crate::dirty`] for what the replica does with it.

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt};
use uuid::Uuid;

pub const REQUEST_MAGIC: u32 = u32::from_le_bytes(*b"RVQ1");
pub const REPLY_MAGIC: u32 = u32::from_le_bytes(*b"RVR1");
pub const REQUEST_HEADER_LEN: usize = 48;
pub const REPLY_HEADER_LEN: usize = 32;
/// 2: LAYER_CHECKSUMS takes [`FLAG_PER_BLOCK`]; PUNCH_LAYER replaces
/// LAYER_ALLOCATION and WRITE_LAYER's zero punching. 3: LOCATE and LAYERS
/// ([`crate::direct`]). 4: encrypted volumes (HELLO names the encryption;
/// data payloads of WRITE, READ, READ_LAYER and WRITE_LAYER carry each
/// block's nonce and tag after the blocks).
pub const PROTOCOL_VERSION: u32 = 4;
/// Largest payload of any frame, and largest read a request may ask for.
pub const MAX_PAYLOAD: u32 = 8 << 20;
pub const HELLO_LEN: usize = 40;

/// Write flag: durable before the reply (forced unit access).
pub const FLAG_FUA: u8 = 1;
/// READ flag: skip checksum verification (the engine's last resort).
pub const FLAG_UNVERIFIED: u8 = 4;
/// LAYER_CHECKSUMS flag: one checksum per block instead of per rebuild
/// chunk.
pub const FLAG_PER_BLOCK: u8 = 8;
/// READ flag: the reply may be sent from the files and sealed with the
/// recorded checksums (see the module documentation).
pub const FLAG_STORED_CRC: u8 = 16;
/// Reply flag: sealed with recorded checksums, not from the bytes sent.
pub const REPLY_STORED_CRC: u16 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    Hello = 1,
    Read = 2,
    Write = 3,
    Trim = 4,
    WriteZeroes = 5,
    /// Payload: the UUIDs of the replicas in the set when the barrier of
    /// flush epoch `epoch` passed, 16 bytes each (empty: none named).
    Flush = 6,
    Info = 7,
    /// Flush and record a clean shutdown.
    MarkClean = 8,
    /// Allocation of a range (payload of the reply: [`encode_extents`]).
    Allocation = 9,
    /// Regions modified since the last barrier flush (payload of the reply:
    /// [`encode_extents`] runs of `(bytes, dirty)` over the whole volume).
    Dirty = 10,
    /// Freeze the head as a snapshot layer (flag 1: user-created); payload
    /// `[name_len u16][name][labels as JSON, may be empty]`; reply payload:
    /// the layer's file name.
    Snapshot = 11,
    /// xxh3 hash per rebuild chunk (per block with [`FLAG_PER_BLOCK`]) of
    /// layer `payload` over offset/length, at most
    /// [`crate::store::MAX_CHECKSUMS`] of them; reply payload: 9 bytes
    /// each, `[allocated u8][hash u64]`.
    LayerChecksums = 12,
    /// Read offset/length of layer `payload`.
    ReadLayer = 13,
    /// Write into a layer below the head at offset; payload
    /// `[name_len u16][name][data]`. Zero blocks are written as data: an
    /// allocated zero block shadows the layers below, a hole does not.
    WriteLayer = 14,
    /// Payload: JSON list of `[name, LayerMeta]`, the chain below the head.
    PrepareRebuild = 15,
    /// End a rebuild; `offset` carries the revision counter to adopt.
    FinishRebuild = 16,
    /// Mark snapshot `payload` removed; reply value 1 if it was not before.
    RemoveSnapshot = 17,
    /// One purge step; reply payload: JSON `PurgeReport`, empty when done.
    PurgeStep = 18,
    /// Make the head a new empty layer on snapshot `payload`.
    Revert = 19,
    /// Grow the volume to `offset` bytes.
    Expand = 20,
    // 21 was LAYER_ALLOCATION (protocol 1).
    /// Read and check every block of every layer; reply payload: JSON
    /// `ScrubReport`.
    Scrub = 22,
    /// Punch offset/length out of layer `payload` below the head.
    PunchLayer = 23,
    /// Where offset/length is stored, for reading it from the files
    /// ([`crate::direct`]); reply value: the chain version, payload:
    /// [`crate::direct::encode_located`], empty if it cannot be located.
    Locate = 24,
    /// The chain's files; reply payload: JSON
    /// [`crate::direct::LayerFiles`].
    Layers = 25,
    /// Where the view of snapshot layer `[name]` holds data over
    /// offset/length, or with payload `[name_len u16][name][base]` where
    /// it may differ from that of the older layer `base`; reply payload:
    /// [`encode_extents`] runs ([`crate::snapshot_view`]).
    SnapshotExtents = 26,
    /// Read offset/length of the view of snapshot layer `payload`, as
    /// READ_LAYER replies.
    ReadSnapshot = 27,
}

impl Op {
    /// Whether the op may change the replica's chain of layers or write
    /// below its head (what a reader of its files must know about, see
    /// [`crate::direct`]).
    pub fn changes_chain(self) -> bool {
        matches!(
            self,
            Op::Snapshot
                | Op::WriteLayer
                | Op::PunchLayer
                | Op::PrepareRebuild
                | Op::FinishRebuild
                | Op::RemoveSnapshot
                | Op::PurgeStep
                | Op::Revert
                | Op::Expand
        )
    }

    pub fn from_u8(v: u8) -> Option<Op> {
        Some(match v {
            1 => Op::Hello,
            2 => Op::Read,
            3 => Op::Write,
            4 => Op::Trim,
            5 => Op::WriteZeroes,
            6 => Op::Flush,
            7 => Op::Info,
            8 => Op::MarkClean,
            9 => Op::Allocation,
            10 => Op::Dirty,
            11 => Op::Snapshot,
            12 => Op::LayerChecksums,
            13 => Op::ReadLayer,
            14 => Op::WriteLayer,
            15 => Op::PrepareRebuild,
            16 => Op::FinishRebuild,
            17 => Op::RemoveSnapshot,
            18 => Op::PurgeStep,
            19 => Op::Revert,
            20 => Op::Expand,
            22 => Op::Scrub,
            23 => Op::PunchLayer,
            24 => Op::Locate,
            25 => Op::Layers,
            26 => Op::SnapshotExtents,
            27 => Op::ReadSnapshot,
            _ => return None,
        })
    }
}

/// Reply status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Status {
    Ok = 0,
    Invalid = 1,
    Io = 2,
    NoSpace = 3,
    Fenced = 4,
    WrongVolume = 5,
    VersionMismatch = 6,
    Unsupported = 7,
    Corrupt = 8,
    /// Data did not match its checksum (see [`crate::checksum`]).
    Checksum = 9,
    /// The caller's certificate does not allow what it asked.
    Denied = 10,
    /// The request came on a connection its engine has since replaced by
    /// a newer one (see [`Hello::session`]).
    Superseded = 11,
}

impl Status {
    pub fn from_u16(v: u16) -> Status {
        match v {
            0 => Status::Ok,
            1 => Status::Invalid,
            2 => Status::Io,
            3 => Status::NoSpace,
            4 => Status::Fenced,
            5 => Status::WrongVolume,
            6 => Status::VersionMismatch,
            7 => Status::Unsupported,
            9 => Status::Checksum,
            10 => Status::Denied,
            11 => Status::Superseded,
            _ => Status::Corrupt,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// The raw op: unknown values are answered with `Unsupported`.
    pub op: u8,
    pub flags: u8,
    pub id: u64,
    pub offset: u64,
    pub length: u64,
    pub epoch: u64,
    pub payload_len: u32,
    pub crc: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyHeader {
    pub status: u16,
    /// [`REPLY_STORED_CRC`] or 0.
    pub flags: u16,
    pub id: u64,
    pub value: u64,
    pub payload_len: u32,
    pub crc: u32,
}

/// Why a frame was refused. Any of these closes the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("bad magic {0:#010x}")]
    BadMagic(u32),
    #[error("reserved header bits set")]
    Reserved,
    #[error("payload of {0} bytes exceeds the limit of {MAX_PAYLOAD}")]
    TooLong(u32),
    #[error("crc mismatch: frame says {expected:#010x}, computed {actual:#010x}")]
    BadCrc { expected: u32, actual: u32 },
    #[error("frame truncated")]
    Truncated,
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}
fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}
fn u64_at(b: &[u8], i: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[i..i + 8]);
    u64::from_le_bytes(a)
}

/// The crc of a frame: its header without the crc field, then a payload
/// of `payload_len` bytes whose own crc32c is `payload_crc`.
fn frame_crc(header_without_crc: &[u8], payload_crc: u32, payload_len: u32) -> u32 {
    crate::crc::concat(
        crate::crc::of(header_without_crc),
        payload_crc,
        payload_len as u64,
    )
}

impl RequestHeader {
    pub fn encode(&self, payload: &[u8]) -> [u8; REQUEST_HEADER_LEN] {
        self.encode_sealed(payload.len() as u32, crate::crc::of(payload))
    }

    /// Encodes with a payload known by its length and crc32c, so that a
    /// payload sent to several replicas is checksummed once.
    pub fn encode_sealed(&self, payload_len: u32, payload_crc: u32) -> [u8; REQUEST_HEADER_LEN] {
        let mut b = [0u8; REQUEST_HEADER_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_le_bytes());
        b[4] = self.op;
        b[5] = self.flags;
        b[8..16].copy_from_slice(&self.id.to_le_bytes());
        b[16..24].copy_from_slice(&self.offset.to_le_bytes());
        b[24..32].copy_from_slice(&self.length.to_le_bytes());
        b[32..40].copy_from_slice(&self.epoch.to_le_bytes());
        b[40..44].copy_from_slice(&payload_len.to_le_bytes());
        let crc = frame_crc(&b[..44], payload_crc, payload_len);
        b[44..48].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes a header; the payload is checked later by [`Self::verify`].
    pub fn decode(b: &[u8]) -> Result<RequestHeader, FrameError> {
        if b.len() < REQUEST_HEADER_LEN {
            return Err(FrameError::Truncated);
        }
        let magic = u32_at(b, 0);
        if magic != REQUEST_MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        if u16_at(b, 6) != 0 {
            return Err(FrameError::Reserved);
        }
        let payload_len = u32_at(b, 40);
        if payload_len > MAX_PAYLOAD {
            return Err(FrameError::TooLong(payload_len));
        }
        Ok(RequestHeader {
            op: b[4],
            flags: b[5],
            id: u64_at(b, 8),
            offset: u64_at(b, 16),
            length: u64_at(b, 24),
            epoch: u64_at(b, 32),
            payload_len,
            crc: u32_at(b, 44),
        })
    }

    /// Checks the crc of a decoded header (`raw`) and its payload.
    pub fn verify(&self, raw: &[u8], payload: &[u8]) -> Result<(), FrameError> {
        self.verify_sealed(raw, crate::crc::of(payload))
    }

    /// [`Self::verify`] for a payload known by its crc32c.
    pub fn verify_sealed(&self, raw: &[u8], payload_crc: u32) -> Result<(), FrameError> {
        let actual = frame_crc(&raw[..44], payload_crc, self.payload_len);
        if actual != self.crc {
            return Err(FrameError::BadCrc {
                expected: self.crc,
                actual,
            });
        }
        Ok(())
    }
}

impl ReplyHeader {
    pub fn encode(&self, payload: &[u8]) -> [u8; REPLY_HEADER_LEN] {
        self.encode_sealed(payload.len() as u32, crate::crc::of(payload))
    }

    /// Like [`ReplyHeader::encode`], for a payload whose crc32c is known.
    pub fn encode_sealed(&self, payload_len: u32, payload_crc: u32) -> [u8; REPLY_HEADER_LEN] {
        let mut b = [0u8; REPLY_HEADER_LEN];
        b[0..4].copy_from_slice(&REPLY_MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&self.status.to_le_bytes());
        b[6..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..16].copy_from_slice(&self.id.to_le_bytes());
        b[16..24].copy_from_slice(&self.value.to_le_bytes());
        b[24..28].copy_from_slice(&payload_len.to_le_bytes());
        let crc = frame_crc(&b[..28], payload_crc, payload_len);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<ReplyHeader, FrameError> {
        if b.len() < REPLY_HEADER_LEN {
            return Err(FrameError::Truncated);
        }
        let magic = u32_at(b, 0);
        if magic != REPLY_MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        if u16_at(b, 6) & !REPLY_STORED_CRC != 0 {
            return Err(FrameError::Reserved);
        }
        let payload_len = u32_at(b, 24);
        if payload_len > MAX_PAYLOAD {
            return Err(FrameError::TooLong(payload_len));
        }
        Ok(ReplyHeader {
            status: u16_at(b, 4),
            flags: u16_at(b, 6),
            id: u64_at(b, 8),
            value: u64_at(b, 16),
            payload_len,
            crc: u32_at(b, 28),
        })
    }

    pub fn verify(&self, raw: &[u8], payload: &[u8]) -> Result<(), FrameError> {
        let actual = frame_crc(&raw[..28], crate::crc::of(payload), payload.len() as u32);
        if actual != self.crc {
            return Err(FrameError::BadCrc {
                expected: self.crc,
                actual,
            });
        }
        Ok(())
    }
}

/// Decodes one whole request frame from the front of `buf`: the header,
/// the verified payload and the bytes consumed. For tests and fuzzing; the
/// server reads header and payload from the socket separately.
pub fn decode_request(buf: &[u8]) -> Result<(RequestHeader, &[u8], usize), FrameError> {
    let h = RequestHeader::decode(buf)?;
    let end = REQUEST_HEADER_LEN + h.payload_len as usize;
    if buf.len() < end {
        return Err(FrameError::Truncated);
    }
    let payload = &buf[REQUEST_HEADER_LEN..end];
    h.verify(&buf[..REQUEST_HEADER_LEN], payload)?;
    Ok((h, payload, end))
}

/// Reads exactly `n` more bytes into `buf` without zeroing it first.
pub async fn read_payload<R: AsyncRead + Unpin, B: bytes::BufMut>(
    rd: &mut R,
    buf: &mut B,
    n: usize,
) -> std::io::Result<()> {
    let mut limited = bytes::BufMut::limit(buf, n);
    while bytes::BufMut::has_remaining_mut(&limited) {
        if rd.read_buf(&mut limited).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(())
}

/// UUIDs as sent in a FLUSH payload.
pub fn encode_uuids(ids: &[Uuid]) -> Vec<u8> {
    ids.iter().flat_map(|u| *u.as_bytes()).collect()
}

pub fn decode_uuids(b: &[u8]) -> Option<Vec<Uuid>> {
    if !b.len().is_multiple_of(16) {
        return None;
    }
    Some(
        b.chunks_exact(16)
            .map(|c| Uuid::from_bytes(c.try_into().unwrap_or_default()))
            .collect(),
    )
}

/// Checksums as sent in a LAYER_CHECKSUMS reply.
pub fn encode_checksums(sums: &[Option<u64>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(sums.len() * 9);
    for s in sums {
        out.push(s.is_some() as u8);
        out.extend_from_slice(&s.unwrap_or(0).to_le_bytes());
    }
    out
}

pub fn decode_checksums(b: &[u8]) -> Option<Vec<Option<u64>>> {
    if !b.len().is_multiple_of(9) {
        return None;
    }
    b.chunks_exact(9)
        .map(|c| match c[0] {
            0 => Some(None),
            1 => Some(Some(u64_at(c, 1))),
            _ => None,
        })
        .collect()
}

/// Builds a `[name_len u16][name][data]` payload (WRITE_LAYER, SNAPSHOT).
pub fn layer_payload(name: &str, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(2 + name.len() + data.len());
    b.extend_from_slice(&(name.len() as u16).to_le_bytes());
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(data);
    b
}

/// Splits a `[name_len u16][name][data]` payload into name and data.
pub fn split_layer_payload(b: &[u8]) -> Option<(&str, &[u8])> {
    let n = u16::from_le_bytes([*b.first()?, *b.get(1)?]) as usize;
    let name = std::str::from_utf8(b.get(2..2 + n)?).ok()?;
    Some((name, &b[2 + n..]))
}

/// A payload with its crc32c, computed once however many frames carry it
/// (a write fans out to every replica with a different header each).
#[derive(Debug, Clone, Default)]
pub struct Sealed {
    pub data: Bytes,
    pub crc: u32,
    /// Each block's crc32c when the payload is whole 4 KiB blocks (and
    /// then perhaps their nonces and tags, `tail` bytes): the crc is
    /// derived from them, and a replica in this process records them as
    /// they are, so the payload is checksummed once (see [`crate::crc`]).
    pub block_crcs: Option<std::sync::Arc<[u32]>>,
    /// Bytes after the blocks: the nonces and tags of an encrypted
    /// volume's blocks (see the module documentation).
    pub tail: usize,
}

impl Sealed {
    pub fn new(data: Bytes) -> Sealed {
        if data.is_empty() || !(data.len() as u64).is_multiple_of(crate::BLOCK_SIZE) {
            let crc = crate::crc::of(&data);
            return Sealed {
                data,
                crc,
                block_crcs: None,
                tail: 0,
            };
        }
        Sealed::blocks_then(data, 0)
    }

    /// Whole blocks followed by `tail` bytes of their nonces and tags.
    pub fn blocks_then(payload: Bytes, tail: usize) -> Sealed {
        let blocks_len = payload.len() - tail;
        let mut blocks = Vec::new();
        crate::crc::blocks(&payload[..blocks_len], &mut blocks);
        let mut crc = crate::crc::of_blocks(&blocks);
        if tail > 0 {
            crc = crate::crc::concat(crc, crate::crc::of(&payload[blocks_len..]), tail as u64);
        }
        Sealed {
            data: payload,
            crc,
            block_crcs: Some(blocks.into()),
            tail,
        }
    }

    /// Bytes of data: the payload without its tail.
    pub fn data_len(&self) -> usize {
        self.data.len() - self.tail
    }
}

impl From<Bytes> for Sealed {
    fn from(data: Bytes) -> Sealed {
        Sealed::new(data)
    }
}

/// Payload of HELLO: who is asking, for which volume. The first
/// [`HELLO_LEN`] bytes are fixed; the encryption the engine serves the
/// volume with, if any, follows as JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub protocol_version: u32,
    /// Which of its connections to this replica the engine opens: a number
    /// that grows with every connect of one engine process. Once a HELLO
    /// of a newer session is answered, requests still arriving on an older
    /// connection of the same engine are refused, never applied: a write
    /// the engine gave up on (and acknowledged without this replica) must
    /// not land after the replica was brought back up to date. 0 is no
    /// session (a tool speaking the protocol by hand): it neither replaces
    /// nor is replaced.
    pub session: u32,
    pub volume_uuid: Uuid,
    pub generation: u64,
    pub engine_id: u64,
    pub encryption: Option<crate::meta::Encryption>,
}

impl Hello {
    /// The whole HELLO request, header and payload, as it goes on the wire.
    pub fn frame(&self) -> Vec<u8> {
        let payload = self.encode();
        let h = RequestHeader {
            op: Op::Hello as u8,
            flags: 0,
            id: 0,
            offset: 0,
            length: 0,
            epoch: 0,
            payload_len: payload.len() as u32,
            crc: 0,
        };
        [h.encode(&payload).as_slice(), &payload].concat()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HELLO_LEN];
        b[0..4].copy_from_slice(&self.protocol_version.to_le_bytes());
        b[4..8].copy_from_slice(&self.session.to_le_bytes());
        b[8..24].copy_from_slice(self.volume_uuid.as_bytes());
        b[24..32].copy_from_slice(&self.generation.to_le_bytes());
        b[32..40].copy_from_slice(&self.engine_id.to_le_bytes());
        if let Some(e) = &self.encryption {
            b.extend_from_slice(&serde_json::to_vec(e).unwrap_or_default());
        }
        b
    }

    pub fn decode(b: &[u8]) -> Option<Hello> {
        if b.len() < HELLO_LEN {
            return None;
        }
        let encryption = match &b[HELLO_LEN..] {
            [] => None,
            json => Some(serde_json::from_slice(json).ok()?),
        };
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[8..24]);
        Some(Hello {
            protocol_version: u32_at(b, 0),
            session: u32_at(b, 4),
            volume_uuid: Uuid::from_bytes(uuid),
            generation: u64_at(b, 24),
            engine_id: u64_at(b, 32),
            encryption,
        })
    }
}

/// Allocation runs as 9-byte records: length u64, allocated u8.
pub fn encode_extents(runs: &[(u64, bool)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(runs.len() * 9);
    for &(len, data) in runs {
        out.extend_from_slice(&len.to_le_bytes());
        out.push(data as u8);
    }
    out
}

pub fn decode_extents(b: &[u8]) -> Option<Vec<(u64, bool)>> {
    if !b.len().is_multiple_of(9) {
        return None;
    }
    b.chunks_exact(9)
        .map(|c| match c[8] {
            0 | 1 => Some((u64_at(c, 0), c[8] == 1)),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip_and_corruption() {
        let h = RequestHeader {
            op: Op::Write as u8,
            flags: FLAG_FUA,
            id: 42,
            offset: 4096,
            length: 4096,
            epoch: 3,
            payload_len: 4096,
            crc: 0,
        };
        let payload = vec![7u8; 4096];
        let mut frame = h.encode(&payload).to_vec();
        frame.extend_from_slice(&payload);
        let (d, p, n) = decode_request(&frame).unwrap();
        assert_eq!((d.op, d.id, d.offset, n), (h.op, 42, 4096, frame.len()));
        assert_eq!(p, &payload[..]);
        // Any flipped payload bit is caught.
        frame[REQUEST_HEADER_LEN + 100] ^= 1;
        assert!(matches!(
            decode_request(&frame),
            Err(FrameError::BadCrc { .. })
        ));
        // Oversized frames are refused from the header alone.
        let mut big = h.encode(&[]);
        big[40..44].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        assert_eq!(
            RequestHeader::decode(&big),
            Err(FrameError::TooLong(MAX_PAYLOAD + 1))
        );
    }

    #[test]
    fn hello_and_extents_round_trip() {
        let h = Hello {
            protocol_version: PROTOCOL_VERSION,
            session: 3,
            volume_uuid: Uuid::new_v4(),
            generation: 9,
            engine_id: 77,
            encryption: None,
        };
        assert_eq!(Hello::decode(&h.encode()), Some(h.clone()));
        let encrypted = Hello {
            encryption: Some(crate::meta::Encryption {
                cipher: crate::meta::CIPHER_AES_256_GCM_SIV.into(),
                key_check: "00ff".into(),
            }),
            ..h
        };
        assert_eq!(Hello::decode(&encrypted.encode()), Some(encrypted));
        assert_eq!(Hello::decode(&[0; HELLO_LEN + 2]), None, "not JSON");
        let runs = vec![(4096, true), (8192, false)];
        assert_eq!(decode_extents(&encode_extents(&runs)), Some(runs));
        assert_eq!(decode_extents(&[0; 9 * 2 + 1]), None);
        let sums = vec![Some(u64::MAX), None, Some(7)];
        assert_eq!(decode_checksums(&encode_checksums(&sums)), Some(sums));
        assert_eq!(decode_checksums(&[2, 0, 0, 0, 0, 0, 0, 0, 0]), None);
        assert_eq!(decode_checksums(&[0; 10]), None);
    }
}
