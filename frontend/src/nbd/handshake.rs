//! The NBD handshake: fixed newstyle negotiation up to transmission.
//!
//! Supported options: EXPORT_NAME, ABORT, LIST, INFO, GO (with
//! NBD_INFO_EXPORT, NAME, DESCRIPTION and BLOCK_SIZE), STRUCTURED_REPLY,
//! LIST_META_CONTEXT and SET_META_CONTEXT (`base:allocation`). Anything
//! else is answered with NBD_REP_ERR_UNSUP and negotiation goes on. A
//! client that breaks the framing (bad magic, an option longer than we are
//! willing to read) is disconnected.
//!
//! **TLS** (STARTTLS, forced mode, as `nbdkit --tls=require`): where the
//! server requires TLS, every option before STARTTLS but ABORT is answered
//! NBD_REP_ERR_TLS_REQD and EXPORT_NAME, which has no error reply, closes
//! the connection: a client that does not start TLS learns nothing about
//! the export. After STARTTLS is acknowledged the caller runs the TLS
//! handshake and negotiation starts over inside it ([`options`] again);
//! nothing agreed before it carries over.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::proto::*;

/// What the server offers.
pub struct ExportInfo {
    pub name: String,
    pub description: String,
    pub size: u64,
    pub transmission_flags: u16,
}

/// What was agreed when transmission starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Negotiated {
    pub structured_replies: bool,
    pub base_allocation: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("client is not fixed-newstyle (flags {0:#x})")]
    ClientFlags(u32),
    #[error("bad option magic {0:#018x}")]
    OptionMagic(u64),
    #[error("option {option} carries {len} bytes, more than {MAX_OPTION_LEN}")]
    OptionTooLong { option: u32, len: u32 },
    #[error("client asked for unknown export {0:?} with EXPORT_NAME")]
    UnknownExport(String),
    #[error("client sent EXPORT_NAME without TLS, which this server requires")]
    TlsRequired,
}

/// Where negotiation stands with TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tls {
    /// The server offers none.
    Off,
    /// The server requires it and the client has not started it.
    Required,
    /// Negotiation runs inside TLS.
    Active,
}

/// How the option phase ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Transmission starts.
    Serve(Negotiated),
    /// The client aborted or went away.
    Closed,
    /// STARTTLS was acknowledged: the TLS handshake comes next.
    StartTls,
}

/// What the greeting settled.
#[derive(Debug, Clone, Copy)]
pub struct Greeting {
    no_zeroes: bool,
}

/// Runs the handshake of a server without TLS. `Ok(None)`: the client
/// aborted or went away.
pub async fn negotiate<S>(
    s: &mut S,
    export: &ExportInfo,
) -> Result<Option<Negotiated>, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let greeting = greet(s).await?;
    Ok(match options(s, export, greeting, Tls::Off).await? {
        Outcome::Serve(agreed) => Some(agreed),
        Outcome::Closed | Outcome::StartTls => None,
    })
}

/// Sends the server's greeting and reads the client's flags.
pub async fn greet<S>(s: &mut S) -> Result<Greeting, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello).await?;
    s.flush().await?;
    let client_flags = s.read_u32().await?;
    if client_flags & FLAG_C_FIXED_NEWSTYLE == 0
        || client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0
    {
        return Err(HandshakeError::ClientFlags(client_flags));
    }
    Ok(Greeting {
        no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0,
    })
}

