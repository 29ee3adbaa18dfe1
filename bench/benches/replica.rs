//! Replica hot paths: the store's write and read paths, the block index,
//! and frame encode/decode with crc32c.
//!
//! `cargo bench -p rvol-bench` (first build takes minutes on 2 cores).

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use rvol_replica::index::BlockMap;
use rvol_replica::proto::{decode_request, Op, RequestHeader};
use rvol_replica::{BlockIndex, LayerPos, Replica, BLOCK_SIZE};

fn store(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let size = 256u64 << 20;
    let r = Replica::create(dir.path(), size).unwrap();
    let blocks = size / BLOCK_SIZE;
    let data = vec![0x5au8; BLOCK_SIZE as usize];
    let mut g = c.benchmark_group("replica");
    g.throughput(Throughput::Bytes(BLOCK_SIZE));
    let mut i = 0u64;
    g.bench_function("write_4k_random", |b| {
        b.iter(|| {
            i = (i + 7919) % blocks;
            r.write(i * BLOCK_SIZE, &data, 0).unwrap();
        })
    });
    g.bench_function("read_4k_random", |b| {
        b.iter(|| {
            i = (i + 7919) % blocks;
            r.read(i * BLOCK_SIZE, BLOCK_SIZE).unwrap()
        })
    });
    let big = vec![0x33u8; 1 << 20];
    g.throughput(Throughput::Bytes(1 << 20));
    g.bench_function("write_1m_seq", |b| {
        b.iter(|| {
            i = (i + 256) % (blocks - 256);
            r.write(i * BLOCK_SIZE, &big, 0).unwrap();
        })
    });
    g.bench_function("read_1m_seq", |b| {
        b.iter(|| {
            i = (i + 256) % (blocks - 256);
            r.read(i * BLOCK_SIZE, 1 << 20).unwrap()
        })
    });
    g.finish();
}

fn index(c: &mut Criterion) {
    let blocks = 256 * 1024; // 1 GiB
    let mut m = BlockMap::new(blocks);
    for b in (0..blocks).step_by(3) {
        m.set(BlockIndex(b), 1, Some(LayerPos((b % 5) as u32)));
    }
    let mut g = c.benchmark_group("index");
    let mut i = 0u64;
    g.bench_function("get", |b| {
        b.iter(|| {
            i = (i + 7919) % blocks;
            m.get(BlockIndex(i))
        })
    });
    g.bench_function("runs_256_blocks", |b| {
        b.iter(|| {
            i = (i + 7919) % (blocks - 256);
            m.runs(BlockIndex(i), 256).count()
        })
    });
    g.bench_function("set_1_block", |b| {
        b.iter(|| {
            i = (i + 7919) % blocks;
            m.set(BlockIndex(i), 1, Some(LayerPos(9)))
        })
    });
    g.finish();
}

fn frames(c: &mut Criterion) {
    let payload = vec![0xa5u8; BLOCK_SIZE as usize];
    let h = RequestHeader {
        op: Op::Write as u8,
        flags: 0,
        id: 1,
        offset: 0,
        length: BLOCK_SIZE,
        epoch: 0,
        payload_len: 0,
        crc: 0,
    };
    let mut frame = h.encode(&payload).to_vec();
    frame.extend_from_slice(&payload);
    let mut g = c.benchmark_group("frame");
    g.throughput(Throughput::Bytes(BLOCK_SIZE));
    g.bench_function("encode_4k", |b| b.iter(|| h.encode(&payload)));
    g.bench_function("decode_verify_4k", |b| {
        b.iter(|| decode_request(&frame).unwrap().2)
    });
    g.bench_function("clone_frame_4k", |b| {
        b.iter_batched(|| (), |_| frame.clone(), BatchSize::SmallInput)
    });
    g.finish();
}

criterion_group!(benches, store, index, frames);
criterion_main!(benches);
