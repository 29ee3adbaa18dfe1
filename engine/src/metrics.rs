//! The engine's metrics, exposed at the admin API's `/metrics` in the
//! OpenMetrics text format through `prometheus-client`.
//!
//! Two kinds: I/O metrics, counted as requests pass ([`IoMetrics`]), and
//! the volume's state, read from its status at each scrape. Every series
//! carries the `volume` label.
//!
//! # What the I/O path pays
//!
//! Per request: two `Instant::now()`, three relaxed atomic adds (requests,
//! bytes, in flight) and one histogram observation, which takes an
//! uncontended mutex (the engine's runtime has one thread by default).
//! The label set is fixed (one per operation), so no request allocates or
//! looks a label up in a map: each operation's series are created once.

use std::borrow::Cow;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::admin::VolumeStatus;

/// What a frontend asks of the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoOp {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
}

impl IoOp {
    const ALL: [IoOp; 5] = [
        IoOp::Read,
        IoOp::Write,
        IoOp::Flush,
        IoOp::Trim,
        IoOp::WriteZeroes,
    ];

    fn name(self) -> &'static str {
        match self {
            IoOp::Read => "read",
            IoOp::Write => "write",
            IoOp::Flush => "flush",
            IoOp::Trim => "trim",
            IoOp::WriteZeroes => "write_zeroes",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OpLabel {
    op: &'static str,
}

/// One operation's series, resolved once.
#[derive(Clone)]
struct OpSeries {
    requests: Counter,
    errors: Counter,
    bytes: Counter,
    seconds: Histogram,
}

/// The volume's I/O as its frontends ask for it (end to end: from the
/// request reaching the volume to its answer, replicas included).
pub struct IoMetrics {
    requests: Family<OpLabel, Counter>,
    errors: Family<OpLabel, Counter>,
    bytes: Family<OpLabel, Counter>,
    seconds: Family<OpLabel, Histogram>,
    in_flight: Gauge<i64, AtomicI64>,
    ops: [OpSeries; 5],
    /// Round trips of writes and flushes to each replica
    /// ([`crate::slow`]).
    replica_seconds: Family<ReplicaOpLabel, Histogram>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReplicaOpLabel {
    replica: String,
    op: &'static str,
}

fn latency_histogram() -> Histogram {
    // 16 µs to 0.5 s, doubling: a 4 KiB page-cache read on one end, a
    // flush behind a slow disk on the other.
    Histogram::new(exponential_buckets(16e-6, 2.0, 16))
}

type AtomicI64 = std::sync::atomic::AtomicI64;

impl Default for IoMetrics {
    fn default() -> Self {
        let seconds = Family::<OpLabel, Histogram>::new_with_constructor(latency_histogram);
        let (requests, errors, bytes) = (Family::default(), Family::default(), Family::default());
        let ops = IoOp::ALL.map(|op| {
            let l = OpLabel { op: op.name() };
            OpSeries {
                requests: requests.get_or_create_owned(&l),
                errors: errors.get_or_create_owned(&l),
                bytes: bytes.get_or_create_owned(&l),
                seconds: seconds.get_or_create_owned(&l),
            }
        });
        IoMetrics {
            requests,
            errors,
            bytes,
            seconds,
            in_flight: Gauge::default(),
            ops,
            replica_seconds: Family::new_with_constructor(latency_histogram),
        }
    }
}

/// A request being served; counted when [`Request::done`] is called, and
/// out of the in-flight gauge however it ends (a cancelled one too).
pub struct Request<'a> {
    m: &'a IoMetrics,
    op: IoOp,
    start: Instant,
}

impl IoMetrics {
    pub fn begin(&self, op: IoOp) -> Request<'_> {
        self.in_flight.inc();
        Request {
            m: self,
            op,
            start: Instant::now(),
        }
    }

    /// A replica's round-trip histograms: writes, flushes.
    pub fn replica_series(&self, replica: &str) -> [Histogram; 2] {
        ["write", "flush"].map(|op| {
            self.replica_seconds.get_or_create_owned(&ReplicaOpLabel {
                replica: replica.to_string(),
                op,
            })
        })
    }

    /// Adds these series to `registry`.
    fn register(&self, r: &mut Registry) {
        r.register(
            "rvol_replica_request_duration_seconds",
            "Round trips of writes and flushes to each replica, by operation",
            self.replica_seconds.clone(),
        );
        r.register(
            "rvol_volume_requests",
            "Requests the volume answered, by operation",
            self.requests.clone(),
        );
        r.register(
            "rvol_volume_request_errors",
            "Requests the volume answered with an error, by operation",
            self.errors.clone(),
        );
        r.register(
            "rvol_volume_request_bytes",
            "Bytes read, written, trimmed or zeroed by requests that succeeded",
            self.bytes.clone(),
        );
        r.register(
            "rvol_volume_request_duration_seconds",
            "Time from a request reaching the volume to its answer, by operation",
            self.seconds.clone(),
        );
        r.register(
            "rvol_volume_requests_in_flight",
            "Requests being served now",
            self.in_flight.clone(),
        );
    }
}

impl Request<'_> {
    /// Counts the request: `bytes` moved if `ok`.
    pub fn done(self, bytes: u64, ok: bool) {
        let s = &self.m.ops[self.op as usize];
        s.seconds.observe(self.start.elapsed().as_secs_f64());
        s.requests.inc();
        if ok {
            s.bytes.inc_by(bytes);
        } else {
            s.errors.inc();
        }
    }
}

impl Drop for Request<'_> {
    fn drop(&mut self) {
        self.m.in_flight.dec();
    }
}

