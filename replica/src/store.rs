//! A replica on disk: its layer chain, its block index and its I/O.
//!
//! # Layout of a replica directory
//!
//! ```text
//! replica.json              ReplicaMeta: format, volume UUID, size, chain
//! replica.state             generation, revision counter, clean flag (2 slots)
//! volume-snap-<name>.img    read-only snapshot layers, sparse, volume-sized
//! volume-snap-<name>.img.meta
//! volume-head-NNN.img       the writable head, sparse, volume-sized
//! volume-head-NNN.img.meta
//! ```
//!
//! `replica.json` is written last when a replica is created, so a directory
//! holding it holds a complete replica.
//!
//! # Invariants
//!
//! - Only whole, aligned 4 KiB blocks are read or written; the engine does
//!   read-modify-write for anything smaller.
//! - Every write goes to the head. A block's visible contents are those of
//!   the newest layer holding it, zeros if none does; the [`BlockMap`] says
//!   which layer that is and is updated only after the data is in the file,
//!   so a reader never sees a hole where a lower layer has data.
//! - A write acknowledged before a flush started is durable when that flush
//!   returns: flush fdatasyncs the head (snapshot layers are synced when they
//!   are frozen), then persists the revision counter it read *before* the
//!   sync, so the persisted counter never counts a write that is not durable.
//! - The clean flag is cleared durably before the first modification after
//!   it was set, so "clean" on disk always means the data matches `revision`.
//! - One process at a time: an open replica holds an exclusive `flock` on
//!   its directory, so a second replica process, or an engine opening the
//!   directory in-process, is refused instead of writing beside it.
//! - A read never reports a checksum mismatch that a write caused. Writes
//!   into the head run beside reads (a FUA write on the blocking pool, a
//!   process with several runtime threads), so a read may copy a block
//!   half-written, or new data before its checksum is recorded. A read whose
//!   blocks fail their checksums therefore reads again holding
//!   `head_writes` exclusively, which every write into the head holds
//!   shared: what still fails then is in the data itself.
//! - Fencing: every request runs holding a read guard on the lease
//!   ([`Replica::admit`]); a takeover holds the write guard while it
//!   persists the new generation, so once it returns no request of an older
//!   engine is running and none will be admitted again. A newer session of
//!   the same engine (it connected again) shuts its older connections out
//!   the same way, so a request the engine gave up on cannot land late.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use uuid::Uuid;
use xxhash_rust::xxh3::Xxh3;

use crate::checksum;
use crate::crc;
use crate::dirty::DirtyMap;
use crate::error::{Error, Result};
use crate::ids::{BlockIndex, Generation, LayerPos, Revision, BLOCK_SIZE};
use crate::index::BlockMap;
use crate::meta::{self, LayerMeta, ReplicaMeta, FORMAT_VERSION, REPLICA_META};
use crate::state::{StateFile, StateRecord, STATE_FILE};

/// Large writes reach the layer file in pieces of at most this size. The
/// page cache sizes a folio by the write that creates it, and on ext4 with
/// large folios every later 4 KiB write into a folio walks all of that
/// folio's block buffers: after 1 MiB writes, 4 KiB random writes cost
/// about twice the CPU. 64 KiB folios keep that walk short and cost a large
/// write 15 more syscalls per MiB.
const WRITE_PIECE: usize = 64 << 10;

/// Who may send requests: the engine holding the newest generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Owner {
    pub generation: Generation,
    pub engine_id: u64,
}

/// The engine a replica serves, and its newest connection (see
/// [`Replica::takeover`]).
#[derive(Debug, Clone, Copy)]
pub struct Lease {
    owner: Owner,
    session: u32,
}

/// What a replica reports about itself (on connect and on request).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaInfo {
    pub volume_uuid: Uuid,
    pub replica_uuid: Uuid,
    pub size: u64,
    pub block_size: u64,
    pub generation: Generation,
    pub revision: Revision,
    pub clean: bool,
    pub rebuilding: bool,
    /// Newest barrier flush completed (persisted).
    pub flush_epoch: u64,
    /// Newest epoch seen in any request since the replica opened.
    pub epoch_seen: u64,
    /// Newest barrier flush received since the replica opened, completed
    /// or not (see [`crate::dirty`]).
    #[serde(default)]
    pub flush_received: u64,
    /// The replicas that flush named as in the set when its barrier passed.
    #[serde(default)]
    pub flush_members: Vec<Uuid>,
    /// Whether the replica knows which regions it modified since its last
    /// barrier flush (see [`crate::dirty`]).
    pub dirty_known: bool,
    pub chain: Vec<LayerInfo>,
    /// The volume's encryption, if it is encrypted (never the key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<meta::Encryption>,
}

impl ReplicaInfo {
    /// The layers below the head, as [`Replica::prepare_rebuild`] takes
    /// them from a rebuild's source.
    pub fn chain_below_head(&self) -> Vec<(String, LayerMeta)> {
        let below_head = &self.chain[..self.chain.len().saturating_sub(1)];
        below_head
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let meta = LayerMeta {
                    parent: i.checked_sub(1).map(|p| below_head[p].name.clone()),
                    created: l.created,
                    user_created: l.user_created,
                    removed: l.removed,
                    labels: l.labels.clone(),
                };
                (l.name.clone(), meta)
            })
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerInfo {
    pub name: String,
    pub created: u64,
    pub user_created: bool,
    pub removed: bool,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Bytes the layer's sparse file has allocated on disk.
    #[serde(default)]
    pub allocated_bytes: u64,
}

/// Snapshot names become file names: 1-128 of `[A-Za-z0-9._-]`.
pub fn check_snapshot_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 128
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(Error::Invalid(format!(
            "snapshot name {name:?}: use 1-128 of [A-Za-z0-9._-]"
        )));
    }
    Ok(())
}

#[derive(Clone)]
pub(crate) struct Layer {
    pub(crate) name: String,
    pub(crate) meta: LayerMeta,
    pub(crate) file: Arc<File>,
    /// Its checksum sidecar ([`crate::checksum`]).
    pub(crate) crc: Arc<File>,
    /// Bytes of nonce and tag per block in the sidecar (0: a plain volume).
    pub(crate) auth: usize,
}

impl Layer {
    /// A layer whose data file is open; opens (or creates) its sidecar.
    pub(crate) fn with_file(
        dir: &Path,
        name: String,
        meta: LayerMeta,
        file: File,
        size: u64,
        auth: usize,
    ) -> Result<Layer> {
        let crc = open_sidecar(dir, &name, size, auth)?;
        Ok(Layer {
            name,
            meta,
            file: Arc::new(file),
            crc: Arc::new(crc),
            auth,
        })
    }
}

/// Opens the checksum sidecar of layer `name`, creating it if missing (a
/// replica from before checksums) and lengthening it if short (an
/// expansion cut short).
pub(crate) fn open_sidecar(dir: &Path, name: &str, size: u64, auth: usize) -> Result<File> {
    let sidecar = checksum::sidecar_name(name);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join(&sidecar))
        .map_err(|e| Error::io(format!("opening {sidecar}"), e))?;
    let want = checksum::sidecar_len(size, auth);
    let len = f
        .metadata()
        .map_err(|e| Error::io(format!("stat {sidecar}"), e))?
        .len();
    if len < want {
        f.set_len(want)
            .map_err(|e| Error::io(format!("sizing {sidecar}"), e))?;
    }
    // Sidecar I/O is a few bytes per block. Readahead would fill the page
    // cache with large folios, and ext4 walks every buffer head of a folio
    // on each small write into it: in a 1-replica 4k random write after a
    // sequential fill, 6 % of the replica's CPU, 2.8 % without readahead.
    // SAFETY: an advisory call on a descriptor we own; its result only
    // tunes readahead, so a failure changes nothing we rely on.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
    Ok(f)
}

/// Removes a layer's data, metadata and sidecar files (best effort: what
/// is left is a stray the next open removes).
pub(crate) fn remove_layer_files(dir: &Path, name: &str) {
    let _ = fs::remove_file(dir.join(name));
    let _ = fs::remove_file(layer_meta_path(dir, name));
    let _ = fs::remove_file(dir.join(checksum::sidecar_name(name)));
}

