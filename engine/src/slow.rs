//! Slow replicas: found by comparing each replica with its peers, and
//! taken out of the set if asked.
//!
//! A write is acknowledged when every writable replica has it, so the
//! slowest replica sets the volume's write latency. A dying disk (retrying
//! sectors, a throttled cloud volume, a degraded RAID) or a lossy link
//! drags every write down while the replica still answers, so no timeout
//! fires. Absolute thresholds cannot tell that from a busy node: every
//! replica is slow then. What tells it is one replica against its peers,
//! on the same requests: every writable replica receives each write and
//! flush at the same moment, so their round trips compare like for like.
//!
//! - Each replica's round trips of writes and flushes are timed (and kept
//!   as a histogram per replica in the metrics).
//! - At every check (the engine's 2 s maintenance tick) each RW replica's
//!   mean over the window since the last check is compared with the
//!   median of its RW peers' means. A window with fewer than
//!   [`MIN_SAMPLES`] round trips says nothing.
//! - A replica at least `factor` times its peers and `min` above them in
//!   every window for `sustain` is slow: reported in status, in metrics
//!   and once in the log, with the figures; one window below that clears
//!   it (logged too).
//! - With eviction on, the slowest slow replica leaves the set (set to
//!   ERR, as a failed one) and is marked evicted, so the engine does not
//!   rebuild it back; a cluster replaces it like a failed replica; `rvol
//!   replica rm` and `add` bring it back by hand. Never the last RW
//!   replica (at least two must be RW), and never a second while an
//!   evicted one is still in the set: the volume keeps one fewer copy
//!   only once at a time.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use prometheus_client::metrics::histogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::events::EventKind;
use crate::metrics::IoMetrics;
use crate::volume::{Mode, ReplicaSlot, ReplicatedVolume};

/// Round trips a window needs before its mean counts.
pub const MIN_SAMPLES: u64 = 16;

/// When a replica counts as slow, and what then happens.
#[derive(Debug, Clone)]
pub struct SlowPolicy {
    /// Its mean round trip is at least this many times its peers'...
    pub factor: f64,
    /// ...and at least this much above it...
    pub min: Duration,
    /// ...in every window for this long.
    pub sustain: Duration,
    /// Take a slow replica out of the set.
    pub evict: bool,
}

impl Default for SlowPolicy {
    fn default() -> Self {
        SlowPolicy {
            factor: 4.0,
            min: Duration::from_millis(5),
            sustain: Duration::from_secs(20),
            evict: false,
        }
    }
}

/// What status says of a slow replica.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SlowReport {
    /// Its mean round trip of writes and flushes in the last window, and
    /// the median of its peers'.
    pub mean_ms: f64,
    pub peers_ms: f64,
    /// How long it has been slow.
    pub for_secs: u64,
    pub evicted: bool,
}

/// The requests that every writable replica receives at once.
#[derive(Debug, Clone, Copy)]
pub enum Timed {
    Write,
    Flush,
}

