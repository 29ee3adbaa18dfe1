//! A small HTTP/1.1 client (hyper) for the JSON APIs rvol's processes call
//! on each other: agents on their engines' admin sockets, the CLI on the
//! controller. One request per connection: these are control calls, a
//! few per second at most, and a fresh connection never finds a peer's
//! half-closed keep-alive socket. `https://` addresses are reached over
//! TLS, the server checked against a CA the caller names.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;

/// Where a server is: `unix:PATH`, `http://HOST:PORT` (or `HOST:PORT`),
/// `https://HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Tcp(String),
    Https(String),
    Unix(std::path::PathBuf),
}

/// What a client proves and checks: the bearer token it presents, and the
/// CA an HTTPS server's certificate must chain to.
#[derive(Default)]
pub struct Credentials {
    pub bearer: Option<zeroize::Zeroizing<String>>,
    pub ca: Option<std::path::PathBuf>,
}

impl std::str::FromStr for Address {
    type Err = String;
    fn from_str(s: &str) -> Result<Address, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            return Ok(Address::Unix(p.into()));
        }
        let (https, rest) = match s.strip_prefix("https://") {
            Some(rest) => (true, rest),
            None => (false, s.strip_prefix("http://").unwrap_or(s)),
        };
        let hostport = rest.trim_end_matches('/');
        if hostport.is_empty() || hostport.contains('/') || !hostport.contains(':') {
            return Err(format!(
                "{s:?} is not an address (http://HOST:PORT, https://HOST:PORT or unix:PATH)"
            ));
        }
        Ok(if https {
            Address::Https(hostport.to_string())
        } else {
            Address::Tcp(hostport.to_string())
        })
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Tcp(a) => write!(f, "http://{a}"),
            Address::Https(a) => write!(f, "https://{a}"),
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{address}: {message}")]
    Unreachable { address: String, message: String },
    /// The server answered with an error status.
    #[error("{status}: {body}")]
    Status { status: StatusCode, body: String },
}

/// A reply with a 2xx status.
pub struct Reply {
    pub status: StatusCode,
    pub body: Bytes,
}

/// Sends one request with an optional JSON body, within `timeout`.
pub async fn request(
    address: &Address,
    method: Method,
    path: &str,
    json: Option<String>,
    credentials: &Credentials,
    timeout: Duration,
) -> Result<Reply, HttpError> {
    let unreachable = |message: String| HttpError::Unreachable {
        address: address.to_string(),
        message,
    };
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "rvol")
        .header(hyper::header::CONTENT_TYPE, "application/json");
    if let Some(token) = &credentials.bearer {
        let value = zeroize::Zeroizing::new(format!("Bearer {}", token.as_str()));
        let mut value = hyper::header::HeaderValue::from_str(&value)
            .map_err(|_| unreachable("the token is not a valid header value".into()))?;
        value.set_sensitive(true);
        req = req.header(hyper::header::AUTHORIZATION, value);
    }
    let req = req
        .body(Full::new(Bytes::from(json.unwrap_or_default())))
        .map_err(|e| unreachable(format!("building the request: {e}")))?;
    let exchange = async {
        let (status, body) = match address {
            Address::Tcp(a) => {
                let s = tokio::net::TcpStream::connect(a.as_str()).await?;
                send(TokioIo::new(s), req).await?
            }
            Address::Https(a) => {
                let ca = credentials.ca.as_deref().ok_or_else(|| {
                    std::io::Error::other(
                        "an https:// address needs the CA's certificate to check it against",
                    )
                })?;
                let s = tokio::net::TcpStream::connect(a.as_str()).await?;
                let s = rvol_tls::connect_anonymous(ca, a, s)
                    .await
                    .map_err(std::io::Error::other)?;
                send(TokioIo::new(s), req).await?
            }
            Address::Unix(p) => {
                let s = tokio::net::UnixStream::connect(p).await?;
                send(TokioIo::new(s), req).await?
            }
        };
        Ok::<_, std::io::Error>((status, body))
    };
    let (status, body) = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| unreachable(format!("no answer within {timeout:?}")))?
        .map_err(|e| unreachable(e.to_string()))?;
    if !status.is_success() {
        return Err(HttpError::Status {
            status,
            body: String::from_utf8_lossy(&body).trim().to_string(),
        });
    }
    Ok(Reply { status, body })
}

async fn send<T>(io: TokioIo<T>, req: Request<Full<Bytes>>) -> std::io::Result<(StatusCode, Bytes)>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let io_err = |e: hyper::Error| std::io::Error::other(e.to_string());
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(io_err)?;
    let driver = tokio::spawn(conn);
    let reply = sender.send_request(req).await.map_err(io_err)?;
    let status = reply.status();
    let body = reply
        .into_body()
        .collect()
        .await
        .map_err(io_err)?
        .to_bytes();
    driver.abort();
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            "http://127.0.0.1:7400/".parse(),
            Ok(Address::Tcp("127.0.0.1:7400".into()))
        );
        assert_eq!(
            "unix:/run/a.sock".parse(),
            Ok(Address::Unix("/run/a.sock".into()))
        );
        assert!("http://h".parse::<Address>().is_err());
        assert!("http://h:1/x".parse::<Address>().is_err());
    }
}
