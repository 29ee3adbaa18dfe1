//! Who may use an API: bearer tokens, one that may only read and one that
//! may also act.
//!
//! A request that only reads (GET or HEAD: status, lists, metrics) needs
//! either token; anything else (an engine's snapshot, revert, replica
//! add/rm, expand; the cluster's create, attach, delete...) needs the
//! control token. With no token configured the API is open: fit for a
//! Unix socket (created 0600), and warned about on TCP by its server. Tokens come from
//! files, never from arguments (visible in `ps`), are compared in constant
//! time, are wiped from memory when dropped, and never appear in a log
//! line: a refusal logs the method, the path and why.

use std::path::Path;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Read,
    Control,
}

/// An API's tokens; see the module docs.
#[derive(Default)]
pub struct Tokens {
    control: Option<Zeroizing<String>>,
    read: Option<Zeroizing<String>>,
    /// Where a refused client finds its token (named in the refusal).
    env: &'static str,
    /// Reads (GET, HEAD) need no token; control still does.
    public_reads: bool,
}

/// Reads a token: the file's content without surrounding whitespace.
pub fn read_token(path: &Path) -> anyhow::Result<Zeroizing<String>> {
    use std::os::unix::fs::PermissionsExt;
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading the token file {}: {e}", path.display()))?,
    );
    let token = Zeroizing::new(text.trim().to_string());
    if token.is_empty() {
        anyhow::bail!("the token file {} is empty", path.display());
    }
    if let Ok(m) = std::fs::metadata(path) {
        if m.permissions().mode() & 0o077 != 0 {
            tracing::warn!(file = %path.display(), "token file is readable by others than its owner");
        }
    }
    Ok(token)
}

impl Tokens {
    /// Reads the tokens' files; `env` names the variable clients read
    /// their token file's name from, for the refusal to say so.
    pub fn load(
        control: Option<&Path>,
        read: Option<&Path>,
        env: &'static str,
    ) -> anyhow::Result<Tokens> {
        let tokens = Tokens {
            control: control.map(read_token).transpose()?,
            read: read.map(read_token).transpose()?,
            env,
            public_reads: false,
        };
        if tokens.read.is_some() && tokens.control.is_none() {
            anyhow::bail!(
                "a read-only token needs a control token too: otherwise control would need no token"
            );
        }
        Ok(tokens)
    }

    /// Lets anyone read (status, lists, metrics, the dashboard's data)
    /// while control still needs the control token: for a dashboard on a
    /// network where the volumes' state is no secret. Refused without a
    /// control token, which would leave control open too.
    pub fn with_public_reads(mut self, public: bool) -> anyhow::Result<Tokens> {
        if public && self.control.is_none() {
            anyhow::bail!(
                "public reads need a control token: otherwise control would be public too"
            );
        }
        if public && self.read.is_some() {
            anyhow::bail!("public reads make the read-only token pointless: give one or the other");
        }
        self.public_reads = public;
        Ok(self)
    }

    /// No token configured: every caller may do everything.
    pub fn is_open(&self) -> bool {
        self.control.is_none()
    }

    /// What the bearer of `token` may do, if anything.
    fn role_of(&self, token: &str) -> Option<Role> {
        let matches = |t: &Option<Zeroizing<String>>| {
            t.as_ref()
                .is_some_and(|t| bool::from(t.as_bytes().ct_eq(token.as_bytes())))
        };
        if matches(&self.control) {
            Some(Role::Control)
        } else if matches(&self.read) {
            Some(Role::Read)
        } else {
            None
        }
    }
}

fn refuse(status: StatusCode, why: &str) -> Response {
    (status, Json(serde_json::json!({ "error": why }))).into_response()
}

/// The middleware in front of every route.
pub async fn guard(State(tokens): State<Arc<Tokens>>, req: Request, next: Next) -> Response {
    if tokens.is_open() {
        return next.run(req).await;
    }
    let needed = if matches!(*req.method(), Method::GET | Method::HEAD) {
        if tokens.public_reads {
            return next.run(req).await;
        }
        Role::Read
    } else {
        Role::Control
    };
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let role = presented.and_then(|t| tokens.role_of(t.trim()));
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    match role {
        Some(role) if role >= needed => next.run(req).await,
        Some(_) => {
            tracing::warn!(%method, %path, "request refused: the token may only read");
            refuse(
                StatusCode::FORBIDDEN,
                "this token may only read; control needs the control token",
            )
        }
        None => {
            let why = if presented.is_some() {
                "unknown token"
            } else {
                "no token"
            };
            tracing::warn!(%method, %path, reason = why, "request refused");
            refuse(
                StatusCode::UNAUTHORIZED,
                &format!(
                    "this API needs a token: Authorization: Bearer TOKEN (rvol commands \
                     read it from the file named by {})",
                    tokens.env
                ),
            )
        }
    }
}

/// The token a CLI presents: the file named by the variable `env`.
pub fn client_token(env: &str) -> anyhow::Result<Option<Zeroizing<String>>> {
    match std::env::var_os(env) {
        Some(p) => read_token(Path::new(&p)).map(Some),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_token_has_its_role_and_nothing_else_has_one() {
        let t = Tokens {
            control: Some(Zeroizing::new("c0ntrol".into())),
            read: Some(Zeroizing::new("r3ad".into())),
            env: "T",
            public_reads: false,
        };
        assert_eq!(t.role_of("c0ntrol"), Some(Role::Control));
        assert_eq!(t.role_of("r3ad"), Some(Role::Read));
        for other in ["", "c0ntro", "c0ntroll", "R3AD", "r3ad "] {
            assert_eq!(t.role_of(other), None, "{other:?}");
        }
        assert!(!t.is_open());
        assert!(Tokens::default().is_open());
    }

    #[test]
    fn public_reads_need_a_control_token_and_no_read_token() {
        let control = |read: bool| Tokens {
            control: Some(Zeroizing::new("c".into())),
            read: read.then(|| Zeroizing::new("r".into())),
            env: "T",
            public_reads: false,
        };
        assert!(Tokens::default().with_public_reads(true).is_err());
        assert!(control(true).with_public_reads(true).is_err());
        let t = control(false).with_public_reads(true).unwrap();
        assert!(t.public_reads && !t.is_open());
        assert!(Tokens::default().with_public_reads(false).is_ok());
    }
}
