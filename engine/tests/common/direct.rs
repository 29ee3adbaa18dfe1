//! Talking to one `rvol replica` process directly, as an engine would.

use std::path::Path;

use rvol_replica::client::ReplicaClient;
use rvol_replica::server::Endpoint;
use rvol_replica::{Generation, Owner, BLOCK_SIZE};
use uuid::Uuid;

use super::{pseudo_random, Proc};

pub const VOLUME: Uuid = Uuid::from_u128(0x1234);

pub fn sock(dir: &Path) -> String {
    format!("unix:{}", dir.join("r.sock").display())
}

pub fn start_replica(dir: &Path, sock: &str, size: &str) -> Proc {
    Proc::start(&[
        "replica",
        "--dir",
        dir.join("data").to_str().unwrap(),
        "--listen",
        sock,
        "--size",
        size,
    ])
}

pub async fn connect(
    ep: &str,
    generation: u64,
    engine_id: u64,
) -> Result<ReplicaClient, rvol_replica::client::ClientError> {
    let ep: Endpoint = ep.parse().unwrap();
    let owner = Owner {
        generation: Generation(generation),
        engine_id,
    };
    ReplicaClient::connect(&ep, VOLUME, owner, 2)
        .await
        .map(|(c, _)| c)
}

/// Block contents that name the write that produced them.
pub fn block_for(id: u64, block: u64) -> Vec<u8> {
    let mut b = pseudo_random(id.wrapping_mul(0x9e37_79b9) ^ block, BLOCK_SIZE as usize);
    b[..8].copy_from_slice(&id.to_le_bytes());
    b[8..16].copy_from_slice(&block.to_le_bytes());
    b
}

pub fn id_of(data: &[u8], block: u64) -> Option<u64> {
    if data.iter().all(|&b| b == 0) {
        return None;
    }
    let id = u64::from_le_bytes(data[..8].try_into().unwrap());
    assert_eq!(
        data,
        &block_for(id, block)[..],
        "block {block} holds a torn or foreign write"
    );
    Some(id)
}
