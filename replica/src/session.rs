//! One engine's session on a replica, and what each request does.
//!
//! A session starts with the engine's HELLO, which takes the replica over
//! for the engine's [`Owner`] (or, from a probe, only reports on it); every
//! request after that runs under that owner's lease, so a request of an
//! engine that has since been fenced is refused, never applied. The socket
//! server ([`crate::server`]) runs one session per connection; an engine
//! holding a replica in its own process ([`crate::local`]) runs the same
//! sessions without a socket, so both answer every request alike.
//!
//! Reads, writes, trims and write-zeroes run inline in the caller, before
//! [`Session::run`] returns: they are page-cache copies of a few
//! microseconds, and a connection applies them in the order it sent them.
//! FLUSH, MARK_CLEAN and FUA writes wait for the disk, and rebuild and
//! snapshot operations are slow: they run on the blocking pool, so the
//! requests behind them are not held up, and their replies overtake theirs.
//! A read may therefore run while a FUA write to its blocks is half done;
//! the store checks such a read again before it calls it rot (see the
//! invariants in [`crate::store`]).
//! Replies are matched to requests by id.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use crate::direct::encode_located;
use crate::error::Error;
use crate::proto::{
    encode_extents, Hello, Op, RequestHeader, Sealed, Status, FLAG_FUA, FLAG_PER_BLOCK,
    FLAG_STORED_CRC, FLAG_UNVERIFIED, MAX_PAYLOAD,
};
use crate::server::STORED_READ_MIN;
use crate::store::{ChecksumUnit, Owner, Replica, Segment};

/// A request's answer, before it is framed: the socket writer encodes it, an
/// in-process client takes it as it is.
pub(crate) struct Reply {
    pub(crate) status: Status,
    pub(crate) id: u64,
    pub(crate) value: u64,
    pub(crate) body: Body,
}

pub(crate) enum Body {
    Sealed(Sealed),
    /// Sent from the layer files; the crc is the recorded one.
    Stored(Vec<Segment>, u32),
}

impl Reply {
    pub(crate) fn ok(id: u64, value: u64, payload: impl Into<Sealed>) -> Reply {
        Reply {
            status: Status::Ok,
            id,
            value,
            body: Body::Sealed(payload.into()),
        }
    }

    pub(crate) fn error(id: u64, status: Status, msg: impl std::fmt::Display) -> Reply {
        Reply {
            status,
            id,
            value: 0,
            body: Body::Sealed(Bytes::from(msg.to_string()).into()),
        }
    }

    pub(crate) fn from_err(id: u64, e: &Error) -> Reply {
        let status = match e {
            Error::Invalid(_) => Status::Invalid,
            Error::Io { .. } | Error::InUse(_) => Status::Io,
            Error::NoSpace(_) => Status::NoSpace,
            Error::Fenced(_) => Status::Fenced,
            Error::Superseded(_) => Status::Superseded,
            Error::Mismatch(_) => Status::WrongVolume,
            Error::Corrupt(_) | Error::NotAReplica(_) => Status::Corrupt,
            Error::Checksum(_) => Status::Checksum,
        };
        Reply::error(id, status, e)
    }
}

/// Where a request's reply goes when it is ready.
pub(crate) trait ReplyTo: Send + 'static {
    fn send_reply(self, reply: Reply);
}

/// A connection's queue to its writer task.
impl ReplyTo for mpsc::UnboundedSender<Reply> {
    fn send_reply(self, reply: Reply) {
        // A closed queue means the connection is going away.
        let _ = self.send(reply);
    }
}

/// The caller of one in-process request.
impl ReplyTo for oneshot::Sender<Reply> {
    fn send_reply(self, reply: Reply) {
        let _ = self.send(reply);
    }
}

/// One engine's session; see the module documentation.
pub(crate) struct Session {
    replica: Arc<Replica>,
    owner: Owner,
    /// [`Hello::session`].
    number: u32,
}

