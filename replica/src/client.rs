//! The engine's side of the replica protocol.
//!
//! A [`ReplicaClient`] holds several connections to one replica, each
//! pipelined: a request gets an id, is queued to the connection's writer
//! task, and its caller awaits the reply that the reader task routes back
//! by id. Connections are used round-robin. When a connection breaks, every
//! request waiting on it fails at once with [`ClientError::Lost`]; the
//! client stays usable on its remaining connections, and is dead (every
//! request fails) when none remain. Timeouts are the caller's business.
//!
//! For a `local:DIR` endpoint the client holds no connection: it runs a
//! session on the replica in this process ([`crate::local`]) and hands it
//! each request as it is, so the rest of the engine cannot tell the two
//! apart.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::coalesce::FrameWriter;
use crate::direct::{self, DirectRead, DirectReads, DIRECT_READ_MIN};
use crate::ids::Revision;
use crate::proto::{
    decode_extents, FrameError, Hello, Op, ReplyHeader, RequestHeader, Sealed, Status, FLAG_FUA,
    FLAG_PER_BLOCK, FLAG_STORED_CRC, FLAG_UNVERIFIED, PROTOCOL_VERSION, REPLY_HEADER_LEN,
    REPLY_STORED_CRC,
};
use crate::server::Endpoint;
use crate::session::{Body, Session};
use crate::store::ChecksumUnit;
use crate::store::{Owner, ReplicaInfo};
use rvol_tls::ClientTls;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to {endpoint}: {message}")]
    Connect { endpoint: String, message: String },
    #[error("replica answered {status:?}: {message}")]
    Remote { status: Status, message: String },
    #[error("connection to replica lost: {0}")]
    Lost(String),
    #[error("replica sent a bad frame: {0}")]
    Frame(#[from] FrameError),
    /// A reply to [`ReplicaClient::read_stored`] did not match the
    /// checksums recorded for its blocks; read again with
    /// [`ReplicaClient::read`], which says which block is bad, if any.
    #[error("read data does not match its recorded checksums: {0}")]
    StoredCrcMismatch(String),
}

impl ClientError {
    /// The replica refused us because a newer engine took it over.
    pub fn is_fenced(&self) -> bool {
        matches!(
            self,
            ClientError::Remote {
                status: Status::Fenced,
                ..
            }
        )
    }

    /// The replica refused a request of a connection this engine has
    /// replaced since: it says nothing about the newer one.
    pub fn is_superseded(&self) -> bool {
        matches!(
            self,
            ClientError::Remote {
                status: Status::Superseded,
                ..
            }
        )
    }
}

pub type Result<T> = std::result::Result<T, ClientError>;

/// A reply: its `value` field and payload.
pub struct Reply {
    pub value: u64,
    pub payload: Bytes,
}

struct Outgoing {
    header: [u8; crate::proto::REQUEST_HEADER_LEN],
    payload: Bytes,
}

type Pending = HashMap<u64, oneshot::Sender<Result<Reply>>>;

struct Conn {
    tx: mpsc::UnboundedSender<Outgoing>,
    /// `None` once the connection is dead.
    pending: Mutex<Option<Pending>>,
    next_id: AtomicU64,
}

/// Connections to one replica; see the module documentation.
pub struct ReplicaClient {
    endpoint: Endpoint,
    transport: Transport,
    /// Set when asked for and the replica is a process: whether its files
    /// turn out to be readable from here is learnt at the first read.
    direct: Option<DirectReads>,
    /// Bytes of nonce and tag per block of an encrypted volume (0: plain).
    auth: usize,
}

/// What [`ReplicaClient::read_stored`] read.
pub struct StoredRead {
    pub data: Bytes,
    /// Read here from the replica's files ([`crate::direct`]).
    pub from_files: bool,
}

/// Its length, not its megabytes of data.
impl std::fmt::Debug for StoredRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredRead")
            .field("len", &self.data.len())
            .field("from_files", &self.from_files)
            .finish()
    }
}