/// Runs the option phase; see the module docs for `tls`.
pub async fn options<S>(
    s: &mut S,
    export: &ExportInfo,
    greeting: Greeting,
    tls: Tls,
) -> Result<Outcome, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let no_zeroes = greeting.no_zeroes;
    let mut agreed = Negotiated::default();
    loop {
        let magic = match s.read_u64().await {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(Outcome::Closed),
            Err(e) => return Err(e.into()),
        };
        if magic != IHAVEOPT {
            return Err(HandshakeError::OptionMagic(magic));
        }
        let option = s.read_u32().await?;
        let len = s.read_u32().await?;
        if len > MAX_OPTION_LEN {
            return Err(HandshakeError::OptionTooLong { option, len });
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).await?;
        let mut out = Replies {
            buf: Vec::new(),
            option,
        };
        match (option, tls) {
            (OPT_ABORT, _) => {
                out.reply(REP_ACK, &[]);
                let _ = s.write_all(&out.buf).await;
                let _ = s.flush().await;
                return Ok(Outcome::Closed);
            }
            (OPT_STARTTLS, Tls::Required) if data.is_empty() => {
                out.reply(REP_ACK, &[]);
                s.write_all(&out.buf).await?;
                s.flush().await?;
                return Ok(Outcome::StartTls);
            }
            (OPT_STARTTLS, Tls::Required) => out.error(REP_ERR_INVALID, "option takes no data"),
            (OPT_STARTTLS, Tls::Off) => out.error(REP_ERR_UNSUP, "this server offers no TLS"),
            (OPT_STARTTLS, Tls::Active) => out.error(REP_ERR_INVALID, "TLS is already on"),
            (OPT_EXPORT_NAME, Tls::Required) => return Err(HandshakeError::TlsRequired),
            (_, Tls::Required) => out.error(REP_ERR_TLS_REQD, "this server requires TLS"),
            _ => {}
        }
        if !out.buf.is_empty() {
            s.write_all(&out.buf).await?;
            s.flush().await?;
            continue;
        }
        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                if !export_matches(export, &name) {
                    return Err(HandshakeError::UnknownExport(name));
                }
                let mut b = Vec::with_capacity(134);
                b.extend_from_slice(&export.size.to_be_bytes());
                b.extend_from_slice(&export.transmission_flags.to_be_bytes());
                if !no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&b).await?;
                s.flush().await?;
                return Ok(Outcome::Serve(agreed));
            }
            OPT_LIST if data.is_empty() => {
                let mut d = Vec::new();
                d.extend_from_slice(&(export.name.len() as u32).to_be_bytes());
                d.extend_from_slice(export.name.as_bytes());
                out.reply(REP_SERVER, &d);
                out.reply(REP_ACK, &[]);
            }
            OPT_INFO | OPT_GO => match parse_info_request(&data) {
                None => out.error(REP_ERR_INVALID, "malformed INFO/GO request"),
                Some((name, _)) if !export_matches(export, &name) => {
                    out.error(REP_ERR_UNKNOWN, &format!("no export named {name:?}"))
                }
                Some((_, infos)) => {
                    let mut d = Vec::with_capacity(12);
                    d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                    d.extend_from_slice(&export.size.to_be_bytes());
                    d.extend_from_slice(&export.transmission_flags.to_be_bytes());
                    out.reply(REP_INFO, &d);
                    // Sent even when not asked for: we accept any alignment
                    // (the engine read-modify-writes), so a client that does
                    // not honour it loses nothing.
                    let mut d = Vec::with_capacity(14);
                    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                    d.extend_from_slice(&MIN_BLOCK.to_be_bytes());
                    d.extend_from_slice(&PREFERRED_BLOCK.to_be_bytes());
                    d.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
                    out.reply(REP_INFO, &d);
                    for info in infos {
                        let text = match info {
                            INFO_NAME => &export.name,
                            INFO_DESCRIPTION => &export.description,
                            _ => continue,
                        };
                        let mut d = info.to_be_bytes().to_vec();
                        d.extend_from_slice(text.as_bytes());
                        out.reply(REP_INFO, &d);
                    }
                    out.reply(REP_ACK, &[]);
                    if option == OPT_GO {
                        s.write_all(&out.buf).await?;
                        s.flush().await?;
                        return Ok(Outcome::Serve(agreed));
                    }
                }
            },
            OPT_STRUCTURED_REPLY if data.is_empty() => {
                agreed.structured_replies = true;
                out.reply(REP_ACK, &[]);
            }
            OPT_SET_META_CONTEXT if !agreed.structured_replies => out.error(
                REP_ERR_INVALID,
                "SET_META_CONTEXT needs structured replies first",
            ),
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => match parse_meta_request(&data) {
                None => out.error(REP_ERR_INVALID, "malformed meta context request"),
                Some((name, _)) if !export_matches(export, &name) => {
                    out.error(REP_ERR_UNKNOWN, &format!("no export named {name:?}"))
                }
                Some((_, queries)) => {
                    let list = option == OPT_LIST_META_CONTEXT;
                    let matched = if list && queries.is_empty() {
                        true
                    } else {
                        queries
                            .iter()
                            .any(|q| q == BASE_ALLOCATION || (list && q == "base:"))
                    };
                    if matched {
                        let mut d = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
                        d.extend_from_slice(BASE_ALLOCATION.as_bytes());
                        out.reply(REP_META_CONTEXT, &d);
                    }
                    if !list {
                        agreed.base_allocation = matched;
                    }
                    out.reply(REP_ACK, &[]);
                }
            },
            OPT_LIST | OPT_STRUCTURED_REPLY => out.error(REP_ERR_INVALID, "option takes no data"),
            _ => out.error(REP_ERR_UNSUP, &format!("option {option} is not supported")),
        }
        s.write_all(&out.buf).await?;
        s.flush().await?;
    }
}

fn export_matches(export: &ExportInfo, name: &str) -> bool {
    // The empty name is the default export.
    name.is_empty() || name == export.name
}

/// Option replies for one option, gathered before they are written.
struct Replies {
    buf: Vec<u8>,
    option: u32,
}

impl Replies {
    fn reply(&mut self, kind: u32, data: &[u8]) {
        self.buf.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
        self.buf.extend_from_slice(&self.option.to_be_bytes());
        self.buf.extend_from_slice(&kind.to_be_bytes());
        self.buf
            .extend_from_slice(&(data.len() as u32).to_be_bytes());
        self.buf.extend_from_slice(data);
    }

    fn error(&mut self, kind: u32, message: &str) {
        self.reply(kind, message.as_bytes());
    }
}

/// A cursor over option data that fails instead of panicking.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn string(&mut self) -> Option<String> {
        let n = self.u32()? as usize;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).ok()
    }
}

/// INFO/GO data: export name and the info types asked for.
pub fn parse_info_request(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let mut c = Cursor(data);
    let name = c.string()?;
    let n = c.u16()?;
    let infos = (0..n).map(|_| c.u16()).collect::<Option<Vec<_>>>()?;
    c.0.is_empty().then_some((name, infos))
}

/// LIST/SET_META_CONTEXT data: export name and the queries.
pub fn parse_meta_request(data: &[u8]) -> Option<(String, Vec<String>)> {
    let mut c = Cursor(data);
    let name = c.string()?;
    let n = c.u32()?;
    if n as usize > data.len() / 4 {
        return None;
    }
    let queries = (0..n).map(|_| c.string()).collect::<Option<Vec<_>>>()?;
    c.0.is_empty().then_some((name, queries))
}
