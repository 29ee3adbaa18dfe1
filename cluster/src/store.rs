//! The cluster store: the few operations rvol's control plane needs from
//! a replicated key-value store, as a trait (etcd behind it today, see
//! [`crate::etcd`]; a Kubernetes-API backend could follow).
//!
//! Every value carries the store revision at which it was last written.
//! Writers never overwrite blindly: a put or delete names what it expects
//! to find ([`Expect`]) and fails with [`StoreError::Conflict`] when
//! someone else got there first, so two controllers acting on the same
//! record cannot both win, and a reconciler that lost simply reads again.
//! A watch starts from a revision (the one a listing was taken at), so no
//! change between a list and its watch is missed: the level-triggered
//! list-then-watch of Kubernetes controllers. Leases make keys that vanish
//! when their owner stops renewing them (node heartbeats, the controller's
//! leadership).
//!
//! Nothing on the data path uses this: an engine serves its volume with the
//! store down; only control operations fail, with
//! [`StoreError::Unavailable`] naming the store.

use std::future::Future;
use std::time::Duration;

use futures::stream::BoxStream;

/// A store revision: increases with every change to any key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Revision(pub i64);

impl std::fmt::Display for Revision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A lease: keys put under it are deleted when it expires or is revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseId(pub i64);

/// A value and the revision at which its key was last written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub value: Vec<u8>,
    pub revision: Revision,
}

/// Keys under a prefix, in key order, as of one store revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    pub items: Vec<(String, Versioned)>,
    /// The store's revision when it was read: watch from here.
    pub revision: Revision,
}

/// What a write expects to find.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The key does not exist.
    Absent,
    /// The key was last written at this revision.
    At(Revision),
    /// Anything: an unconditional write.
    Anything,
}

/// A change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Put {
        key: String,
        value: Vec<u8>,
        revision: Revision,
    },
    Delete {
        key: String,
        revision: Revision,
    },
}

impl Change {
    pub fn key(&self) -> &str {
        match self {
            Change::Put { key, .. } | Change::Delete { key, .. } => key,
        }
    }

    pub fn revision(&self) -> Revision {
        match self {
            Change::Put { revision, .. } | Change::Delete { revision, .. } => *revision,
        }
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    /// The store cannot be reached or did not answer in time.
    #[error("the cluster store is unavailable: {0}")]
    Unavailable(String),
    /// The key was not as the write expected; `current` is its revision
    /// now (`None`: it does not exist).
    #[error("{key} changed meanwhile (now at revision {current:?})")]
    Conflict {
        key: String,
        current: Option<Revision>,
    },
    /// The revision a watch asked to start from has been compacted away:
    /// list again and watch from the listing.
    #[error("revision {0} is compacted; list again")]
    Compacted(Revision),
    /// The lease expired (or never existed).
    #[error("lease {0:?} expired")]
    LeaseExpired(LeaseId),
    /// Anything else the store refused, with its message.
    #[error("the cluster store refused: {0}")]
    Refused(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// See the module documentation.
pub trait Store: Send + Sync + 'static {
    /// The value of `key`, if it exists.
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<Versioned>>> + Send;

    /// Every key starting with `prefix`, in key order.
    fn list(&self, prefix: &str) -> impl Future<Output = Result<Listing>> + Send;

    /// Writes `key` if it is as `expect` says; returns the new revision.
    fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        expect: Expect,
        lease: Option<LeaseId>,
    ) -> impl Future<Output = Result<Revision>> + Send;

    /// Deletes `key` if it is as `expect` says; returns whether it existed.
    fn delete(&self, key: &str, expect: Expect) -> impl Future<Output = Result<bool>> + Send;

    /// Every change to keys under `prefix` made after revision `after`, in
    /// order, then as they happen. The stream ends with an error when the
    /// store is lost; watch again from the last revision seen.
    fn watch(
        &self,
        prefix: &str,
        after: Revision,
    ) -> impl Future<Output = Result<BoxStream<'static, Result<Change>>>> + Send;

    /// A lease that expires `ttl` after its last renewal.
    fn grant_lease(&self, ttl: Duration) -> impl Future<Output = Result<LeaseId>> + Send;

    /// Renews `lease`; returns the time it has left.
    fn keep_alive(&self, lease: LeaseId) -> impl Future<Output = Result<Duration>> + Send;

    /// Ends `lease` now, deleting its keys.
    fn revoke(&self, lease: LeaseId) -> impl Future<Output = Result<()>> + Send;
}