/// An open replica; see the module documentation.
pub struct Replica {
    pub(crate) dir: PathBuf,
    /// This replica's identity (`replica.json`'s, which never changes).
    uuid: Uuid,
    /// Bytes; grows with [`Replica::expand`], never shrinks.
    pub(crate) size: AtomicU64,
    /// Bytes of nonce and tag per block: 0 for a plain volume, set once
    /// when an engine binds an encrypted one ([`crate::checksum`]).
    auth: AtomicUsize,
    pub(crate) meta: Mutex<ReplicaMeta>,
    pub(crate) layers: RwLock<Vec<Layer>>,
    /// Bumped whenever `layers` is taken for writing, under that lock: a
    /// value read under the read lock names one state of the chain, so a
    /// layer's position in it names one file ([`crate::direct`]).
    chain_version: AtomicU64,
    pub(crate) index: RwLock<BlockMap>,
    pub(crate) revision: AtomicU64,
    clean: AtomicBool,
    state: Mutex<StateFile>,
    lease: RwLock<Lease>,
    /// Serializes flushes and changes of the chain.
    pub(crate) flush_lock: Mutex<()>,
    dirty: Mutex<DirtyMap>,
    /// Held shared by every read from resolving its layers to finishing its
    /// `pread`s, and exclusively by anything that punches a layer below
    /// the head; see [`crate::maintenance`].
    pub(crate) lower_gate: RwLock<()>,
    /// Held shared by every write into the head, exclusively by a read
    /// checking again (see the module invariants). Taken before `layers`.
    pub(crate) head_writes: RwLock<()>,
    /// Serializes purge steps and holds where pruning got to.
    pub(crate) purge: Mutex<crate::maintenance::PurgeCursor>,
    /// The directory, locked for as long as this value lives.
    _dir_lock: File,
}

/// Takes the exclusive lock on a replica directory (see the invariants).
fn lock_dir(dir: &Path) -> Result<File> {
    let f = File::open(dir).map_err(|e| Error::io(format!("opening {}", dir.display()), e))?;
    // SAFETY: `f` is an open descriptor for the duration of the call.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::WouldBlock {
            return Err(Error::InUse(dir.display().to_string()));
        }
        return Err(Error::io(format!("locking {}", dir.display()), e));
    }
    Ok(f)
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub(crate) fn head_name(n: u32) -> String {
    format!("volume-head-{n:03}.img")
}

/// The head file that follows `head` (`volume-head-007.img` after 006).
pub(crate) fn next_head_name(head: &str) -> String {
    let next = head
        .strip_prefix("volume-head-")
        .and_then(|s| s.strip_suffix(".img"))
        .and_then(|n| n.parse::<u32>().ok())
        .map_or(0, |n| n + 1);
    head_name(next)
}

pub(crate) fn layer_meta_path(dir: &Path, layer: &str) -> PathBuf {
    dir.join(format!("{layer}.meta"))
}

/// Files this crate may leave behind in an interrupted create.
fn is_our_file(name: &str) -> bool {
    name.starts_with("volume-") || name == STATE_FILE || name.ends_with(".tmp")
}

impl Replica {
    /// Opens the replica in `dir`, creating one of `size` bytes if the
    /// directory holds none and `size` is given. An existing replica smaller
    /// than `size` is refused; a larger one was expanded and is opened.
    pub fn open_or_create(dir: &Path, size: Option<u64>) -> Result<Replica> {
        if dir.join(REPLICA_META).exists() {
            let r = Replica::open(dir)?;
            // A larger replica was expanded online after `size` was chosen.
            if let Some(size) = size {
                if size > r.size() {
                    return Err(Error::Mismatch(format!(
                        "{} already holds a replica of {} bytes, not {size} (if it missed an \
                         expansion, start it with its own size and the engine grows it)",
                        dir.display(),
                        r.size()
                    )));
                }
            }
            return Ok(r);
        }
        match size {
            Some(size) => Replica::create(dir, size),
            None => Err(Error::NotAReplica(format!(
                "{} holds no {REPLICA_META} (pass --size to create a replica)",
                dir.display()
            ))),
        }
    }

