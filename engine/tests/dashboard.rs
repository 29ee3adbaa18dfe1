//! The dashboard in a real browser (headless Chromium), served by an
//! engine on a Unix socket behind nginx under a path prefix: it shows a
//! three-replica volume, then a replica's failure and its rebuild's
//! progress without a reload, refuses an action to a visitor who has not
//! logged in (and the volume is unchanged), and performs it after a login.
//! Screenshots of each step go to `target/test-artifacts/dashboard/`.

mod common;

use std::time::Duration;

use common::browser::{self, Browser, Nginx};
use common::*;

const SIZE: &str = "256M";

/// The volume's snapshot names, read through the socket itself.
fn snapshots(socket: &std::path::Path) -> Vec<String> {
    let out = run_ok(
        "curl",
        &[
            "-sf",
            "--unix-socket",
            socket.to_str().unwrap(),
            "http://rvol/v1/snapshots",
        ],
    );
    let chain: serde_json::Value = serde_json::from_str(&out).unwrap();
    chain
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["user_created"] == true)
        .map(|l| l["name"].as_str().unwrap().to_string())
        .map(|f| {
            f.trim_start_matches("volume-snap-")
                .trim_end_matches(".img")
                .to_string()
        })
        .collect()
}

#[test]
fn the_dashboard_follows_a_failure_and_its_rebuild_and_acts_only_after_a_login() {
    if !browser::available() {
        return;
    }
    let base = tempfile::tempdir().unwrap();
    let mut rs = replicas_on_fixed_ports(base.path(), 3, SIZE);
    let token = base.path().join("token");
    std::fs::write(&token, "dashboard-secret\n").unwrap();
    let socket = base.path().join("admin.sock");
    let mut args = engine_args(
        "dash",
        SIZE,
        &addrs(&rs),
        &[
            "--nbd-listen",
            "127.0.0.1:0",
            "--admin-token-file",
            token.to_str().unwrap(),
            "--admin-public-reads",
            // Slow enough for the page to show the rebuild under way.
            "--rebuild-rate-mib",
            "8",
        ],
    );
    let i = args.iter().position(|a| a == "--admin-listen").unwrap();
    args[i + 1] = format!("unix:{}", socket.display());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let engine = Proc::start(&args);
    let nbd = format!("nbd://{}", engine.ready["nbd"][0].as_str().unwrap());
    let proxy = Nginx::start(&base.path().join("nginx"), "/volumes/dash", &socket);

    let artifacts = browser::artifacts("dashboard");
    let mut b = Browser::start(&artifacts);
    b.cmd(&format!(
        "open http://127.0.0.1:{}/volumes/dash/ui/",
        proxy.port
    ));
    b.cmd("marker_set");
    b.cmd("wait_rows #replica-table tr[data-mode=RW] 3");
    assert_eq!(b.cmd("text #title"), "dash");
    assert_eq!(b.cmd("text #state"), "healthy");
    b.cmd("shot 1-healthy");

    // Without a login, an action is refused and changes nothing.
    b.cmd("type #snapshot-name from-the-page");
    let refused = b.cmd("act #snapshot-button");
    assert!(
        refused.contains("refused") && refused.contains("401"),
        "{refused}"
    );
    b.cmd("shot 2-refused");
    assert!(snapshots(&socket).is_empty());

    // A replica dies: the page shows it failed...
    rs[0].proc.kill9();
    b.cmd("wait_rows #replica-table tr[data-mode=RW] 2");
    assert_ne!(b.cmd("text #state"), "healthy");
    b.cmd("shot 3-failed");
    // ...misses 64 MiB of writes (which the latency chart plots)...
    qemu_io(&nbd, &["write -P 7 0 64M", "flush"]);
    // ...and comes back: the page shows the rebuild's progress, then the
    // replica RW again, with no reload.
    rs[0].restart(SIZE);
    let progress = b.cmd("wait_progress");
    b.cmd("shot 4-rebuilding");
    b.cmd("wait_rows #replica-table tr[data-mode=RW] 3");
    b.cmd("wait_gone #rebuild-progress");
    b.cmd("shot 5-rebuilt");
    eprintln!("the page showed the rebuild at {progress}");
    let metrics = run_ok(
        "curl",
        &[
            "-sf",
            "--unix-socket",
            socket.to_str().unwrap(),
            "http://rvol/metrics",
        ],
    );
    for (i, r) in rs.iter().enumerate() {
        let line = format!(
            "rvol_replica_failures_total{{volume=\"dash\",replica=\"{}\"}} {}",
            r.addr,
            u8::from(i == 0)
        );
        assert!(metrics.contains(&line), "{line} in {metrics}");
    }
    assert_ne!(b.cmd("count #chart polyline[data-series='write p99']"), "0");

    // Logged in with the control token, the same action is done.
    b.cmd("type #token dashboard-secret");
    b.cmd("click #login-button");
    let done = b.cmd("act #snapshot-button");
    assert!(done.ends_with("done"), "{done}");
    b.cmd("wait_rows #snapshot-table tr[data-snapshot=from-the-page] 1");
    b.cmd("shot 6-logged-in");
    assert_eq!(snapshots(&socket), ["from-the-page"]);
    b.cmd("marker_check");
    qemu_io(&nbd, &["read -P 7 0 64M"]);
    drop(engine);
}

