//! Mutual TLS for rvol's connections: who is calling, proven.
//!
//! Every party holds a certificate and key signed by the cluster's CA, and
//! the CA's certificate. A connection is usable only after both sides
//! proved their certificate: the chain verifies to the CA (signature,
//! validity period, key usage: rustls and webpki do that) and the peer
//! holds its key (the TLS 1.3 handshake's signature). What a certificate
//! *names* is read from its URI SANs ([`Identity`]): an engine's names its
//! volume (`rvol://volume/NAME`), a replica's or agent's its node
//! (`rvol://node/NAME`, beside the DNS/IP SANs its address is checked
//! against), the controller's its role (`rvol://role/controller`). URI SANs
//! and not the subject's CN, so that any CA (cert-manager's among them)
//! can issue them. Deciding what an identity may do is the caller's job:
//! this crate only says who the peer is.
//!
//! **Rotation.** The three files are looked at (one `stat` each) whenever a
//! connection is made or accepted; when one changed, they are read again
//! and the new certificate serves from the next connection on. Open
//! connections keep the session they have. A rotation caught half-written
//! (a key that does not match its certificate yet) keeps the previous
//! configuration and logs why, so a running replica never loses the
//! ability to accept because of a rotation in progress.
//!
//! **Protocol.** TLS 1.3 only (both ends are rvol), AES-128-GCM preferred:
//! as strong as needed here and the cheapest per byte with AES-NI.
//! The handshake is bounded by [`HANDSHAKE_TIMEOUT`], so a caller that
//! connects and says nothing holds nothing for long.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, BufReader};

pub mod pki;

pub use tokio_rustls::{client, server};

/// How long a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Encrypted records may queue up to this much before they are written,
/// so that a large payload leaves in one `writev`: with rustls' default,
/// 64 KiB, a 1 MiB write to each of three replicas was sixteen, and the
/// engine spent 1.40 CPU s per GiB written instead of 1.17.
const SEND_BUFFER: usize = 8 << 20;

/// Ciphertext is read from the socket through a buffer this large. rustls
/// asks for 4 KiB at a time: under 4 KiB writes at queue depth 32 a
/// replica made one `recvfrom` per two writes, against one per 23 without
/// TLS. It made those writes 7 % faster and 1 MiB writes 7 % slower (the
/// engine's CPU per GiB rose again; docs/benchmarks.md, 2026-12-06): kept
/// for the small writes.
const READ_BUFFER: usize = 256 << 10;

/// A TLS stream over a socket, read through [`READ_BUFFER`].
pub type ServerStream<IO> = server::TlsStream<BufReader<IO>>;
pub type ClientStream<IO> = client::TlsStream<BufReader<IO>>;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error("TLS handshake with {peer}: {message}")]
    Handshake { peer: String, message: String },
}

pub type Result<T> = std::result::Result<T, TlsError>;

/// A party's certificate, key and the CA it trusts: three PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl TlsFiles {
    /// The three files from optional flags: all or none.
    pub fn from_flags(
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        ca: Option<PathBuf>,
    ) -> Result<Option<TlsFiles>> {
        match (cert, key, ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(ca)) => Ok(Some(TlsFiles { cert, key, ca })),
            _ => Err(TlsError::Config(
                "--tls-cert, --tls-key and --tls-ca go together".into(),
            )),
        }
    }
}

/// What a certificate names, from its `rvol://` URI SANs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    /// An engine of this volume.
    Volume(String),
    /// A node's replicas or agent.
    Node(String),
    /// The cluster controller.
    Controller,
}

impl Identity {
    /// Parses `rvol://volume/NAME`, `rvol://node/NAME` or
    /// `rvol://role/controller`; other URIs are not rvol's.
    pub fn from_uri(uri: &str) -> Option<Identity> {
        let rest = uri.strip_prefix("rvol://")?;
        let (kind, name) = rest.split_once('/')?;
        if name.is_empty() || name.contains('/') {
            return None;
        }
        match kind {
            "volume" => Some(Identity::Volume(name.to_string())),
            "node" => Some(Identity::Node(name.to_string())),
            "role" if name == "controller" => Some(Identity::Controller),
            _ => None,
        }
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Identity::Volume(n) => write!(f, "rvol://volume/{n}"),
            Identity::Node(n) => write!(f, "rvol://node/{n}"),
            Identity::Controller => write!(f, "rvol://role/controller"),
        }
    }
}