    /// Creates a new, empty replica of `size` bytes in `dir`.
    pub fn create(dir: &Path, size: u64) -> Result<Replica> {
        if size == 0 || !size.is_multiple_of(BLOCK_SIZE) {
            return Err(Error::Invalid(format!(
                "volume size {size} is not a positive multiple of {BLOCK_SIZE}"
            )));
        }
        if dir.exists() && !dir.is_dir() {
            return Err(Error::NotAReplica(format!(
                "{} is not a directory",
                dir.display()
            )));
        }
        fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let dir_lock = lock_dir(dir)?;
        let entries =
            fs::read_dir(dir).map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
        let mut leftovers = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == REPLICA_META {
                return Err(Error::Mismatch(format!(
                    "{} already holds a replica",
                    dir.display()
                )));
            }
            if !is_our_file(&name) && name != "lost+found" {
                return Err(Error::NotAReplica(format!(
                    "{} is not empty and holds no replica ({name} is not ours); refusing to create one there",
                    dir.display()
                )));
            }
            if name != "lost+found" {
                leftovers.push(entry.path());
            }
        }
        // Remains of a create that crashed before replica.json was written.
        for p in leftovers {
            fs::remove_file(&p).map_err(|e| Error::io(format!("removing {}", p.display()), e))?;
        }
        let head = head_name(0);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.join(&head))
            .map_err(|e| Error::io(format!("creating {head}"), e))?;
        f.set_len(size)
            .map_err(|e| Error::io(format!("sizing {head}"), e))?;
        f.sync_all()
            .map_err(|e| Error::io(format!("syncing {head}"), e))?;
        let lmeta = LayerMeta {
            parent: None,
            created: now_secs(),
            user_created: false,
            removed: false,
            labels: Default::default(),
        };
        meta::write_json_atomic(&layer_meta_path(dir, &head), &lmeta)?;
        StateFile::create(
            dir,
            StateRecord {
                clean: true,
                ..Default::default()
            },
        )?;
        let rmeta = ReplicaMeta {
            format_version: FORMAT_VERSION,
            volume_uuid: Uuid::nil(),
            replica_uuid: Uuid::new_v4(),
            size,
            block_size: BLOCK_SIZE,
            chain: vec![head],
            rebuilding: false,
            encryption: None,
        };
        meta::write_json_atomic(&dir.join(REPLICA_META), &rmeta)?;
        tracing::info!(dir = %dir.display(), size, "created replica");
        Replica::open_locked(dir, dir_lock)
    }

    /// Opens an existing replica, validating everything it is made of.
    pub fn open(dir: &Path) -> Result<Replica> {
        if !dir.is_dir() {
            return Err(Error::NotAReplica(format!(
                "{} is not a directory",
                dir.display()
            )));
        }
        Replica::open_locked(dir, lock_dir(dir)?)
    }

    fn open_locked(dir: &Path, dir_lock: File) -> Result<Replica> {
        let meta_path = dir.join(REPLICA_META);
        if !meta_path.exists() {
            return Err(Error::NotAReplica(format!(
                "{} holds no {REPLICA_META}",
                dir.display()
            )));
        }
        let rmeta: ReplicaMeta = meta::read_json(&meta_path)?;
        if rmeta.format_version != FORMAT_VERSION {
            return Err(Error::Mismatch(format!(
                "{}: format version {} is not supported (this build reads {FORMAT_VERSION})",
                meta_path.display(),
                rmeta.format_version
            )));
        }
        if rmeta.block_size != BLOCK_SIZE
            || rmeta.size == 0
            || !rmeta.size.is_multiple_of(BLOCK_SIZE)
        {
            return Err(Error::Corrupt(format!(
                "{}: size {} / block size {} are not valid",
                meta_path.display(),
                rmeta.size,
                rmeta.block_size
            )));
        }
        if rmeta.chain.is_empty() {
            return Err(Error::Corrupt(format!(
                "{}: empty layer chain",
                meta_path.display()
            )));
        }
        let auth = meta::auth_bytes(rmeta.encryption.as_ref())?;
        let mut layers = Vec::with_capacity(rmeta.chain.len());
        for name in rmeta.chain.iter() {
            if name.is_empty() || name.contains('/') || name.starts_with('.') {
                return Err(Error::Corrupt(format!(
                    "layer name {name:?} is not a plain file name"
                )));
            }
            let path = dir.join(name);
            // Snapshot layers are writable too: purge folds and punches them
            // (see `maintenance`). Only the head takes client writes.
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| match e.kind() {
                    std::io::ErrorKind::NotFound => {
                        Error::Corrupt(format!("layer file {} is missing", path.display()))
                    }
                    _ => Error::io(format!("opening layer {}", path.display()), e),
                })?;
            let len = file
                .metadata()
                .map_err(|e| Error::io(format!("stat {}", path.display()), e))?
                .len();
            // Longer is an expansion cut short before replica.json was
            // rewritten: the tail is a hole, and nothing reads past `size`.
            if len < rmeta.size {
                return Err(Error::Corrupt(format!(
                    "layer {} is {len} bytes, the volume {}",
                    path.display(),
                    rmeta.size
                )));
            }
            let lmeta: LayerMeta = meta::read_json(&layer_meta_path(dir, name))?;
            layers.push(Layer::with_file(
                dir,
                name.clone(),
                lmeta,
                file,
                rmeta.size,
                auth,
            )?);
        }
        remove_strays(dir, &rmeta.chain);
        let state = StateFile::open(dir)?;
        let rec = state.current();
        let index = build_index(rmeta.size, &layers)?;
        Ok(Replica {
            dir: dir.to_path_buf(),
            uuid: rmeta.replica_uuid,
            size: AtomicU64::new(rmeta.size),
            auth: AtomicUsize::new(auth),
            meta: Mutex::new(rmeta),
            layers: RwLock::new(layers),
            chain_version: AtomicU64::new(0),
            index: RwLock::new(index),
            revision: AtomicU64::new(rec.revision.0),
            clean: AtomicBool::new(rec.clean),
            state: Mutex::new(state),
            lease: RwLock::new(Lease {
                owner: Owner {
                    generation: rec.generation,
                    engine_id: rec.engine_id,
                },
                session: 0,
            }),
            flush_lock: Mutex::new(()),
            dirty: Mutex::new(DirtyMap::new(rec.clean)),
            lower_gate: RwLock::new(()),
            head_writes: RwLock::new(()),
            purge: Mutex::new(Default::default()),
            _dir_lock: dir_lock,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Bytes of nonce and tag each block carries (0: a plain volume).
    pub fn auth_bytes(&self) -> usize {
        self.auth.load(Ordering::Acquire)
    }

    /// The volume this replica is bound to (nil until an engine binds it).
    pub fn volume_uuid(&self) -> Uuid {
        lock(&self.meta).volume_uuid
    }

    pub fn info(&self) -> ReplicaInfo {
        let meta = lock(&self.meta).clone();
        let layers = self.layers.read().unwrap_or_else(|e| e.into_inner());
        let flush_epoch = lock(&self.state).current().flush_epoch;
        let (dirty_known, epoch_seen, flush_received, flush_members) = {
            let d = lock(&self.dirty);
            // Names from before a restart are gone; newer ones always count.
            let members = if d.flush_received() >= flush_epoch {
                d.flush_members().to_vec()
            } else {
                Vec::new()
            };
            (d.known(), d.epoch_seen(), d.flush_received(), members)
        };
        ReplicaInfo {
            replica_uuid: meta.replica_uuid,
            flush_epoch,
            epoch_seen: epoch_seen.max(flush_epoch),
            flush_received: flush_received.max(flush_epoch),
            flush_members,
            dirty_known,
            volume_uuid: meta.volume_uuid,
            size: self.size(),
            block_size: BLOCK_SIZE,
            generation: self.owner().generation,
            revision: Revision(self.revision.load(Ordering::Acquire)),
            clean: self.clean.load(Ordering::Acquire),
            rebuilding: meta.rebuilding,
            encryption: meta.encryption.clone(),
            chain: layers
                .iter()
                .map(|l| LayerInfo {
                    name: l.name.clone(),
                    created: l.meta.created,
                    user_created: l.meta.user_created,
                    removed: l.meta.removed,
                    labels: l.meta.labels.clone(),
                    allocated_bytes: l
                        .file
                        .metadata()
                        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
                        .unwrap_or(0),
                })
                .collect(),
        }
    }

    /// Bytes of memory the block index uses.
    pub fn index_memory_bytes(&self) -> usize {
        self.index
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .memory_bytes()
    }

    pub fn owner(&self) -> Owner {
        self.lease.read().unwrap_or_else(|e| e.into_inner()).owner
    }

    /// Takes the replica over for `owner`, binding it to `volume` (and
    /// `encryption`) if it is not bound yet. Refused for an older
    /// generation, for the same generation held by another engine, for
    /// another volume, and for an engine whose encryption is not the
    /// volume's: another key, a key for a plain volume, or none for an
    /// encrypted one.
    ///
    /// `session` is the connection's [`crate::proto::Hello::session`]: a
    /// HELLO of the owner with an older session than one already answered
    /// is refused, and a newer one shuts the older connections out.
    /// Session 0 (a tool speaking the protocol by hand) does neither.
    pub fn takeover(
        &self,
        owner: Owner,
        session: u32,
        volume: Uuid,
        encryption: Option<&meta::Encryption>,
    ) -> Result<ReplicaInfo> {
        let mut guard = self.lease.write().unwrap_or_else(|e| e.into_inner());
        if session != 0 && guard.owner == owner && session < guard.session {
            return Err(Error::Superseded(format!(
                "this engine connected again since (session {} after {session})",
                guard.session
            )));
        }
        let lease = &mut guard.owner;
        if owner.generation < lease.generation {
            return Err(Error::Fenced(format!(
                "generation {} is older than this replica's generation {}",
                owner.generation, lease.generation
            )));
        }
        if owner.generation == lease.generation
            && lease.engine_id != 0
            && owner.engine_id != lease.engine_id
        {
            return Err(Error::Fenced(format!(
                "generation {} is held by another engine",
                owner.generation
            )));
        }
        // Sidecars first (they take the chain's lock, which is taken before
        // `meta` everywhere); the lease's write guard keeps every other
        // request and takeover out meanwhile.
        if encryption.is_some() && lock(&self.meta).volume_uuid.is_nil() {
            self.make_room_for_auth(meta::auth_bytes(encryption)?)?;
        }
        {
            let mut meta = lock(&self.meta);
            if meta.volume_uuid.is_nil() {
                let mut bound = meta.clone();
                bound.volume_uuid = volume;
                bound.encryption = encryption.cloned();
                meta::write_json_atomic(&self.dir.join(REPLICA_META), &bound)?;
                *meta = bound;
                tracing::info!(%volume, encrypted = encryption.is_some(), "replica bound to volume");
            } else if meta.volume_uuid != volume {
                return Err(Error::Mismatch(format!(
                    "this replica belongs to volume {}, not {volume}",
                    meta.volume_uuid
                )));
            } else if meta.encryption.as_ref() != encryption {
                return Err(Error::Mismatch(match (&meta.encryption, encryption) {
                    (Some(_), None) => "the volume is encrypted: the engine needs its key".into(),
                    (None, _) => "the volume is not encrypted, and the engine has a key".into(),
                    (Some(ours), Some(theirs)) if ours.cipher != theirs.cipher => format!(
                        "the volume is encrypted with {}, not {}",
                        ours.cipher, theirs.cipher
                    ),
                    _ => "the engine's key is not the volume's (its key check differs)".into(),
                }));
            }
        }
        let new_owner = *lease != owner;
        if new_owner {
            let mut state = lock(&self.state);
            let rec = StateRecord {
                generation: owner.generation,
                engine_id: owner.engine_id,
                ..state.current()
            };
            state.store(rec)?;
            tracing::info!(generation = %owner.generation, "replica taken over");
            *lease = owner;
        }
        if new_owner || session != 0 {
            guard.session = session;
        }
        drop(guard);
        Ok(self.info())
    }

    /// Gives every layer's sidecar room for `auth` bytes of nonce and tag
    /// per block, before an encrypted volume is bound. The replica is new
    /// (unbound: no engine has written it), so every entry is zeros and
    /// reads the same at either width; a crash before the binding is
    /// persisted leaves sidecars longer than needed, which nothing reads.
    fn make_room_for_auth(&self, auth: usize) -> Result<()> {
        let mut layers = self.layers_mut();
        for l in layers.iter() {
            let len = checksum::sidecar_len(self.size(), auth);
            l.crc
                .set_len(len)
                .and_then(|()| l.crc.sync_all())
                .map_err(|e| Error::io(format!("sizing the sidecar of {}", l.name), e))?;
        }
        for l in layers.iter_mut() {
            l.auth = auth;
        }
        self.auth.store(auth, Ordering::Release);
        Ok(())
    }

    /// Admits one request of `owner` that came on a connection of
    /// `session`: the guard keeps a takeover out until the request is done.
    /// Refused once a newer engine has taken over, or the same engine has
    /// connected again since.
    pub fn admit(&self, owner: Owner, session: u32) -> Result<RwLockReadGuard<'_, Lease>> {
        let lease = self.lease.read().unwrap_or_else(|e| e.into_inner());
        if lease.owner != owner {
            return Err(Error::Fenced(format!(
                "replica now belongs to generation {}",
                lease.owner.generation
            )));
        }
        if session != 0 && session < lease.session {
            return Err(Error::Superseded(format!(
                "this engine connected again since (session {} after {session})",
                lease.session
            )));
        }
        Ok(lease)
    }

    pub(crate) fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        if !offset.is_multiple_of(BLOCK_SIZE) || !len.is_multiple_of(BLOCK_SIZE) {
            return Err(Error::Invalid(format!(
                "offset {offset} / length {len} are not multiples of {BLOCK_SIZE}"
            )));
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(Error::Invalid(format!(
                "range {offset}+{len} is past the end of the volume ({} bytes)",
                self.size()
            ))),
        }
    }

    /// Where the blocks of `offset..offset + len` live (see [`Located`]).
    fn locate(&self, offset: u64, len: u64) -> Result<Located<'_>> {
        // Lock order everywhere: layers, then the lower gate, then the index.
        let layers = self.layers();
        let gate = self.lower_gate.read().unwrap_or_else(|e| e.into_inner());
        let mut runs = Vec::new();
        let index = self.index.read().unwrap_or_else(|e| e.into_inner());
        let first = BlockIndex(offset / BLOCK_SIZE);
        for (start, count, entry) in index.runs(first, len / BLOCK_SIZE) {
            if let Some(LayerPos(pos)) = entry {
                if pos as usize >= layers.len() {
                    return Err(Error::Corrupt(format!(
                        "index names layer {pos}, chain is shorter"
                    )));
                }
                runs.push((pos as usize, start.byte_offset(), count * BLOCK_SIZE));
            }
        }
        drop(index);
        Ok(Located {
            layers,
            _gate: gate,
            runs,
        })
    }

    /// Reads `len` bytes at `offset`. The buffer is not zeroed first: holes
    /// are zeroed, data is read straight into it (for 1 MiB reads, zeroing
    /// it all cost as much CPU as the checksums). With `crcs` (one per
    /// block, preset to the crc of a zero block), every block read from a
    /// layer is checked against its checksums and its crc is stored there.
    ///
    /// A mismatch may be a write's doing, so it reads once more with no
    /// write running (see the module invariants) before it reports one.
    ///
    /// `auths` (`auth_bytes` per block, empty for a plain volume) gets each
    /// block's nonce and tag, zeros for a hole.
    fn read_range(
        &self,
        offset: u64,
        len: u64,
        mut crcs: Option<&mut [u32]>,
        auths: &mut [u8],
    ) -> Result<Vec<u8>> {
        match self.read_range_once(offset, len, crcs.as_deref_mut(), auths) {
            Err(Error::Checksum(_)) => {
                let _no_writes = self.head_writes.write().unwrap_or_else(|e| e.into_inner());
                if let Some(crcs) = crcs.as_deref_mut() {
                    crcs.fill(crc::zero_block());
                }
                self.read_range_once(offset, len, crcs, auths)
            }
            read => read,
        }
    }

    fn read_range_once(
        &self,
        offset: u64,
        len: u64,
        mut crcs: Option<&mut [u32]>,
        auths: &mut [u8],
    ) -> Result<Vec<u8>> {
        let located = self.locate(offset, len)?;
        auths.fill(0);
        let mut buf = Vec::with_capacity(len as usize);
        let mut scratch = Vec::new();
        for &(pos, at, n) in &located.runs {
            let layer = &located.layers[pos];
            let from = (at - offset) as usize;
            buf.resize(from, 0);
            read_appending(&layer.file, at, n as usize, &mut buf)
                .map_err(|e| Error::io(format!("reading {n} bytes at {at}"), e))?;
            let (first, blocks) = (from / BLOCK_SIZE as usize, (n / BLOCK_SIZE) as usize);
            let auths = match auths.len() {
                0 => &mut [][..],
                _ => &mut auths[first * layer.auth..(first + blocks) * layer.auth],
            };
            match crcs.as_deref_mut() {
                Some(crcs) => check_blocks(
                    layer,
                    at,
                    &buf[from..],
                    &mut crcs[first..first + blocks],
                    auths,
                )?,
                // Unverified, but an encrypted block still needs its nonce
                // and tag: the engine's check of those is then the only one.
                None if !auths.is_empty() => {
                    scratch.resize(blocks, 0);
                    checksum::verify(
                        &layer.crc,
                        layer.auth,
                        at / BLOCK_SIZE,
                        &buf[from..],
                        &mut scratch,
                        auths,
                    )
                    .map_err(|e| Error::io(format!("reading checksums of {}", layer.name), e))?;
                }
                None => {}
            }
        }
        buf.resize(len as usize, 0);
        Ok(buf)
    }

    /// Reads without checksum verification: the engine's last resort when
    /// no replica's copy matches its checksums. An encrypted volume's
    /// blocks are followed by their nonces and tags, as from
    /// [`Self::read_with_crc`].
    pub fn read_unverified(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        self.check_range(offset, len)?;
        let mut auths = vec![0u8; (len / BLOCK_SIZE) as usize * self.auth_bytes()];
        let mut buf = self.read_range(offset, len, None, &mut auths)?;
        buf.extend_from_slice(&auths);
        Ok(buf)
    }

    /// Reads `len` bytes at `offset` (followed by their nonces and tags if
    /// the volume is encrypted).
    pub fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        self.read_with_crc(offset, len).map(|(data, _)| data)
    }

    /// Reads `len` bytes at `offset`, with their crc32c: derived from the
    /// block crcs that checking the blocks computes anyway, so a reply is
    /// sealed without another pass over the data (see [`crate::crc`]).
    ///
    /// For an encrypted volume the blocks are followed by their nonces and
    /// tags, `auth_bytes` each, and the crc covers both.
    pub fn read_with_crc(&self, offset: u64, len: u64) -> Result<(Vec<u8>, u32)> {
        self.check_range(offset, len)?;
        let blocks = (len / BLOCK_SIZE) as usize;
        let mut crcs = vec![crc::zero_block(); blocks];
        let mut auths = vec![0u8; blocks * self.auth_bytes()];
        let mut buf = self.read_range(offset, len, Some(&mut crcs), &mut auths)?;
        let mut crc = crc::of_blocks(&crcs);
        if !auths.is_empty() {
            crc = crc::concat(crc, crc::of(&auths), auths.len() as u64);
            buf.extend_from_slice(&auths);
        }
        Ok((buf, crc))
    }

    /// Where the data of `offset..offset + len` is, for sending it from the
    /// files without reading it here, with the crc32c it should have: from
    /// the newer slot of each block's checksum entry (see
    /// [`crate::checksum`]). `None` when a block has no recorded checksum.
    ///
    /// Nothing here looks at the data, so the crc is only a claim: the
    /// receiver checks it, and on a mismatch (bit rot, a write that landed
    /// between this call and the send, a block whose write was cut short
    /// by a crash) reads again with [`Replica::read_with_crc`].
    ///
    /// Always `None` for an encrypted volume: its replies carry each
    /// block's nonce and tag, which only a read here looks up.
    pub fn read_stored(&self, offset: u64, len: u64) -> Result<Option<Stored>> {
        self.check_range(offset, len)?;
        if self.auth_bytes() > 0 {
            return Ok(None);
        }
        let located = self.locate(offset, len)?;
        let chain_version = self.chain_version.load(Ordering::Acquire);
        let mut crcs = vec![crc::zero_block(); (len / BLOCK_SIZE) as usize];
        let mut segments = Vec::with_capacity(2 * located.runs.len() + 1);
        let mut done = offset;
        for &(pos, at, n) in &located.runs {
            let layer = &located.layers[pos];
            if at > done {
                segments.push(Segment::Zeros((at - done) as usize));
            }
            let first = ((at - offset) / BLOCK_SIZE) as usize;
            let stored = checksum::newer(
                &layer.crc,
                layer.auth,
                at / BLOCK_SIZE,
                &mut crcs[first..][..(n / BLOCK_SIZE) as usize],
            )
            .map_err(|e| Error::io(format!("reading checksums of {}", layer.name), e))?;
            if !stored {
                return Ok(None);
            }
            segments.push(Segment::File {
                file: layer.file.clone(),
                layer: LayerPos(pos as u32),
                at,
                len: n as usize,
            });
            done = at + n;
        }
        if offset + len > done {
            segments.push(Segment::Zeros((offset + len - done) as usize));
        }
        Ok(Some(Stored {
            segments,
            crc: crc::of_blocks(&crcs),
            chain_version,
        }))
    }

    /// The files of the chain as they are now, for a reader on this node
    /// to open ([`crate::direct`]).
    pub fn layer_files(&self) -> Result<crate::direct::LayerFiles> {
        if self.auth_bytes() > 0 {
            return Err(Error::Invalid(
                "an encrypted volume is not read from its files: each block's nonce and tag \
                 come with a read"
                    .into(),
            ));
        }
        let layers = self.layers();
        let chain_version = self.chain_version.load(Ordering::Acquire);
        let dir = std::path::absolute(&self.dir)
            .map_err(|e| Error::io(format!("resolving {}", self.dir.display()), e))?;
        use std::os::unix::fs::MetadataExt;
        let stat = |f: &File, name: &str| {
            f.metadata()
                .map_err(|e| Error::io(format!("stat {name}"), e))
        };
        let files = layers
            .iter()
            .map(|l| {
                let m = stat(&l.file, &l.name)?;
                Ok(crate::direct::LayerFile {
                    name: l.name.clone(),
                    dev: m.dev(),
                    ino: m.ino(),
                    sidecar_ino: Some(stat(&l.crc, &l.name)?.ino()),
                })
            })
            .collect::<Result<_>>()?;
        let state = fs::metadata(self.dir.join(STATE_FILE))
            .map_err(|e| Error::io(format!("stat {STATE_FILE}"), e))?;
        Ok(crate::direct::LayerFiles {
            chain_version,
            boot_id: crate::direct::boot_id().to_string(),
            dir,
            files,
            state_ino: Some(state.ino()),
        })
    }

    pub(crate) fn layers(&self) -> std::sync::RwLockReadGuard<'_, Vec<Layer>> {
        self.layers.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The chain, for changing it: see `chain_version`.
    pub(crate) fn layers_mut(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Layer>> {
        let layers = self.layers.write().unwrap_or_else(|e| e.into_inner());
        self.chain_version.fetch_add(1, Ordering::AcqRel);
        layers
    }

    /// The chain, held for the duration of a modification: a snapshot
    /// (which takes it exclusively) never splits a write between layers.
    fn head_of(layers: &[Layer]) -> (&Layer, LayerPos) {
        let pos = layers.len() - 1;
        (&layers[pos], LayerPos(pos as u32))
    }

    /// Writes whole blocks into the head: checksums (and nonces and tags)
    /// first, then the data (see [`crate::checksum`] for why that order is
    /// safe).
    fn write_head(
        head: &Layer,
        offset: u64,
        data: &[u8],
        crcs: &[u32],
        auths: &[u8],
    ) -> Result<()> {
        checksum::record_pending(&head.crc, head.auth, offset / BLOCK_SIZE, crcs, auths)
            .map_err(|e| Error::io("recording checksums", e))?;
        for (i, piece) in data.chunks(WRITE_PIECE).enumerate() {
            let at = offset + (i * WRITE_PIECE) as u64;
            head.file
                .write_all_at(piece, at)
                .map_err(|e| Error::io(format!("writing {} bytes at {at}", piece.len()), e))?;
        }
        Ok(())
    }

    /// Whether nothing below the head is visible: every layer there is
    /// removed (or there is none), so a hole in the head reads as zeros and
    /// the layers behind it can be punched too.
    fn only_removed_below_head(layers: &[Layer]) -> bool {
        layers[..layers.len() - 1].iter().all(|l| l.meta.removed)
    }

    /// Persists `clean = false` before the first modification after a clean
    /// point; see the module invariants.
    pub(crate) fn mark_dirty(&self) -> Result<()> {
        if !self.clean.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut state = lock(&self.state);
        if self.clean.load(Ordering::Acquire) {
            let rec = StateRecord {
                clean: false,
                ..state.current()
            };
            state.store(rec)?;
            self.clean.store(false, Ordering::Release);
        }
        Ok(())
    }

    /// Marks the replica unclean (durably, once) and records the range in
    /// the dirty map, before a modification touches the disk.
    fn before_modify(&self, offset: u64, len: u64, epoch: u64) -> Result<()> {
        self.mark_dirty()?;
        lock(&self.dirty).mark(offset, len, epoch);
        Ok(())
    }

    /// Writes whole blocks at `offset`, in flush epoch `epoch` (followed
    /// by their nonces and tags if the volume is encrypted).
    pub fn write(&self, offset: u64, payload: &[u8], epoch: u64) -> Result<()> {
        let data = &payload[..self.data_len(payload.len())?];
        let mut crcs = Vec::new();
        crc::blocks(data, &mut crcs);
        self.write_with_crcs(offset, payload, &crcs, epoch)
    }

    /// How much of a payload of whole blocks, each followed by its nonce
    /// and tag in an encrypted volume, is the blocks.
    pub fn data_len(&self, payload_len: usize) -> Result<usize> {
        let per_block = BLOCK_SIZE as usize + self.auth_bytes();
        if !payload_len.is_multiple_of(per_block) {
            return Err(Error::Invalid(format!(
                "a payload of {payload_len} bytes is not whole blocks of {per_block} bytes \
                 (4 KiB of data and {} of nonce and tag)",
                self.auth_bytes()
            )));
        }
        Ok(payload_len / per_block * BLOCK_SIZE as usize)
    }

    /// [`Self::write`] of data whose block crcs are already known
    /// (`crcs[i]` is the crc32c of block `i` of the payload's data; see
    /// [`crate::crc`]).
    pub fn write_with_crcs(
        &self,
        offset: u64,
        payload: &[u8],
        crcs: &[u32],
        epoch: u64,
    ) -> Result<()> {
        let (data, auths) = payload.split_at(self.data_len(payload.len())?);
        self.check_range(offset, data.len() as u64)?;
        if crcs.len() as u64 * BLOCK_SIZE != data.len() as u64 {
            return Err(Error::Invalid(format!(
                "{} block checksums for {} bytes",
                crcs.len(),
                data.len()
            )));
        }
        self.before_modify(offset, data.len() as u64, epoch)?;
        let _writing = self.head_writes.read().unwrap_or_else(|e| e.into_inner());
        let layers = self.layers();
        let (head, pos) = Self::head_of(&layers);
        Self::write_head(head, offset, data, crcs, auths)?;
        self.index.write().unwrap_or_else(|e| e.into_inner()).set(
            BlockIndex(offset / BLOCK_SIZE),
            data.len() as u64 / BLOCK_SIZE,
            Some(pos),
        );
        self.revision.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Discards blocks. Where only removed layers lie below the head, it
    /// punches the head and all of them, and the blocks read as zeros.
    /// Where a kept snapshot lies below, it is a no-op: trim is a hint,
    /// punching the head would only re-expose the snapshot's data, and the
    /// snapshot holds the space anyway until it is removed.
    pub fn trim(&self, offset: u64, len: u64, epoch: u64) -> Result<()> {
        self.check_range(offset, len)?;
        self.before_modify(offset, len, epoch)?;
        let layers = self.layers();
        if Self::only_removed_below_head(&layers) {
            self.punch_through(&layers, offset, len)?;
        }
        self.revision.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Makes blocks read as zeros: holes through the chain where only
    /// removed layers lie below the head, written zero blocks otherwise.
    pub fn write_zeroes(&self, offset: u64, len: u64, epoch: u64) -> Result<()> {
        self.check_range(offset, len)?;
        self.before_modify(offset, len, epoch)?;
        let _writing = self.head_writes.read().unwrap_or_else(|e| e.into_inner());
        let layers = self.layers();
        if Self::only_removed_below_head(&layers) {
            self.punch_through(&layers, offset, len)?;
        } else {
            let (head, pos) = Self::head_of(&layers);
            const STEP: u64 = 1 << 20;
            let zeros = vec![0u8; STEP.min(len) as usize];
            let zero_crcs = vec![
                crate::crc::of(&zeros[..BLOCK_SIZE as usize]);
                zeros.len() / BLOCK_SIZE as usize
            ];
            // No nonce and tag: an encrypted volume's engine reads zeros
            // with none as zeros, as it reads a hole.
            let no_auths = vec![0u8; zero_crcs.len() * head.auth];
            let mut at = offset;
            while at < offset + len {
                let n = STEP.min(offset + len - at);
                let blocks = (n / BLOCK_SIZE) as usize;
                Self::write_head(
                    head,
                    at,
                    &zeros[..n as usize],
                    &zero_crcs[..blocks],
                    &no_auths[..blocks * head.auth],
                )?;
                at += n;
            }
            self.index.write().unwrap_or_else(|e| e.into_inner()).set(
                BlockIndex(offset / BLOCK_SIZE),
                len / BLOCK_SIZE,
                Some(pos),
            );
        }
        self.revision.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Punches `[offset, offset + len)` in every layer (all of them are the
    /// head or removed) and marks it a hole in the index.
    fn punch_through(&self, layers: &[Layer], offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let _gate = self.lower_gate.write().unwrap_or_else(|e| e.into_inner());
        for layer in layers.iter().rev() {
            punch_file(&layer.file, offset, len)?;
        }
        self.index.write().unwrap_or_else(|e| e.into_inner()).set(
            BlockIndex(offset / BLOCK_SIZE),
            len / BLOCK_SIZE,
            None,
        );
        Ok(())
    }

    /// Makes every write acknowledged before this call durable and persists
    /// the revision counter with it; returns the persisted counter.
    pub fn flush(&self) -> Result<Revision> {
        self.flush_barrier(0, &[])
    }

    /// [`Replica::flush`] for barrier flush `epoch` that names the replicas
    /// in the set when its barrier passed (see [`crate::dirty`]). It counts
    /// as barrier `epoch` only if it names this replica: the engine also
    /// flushes replicas it is still bringing in (WO), which may lack writes
    /// tagged `<= epoch`, and such a replica must never report that it
    /// completed the barrier. For them it is a plain flush.
    pub fn flush_barrier(&self, epoch: u64, members: &[Uuid]) -> Result<Revision> {
        let named = members.contains(&self.uuid);
        let epoch = if named { epoch } else { 0 };
        if epoch > 0 {
            lock(&self.dirty).flush_arrived(epoch, members);
        }
        let _serial = lock(&self.flush_lock);
        let revision = Revision(self.revision.load(Ordering::Acquire));
        let layers = self.layers();
        let (head, _) = Self::head_of(&layers);
        let synced = head
            .file
            .sync_data()
            .map_err(|e| Error::io("syncing the head layer", e))
            .and_then(|()| {
                head.crc
                    .sync_data()
                    .map_err(|e| Error::io("syncing the head's checksums", e))
            });
        if let Err(e) = synced {
            lock(&self.dirty).lose();
            return Err(e);
        }
        let mut state = lock(&self.state);
        let cur = state.current();
        let rec = StateRecord {
            revision,
            flush_epoch: cur.flush_epoch.max(epoch),
            ..cur
        };
        if rec != cur {
            state.store(rec)?;
        }
        drop(state);
        if epoch > 0 {
            lock(&self.dirty).flushed(epoch);
        }
        Ok(revision)
    }

    /// The engine's last word before a clean shutdown: flushes, forgets the
    /// dirty map (the engine's final barrier flush made replicas identical)
    /// and records the clean state.
    pub fn mark_clean(&self) -> Result<Revision> {
        let revision = self.flush()?;
        let mut state = lock(&self.state);
        // A write that slipped in after the flush keeps the replica dirty.
        if self.revision.load(Ordering::Acquire) == revision.0 {
            let cur = state.current();
            if !cur.clean {
                state.store(StateRecord { clean: true, ..cur })?;
            }
            self.clean.store(true, Ordering::Release);
            lock(&self.dirty).clear();
        }
        Ok(revision)
    }

    /// Regions modified since the last barrier flush, as `(bytes, dirty)`
    /// runs over the volume; `None` if the replica does not know them.
    pub fn dirty_runs(&self) -> Option<Vec<(u64, bool)>> {
        let d = lock(&self.dirty);
        d.known().then(|| d.runs(self.size()))
    }

    /// Allocation of `[offset, offset + len)`: runs of `(bytes, allocated)`
    /// through the whole chain, in order.
    pub fn allocation(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>> {
        self.check_range(offset, len)?;
        let index = self.index.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<(u64, bool)> = Vec::new();
        for (_, count, entry) in index.runs(BlockIndex(offset / BLOCK_SIZE), len / BLOCK_SIZE) {
            let data = entry.is_some();
            match out.last_mut() {
                Some((n, d)) if *d == data => *n += count * BLOCK_SIZE,
                _ => out.push((count * BLOCK_SIZE, data)),
            }
        }
        Ok(out)
    }
}

/// Snapshots and rebuild.
///
/// A snapshot freezes the head as a read-only layer and starts an empty
/// head above it. Crash safety: the frozen head gets its snapshot name as a
/// hard link first, the new head file is created, and only then does the
/// atomic rewrite of `replica.json` switch the chain; a crash before that
/// leaves the old chain intact plus stray files, which the next open
/// removes. The index needs no change: the old head keeps its position.
///
/// A rebuild makes a target replica's layers below its head equal to a
/// source's, chunk by chunk: [`Replica::prepare_rebuild`] sets up the
/// source's chain (keeping same-named layers, whose chunks will mostly
/// match), the engine compares [`Replica::layer_checksums`] and copies what
/// differs with [`Replica::write_layer`], and [`Replica::finish_rebuild`]
/// syncs, rebuilds the index and clears the rebuilding flag. The head is
/// never touched by the copy, so writes arriving meanwhile are never
/// overwritten by it.
impl Replica {
    pub fn snapshot(
        &self,
        name: &str,
        user_created: bool,
        labels: BTreeMap<String, String>,
    ) -> Result<String> {
        check_snapshot_name(name)?;
        let _serial = lock(&self.flush_lock);
        let mut layers = self.layers_mut();
        let mut meta = lock(&self.meta);
        let snap = crate::maintenance::snapshot_file(name);
        if meta.chain.contains(&snap) {
            return Err(Error::Mismatch(format!("snapshot {name} exists")));
        }
        let head = layers.last().expect("chain is never empty");
        head.file
            .sync_all()
            .map_err(|e| Error::io("syncing the head", e))?;
        let old_head = head.name.clone();
        let new_head = next_head_name(&old_head);
        let dir = &self.dir;
        head.crc
            .sync_all()
            .map_err(|e| Error::io("syncing the head's checksums", e))?;
        let snap_meta = LayerMeta {
            user_created,
            created: now_secs(),
            labels,
            ..head.meta.clone()
        };
        let head_meta = LayerMeta {
            parent: Some(snap.clone()),
            created: now_secs(),
            user_created: false,
            removed: false,
            labels: Default::default(),
        };
        let mut next_meta = meta.clone();
        next_meta.chain.pop();
        next_meta.chain.push(snap.clone());
        next_meta.chain.push(new_head.clone());
        // Until the chain names them, the new names are strays: a failure
        // (a full disk) removes them, or the snapshot's name would stay a
        // second link to the head's files (harmless now, see
        // `create_layer_file`, but a waste). Not once the chain is being
        // written: it may have reached the disk before the error.
        let prepared = (|| {
            fs::hard_link(dir.join(&old_head), dir.join(&snap))
                .map_err(|e| Error::io(format!("linking {snap}"), e))?;
            fs::hard_link(
                dir.join(checksum::sidecar_name(&old_head)),
                dir.join(checksum::sidecar_name(&snap)),
            )
            .map_err(|e| Error::io(format!("linking the checksums of {snap}"), e))?;
            meta::write_json_atomic(&layer_meta_path(dir, &snap), &snap_meta)?;
            let file = create_layer_file(dir, &new_head, self.size())?;
            meta::write_json_atomic(&layer_meta_path(dir, &new_head), &head_meta)?;
            Layer::with_file(
                dir,
                new_head.clone(),
                head_meta,
                file,
                self.size(),
                self.auth_bytes(),
            )
        })();
        let new_layer = match prepared {
            Ok(layer) => layer,
            Err(e) => {
                remove_layer_files(dir, &snap);
                remove_layer_files(dir, &new_head);
                return Err(e);
            }
        };
        meta::write_json_atomic(&dir.join(REPLICA_META), &next_meta)?;
        *meta = next_meta;
        // The switch is durable; the old head's name is now a stray.
        remove_layer_files(dir, &old_head);
        let last = layers.last_mut().expect("chain is never empty");
        last.name = snap.clone();
        last.meta = snap_meta;
        layers.push(new_layer);
        tracing::info!(snapshot = %snap, "snapshot taken");
        Ok(snap)
    }

    fn below_head<'a>(layers: &'a [Layer], name: &str) -> Result<&'a Layer> {
        let (_, below_head) = layers.split_last().expect("chain is never empty");
        below_head
            .iter()
            .find(|l| l.name == name)
            .ok_or_else(|| Error::Invalid(format!("no snapshot layer {name:?} below the head")))
    }

    /// A layer below the head, by name, with its sidecar.
    fn layer_files_of(&self, name: &str) -> Result<(Arc<File>, Arc<File>, usize)> {
        Self::below_head(&self.layers(), name).map(|l| (l.file.clone(), l.crc.clone(), l.auth))
    }

    /// A 64-bit hash (xxh3) of each `unit` of layer `name` in the range,
    /// over its contents and its allocation; `None` for a unit holding no
    /// data. A rebuild skips what hashes the same, so the hash is wider
    /// than the blocks' crc32c: two different units hash alike with odds
    /// of 2^-64, not the 2^-32 that a TiB of rebuilds would soon meet.
    ///
    /// In an encrypted volume the hash covers the blocks' nonces and tags
    /// too: a replica whose tags went bad beside good ciphertext is told
    /// apart and rebuilt.
    pub fn layer_checksums(
        &self,
        name: &str,
        offset: u64,
        len: u64,
        unit: ChecksumUnit,
    ) -> Result<Vec<Option<u64>>> {
        self.check_range(offset, len)?;
        let unit = unit.bytes();
        if len.div_ceil(unit) > MAX_CHECKSUMS {
            return Err(Error::Invalid(format!(
                "{} checksums asked for; at most {MAX_CHECKSUMS} per request",
                len.div_ceil(unit)
            )));
        }
        let (file, sidecar, auth) = self.layer_files_of(name)?;
        let end = offset + len;
        let extents = data_extents_in(&file, offset, end)
            .map_err(|e| Error::io(format!("mapping {name}"), e))?;
        let mut out = Vec::with_capacity(len.div_ceil(unit) as usize);
        // Read a chunk at a time (no unit is larger) and hash each unit in it.
        let mut buf = vec![0u8; REBUILD_CHUNK as usize];
        let chunk_blocks = (REBUILD_CHUNK / BLOCK_SIZE) as usize;
        let (mut crcs, mut auths) = (vec![0; chunk_blocks], vec![0u8; chunk_blocks * auth]);
        let mut at = offset;
        while at < end {
            let n = REBUILD_CHUNK.min(end - at);
            let here: Vec<(u64, u64)> = extents
                .iter()
                .map(|&(s, e)| (s.max(at), e.min(at + n)))
                .filter(|(s, e)| s < e)
                .collect();
            if !here.is_empty() {
                file.read_exact_at(&mut buf[..n as usize], at)
                    .map_err(|e| Error::io(format!("reading {name}"), e))?;
                if auth > 0 {
                    let blocks = (n / BLOCK_SIZE) as usize;
                    checksum::verify(
                        &sidecar,
                        auth,
                        at / BLOCK_SIZE,
                        &buf[..n as usize],
                        &mut crcs[..blocks],
                        &mut auths[..blocks * auth],
                    )
                    .map_err(|e| Error::io(format!("reading checksums of {name}"), e))?;
                }
            }
            let mut u = at;
            while u < at + n {
                let m = unit.min(at + n - u);
                let mut hash: Option<Xxh3> = None;
                // Allocation counts as much as contents: an allocated zero
                // block and a hole read the same but differ in a chain.
                for &(s, e) in &here {
                    let (s, e) = (s.max(u), e.min(u + m));
                    if s < e {
                        let h = hash.get_or_insert_with(|| {
                            let mut h = Xxh3::new();
                            h.update(&buf[(u - at) as usize..(u - at + m) as usize]);
                            let b = ((u - at) / BLOCK_SIZE) as usize;
                            h.update(&auths[b * auth..(b + (m / BLOCK_SIZE) as usize) * auth]);
                            h
                        });
                        h.update(&(s / BLOCK_SIZE).to_le_bytes());
                        h.update(&e.div_ceil(BLOCK_SIZE).to_le_bytes());
                    }
                }
                out.push(hash.map(|h| h.digest()));
                u += m;
            }
            at += n;
        }
        Ok(out)
    }

    /// Reads a range of one layer (its holes read as zeros), followed by
    /// the blocks' nonces and tags if the volume is encrypted (zeros for
    /// holes).
    pub fn read_layer(&self, name: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        self.check_range(offset, len)?;
        let layers = self.layers();
        let layer = Self::below_head(&layers, name)?;
        let auth = layer.auth;
        let mut buf = vec![0u8; len as usize + (len / BLOCK_SIZE) as usize * auth];
        let (data, auths) = buf.split_at_mut(len as usize);
        layer
            .file
            .read_exact_at(data, offset)
            .map_err(|e| Error::io(format!("reading {name}"), e))?;
        // Holes read as zeros and have no checksum to match: check data only.
        let mut crcs = vec![0; (len / BLOCK_SIZE) as usize];
        for (s, e) in data_extents_in(&layer.file, offset, offset + len)
            .map_err(|e| Error::io(format!("mapping {name}"), e))?
        {
            let (s, e) = (
                s / BLOCK_SIZE * BLOCK_SIZE,
                e.div_ceil(BLOCK_SIZE) * BLOCK_SIZE,
            );
            let (s, e) = (s.max(offset), e.min(offset + len));
            let (from, to) = ((s - offset) as usize, (e - offset) as usize);
            let (b_from, b_to) = (from / BLOCK_SIZE as usize, to / BLOCK_SIZE as usize);
            check_blocks(
                layer,
                s,
                &data[from..to],
                &mut crcs,
                &mut auths[b_from * auth..b_to * auth],
            )?;
        }
        Ok(buf)
    }

    /// Writes a range of one layer below the head, zero blocks as data (an
    /// allocated zero block shadows the layers below; a hole does not).
    /// The payload is as [`Self::read_layer`] returns it.
    pub fn write_layer(&self, name: &str, offset: u64, payload: &[u8]) -> Result<()> {
        let (data, auths) = payload.split_at(self.data_len(payload.len())?);
        self.check_range(offset, data.len() as u64)?;
        let layers = self.layers();
        let layer = Self::below_head(&layers, name)?;
        checksum::record_settled(&layer.crc, layer.auth, offset / BLOCK_SIZE, data, auths)
            .map_err(|e| Error::io(format!("recording checksums of {name}"), e))?;
        if data.len() as u64 >= DIRECT_WRITE_MIN {
            match write_direct(&self.dir.join(name), offset, data) {
                Ok(()) => return Ok(()),
                // A file system without O_DIRECT (tmpfs): write through the
                // page cache below. Nothing was written.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => return Err(Error::io(format!("writing {name}"), e)),
            }
        }
        layer
            .file
            .write_all_at(data, offset)
            .map_err(|e| Error::io(format!("writing {name}"), e))
    }

    /// Punches a range out of one layer below the head: the layers below
    /// show through there.
    pub fn punch_layer(&self, name: &str, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        let layers = self.layers();
        punch_file(&Self::below_head(&layers, name)?.file, offset, len)?;
        Ok(())
    }

    /// Gives this replica the layer chain `chain` below its head (same-named
    /// layers are kept, others created empty or removed) and marks it as
    /// being rebuilt.
    pub fn prepare_rebuild(&self, chain: &[(String, LayerMeta)]) -> Result<()> {
        let _serial = lock(&self.flush_lock);
        let mut layers = self.layers_mut();
        let mut meta = lock(&self.meta);
        let dir = &self.dir;
        let (head, below) = layers.split_last().expect("chain is never empty");
        // Nothing in memory changes until the new chain is durable: a
        // failure on the way (a full disk) leaves this replica as it was
        // (the chain in memory once held no layer at all, and the next
        // request panicked; found by the chaos soak).
        let mut created = Vec::new();
        let prepared = (|| {
            let mut next = Vec::with_capacity(chain.len() + 1);
            for (name, lmeta) in chain {
                if name == &head.name || !name.starts_with("volume-snap-") || name.contains('/') {
                    return Err(Error::Invalid(format!(
                        "bad layer name {name:?} in a rebuild chain"
                    )));
                }
                let file = match below.iter().find(|l| &l.name == name) {
                    Some(_) => OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(dir.join(name))
                        .map_err(|e| Error::io(format!("opening {name}"), e))?,
                    None => {
                        created.push(name.clone());
                        create_layer_file(dir, name, self.size())?
                    }
                };
                meta::write_json_atomic(&layer_meta_path(dir, name), lmeta)?;
                next.push(Layer::with_file(
                    dir,
                    name.clone(),
                    lmeta.clone(),
                    file,
                    self.size(),
                    self.auth_bytes(),
                )?);
            }
            Ok(next)
        })();
        let mut next = match prepared {
            Ok(next) => next,
            Err(e) => {
                for name in &created {
                    remove_layer_files(dir, name);
                }
                return Err(e);
            }
        };
        let mut next_meta = meta.clone();
        next_meta.chain = next
            .iter()
            .map(|l| l.name.clone())
            .chain([head.name.clone()])
            .collect();
        next_meta.rebuilding = true;
        // Created layers stay if this fails: the chain may reach the disk
        // before an error.
        meta::write_json_atomic(&dir.join(REPLICA_META), &next_meta)?;
        *meta = next_meta;
        let head = layers.pop().expect("chain is never empty");
        for old in layers.drain(..) {
            if !next.iter().any(|l| l.name == old.name) {
                remove_layer_files(dir, &old.name);
            }
        }
        next.push(head);
        *layers = next;
        tracing::info!(layers = chain.len(), "rebuild prepared");
        Ok(())
    }

    /// Ends a rebuild: syncs the copied layers, rebuilds the index, adopts
    /// the source's revision counter and clears the rebuilding flag.
    pub fn finish_rebuild(&self, revision: Revision) -> Result<()> {
        let layers = self.layers();
        for l in layers.iter() {
            for f in [&l.file, &l.crc] {
                f.sync_all()
                    .map_err(|e| Error::io(format!("syncing {}", l.name), e))?;
            }
        }
        {
            // Under the index lock, so head writes in flight land after.
            let mut index = self.index.write().unwrap_or_else(|e| e.into_inner());
            *index = build_index(self.size(), &layers)?;
        }
        drop(layers);
        let mut meta = lock(&self.meta);
        let mut next_meta = meta.clone();
        next_meta.rebuilding = false;
        meta::write_json_atomic(&self.dir.join(REPLICA_META), &next_meta)?;
        *meta = next_meta;
        drop(meta);
        self.revision.store(revision.0, Ordering::Release);
        self.flush()?;
        tracing::info!(revision = %revision, "rebuild finished");
        Ok(())
    }
}

/// Creates layer `name` as new files: whatever the name held before (a
/// stray left by a failed snapshot may be a hard link to another layer's
/// data and checksums) is unlinked first, never truncated or reused, so a
/// new layer can never write through into another. The chaos soak found
/// a rebuild that did: it emptied the joining replica's copy of the very
/// layer it was about to compare, and the replica came back RW with old
/// data.
pub(crate) fn create_layer_file(dir: &Path, name: &str, size: u64) -> Result<File> {
    remove_layer_files(dir, name);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(dir.join(name))
        .map_err(|e| Error::io(format!("creating {name}"), e))?;
    f.set_len(size)
        .map_err(|e| Error::io(format!("sizing {name}"), e))?;
    f.sync_all()
        .map_err(|e| Error::io(format!("syncing {name}"), e))?;
    Ok(f)
}

/// Unit of rebuild comparison and copy.
pub const REBUILD_CHUNK: u64 = 1 << 20;

/// Most checksums one [`Replica::layer_checksums`] call returns (a 64 GiB
/// range by chunks, 256 MiB by blocks), which bounds its reply.
pub const MAX_CHECKSUMS: u64 = 1 << 16;

/// What one checksum of [`Replica::layer_checksums`] covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChecksumUnit {
    /// A [`REBUILD_CHUNK`]: cheap to compare a whole layer by.
    Chunk,
    /// A block: finds what differs inside a chunk.
    Block,
}

impl ChecksumUnit {
    pub fn bytes(self) -> u64 {
        match self {
            ChecksumUnit::Chunk => REBUILD_CHUNK,
            ChecksumUnit::Block => BLOCK_SIZE,
        }
    }
}

/// Removes layer files and metadata not in `chain`: what a snapshot or a
/// rebuild interrupted by a crash leaves behind (see the snapshot docs).
fn remove_strays(dir: &Path, chain: &[String]) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let layer = name
            .strip_suffix(".meta")
            .or_else(|| name.strip_suffix(".crc"))
            .unwrap_or(&name);
        let ours = layer.starts_with("volume-") && layer.ends_with(".img");
        if ours && !chain.iter().any(|c| c == layer) {
            tracing::info!(file = %name, "removing a stray file of an interrupted snapshot or rebuild");
            let _ = fs::remove_file(e.path());
        }
    }
}