/// How a client reaches a replica process.
#[derive(Clone)]
pub struct Links {
    /// Pipelined connections.
    pub connections: usize,
    /// Read large ranges from the replica's files when it runs on this
    /// node ([`crate::direct`]).
    pub direct_reads: bool,
    /// Mutual TLS on TCP connections (Unix sockets never carry it).
    pub tls: Option<Arc<ClientTls>>,
    /// The volume's encryption, announced in HELLO: a replica binds a new
    /// volume with it and refuses an engine whose encryption differs. Reads
    /// then return each block's nonce and tag after the blocks (see
    /// [`crate::proto`]).
    pub encryption: Option<crate::meta::Encryption>,
}

impl std::fmt::Debug for Links {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Links")
            .field("connections", &self.connections)
            .field("direct_reads", &self.direct_reads)
            .field("tls", &self.tls.is_some())
            .field("encrypted", &self.encryption.is_some())
            .finish()
    }
}

impl Links {
    fn auth_bytes(&self) -> Result<usize> {
        crate::meta::auth_bytes(self.encryption.as_ref())
            .map_err(|e| ClientError::Lost(e.to_string()))
    }
}

impl From<usize> for Links {
    fn from(connections: usize) -> Links {
        Links {
            connections,
            direct_reads: false,
            tls: None,
            encryption: None,
        }
    }
}

enum Transport {
    Sockets {
        conns: Vec<Arc<Conn>>,
        next: AtomicUsize,
    },
    /// `None` after a probe, which takes nothing over.
    InProcess(Option<Session>),
}