/// The rvol identities a DER certificate names.
pub fn identities(cert: &[u8]) -> Result<Vec<Identity>> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| TlsError::Config(format!("unreadable certificate: {e}")))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| TlsError::Config(format!("unreadable subjectAltName: {e}")))?;
    Ok(san
        .into_iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => Identity::from_uri(uri),
            _ => None,
        })
        .collect())
}

/// The identities of the peer of an established connection.
fn peer_identities(conn: &rustls::CommonState) -> Vec<Identity> {
    conn.peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|leaf| identities(leaf).ok())
        .unwrap_or_default()
}

fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            use rustls::crypto::aws_lc_rs::{cipher_suite as cs, default_provider};
            Arc::new(CryptoProvider {
                cipher_suites: vec![
                    cs::TLS13_AES_128_GCM_SHA256,
                    cs::TLS13_AES_256_GCM_SHA384,
                    cs::TLS13_CHACHA20_POLY1305_SHA256,
                ],
                ..default_provider()
            })
        })
        .clone()
}

/// What was read from the three files.
struct Loaded {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// The CA certificates in the PEM file `ca`.
fn read_roots(ca: &Path) -> Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    let cas = CertificateDer::pem_file_iter(ca)
        .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| file_err(ca, e))?;
    if roots.add_parsable_certificates(cas).0 == 0 {
        return Err(file_err(ca, "holds no usable CA certificate"));
    }
    Ok(Arc::new(roots))
}

impl Loaded {
    fn read(files: &TlsFiles) -> Result<Loaded> {
        let chain = CertificateDer::pem_file_iter(&files.cert)
            .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
            .map_err(|e| file_err(&files.cert, e))?;
        if chain.is_empty() {
            return Err(file_err(&files.cert, "holds no certificate"));
        }
        let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| file_err(&files.key, e))?;
        Ok(Loaded {
            chain,
            key,
            roots: read_roots(&files.ca)?,
        })
    }

    /// A server that requires a client certificate of the CA.
    fn server_config(self) -> Result<ServerConfig> {
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        self.server_config_with(verifier)
    }

    /// A server whose clients prove nothing in TLS (they bring a token).
    fn anonymous_clients_config(self) -> Result<ServerConfig> {
        self.server_config_with(WebPkiClientVerifier::no_client_auth())
    }

    fn server_config_with(
        self,
        verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    ) -> Result<ServerConfig> {
        ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .and_then(|b| {
                b.with_client_cert_verifier(verifier)
                    .with_single_cert(self.chain, self.key)
            })
            .map_err(|e| TlsError::Config(format!("certificate and key: {e}")))
    }

    fn client_config(self) -> Result<ClientConfig> {
        ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .and_then(|b| {
                b.with_root_certificates(self.roots)
                    .with_client_auth_cert(self.chain, self.key)
            })
            .map_err(|e| TlsError::Config(format!("certificate and key: {e}")))
    }
}

/// What identifies a version of the files: a changed one differs in one
/// of these (a rotation by rename changes the inode, one in place the
/// modification time or the size).
type Stamp = Vec<(u64, u64, i64, i64, u64)>;

fn stamp(files: &TlsFiles) -> Stamp {
    [&files.cert, &files.key, &files.ca]
        .iter()
        .map(|p| match std::fs::metadata(p) {
            Ok(m) => (m.dev(), m.ino(), m.mtime(), m.mtime_nsec(), m.len()),
            Err(_) => (0, 0, 0, 0, 0),
        })
        .collect()
}

/// A configuration that follows its files; see the module docs.
struct Reloading<C> {
    files: TlsFiles,
    build: fn(Loaded) -> Result<C>,
    current: Mutex<(Stamp, Arc<C>)>,
}

impl<C> Reloading<C> {
    fn new(files: TlsFiles, build: fn(Loaded) -> Result<C>) -> Result<Self> {
        let stamp = stamp(&files);
        let config = build(Loaded::read(&files)?)?;
        Ok(Reloading {
            files,
            build,
            current: Mutex::new((stamp, Arc::new(config))),
        })
    }

