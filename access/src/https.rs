//! HTTPS for axum: a TCP listener whose connections are served only after
//! a TLS handshake with the server's certificate (clients bring a token,
//! not a certificate). Handshakes run in tasks of their own, so a client
//! that never finishes one holds up no other.

use std::net::SocketAddr;
use std::sync::Arc;

use rvol_tls::{ServerStream, ServerTls};

/// A TLS listener for [`axum::serve`].
pub struct TlsListener {
    ready: tokio::sync::mpsc::Receiver<(ServerStream<tokio::net::TcpStream>, SocketAddr)>,
    addr: SocketAddr,
    acceptor: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    pub fn start(l: tokio::net::TcpListener, tls: Arc<ServerTls>) -> std::io::Result<TlsListener> {
        let addr = l.local_addr()?;
        let (tx, ready) = tokio::sync::mpsc::channel(64);
        let acceptor = tokio::spawn(async move {
            loop {
                let (s, peer) = match l.accept().await {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let (tls, tx) = (tls.clone(), tx.clone());
                tokio::spawn(async move {
                    match tls.accept(s, &peer.to_string()).await {
                        Ok((s, _)) => {
                            let _ = tx.send((s, peer)).await;
                        }
                        Err(e) => tracing::warn!(%peer, error = %e, "TLS connection refused"),
                    }
                });
            }
        });
        Ok(TlsListener {
            ready,
            addr,
            acceptor,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = ServerStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(accepted) => accepted,
            // The acceptor only ends with this listener.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.addr)
    }
}
