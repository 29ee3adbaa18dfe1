//! Replicas in the engine's own process: `local:DIR` endpoints.
//!
//! A replica on the engine's node need not be a process of its own. For a
//! `local:DIR` endpoint the engine opens the directory itself and runs the
//! replica's sessions ([`crate::session`]) in its own process: the same
//! requests, leases and checks as over a socket, but no framing, no wire
//! checksums, no syscalls and no second process to wake. On a CPU-bound
//! node that is most of what a 4 KiB read costs (see `docs/benchmarks.md`).
//!
//! What changes against a replica process:
//!
//! - A SIGKILL of the engine is a SIGKILL of this replica too. Its files
//!   are then what a killed replica process leaves: every write in the page
//!   cache, every acknowledged flush on disk, and on reopening the replica
//!   knows it stopped uncleanly, exactly as after a replica process's crash.
//! - Page-cache reads and writes run in the engine task that asked for
//!   them, as they run in a replica's connection task: a stalled disk
//!   stalls that task instead of timing out. Flushes and FUA writes run on
//!   the blocking pool, under the engine's timeouts as before.
//! - A directory opened here stays open, and locked against other
//!   processes (see [`crate::store`]), until the process exits: every
//!   client of it shares one [`Replica`], so a reconnect after an error, or
//!   removing the replica and adding it back, finds it open.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::server::Endpoint;
use crate::store::Replica;

/// Directories this process holds open, by absolute path.
static OPEN: Mutex<Option<HashMap<PathBuf, Arc<Replica>>>> = Mutex::new(None);

/// The replica in `dir`, opened once per process; created with `size` bytes
/// if the directory holds none and `size` is given (see
/// [`Replica::open_or_create`]).
pub async fn open_or_create(dir: &Path, size: Option<u64>) -> Result<Arc<Replica>> {
    let dir = std::path::absolute(dir)
        .map_err(|e| Error::io(format!("resolving {}", dir.display()), e))?;
    if let Some(r) = registry(|open| open.get(&dir).cloned()) {
        return Ok(r);
    }
    let d = dir.clone();
    let replica = tokio::task::spawn_blocking(move || Replica::open_or_create(&d, size))
        .await
        .map_err(|e| Error::io("opening a local replica", std::io::Error::other(e)))??;
    // Two callers may open at once: the loser's open fails on the
    // directory's lock, so the registry never holds two.
    let replica = Arc::new(replica);
    registry(|open| open.insert(dir, replica.clone()));
    Ok(replica)
}

fn registry<T>(f: impl FnOnce(&mut HashMap<PathBuf, Arc<Replica>>) -> T) -> T {
    let mut open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
    f(open.get_or_insert_with(HashMap::new))
}

/// Readies `endpoint` to be probed: a `local:` directory holding no replica
/// gets one of `size` bytes, as a replica process started with `--size`
/// makes one. Other endpoints are the replica process's business.
pub async fn prepare(endpoint: &Endpoint, size: u64) -> Result<()> {
    if let Endpoint::Local(dir) = endpoint {
        open_or_create(dir, Some(size)).await?;
    }
    Ok(())
}
