//! Newtypes for the numbers a replica keeps apart.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Size of a block: the unit of every replica I/O, of the index and of the
/// on-disk allocation the replica tracks.
pub const BLOCK_SIZE: u64 = 4096;

/// Index of a 4 KiB block in the volume (byte offset / [`BLOCK_SIZE`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockIndex(pub u64);

impl BlockIndex {
    pub fn byte_offset(self) -> u64 {
        self.0 * BLOCK_SIZE
    }
}

/// The UUID every replica of volume `name` is bound to. Derived from the
/// name, so that a certificate naming the volume (`rvol://volume/NAME`)
/// names its replicas' UUID too.
pub fn volume_uuid(name: &str) -> Uuid {
    const NAMESPACE: Uuid = Uuid::from_u128(0x9d6f_2b1c_7a43_4e0b_a7c5_3f1e_8d20_6b91);
    Uuid::new_v5(&NAMESPACE, name.as_bytes())
}

/// Raised by every engine that takes a replica over. A replica obeys only
/// the engine holding the highest generation it has seen.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Generation(pub u64);

impl Generation {
    pub fn next(self) -> Generation {
        Generation(self.0 + 1)
    }
}

impl std::fmt::Display for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Counts the modifying operations (write, trim, write-zeroes) a replica has
/// applied. Persisted at every flush, so after a crash it is the count at
/// the last flush.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Revision(pub u64);

impl std::fmt::Display for Revision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Position of a layer in the chain, counted from the oldest snapshot (0).
/// Positions of existing layers do not change when a new head is added on
/// top, so index entries stay valid across snapshot creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LayerPos(pub u32);