impl ReplicaClient {
    /// Opens `connections` connections to `endpoint`, each announcing
    /// `owner` for `volume`; returns the client and what the replica said
    /// about itself on the first connection.
    ///
    /// Each call is a new session ([`Hello::session`]): once it is
    /// answered, requests still in flight on this process's older
    /// connections to the replica are refused, not applied.
    pub async fn connect(
        endpoint: &Endpoint,
        volume: Uuid,
        owner: Owner,
        links: impl Into<Links>,
    ) -> Result<(ReplicaClient, ReplicaInfo)> {
        static SESSIONS: AtomicU32 = AtomicU32::new(1);
        let links = links.into();
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            session: SESSIONS.fetch_add(1, Ordering::Relaxed),
            volume_uuid: volume,
            generation: owner.generation.0,
            engine_id: owner.engine_id,
            encryption: links.encryption.clone(),
        };
        if let Endpoint::Local(dir) = endpoint {
            let replica = crate::local::open_or_create(dir, None)
                .await
                .map_err(|e| connect_err(endpoint, e))?;
            let (reply, session) = Session::open(&replica, &hello, 0).await;
            let info = hello_info(in_process_reply(reply))?;
            let transport = Transport::InProcess(session);
            let endpoint = endpoint.clone();
            return Ok((
                ReplicaClient {
                    endpoint,
                    transport,
                    direct: None,
                    auth: links.auth_bytes()?,
                },
                info,
            ));
        }
        let mut conns = Vec::new();
        let mut info = None;
        for _ in 0..links.connections.max(1) {
            let (conn, i) = open_socket(endpoint, links.tls.as_deref(), &hello).await?;
            conns.push(conn);
            info.get_or_insert(i);
        }
        let info = info.expect("at least one connection");
        let transport = Transport::Sockets {
            conns,
            next: AtomicUsize::new(0),
        };
        let endpoint = endpoint.clone();
        Ok((
            ReplicaClient {
                endpoint,
                transport,
                direct: (links.direct_reads && links.encryption.is_none())
                    .then(|| DirectReads::new(owner)),
                auth: links.auth_bytes()?,
            },
            info,
        ))
    }

    /// Asks a replica what it holds without taking it over, as a client
    /// of `volume` (a replica served with TLS answers only those).
    pub async fn probe(endpoint: &Endpoint, volume: Uuid, links: &Links) -> Result<ReplicaInfo> {
        let links = Links {
            connections: 1,
            direct_reads: false,
            tls: links.tls.clone(),
            encryption: links.encryption.clone(),
        };
        let (_, info) = ReplicaClient::connect(endpoint, volume, Owner::default(), links).await?;
        Ok(info)
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// True while at least one connection is alive.
    pub fn is_alive(&self) -> bool {
        match &self.transport {
            Transport::Sockets { conns, .. } => conns.iter().any(|c| lock(&c.pending).is_some()),
            Transport::InProcess(session) => session.is_some(),
        }
    }

    async fn call(
        &self,
        op: Op,
        flags: u8,
        offset: u64,
        length: u64,
        epoch: u64,
        payload: impl Into<Sealed>,
    ) -> Result<Reply> {
        let payload = payload.into();
        let request = RequestHeader {
            op: op as u8,
            flags,
            id: 0,
            offset,
            length,
            epoch,
            payload_len: payload.data.len() as u32,
            crc: 0, // sealed per connection, with its id
        };
        let direct = self.direct.as_ref().filter(|_| op.changes_chain());
        // Head reads must not use files listed before the change, nor
        // while it runs ([`crate::direct`]); closing also lets a deleted
        // layer's blocks go.
        direct.inspect(|d| d.close());
        let reply = self.send(request, payload).await;
        direct.inspect(|d| d.close());
        reply
    }

    /// Sends `request` (its id aside, which each connection numbers) and
    /// waits for the reply.
    async fn send(&self, request: RequestHeader, payload: Sealed) -> Result<Reply> {
        let (conns, next) = match &self.transport {
            Transport::Sockets { conns, next } => (conns, next),
            Transport::InProcess(session) => {
                let Some(session) = session else {
                    return Err(ClientError::Lost("a probe takes nothing over".into()));
                };
                return call_in_process(session, request, payload).await;
            }
        };
        let n = conns.len();
        let start = next.fetch_add(1, Ordering::Relaxed);
        for k in 0..n {
            let conn = &conns[(start + k) % n];
            let (tx, rx) = oneshot::channel();
            let id = conn.next_id.fetch_add(1, Ordering::Relaxed);
            {
                let mut pending = lock(&conn.pending);
                let Some(p) = pending.as_mut() else { continue };
                p.insert(id, tx);
            }
            let header =
                RequestHeader { id, ..request }.encode_sealed(request.payload_len, payload.crc);
            if conn
                .tx
                .send(Outgoing {
                    header,
                    payload: payload.data.clone(),
                })
                .is_err()
            {
                continue;
            }
            return match rx.await {
                Ok(r) => r,
                Err(_) => Err(ClientError::Lost("connection closed".into())),
            };
        }
        Err(ClientError::Lost(format!(
            "no live connection to {}",
            self.endpoint
        )))
    }

    /// Reads; the replica checks every block against its checksums.
    pub async fn read(&self, offset: u64, length: u64) -> Result<Bytes> {
        self.read_with(offset, length, 0).await
    }

    /// Reads, letting the replica send large reads straight from its files
    /// sealed with the recorded checksums, which this side then checks
    /// (see [`crate::proto`]). Fails with
    /// [`ClientError::StoredCrcMismatch`] when they do not match.
    ///
    /// From a replica on this node, large reads come straight from its
    /// files instead ([`crate::direct`]), checked the same way.
    pub async fn read_stored(&self, offset: u64, length: u64) -> Result<StoredRead> {
        if let Some(direct) = self.direct.as_ref().filter(|d| d.is_on()) {
            if let Some(data) = self.read_head(direct, offset, length).await? {
                return Ok(StoredRead {
                    data,
                    from_files: true,
                });
            }
            if length >= DIRECT_READ_MIN {
                if let Some(data) = self.read_direct(direct, offset, length).await? {
                    return Ok(StoredRead {
                        data,
                        from_files: true,
                    });
                }
            }
        }
        let data = self.read_with(offset, length, FLAG_STORED_CRC).await?;
        Ok(StoredRead {
            data,
            from_files: false,
        })
    }

    /// Reads from the head's file without asking the replica, listing its
    /// files first if none are open; `None` where that cannot serve it.
    async fn read_head(
        &self,
        direct: &DirectReads,
        offset: u64,
        length: u64,
    ) -> Result<Option<Bytes>> {
        if !self.is_alive() {
            return Ok(None);
        }
        if !direct.is_open() {
            self.list_files(direct).await?;
        }
        Ok(direct.read_head(offset, length))
    }

    /// Opens the files of the replica's chain as LAYERS lists them now.
    async fn list_files(&self, direct: &DirectReads) -> Result<()> {
        let closes = direct.closes();
        let r = self.call(Op::Layers, 0, 0, 0, 0, Bytes::new()).await?;
        let listed = serde_json::from_slice(&r.payload)
            .map_err(|e| ClientError::Lost(format!("bad LAYERS reply: {e}")))?;
        direct.open(listed, closes);
        Ok(())
    }

    /// LOCATE, then read from the files; `None` where they cannot serve it.
    async fn read_direct(
        &self,
        direct: &DirectReads,
        offset: u64,
        length: u64,
    ) -> Result<Option<Bytes>> {
        let r = self
            .call(Op::Locate, 0, offset, length, 0, Bytes::new())
            .await?;
        let Some(located) =
            direct::decode_located(r.value, &r.payload, length).map_err(ClientError::Lost)?
        else {
            return Ok(None);
        };
        if !direct.has(located.chain_version) {
            self.list_files(direct).await?;
        }
        match direct.read(&located) {
            DirectRead::Data(data) => Ok(Some(data)),
            DirectRead::Mismatch(why) => Err(ClientError::StoredCrcMismatch(why)),
            DirectRead::NotHere => Ok(None),
        }
    }

    /// Reads without checksum verification; see [`crate::checksum`].
    pub async fn read_unverified(&self, offset: u64, length: u64) -> Result<Bytes> {
        self.read_with(offset, length, FLAG_UNVERIFIED).await
    }

    async fn read_with(&self, offset: u64, length: u64, flags: u8) -> Result<Bytes> {
        let r = self
            .call(Op::Read, flags, offset, length, 0, Bytes::new())
            .await?;
        self.check_data_len(length, &r.payload)?;
        Ok(r.payload)
    }

    /// Checks that a payload holds `length` bytes of blocks and, in an
    /// encrypted volume, their nonces and tags.
    fn check_data_len(&self, length: u64, payload: &[u8]) -> Result<()> {
        let want = length + length / crate::BLOCK_SIZE * self.auth as u64;
        if payload.len() as u64 != want {
            return Err(ClientError::Lost(format!(
                "a read of {length} bytes returned {} (expected {want})",
                payload.len()
            )));
        }
        Ok(())
    }

    /// Writes whole blocks, tagged with flush epoch `epoch`.
    pub async fn write(
        &self,
        offset: u64,
        data: impl Into<Sealed>,
        fua: bool,
        epoch: u64,
    ) -> Result<()> {
        let data = data.into();
        let len = data.data_len() as u64;
        let flags = if fua { FLAG_FUA } else { 0 };
        self.call(Op::Write, flags, offset, len, epoch, data)
            .await
            .map(drop)
    }

    pub async fn trim(&self, offset: u64, length: u64, epoch: u64) -> Result<()> {
        self.call(Op::Trim, 0, offset, length, epoch, Bytes::new())
            .await
            .map(drop)
    }

    pub async fn write_zeroes(&self, offset: u64, length: u64, epoch: u64) -> Result<()> {
        self.call(Op::WriteZeroes, 0, offset, length, epoch, Bytes::new())
            .await
            .map(drop)
    }

    /// Flushes. Returns the revision counter the replica persisted.
    pub async fn flush(&self) -> Result<Revision> {
        self.flush_barrier(0, &[]).await
    }

    /// Barrier flush `epoch`, naming the replicas in the set when its
    /// barrier passed (see [`crate::dirty`]); a replica it does not name
    /// takes it as a plain flush.
    pub async fn flush_barrier(&self, epoch: u64, members: &[Uuid]) -> Result<Revision> {
        let payload = Bytes::from(crate::proto::encode_uuids(members));
        Ok(Revision(
            self.call(Op::Flush, 0, 0, 0, epoch, payload).await?.value,
        ))
    }

    pub async fn mark_clean(&self) -> Result<Revision> {
        Ok(Revision(
            self.call(Op::MarkClean, 0, 0, 0, 0, Bytes::new())
                .await?
                .value,
        ))
    }

    pub async fn info(&self) -> Result<ReplicaInfo> {
        let r = self.call(Op::Info, 0, 0, 0, 0, Bytes::new()).await?;
        serde_json::from_slice(&r.payload)
            .map_err(|e| ClientError::Lost(format!("bad INFO payload: {e}")))
    }

    /// Regions modified since the last barrier flush, as `(bytes, dirty)` runs.
    pub async fn dirty_runs(&self) -> Result<Vec<(u64, bool)>> {
        let r = self.call(Op::Dirty, 0, 0, 0, 0, Bytes::new()).await?;
        decode_extents(&r.payload).ok_or_else(|| ClientError::Lost("bad DIRTY payload".into()))
    }

    /// Freezes the head as snapshot `name`; returns the layer's file name.
    pub async fn snapshot(
        &self,
        name: &str,
        user_created: bool,
        labels: &BTreeMap<String, String>,
    ) -> Result<String> {
        let labels = if labels.is_empty() {
            Vec::new()
        } else {
            serde_json::to_vec(labels).map_err(|e| ClientError::Lost(e.to_string()))?
        };
        let payload = Bytes::from(crate::proto::layer_payload(name, &labels));
        let r = self
            .call(Op::Snapshot, user_created as u8, 0, 0, 0, payload)
            .await?;
        String::from_utf8(r.payload.to_vec())
            .map_err(|_| ClientError::Lost("bad SNAPSHOT reply".into()))
    }

    /// Checksums of each `unit` (a block or a rebuild chunk) of a range of
    /// a layer (`None`: no data there).
    pub async fn layer_checksums(
        &self,
        layer: &str,
        offset: u64,
        length: u64,
        unit: ChecksumUnit,
    ) -> Result<Vec<Option<u64>>> {
        let payload = Bytes::copy_from_slice(layer.as_bytes());
        let flags = match unit {
            ChecksumUnit::Chunk => 0,
            ChecksumUnit::Block => FLAG_PER_BLOCK,
        };
        let r = self
            .call(Op::LayerChecksums, flags, offset, length, 0, payload)
            .await?;
        crate::proto::decode_checksums(&r.payload)
            .filter(|sums| sums.len() as u64 == length.div_ceil(unit.bytes()))
            .ok_or_else(|| ClientError::Lost("bad LAYER_CHECKSUMS reply".into()))
    }

    /// Reads a range of a layer below the head: its blocks, and in an
    /// encrypted volume their nonces and tags, as [`Self::write_layer`]
    /// takes them.
    pub async fn read_layer(&self, layer: &str, offset: u64, length: u64) -> Result<Bytes> {
        let payload = Bytes::copy_from_slice(layer.as_bytes());
        let r = self
            .call(Op::ReadLayer, 0, offset, length, 0, payload)
            .await?;
        self.check_data_len(length, &r.payload)?;
        Ok(r.payload)
    }

    /// Reads a range of the view of snapshot layer `layer` (blocks, then
    /// nonces and tags in an encrypted volume); see
    /// [`crate::snapshot_view`].
    pub async fn read_snapshot(&self, layer: &str, offset: u64, length: u64) -> Result<Bytes> {
        let payload = Bytes::copy_from_slice(layer.as_bytes());
        let r = self
            .call(Op::ReadSnapshot, 0, offset, length, 0, payload)
            .await?;
        self.check_data_len(length, &r.payload)?;
        Ok(r.payload)
    }

    /// Runs `(bytes, data)` over a range: where the view of snapshot layer
    /// `layer` holds data, or (with `base`) may differ from the view of
    /// the older layer `base`.
    pub async fn snapshot_extents(
        &self,
        layer: &str,
        base: Option<&str>,
        offset: u64,
        length: u64,
    ) -> Result<Vec<(u64, bool)>> {
        let payload = crate::proto::layer_payload(layer, base.unwrap_or("").as_bytes());
        let r = self
            .call(
                Op::SnapshotExtents,
                0,
                offset,
                length,
                0,
                Bytes::from(payload),
            )
            .await?;
        decode_extents(&r.payload)
            .filter(|runs| runs.iter().map(|r| r.0).sum::<u64>() == length)
            .ok_or_else(|| ClientError::Lost("bad SNAPSHOT_EXTENTS reply".into()))
    }

    /// Writes into a layer below the head, zero blocks as data.
    pub async fn write_layer(&self, layer: &str, offset: u64, data: &[u8]) -> Result<()> {
        let payload = crate::proto::layer_payload(layer, data);
        self.call(
            Op::WriteLayer,
            0,
            offset,
            data.len() as u64,
            0,
            Bytes::from(payload),
        )
        .await
        .map(drop)
    }

    /// Punches a range out of a layer below the head.
    pub async fn punch_layer(&self, layer: &str, offset: u64, length: u64) -> Result<()> {
        let payload = Bytes::copy_from_slice(layer.as_bytes());
        self.call(Op::PunchLayer, 0, offset, length, 0, payload)
            .await
            .map(drop)
    }

    pub async fn prepare_rebuild(&self, chain: &[(String, crate::meta::LayerMeta)]) -> Result<()> {
        let payload = serde_json::to_vec(chain).map_err(|e| ClientError::Lost(e.to_string()))?;
        self.call(Op::PrepareRebuild, 0, 0, 0, 0, Bytes::from(payload))
            .await
            .map(drop)
    }

    pub async fn finish_rebuild(&self, revision: Revision) -> Result<()> {
        self.call(Op::FinishRebuild, 0, revision.0, 0, 0, Bytes::new())
            .await
            .map(drop)
    }

    /// Marks snapshot `name` removed; true if it was not removed before.
    pub async fn remove_snapshot(&self, name: &str) -> Result<bool> {
        let payload = Bytes::copy_from_slice(name.as_bytes());
        Ok(self
            .call(Op::RemoveSnapshot, 0, 0, 0, 0, payload)
            .await?
            .value
            == 1)
    }

    /// One purge step; `None` when there is nothing left to purge.
    pub async fn purge_step(&self) -> Result<Option<crate::maintenance::PurgeReport>> {
        let r = self.call(Op::PurgeStep, 0, 0, 0, 0, Bytes::new()).await?;
        if r.payload.is_empty() {
            return Ok(None);
        }
        serde_json::from_slice(&r.payload)
            .map(Some)
            .map_err(|e| ClientError::Lost(format!("bad PURGE_STEP reply: {e}")))
    }

    pub async fn revert(&self, name: &str) -> Result<()> {
        let payload = Bytes::copy_from_slice(name.as_bytes());
        self.call(Op::Revert, 0, 0, 0, 0, payload).await.map(drop)
    }

    pub async fn expand(&self, size: u64) -> Result<()> {
        self.call(Op::Expand, 0, size, 0, 0, Bytes::new())
            .await
            .map(drop)
    }

    /// Reads and checks every block the replica holds.
    pub async fn scrub(&self) -> Result<crate::maintenance::ScrubReport> {
        let r = self.call(Op::Scrub, 0, 0, 0, 0, Bytes::new()).await?;
        serde_json::from_slice(&r.payload)
            .map_err(|e| ClientError::Lost(format!("bad SCRUB reply: {e}")))
    }

    /// Allocation runs `(bytes, allocated)` of a range.
    pub async fn allocation(&self, offset: u64, length: u64) -> Result<Vec<(u64, bool)>> {
        let r = self
            .call(Op::Allocation, 0, offset, length, 0, Bytes::new())
            .await?;
        decode_extents(&r.payload).ok_or_else(|| ClientError::Lost("bad ALLOCATION payload".into()))
    }
}

