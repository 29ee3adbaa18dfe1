//! The block index: for every 4 KiB block, the newest layer that holds it.
//!
//! Reads consult the index instead of probing each layer file, so their cost
//! does not depend on the length of the snapshot chain. The index is built
//! when a replica opens (from the layer files' allocation, SEEK_DATA and
//! SEEK_HOLE) and kept current by every write, trim and write-zeroes.
//!
//! # Memory
//!
//! The volume is cut into chunks of [`CHUNK_BLOCKS`] blocks (4 MiB). A chunk
//! whose blocks all resolve to the same thing (all holes, or all one layer)
//! costs only its 16-byte slot. A mixed chunk stores one byte per block, an
//! index into a per-chunk palette of at most 256 values (the hole included),
//! so a fully mixed volume costs a little over one byte per block, whatever
//! the number of layers. Only a chunk whose 1024 blocks span more than 256
//! distinct layers falls back to two bytes per block ([`Chunk::Wide`]); that
//! bounds the cost at two bytes per block for any chain up to 65,535 layers.

use crate::ids::{BlockIndex, LayerPos};

/// Blocks per chunk (4 MiB of volume).
pub const CHUNK_BLOCKS: u64 = 1024;

const HOLE: u32 = u32::MAX;

/// What a block resolves to: `None` is a hole (reads as zeros).
pub type Entry = Option<LayerPos>;

fn raw(e: Entry) -> u32 {
    e.map_or(HOLE, |p| p.0)
}

fn entry(r: u32) -> Entry {
    (r != HOLE).then_some(LayerPos(r))
}

enum Chunk {
    /// Every block resolves to the same entry (`HOLE` for an untouched chunk).
    Uniform(u32),
    /// One byte per block indexing `palette`.
    Mixed(Box<Mixed>),
    /// More than 256 distinct entries: the raw entry per block.
    Wide(Box<[u32]>),
}

struct Mixed {
    palette: Vec<u32>,
    slots: Box<[u8]>,
}

impl Mixed {
    fn get(&self, i: usize) -> u32 {
        self.palette[self.slots[i] as usize]
    }

    /// Palette slot for `value`, adding it (after dropping unused values if
    /// the palette is full). `None` when 256 distinct values are all in use.
    fn slot_for(&mut self, value: u32) -> Option<u8> {
        if let Some(s) = self.palette.iter().position(|&v| v == value) {
            return Some(s as u8);
        }
        if self.palette.len() == 256 {
            self.compact();
        }
        if self.palette.len() == 256 {
            return None;
        }
        self.palette.push(value);
        Some((self.palette.len() - 1) as u8)
    }

    fn compact(&mut self) {
        let mut used = [false; 256];
        for &s in self.slots.iter() {
            used[s as usize] = true;
        }
        let mut remap = [0u8; 256];
        let mut palette = Vec::with_capacity(self.palette.len());
        for (old, &v) in self.palette.iter().enumerate() {
            if used[old] {
                remap[old] = palette.len() as u8;
                palette.push(v);
            }
        }
        for s in self.slots.iter_mut() {
            *s = remap[*s as usize];
        }
        self.palette = palette;
    }
}

/// Index over a whole volume; see the module documentation.
pub struct BlockMap {
    blocks: u64,
    chunks: Vec<Chunk>,
}

impl BlockMap {
    /// An index of `blocks` blocks, all holes.
    pub fn new(blocks: u64) -> Self {
        let n = blocks.div_ceil(CHUNK_BLOCKS) as usize;
        let mut chunks = Vec::with_capacity(n);
        chunks.resize_with(n, || Chunk::Uniform(HOLE));
        BlockMap { blocks, chunks }
    }

    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Grows the index to `blocks`; the new blocks are holes.
    pub fn grow(&mut self, blocks: u64) {
        if blocks <= self.blocks {
            return;
        }
        let n = blocks.div_ceil(CHUNK_BLOCKS) as usize;
        self.chunks.resize_with(n, || Chunk::Uniform(HOLE));
        self.blocks = blocks;
    }