/// Writes to layers below the head of at least this many bytes (a rebuild's
/// copy) bypass the page cache. A rebuild writes gigabytes that nothing
/// reads soon; through the page cache each new page costs a copy and, in a
/// VM, often a fault on the host as well. On this project's test machine a
/// full rebuild of 2 GiB took 4.3 s this way and 11-13 s buffered.
pub const DIRECT_WRITE_MIN: u64 = 64 << 10;

/// Writes `data` at `offset` of the file at `path` with O_DIRECT, from a
/// block-aligned copy (O_DIRECT needs aligned memory, offset and length;
/// layer writes are whole blocks). Fails with EINVAL, before writing
/// anything, where the file system does not support O_DIRECT.
fn write_direct(path: &Path, offset: u64, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    let aligned = AlignedBlocks::copy_of(data);
    file.write_all_at(aligned.as_slice(), offset)
}

/// A heap copy of whole blocks, aligned to [`BLOCK_SIZE`].
struct AlignedBlocks {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
    len: usize,
}

impl AlignedBlocks {
    fn copy_of(data: &[u8]) -> AlignedBlocks {
        let layout = std::alloc::Layout::from_size_align(data.len().max(1), BLOCK_SIZE as usize)
            .expect("a block-aligned layout of a slice's length is valid");
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc(layout) };
        let Some(ptr) = std::ptr::NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        // SAFETY: `ptr` points to at least `data.len()` fresh bytes that
        // cannot overlap `data`.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), ptr.as_ptr(), data.len()) };
        AlignedBlocks {
            ptr,
            layout,
            len: data.len(),
        }
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: the allocation holds `len` initialised bytes (copied in
        // `copy_of`) and lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBlocks {
    fn drop(&mut self) {
        // SAFETY: allocated in `copy_of` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// Punches a hole in `file` (keeping its size).
pub(crate) fn punch_file(file: &File, offset: u64, len: u64) -> Result<()> {
    // SAFETY: fallocate on an fd we own, with plain integer arguments.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc != 0 {
        return Err(Error::io(
            format!("punching {len} bytes at {offset}"),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// The runs of a range held in layer files, as `(layer position, byte
/// offset, length)` in order (the gaps between them are holes), with the
/// chain and the lower gate held so the runs stay valid while they are read.
struct Located<'a> {
    layers: RwLockReadGuard<'a, Vec<Layer>>,
    _gate: RwLockReadGuard<'a, ()>,
    runs: Vec<(usize, u64, u64)>,
}

/// Where a range is stored ([`Replica::read_stored`]), and the crc32c its
/// data should have.
#[derive(Debug)]
pub struct Stored {
    pub segments: Vec<Segment>,
    pub crc: u32,
    /// The chain the segments' layer positions refer to.
    pub chain_version: u64,
}

/// A piece of a range, as stored.
#[derive(Debug)]
pub enum Segment {
    /// `len` bytes of a layer file (position `layer` in the chain) at `at`.
    File {
        file: Arc<File>,
        layer: LayerPos,
        at: u64,
        len: usize,
    },
    /// A hole.
    Zeros(usize),
}

impl Segment {
    pub fn byte_len(&self) -> usize {
        match self {
            Segment::File { len, .. } | Segment::Zeros(len) => *len,
        }
    }
}

/// Reads `n` bytes of `file` at `at` onto the end of `buf`, into its spare
/// capacity: nothing is zeroed first.
pub(crate) fn read_appending(
    file: &File,
    at: u64,
    n: usize,
    buf: &mut Vec<u8>,
) -> std::io::Result<()> {
    buf.reserve(n);
    let spare = &mut buf.spare_capacity_mut()[..n];
    let mut done = 0;
    while done < n {
        // SAFETY: the kernel writes at most `n - done` bytes into spare
        // capacity that `buf` owns; none of it is read before it is written.
        let r = unsafe {
            libc::pread(
                file.as_raw_fd(),
                spare[done..].as_mut_ptr().cast(),
                n - done,
                (at + done as u64) as libc::off_t,
            )
        };
        match r {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            r if r > 0 => done += r as usize,
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    // SAFETY: the `n` bytes after the old length were all written above.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(())
}

/// Checks blocks just read from `layer` at byte `at` against its checksums;
/// `auths` gets their nonces and tags ([`checksum::verify`]).
pub(crate) fn check_blocks(
    layer: &Layer,
    at: u64,
    data: &[u8],
    crcs: &mut [u32],
    auths: &mut [u8],
) -> Result<()> {
    match checksum::verify(&layer.crc, layer.auth, at / BLOCK_SIZE, data, crcs, auths)
        .map_err(|e| Error::io(format!("reading checksums of {}", layer.name), e))?
    {
        None => Ok(()),
        Some(block) => Err(Error::Checksum(format!(
            "block {block} (byte {}) of {} does not match its checksum",
            block * BLOCK_SIZE,
            layer.name
        ))),
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Builds the index from the layers' allocation, oldest layer first so
/// newer layers overwrite the entries of older ones.
pub(crate) fn build_index(size: u64, layers: &[Layer]) -> Result<BlockMap> {
    let mut map = BlockMap::new(size / BLOCK_SIZE);
    for (pos, layer) in layers.iter().enumerate() {
        for (start, end) in data_extents(&layer.file, size)
            .map_err(|e| Error::io(format!("mapping layer {}", layer.name), e))?
        {
            let first = start / BLOCK_SIZE;
            let last = end.div_ceil(BLOCK_SIZE).min(size / BLOCK_SIZE);
            map.set(BlockIndex(first), last - first, Some(LayerPos(pos as u32)));
        }
    }
    Ok(map)
}

/// Data extents of a sparse file as `(start, end)` byte ranges, found with
/// SEEK_DATA / SEEK_HOLE.
pub fn data_extents(file: &File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    data_extents_in(file, 0, size)
}

/// Data extents of a sparse file within `[from, size)`, clipped to it.
pub fn data_extents_in(file: &File, from: u64, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    data_extents_upto(file, from, size, u64::MAX)
}

/// Like [`data_extents_in`], stopping once the extents found add up to
/// `max_bytes` (the last one cut to fit).
pub fn data_extents_upto(
    file: &File,
    from: u64,
    size: u64,
    max_bytes: u64,
) -> std::io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: u64 = from;
    let mut found = 0u64;
    while pos < size && found < max_bytes {
        // SAFETY: lseek on an fd we own.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return Err(err);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let data = data as u64;
        let hole = (hole as u64)
            .min(size)
            .min(data.saturating_add(max_bytes - found));
        if hole > data {
            out.push((data, hole));
            found += hole - data;
        }
        pos = hole.max(data + 1);
    }
    Ok(out)
}
