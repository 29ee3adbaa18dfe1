//! Changing a live replica's chain: removing and purging snapshots,
//! reverting to one, and growing the volume.
//!
//! # Removal and purge
//!
//! [`Replica::remove_snapshot`] only marks a layer removed (an atomic
//! rewrite of its `.meta`): its data may still show through the layers
//! above. [`Replica::purge_step`] then folds removed layers away, a bounded
//! amount of work per call, so the engine drives it in the background,
//! reports progress and can stop between steps. The lowest removed layer L
//! goes first:
//!
//! - **Fold**, when L's child C is a snapshot: every block of L that C
//!   lacks is copied into C (zero blocks too, as data: they shadow what is
//!   below), C is synced, then index entries that resolved to L move to C
//!   and the range is punched out of L. When L holds nothing more, the
//!   chain drops it.
//! - **Prune**, when L lies directly below the head: a block of L that the
//!   head holds is invisible, so once the head is synced it is punched out
//!   of L. What the head does not overwrite stays in L and stays visible;
//!   L leaves the chain when nothing of it is left (a later snapshot gives
//!   it a child to fold into).
//!
//! The cost follows the data in L (SEEK_DATA skips its holes), not the
//! volume size. L shrinks as C grows, so the extra space a purge needs is
//! one step's worth, [`PURGE_STEP_BYTES`].
//!
//! **Crash safety.** No step changes what any view that can still be read
//! shows: the head's and each kept snapshot's (a removed layer's own view
//! is never read again). A copied block is the same data one layer higher,
//! shadowing the same layers; a block is punched from L only after the
//! copy, or the head block shadowing it, is durable. So a SIGKILL or a
//! power loss anywhere leaves a chain that reads the same, and the next
//! purge finds less to do. Dropping L is one atomic rewrite of
//! `replica.json`; its files, if a crash leaves them, are strays that the
//! next open removes.
//!
//! **Concurrency.** Client writes only touch the head and set index entries
//! to it, so moving entries from L to C is a compare-and-set under the
//! index lock. Reads resolve their layers and then `pread` outside the
//! index lock; the `lower_gate` (shared by reads, exclusive while anything
//! below the head is punched) keeps a read that resolved to L from reading
//! it after the punch. Trim takes the gate too when it punches through
//! removed layers, so a fold cannot copy a block into C after a trim
//! punched it there.
//!
//! # Revert
//!
//! [`Replica::revert`] makes the head a new, empty layer on top of a
//! snapshot. Snapshots newer than it must have been removed first: the
//! chain is linear, and a revert must never drop a snapshot someone kept.
//! The new head file is created, then `replica.json` switches to the short
//! chain; a crash before the switch leaves the old chain and a stray.
//!
//! # Expansion
//!
//! [`Replica::expand`] lengthens every layer file (the new tail is a hole),
//! syncs them, and then rewrites `replica.json` with the new size. A crash
//! between leaves layer files longer than the recorded size, which open
//! accepts: nothing is ever read or written past `size`.

use std::fs;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ids::{BlockIndex, LayerPos, BLOCK_SIZE};
use crate::meta::{self, LayerMeta, REPLICA_META};
use crate::store::{
    build_index, check_snapshot_name, create_layer_file, data_extents_upto, layer_meta_path, lock,
    next_head_name, now_secs, punch_file, remove_layer_files, Layer, Replica,
};

/// Most bytes of a removed layer one purge step works through.
pub const PURGE_STEP_BYTES: u64 = 16 << 20;

/// Where pruning of the layer below the head got to.
#[derive(Debug, Default)]
pub struct PurgeCursor {
    pruning: Option<(String, u64)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PurgeAction {
    Fold,
    Prune,
    /// The layer held nothing more and left the chain.
    Drop,
}

/// What one purge step did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurgeReport {
    pub layer: String,
    pub action: PurgeAction,
    /// Bytes of the layer this step went through.
    pub bytes: u64,
}

/// The file name of snapshot `name`.
pub fn snapshot_file(name: &str) -> String {
    format!("volume-snap-{name}.img")
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |e| Error::io(what, e)
}

