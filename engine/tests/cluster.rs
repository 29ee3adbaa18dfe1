//! The cluster with real processes: etcd, a controller, agents, and the
//! replicas and engines the agents run. Volumes are created, attached,
//! written, moved and read back through the CLI; nodes, agents and
//! engines are killed; bad requests change nothing.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::cluster::{pids_matching, Cluster};
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
    // Growing, attached and then detached: the next engine grows the
    // replicas that missed it.
    let uri = c.attach("two", 2);
    c.ok(&["volume", "expand", "two", "--size", "96M"]);
    written(&c, 2, &uri, &["write -P 0x77 90M 1M", "flush"]);
    c.ok(&["volume", "detach", "two"]);
    c.ok(&["volume", "expand", "two", "--size", "128M"]);
    let err = c.fails(&["volume", "expand", "two", "--size", "64M"]);
    assert!(err.contains("volumes only grow"), "{err}");
    let uri = c.attach("two", 3);
    written(&c, 3, &uri, &["read -P 0x77 90M 1M", "read -P 0 120M 8M"]);
    assert_eq!(c.volume("two")["size"], 128 << 20);
    c.ok(&["volume", "detach", "two"]);

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

    // A cluster of another protocol version: a new agent and a new
    // controller refuse to join it.
    let etcdctl = |args: &[&str]| {
        let out = std::process::Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &c.etcd_url])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "etcdctl {args:?}");
    };
    etcdctl(&["put", "/rvol/version", r#"{"protocol":99}"#]);
    let disk = tmp.path().join("n3");
    let port = common::free_port().to_string();
    for args in [
        vec![
            "agent",
            "--node",
            "n3",
            "--etcd",
            &c.etcd_url,
            "--listen",
            "127.0.0.1:0",
            "--disk",
            disk.to_str().unwrap(),
        ],
        vec![
            "controller",
            "--etcd",
            &c.etcd_url,
            "--listen",
            &format!("127.0.0.1:{port}"),
        ],
    ] {
        let out = common::run_within(Duration::from_secs(30), common::RVOL, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("this cluster runs rvol protocol 99"),
            "rvol {}: {err}",
            args[0]
        );
    }
    etcdctl(&["put", "/rvol/version", r#"{"protocol":1}"#]);
}

/// The stale-replica trap: a replica that missed writes comes back alone.
/// Attach is refused, naming the replica it waits for, until a replica
/// with the newest data returns; then the newest data is served.
#[test]
fn an_engine_never_starts_on_stale_replicas_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Cluster::local(
        tmp.path(),
        &[("n1", "za"), ("n2", "zb"), ("e1", "zc"), ("e2", "zd")],
        "10m",
    );
    // Both replicas on n1 and n2: e1 and e2 only run engines.
    c.ok(&["node", "cordon", "e1"]);
    c.ok(&["node", "cordon", "e2"]);
    c.ok(&["volume", "create", "t", "--size", "32M", "--replicas", "2"]);
    let mut v = nodes_of(&c.volume("t"));
    v.sort();
    assert_eq!(v, ["n1", "n2"]);
    let uri = c.attach("t", 2);
    written(&c, 2, &uri, &["write -P 0xa1 0 2M", "flush"]);

    // n2 is lost; the volume takes writes without it.
    c.kill_node(1);
    written(&c, 2, &uri, &["write -P 0xb2 0 2M", "flush"]);
    let v = c.volume("t");
    let in_sync: Vec<&Value> = v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["in_sync"] == true)
        .collect();
    assert_eq!(in_sync.len(), 1, "{v}");
    assert_eq!(in_sync[0]["node"], "n1", "{v}");

    // Then n1 and the engine's node are lost too, and only n2 returns.
    c.kill_node(0);
    c.kill_node(2);
    c.start_agent(1);
    c.wait_for(Duration::from_secs(30), "n1 and e1 seen away", |c| {
        let nodes = c.json(&["node", "ls", "--json"]);
        nodes
            .as_array()
            .unwrap()
            .iter()
            .all(|n| (n["name"] == "n1" || n["name"] == "e1") == (n["alive"] == false))
    });
    let err = c.fails(&["volume", "attach", "t", "--node", "e2"]);
    assert!(
        err.contains("waiting for a replica with the volume's current data")
            && err.contains("r1 on n1"),
        "{err}"
    );
    // The attachment stays, and its engine waits: none starts on n2's
    // stale replica, however long n1 is away (a few agent passes here).
    std::thread::sleep(Duration::from_secs(5));
    let e2_disk = c.nodes[3].disk.display().to_string();
    assert_eq!(
        pids_matching(&format!("{e2_disk}/.rvol-agent/e-")),
        Vec::<i32>::new()
    );
    let v = c.volume("t");
    assert_ne!(v["state"], "healthy");
    let in_sync: Vec<&Value> = v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["in_sync"] == true)
        .collect();
    assert_eq!(in_sync.len(), 1, "{v}");
    assert_eq!(in_sync[0]["node"], "n1", "{v}");

    // n1 returns: the engine starts and serves the newest data.
    c.start_agent(0);
    c.wait_alive("n1", true);
    let uri = c.attach("t", 3);
    written(&c, 3, &uri, &["read -P 0xb2 0 2M"]);
    c.wait_for(Duration::from_secs(30), "n2's replica rebuilt", |c| {
        c.volume("t")["state"] == "healthy"
    });
}