impl Session {
    /// Answers HELLO `id` (whose version the caller checked). A probe
    /// (generation 0) gets the replica's report and no session; any other
    /// HELLO takes the replica over, or is refused with the reason.
    pub(crate) async fn open(
        replica: &Arc<Replica>,
        hello: &Hello,
        id: u64,
    ) -> (Reply, Option<Session>) {
        if hello.generation == 0 {
            let json = serde_json::to_vec(&replica.info()).unwrap_or_default();
            return (Reply::ok(id, 0, Bytes::from(json)), None);
        }
        let owner = Owner {
            generation: crate::Generation(hello.generation),
            engine_id: hello.engine_id,
        };
        let (r, volume, encryption) =
            (replica.clone(), hello.volume_uuid, hello.encryption.clone());
        let number = hello.session;
        let taken = match tokio::task::spawn_blocking(move || {
            r.takeover(owner, number, volume, encryption.as_ref())
        })
        .await
        {
            Ok(taken) => taken,
            Err(e) => {
                let reply = Reply::error(id, Status::Io, format!("takeover task failed: {e}"));
                return (reply, None);
            }
        };
        match taken {
            Ok(info) => {
                let json = serde_json::to_vec(&info).unwrap_or_default();
                let session = Session {
                    replica: replica.clone(),
                    owner,
                    number,
                };
                (
                    Reply::ok(id, info.revision.0, Bytes::from(json)),
                    Some(session),
                )
            }
            Err(e) => {
                tracing::warn!(generation = %owner.generation, error = %e, "refused engine");
                (Reply::from_err(id, &e), None)
            }
        }
    }

    /// Runs request `h` (any op but HELLO) and sends its reply to `to`.
    /// `crcs` holds each block's crc32c for a WRITE of whole blocks (they
    /// go to the sidecar), and is empty otherwise.
    pub(crate) fn run(&self, h: &RequestHeader, payload: Bytes, crcs: Vec<u32>, to: impl ReplyTo) {
        let reply = match Op::from_u8(h.op) {
            None => Reply::error(h.id, Status::Unsupported, format!("unknown op {}", h.op)),
            Some(Op::Hello) => Reply::error(h.id, Status::Invalid, "HELLO sent twice"),
            Some(Op::Flush) => match crate::proto::decode_uuids(&payload) {
                None => Reply::error(h.id, Status::Invalid, "malformed FLUSH payload"),
                Some(members) => {
                    let epoch = h.epoch;
                    return self.spawn_durable(h.id, to, move |r| r.flush_barrier(epoch, &members));
                }
            },
            Some(Op::MarkClean) => return self.spawn_durable(h.id, to, |r| r.mark_clean()),
            Some(Op::Write) if h.flags & FLAG_FUA != 0 => {
                let (offset, epoch) = (h.offset, h.epoch);
                return self.spawn_durable(h.id, to, move |r| {
                    r.write_with_crcs(offset, &payload, &crcs, epoch)?;
                    r.flush()
                });
            }
            Some(op)
                if op.changes_chain()
                    || matches!(
                        op,
                        Op::LayerChecksums
                            | Op::ReadLayer
                            | Op::Scrub
                            | Op::SnapshotExtents
                            | Op::ReadSnapshot
                    ) =>
            {
                let h = *h;
                return self
                    .spawn_blocking_reply(h.id, to, move |r| run_layer_op(r, op, &h, &payload));
            }
            Some(op) => match run_inline(self, op, h, &payload, &crcs) {
                Ok(reply) => reply,
                Err(e) => Reply::from_err(h.id, &e),
            },
        };
        to.send_reply(reply);
    }

    /// Runs an operation that waits for the disk on the blocking pool and
    /// replies (value: the persisted revision) when it is done.
    fn spawn_durable(
        &self,
        id: u64,
        to: impl ReplyTo,
        f: impl FnOnce(&Replica) -> crate::Result<crate::Revision> + Send + 'static,
    ) {
        self.spawn_blocking_reply(id, to, move |r| f(r).map(|rev| (rev.0, Bytes::new())));
    }