impl Replica {
    /// Marks snapshot `name` removed; its data is folded away by
    /// [`Replica::purge_step`]. Returns whether it was not removed before.
    pub fn remove_snapshot(&self, name: &str) -> Result<bool> {
        check_snapshot_name(name)?;
        let file = snapshot_file(name);
        let _serial = lock(&self.flush_lock);
        let mut layers = self.layers_mut();
        let head = layers.len() - 1;
        let layer = layers[..head]
            .iter_mut()
            .find(|l| l.name == file)
            .ok_or_else(|| Error::Invalid(format!("no snapshot {name}")))?;
        if layer.meta.removed {
            return Ok(false);
        }
        let next = LayerMeta {
            removed: true,
            ..layer.meta.clone()
        };
        meta::write_json_atomic(&layer_meta_path(&self.dir, &file), &next)?;
        layer.meta = next;
        tracing::info!(snapshot = %name, "snapshot removed; purge will fold its data away");
        Ok(true)
    }

    /// Does one bounded step of purging removed layers; `None` when there
    /// is nothing (more) to do. See the module documentation.
    pub fn purge_step(&self) -> Result<Option<PurgeReport>> {
        let mut cursor = lock(&self.purge);
        let (report, empty) = {
            let layers = self.layers();
            let head = layers.len() - 1;
            let Some(pos) = layers[..head].iter().position(|l| l.meta.removed) else {
                cursor.pruning = None;
                return Ok(None);
            };
            let name = layers[pos].name.clone();
            let report = if pos + 1 < head {
                self.fold_step(&layers, pos)?
            } else {
                let from = match &cursor.pruning {
                    Some((layer, at)) if *layer == name => *at,
                    _ => 0,
                };
                let (bytes, next) = self.prune_step(&layers, pos, from)?;
                if bytes == 0 && !is_empty(&layers[pos], self.size())? {
                    // Pruned to the end: the rest is visible data. A later
                    // purge starts over, for what the head overwrote since.
                    cursor.pruning = None;
                    return Ok(None);
                }
                cursor.pruning = Some((name.clone(), next));
                PurgeReport {
                    layer: name.clone(),
                    action: PurgeAction::Prune,
                    bytes,
                }
            };
            (report, is_empty(&layers[pos], self.size())?)
        };
        if empty {
            self.drop_empty_layer(&report.layer)?;
            cursor.pruning = None;
            return Ok(Some(PurgeReport {
                action: PurgeAction::Drop,
                ..report
            }));
        }
        Ok(Some(report))
    }

    /// Copies what L (at `pos`) holds and its child lacks into the child,
    /// then punches it out of L.
    fn fold_step(&self, layers: &[Layer], pos: usize) -> Result<PurgeReport> {
        let (lower, child) = (&layers[pos], &layers[pos + 1]);
        let size = self.size();
        let extents = {
            // Mapped under the gate, like the copy: a trim that punched L
            // after the mapping would have the copy read its hole as zeros
            // and give the child allocated zero blocks carrying L's old
            // checksums (found by `tests/concurrent_purge.rs`).
            let _gate = self.lower_gate.write().unwrap_or_else(|e| e.into_inner());
            let extents = block_aligned(
                data_extents_upto(&lower.file, 0, size, PURGE_STEP_BYTES)
                    .map_err(io(format!("mapping {}", lower.name)))?,
                size,
            );
            let mut buf = Vec::new();
            for &(start, end) in &extents {
                for (gap_start, gap_end) in
                    gaps(&child.file, start, end).map_err(io(format!("mapping {}", child.name)))?
                {
                    buf.resize((gap_end - gap_start) as usize, 0);
                    lower
                        .file
                        .read_exact_at(&mut buf, gap_start)
                        .map_err(io(format!("reading {}", lower.name)))?;
                    child
                        .file
                        .write_all_at(&buf, gap_start)
                        .map_err(io(format!("writing {}", child.name)))?;
                    crate::checksum::copy_entries(
                        &lower.crc,
                        &child.crc,
                        child.auth,
                        gap_start / BLOCK_SIZE,
                        (gap_end - gap_start) / BLOCK_SIZE,
                    )
                    .map_err(io(format!("copying checksums into {}", child.name)))?;
                }
            }
            extents
        };
        for f in [&child.file, &child.crc] {
            f.sync_data()
                .map_err(io(format!("syncing {}", child.name)))?;
        }
        let _gate = self.lower_gate.write().unwrap_or_else(|e| e.into_inner());
        let mut index = self.index.write().unwrap_or_else(|e| e.into_inner());
        let mut bytes = 0;
        for &(start, end) in &extents {
            index.replace(
                BlockIndex(start / BLOCK_SIZE),
                (end - start) / BLOCK_SIZE,
                Some(LayerPos(pos as u32)),
                Some(LayerPos(pos as u32 + 1)),
            );
            punch_file(&lower.file, start, end - start)?;
            bytes += end - start;
        }
        Ok(PurgeReport {
            layer: lower.name.clone(),
            action: PurgeAction::Fold,
            bytes,
        })
    }