/// An encrypted volume: its engine waits for the key on its node, its
/// replicas hold only ciphertext, and while it is detached a drain moves a
/// replica with no key anywhere (a maintenance engine copies the sealed
/// blocks as they are); the moved copy then serves with the key.
#[test]
fn an_encrypted_volume_needs_its_key_to_serve_and_none_to_be_maintained() {
    let tmp = tempfile::tempdir().unwrap();
    let c = Cluster::local(
        tmp.path(),
        &[("n1", "za"), ("n2", "zb"), ("n3", "zc")],
        "10m",
    );
    c.ok(&["node", "cordon", "n3"]);
    c.ok(&[
        "volume",
        "create",
        "sec",
        "--size",
        "32M",
        "--replicas",
        "2",
        "--encrypted",
    ]);
    c.ok(&["node", "uncordon", "n3"]);
    let err = c.fails(&["volume", "attach", "sec", "--node", "n3"]);
    assert!(
        err.contains("waiting for the volume's encryption key"),
        "{err}"
    );
    let secret = [0x42u8; 32];
    let key = |i: usize| {
        std::fs::create_dir_all(c.keys_dir(i)).unwrap();
        std::fs::write(c.keys_dir(i).join("sec.key"), secret).unwrap();
    };
    key(2);
    let uri = c.attach("sec", 2);
    written(&c, 2, &uri, &["write -P 0x6b 0 4M", "flush"]);
    let plain = [0x6bu8; 4096];
    let holds_plaintext = |c: &Cluster| {
        c.nodes.iter().any(|n| {
            walk(&n.disk.join("rvol-replicas"))
                .iter()
                // A file gone since the listing (an atomic write's
                // temporary) holds nothing to check.
                .any(|f| match std::fs::read(f) {
                    Ok(data) => data.chunks(4096).any(|b| b == plain),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
                    Err(e) => panic!("reading {}: {e}", f.display()),
                })
        })
    };
    assert!(!holds_plaintext(&c), "a replica file holds plaintext");

    c.ok(&["volume", "detach", "sec"]);
    let drained = nodes_of(&c.volume("sec"))[0].clone();
    let out = c.ok(&["node", "drain", &drained, "--timeout", "90s"]);
    assert!(out.contains("drained"), "{out}");
    let nodes = nodes_of(&c.volume("sec"));
    assert!(nodes.contains(&"n3".to_string()), "{nodes:?}");
    assert!(!holds_plaintext(&c), "a replica file holds plaintext");
    // Served again where the key is (n3, which now holds the moved copy).
    let uri = c.attach("sec", 2);
    written(&c, 2, &uri, &["read -P 0x6b 0 4M"]);
}

/// Every file under `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// An agent SIGKILLed and restarted while its node serves I/O: no replica
/// or engine restarts, and the client sees no error.
#[test]
fn a_restarted_agent_adopts_what_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Cluster::local(tmp.path(), &[("n1", "za"), ("n2", "zb")], "10m");
    c.ok(&["volume", "create", "a", "--size", "64M", "--replicas", "2"]);
    let uri = c.attach("a", 0);
    let disk = c.nodes[0].disk.to_str().unwrap().to_string();
    let before: BTreeSet<i32> = pids_matching(&format!("{disk}/")).into_iter().collect();
    assert_eq!(before.len(), 2, "a replica and an engine on n1");
    let fio = c.fio_verify(0, &uri, 8);
    std::thread::sleep(Duration::from_secs(2));
    c.nodes[0].agent.take().unwrap().kill9();
    std::thread::sleep(Duration::from_secs(1));
    c.start_agent(0);
    common::cluster::fio_passed(fio);
    let after: BTreeSet<i32> = pids_matching(&format!("{disk}/"))
        .into_iter()
        .filter(|p| {
            c.nodes[0]
                .agent
                .as_ref()
                .is_none_or(|a| a.child.id() as i32 != *p)
        })
        .collect();
    assert_eq!(before, after, "the replica and engine kept running");
    assert_eq!(c.volume("a")["state"], "healthy");
}

/// The position of the first event of `v` containing `text`.
fn event_index(v: &Value, text: &str) -> Option<usize> {
    v["events"]
        .as_array()?
        .iter()
        .position(|e| e["message"].as_str().is_some_and(|m| m.contains(text)))
}