    pub fn get(&self, b: BlockIndex) -> Entry {
        let (c, i) = split(b.0);
        entry(match &self.chunks[c] {
            Chunk::Uniform(v) => *v,
            Chunk::Mixed(m) => m.get(i),
            Chunk::Wide(w) => w[i],
        })
    }

    /// Sets blocks `[start, start + count)` to `e`. The range must lie in
    /// the volume.
    pub fn set(&mut self, start: BlockIndex, count: u64, e: Entry) {
        assert!(start.0 + count <= self.blocks, "index range out of volume");
        let value = raw(e);
        let mut b = start.0;
        let end = start.0 + count;
        while b < end {
            let (c, i) = split(b);
            let n = (CHUNK_BLOCKS - i as u64).min(end - b) as usize;
            set_in_chunk(&mut self.chunks[c], i, n, value);
            b += n as u64;
        }
    }

    /// Sets the blocks of `[start, start + count)` that resolve to `from`
    /// to `to`, leaving the others as they are.
    pub fn replace(&mut self, start: BlockIndex, count: u64, from: Entry, to: Entry) {
        let runs: Vec<_> = self
            .runs(start, count)
            .filter(|&(_, _, e)| e == from)
            .collect();
        for (b, n, _) in runs {
            self.set(b, n, to);
        }
    }

    /// Renumbers entries after layer `pos` leaves the chain: positions above
    /// it move down by one. No block may still resolve to `pos`.
    pub fn remove_layer(&mut self, pos: LayerPos) {
        let shift = |v: &mut u32| {
            if *v != HOLE && *v > pos.0 {
                *v -= 1;
            }
        };
        for c in &mut self.chunks {
            match c {
                Chunk::Uniform(v) => shift(v),
                // A palette may keep an unused `pos`; a duplicate value
                // after the shift is harmless.
                Chunk::Mixed(m) => m.palette.iter_mut().for_each(shift),
                Chunk::Wide(w) => w.iter_mut().for_each(shift),
            }
        }
    }

    /// Runs of equal entries covering `[start, start + count)`, in order.
    pub fn runs(&self, start: BlockIndex, count: u64) -> Runs<'_> {
        Runs {
            map: self,
            next: start.0,
            end: start.0 + count,
        }
    }

    /// Heap and inline bytes used by the index.
    pub fn memory_bytes(&self) -> usize {
        let mut total =
            std::mem::size_of::<Self>() + self.chunks.capacity() * std::mem::size_of::<Chunk>();
        for c in &self.chunks {
            total += match c {
                Chunk::Uniform(_) => 0,
                Chunk::Mixed(m) => {
                    std::mem::size_of::<Mixed>() + m.slots.len() + m.palette.capacity() * 4
                }
                Chunk::Wide(w) => w.len() * 4,
            };
        }
        total
    }
}

fn split(b: u64) -> (usize, usize) {
    ((b / CHUNK_BLOCKS) as usize, (b % CHUNK_BLOCKS) as usize)
}

fn set_in_chunk(chunk: &mut Chunk, i: usize, n: usize, value: u32) {
    if n == CHUNK_BLOCKS as usize {
        *chunk = Chunk::Uniform(value);
        return;
    }
    match chunk {
        Chunk::Uniform(v) if *v == value => {}
        Chunk::Uniform(v) => {
            let old = *v;
            let mut m = Mixed {
                palette: vec![old, value],
                slots: vec![0u8; CHUNK_BLOCKS as usize].into_boxed_slice(),
            };
            m.slots[i..i + n].fill(1);
            *chunk = Chunk::Mixed(Box::new(m));
        }
        Chunk::Mixed(m) => match m.slot_for(value) {
            Some(s) => m.slots[i..i + n].fill(s),
            None => {
                let mut wide: Box<[u32]> = (0..CHUNK_BLOCKS as usize).map(|k| m.get(k)).collect();
                wide[i..i + n].fill(value);
                *chunk = Chunk::Wide(wide);
            }
        },
        Chunk::Wide(w) => w[i..i + n].fill(value),
    }
}

