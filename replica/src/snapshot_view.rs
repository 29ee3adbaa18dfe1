//! Reading a snapshot as a volume: what backups read.
//!
//! A snapshot's view is the chain cut at its layer: a block reads from the
//! newest layer at or below the snapshot that holds it, zeros if none does.
//! [`Replica::read_snapshot`] reads that view; [`Replica::snapshot_extents`]
//! says where it may differ from an older snapshot's view.
//!
//! # Why the layers between two snapshots hold every change between them
//!
//! Every write lands in the head, and a snapshot freezes the head: so the
//! blocks written after snapshot B and before snapshot S are exactly those
//! allocated in the layers above B up to S. The chain operations keep that:
//! - a purge folds a removed layer into its child (the next newer layer),
//!   so data never crosses B upwards or S downwards unless B or S itself is
//!   removed, and a removed snapshot is never a base (the engine checks);
//! - a prune punches a removed layer directly below the head, and a trim
//!   punches through the chain only when every layer below the head is
//!   removed: neither touches a snapshot that is not removed;
//! - a revert drops the layers above the snapshot it goes back to, so a
//!   base above that snapshot no longer exists.
//!
//! The view of a snapshot being read must not change under the reader: the
//! engine pauses purges and refuses reverts and the removal of that
//! snapshot while a backup reads it.

use std::os::unix::fs::FileExt;

use crate::error::{Error, Result};
use crate::ids::BLOCK_SIZE;
use crate::store::{data_extents_in, Layer, Replica};

impl Replica {
    /// Positions in the chain (below the head) of snapshot layer `layer`
    /// and of the optional older `base`.
    fn view_bounds(layers: &[Layer], layer: &str, base: Option<&str>) -> Result<(usize, usize)> {
        let below_head = &layers[..layers.len() - 1];
        let find = |name: &str| {
            below_head
                .iter()
                .position(|l| l.name == name)
                .ok_or_else(|| Error::Invalid(format!("no snapshot layer {name:?} below the head")))
        };
        let top = find(layer)?;
        let bottom = match base {
            None => 0,
            Some(b) => {
                let b = find(b)?;
                if b >= top {
                    return Err(Error::Invalid(format!(
                        "{:?} is not older than {layer:?}",
                        layers[b].name
                    )));
                }
                b + 1
            }
        };
        Ok((bottom, top))
    }

    /// Runs `(bytes, data)` over `[offset, offset + len)`: where the view
    /// of snapshot layer `layer` holds data (`base` `None`), or may differ
    /// from the view of the older snapshot layer `base`. Whole blocks.
    pub fn snapshot_extents(
        &self,
        layer: &str,
        base: Option<&str>,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(u64, bool)>> {
        self.check_range(offset, len)?;
        let layers = self.layers();
        let (bottom, top) = Self::view_bounds(&layers, layer, base)?;
        let end = offset + len;
        let mut extents = Vec::new();
        for l in &layers[bottom..=top] {
            extents.extend(
                data_extents_in(&l.file, offset, end)
                    .map_err(|e| Error::io(format!("mapping {}", l.name), e))?
                    .into_iter()
                    .map(|(s, e)| {
                        (
                            s / BLOCK_SIZE * BLOCK_SIZE,
                            e.div_ceil(BLOCK_SIZE).saturating_mul(BLOCK_SIZE).min(end),
                        )
                    }),
            );
        }
        extents.sort_unstable();
        let mut runs: Vec<(u64, bool)> = Vec::new();
        let mut at = offset;
        for (s, e) in extents {
            let s = s.max(at);
            if e <= s {
                continue;
            }
            if s > at {
                runs.push((s - at, false));
            }
            match runs.last_mut() {
                Some((n, true)) if s == at => *n += e - s,
                _ => runs.push((e - s, true)),
            }
            at = e;
        }
        if at < end {
            runs.push((end - at, false));
        }
        Ok(runs)
    }

    /// Reads `[offset, offset + len)` of the view of snapshot layer
    /// `layer`, checking every block against its checksum, followed (in an
    /// encrypted volume) by each block's nonce and tag, zeros for a block
    /// no layer holds: the form of [`Replica::read_layer`].
    pub fn read_snapshot(&self, layer: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        self.check_range(offset, len)?;
        let layers = self.layers();
        let (_, top) = Self::view_bounds(&layers, layer, None)?;
        let auth = self.auth_bytes();
        let blocks = (len / BLOCK_SIZE) as usize;
        let mut buf = vec![0u8; len as usize + blocks * auth];
        let (data, auths) = buf.split_at_mut(len as usize);
        // Which blocks a newer layer already gave.
        let mut filled = vec![false; blocks];
        let mut left = blocks;
        let mut crcs = vec![0u32; blocks];
        for l in layers[..=top].iter().rev() {
            if left == 0 {
                break;
            }
            let extents = data_extents_in(&l.file, offset, offset + len)
                .map_err(|e| Error::io(format!("mapping {}", l.name), e))?;
            for (s, e) in extents {
                let first = ((s - offset) / BLOCK_SIZE) as usize;
                let last = ((e - offset).div_ceil(BLOCK_SIZE) as usize).min(blocks);
                let mut b = first;
                while b < last {
                    if filled[b] {
                        b += 1;
                        continue;
                    }
                    let run_end = (b..last).find(|&x| filled[x]).unwrap_or(last);
                    let (from, to) = (b * BLOCK_SIZE as usize, run_end * BLOCK_SIZE as usize);
                    l.file
                        .read_exact_at(&mut data[from..to], offset + from as u64)
                        .map_err(|e| Error::io(format!("reading {}", l.name), e))?;
                    crate::store::check_blocks(
                        l,
                        offset + from as u64,
                        &data[from..to],
                        &mut crcs[b..run_end],
                        &mut auths[b * auth..run_end * auth],
                    )?;
                    filled[b..run_end].fill(true);
                    left -= run_end - b;
                    b = run_end;
                }
            }
        }
        Ok(buf)
    }
}
