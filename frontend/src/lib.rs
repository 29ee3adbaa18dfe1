//! rvol's frontends: how a volume reaches its users.
//!
//! A frontend serves any [`BlockVolume`]: the engine's replicated volume in
//! production, a plain file or memory in tests. It knows nothing of
//! replicas, and the engine knows nothing of NBD or ublk wire formats.
//!
//! - [`nbd`]: a Network Block Device server (fixed newstyle, structured
//!   replies, `base:allocation`, multi-conn) over TCP or Unix sockets.
//! - [`ublk`]: a multi-queue Linux ublk target (`/dev/ublkbN`) with user
//!   recovery, so an engine restart does not take the device away.

pub mod nbd;
pub mod ublk;
mod volume;

pub use volume::{BlockVolume, Extent, VolumeError};
