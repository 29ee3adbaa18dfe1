//! NBD server over any [`BlockVolume`].
//!
//! One task reads a connection's requests in order; each request then runs
//! in its own task, so a slow flush does not hold up reads behind it, and
//! replies are written by the connection's writer task in the order they
//! complete (out of order, matched by the client's cookie). At most
//! [`MAX_IN_FLIGHT`] requests run per connection; the reader waits for a
//! slot, which pushes back on the client through TCP.
//!
//! Errors in a request (a range past the end, an unknown command, a read
//! larger than we allow) get an error reply and the connection lives. A
//! request whose framing cannot be trusted (bad magic, a write payload
//! over the limit) closes that connection only.
//!
//! Multi-conn: flush is passed to the volume, whose flush covers every
//! write completed before it on any connection, so NBD_FLAG_CAN_MULTI_CONN
//! is advertised.

pub mod handshake;
pub mod proto;

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;

use crate::{BlockVolume, Extent, VolumeError};
use handshake::{negotiate, ExportInfo, Negotiated, Outcome, Tls};
use proto::*;
use rvol_tls::{Identity, ServerTls};

/// Requests run concurrently per connection.
pub const MAX_IN_FLIGHT: usize = 256;

/// Most descriptors in one BLOCK_STATUS reply.
const MAX_EXTENTS: usize = 1024;

pub enum NbdListener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// An NBD server exporting one volume under one name.
pub struct NbdServer<V> {
    volume: Arc<V>,
    name: String,
    description: String,
    /// Required on TCP connections when set; see [`handshake`].
    tls: Option<Arc<ServerTls>>,
}

impl<V: BlockVolume> NbdServer<V> {
    /// With `tls`, clients on TCP must start TLS and present a certificate
    /// of its CA naming the volume `name` (`rvol://volume/NAME`) or the
    /// controller; Unix sockets (0600) are served without.
    pub fn new(
        volume: Arc<V>,
        name: impl Into<String>,
        description: impl Into<String>,
        tls: Option<Arc<ServerTls>>,
    ) -> Arc<Self> {
        Arc::new(NbdServer {
            volume,
            name: name.into(),
            description: description.into(),
            tls,
        })
    }

