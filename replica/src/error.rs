//! Errors of the replica library.

use thiserror::Error;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Error)]
pub enum Error {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("corrupt replica: {0}")]
    Corrupt(String),
    #[error("not a replica directory: {0}")]
    NotAReplica(String),
    #[error("{0}")]
    Mismatch(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("no space left on the replica's file system: {0}")]
    NoSpace(String),
    /// Another process holds the replica directory open.
    #[error("{0} is in use by another process")]
    InUse(String),
    #[error("fenced: {0}")]
    Fenced(String),
    /// The request's connection was replaced by a newer one of its engine.
    #[error("superseded: {0}")]
    Superseded(String),
    /// Data read back does not match its checksum: bit rot or a stray write.
    #[error("checksum mismatch: {0}")]
    Checksum(String),
}

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        let context = context.into();
        if source.raw_os_error() == Some(libc::ENOSPC) {
            return Error::NoSpace(context);
        }
        Error::Io { context, source }
    }
}
