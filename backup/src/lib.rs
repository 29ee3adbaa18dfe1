//! Backups of rvol volumes to an object store or a directory:
//! incremental, deduplicated by content, compressed, verified on restore.
//!
//! - [`format`]: what a target holds (the on-target format, a promise).
//! - [`target`]: the object store under a prefix, requests counted.
//! - [`lease`]: one backup of a volume at a time, no sweep during one.
//! - [`create`]: backing up a snapshot, reading only what changed.
//! - [`restore`]: restore, standby updates, verification.
//! - [`sweep`]: removing backups and the chunks no backup needs.
//!
//! The crate knows nothing of replicas or engines: a backup reads through
//! a [`create::Source`] and a restore writes through a [`restore::Sink`].

pub mod create;
pub mod format;
pub mod lease;
pub mod restore;
pub mod sweep;
pub mod target;
#[doc(hidden)]
pub mod testing;

pub use create::{create, BackupRequest, Progress, ProgressReport, Source, VolumeInfo};
pub use format::{ChunkId, Manifest, DEFAULT_CHUNK_SIZE};
pub use restore::{restore, verify, RestoreStats, Sink, VerifyReport};
pub use sweep::{remove, sweep, SweepReport};
pub use target::{StoreOptions, Target};
