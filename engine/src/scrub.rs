//! Checking every replica's data against its checksums on demand
//! (`rvol snapshot verify`): each RW replica reads every block of every
//! layer it holds; one with blocks that fail is taken out of the set and
//! rebuilt, which rewrites the differing chunks from a good replica.

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use crate::volume::{Mode, ReplicatedVolume};

/// One replica's scrub.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplicaScrub {
    pub address: String,
    pub blocks_checked: u64,
    pub bad_blocks: u64,
    /// The first failing blocks, as `(layer, byte offset)`.
    pub bad: Vec<(String, u64)>,
    pub error: Option<String>,
}

impl ReplicatedVolume {
    /// Scrubs the RW replicas one after the other. No timeout: a scrub
    /// reads everything the replica holds.
    pub async fn scrub(&self) -> Vec<ReplicaScrub> {
        let mut out = Vec::new();
        for slot in self.slots() {
            let Some(client) = slot.current_client().filter(|_| slot.mode() == Mode::RW) else {
                continue;
            };
            let mut r = ReplicaScrub {
                address: slot.endpoint.to_string(),
                blocks_checked: 0,
                bad_blocks: 0,
                bad: Vec::new(),
                error: None,
            };
            match client.scrub().await {
                Ok(report) => {
                    r.blocks_checked = report.blocks_checked;
                    r.bad_blocks = report.bad_blocks;
                    r.bad = report.bad;
                    if r.bad_blocks > 0 {
                        self.checksum_errors
                            .fetch_add(r.bad_blocks, Ordering::Relaxed);
                        tracing::error!(replica = %slot.endpoint, bad_blocks = r.bad_blocks, "scrub: blocks fail their checksums; rebuilding the replica");
                        self.leave(
                            &slot,
                            &format!(
                                "scrub: {} blocks fail their checksums, being repaired",
                                r.bad_blocks
                            ),
                        );
                    }
                }
                Err(e) => r.error = Some(e.to_string()),
            }
            out.push(r);
        }
        out
    }
}
