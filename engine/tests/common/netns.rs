//! Test hosts in network namespaces: each host is a namespace with one
//! veth into a bridge that lives in a hub namespace of its own, on a
//! private subnet made for the test. Links are cut and restored on the hub
//! side with `ip link set ... down/up`. Everything is removed on drop.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

use super::{encryption_args, run_in_ok, tls, Proc, RVOL};

pub struct Lab {
    hub: String,
    pub hosts: Vec<Host>,
}

pub struct Host {
    pub ns: String,
    pub ip: String,
    /// The veth end in the hub namespace: cut it to partition the host.
    hub_end: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2) is needed for namespace tests");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Lab {
    /// Namespaces can be made here (root, iproute2 present).
    pub fn available() -> bool {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        root && Command::new("ip")
            .arg("-V")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    /// Hosts `names`, on 10.213.<n>.0/24 where n is derived from the pid.
    /// Names carry the pid and a count of the labs this process made, so
    /// tests running at once do not collide.
    pub fn new(names: &[&str]) -> Lab {
        static LABS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = LABS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 10;
        let tag = std::process::id() % 1_000 * 10 + n;
        let net = 1 + std::process::id() % 250;
        let hub = format!("rvhub{tag}");
        ip(&["netns", "add", &hub]);
        let mut lab = Lab {
            hub: hub.clone(),
            hosts: Vec::new(),
        };
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &hub, "link", "set", "br0", "up"]);
        ip(&["-n", &hub, "link", "set", "lo", "up"]);
        for (i, name) in names.iter().enumerate() {
            let ns = format!("rv{tag}{name}");
            let hub_end = format!("h{tag}x{i}");
            let host_end = format!("e{tag}x{i}");
            let addr = format!("10.213.{net}.{}", i + 10);
            ip(&["netns", "add", &ns]);
            lab.hosts.push(Host {
                ns: ns.clone(),
                ip: addr.clone(),
                hub_end: hub_end.clone(),
            });
            ip(&[
                "link", "add", &hub_end, "type", "veth", "peer", "name", &host_end,
            ]);
            ip(&["link", "set", &hub_end, "netns", &hub]);
            ip(&["link", "set", &host_end, "netns", &ns]);
            ip(&["-n", &hub, "link", "set", &hub_end, "master", "br0"]);
            ip(&["-n", &hub, "link", "set", &hub_end, "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                &host_end,
            ]);
            ip(&["-n", &ns, "link", "set", &host_end, "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        lab
    }

    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i]
    }

    /// Limits what reaches host `i` to `kbit` kbit/s (`tc tbf` on the
    /// hub's end of its link: a congested or throttled link; the kernels
    /// here have no netem); 0 lifts the limit.
    pub fn throttle(&self, i: usize, kbit: u32) {
        let dev = &self.hosts[i].hub_end;
        let rate = format!("{kbit}kbit");
        let args: Vec<&str> = if kbit == 0 {
            vec!["-n", &self.hub, "qdisc", "del", "dev", dev, "root"]
        } else {
            let tbf = ["qdisc", "replace", "dev", dev, "root", "tbf", "rate", &rate];
            let queue = ["burst", "8kb", "latency", "2s"];
            ["-n", self.hub.as_str()]
                .into_iter()
                .chain(tbf)
                .chain(queue)
                .collect()
        };
        let out = Command::new("tc")
            .args(&args)
            .output()
            .expect("tc (iproute2)");
        assert!(
            out.status.success(),
            "tc {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Cuts (`false`) or restores (`true`) host `i`'s link.
    pub fn link(&self, i: usize, up: bool) {
        ip(&[
            "-n",
            &self.hub,
            "link",
            "set",
            &self.hosts[i].hub_end,
            if up { "up" } else { "down" },
        ]);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for h in &self.hosts {
            let _ = Command::new("ip").args(["netns", "del", &h.ns]).status();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.hub])
            .status();
    }
}

pub fn status_in(ns: &str, admin: &str) -> serde_json::Value {
    serde_json::from_str(&run_in_ok(
        ns,
        RVOL,
        &["volume", "status", "--admin", admin, "--json"],
    ))
    .unwrap()
}

/// Replica processes on the first `n` hosts of `lab`, each on port 4001
/// with its directory under `base`; returns them and their addresses.
pub fn replicas_on_hosts(lab: &Lab, base: &Path, n: usize, size: &str) -> (Vec<Proc>, Vec<String>) {
    (0..n)
        .map(|i| {
            let h = lab.host(i);
            let listen = format!("{}:4001", h.ip);
            let dir = base.join(format!("r{i}"));
            let mut args = vec![
                "replica",
                "--dir",
                dir.to_str().unwrap(),
                "--listen",
                &listen,
                "--size",
                size,
            ];
            let tls = if tls::enabled() {
                tls::replica(&listen)
            } else {
                Vec::new()
            };
            args.extend(tls.iter().map(String::as_str));
            let p = Proc::start_in(&h.ns, &args);
            (p, listen)
        })
        .unzip()
}

/// An engine in namespace `ns`, NBD on 127.0.0.1:10809 and the admin API
/// on 127.0.0.1:9800 there.
pub fn engine_in(ns: &str, name: &str, size: &str, replicas: &[&String], extra: &[&str]) -> Proc {
    let mut args = vec![
        "engine",
        "--name",
        name,
        "--size",
        size,
        "--nbd-listen",
        "127.0.0.1:10809",
        "--admin-listen",
        "127.0.0.1:9800",
    ];
    for a in replicas {
        args.extend(["--replica", a.as_str()]);
    }
    args.extend_from_slice(extra);
    let tls = if tls::enabled() {
        tls::engine(name)
    } else {
        Vec::new()
    };
    args.extend(tls.iter().map(String::as_str));
    let encryption = encryption_args();
    args.extend(encryption.iter().map(String::as_str));
    Proc::start_in(ns, &args)
}