    /// Accepts connections until `stop` turns true, then lets every
    /// connection finish its in-flight requests and returns.
    pub async fn serve(self: Arc<Self>, listener: NbdListener, mut stop: watch::Receiver<bool>) {
        let mut conns = JoinSet::new();
        loop {
            let accepted = tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                a = accept(&listener) => a,
            };
            match accepted {
                Ok((Stream::Tcp(s), peer)) => {
                    let _ = s.set_nodelay(true);
                    match self.tls.clone() {
                        Some(tls) => conns.spawn(self.clone().serve_tls_connection(
                            s,
                            tls,
                            peer,
                            stop.clone(),
                        )),
                        None => conns.spawn(self.clone().serve_connection(s, peer, stop.clone())),
                    };
                }
                Ok((Stream::Unix(s), peer)) => {
                    conns.spawn(self.clone().serve_connection(s, peer, stop.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "NBD accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
            while conns.try_join_next().is_some() {}
        }
        while conns.join_next().await.is_some() {}
    }

    fn export(&self) -> ExportInfo {
        ExportInfo {
            name: self.name.clone(),
            description: self.description.clone(),
            size: self.volume.size(),
            transmission_flags: TFLAG_HAS_FLAGS
                | TFLAG_SEND_FLUSH
                | TFLAG_SEND_FUA
                | TFLAG_SEND_TRIM
                | TFLAG_SEND_WRITE_ZEROES
                | TFLAG_CAN_MULTI_CONN
                | TFLAG_SEND_CACHE,
        }
    }

    /// Serves one client from handshake to disconnect.
    pub async fn serve_connection<S>(
        self: Arc<Self>,
        mut stream: S,
        peer: String,
        stop: watch::Receiver<bool>,
    ) where
        S: AsyncRead + AsyncWrite + AsFd + Unpin + Send + 'static,
    {
        let agreed = match negotiate(&mut stream, &self.export()).await {
            Ok(Some(a)) => a,
            Ok(None) => return,
            Err(e) => {
                tracing::info!(%peer, error = %e, "NBD handshake failed");
                return;
            }
        };
        // Without a second descriptor, headers are written like the rest.
        let corkable = stream.as_fd().try_clone_to_owned().ok();
        self.serve_negotiated(stream, corkable, agreed, peer, stop)
            .await
    }

    /// Serves a client that must start TLS first (see [`handshake`]).
    async fn serve_tls_connection(
        self: Arc<Self>,
        mut stream: tokio::net::TcpStream,
        tls: Arc<ServerTls>,
        peer: String,
        stop: watch::Receiver<bool>,
    ) {
        let export = self.export();
        let greeting = match handshake::greet(&mut stream).await {
            Ok(g) => g,
            Err(e) => return tracing::info!(%peer, error = %e, "NBD handshake failed"),
        };
        match handshake::options(&mut stream, &export, greeting, Tls::Required).await {
            Ok(Outcome::StartTls) => {}
            Ok(_) => return,
            Err(e) => return tracing::warn!(%peer, error = %e, "NBD client refused"),
        }
        let (mut stream, ids) = match tls.accept(stream, &peer).await {
            Ok(accepted) => accepted,
            Err(e) => return tracing::warn!(%peer, error = %e, "NBD client refused"),
        };
        let allowed = ids.iter().any(|id| match id {
            Identity::Volume(v) => *v == self.name,
            Identity::Controller => true,
            Identity::Node(_) => false,
        });
        if !allowed {
            let names: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
            tracing::warn!(%peer, certificate = ?names, volume = %self.name,
                "NBD client refused: its certificate does not name the volume");
            let _ = refuse_all_options(&mut stream).await;
            return;
        }
        match handshake::options(&mut stream, &export, greeting, Tls::Active).await {
            Ok(Outcome::Serve(agreed)) => {
                self.serve_negotiated(stream, None, agreed, peer, stop)
                    .await
            }
            Ok(_) => {}
            Err(e) => tracing::info!(%peer, error = %e, "NBD handshake failed"),
        }
    }

    /// Runs transmission on a negotiated connection.
    async fn serve_negotiated<S>(
        self: Arc<Self>,
        stream: S,
        corkable: Option<OwnedFd>,
        agreed: Negotiated,
        peer: String,
        stop: watch::Receiver<bool>,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        tracing::debug!(%peer, ?agreed, "NBD client connected");
        let (rd, wr) = tokio::io::split(stream);
        let (tx, rx) = mpsc::unbounded_channel::<Reply>();
        let writer = tokio::spawn(write_replies(wr, corkable, rx));
        if let Err(reason) = self
            .transmit(BufReader::with_capacity(256 << 10, rd), agreed, tx, stop)
            .await
        {
            tracing::warn!(%peer, %reason, "closing NBD connection");
        }
        let _ = writer.await;
        tracing::debug!(%peer, "NBD client disconnected");
    }

    async fn transmit<R: AsyncRead + Unpin>(
        self: &Arc<Self>,
        mut rd: R,
        agreed: Negotiated,
        tx: mpsc::UnboundedSender<Reply>,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), String> {
        let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let mut running = JoinSet::new();
        let result = loop {
            let mut raw = [0u8; REQUEST_LEN];
            let read = tokio::select! {
                _ = stop.wait_for(|s| *s) => break Ok(()),
                r = rd.read_exact(&mut raw) => r,
            };
            match read {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
                Err(e) => break Err(format!("socket: {e}")),
            }
            let req = match Request::parse(&raw) {
                Ok(r) => r,
                Err(e) => break Err(e.to_string()),
            };
            let mut payload = BytesMut::with_capacity(req.payload_len());
            if let Err(e) = read_payload(&mut rd, &mut payload, req.payload_len()).await {
                break Err(format!("client went away mid-request: {e}"));
            }
            if req.command == CMD_DISC {
                break Ok(());
            }
            let Ok(slot) = slots.clone().acquire_owned().await else {
                break Ok(());
            };
            let this = self.clone();
            let tx = tx.clone();
            let payload = payload.freeze();
            running.spawn(async move {
                let reply = this.execute(req, payload, agreed).await;
                let _ = tx.send(reply);
                drop(slot);
            });
            while running.try_join_next().is_some() {}
        };
        // In-flight requests complete and are answered before we close.
        while running.join_next().await.is_some() {}
        result
    }

    async fn execute(&self, req: Request, payload: Bytes, agreed: Negotiated) -> Reply {
        let v = &*self.volume;
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let len = req.length as u64;
        let in_range = req
            .offset
            .checked_add(len)
            .is_some_and(|end| end <= v.size());
        let out_of_range = |kind: &str| {
            VolumeError::Invalid(format!(
                "{kind} of {len} bytes at {} is past the end ({})",
                req.offset,
                v.size()
            ))
        };
        let result: Result<Option<Bytes>, (u32, VolumeError)> = match req.command {
            CMD_READ if len > MAX_PAYLOAD as u64 => {
                Err((EOVERFLOW, VolumeError::Invalid("read too large".into())))
            }
            CMD_READ if !in_range => Err((EINVAL, out_of_range("read"))),
            CMD_READ => v
                .read(req.offset, req.length)
                .await
                .map(Some)
                .map_err(errno),
            CMD_WRITE if !in_range => Err((ENOSPC, out_of_range("write"))),
            CMD_WRITE => v
                .write(req.offset, payload, fua)
                .await
                .map(|_| None)
                .map_err(errno),
            CMD_FLUSH => v.flush().await.map(|_| None).map_err(errno),
            CMD_TRIM if !in_range => Err((EINVAL, out_of_range("trim"))),
            CMD_TRIM => v
                .trim(req.offset, len, fua)
                .await
                .map(|_| None)
                .map_err(errno),
            CMD_WRITE_ZEROES if req.flags & CMD_FLAG_FAST_ZERO != 0 => Err((
                ENOTSUP,
                VolumeError::Invalid("fast zero is not supported".into()),
            )),
            CMD_WRITE_ZEROES if !in_range => Err((ENOSPC, out_of_range("write-zeroes"))),
            CMD_WRITE_ZEROES => {
                let may_punch = req.flags & CMD_FLAG_NO_HOLE == 0;
                v.write_zeroes(req.offset, len, may_punch, fua)
                    .await
                    .map(|_| None)
                    .map_err(errno)
            }
            CMD_CACHE if !in_range => Err((EINVAL, out_of_range("cache"))),
            CMD_CACHE => Ok(None),
            CMD_BLOCK_STATUS if !agreed.base_allocation => Err((
                EINVAL,
                VolumeError::Invalid("no meta context selected".into()),
            )),
            CMD_BLOCK_STATUS if !in_range || len == 0 => {
                Err((EINVAL, out_of_range("block status")))
            }
            CMD_BLOCK_STATUS => {
                let one = req.flags & CMD_FLAG_REQ_ONE != 0;
                return match v.block_status(req.offset, len).await {
                    Ok(extents) => block_status_reply(req.cookie, &extents, len, one),
                    Err(e) => {
                        let (code, e) = errno(e);
                        error_reply(req.cookie, code, &e.to_string(), true)
                    }
                };
            }
            c => Err((EINVAL, VolumeError::Invalid(format!("unknown command {c}")))),
        };
        match result {
            Ok(data) => ok_reply(
                req.cookie,
                req.offset,
                data,
                agreed.structured_replies && req.command == CMD_READ,
            ),
            Err((code, e)) => {
                tracing::debug!(command = req.command, offset = req.offset, len, error = %e, "NBD request failed");
                error_reply(req.cookie, code, &e.to_string(), agreed.structured_replies)
            }
        }
    }
}

/// Reads exactly `n` more bytes into `buf` without zeroing it first.
async fn read_payload<R: AsyncRead + Unpin, B: bytes::BufMut>(
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

enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(l: &NbdListener) -> std::io::Result<(Stream, String)> {
    Ok(match l {
        NbdListener::Tcp(l) => {
            let (s, a) = l.accept().await?;
            (Stream::Tcp(s), a.to_string())
        }
        NbdListener::Unix(l) => (Stream::Unix(l.accept().await?.0), "unix".into()),
    })
}

fn errno(e: VolumeError) -> (u32, VolumeError) {
    let code = match e {
        VolumeError::Invalid(_) => EINVAL,
        VolumeError::NoSpace(_) => ENOSPC,
        VolumeError::Io(_) => EIO,
    };
    (code, e)
}

/// A reply as written to the socket: a header, then data (for reads) that
/// is passed through without being copied next to its header.
struct Reply {
    head: Bytes,
    data: Bytes,
}

impl From<BytesMut> for Reply {
    fn from(head: BytesMut) -> Reply {
        Reply {
            head: head.freeze(),
            data: Bytes::new(),
        }
    }
}

fn simple_reply(cookie: u64, error: u32, data: Option<Bytes>) -> Reply {
    let mut b = BytesMut::with_capacity(16);
    b.put_u32(SIMPLE_REPLY_MAGIC);
    b.put_u32(error);
    b.put_u64(cookie);
    Reply {
        head: b.freeze(),
        data: data.unwrap_or_default(),
    }
}

fn chunk_header(b: &mut BytesMut, cookie: u64, kind: u16, len: u32) {
    b.put_u32(STRUCTURED_REPLY_MAGIC);
    b.put_u16(REPLY_FLAG_DONE);
    b.put_u16(kind);
    b.put_u64(cookie);
    b.put_u32(len);
}

fn ok_reply(cookie: u64, offset: u64, data: Option<Bytes>, structured_read: bool) -> Reply {
    match (data, structured_read) {
        (Some(d), true) if !d.is_empty() => {
            let mut b = BytesMut::with_capacity(28);
            chunk_header(&mut b, cookie, REPLY_TYPE_OFFSET_DATA, 8 + d.len() as u32);
            b.put_u64(offset);
            Reply {
                head: b.freeze(),
                data: d,
            }
        }
        (_, true) => {
            let mut b = BytesMut::with_capacity(20);
            chunk_header(&mut b, cookie, REPLY_TYPE_NONE, 0);
            b.into()
        }
        (d, false) => simple_reply(cookie, 0, d),
    }
}

fn error_reply(cookie: u64, code: u32, message: &str, structured: bool) -> Reply {
    if !structured {
        return simple_reply(cookie, code, None);
    }
    let msg = &message.as_bytes()[..message.len().min(4096)];
    let mut b = BytesMut::with_capacity(26 + msg.len());
    chunk_header(&mut b, cookie, REPLY_TYPE_ERROR, 6 + msg.len() as u32);
    b.put_u32(code);
    b.put_u16(msg.len() as u16);
    b.put_slice(msg);
    b.into()
}

fn block_status_reply(cookie: u64, extents: &[Extent], len: u64, one: bool) -> Reply {
    let mut descriptors = Vec::new();
    let mut covered = 0u64;
    for e in extents {
        if covered >= len || descriptors.len() >= MAX_EXTENTS || (one && !descriptors.is_empty()) {
            break;
        }
        let n = e.length.min(len - covered).min(u32::MAX as u64 & !4095);
        if n == 0 {
            break;
        }
        let flags = if e.hole { STATE_HOLE | STATE_ZERO } else { 0 };
        descriptors.push((n as u32, flags));
        covered += n;
    }
    let mut b = BytesMut::with_capacity(24 + 8 * descriptors.len());
    chunk_header(
        &mut b,
        cookie,
        REPLY_TYPE_BLOCK_STATUS,
        4 + 8 * descriptors.len() as u32,
    );
    b.put_u32(BASE_ALLOCATION_ID);
    for (n, flags) in descriptors {
        b.put_u32(n);
        b.put_u32(flags);
    }
    b.into()
}

/// Returns after every task that is ready to run on this worker has run:
/// the task wakes itself, which queues it behind them. Unlike
/// `tokio::task::yield_now`, this does not make the worker poll its I/O
/// driver first, an `epoll_wait` that mostly found nothing here.
async fn ready_tasks_first() {
    let mut stepped_aside = false;
    std::future::poll_fn(|cx| {
        if stepped_aside {
            return std::task::Poll::Ready(());
        }
        stepped_aside = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    })
    .await
}

/// Replies with at least this much data are written from their own buffer;
/// smaller ones are copied together and written at once.
const LARGE_REPLY: usize = 64 << 10;

/// Gathered replies are written once they reach this.
const GATHER_LIMIT: usize = 256 << 10;

/// Writes replies in the order they come. `corkable` is the connection's
/// socket, for sending the header of a large reply with `MSG_MORE`.
async fn write_replies<W: AsyncWrite + Unpin>(
    mut wr: W,
    corkable: Option<OwnedFd>,
    mut rx: mpsc::UnboundedReceiver<Reply>,
) {
    let mut gathered = BytesMut::with_capacity(GATHER_LIMIT);
    while let Some(mut reply) = rx.recv().await {
        loop {
            gathered.put_slice(&reply.head);
            if reply.data.len() < LARGE_REPLY {
                gathered.put_slice(&reply.data);
            } else {
                let corked = corkable.as_ref().map_or(0, |fd| send_corked(fd, &gathered));
                if wr.write_all(&gathered[corked..]).await.is_err()
                    || wr.write_all(&reply.data).await.is_err()
                {
                    return;
                }
                gathered.clear();
            }
            if gathered.len() >= GATHER_LIMIT && drain(&mut wr, &mut gathered).await.is_err() {
                return;
            }
            // Yield once before writing, so replies of requests that are
            // finishing right now share one socket write.
            match rx.try_recv() {
                Ok(next) => reply = next,
                Err(_) => {
                    ready_tasks_first().await;
                    match rx.try_recv() {
                        Ok(next) => reply = next,
                        Err(_) => break,
                    }
                }
            }
        }
        if drain(&mut wr, &mut gathered).await.is_err() {
            return;
        }
    }
    let _ = wr.shutdown().await;
}

async fn drain<W: AsyncWrite + Unpin>(wr: &mut W, gathered: &mut BytesMut) -> std::io::Result<()> {
    wr.write_all(gathered).await?;
    gathered.clear();
    // A TLS stream holds encrypted records until flushed.
    wr.flush().await
}

/// Answers every option of a client whose certificate does not allow it
/// with NBD_REP_ERR_POLICY until it gives up (ABORT or disconnect); bounded,
/// so a client that keeps asking is dropped.
async fn refuse_all_options<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> std::io::Result<()> {
    for _ in 0..16 {
        let magic = s.read_u64().await?;
        let option = s.read_u32().await?;
        let len = s.read_u32().await?;
        if magic != IHAVEOPT || len > MAX_OPTION_LEN {
            break;
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).await?;
        let message = b"this certificate does not name the volume";
        let mut r = Vec::with_capacity(20 + message.len());
        r.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
        r.extend_from_slice(&option.to_be_bytes());
        let kind = if option == OPT_ABORT {
            REP_ACK
        } else {
            REP_ERR_POLICY
        };
        r.extend_from_slice(&kind.to_be_bytes());
        let body: &[u8] = if option == OPT_ABORT { b"" } else { message };
        r.extend_from_slice(&(body.len() as u32).to_be_bytes());
        r.extend_from_slice(body);
        s.write_all(&r).await?;
        s.flush().await?;
        if option == OPT_ABORT || option == OPT_EXPORT_NAME {
            break;
        }
    }
    Ok(())
}

/// Sends what it can of `head` without waiting, with `MSG_MORE`: the
/// socket holds it back to go out in one segment with the data written
/// next. Returns how many bytes it sent; the caller writes the rest.
///
/// Sent on its own under TCP_NODELAY, the header of a 1 MiB read reply is a
/// packet of its own that wakes the client for a few bytes. Held back, 1 MiB
/// reads from a replica in the engine's process went from 2368–2559 to
/// 3091–3531 MiB/s, with a quarter less engine CPU per GiB. A `writev` of
/// header and data, which one would expect to do the same, measured no
/// faster than the header sent alone (docs/benchmarks.md, 2026-12-02
/// 23:35). The replica crate's `coalesce::FrameWriter` does the same for
/// its frames; the two crates share no code.
fn send_corked(socket: &OwnedFd, head: &[u8]) -> usize {
    let flags = libc::MSG_MORE | libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
    socket2::SockRef::from(socket)
        .send_with_flags(head, flags)
        .unwrap_or(0)
}