/// The controller's dashboard: the cluster's volumes and nodes, a
/// replacement replica's rebuild followed live, an action refused before
/// a login and done after it.
#[test]
fn the_controllers_dashboard_follows_a_drain_and_acts_only_after_a_login() {
    use common::cluster::{Access, Cluster};
    if !browser::available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let token = tmp.path().join("cluster-token");
    std::fs::write(&token, "cluster-secret\n").unwrap();
    let token = token.to_str().unwrap().to_string();
    let access = Access {
        controller_args: vec![
            "--token-file".into(),
            token.clone(),
            "--public-reads".into(),
        ],
        // Slow enough for the page to show the replacement's rebuild.
        agent_args: vec![vec!["--rebuild-rate-mib".into(), "8".into()]; 3],
        cli_env: vec![("RVOL_CLUSTER_TOKEN_FILE".into(), token)],
        ..Access::default()
    };
    let nodes = [("n1", "za"), ("n2", "zb"), ("n3", "zc")];
    let c = Cluster::local_with_access(tmp.path(), &nodes, access);
    c.ok(&["volume", "create", "web", "--size", SIZE, "--replicas", "2"]);
    let uri = c.attach("web", 0);
    c.qemu_io(0, &uri, &["write -P 9 0 64M", "flush"]);

    let mut b = Browser::start(&browser::artifacts("dashboard-cluster"));
    b.cmd(&format!(
        "open {}/ui/#web",
        c.url.split(',').next().unwrap()
    ));
    b.cmd("marker_set");
    b.cmd("wait_rows #volume-table tr[data-volume=web] 1");
    b.cmd("wait_rows #node-table tr[data-node] 3");
    b.cmd("wait_rows #detail-replicas tr[data-mode=RW] 2");
    b.cmd("shot 1-cluster");

    b.cmd("type #snapshot-name from-the-page");
    let refused = b.cmd("act #snapshot-button");
    assert!(
        refused.contains("refused") && refused.contains("401"),
        "{refused}"
    );
    let snaps = c.json(&["volume", "snapshot", "ls", "web", "--json"]);
    assert_eq!(snaps, serde_json::json!([]));

    // Draining a node of the volume places a replacement and rebuilds
    // it: the page shows the rebuild's progress as it goes.
    let v = c.volume("web");
    let drained = v["replicas"][0]["node"].as_str().unwrap().to_string();
    let _ = c.cli(&["node", "drain", &drained, "--timeout", "1s"]);
    b.cmd("wait_progress");
    b.cmd("shot 2-rebuilding");
    b.cmd("wait_gone #rebuild-progress");

    b.cmd("type #token cluster-secret");
    b.cmd("click #login-button");
    let done = b.cmd("act #detach-button");
    assert!(done.ends_with("done"), "{done}");
    c.wait_for(Duration::from_secs(30), "web detached", |c| {
        c.volume("web")["attached_node"].is_null()
    });
    b.cmd("shot 3-detached");
    b.cmd("marker_check");
}