/// Replicas move without a moment with fewer current copies: to the node
/// a best-effort volume is attached to while fio verifies it, and off a
/// drained node, for a detached volume too (a maintenance engine rebuilds
/// its successor). The replica that leaves goes only after its successor
/// is in sync, and its data is deleted.
#[test]
fn replicas_move_for_locality_and_drain_without_losing_a_copy() {
    let tmp = tempfile::tempdir().unwrap();
    let c = Cluster::local(
        tmp.path(),
        &[("n1", "za"), ("n2", "zb"), ("n3", "zc"), ("n4", "zd")],
        "10m",
    );
    c.ok(&[
        "volume",
        "create",
        "local",
        "--size",
        "64M",
        "--replicas",
        "2",
        "--data-locality",
        "best-effort",
    ]);
    let held = nodes_of(&c.volume("local"));
    let x = c
        .nodes
        .iter()
        .position(|n| !held.contains(&n.name))
        .unwrap();
    let x_name = c.nodes[x].name.clone();
    let uri = c.attach("local", x);
    let fio = c.fio_verify(x, &uri, 12);
    c.wait_for(
        Duration::from_secs(60),
        "a replica moved to the attached node",
        |c| {
            let v = c.volume("local");
            let nodes = nodes_of(&v);
            nodes.len() == 2 && nodes.contains(&x_name) && v["state"] == "healthy"
        },
    );
    common::cluster::fio_passed(fio);

    // A detached volume with data, one of whose replicas is on the node
    // drained.
    c.ok(&[
        "volume",
        "create",
        "cold",
        "--size",
        "64M",
        "--replicas",
        "2",
    ]);
    let uri = c.attach("cold", 0);
    written(&c, 0, &uri, &["write -P 0x5a 0 4M", "flush"]);
    c.ok(&["volume", "detach", "cold"]);
    let before = c.volume("cold");
    let drained = nodes_of(&before)[0].clone();
    let old_dir = |c: &Cluster| {
        let d = &c.nodes[c.node_index(&drained)].disk;
        std::fs::read_dir(d.join("rvol-replicas"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("cold."))
    };
    assert!(old_dir(&c));
    let out = c.ok(&["node", "drain", &drained, "--timeout", "90s"]);
    assert!(out.contains("drained"), "{out}");
    let after = c.volume("cold");
    let nodes = nodes_of(&after);
    assert_eq!(nodes.len(), 2, "{after}");
    assert!(!nodes.contains(&drained), "{after}");
    assert_eq!(after["state"], "detached", "{after}");
    // The successor joined the in-sync set before the old replica left.
    let new_id = after["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_u64().unwrap())
        .max()
        .unwrap();
    let joined = after["events"]
        .as_array()
        .unwrap()
        .iter()
        .position(|e| {
            let m = e["message"].as_str().unwrap_or("");
            m.starts_with("in-sync replicas:") && m.contains(&format!("r{new_id}"))
        })
        .expect("the successor was recorded in sync");
    let retired = event_index(&after, "retired: its node is drained").expect("retired");
    assert!(joined < retired, "{after}");
    assert!(
        event_index(&after, "maintenance engine on").is_some(),
        "{after}"
    );
    c.wait_for(
        Duration::from_secs(30),
        "the old replica's data deleted",
        |c| !old_dir(c),
    );
    let n = (0..4).find(|i| c.nodes[*i].name != drained).unwrap();
    let uri = c.attach("cold", n);
    written(&c, n, &uri, &["read -P 0x5a 0 4M"]);
    let ls = c.json(&["node", "ls", "--json"]);
    let d = ls
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == drained.as_str())
        .unwrap();
    assert_eq!(
        (d["draining"].as_bool(), d["replicas"].as_u64()),
        (Some(true), Some(0))
    );
}

/// Snapshots through the cluster, attached and detached: each is in
/// every replica's chain, asking twice takes it once, removing it takes it
/// out of the list, and the volume's data is untouched.
#[test]
fn snapshots_are_taken_attached_or_not() {
    let tmp = tempfile::tempdir().unwrap();
    let c = Cluster::local(tmp.path(), &[("n1", "za"), ("n2", "zb")], "10m");
    c.ok(&["volume", "create", "s", "--size", "64M", "--replicas", "2"]);
    let uri = c.attach("s", 0);
    written(&c, 0, &uri, &["write -P 0x11 0 1M", "flush"]);
    c.ok(&["volume", "snapshot", "create", "s", "first"]);
    written(&c, 0, &uri, &["write -P 0x22 0 1M", "flush"]);
    c.ok(&["volume", "detach", "s"]);
    c.ok(&["volume", "snapshot", "create", "s", "second"]);
    c.ok(&["volume", "snapshot", "create", "s", "first"]);
    let list = c.json(&["volume", "snapshot", "ls", "s", "--json"]);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["first", "second"], "{list}");
    assert!(list
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["state"]["is"] == "taken"));
    for n in &c.nodes {
        let dir = std::fs::read_dir(n.disk.join("rvol-replicas"))
            .unwrap()
            .flatten()
            .next()
            .expect("a replica on each node")
            .path();
        for snap in ["first", "second"] {
            assert!(
                dir.join(format!("volume-snap-{snap}.img")).exists(),
                "{snap} in {}",
                dir.display()
            );
        }
    }
    // The maintenance engine that took the second one goes away.
    c.wait_for(
        Duration::from_secs(30),
        "the maintenance engine gone",
        |c| {
            let v = c.volume("s");
            v["maintenance"].is_null() && v["state"] == "detached"
        },
    );
    let err = c.fails(&["volume", "snapshot", "create", "s", "a/b"]);
    assert!(err.contains("not a snapshot name"), "{err}");
    let err = c.fails(&["volume", "snapshot", "rm", "s", "nope"]);
    assert!(err.contains("does not exist"), "{err}");
    c.ok(&["volume", "snapshot", "rm", "s", "first"]);
    let list = c.json(&["volume", "snapshot", "ls", "s", "--json"]);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    let uri = c.attach("s", 1);
    written(&c, 1, &uri, &["read -P 0x22 0 1M"]);
}

