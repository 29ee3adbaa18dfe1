//! The engine's metrics against a real client's own count and a real
//! parser: fio sends 4 KiB writes, flushes and reads through NBD and
//! reports how many; `/metrics`, parsed by the Prometheus Python client's
//! OpenMetrics parser (which rejects a malformed exposition), must count
//! the same.

mod common;

use std::time::Duration;

use common::*;

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
    let before = parse_openmetrics(&http_get(&admin, "/metrics"));
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
    let after = parse_openmetrics(&http_get(&admin, "/metrics"));
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

/// The control plane's metrics, scraped from a real controller and agent
/// and parsed by the same OpenMetrics parser, follow the cluster: a
/// healthy volume, then a node lost (degraded, the node away), then etcd
/// gone (the controller still answers, saying the store is down).
#[test]
fn the_control_plane_metrics_follow_the_cluster_and_parse_as_openmetrics() {
    use common::cluster::Cluster;
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Cluster::local(tmp.path(), &[("n1", "za"), ("n2", "zb")], "10m");
    c.ok(&["volume", "create", "m", "--size", "64M", "--replicas", "2"]);
    let uri = c.attach("m", 0);
    // Some I/O, for the per-replica series to exist.
    c.qemu_io(0, &uri, &["write 0 1M", "flush"]);
    let controller = c.url.split(',').next().unwrap().to_string();
    let scrape =
        |url: &str| parse_openmetrics(&run_ok("curl", &["-sf", &format!("{url}/metrics")]));
    let nodes = c.json(&["node", "ls", "--json"]);
    let agent = format!("http://{}", nodes[0]["address"].as_str().unwrap());

    wait_until(
        "the controller to count the volume healthy",
        Duration::from_secs(20),
        || scrape(&controller).get("rvol_cluster_volumes{state=healthy}") == Some(&1.0),
    );
    let m = scrape(&controller);
    for (series, want) in [
        ("rvol_cluster_nodes{state=alive}", 2.0),
        ("rvol_cluster_nodes{state=away}", 0.0),
        ("rvol_cluster_volumes{state=degraded}", 0.0),
        ("rvol_cluster_replicas{node=n1}", 1.0),
        ("rvol_cluster_replicas{node=n2}", 1.0),
        ("rvol_controller_leading{}", 1.0),
        ("rvol_cluster_store_up{}", 1.0),
        ("rvol_controller_reconcile_errors_total{}", 0.0),
    ] {
        assert_eq!(m.get(series), Some(&want), "{series}: {m:#?}");
    }
    assert!(m["rvol_controller_reconcile_passes_total{}"] > 0.0);
    assert!(m["rvol_controller_reconcile_duration_seconds_count{}"] > 0.0);
    let disk = format!("{}", c.nodes[0].disk.display());
    assert!(
        m[&format!("rvol_node_disk_capacity_bytes{{disk={disk},node=n1}}")] > 0.0,
        "{m:#?}"
    );

    // Every series the Grafana dashboard plots is one these processes
    // export (the engine's too, on its socket in the agent's run dir).
    let run_dir = c.nodes[0].disk.join(".rvol-agent");
    let socket = std::fs::read_dir(&run_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "sock") && !p.ends_with("agent.sock"))
        .expect("the engine's admin socket");
    let engine = run_ok(
        "curl",
        &[
            "-sf",
            "--unix-socket",
            socket.to_str().unwrap(),
            "http://e/metrics",
        ],
    );
    let exported = [
        engine,
        run_ok("curl", &["-sf", &format!("{controller}/metrics")]),
        run_ok("curl", &["-sf", &format!("{agent}/metrics")]),
    ]
    .join("\n");
    let dashboard = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/rvol.json"
    ))
    .unwrap();
    let board: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    let mut plotted = 0;
    for p in board["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap();
            for (i, _) in expr.match_indices("rvol_") {
                let name: String = expr[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                let found = exported.lines().any(|l| {
                    l.strip_prefix(&name)
                        .is_some_and(|r| r.starts_with(['{', ' ']))
                });
                assert!(found, "the dashboard plots {name}, which nothing exports");
                plotted += 1;
            }
        }
    }
    assert!(plotted > 20, "{plotted}");

    let a = scrape(&agent);
    assert_eq!(
        a.get("rvol_agent_processes{kind=replica,state=running}"),
        Some(&1.0),
        "{a:#?}"
    );
    assert_eq!(
        a.get("rvol_agent_processes{kind=engine,state=running}"),
        Some(&1.0),
        "{a:#?}"
    );
    assert!(a["rvol_agent_pass_passes_total{}"] > 0.0);

    // n2 lost: the volume degraded, the node away.
    c.kill_node(1);
    wait_until(
        "the controller to count n2 away",
        Duration::from_secs(30),
        || {
            let m = scrape(&controller);
            m.get("rvol_cluster_nodes{state=away}") == Some(&1.0)
                && m.get("rvol_cluster_volumes{state=degraded}") == Some(&1.0)
        },
    );

    // etcd gone: the scrape still answers, and says so.
    for e in &mut c.etcd {
        e.kill();
    }
    wait_until(
        "the controller to say the store is down",
        Duration::from_secs(30),
        || scrape(&controller).get("rvol_cluster_store_up{}") == Some(&0.0),
    );
}