/// Iterator over `(first block, block count, entry)` runs; see [`BlockMap::runs`].
pub struct Runs<'a> {
    map: &'a BlockMap,
    next: u64,
    end: u64,
}

impl Iterator for Runs<'_> {
    type Item = (BlockIndex, u64, Entry);

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.end {
            return None;
        }
        let start = self.next;
        let first = self.map.get(BlockIndex(start));
        let mut b = start + 1;
        while b < self.end {
            let (c, i) = split(b);
            // Whole uniform chunks are skipped in one step.
            if i == 0 {
                if let Chunk::Uniform(v) = &self.map.chunks[c] {
                    if entry(*v) == first {
                        b = (b + CHUNK_BLOCKS).min(self.end);
                        continue;
                    }
                }
            }
            if self.map.get(BlockIndex(b)) != first {
                break;
            }
            b += 1;
        }
        self.next = b;
        Some((BlockIndex(start), b - start, first))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_and_runs() {
        let mut m = BlockMap::new(5000);
        assert_eq!(m.get(BlockIndex(4999)), None);
        m.set(BlockIndex(10), 2000, Some(LayerPos(3)));
        m.set(BlockIndex(500), 1, Some(LayerPos(7)));
        m.set(BlockIndex(501), 1, None);
        assert_eq!(m.get(BlockIndex(9)), None);
        assert_eq!(m.get(BlockIndex(10)), Some(LayerPos(3)));
        assert_eq!(m.get(BlockIndex(500)), Some(LayerPos(7)));
        assert_eq!(m.get(BlockIndex(501)), None);
        assert_eq!(m.get(BlockIndex(2009)), Some(LayerPos(3)));
        assert_eq!(m.get(BlockIndex(2010)), None);
        let runs: Vec<_> = m.runs(BlockIndex(0), 5000).collect();
        assert_eq!(
            runs,
            vec![
                (BlockIndex(0), 10, None),
                (BlockIndex(10), 490, Some(LayerPos(3))),
                (BlockIndex(500), 1, Some(LayerPos(7))),
                (BlockIndex(501), 1, None),
                (BlockIndex(502), 1508, Some(LayerPos(3))),
                (BlockIndex(2010), 2990, None),
            ]
        );
    }

    #[test]
    fn more_than_256_layers_in_one_chunk() {
        let mut m = BlockMap::new(CHUNK_BLOCKS);
        for b in 0..CHUNK_BLOCKS {
            m.set(BlockIndex(b), 1, Some(LayerPos(b as u32)));
        }
        for b in 0..CHUNK_BLOCKS {
            assert_eq!(m.get(BlockIndex(b)), Some(LayerPos(b as u32)));
        }
    }

    #[test]
    fn palette_compaction_reuses_freed_values() {
        let mut m = BlockMap::new(CHUNK_BLOCKS);
        // 10,000 layers written one after another over the same two blocks
        // never need more than a handful of palette values.
        for l in 0..10_000u32 {
            m.set(BlockIndex(1), 2, Some(LayerPos(l)));
        }
        assert!(matches!(m.chunks[0], Chunk::Mixed(_)));
        assert_eq!(m.get(BlockIndex(2)), Some(LayerPos(9_999)));
        assert_eq!(m.get(BlockIndex(3)), None);
    }

    #[test]
    fn memory_is_about_a_byte_per_block_when_mixed() {
        let blocks = 256 * 1024; // 1 GiB
        let mut m = BlockMap::new(blocks);
        for b in (0..blocks).step_by(2) {
            m.set(BlockIndex(b), 1, Some(LayerPos((b % 7) as u32)));
        }
        let per_block = m.memory_bytes() as f64 / blocks as f64;
        assert!(per_block < 1.1, "{per_block} bytes per block");
        let sparse = BlockMap::new(blocks);
        assert!(sparse.memory_bytes() < 8 * 1024);
    }
}