    /// Punches out of L (directly below the head) what the head shadows,
    /// in L's data from `from` on. Returns the bytes gone through and where
    /// the next step starts.
    fn prune_step(&self, layers: &[Layer], pos: usize, from: u64) -> Result<(u64, u64)> {
        let (lower, head) = (&layers[pos], &layers[pos + 1]);
        let size = self.size();
        let extents = block_aligned(
            data_extents_upto(&lower.file, from, size, PURGE_STEP_BYTES)
                .map_err(io(format!("mapping {}", lower.name)))?,
            size,
        );
        let Some(&(_, next)) = extents.last() else {
            return Ok((0, size));
        };
        let head_pos = Some(LayerPos(pos as u32 + 1));
        let shadowed: Vec<(BlockIndex, u64)> = {
            let index = self.index.read().unwrap_or_else(|e| e.into_inner());
            extents
                .iter()
                .flat_map(|&(s, e)| index.runs(BlockIndex(s / BLOCK_SIZE), (e - s) / BLOCK_SIZE))
                .filter(|&(_, _, e)| e == head_pos)
                .map(|(b, n, _)| (b, n))
                .collect()
        };
        // The head's copy, and its checksums, must be durable before L's
        // goes: after a power cut a head block whose checksum was lost
        // would read as rot, with no older copy left. Blocks the head got
        // only after this sync are left for a later purge.
        for f in [&head.file, &head.crc] {
            f.sync_data().map_err(io("syncing the head layer"))?;
        }
        let _gate = self.lower_gate.write().unwrap_or_else(|e| e.into_inner());
        let index = self.index.read().unwrap_or_else(|e| e.into_inner());
        for (b, n) in shadowed {
            for (start, count, e) in index.runs(b, n) {
                if e == head_pos {
                    punch_file(&lower.file, start.byte_offset(), count * BLOCK_SIZE)?;
                }
            }
        }
        let bytes = extents.iter().map(|&(s, e)| e - s).sum();
        Ok((bytes, next))
    }

    /// Drops removed layer `name`, which holds no data, from the chain.
    fn drop_empty_layer(&self, name: &str) -> Result<()> {
        let _serial = lock(&self.flush_lock);
        let mut layers = self.layers_mut();
        let head = layers.len() - 1;
        let Some(pos) = layers[..head].iter().position(|l| l.name == name) else {
            return Ok(());
        };
        if !layers[pos].meta.removed || !is_empty(&layers[pos], self.size())? {
            return Ok(());
        }
        let mut meta = lock(&self.meta);
        let mut next_meta = meta.clone();
        next_meta.chain.remove(pos);
        meta::write_json_atomic(&self.dir.join(REPLICA_META), &next_meta)?;
        *meta = next_meta;
        self.index
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove_layer(LayerPos(pos as u32));
        let gone = layers.remove(pos);
        // The child's parent link is informational (the chain's order is
        // what counts); keep it truthful.
        let parent = gone.meta.parent.clone();
        let child = &mut layers[pos];
        let child_meta = LayerMeta {
            parent,
            ..child.meta.clone()
        };
        meta::write_json_atomic(&layer_meta_path(&self.dir, &child.name), &child_meta)?;
        child.meta = child_meta;
        remove_layer_files(&self.dir, &gone.name);
        tracing::info!(layer = %gone.name, "purged layer left the chain");
        Ok(())
    }