/// The whole exposition: the I/O metrics and the state in `st`.
pub fn encode(io: &IoMetrics, st: &VolumeStatus) -> String {
    let label = [(Cow::Borrowed("volume"), Cow::Owned(st.volume.clone()))];
    let mut r = Registry::with_labels(label.into_iter());
    io.register(&mut r);
    let gauge = |r: &mut Registry, name: &str, help: &str, v: u64| {
        let g = Gauge::<i64, AtomicI64>::default();
        g.set(i64::try_from(v).unwrap_or(i64::MAX));
        r.register(name, help, g);
    };
    let counter = |r: &mut Registry, name: &str, help: &str, v: u64| {
        let c = Counter::<u64, AtomicU64>::default();
        c.inc_by(v);
        r.register(name, help, c);
    };
    gauge(
        &mut r,
        "rvol_volume_size_bytes",
        "Size of the volume",
        st.size,
    );
    gauge(
        &mut r,
        "rvol_volume_healthy",
        "1 while every replica is RW",
        u64::from(st.state == "healthy"),
    );
    #[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
    struct ReplicaLabel {
        replica: String,
        mode: String,
    }
    let replicas = Family::<ReplicaLabel, Gauge>::default();
    for rep in &st.replicas {
        replicas
            .get_or_create(&ReplicaLabel {
                replica: rep.address.clone(),
                mode: rep.mode.clone(),
            })
            .set(1);
    }
    r.register(
        "rvol_replica_info",
        "Each replica and its mode (RW, WO, ERR)",
        replicas,
    );
    #[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
    struct Replica {
        replica: String,
    }
    let slow = Family::<Replica, Gauge>::default();
    for rep in &st.replicas {
        slow.get_or_create(&Replica {
            replica: rep.address.clone(),
        })
        .set(i64::from(rep.slow.is_some()));
    }
    r.register(
        "rvol_replica_slow",
        "1 while a replica is far slower than its peers (see rvol volume status)",
        slow,
    );
    let failures = Family::<Replica, Counter>::default();
    for rep in &st.replicas {
        failures
            .get_or_create(&Replica {
                replica: rep.address.clone(),
            })
            .inc_by(rep.failures);
    }
    r.register(
        "rvol_replica_failures",
        "Times an error put each replica out of the set",
        failures,
    );
    counter(
        &mut r,
        "rvol_rebuilt_bytes",
        "Bytes copied by finished rebuilds",
        st.rebuilt_bytes,
    );
    gauge(
        &mut r,
        "rvol_rebuild_in_progress",
        "1 while a rebuild runs",
        u64::from(st.rebuild.is_some()),
    );
    counter(
        &mut r,
        "rvol_purged_bytes",
        "Bytes of removed snapshot layers purged",
        st.purged_bytes,
    );
    counter(
        &mut r,
        "rvol_checksum_errors",
        "Blocks found not matching their checksums or, encrypted, their tags (reads and scrubs)",
        st.checksum_errors,
    );
    counter(
        &mut r,
        "rvol_stored_crc_rereads",
        "Large reads sent from a replica's files that failed their recorded checksums and were read again verified",
        st.stored_crc_rereads,
    );
    counter(
        &mut r,
        "rvol_direct_read_bytes",
        "Bytes read from the files of replica processes on this node instead of through their sockets",
        st.direct_read_bytes,
    );
    if let Some(b) = &st.backup {
        let p = &b.progress;
        gauge(
            &mut r,
            "rvol_backup_in_progress",
            "1 while a backup runs",
            u64::from(b.state == crate::backup::BackupState::Running),
        );
        gauge(
            &mut r,
            "rvol_backup_read_bytes",
            "Bytes the running (or last) backup read from the replicas",
            p.read,
        );
        gauge(
            &mut r,
            "rvol_backup_to_read_bytes",
            "Bytes the running (or last) backup has to read",
            p.to_read,
        );
        gauge(
            &mut r,
            "rvol_backup_uploaded_bytes",
            "Compressed bytes the running (or last) backup uploaded",
            p.bytes_uploaded,
        );
        gauge(
            &mut r,
            "rvol_backup_failed",
            "1 if the last backup failed",
            u64::from(b.state == crate::backup::BackupState::Failed),
        );
    }
    gauge(
        &mut r,
        "rvol_reconciled_bytes",
        "Bytes copied at start to reconcile replicas after an unclean stop",
        st.reconciled_bytes,
    );
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &r);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_counted_by_operation_and_leave_the_gauge_however_they_end() {
        let m = IoMetrics::default();
        m.begin(IoOp::Write).done(4096, true);
        m.begin(IoOp::Write).done(4096, false);
        m.begin(IoOp::Read).done(8192, true);
        let pending = m.begin(IoOp::Flush);
        assert_eq!(m.in_flight.get(), 1);
        drop(pending);
        assert_eq!(m.in_flight.get(), 0);
        let mut r = Registry::default();
        m.register(&mut r);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &r).unwrap();
        for line in [
            "rvol_volume_requests_total{op=\"write\"} 2",
            "rvol_volume_request_errors_total{op=\"write\"} 1",
            "rvol_volume_request_bytes_total{op=\"write\"} 4096",
            "rvol_volume_request_bytes_total{op=\"read\"} 8192",
            "rvol_volume_request_duration_seconds_count{op=\"read\"} 1",
            "rvol_volume_requests_total{op=\"flush\"} 0",
            "rvol_volume_requests_in_flight 0",
        ] {
            assert!(text.contains(line), "{line} in:\n{text}");
        }
    }
}