fn connect_err(endpoint: &Endpoint, e: impl std::fmt::Display) -> ClientError {
    ClientError::Connect {
        endpoint: endpoint.to_string(),
        message: e.to_string(),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Opens one connection and performs the HELLO exchange on it.
async fn open_socket(
    endpoint: &Endpoint,
    tls: Option<&ClientTls>,
    hello: &Hello,
) -> Result<(Arc<Conn>, ReplicaInfo)> {
    match endpoint {
        Endpoint::Tcp(a) => {
            let s = tokio::net::TcpStream::connect(a)
                .await
                .map_err(|e| connect_err(endpoint, e))?;
            let _ = s.set_nodelay(true);
            match tls {
                Some(tls) => {
                    let s = tls
                        .connect(a, s)
                        .await
                        .map_err(|e| connect_err(endpoint, e))?;
                    start(s, None, hello).await
                }
                None => {
                    let socket = s.as_fd().try_clone_to_owned().ok();
                    start(s, socket, hello).await
                }
            }
        }
        Endpoint::Unix(p) => {
            let s = tokio::net::UnixStream::connect(p)
                .await
                .map_err(|e| connect_err(endpoint, e))?;
            let socket = s.as_fd().try_clone_to_owned().ok();
            start(s, socket, hello).await
        }
        Endpoint::Local(_) => Err(connect_err(endpoint, "a replica directory has no socket")),
    }
}

/// A reply's header and payload as the caller's result.
fn reply_result(h: &ReplyHeader, payload: Bytes) -> Result<Reply> {
    if h.status == Status::Ok as u16 {
        return Ok(Reply {
            value: h.value,
            payload,
        });
    }
    Err(ClientError::Remote {
        status: Status::from_u16(h.status),
        message: String::from_utf8_lossy(&payload).into_owned(),
    })
}

/// What a replica said about itself in its answer to HELLO.
fn hello_info(reply: Result<Reply>) -> Result<ReplicaInfo> {
    serde_json::from_slice(&reply?.payload)
        .map_err(|e| ClientError::Lost(format!("bad HELLO reply: {e}")))
}

/// Runs one request on a replica in this process. Reads are never sent
/// "stored": that saves a copy into a socket, and there is none here.
async fn call_in_process(
    session: &Session,
    request: RequestHeader,
    payload: Sealed,
) -> Result<Reply> {
    let h = RequestHeader {
        flags: request.flags & !FLAG_STORED_CRC,
        ..request
    };
    // What the socket server computes from a WRITE of whole blocks, the
    // seal already holds (`Sealed::new`); other payloads get none there
    // either.
    let mut crcs = Vec::new();
    if let Some(blocks) = payload
        .block_crcs
        .as_ref()
        .filter(|_| h.op == Op::Write as u8)
    {
        crcs.extend_from_slice(blocks);
    }
    let (tx, rx) = oneshot::channel();
    session.run(&h, payload.data, crcs, tx);
    let reply = rx
        .await
        .map_err(|_| ClientError::Lost("the replica's task ended".into()))?;
    in_process_reply(reply)
}

fn in_process_reply(reply: crate::session::Reply) -> Result<Reply> {
    let header = ReplyHeader {
        status: reply.status as u16,
        flags: 0,
        id: reply.id,
        value: reply.value,
        payload_len: 0,
        crc: 0,
    };
    match reply.body {
        Body::Sealed(sealed) => reply_result(&header, sealed.data),
        Body::Stored(..) => Err(ClientError::Lost("a stored read reply in-process".into())),
    }
}

/// Performs the HELLO exchange on a fresh stream and starts its tasks.
/// `socket` is the stream's socket where bytes written to it reach the
/// peer as they are (not through TLS), for [`FrameWriter`].
async fn start<S>(
    stream: S,
    socket: Option<std::os::fd::OwnedFd>,
    hello: &Hello,
) -> Result<(Arc<Conn>, ReplicaInfo)>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (rd, mut wr) = tokio::io::split(stream);
    let mut rd = BufReader::with_capacity(256 << 10, rd);
    let lost = |e: std::io::Error| ClientError::Lost(e.to_string());
    wr.write_all(&hello.frame()).await.map_err(lost)?;
    wr.flush().await.map_err(lost)?;
    let reply = read_reply(&mut rd).await?.ok_or_else(|| {
        ClientError::Lost(
            "the replica closed the connection during HELLO (a replica that requires \
                 TLS does so to a client without it)"
                .into(),
        )
    })?;
    let (h, body) = reply;
    let info = hello_info(reply_result(&h, body?))?;
    let (tx, rx) = mpsc::unbounded_channel();
    let conn = Arc::new(Conn {
        tx,
        pending: Mutex::new(Some(HashMap::new())),
        next_id: AtomicU64::new(1),
    });
    tokio::spawn(
        FrameWriter::new(wr, socket).write_queued(rx, async |w, out: Outgoing| {
            w.gather(&out.header).await?;
            w.payload(&out.payload).await
        }),
    );
    tokio::spawn(read_replies(rd, conn.clone()));
    Ok((conn, info))
}

/// A reply: its header, and its payload unless it was sealed with recorded
/// checksums that it does not match.
type Received = (ReplyHeader, std::result::Result<Bytes, FrameError>);

async fn read_reply<R: AsyncRead + Unpin>(rd: &mut R) -> Result<Option<Received>> {
    let mut raw = [0u8; REPLY_HEADER_LEN];
    match rd.read_exact(&mut raw).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(ClientError::Lost(e.to_string())),
    }
    let h = ReplyHeader::decode(&raw)?;
    let mut payload = Vec::with_capacity(h.payload_len as usize);
    crate::proto::read_payload(rd, &mut payload, h.payload_len as usize)
        .await
        .map_err(|e| ClientError::Lost(e.to_string()))?;
    match h.verify(&raw, &payload) {
        Ok(()) => Ok(Some((h, Ok(payload.into())))),
        // The data, not the stream, failed: its length was sent by a
        // replica that never looked at it, so the framing still holds.
        Err(e) if h.flags & REPLY_STORED_CRC != 0 => Ok(Some((h, Err(e)))),
        Err(e) => Err(e.into()),
    }
}

async fn read_replies<R: AsyncRead + Unpin>(mut rd: R, conn: Arc<Conn>) {
    let reason = loop {
        match read_reply(&mut rd).await {
            Ok(Some((h, payload))) => {
                let waiter = lock(&conn.pending).as_mut().and_then(|p| p.remove(&h.id));
                let Some(waiter) = waiter else {
                    break format!("reply for unknown request id {}", h.id);
                };
                let result = match payload {
                    Err(e) => Err(ClientError::StoredCrcMismatch(e.to_string())),
                    Ok(payload) => reply_result(&h, payload),
                };
                let _ = waiter.send(result);
            }
            Ok(None) => break "replica closed the connection".to_string(),
            Err(e) => break e.to_string(),
        }
    };
    tracing::debug!(%reason, "replica connection ended");
    // Closing the sender stops the writer task.
    if let Some(pending) = lock(&conn.pending).take() {
        for (_, w) in pending {
            let _ = w.send(Err(ClientError::Lost(reason.clone())));
        }
    }
}
