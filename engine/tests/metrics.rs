//! The engine's metrics against a real client's own count and a real
//! parser: fio sends 4 KiB writes, flushes and reads through NBD and
//! reports how many; `/metrics`, parsed by the Prometheus Python client's
//! OpenMetrics parser (which rejects a malformed exposition), must count
//! the same.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Stdio};

use common::*;

/// Parses an exposition with `prometheus_client`'s OpenMetrics parser;
/// returns each sample's value by its name and sorted labels.
fn parse(exposition: &str) -> HashMap<String, f64> {
    let script = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "volume")
        out[f"{s.name}{{{labels}}}"] = s.value
print(json.dumps(out))
"#;
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the exposition does not parse: {}\n{exposition}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// fio's JSON report of one job on the volume.
fn fio(uri: &str, args: &[&str]) -> serde_json::Value {
    let mut all = vec![
        "--name=m",
        "--ioengine=nbd",
        "--output-format=json",
        "--bs=4k",
        "--size=32M",
    ];
    let u = format!("--uri={uri}");
    all.push(&u);
    all.extend_from_slice(args);
    let out = run_ok("fio", &all);
    // fio may say something before its report.
    let report = &out[out.find("\n{").map_or(0, |i| i + 1)..];
    let v: serde_json::Value = serde_json::from_str(report).expect("fio JSON");
    v["jobs"][0].clone()
}

#[test]
fn the_io_metrics_count_what_fio_did_and_parse_as_openmetrics() {
    let tmp = tempfile::tempdir().unwrap();
    let rs = three_replicas(tmp.path(), "64M");
    let (_engine, uri, admin) = start_engine("met", "64M", &addrs(&rs), &[]);
    let before = parse(&http_get(&admin, "/metrics"));
    let w = fio(
        &uri,
        &[
            "--rw=randwrite",
            "--number_ios=3000",
            "--iodepth=8",
            "--fsync=100",
        ],
    );
    let r = fio(&uri, &["--rw=randread", "--number_ios=2000", "--iodepth=8"]);
    let after = parse(&http_get(&admin, "/metrics"));
    let delta =
        |k: &str| after.get(k).copied().unwrap_or(0.0) - before.get(k).copied().unwrap_or(0.0);
    let n = |v: &serde_json::Value| v.as_f64().unwrap();
    for (op, fio_ios, fio_bytes) in [
        (
            "write",
            n(&w["write"]["total_ios"]),
            n(&w["write"]["io_bytes"]),
        ),
        (
            "read",
            n(&r["read"]["total_ios"]),
            n(&r["read"]["io_bytes"]),
        ),
    ] {
        let requests = delta(&format!("rvol_volume_requests_total{{op={op}}}"));
        let bytes = delta(&format!("rvol_volume_request_bytes_total{{op={op}}}"));
        let timed = delta(&format!(
            "rvol_volume_request_duration_seconds_count{{op={op}}}"
        ));
        assert!(fio_ios > 1000.0, "fio did {fio_ios} {op}s");
        assert!(
            (requests - fio_ios).abs() <= fio_ios * 0.01,
            "{op}: {requests} counted, fio {fio_ios}"
        );
        assert!(
            (bytes - fio_bytes).abs() <= fio_bytes * 0.01,
            "{op}: {bytes} B counted, fio {fio_bytes}"
        );
        assert_eq!(timed, requests, "{op}: every request is in the histogram");
        assert_eq!(
            delta(&format!("rvol_volume_request_errors_total{{op={op}}}")),
            0.0
        );
    }
    let flushes = delta("rvol_volume_requests_total{op=flush}");
    let fio_syncs = n(&w["sync"]["total_ios"]);
    assert!(fio_syncs >= 29.0, "fio flushed {fio_syncs} times");
    assert!(
        (flushes - fio_syncs).abs() <= 1.0,
        "{flushes} flushes counted, fio {fio_syncs}"
    );
    // Each replica got every write and flush, and its histograms say so.
    for a in addrs(&rs) {
        let writes = delta(&format!(
            "rvol_replica_request_duration_seconds_count{{op=write,replica={a}}}"
        ));
        assert!(
            writes >= n(&w["write"]["total_ios"]),
            "replica {a}: {writes} writes timed"
        );
    }
    assert_eq!(after.get("rvol_volume_requests_in_flight{}"), Some(&0.0));
}
