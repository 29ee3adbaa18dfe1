//! The replica server: serves one [`Replica`] to engines over TCP or a
//! Unix socket.
//!
//! Each connection has a reader (this module's [`serve_connection`]) and a
//! writer task joined by a channel of replies. The reader decodes and
//! verifies a frame and hands it to the connection's [`Session`], which
//! runs it and queues the reply (see [`crate::session`] for which requests
//! run inline and which on the blocking pool); the writer batches queued
//! replies into few socket writes.
//!
//! A READ of [`STORED_READ_MIN`] bytes or more that the engine asked with
//! [`FLAG_STORED_CRC`] is answered with sendfile(2) from the layer files,
//! sealed with the recorded block checksums: the data is neither copied
//! into this process nor checksummed here (on TCP the kernel sends the
//! page-cache pages themselves). The engine checks the seal, so bit rot is
//! still caught, one hop later; see [`crate::proto`].
//!
//! **Who may connect.** Served with TLS (`serve`'s `tls`), a TCP
//! connection gets nothing but a mutual TLS handshake ([`rvol_tls`]): a
//! caller without a certificate of the cluster's CA, or with an expired
//! one, is dropped before a byte of the protocol is read. Its HELLO is
//! then answered only if its certificate names the controller or the
//! volume the HELLO is for (`rvol://volume/NAME`, whose UUID is
//! [`crate::volume_uuid`]`(NAME)`), and this replica belongs to that
//! volume or to none yet; anything else is answered `Denied` and the
//! connection closed, before a probe is answered or a generation looked
//! at. So a certificate stolen from one volume's engine opens no other
//! volume. Unix sockets carry no TLS: they are created mode 0600, and the
//! file system says who may connect.
//!
//! A frame that fails to decode (bad magic, crc, oversized) closes the
//! connection with a logged reason before any of it is acted on. A request
//! that decodes but is wrong (unaligned, past the end, unknown op) gets an
//! error reply and the connection lives.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, BufReader, Interest};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::coalesce::FrameWriter;
use crate::crc;
use crate::error::Error;
use crate::proto::{
    FrameError, Hello, Op, ReplyHeader, RequestHeader, Status, PROTOCOL_VERSION, REPLY_STORED_CRC,
    REQUEST_HEADER_LEN,
};
use crate::session::{Body, Reply, Session};
use crate::store::{Replica, Segment};
use crate::BLOCK_SIZE;
use rvol_tls::{Identity, ServerTls};

/// Where a server listens or a client connects: `host:port` or `unix:PATH`;
/// or, for a client only, `local:DIR`, a replica directory the client's
/// own process opens (see [`crate::local`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Tcp(String),
    Unix(PathBuf),
    Local(PathBuf),
}

impl FromStr for Endpoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        for (prefix, make) in [
            ("unix:", Endpoint::Unix as fn(PathBuf) -> Endpoint),
            ("local:", Endpoint::Local),
        ] {
            if let Some(p) = s.strip_prefix(prefix) {
                if p.is_empty() {
                    return Err(format!("{prefix} needs a path"));
                }
                return Ok(make(p.into()));
            }
        }
        if !s.contains(':') {
            return Err(format!(
                "{s:?} is neither host:port, unix:PATH nor local:DIR"
            ));
        }
        Ok(Endpoint::Tcp(s.to_string()))
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "{a}"),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Local(p) => write!(f, "local:{}", p.display()),
        }
    }
}

/// A bound listener of either kind; a Unix one with the path it serves at.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    pub async fn bind(ep: &Endpoint) -> std::io::Result<Listener> {
        Ok(match ep {
            Endpoint::Tcp(a) => Listener::Tcp(TcpListener::bind(a).await?),
            Endpoint::Unix(p) => Listener::Unix(bind_private(p)?, p.clone()),
            Endpoint::Local(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("{ep} is a replica directory, not an address to listen on"),
                ))
            }
        })
    }

    /// The address actually bound (resolves port 0).
    pub fn local_endpoint(&self) -> std::io::Result<Endpoint> {
        Ok(match self {
            Listener::Tcp(l) => Endpoint::Tcp(l.local_addr()?.to_string()),
            Listener::Unix(_, p) => Endpoint::Unix(p.clone()),
        })
    }
}