/// A node lost for less than the replenish wait keeps its replica: when
/// it returns, its agent restarts the replica from its directory and the
/// engine brings it back (a delta rebuild), with no replacement placed,
/// while fio verifies the volume throughout.
#[test]
fn a_node_back_within_the_wait_keeps_its_replica() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Cluster::local(
        tmp.path(),
        &[("n1", "za"), ("n2", "zb"), ("n3", "zc")],
        "10m",
    );
    c.ok(&["volume", "create", "v", "--size", "64M", "--replicas", "2"]);
    let held = nodes_of(&c.volume("v"));
    let front = c
        .nodes
        .iter()
        .position(|n| !held.contains(&n.name))
        .unwrap();
    let lost = c.node_index(&held[0]);
    let uri = c.attach("v", front);
    c.wait_for(Duration::from_secs(30), "both replicas RW", |c| {
        c.volume("v")["state"] == "healthy"
    });
    let fio = c.fio_verify(front, &uri, 15);
    std::thread::sleep(Duration::from_secs(2));
    c.kill_node(lost);
    c.wait_for(Duration::from_secs(30), "the volume degraded", |c| {
        c.volume("v")["state"] == "degraded"
    });
    let name = c.nodes[lost].name.clone();
    c.wait_alive(&name, false);
    std::thread::sleep(Duration::from_secs(2));
    c.start_agent(lost);
    c.wait_for(Duration::from_secs(60), "the replica back", |c| {
        c.volume("v")["state"] == "healthy"
    });
    common::cluster::fio_passed(fio);
    let v = c.volume("v");
    assert_eq!(nodes_of(&v), held, "{v}");
    assert!(event_index(&v, "removed").is_none(), "{v}");
    assert!(event_index(&v, "placed").is_none(), "{v}");
}

/// The cluster's API with tokens and HTTPS: no token, a wrong one, a
/// read-only one for a change, plain HTTP, and a CA that did not sign the
/// controller's certificate are all refused and change nothing; the
/// control token over HTTPS works.
#[test]
fn the_cluster_api_needs_a_token_and_speaks_https_only() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let token = |name: &str, value: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, format!("{value}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p.display().to_string()
    };
    let (control, read, wrong) = (
        token("control", "c0ntrol"),
        token("read", "r3ad"),
        token("wrong", "guess"),
    );
    let mut controller_args = common::tls::issue(&["--controller", "--ip", "127.0.0.1"]);
    let ca = controller_args[5].clone();
    controller_args.extend([
        "--token-file".to_string(),
        control.clone(),
        "--read-token-file".to_string(),
        read.clone(),
    ]);
    let access = common::cluster::Access {
        controller_args,
        agent_args: vec![vec!["--token-file".into(), control.clone()]],
        cli_env: vec![
            ("RVOL_CLUSTER_TOKEN_FILE".into(), control.clone()),
            ("RVOL_CLUSTER_CA_FILE".into(), ca.clone()),
        ],
        https: true,
        etcd_tls: true,
    };
    let c = Cluster::local_with_access(tmp.path(), &[("n1", "za")], access);
    c.ok(&[
        "volume",
        "create",
        "kept",
        "--size",
        "16M",
        "--replicas",
        "1",
    ]);
    let create = ["volume", "create", "x", "--size", "16M", "--replicas", "1"];
    let refused = |env: &[(&str, &str)], args: &[&str], why: &str| {
        let out = c.cli_with(env, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(why),
            "{env:?} {args:?}: {err}"
        );
    };
    refused(
        &[("RVOL_CLUSTER_TOKEN_FILE", "/dev/null")],
        &create,
        "empty",
    );
    refused(&[("RVOL_CLUSTER_TOKEN_FILE", &wrong)], &create, "401");
    refused(&[("RVOL_CLUSTER_TOKEN_FILE", &read)], &create, "403");
    refused(
        &[("RVOL_CLUSTER_TOKEN_FILE", &read)],
        &["volume", "rm", "kept"],
        "403",
    );
    // The read token reads.
    let out = c.cli_with(
        &[("RVOL_CLUSTER_TOKEN_FILE", &read)],
        &["volume", "ls", "--json"],
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("kept"));
    // A client trusting another CA does not talk to the controller.
    let other = tmp.path().join("other-ca");
    common::run_ok(
        common::RVOL,
        &["cert", "ca", "--dir", other.to_str().unwrap()],
    );
    let other_ca = other.join("ca.crt").display().to_string();
    refused(
        &[("RVOL_CLUSTER_CA_FILE", &other_ca)],
        &create,
        "certificate",
    );
    // Plain HTTP to the HTTPS port gets no answer.
    let plain = c.url.replace("https://", "http://");
    let out = std::process::Command::new(common::RVOL)
        .args(["volume", "ls", "--cluster", &plain])
        .env("RVOL_CLUSTER_TOKEN_FILE", &control)
        .output()
        .unwrap();
    assert!(!out.status.success());
    // /healthz answers anyone, and says nothing else.
    let health = std::process::Command::new("curl")
        .args(["-s", "--cacert", &ca, &format!("{}/healthz", c.url)])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&health.stdout), "ok");
    // The agent's API (what the node runs) wants its token too; its
    // /healthz does not.
    let agent = c.nodes[0].agent.as_ref().unwrap().ready["listen"]
        .as_str()
        .unwrap()
        .to_string();
    let token = std::fs::read_to_string(&control).unwrap();
    let curl = |path: &str, token: Option<&str>| {
        let mut args = vec![
            "-s".to_string(),
            "-o".into(),
            "/dev/null".into(),
            "-w".into(),
            "%{http_code}".into(),
        ];
        if let Some(t) = token {
            args.extend(["-H".into(), format!("Authorization: Bearer {}", t.trim())]);
        }
        args.push(format!("http://{agent}{path}"));
        let out = std::process::Command::new("curl")
            .args(&args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(curl("/v1/report", None), "401");
    assert_eq!(curl("/v1/report", Some("guess")), "401");
    assert_eq!(curl("/v1/report", Some(&token)), "200");
    assert_eq!(curl("/healthz", None), "200");
    // etcd itself (TLS, client certificates): the cluster works through
    // it, and a client without a certificate of the CA reads nothing.
    assert!(c.etcd_url.starts_with("https://"), "{}", c.etcd_url);
    let etcdctl = |args: &[&str]| {
        std::process::Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &c.etcd_url, "--dial-timeout", "2s"])
            .args(args)
            .args(["get", "--prefix", "", "--keys-only"])
            .output()
            .unwrap()
    };
    assert!(!etcdctl(&[]).status.success(), "no CA, no certificate");
    let no_cert = etcdctl(&["--cacert", &ca]);
    assert!(!no_cert.status.success(), "no certificate: {no_cert:?}");
    // The control: with the cluster's client certificate, it reads.
    let flags = common::tls::issue(&["--controller", "--ip", "127.0.0.1"]);
    let with_cert = etcdctl(&["--cacert", &ca, "--cert", &flags[1], "--key", &flags[3]]);
    assert!(
        String::from_utf8_lossy(&with_cert.stdout).contains("/rvol/"),
        "{with_cert:?}"
    );
    // Nothing was created.
    let names: Vec<String> = c
        .json(&["volume", "ls", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["kept"]);
}

