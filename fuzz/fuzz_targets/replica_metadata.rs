//! The replica's metadata parsers on arbitrary bytes: never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rvol_replica::meta::{LayerMeta, ReplicaMeta};
use rvol_replica::state::StateRecord;

fuzz_target!(|data: &[u8]| {
    let _ = ReplicaMeta::parse(data);
    let _ = LayerMeta::parse(data);
    let _ = StateRecord::decode(data);
});
