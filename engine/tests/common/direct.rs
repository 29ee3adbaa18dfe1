//! Talking to one `rvol replica` process directly, as an engine would.

use std::path::Path;

use rvol_replica::client::{Links, ReplicaClient};
use rvol_replica::server::Endpoint;
use rvol_replica::{Generation, Owner};
use uuid::Uuid;

use super::Proc;

pub const VOLUME: Uuid = Uuid::from_u128(0x1234);

/// A HELLO frame as an engine of `volume` with `generation` sends it (0:
/// a probe), for tests that speak the wire protocol byte by byte.
pub fn hello_frame(volume: Uuid, generation: u64, engine_id: u64) -> Vec<u8> {
    rvol_replica::proto::Hello {
        protocol_version: rvol_replica::proto::PROTOCOL_VERSION,
        session: 0,
        volume_uuid: volume,
        generation,
        engine_id,
        encryption: None,
    }
    .frame()
}

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
    connect_with(ep, generation, engine_id, 2.into()).await
}

pub async fn connect_with(
    ep: &str,
    generation: u64,
    engine_id: u64,
    links: Links,
) -> Result<ReplicaClient, rvol_replica::client::ClientError> {
    let ep: Endpoint = ep.parse().unwrap();
    let owner = Owner {
        generation: Generation(generation),
        engine_id,
    };
    ReplicaClient::connect(&ep, VOLUME, owner, links)
        .await
        .map(|(c, _)| c)
}
