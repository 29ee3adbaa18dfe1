//! The cluster with real processes: etcd, a controller, agents, and the
//! replicas and engines the agents run. Volumes are created, attached,
//! written, moved and read back through the CLI; nodes, agents and
//! engines are killed; bad requests change nothing.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::cluster::Cluster;
use serde_json::Value;

fn nodes_of(v: &Value) -> Vec<String> {
    v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["node"].as_str().unwrap().to_string())
        .collect()
}

fn written(c: &Cluster, node: usize, uri: &str, cmds: &[&str]) {
    let out = c.qemu_io(node, uri, cmds);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && !text.contains("Pattern verification failed")
            && !text.contains("error"),
        "qemu-io {cmds:?} on {uri}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The issue's seed scenario: volumes of 1, 2 and 3 replicas on a 4-node
/// cluster land on distinct nodes (and zones, when asked), are written,
/// moved to another node and read back.
#[test]
fn volumes_land_on_distinct_nodes_and_move_between_them() {
    let tmp = tempfile::tempdir().unwrap();
    let c = Cluster::local(
        tmp.path(),
        &[("n1", "za"), ("n2", "zb"), ("n3", "zc"), ("n4", "zc")],
        "60s",
    );
    let zone = |n: &str| c.nodes[c.node_index(n)].zone.clone();
    for (name, replicas, anti) in [
        ("one", "1", "soft"),
        ("two", "2", "hard"),
        ("three", "3", "hard"),
    ] {
        c.ok(&[
            "volume",
            "create",
            name,
            "--size",
            "64M",
            "--replicas",
            replicas,
            "--zone-anti-affinity",
            anti,
        ]);
        let v = c.volume(name);
        let nodes = nodes_of(&v);
        assert_eq!(nodes.len(), replicas.parse::<usize>().unwrap(), "{v}");
        assert_eq!(
            nodes.iter().collect::<BTreeSet<_>>().len(),
            nodes.len(),
            "distinct nodes: {v}"
        );
        if anti == "hard" {
            let zones: BTreeSet<String> = nodes.iter().map(|n| zone(n)).collect();
            assert_eq!(zones.len(), nodes.len(), "distinct zones: {v}");
        }
    }
    // Four replicas in three zones cannot be placed apart: refused, with
    // the reason, and nothing is created.
    let err = c.fails(&[
        "volume",
        "create",
        "four",
        "--size",
        "64M",
        "--replicas",
        "4",
        "--zone-anti-affinity",
        "hard",
    ]);
    assert!(
        err.contains("4 replica(s) asked, 3 node(s) fit") && err.contains("zone zc"),
        "{err}"
    );
    assert!(!c.ok(&["volume", "ls"]).contains("four"));
    c.wait_for(
        Duration::from_secs(30),
        "volumes detached with replicas running",
        |c| {
            ["one", "two", "three"]
                .iter()
                .all(|v| c.volume(v)["state"] == "detached")
        },
    );

    for (k, name) in ["one", "two", "three"].iter().enumerate() {
        let (a, b) = (k, (k + 1) % 4);
        let uri = c.attach(name, a);
        assert_eq!(c.volume(name)["state"], "healthy");
        let p = format!("0x{:x}", 0x41 + k);
        written(
            &c,
            a,
            &uri,
            &[
                &format!("write -P {p} 0 1M"),
                &format!("write -P {p} 63M 1M"),
                "flush",
            ],
        );
        c.ok(&["volume", "detach", name]);
        assert_eq!(c.volume(name)["attached_node"], Value::Null);
        let uri = c.attach(name, b);
        written(
            &c,
            b,
            &uri,
            &[
                &format!("read -P {p} 0 1M"),
                &format!("read -P {p} 63M 1M"),
                "read -P 0 1M 1M",
            ],
        );
        c.ok(&["volume", "detach", name]);
    }
    // Deleting a volume deletes its replicas' data on every node.
    c.ok(&["volume", "rm", "three"]);
    c.wait_for(Duration::from_secs(20), "replica data deleted", |c| {
        c.nodes.iter().all(|n| {
            std::fs::read_dir(n.disk.join("rvol-replicas"))
                .map(|d| {
                    d.flatten()
                        .all(|e| !e.file_name().to_string_lossy().starts_with("three."))
                })
                .unwrap_or(true)
        })
    });
}

/// Bad requests are answered with a message and change nothing.
#[test]
fn bad_requests_are_refused_and_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let c = Cluster::local(tmp.path(), &[("n1", "za"), ("n2", "zb")], "60s");
    c.ok(&["volume", "create", "v", "--size", "16M", "--replicas", "2"]);
    let uri = c.attach("v", 0);
    assert!(uri.starts_with("nbd://"));
    let before = |c: &Cluster| {
        let mut v = c.json(&["volume", "ls", "--json"]);
        // Only what requests could change; states follow the processes.
        for x in v.as_array_mut().unwrap() {
            x.as_object_mut().unwrap().remove("state");
        }
        v
    };
    let snapshot = before(&c);
    for (args, expect) in [
        (vec!["volume", "get", "nope"], "volume nope does not exist"),
        (vec!["volume", "rm", "nope"], "does not exist"),
        (
            vec!["volume", "attach", "nope", "--node", "n1"],
            "does not exist",
        ),
        (
            vec!["volume", "attach", "v", "--node", "n9"],
            "node n9 has no live agent",
        ),
        (
            vec!["volume", "attach", "v", "--node", "n2"],
            "attached to n1, which is alive",
        ),
        (vec!["volume", "rm", "v"], "attached to n1: detach it first"),
        (
            vec!["volume", "create", "v", "--size", "16M", "--replicas", "1"],
            "already exists",
        ),
        (
            vec!["volume", "create", "w", "--size", "1000", "--replicas", "1"],
            "not a multiple of 4096",
        ),
        (
            vec!["volume", "create", "w", "--size", "16M", "--replicas", "0"],
            "between 1 and 5",
        ),
        (
            vec!["volume", "create", "w", "--size", "16M", "--replicas", "3"],
            "3 replica(s) asked, 2 node(s) fit",
        ),
        (
            vec![
                "volume",
                "create",
                "w",
                "--size",
                "16M",
                "--replicas",
                "1",
                "--node-selector",
                "disk=ssd",
            ],
            "does not match disk=ssd",
        ),
        (
            vec!["volume", "create", "bad/name", "--size", "16M"],
            "is not a volume name",
        ),
        (vec!["volume", "get", "bad name"], "is not a volume name"),
        (vec!["node", "cordon", "n9"], "node n9 does not exist"),
    ] {
        let err = c.fails(&args);
        assert!(
            err.contains(expect),
            "rvol {args:?}: {err:?} lacks {expect:?}"
        );
    }
    // Malformed requests straight to the API: 4xx.
    let host = c.url.trim_start_matches("http://");
    for (method, path, body) in [
        ("POST", "/v1/volumes", "{not json"),
        (
            "POST",
            "/v1/volumes",
            r#"{"name":"w","size":4096,"replicas":1,"colour":"red"}"#,
        ),
        (
            "POST",
            "/v1/volumes",
            r#"{"name":"w","size":-1,"replicas":1}"#,
        ),
        (
            "POST",
            "/v1/volumes/v/attach",
            r#"{"node":"n1","frontend":"floppy"}"#,
        ),
    ] {
        let reply = common::run_ok(
            "curl",
            &[
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-X",
                method,
                "-H",
                "Content-Type: application/json",
                "-d",
                body,
                &format!("http://{host}{path}"),
            ],
        );
        assert!(reply.starts_with('4'), "{method} {path} {body}: {reply}");
    }
    assert_eq!(before(&c), snapshot, "a refused request changed something");
}
