//! rvol's replica: the process that holds one copy of a volume.
//!
//! A replica keeps the volume in a directory of sparse, snapshot-chained
//! layer files ([`store`]), indexed block by block ([`index`]), and serves
//! one engine at a time over a small framed protocol ([`proto`],
//! [`server`]); [`client`] is the engine's side of that protocol, and runs
//! a replica in the engine's own process for `local:DIR` ([`local`]). The
//! replica knows nothing of frontends: it sees only whole 4 KiB blocks.
//!
//! # I/O engine
//!
//! Data I/O is positional `pread`/`pwrite` on buffered files, issued from
//! the connection's task, with `fdatasync` moved to the blocking pool. On
//! this machine's 2 cores the NBD path is CPU-bound, and page-cache copies
//! are a few microseconds; io_uring is the next step to measure against it
//! (see the performance issue), and the store's API (owned buffers in,
//! owned buffers out) is shaped so it can move there without changes above.

pub mod checksum;
pub mod client;
pub mod coalesce;
pub mod crc;
pub mod direct;
pub mod dirty;
pub mod error;
pub mod ids;
pub mod index;
pub mod local;
pub mod maintenance;
pub mod meta;
pub mod proto;
pub mod server;
mod session;
pub mod snapshot_view;
pub mod state;
pub mod store;

pub use error::{Error, Result};
pub use ids::{volume_uuid, BlockIndex, Generation, LayerPos, Revision, BLOCK_SIZE};
pub use store::{Owner, Replica, ReplicaInfo};
