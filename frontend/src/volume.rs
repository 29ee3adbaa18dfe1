//! The small trait between frontends and the engine.

use std::future::Future;

use bytes::Bytes;

/// Why a volume operation failed, in terms a block frontend can report.
#[derive(Debug, Clone, thiserror::Error)]
pub enum VolumeError {
    /// The request itself is wrong (out of range, too large).
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("no space: {0}")]
    NoSpace(String),
    /// The volume could not do it (no replica left, I/O error, fenced).
    #[error("I/O error: {0}")]
    Io(String),
}

/// A run of the volume with one allocation state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    /// No layer holds data here; reads return zeros.
    pub hole: bool,
}

/// A block volume as frontends see it: byte-addressed, any alignment.
///
/// Contract: a write or trim that has completed is visible to every later
/// read through any connection; `flush` makes every write that completed
/// before it was called durable (so flush semantics hold across
/// connections); a write with `fua` is durable when it completes.
pub trait BlockVolume: Send + Sync + 'static {
    /// Current size in bytes (may grow while serving).
    fn size(&self) -> u64;

    fn read(
        &self,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = Result<Bytes, VolumeError>> + Send;

    fn write(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> impl Future<Output = Result<(), VolumeError>> + Send;

    fn flush(&self) -> impl Future<Output = Result<(), VolumeError>> + Send;

    /// Discards a range; later reads return unspecified data until rewritten.
    fn trim(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> impl Future<Output = Result<(), VolumeError>> + Send;

    /// Makes a range read as zeros. `may_punch`: the volume may deallocate.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_punch: bool,
        fua: bool,
    ) -> impl Future<Output = Result<(), VolumeError>> + Send;

    /// Allocation of a range, in order, starting at `offset`. May cover less
    /// than `len` but must cover at least one byte.
    fn block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<Vec<Extent>, VolumeError>> + Send;
}
