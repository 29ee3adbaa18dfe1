//! A slow replica, made slow for real: its host's link is throttled to 2
//! Mbit/s (`tc tbf`, replicas on hosts of their own), so a 4 KiB write to
//! it takes tens of milliseconds. The engine reports it in status, metrics
//! and the log, and nothing else; it recovers when the limit goes. With `--evict-slow-replicas` the engine takes it out of the
//! set and keeps it out (no rebuild brings it back) while the writes go on
//! at the healthy replicas' speed; removing and adding it brings it back.

mod common;

use std::time::{Duration, Instant};

use common::netns::{engine_in, replicas_on_hosts, status_in, Lab};
use common::*;

const ADMIN: &str = "127.0.0.1:9800";

/// fio writing (verified) through the engine's NBD export in `ns` for
/// `secs` seconds.
fn writer(ns: &str, secs: u32) -> std::process::Child {
    fio(ns, secs).spawn().expect("fio")
}

/// The p99 of fio's write completion latency, in ms, over `secs` seconds
/// of the writer's job (verified too).
fn write_p99_ms(ns: &str, secs: u32) -> f64 {
    let out = fio(ns, secs)
        .arg("--output-format=json")
        .output()
        .expect("fio");
    assert!(out.status.success(), "fio failed: {out:?}");
    // fio's NBD engine may print a line before the report.
    let text = String::from_utf8_lossy(&out.stdout);
    let json = text.find("\n{").map_or(&text[..], |i| &text[i + 1..]);
    let report: serde_json::Value =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {text}"));
    report["jobs"][0]["write"]["clat_ns"]["percentile"]["99.000000"]
        .as_f64()
        .expect("fio's p99")
        / 1e6
}

fn fio(ns: &str, secs: u32) -> std::process::Command {
    let mut c = std::process::Command::new("ip");
    c.args(["netns", "exec", ns, "fio", "--name=slow", "--ioengine=nbd"])
        .args(["--uri=nbd://127.0.0.1:10809/", "--rw=randwrite", "--bs=4k"])
        .args(["--iodepth=4", "--size=32M", "--time_based", "--fsync=16"])
        .arg(format!("--runtime={secs}"))
        .args([
            "--verify=crc32c",
            "--verify_state_save=0",
            "--verify_fatal=1",
        ])
        .stdout(std::process::Stdio::piped());
    c
}

