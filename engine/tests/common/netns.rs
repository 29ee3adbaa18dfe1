//! Test hosts in network namespaces: each host is a namespace with one
//! veth into a bridge that lives in a hub namespace of its own, on a
//! private subnet made for the test. Links are cut and restored on the hub
//! side with `ip link set ... down/up`. Everything is removed on drop.
#![allow(dead_code)]

use std::process::Command;

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