/// A cluster with mutual TLS: agents run replicas with their node's
/// certificate and engines with one the controller signed for the volume
/// and the attachment; data written on one node reads back on the other.
#[test]
fn with_mutual_tls_engines_get_certificates_for_their_volume_only() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = common::tls::ca_dir().join("ca");
    let access = common::cluster::Access {
        controller_args: vec!["--issuer-dir".into(), ca.display().to_string()],
        agent_args: ["n1", "n2"]
            .iter()
            .map(|n| common::tls::issue(&["--node", n, "--ip", "127.0.0.1"]))
            .collect(),
        ..Default::default()
    };
    let c = Cluster::local_with_access(tmp.path(), &[("n1", "za"), ("n2", "zb")], access);
    c.ok(&["volume", "create", "t", "--size", "64M", "--replicas", "2"]);
    let uri = c.attach("t", 0);
    written(&c, 0, &uri, &["write -P 0x33 0 2M", "flush"]);
    c.ok(&["volume", "detach", "t"]);
    let uri = c.attach("t", 1);
    written(&c, 1, &uri, &["read -P 0x33 0 2M"]);
    let replicas = pids_matching("rvol-replicas/t.");
    assert_eq!(replicas.len(), 2);
    for pid in replicas {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        assert!(
            String::from_utf8_lossy(&cmdline).contains("--tls-ca"),
            "replica {pid}"
        );
    }
    let run_dir = c.nodes[1].disk.join(".rvol-agent");
    let certs: Vec<_> = std::fs::read_dir(&run_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "crt"))
        .collect();
    assert_eq!(certs.len(), 1, "{certs:?}");
    let text = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
        .arg(&certs[0])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("URI:rvol://volume/t"), "{text}");
    assert!(!text.contains("rvol://node"), "{text}");
    // A node that asks for a certificate of a volume attached elsewhere
    // gets none: the request is deleted unsigned.
    let etcdctl = |args: &[&str]| {
        let out = std::process::Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &c.etcd_url])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let record: Value =
        serde_json::from_str(etcdctl(&["get", "--print-value-only", "/rvol/volumes/t"]).trim())
            .unwrap();
    let key = tmp.path().join("rogue.key");
    let csr = std::process::Command::new("openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-subj", "/CN=rogue", "-keyout"])
        .arg(&key)
        .output()
        .unwrap();
    let forged = serde_json::json!({
        "protocol": 1, "volume": "t", "uid": record["uid"], "node": "n1",
        "serial": record["attachment"]["serial"],
        "request": String::from_utf8_lossy(&csr.stdout), "cert": null,
    });
    etcdctl(&["put", "/rvol/engine-certs/t", &forged.to_string()]);
    c.wait_for(
        Duration::from_secs(10),
        "the forged request deleted",
        |_| etcdctl(&["get", "/rvol/engine-certs/t"]).is_empty(),
    );

    // n1's engine certificate went with its attachment.
    let left = std::fs::read_dir(c.nodes[0].disk.join(".rvol-agent"))
        .unwrap()
        .flatten()
        .filter(|e| {
            e.path()
                .extension()
                .is_some_and(|x| x == "crt" || x == "key")
        })
        .count();
    assert_eq!(left, 0);
}

fn lab_or_skip(names: &[&str]) -> Option<common::netns::Lab> {
    if !common::netns::Lab::available() {
        eprintln!("SKIPPED: network namespaces need root and iproute2");
        return None;
    }
    Some(common::netns::Lab::new(names))
}