/// Binds a Unix socket that only its owner can connect to: bound under a
/// temporary name, made 0600, then renamed into place, so no caller can
/// connect while it is still open to others. The rename replaces a socket
/// file left by a killed server; any other file at `path` is refused.
fn bind_private(path: &std::path::Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if !m.file_type().is_socket() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|_| std::fs::rename(&tmp, path))
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })?;
    Ok(listener)
}

/// Reads at least this large are sent from the files when the engine
/// allows it. Below it the saved copy is smaller than the cost of a socket
/// write of its own (replies are otherwise batched).
pub const STORED_READ_MIN: u64 = 64 << 10;

/// Serves `replica` on `listener` until `shutdown` resolves, then closes
/// every connection, flushes and marks the replica clean. With `tls`, TCP
/// callers must prove who they are (see the module docs).
pub async fn serve(
    replica: Arc<Replica>,
    listener: Listener,
    tls: Option<Arc<ServerTls>>,
    shutdown: impl std::future::Future<Output = ()>,
) -> crate::Result<()> {
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            a = accept(&listener) => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                let r = replica.clone();
                let tls = tls.clone();
                conns.spawn(async move {
                    match (stream, tls) {
                        (Stream::Tcp(s), Some(tls)) => {
                            let _ = s.set_nodelay(true);
                            match tls.accept(s, &peer).await {
                                Ok((s, ids)) => {
                                    let (rd, wr) = tokio::io::split(s);
                                    serve_connection(r, rd, wr, Caller::Tls(ids), peer).await
                                }
                                Err(e) => tracing::warn!(%peer, error = %e, "refused connection"),
                            }
                        }
                        (Stream::Tcp(s), None) => {
                            let _ = s.set_nodelay(true);
                            let (rd, wr) = s.into_split();
                            serve_connection(r, rd, wr, Caller::Plain, peer).await
                        }
                        (Stream::Unix(s), _) => {
                            let (rd, wr) = s.into_split();
                            serve_connection(r, rd, wr, Caller::Plain, peer).await
                        }
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
        while conns.try_join_next().is_some() {}
    }
    // Requests run to completion between await points, so aborting the
    // connections leaves every request either applied or not started.
    // The replica flushes, but only an engine can declare it clean: the
    // engine may still have had writes in flight to its peers.
    conns.shutdown().await;
    let r = replica.clone();
    let rev = tokio::task::spawn_blocking(move || r.flush())
        .await
        .map_err(|e| Error::Io {
            context: "clean shutdown".into(),
            source: std::io::Error::other(e),
        })??;
    tracing::info!(revision = %rev, "replica flushed and stopped");
    Ok(())
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(l: &Listener) -> std::io::Result<(Stream, String)> {
    Ok(match l {
        Listener::Tcp(l) => {
            let (s, a) = l.accept().await?;
            (Stream::Tcp(s), a.to_string())
        }
        Listener::Unix(l, _) => {
            let (s, _) = l.accept().await?;
            (Stream::Unix(s), "unix".to_string())
        }
    })
}

/// Who is at the other end of a connection.
enum Caller {
    /// Not asked: a Unix socket, or a replica served without TLS.
    Plain,
    /// Proven by TLS; what the certificate names.
    Tls(Vec<Identity>),
}

impl Caller {
    /// Whether this caller may send `hello` to `replica`.
    fn may_open(&self, replica: &Replica, hello: &Hello) -> Result<(), String> {
        let Caller::Tls(ids) = self else {
            return Ok(());
        };
        let named = ids.iter().any(|id| match id {
            Identity::Controller => true,
            Identity::Volume(name) => crate::volume_uuid(name) == hello.volume_uuid,
            Identity::Node(_) => false,
        });
        if !named {
            let names: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
            return Err(format!(
                "the certificate ({}) does not name volume {}",
                if names.is_empty() {
                    "no rvol identity".into()
                } else {
                    names.join(", ")
                },
                hello.volume_uuid
            ));
        }
        let bound = replica.volume_uuid();
        if !bound.is_nil() && bound != hello.volume_uuid {
            return Err(format!("this replica belongs to volume {bound}"));
        }
        Ok(())
    }
}

/// Serves one connection until it closes or sends a bad frame.
async fn serve_connection<R, W>(replica: Arc<Replica>, rd: R, wr: W, caller: Caller, peer: String)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: SendFile + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let writer = tokio::spawn(write_replies(wr, rx));
    let rd = BufReader::with_capacity(256 << 10, rd);
    match read_requests(&replica, rd, &caller, &tx).await {
        Ok(()) => tracing::debug!(%peer, "connection closed"),
        Err(reason) => tracing::warn!(%peer, %reason, "closing connection"),
    }
    drop(tx);
    let _ = writer.await;
}

/// The sending half of a connection, which can also send file ranges.
trait SendFile: AsyncWrite + Unpin {
    /// Sends `len` bytes of `file` at `at` with sendfile(2).
    fn send_file(
        &mut self,
        file: &File,
        at: u64,
        len: usize,
    ) -> impl std::future::Future<Output = std::io::Result<()>> + Send;

    /// The connection's socket, where bytes written to it go to the peer
    /// as they are (not through TLS).
    fn socket(&self) -> Option<BorrowedFd<'_>>;
}

macro_rules! send_file_on {
    ($half:ty) => {
        impl SendFile for $half {
            fn socket(&self) -> Option<BorrowedFd<'_>> {
                Some(self.as_ref().as_fd())
            }

            async fn send_file(&mut self, file: &File, at: u64, len: usize) -> std::io::Result<()> {
                let sock = self.as_ref();
                let mut off = at as libc::off_t;
                let end = at as libc::off_t + len as libc::off_t;
                while off < end {
                    sock.writable().await?;
                    let sent = sock.try_io(Interest::WRITABLE, || {
                        // SAFETY: both descriptors are open for the call;
                        // `off` is a valid out-parameter.
                        let r = unsafe {
                            libc::sendfile(
                                sock.as_raw_fd(),
                                file.as_raw_fd(),
                                &mut off,
                                (end - off) as usize,
                            )
                        };
                        if r < 0 {
                            Err(std::io::Error::last_os_error())
                        } else {
                            Ok(r)
                        }
                    });
                    match sent {
                        Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            }
        }
    };
}
send_file_on!(tokio::net::tcp::OwnedWriteHalf);
send_file_on!(tokio::net::unix::OwnedWriteHalf);

/// Through TLS, file ranges are read here and encrypted like any payload.
impl SendFile for tokio::io::WriteHalf<rvol_tls::ServerStream<tokio::net::TcpStream>> {
    fn socket(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    async fn send_file(&mut self, file: &File, at: u64, len: usize) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, at)?;
        tokio::io::AsyncWriteExt::write_all(self, &buf).await
    }
}

async fn write_replies<W: SendFile>(wr: W, rx: mpsc::UnboundedReceiver<Reply>) {
    let socket = wr.socket().and_then(|s| s.try_clone_to_owned().ok());
    FrameWriter::new(wr, socket)
        .write_queued(rx, async |w, reply| write_reply(w, &reply).await)
        .await;
}

async fn write_reply<W: SendFile>(wr: &mut FrameWriter<W>, reply: &Reply) -> std::io::Result<()> {
    let (len, crc, flags) = match &reply.body {
        Body::Sealed(s) => (s.data.len(), s.crc, 0),
        Body::Stored(segments, crc) => (
            segments.iter().map(Segment::byte_len).sum(),
            *crc,
            REPLY_STORED_CRC,
        ),
    };
    let h = ReplyHeader {
        status: reply.status as u16,
        flags,
        id: reply.id,
        value: reply.value,
        payload_len: len as u32,
        crc: 0,
    };
    wr.gather(&h.encode_sealed(len as u32, crc)).await?;
    match &reply.body {
        Body::Sealed(s) => wr.payload(&s.data).await,
        Body::Stored(segments, _) => {
            static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
            for segment in segments {
                match segment {
                    Segment::Zeros(mut n) => {
                        while n > 0 {
                            let k = n.min(ZEROS.len());
                            wr.gather(&ZEROS[..k]).await?;
                            n -= k;
                        }
                    }
                    Segment::File { file, at, len, .. } => {
                        wr.send_gathered_corked().await?;
                        wr.get_mut().send_file(file, *at, *len).await?;
                    }
                }
            }
            Ok(())
        }
    }
}

/// Why a connection was closed by the server.
#[derive(Debug, thiserror::Error)]
enum Closed {
    #[error("bad frame: {0}")]
    Frame(#[from] FrameError),
    #[error("{0}")]
    Protocol(String),
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads and verifies one request. For a WRITE of whole blocks, `crcs`
/// gets each block's crc32c, which seal the frame here and go to the
/// sidecar later, so the payload is checksummed once (see [`crate::crc`]).
async fn read_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    payload: &mut Vec<u8>,
    crcs: &mut Vec<u32>,
) -> Result<Option<RequestHeader>, Closed> {
    let mut raw = [0u8; REQUEST_HEADER_LEN];
    match rd.read_exact(&mut raw).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let h = RequestHeader::decode(&raw)?;
    payload.clear();
    crate::proto::read_payload(rd, payload, h.payload_len as usize).await?;
    // The blocks of a WRITE, followed by their nonces and tags in an
    // encrypted volume (`length` counts the blocks only).
    let blocks = usize::try_from(h.length)
        .ok()
        .filter(|&n| n <= payload.len() && (n as u64).is_multiple_of(BLOCK_SIZE));
    if let Some(n) = blocks.filter(|_| h.op == Op::Write as u8) {
        crc::blocks(&payload[..n], crcs);
        let mut sealed = crc::of_blocks(crcs);
        if n < payload.len() {
            let tail = &payload[n..];
            sealed = crc::concat(sealed, crc::of(tail), tail.len() as u64);
        }
        h.verify_sealed(&raw, sealed)?;
    } else {
        crcs.clear();
        h.verify(&raw, payload)?;
    }
    Ok(Some(h))
}

async fn read_requests<R: AsyncRead + Unpin>(
    replica: &Arc<Replica>,
    mut rd: R,
    caller: &Caller,
    tx: &mpsc::UnboundedSender<Reply>,
) -> Result<(), Closed> {
    let mut payload = Vec::new();
    let mut crcs = Vec::new();
    // HELLO first.
    let Some(h) = read_frame(&mut rd, &mut payload, &mut crcs).await? else {
        return Ok(());
    };
    if Op::from_u8(h.op) != Some(Op::Hello) {
        return Err(Closed::Protocol(format!(
            "first request is op {}, not HELLO",
            h.op
        )));
    }
    let hello = match Hello::decode(&payload) {
        Some(hello) => hello,
        _ => return Err(Closed::Protocol("malformed HELLO payload".into())),
    };
    if hello.protocol_version != PROTOCOL_VERSION {
        let _ = tx.send(Reply::error(
            h.id,
            Status::VersionMismatch,
            format!(
                "protocol version {} is not supported (replica speaks {PROTOCOL_VERSION})",
                hello.protocol_version
            ),
        ));
        return Err(Closed::Protocol("protocol version mismatch".into()));
    }
    if let Err(why) = caller.may_open(replica, &hello) {
        let _ = tx.send(Reply::error(h.id, Status::Denied, &why));
        return Err(Closed::Protocol(format!("denied: {why}")));
    }
    let (reply, session) = Session::open(replica, &hello, h.id).await;
    let _ = tx.send(reply);
    let Some(session) = session else {
        return Ok(());
    };
    while let Some(h) = read_frame(&mut rd, &mut payload, &mut crcs).await? {
        if h.op == Op::Hello as u8 {
            return Err(Closed::Protocol("HELLO sent twice".into()));
        }
        if tx.is_closed() {
            return Ok(());
        }
        let payload = Bytes::from(std::mem::take(&mut payload));
        session.run(&h, payload, std::mem::take(&mut crcs), tx.clone());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// Only the owner may connect, also where a killed server left its
    /// socket file behind.
    #[tokio::test]
    async fn unix_sockets_are_bound_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        for _ in 0..2 {
            let l = Listener::bind(&Endpoint::Unix(path.clone())).await.unwrap();
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{mode:o}");
            assert_eq!(l.local_endpoint().unwrap(), Endpoint::Unix(path.clone()));
            tokio::net::UnixStream::connect(&path).await.unwrap();
            drop(l);
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // Never over a file that is not a socket.
        let file = dir.path().join("data");
        std::fs::write(&file, b"keep").unwrap();
        assert!(Listener::bind(&Endpoint::Unix(file.clone())).await.is_err());
        assert_eq!(std::fs::read(&file).unwrap(), b"keep");
    }
}