/// One replica's timing.
#[derive(Default)]
pub struct ReplicaTiming {
    sum_ns: AtomicU64,
    count: AtomicU64,
    /// The last window's mean, in ms (for status).
    last_ms: Mutex<Option<f64>>,
    slow_since: Mutex<Option<Instant>>,
    report: Mutex<Option<SlowReport>>,
    evicted: AtomicBool,
    /// Its histograms (write, flush), resolved on first use.
    series: OnceLock<[Histogram; 2]>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ReplicaTiming {
    pub fn record(&self, io: &IoMetrics, replica: &dyn fmt::Display, what: Timed, took: Duration) {
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        let series = self
            .series
            .get_or_init(|| io.replica_series(&replica.to_string()));
        series[what as usize].observe(took.as_secs_f64());
    }

    /// The mean round trip since the last call, in seconds, if there were
    /// enough; starts a new window.
    fn take_window(&self) -> Option<f64> {
        let n = self.count.swap(0, Ordering::Relaxed);
        let sum = self.sum_ns.swap(0, Ordering::Relaxed);
        let mean = (n >= MIN_SAMPLES).then(|| sum as f64 / n as f64 / 1e9);
        *lock(&self.last_ms) = mean.map(|m| m * 1e3);
        mean
    }

    pub fn last_ms(&self) -> Option<f64> {
        *lock(&self.last_ms)
    }

    pub fn report(&self) -> Option<SlowReport> {
        lock(&self.report).clone()
    }

    pub fn evicted(&self) -> bool {
        self.evicted.load(Ordering::Acquire)
    }

    /// Takes one window's verdict; returns the report if the replica has
    /// just turned slow, and whether it has just recovered.
    fn update(&self, slow_now: bool, mean: f64, peers: f64, p: &SlowPolicy) -> Change {
        let mut since = lock(&self.slow_since);
        let mut report = lock(&self.report);
        if !slow_now {
            *since = None;
            return match report.take() {
                Some(_) => Change::Recovered,
                None => Change::None,
            };
        }
        let start = *since.get_or_insert_with(Instant::now);
        if start.elapsed() < p.sustain {
            return Change::None;
        }
        let was = report.is_some();
        let r = SlowReport {
            mean_ms: mean * 1e3,
            peers_ms: peers * 1e3,
            for_secs: start.elapsed().as_secs(),
            evicted: self.evicted(),
        };
        *report = Some(r.clone());
        if was {
            Change::None
        } else {
            Change::Slow(r)
        }
    }
}

enum Change {
    None,
    Slow(SlowReport),
    Recovered,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

impl ReplicatedVolume {
    /// One check; see the module documentation.
    pub fn check_slow(&self, p: &SlowPolicy) {
        let slots = self.slots();
        let (mut rw, mut means): (Vec<&Arc<ReplicaSlot>>, Vec<Option<f64>>) = (vec![], vec![]);
        for s in &slots {
            // Every window restarts, an ERR or WO replica's too.
            let mean = s.timing.take_window();
            if s.mode() == Mode::RW {
                rw.push(s);
                means.push(mean);
            }
        }
        for (i, slot) in rw.iter().enumerate() {
            let Some(mine) = means[i] else { continue };
            let peers: Vec<f64> = (0..rw.len())
                .filter(|&j| j != i)
                .filter_map(|j| means[j])
                .collect();
            if peers.is_empty() {
                continue;
            }
            let peers = median(peers);
            let slow_now = mine >= p.factor * peers && mine - peers >= p.min.as_secs_f64();
            let replica = Some(slot.endpoint.to_string());
            match slot.timing.update(slow_now, mine, peers, p) {
                Change::Slow(r) => {
                    tracing::warn!(
                        replica = %slot.endpoint,
                        mean_ms = r.mean_ms,
                        peers_ms = r.peers_ms,
                        for_secs = r.for_secs,
                        "replica is slow: its writes and flushes take far longer than its peers'"
                    );
                    self.events.push(
                        EventKind::ReplicaSlow,
                        replica,
                        format!(
                            "slow: {:.1} ms per write or flush against its peers' {:.1} ms for {} s",
                            r.mean_ms, r.peers_ms, r.for_secs
                        ),
                    );
                }
                Change::Recovered => {
                    tracing::info!(replica = %slot.endpoint, "replica is no longer slow");
                    self.events
                        .push(EventKind::ReplicaRecovered, replica, "no longer slow");
                }
                Change::None => {}
            }
        }
        if !p.evict || rw.len() < 2 || slots.iter().any(|s| s.timing.evicted()) {
            return;
        }
        let slowest = rw
            .iter()
            .filter_map(|s| s.timing.report().map(|r| (s, r)))
            .max_by(|a, b| a.1.mean_ms.total_cmp(&b.1.mean_ms));
        if let Some((slot, r)) = slowest {
            slot.timing.evicted.store(true, Ordering::Release);
            if let Some(rep) = lock(&slot.timing.report).as_mut() {
                rep.evicted = true;
            }
            let why = format!(
                "evicted as slow: {:.1} ms per write or flush against its peers' {:.1} ms for {} s",
                r.mean_ms, r.peers_ms, r.for_secs
            );
            tracing::warn!(replica = %slot.endpoint, "{why}");
            self.events.push(
                EventKind::ReplicaEvicted,
                Some(slot.endpoint.to_string()),
                why.clone(),
            );
            self.leave(slot, &why);
        }
    }
}