/// A node holding a replica is cut off (its processes SIGKILLed, its link
/// down) while fio verifies I/O: I/O goes on, the volume is degraded, a
/// replica is rebuilt on the spare node after the replenish wait, and the
/// lost node, returning, deletes its old replica instead of rejoining.
#[test]
fn a_lost_node_is_replaced_under_load_and_never_rejoins() {
    let Some(lab) = lab_or_skip(&["ctl", "n1", "n2", "n3", "n4"]) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Cluster::in_lab(
        tmp.path(),
        &lab,
        &[("n1", "z1"), ("n2", "z2"), ("n3", "z3"), ("n4", "z4")],
        "5s",
    );
    c.ok(&["node", "cordon", "n4"]);
    c.ok(&["volume", "create", "v", "--size", "128M", "--replicas", "3"]);
    c.ok(&["node", "uncordon", "n4"]);
    let uri = c.attach("v", 3);
    let lost = c.node_index(nodes_of(&c.volume("v"))[0].as_str());
    let fio = c.fio_verify(3, &uri, 15);
    std::thread::sleep(Duration::from_secs(2));
    c.kill_node(lost);
    lab.link(lost + 1, false);
    c.wait_for(Duration::from_secs(20), "the volume degraded", |c| {
        c.volume("v")["state"] == "degraded"
    });
    common::cluster::fio_passed(fio);
    c.wait_for(Duration::from_secs(90), "a replica rebuilt on n4", |c| {
        let v = c.volume("v");
        v["state"] == "healthy" && nodes_of(&v).contains(&"n4".to_string())
    });
    let v = c.volume("v");
    let name = c.nodes[lost].name.clone();
    assert!(!nodes_of(&v).contains(&name), "{v}");
    let events = v["events"].to_string();
    assert!(events.contains(&format!("on {name} removed")), "{events}");

    // The lost node returns: its old replica's data goes.
    lab.link(lost + 1, true);
    c.start_agent(lost);
    let root = c.nodes[lost].disk.join("rvol-replicas");
    c.wait_for(Duration::from_secs(20), "the old replica deleted", |_| {
        std::fs::read_dir(&root).map_or(true, |mut d| d.next().is_none())
    });
    assert!(!nodes_of(&c.volume("v")).contains(&name));
}

/// The node serving a volume is cut off (its processes keep running):
/// attaching elsewhere succeeds once its lease expires, with every
/// acknowledged write intact; when its link returns, its engine is fenced
/// and a write it was holding never lands.
#[test]
fn an_engine_node_cut_off_is_taken_over_and_fenced() {
    let Some(lab) = lab_or_skip(&["ctl", "n1", "n2", "n3", "e1", "e2"]) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let c = Cluster::in_lab(
        tmp.path(),
        &lab,
        &[
            ("n1", "z1"),
            ("n2", "z2"),
            ("n3", "z3"),
            ("e1", "z4"),
            ("e2", "z5"),
        ],
        "10m",
    );
    c.ok(&["node", "cordon", "e1"]);
    c.ok(&["node", "cordon", "e2"]);
    c.ok(&["volume", "create", "f", "--size", "64M", "--replicas", "3"]);
    let old = c.attach("f", 3);
    written(&c, 3, &old, &["write -P 0xa5 0 8M", "flush"]);
    let old_engine = pids_matching(&format!("{}/.rvol-agent/e-", c.nodes[3].disk.display()));
    assert_eq!(old_engine.len(), 1);

    lab.link(4, false);
    // A write issued on the cut-off node: it cannot be acknowledged.
    let held = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            c.nodes[3].ns.as_deref().unwrap(),
            "qemu-io",
            "-f",
            "raw",
        ])
        .args(["-c", "write -P 0xee 0 1M", "-c", "flush", &old])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    c.wait_for(Duration::from_secs(20), "e1 seen away", |c| {
        let nodes = c.json(&["node", "ls", "--json"]);
        nodes
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["name"] == "e1" && n["alive"] == false)
    });
    let new = c.attach("f", 4);
    written(&c, 4, &new, &["read -P 0xa5 0 8M"]);

    lab.link(4, true);
    c.wait_for(Duration::from_secs(90), "the old engine gone", |_| {
        old_engine.iter().all(|p| {
            !std::path::Path::new(&format!("/proc/{p}")).exists()
                || std::fs::read_to_string(format!("/proc/{p}/stat"))
                    .is_ok_and(|s| s.contains(") Z"))
        })
    });
    let out = held.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!(
        "held write on the cut-off node: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains("wrote 1048576"),
        "the cut-off engine acknowledged: {text}"
    );
    written(&c, 4, &new, &["read -P 0xa5 0 8M"]);
    assert_eq!(c.volume("f")["state"], "healthy");
}