    /// Makes the head a new, empty layer on top of snapshot `name`; see the
    /// module documentation.
    pub fn revert(&self, name: &str) -> Result<()> {
        check_snapshot_name(name)?;
        let file = snapshot_file(name);
        let _serial = lock(&self.flush_lock);
        let mut layers = self.layers_mut();
        let mut meta = lock(&self.meta);
        if meta.rebuilding {
            return Err(Error::Invalid(
                "this replica is being rebuilt; revert it after the rebuild".into(),
            ));
        }
        let head = layers.len() - 1;
        let pos = layers[..head]
            .iter()
            .position(|l| l.name == file)
            .ok_or_else(|| Error::Invalid(format!("no snapshot {name}")))?;
        if layers[pos].meta.removed {
            return Err(Error::Invalid(format!("snapshot {name} is removed")));
        }
        let newer: Vec<&str> = layers[pos + 1..head]
            .iter()
            .filter(|l| !l.meta.removed)
            .map(|l| l.name.as_str())
            .collect();
        if !newer.is_empty() {
            return Err(Error::Invalid(format!(
                "snapshots newer than {name} exist ({}); remove them before reverting",
                newer.join(", ")
            )));
        }
        self.mark_dirty()?;
        let new_head = next_head_name(&layers[head].name);
        let size = self.size();
        let head_meta = LayerMeta {
            parent: Some(file.clone()),
            created: now_secs(),
            user_created: false,
            removed: false,
            labels: Default::default(),
        };
        let mut next_meta = meta.clone();
        next_meta.chain.truncate(pos + 1);
        next_meta.chain.push(new_head.clone());
        // The chain in memory changes only once the new one is durable; a
        // failure before writing it (a full disk) removes the new head's
        // files.
        let prepared = (|| {
            let head_file = create_layer_file(&self.dir, &new_head, size)?;
            meta::write_json_atomic(&layer_meta_path(&self.dir, &new_head), &head_meta)?;
            Layer::with_file(
                &self.dir,
                new_head.clone(),
                head_meta,
                head_file,
                size,
                self.auth_bytes(),
            )
        })();
        let new_layer = match prepared {
            Ok(layer) => layer,
            Err(e) => {
                remove_layer_files(&self.dir, &new_head);
                return Err(e);
            }
        };
        // Not once the chain is being written: it may reach the disk
        // before an error.
        meta::write_json_atomic(&self.dir.join(REPLICA_META), &next_meta)?;
        *meta = next_meta;
        for gone in layers.drain(pos + 1..) {
            remove_layer_files(&self.dir, &gone.name);
        }
        layers.push(new_layer);
        *self.index.write().unwrap_or_else(|e| e.into_inner()) = build_index(size, &layers)?;
        self.revision.fetch_add(1, Ordering::AcqRel);
        tracing::info!(snapshot = %name, "reverted to snapshot");
        Ok(())
    }

    /// Grows the volume to `new_size` bytes; see the module documentation.
    /// Growing to the current size is a no-op; shrinking is refused.
    pub fn expand(&self, new_size: u64) -> Result<()> {
        let _serial = lock(&self.flush_lock);
        let layers = self.layers_mut();
        let size = self.size();
        if new_size == size {
            return Ok(());
        }
        if new_size < size || !new_size.is_multiple_of(BLOCK_SIZE) || new_size > MAX_VOLUME_SIZE {
            return Err(Error::Invalid(format!(
                "cannot grow a volume of {size} bytes to {new_size}: the new size must be larger, \
                 a multiple of {BLOCK_SIZE} and at most {MAX_VOLUME_SIZE}"
            )));
        }
        for l in layers.iter() {
            for (file, len) in [
                (&l.file, new_size),
                (&l.crc, crate::checksum::sidecar_len(new_size, l.auth)),
            ] {
                file.set_len(len)
                    .map_err(io(format!("growing {}", l.name)))?;
                file.sync_all().map_err(io(format!("syncing {}", l.name)))?;
            }
        }
        let mut meta = lock(&self.meta);
        let mut next_meta = meta.clone();
        next_meta.size = new_size;
        meta::write_json_atomic(&self.dir.join(REPLICA_META), &next_meta)?;
        *meta = next_meta;
        self.index
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .grow(new_size / BLOCK_SIZE);
        self.size.store(new_size, Ordering::Release);
        tracing::info!(from = size, to = new_size, "volume expanded");
        Ok(())
    }
}

/// What a scrub found; see [`Replica::scrub`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrubReport {
    /// Blocks holding data that were read and checked, over all layers.
    pub blocks_checked: u64,
    /// Blocks whose data matches neither checksum slot: `(layer, byte)`,
    /// the first [`SCRUB_REPORT_MAX`] of them.
    pub bad: Vec<(String, u64)>,
    pub bad_blocks: u64,
}

pub const SCRUB_REPORT_MAX: usize = 64;

