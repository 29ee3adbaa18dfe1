//! Coalescing of socket writes.
//!
//! A connection's writer task drains its queue into a buffer and flushes
//! when the queue is empty. Before that flush it steps aside once, so that
//! tasks already runnable (requests finishing right now) can queue their
//! frames too and share one `send`.
//!
//! `tokio::task::yield_now` is the wrong tool for that step: it defers the
//! wake-up until the worker has polled its I/O driver, and with one worker
//! and nothing else runnable that is an `epoll_wait` with a zero timeout.
//! In a 1-replica 4 KiB random read at qd32, that was 428 of the engine's
//! 700 `epoll_wait` calls, 349 of them returning nothing.
//! [`ready_tasks_first`] wakes itself instead, which puts the task at the
//! back of the worker's run queue: every task that is ready runs first,
//! and the driver is polled only on tokio's usual schedule.
//!
//! [`FrameWriter`] is that buffer. Small frames are copied into it; a
//! large payload is written from its own buffer, after what was gathered
//! before it, its header among them. Those gathered bytes go out with
//! `MSG_MORE`: sent alone under TCP_NODELAY, a header is a packet of its
//! own that wakes the peer for a few bytes. Held back to share a segment
//! with its payload, 1 MiB writes through a replica process made
//! 1466–1691 MiB/s against 1287–1474, and 1 MiB reads from the engine's
//! own replica, whose NBD replies the frontend sends the same way, 1.3×
//! (docs/benchmarks.md, 2026-12-02 23:35). A `writev` of header and
//! payload, which one would expect to do the same, measured no faster
//! than the header sent alone.

use std::future::poll_fn;
use std::os::fd::OwnedFd;
use std::task::Poll;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// Payloads at least this large are written from their own buffer.
const LARGE_PAYLOAD: usize = 64 << 10;

/// Gathered bytes are written once there are this many.
const GATHER_LIMIT: usize = 256 << 10;

/// Returns after every task that is ready to run on this worker has run.
async fn ready_tasks_first() {
    let mut stepped_aside = false;
    poll_fn(|cx| {
        if stepped_aside {
            return Poll::Ready(());
        }
        stepped_aside = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await
}

/// The sending side of a connection; see the module docs.
pub struct FrameWriter<W> {
    wr: W,
    /// The connection's socket, to send gathered bytes with `MSG_MORE`
    /// (a second descriptor of it); without one they are written plainly.
    socket: Option<OwnedFd>,
    gathered: BytesMut,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(wr: W, socket: Option<OwnedFd>) -> Self {
        FrameWriter {
            wr,
            socket,
            gathered: BytesMut::with_capacity(GATHER_LIMIT),
        }
    }

    /// Queues `frame` (a header, or a header and a small payload).
    pub async fn gather(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.gathered.put_slice(frame);
        if self.gathered.len() >= GATHER_LIMIT {
            self.flush().await?;
        }
        Ok(())
    }

    /// Writes a payload after what is gathered, without copying it if it
    /// is large.
    pub async fn payload(&mut self, payload: &[u8]) -> std::io::Result<()> {
        if payload.len() < LARGE_PAYLOAD {
            return self.gather(payload).await;
        }
        self.send_gathered_corked().await?;
        self.wr.write_all(payload).await
    }

    /// Sends what is gathered, held back by the socket until the next
    /// write, which must follow at once: the caller's large payload.
    pub async fn send_gathered_corked(&mut self) -> std::io::Result<()> {
        if self.gathered.is_empty() {
            return Ok(());
        }
        let corked = self
            .socket
            .as_ref()
            .map_or(0, |s| send_more(s, &self.gathered));
        self.wr.write_all(&self.gathered[corked..]).await?;
        self.gathered.clear();
        Ok(())
    }

    /// Writes what is gathered, and makes the writer send what it holds
    /// (a TLS stream keeps encrypted records until flushed).
    pub async fn flush(&mut self) -> std::io::Result<()> {
        if !self.gathered.is_empty() {
            self.wr.write_all(&self.gathered).await?;
            self.gathered.clear();
        }
        self.wr.flush().await
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.wr
    }

    /// Writes each item `rx` yields with `write`, until `rx` closes or a
    /// write fails. Before writing what is gathered it steps aside once
    /// ([`ready_tasks_first`]), so that the frames of requests finishing
    /// right now share one socket write.
    pub async fn write_queued<T>(
        mut self,
        mut rx: mpsc::UnboundedReceiver<T>,
        mut write: impl AsyncFnMut(&mut Self, T) -> std::io::Result<()>,
    ) {
        while let Some(mut item) = rx.recv().await {
            loop {
                if write(&mut self, item).await.is_err() {
                    return;
                }
                match rx.try_recv() {
                    Ok(next) => item = next,
                    Err(_) => {
                        ready_tasks_first().await;
                        match rx.try_recv() {
                            Ok(next) => item = next,
                            Err(_) => break,
                        }
                    }
                }
            }
            if self.flush().await.is_err() {
                return;
            }
        }
    }
}

/// Sends what it can of `bytes` without waiting, with `MSG_MORE`, and
/// returns how many it sent.
fn send_more(socket: &OwnedFd, bytes: &[u8]) -> usize {
    let flags = libc::MSG_MORE | libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
    socket2::SockRef::from(socket)
        .send_with_flags(bytes, flags)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;
    use std::time::Duration;

    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// Frames arrive whole and in order over real TCP, also when the
    /// socket is full, so that the corked send takes part of what is
    /// gathered or none of it and the rest is written plainly.
    #[tokio::test]
    async fn frames_arrive_in_order_through_a_full_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (client, mut server) = (client.unwrap(), accepted.unwrap().0);
        // A small send buffer fills after every large payload.
        socket2::SockRef::from(&client)
            .set_send_buffer_size(16 << 10)
            .unwrap();
        client.set_nodelay(true).unwrap();
        let socket = client.as_fd().try_clone_to_owned().unwrap();
        let (_rd, wr) = client.into_split();

        // Two small frames, then a large payload, over and over: what is
        // gathered before a large payload is often more than the socket
        // takes at once.
        let frames: Vec<Vec<u8>> = (0..90u32)
            .map(|i| {
                let len = if i % 3 == 2 {
                    LARGE_PAYLOAD << (i % 4)
                } else {
                    12 + (i as usize * 997) % (30 << 10)
                };
                (0..len).map(|k| (k as u32 * 31 + i) as u8).collect()
            })
            .collect();
        let expected = frames.concat();
        let writer = tokio::spawn(async move {
            let mut w = FrameWriter::new(wr, Some(socket));
            for (i, f) in frames.iter().enumerate() {
                if i % 3 == 2 {
                    w.payload(f).await.unwrap();
                } else {
                    w.gather(f).await.unwrap();
                }
            }
            w.flush().await.unwrap();
        });
        // A slow reader keeps the socket full.
        let mut got = vec![0u8; expected.len()];
        for chunk in got.chunks_mut(64 << 10) {
            tokio::time::sleep(Duration::from_millis(1)).await;
            server.read_exact(chunk).await.unwrap();
        }
        writer.await.unwrap();
        let first_bad = got.iter().zip(&expected).position(|(a, b)| a != b);
        assert_eq!(first_bad, None, "of {} bytes", expected.len());
    }
}