/// etcd loses its leading member of three: everything goes on. etcd is lost
/// whole: the attached volume serves fio without an error, control
/// commands fail saying the store is unavailable, and everything works
/// again once etcd returns.
#[test]
fn volumes_serve_through_etcd_losses() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Cluster::local_with_etcd(tmp.path(), &[("n1", "za"), ("n2", "zb")], "10m", 3);
    c.ok(&["volume", "create", "v", "--size", "64M", "--replicas", "2"]);
    let uri = c.attach("v", 0);

    // The member that leads etcd is lost: etcd elects another meanwhile.
    let leader = (0..3)
        .find(|&i| c.etcd[i].is_leader())
        .expect("an etcd leader");
    c.etcd[leader].kill();
    c.ok(&["volume", "create", "w", "--size", "16M", "--replicas", "1"]);
    c.attach("w", 1);
    c.ok(&["volume", "detach", "w"]);

    let fio = c.fio_verify(0, &uri, 12);
    std::thread::sleep(Duration::from_secs(1));
    for m in &mut c.etcd {
        m.kill();
    }
    let err = c.fails(&["volume", "ls"]);
    assert!(err.contains("the cluster store is unavailable"), "{err}");
    let err = c.fails(&["volume", "detach", "v"]);
    assert!(err.contains("the cluster store is unavailable"), "{err}");
    common::cluster::fio_passed(fio);

    for m in &mut c.etcd {
        m.start();
    }
    c.wait_for(
        Duration::from_secs(60),
        "the volume seen healthy again",
        |c| {
            let out = c.cli(&["volume", "get", "v", "--json"]);
            out.status.success()
                && serde_json::from_slice::<Value>(&out.stdout)
                    .is_ok_and(|v| v["state"] == "healthy")
        },
    );
    c.wait_for(Duration::from_secs(30), "a leader again", |c| {
        c.cli(&["volume", "detach", "v"]).status.success()
    });
    let uri = c.attach("v", 1);
    written(&c, 1, &uri, &["read 0 32M"]);
}