impl Replica {
    /// Reads every block every layer holds and checks it against its
    /// checksums. Runs beside client I/O: a block that fails is read again
    /// and counted only if it still holds data that fails (a trim may have
    /// punched it meanwhile).
    pub fn scrub(&self) -> Result<ScrubReport> {
        const PIECE: u64 = 1 << 20;
        let mut report = ScrubReport::default();
        // Handles, not the chain lock: a scrub is long, and a snapshot
        // waiting for the lock would stall client I/O behind it.
        let layers: Vec<Layer> = self.layers().to_vec();
        let size = self.size();
        let mut buf = vec![0u8; PIECE as usize];
        let mut crcs = vec![0u32; (PIECE / BLOCK_SIZE) as usize];
        for layer in layers.iter() {
            let extents = block_aligned(
                crate::store::data_extents_in(&layer.file, 0, size)
                    .map_err(io(format!("mapping {}", layer.name)))?,
                size,
            );
            for (start, end) in extents {
                let mut at = start;
                while at < end {
                    let n = PIECE.min(end - at) as usize;
                    let part = &mut buf[..n];
                    layer
                        .file
                        .read_exact_at(part, at)
                        .map_err(io(format!("reading {}", layer.name)))?;
                    report.blocks_checked += n as u64 / BLOCK_SIZE;
                    let mut from = at / BLOCK_SIZE;
                    while let Some(b) = crate::checksum::verify(
                        &layer.crc,
                        layer.auth,
                        from,
                        &part[((from * BLOCK_SIZE - at) as usize)..],
                        &mut crcs,
                        &mut [],
                    )
                    .map_err(io(format!("reading checksums of {}", layer.name)))?
                    {
                        if self.still_bad(layer, b)? {
                            report.bad_blocks += 1;
                            if report.bad.len() < SCRUB_REPORT_MAX {
                                report.bad.push((layer.name.clone(), b * BLOCK_SIZE));
                            }
                        }
                        from = b + 1;
                        if from * BLOCK_SIZE >= at + n as u64 {
                            break;
                        }
                    }
                    at += n as u64;
                }
            }
        }
        if report.bad_blocks > 0 {
            tracing::error!(bad_blocks = report.bad_blocks, first = ?report.bad.first(), "scrub found blocks that fail their checksums");
        }
        Ok(report)
    }

    /// Whether `block` of `layer` fails its checksum when read again with
    /// no write into the head running: a write may have raced the scrub's
    /// read (see the invariants in [`crate::store`]).
    fn still_bad(&self, layer: &Layer, block: u64) -> Result<bool> {
        let _no_writes = self.head_writes.write().unwrap_or_else(|e| e.into_inner());
        let at = block * BLOCK_SIZE;
        let allocated = !crate::store::data_extents_in(&layer.file, at, at + BLOCK_SIZE)
            .map_err(io(format!("mapping {}", layer.name)))?
            .is_empty();
        if !allocated {
            return Ok(false);
        }
        let mut b = vec![0u8; BLOCK_SIZE as usize];
        layer
            .file
            .read_exact_at(&mut b, at)
            .map_err(io(format!("reading {}", layer.name)))?;
        Ok(
            crate::checksum::verify(&layer.crc, layer.auth, block, &b, &mut [0], &mut [])
                .map_err(io(format!("reading checksums of {}", layer.name)))?
                .is_some(),
        )
    }
}

/// Largest volume: 64 TiB (the index addresses blocks with room to spare;
/// this bounds what a typo can ask for).
pub const MAX_VOLUME_SIZE: u64 = 64 << 40;

fn is_empty(layer: &Layer, size: u64) -> Result<bool> {
    Ok(data_extents_upto(&layer.file, 0, size, 1)
        .map_err(io(format!("mapping {}", layer.name)))?
        .is_empty())
}

/// Extents widened to whole blocks (file systems report data in their own
/// block size, which is at most ours here but need not be aligned to it).
fn block_aligned(extents: Vec<(u64, u64)>, size: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(extents.len());
    for (s, e) in extents {
        let (s, e) = (
            s / BLOCK_SIZE * BLOCK_SIZE,
            e.div_ceil(BLOCK_SIZE).saturating_mul(BLOCK_SIZE).min(size),
        );
        match out.last_mut() {
            Some((_, last)) if *last >= s => *last = (*last).max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// The holes of `file` within `[start, end)`.
fn gaps(file: &fs::File, start: u64, end: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut at = start;
    for (s, e) in crate::store::data_extents_in(file, start, end)? {
        let s = s / BLOCK_SIZE * BLOCK_SIZE;
        if s > at {
            out.push((at, s));
        }
        at = at.max(e.div_ceil(BLOCK_SIZE) * BLOCK_SIZE);
    }
    if at < end {
        out.push((at, end));
    }
    Ok(out)
}