/// Waits until `check` holds of the engine's status.
fn wait_status(ns: &str, limit: Duration, what: &str, check: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + limit;
    loop {
        let s = status_in(ns, ADMIN);
        if check(&s) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {s:#}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The kinds of the volume's events, oldest first.
fn event_kinds(ns: &str) -> Vec<String> {
    let body = run_in_ok(ns, "curl", &["-s", &format!("http://{ADMIN}/v1/events")]);
    let events: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    events
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect()
}

fn finish(fio: std::process::Child) {
    let out = fio.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("verify: bad"),
        "fio failed: {text}"
    );
}

#[test]
fn a_replica_behind_a_slow_link_is_reported_then_evicted_and_kept_out() {
    if !Lab::available() {
        eprintln!("SKIPPED: network namespaces need root and iproute2");
        return;
    }
    let lab = Lab::new(&["r0", "r1", "r2", "eng"]);
    let tmp = tempfile::tempdir().unwrap();
    let (_replicas, addrs) = replicas_on_hosts(&lab, tmp.path(), 3, "64M");
    let eng = lab.host(3).ns.clone();
    let all: Vec<&String> = addrs.iter().collect();
    let policy = ["--slow-replica-seconds", "4"];

    // Reported only: status, metrics, log; the set is unchanged.
    let mut engine = engine_in(&eng, "slow", "64M", &all, &policy);
    lab.throttle(0, 2000);
    let fio = writer(&eng, 14);
    wait_status(
        &eng,
        Duration::from_secs(20),
        "r0 was never reported slow",
        |s| s["replicas"][0]["slow"].is_object(),
    );
    let s = status_in(&eng, ADMIN);
    let slow = &s["replicas"][0]["slow"];
    let mean = slow["mean_ms"].as_f64().unwrap();
    assert!(
        mean >= 4.0 * slow["peers_ms"].as_f64().unwrap() && mean >= 10.0,
        "{s:#}"
    );
    assert_eq!(slow["evicted"], false);
    for i in 1..3 {
        assert!(s["replicas"][i]["slow"].is_null(), "{s:#}");
        assert!(
            s["replicas"][i]["latency_ms"].as_f64().unwrap() < mean / 4.0,
            "{s:#}"
        );
    }
    assert_eq!(
        s["state"], "healthy",
        "reporting alone changes nothing: {s:#}"
    );
    let metrics = run_in_ok(&eng, "curl", &["-s", &format!("http://{ADMIN}/metrics")]);
    let line = format!(
        "rvol_replica_slow{{volume=\"slow\",replica=\"{}\"}} 1",
        addrs[0]
    );
    assert!(metrics.contains(&line), "{line} in {metrics}");
    assert!(
        metrics.contains("rvol_replica_request_duration_seconds_bucket"),
        "{metrics}"
    );
    // Without the limit it recovers.
    lab.throttle(0, 0);
    wait_status(&eng, Duration::from_secs(15), "r0 stayed slow", |s| {
        s["replicas"][0]["slow"].is_null()
    });
    finish(fio);
    assert_eq!(
        event_kinds(&eng),
        ["replica_slow", "replica_recovered"],
        "the volume's events"
    );
    engine.stop();

    // Evicted: out of the set, and kept out while the writes go on; the
    // writes' p99 comes back to within 1.5x of what it was before.
    let mut flags = policy.to_vec();
    flags.push("--evict-slow-replicas");
    let mut engine = engine_in(&eng, "slow", "64M", &all, &flags);
    let before = write_p99_ms(&eng, 6);
    lab.throttle(0, 2000);
    let fio = writer(&eng, 10);
    wait_status(&eng, Duration::from_secs(30), "r0 was never evicted", |s| {
        s["replicas"][0]["mode"] == "ERR"
    });
    let s = status_in(&eng, ADMIN);
    let why = s["replicas"][0]["last_error"].as_str().unwrap();
    assert!(why.contains("evicted as slow"), "{s:#}");
    assert_eq!(s["replicas"][0]["slow"]["evicted"], true, "{s:#}");
    finish(fio);
    let after = write_p99_ms(&eng, 6);
    eprintln!("write p99: {before:.2} ms before the slowdown, {after:.2} ms after the eviction");
    assert!(
        after <= 1.5 * before,
        "p99 {after:.2} ms after the eviction, {before:.2} ms before"
    );
    lab.throttle(0, 0);
    std::thread::sleep(Duration::from_secs(6));
    let s = status_in(&eng, ADMIN);
    assert_eq!(
        s["replicas"][0]["mode"], "ERR",
        "an evicted replica came back by itself: {s:#}"
    );
    assert_eq!(s["replicas"][1]["mode"], "RW");
    assert_eq!(s["replicas"][2]["mode"], "RW");
    // By hand it comes back: removed, added, rebuilt.
    run_in_ok(&eng, RVOL, &["replica", "rm", &addrs[0], "--admin", ADMIN]);
    run_in_ok(&eng, RVOL, &["replica", "add", &addrs[0], "--admin", ADMIN]);
    wait_status(&eng, Duration::from_secs(30), "r0 was not rebuilt", |s| {
        s["state"] == "healthy"
    });
    let kinds = event_kinds(&eng);
    for (i, want) in [
        "replica_slow",
        "replica_evicted",
        "replica_removed",
        "replica_added",
        "rebuild_started",
        "rebuild_finished",
    ]
    .iter()
    .enumerate()
    {
        assert_eq!(
            kinds.get(i).map(String::as_str),
            Some(*want),
            "events: {kinds:?}"
        );
    }
    engine.stop();
}