/// The leading controller is SIGKILLed while volumes are created and
/// attached: the standby leads within seconds, and every operation is done
/// exactly once.
#[test]
fn a_standby_controller_takes_over_and_nothing_happens_twice() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Cluster::local(
        tmp.path(),
        &[("n1", "za"), ("n2", "zb"), ("n3", "zc")],
        "10m",
    );
    c.add_controller();
    let leader = c.json(&["volume", "ls", "--json"]);
    assert!(leader.is_array());
    let url = c.url.clone();
    let rvol = common::RVOL;
    let worker = std::thread::spawn(move || {
        let run = |args: &[&str]| {
            std::process::Command::new(rvol)
                .args(args)
                .args(["--cluster", &url])
                .output()
                .unwrap()
        };
        let mut retries = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        for i in 0..6 {
            let name = format!("v{i}");
            let node = format!("n{}", i % 3 + 1);
            loop {
                let out = run(&[
                    "volume",
                    "create",
                    &name,
                    "--size",
                    "16M",
                    "--replicas",
                    "2",
                ]);
                let err = String::from_utf8_lossy(&out.stderr);
                if out.status.success() || err.contains("already exists") {
                    break;
                }
                assert!(std::time::Instant::now() < deadline, "create {name}: {err}");
                retries += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
            while !run(&["volume", "attach", &name, "--node", &node])
                .status
                .success()
            {
                assert!(
                    std::time::Instant::now() < deadline,
                    "attach {name} never succeeded"
                );
                retries += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        retries
    });
    std::thread::sleep(Duration::from_millis(1500));
    let killed = std::time::Instant::now();
    c.controllers[0].kill9();
    c.wait_for(Duration::from_secs(20), "the standby leading", |c| {
        c.cli(&["node", "cordon", "n1"]).status.success()
    });
    eprintln!(
        "the standby led {:?} after the leader was killed",
        killed.elapsed()
    );
    c.ok(&["node", "uncordon", "n1"]);
    let retries = worker.join().unwrap();
    eprintln!("{retries} calls were retried");
    let mut ports = BTreeSet::new();
    for i in 0..6 {
        let v = c.volume(&format!("v{i}"));
        let events = v["events"].as_array().unwrap();
        let count = |what: &str| {
            events
                .iter()
                .filter(|e| e["message"].as_str().unwrap().starts_with(what))
                .count()
        };
        assert_eq!((count("created"), count("attached to")), (1, 1), "{v}");
        assert_eq!(v["replicas"].as_array().unwrap().len(), 2, "{v}");
        assert_eq!(v["attached_node"], format!("n{}", i % 3 + 1), "{v}");
        for r in v["replicas"].as_array().unwrap() {
            assert!(
                ports.insert(r["address"].to_string()),
                "a port given twice: {v}"
            );
        }
    }
}

/// Backups through the cluster: `rvol backup create --cluster` has the
/// volume's engine back a snapshot up while attached, and a maintenance
/// engine while detached (the second incremental against the first); the
/// backups restore to what the volume held, onto given replicas and as a
/// new volume of the cluster; bad requests are refused and change
/// nothing.
#[test]
fn backups_are_made_through_the_cluster_attached_or_not() {
    let tmp = tempfile::tempdir().unwrap();
    let c = Cluster::local(tmp.path(), &[("n1", "za"), ("n2", "zb")], "10m");
    let target = format!("file://{}", tmp.path().join("backups").display());
    std::fs::create_dir_all(tmp.path().join("backups")).unwrap();
    c.ok(&["volume", "create", "bk", "--size", "64M", "--replicas", "2"]);
    let uri = c.attach("bk", 0);
    written(&c, 0, &uri, &["write -P 0x31 0 8M", "flush"]);
    c.ok(&["volume", "snapshot", "create", "bk", "s1"]);
    let create = |snap: &str| {
        c.json(&[
            "backup",
            "create",
            "bk",
            "--snapshot",
            snap,
            "--target",
            &target,
            "--json",
        ])
    };
    let first = create("s1");
    let first_name = first["state"]["name"]
        .as_str()
        .expect("a backup name")
        .to_string();

    // Detached: a maintenance engine takes the snapshot and the backup.
    written(&c, 0, &uri, &["write -P 0x32 0 1M", "flush"]);
    c.ok(&["volume", "detach", "bk"]);
    c.ok(&["volume", "snapshot", "create", "bk", "s2"]);
    let second = create("s2");
    let second_name = second["state"]["name"]
        .as_str()
        .expect("a backup name")
        .to_string();
    let v = c.volume("bk");
    assert_eq!(v["backup"]["state"]["is"], "done", "{v:#}");
    assert!(
        v["events"].as_array().unwrap().iter().any(|e| e["message"]
            .as_str()
            .unwrap()
            .contains(&format!("backup {second_name} written"))),
        "{v:#}"
    );

    let list: Value = serde_json::from_str(&common::run_ok(
        common::RVOL,
        &["backup", "ls", "--target", &target, "--json"],
    ))
    .unwrap();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, [first_name.as_str(), second_name.as_str()]);

    // Each restores to what its snapshot held.
    for (name, first_mib) in [(&first_name, "0x31"), (&second_name, "0x32")] {
        let base = tmp.path().join(format!("restore-{name}"));
        std::fs::create_dir_all(&base).unwrap();
        let rs = common::three_replicas(&base, "64M");
        let mut args = vec![
            "backup", "restore", name, "--target", &target, "--volume", "bk",
        ];
        let addrs = common::addrs(&rs);
        for a in &addrs {
            args.extend(["--replica", a]);
        }
        common::run_ok(common::RVOL, &args);
        let (mut e, uri, _) = common::start_engine("bk", "64M", &addrs, &[]);
        let pattern = format!("read -P {first_mib} 0 1M");
        common::qemu_io(&uri, &[&pattern, "read -P 0x31 1M 7M", "read -P 0 8M 56M"]);
        e.stop();
    }

    // Restored as a new volume of the cluster, placed like any other,
    // then attached and read on another node.
    let out = c.ok(&[
        "backup",
        "restore",
        &second_name,
        "--target",
        &target,
        "--volume",
        "bk2",
        "--replicas",
        "2",
    ]);
    assert!(out.contains("restored as volume bk2"), "{out}");
    assert_eq!(nodes_of(&c.volume("bk2")).len(), 2);
    let uri = c.attach("bk2", 1);
    written(
        &c,
        1,
        &uri,
        &[
            "read -P 0x32 0 1M",
            "read -P 0x31 1M 7M",
            "read -P 0 8M 56M",
        ],
    );
    let err = c.fails(&[
        "backup",
        "restore",
        &second_name,
        "--target",
        &target,
        "--volume",
        "bk2",
    ]);
    assert!(err.contains("already exists"), "{err}");

    // Refused, with the reason, and nothing asked: a snapshot not taken,
    // a target that is none.
    let refused = |snap: &str, target: &str| {
        c.fails(&[
            "backup",
            "create",
            "bk",
            "--snapshot",
            snap,
            "--target",
            target,
        ])
    };
    let err = refused("nope", &target);
    assert!(err.contains("no snapshot nope taken"), "{err}");
    let err = refused("s1", "http://x/");
    assert!(err.contains("not a backup target"), "{err}");
    assert_eq!(
        c.volume("bk")["backup"]["state"]["name"],
        second_name.as_str()
    );
}

/// A replica whose node's link turns slow (2 Mbit/s, `tc tbf`) under a
/// verifying writer: with the agents' `--evict-slow-replicas`, its engine
/// evicts it, the controller places a successor on another node, the
/// successor is rebuilt and the slow one retired; no write is lost.
#[test]
fn a_replica_evicted_as_slow_is_replaced_on_another_node() {
    let Some(lab) = lab_or_skip(&["ctl", "n1", "n2", "n3", "n4"]) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let access = common::cluster::Access {
        agent_args: vec![vec!["--evict-slow-replicas".into(), "4".into()]; 4],
        ..Default::default()
    };
    let nodes = [("n1", "z1"), ("n2", "z2"), ("n3", "z3"), ("n4", "z4")];
    let c = Cluster::in_lab_with_access(tmp.path(), &lab, &nodes, access);
    c.ok(&["node", "cordon", "n4"]);
    c.ok(&["volume", "create", "v", "--size", "128M", "--replicas", "3"]);
    c.ok(&["node", "uncordon", "n4"]);
    let uri = c.attach("v", 3);
    let slow = nodes_of(&c.volume("v"))[0].clone();
    let fio = c.fio_verify(3, &uri, 40);
    std::thread::sleep(Duration::from_secs(2));
    lab.throttle(c.node_index(&slow) + 1, 2000);
    c.wait_for(Duration::from_secs(60), "the slow replica replaced", |c| {
        let v = c.volume("v");
        let on = nodes_of(&v);
        v["state"] == "healthy" && on.len() == 3 && !on.contains(&slow)
    });
    let v = c.volume("v");
    assert!(nodes_of(&v).contains(&"n4".to_string()), "{v:#}");
    let events = v["events"].to_string();
    assert!(events.contains("its engine evicted it as slow"), "{events}");
    common::cluster::fio_passed(fio);
    lab.throttle(c.node_index(&slow) + 1, 0);
}
