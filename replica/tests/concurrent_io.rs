//! Reads that run beside writes to the same blocks, on other threads: a
//! FUA write runs on the blocking pool while reads run in the connection
//! task, and a replica process or an engine may run several runtime
//! threads. Such a read may return the old or the new data of each block,
//! as NBD allows, but never a torn block, and never a checksum error: that
//! would have a healthy replica taken out as rotten.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rvol_replica::{Replica, BLOCK_SIZE};

const LEN: usize = 1 << 20;

#[test]
fn a_read_beside_a_write_to_the_same_blocks_sees_whole_blocks_and_no_checksum_error() {
    let dir = tempfile::tempdir().unwrap();
    let replica = Arc::new(Replica::create(dir.path(), 16 << 20).unwrap());
    replica.write(0, &vec![0u8; LEN], 0).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (replica, stop) = (replica.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut fill = 1u8;
            while !stop.load(Ordering::Relaxed) {
                replica.write(0, &vec![fill; LEN], 0).unwrap();
                fill = fill.wrapping_add(1).max(1);
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut reads = 0u64;
    let outcome = loop {
        if Instant::now() > deadline {
            break Ok(());
        }
        match replica.read_with_crc(0, LEN as u64) {
            Err(e) => break Err(format!("read {reads}: {e}")),
            Ok((data, _)) => {
                for (i, block) in data.chunks(BLOCK_SIZE as usize).enumerate() {
                    assert!(
                        block.iter().all(|&b| b == block[0]),
                        "read {reads}: block {i} is torn"
                    );
                }
            }
        }
        reads += 1;
    };
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    outcome.unwrap();
    assert!(reads > 100, "only {reads} reads ran beside the writes");
}