    /// Runs `f` on the blocking pool under the lease and replies with its
    /// `(value, payload)`.
    fn spawn_blocking_reply(
        &self,
        id: u64,
        to: impl ReplyTo,
        f: impl FnOnce(&Replica) -> crate::Result<(u64, Bytes)> + Send + 'static,
    ) {
        let (r, owner, number) = (self.replica.clone(), self.owner, self.number);
        tokio::task::spawn_blocking(move || {
            let reply = match r.admit(owner, number).and_then(|_lease| f(&r)) {
                Ok((value, payload)) => Reply::ok(id, value, payload),
                Err(e) => Reply::from_err(id, &e),
            };
            to.send_reply(reply);
        });
    }
}

fn run_inline(
    session: &Session,
    op: Op,
    h: &RequestHeader,
    payload: &[u8],
    crcs: &[u32],
) -> crate::Result<Reply> {
    let replica = &*session.replica;
    let _lease = replica.admit(session.owner, session.number)?;
    let ok = |payload: Bytes| Ok(Reply::ok(h.id, 0, payload));
    let read_fits = || check_read_len(replica, h.length);
    match op {
        Op::Read => {
            read_fits()?;
            if h.flags & FLAG_UNVERIFIED != 0 {
                return ok(replica.read_unverified(h.offset, h.length)?.into());
            }
            if h.flags & FLAG_STORED_CRC != 0 && h.length >= STORED_READ_MIN {
                if let Some(stored) = replica.read_stored(h.offset, h.length)? {
                    return Ok(Reply {
                        status: Status::Ok,
                        id: h.id,
                        value: 0,
                        body: Body::Stored(stored.segments, stored.crc),
                    });
                }
            }
            let (data, crc) = replica.read_with_crc(h.offset, h.length)?;
            Ok(Reply::ok(
                h.id,
                0,
                Sealed {
                    data: data.into(),
                    crc,
                    block_crcs: None,
                    tail: 0,
                },
            ))
        }
        Op::Write => {
            if h.length != replica.data_len(payload.len())? as u64 {
                return Err(Error::Invalid(format!(
                    "write length {} disagrees with payload of {} bytes",
                    h.length,
                    payload.len()
                )));
            }
            replica.write_with_crcs(h.offset, payload, crcs, h.epoch)?;
            ok(Bytes::new())
        }
        Op::Trim => {
            replica.trim(h.offset, h.length, h.epoch)?;
            ok(Bytes::new())
        }
        Op::WriteZeroes => {
            replica.write_zeroes(h.offset, h.length, h.epoch)?;
            ok(Bytes::new())
        }
        Op::Locate => {
            read_fits()?;
            Ok(match replica.read_stored(h.offset, h.length)? {
                Some(stored) => Reply::ok(h.id, stored.chain_version, encode_located(&stored)),
                None => Reply::ok(h.id, 0, Bytes::new()),
            })
        }
        Op::Layers => ok(serde_json::to_vec(&replica.layer_files()?)
            .unwrap_or_default()
            .into()),
        Op::Info => ok(serde_json::to_vec(&replica.info())
            .unwrap_or_default()
            .into()),
        Op::Allocation => ok(encode_extents(&replica.allocation(h.offset, h.length)?).into()),
        Op::Dirty => match replica.dirty_runs() {
            Some(runs) => ok(encode_extents(&runs).into()),
            None => Err(Error::Invalid(
                "this replica restarted uncleanly: its dirty map is unknown".into(),
            )),
        },
        _ => Err(Error::Invalid(format!("{op:?} is not inline"))),
    }
}

/// Refuses a read whose reply (its blocks, and their nonces and tags in an
/// encrypted volume) would not fit in a frame.
fn check_read_len(replica: &Replica, length: u64) -> crate::Result<()> {
    let reply = length + length / crate::BLOCK_SIZE * replica.auth_bytes() as u64;
    if reply > MAX_PAYLOAD as u64 {
        return Err(Error::Invalid(format!(
            "read of {length} bytes exceeds the limit of {MAX_PAYLOAD} bytes per reply"
        )));
    }
    Ok(())
}