    fn get(&self) -> Arc<C> {
        let now = stamp(&self.files);
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if current.0 != now {
            match Loaded::read(&self.files).and_then(self.build) {
                Ok(config) => {
                    tracing::info!(cert = %self.files.cert.display(), "TLS files changed: reloaded");
                    *current = (now, Arc::new(config));
                }
                Err(e) => {
                    // Remember the stamp so a bad rotation is logged once,
                    // not at every connection; a fix changes it again.
                    tracing::warn!(error = %e, "TLS files changed but do not load; keeping the previous ones");
                    current.0 = now;
                }
            }
        }
        current.1.clone()
    }
}

/// The accepting side: requires and verifies the peer's certificate.
pub struct ServerTls(Reloading<ServerConfig>);

impl ServerTls {
    /// Clients must present a certificate of the CA.
    pub fn new(files: TlsFiles) -> Result<ServerTls> {
        Reloading::new(files, Loaded::server_config).map(ServerTls)
    }

    /// Clients present no certificate: for an API whose callers bring a
    /// token, which TLS then keeps from the network.
    pub fn anonymous_clients(files: TlsFiles) -> Result<ServerTls> {
        Reloading::new(files, Loaded::anonymous_clients_config).map(ServerTls)
    }

    /// Runs the handshake on an accepted stream; returns the stream and
    /// what the peer's certificate names.
    pub async fn accept<IO>(&self, io: IO, peer: &str) -> Result<(ServerStream<IO>, Vec<Identity>)>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.0.get());
        let io = BufReader::with_capacity(READ_BUFFER, io);
        let mut stream = handshake(peer, acceptor.accept(io)).await?;
        stream.get_mut().1.set_buffer_limit(Some(SEND_BUFFER));
        let ids = peer_identities(stream.get_ref().1);
        Ok((stream, ids))
    }
}

/// The connecting side: presents its certificate and checks the server's
/// against the name or address it dialled.
pub struct ClientTls(Reloading<ClientConfig>);

impl ClientTls {
    pub fn new(files: TlsFiles) -> Result<ClientTls> {
        Reloading::new(files, Loaded::client_config).map(ClientTls)
    }

    /// Runs the handshake with the server at `addr` (`host:port`, the
    /// host a DNS name or an IP address its certificate must name).
    pub async fn connect<IO>(&self, addr: &str, io: IO) -> Result<ClientStream<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        dial(self.0.get(), addr, io).await
    }

    /// What this party's own certificate names (the current files).
    pub fn own_identities(&self) -> Result<Vec<Identity>> {
        let loaded = Loaded::read(&self.0.files)?;
        identities(&loaded.chain[0])
    }
}

/// Runs a client handshake with the server at `addr` (`host:port`, the
/// host a DNS name or an IP address its certificate must name).
async fn dial<IO>(config: Arc<ClientConfig>, addr: &str, io: IO) -> Result<ClientStream<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let host = addr
        .rsplit_once(':')
        .map_or(addr, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    let name = ServerName::try_from(host.to_string()).map_err(|e| TlsError::Handshake {
        peer: addr.to_string(),
        message: format!("{host:?} is not a server name: {e}"),
    })?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let io = BufReader::with_capacity(READ_BUFFER, io);
    let mut stream = handshake(addr, connector.connect(name, io)).await?;
    stream.get_mut().1.set_buffer_limit(Some(SEND_BUFFER));
    Ok(stream)
}

/// Connects as a client that presents no certificate, checking the server
/// at `addr` against the CA in `ca` (a short-lived caller such as the CLI).
pub async fn connect_anonymous<IO>(ca: &Path, addr: &str, io: IO) -> Result<ClientStream<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(read_roots(ca)?)
        .with_no_client_auth();
    dial(Arc::new(config), addr, io).await
}

async fn handshake<T>(
    peer: &str,
    fut: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<T> {
    let err = |message: String| TlsError::Handshake {
        peer: peer.to_string(),
        message,
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, fut).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(err(e.to_string())),
        Err(_) => Err(err(format!(
            "no handshake within {} s",
            HANDSHAKE_TIMEOUT.as_secs()
        ))),
    }
}

#[cfg(test)]
mod tests;