fn layer_name(payload: &[u8]) -> crate::Result<&str> {
    std::str::from_utf8(payload).map_err(|_| Error::Invalid("layer name is not UTF-8".into()))
}

fn run_layer_op(
    r: &Replica,
    op: Op,
    h: &RequestHeader,
    payload: &[u8],
) -> crate::Result<(u64, Bytes)> {
    match op {
        Op::Snapshot => {
            let (name, labels) = crate::proto::split_layer_payload(payload)
                .ok_or_else(|| Error::Invalid("malformed SNAPSHOT payload".into()))?;
            let labels = if labels.is_empty() {
                Default::default()
            } else {
                serde_json::from_slice(labels)
                    .map_err(|e| Error::Invalid(format!("snapshot labels: {e}")))?
            };
            let layer = r.snapshot(name, h.flags & 1 != 0, labels)?;
            Ok((0, layer.into_bytes().into()))
        }

        Op::LayerChecksums => {
            let unit = if h.flags & FLAG_PER_BLOCK != 0 {
                ChecksumUnit::Block
            } else {
                ChecksumUnit::Chunk
            };
            let sums = r.layer_checksums(layer_name(payload)?, h.offset, h.length, unit)?;
            Ok((0, crate::proto::encode_checksums(&sums).into()))
        }
        Op::ReadLayer => {
            check_read_len(r, h.length)?;
            Ok((
                0,
                r.read_layer(layer_name(payload)?, h.offset, h.length)?
                    .into(),
            ))
        }
        Op::ReadSnapshot => {
            check_read_len(r, h.length)?;
            Ok((
                0,
                r.read_snapshot(layer_name(payload)?, h.offset, h.length)?
                    .into(),
            ))
        }
        Op::SnapshotExtents => {
            let (name, base) = crate::proto::split_layer_payload(payload)
                .ok_or_else(|| Error::Invalid("malformed SNAPSHOT_EXTENTS payload".into()))?;
            let base = match base {
                [] => None,
                b => Some(layer_name(b)?),
            };
            let runs = r.snapshot_extents(name, base, h.offset, h.length)?;
            Ok((0, encode_extents(&runs).into()))
        }
        Op::WriteLayer => {
            let (name, data) = crate::proto::split_layer_payload(payload)
                .ok_or_else(|| Error::Invalid("malformed WRITE_LAYER payload".into()))?;
            r.write_layer(name, h.offset, data)?;
            Ok((0, Bytes::new()))
        }
        Op::PunchLayer => {
            r.punch_layer(layer_name(payload)?, h.offset, h.length)?;
            Ok((0, Bytes::new()))
        }
        Op::PrepareRebuild => {
            let chain: Vec<(String, crate::meta::LayerMeta)> = serde_json::from_slice(payload)
                .map_err(|e| Error::Invalid(format!("malformed rebuild chain: {e}")))?;
            r.prepare_rebuild(&chain)?;
            Ok((0, Bytes::new()))
        }
        Op::FinishRebuild => {
            r.finish_rebuild(crate::Revision(h.offset))?;
            Ok((0, Bytes::new()))
        }
        Op::RemoveSnapshot => Ok((
            r.remove_snapshot(layer_name(payload)?)? as u64,
            Bytes::new(),
        )),
        Op::PurgeStep => Ok((
            0,
            match r.purge_step()? {
                Some(report) => serde_json::to_vec(&report).unwrap_or_default().into(),
                None => Bytes::new(),
            },
        )),
        Op::Revert => {
            r.revert(layer_name(payload)?)?;
            Ok((0, Bytes::new()))
        }
        Op::Expand => {
            r.expand(h.offset)?;
            Ok((0, Bytes::new()))
        }
        Op::Scrub => Ok((
            0,
            serde_json::to_vec(&r.scrub()?).unwrap_or_default().into(),
        )),
        _ => Err(Error::Invalid(format!("{op:?} is not a layer operation"))),
    }
}
