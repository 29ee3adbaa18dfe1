//! A real cluster for tests: etcd, a controller and agents, each a real
//! process, on loopback or one network namespace per node. Everything the
//! agents started (replicas, engines: they outlive agents by design) is
//! SIGKILLed on drop, found by the test's directory in its command line.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::netns::Lab;
use super::{free_port, Proc, RVOL};

/// A node: its name, its namespace (if any) and its agent's settings.
pub struct Node {
    pub name: String,
    pub zone: String,
    pub ns: Option<String>,
    pub ip: String,
    pub disk: PathBuf,
    pub ports: String,
    pub agent: Option<Proc>,
}

pub struct Cluster {
    pub dir: PathBuf,
    pub etcd: Proc,
    pub etcd_url: String,
    pub controller: Option<Proc>,
    pub url: String,
    /// Where the controller and etcd run, when nodes are namespaces.
    pub ctl_ns: Option<String>,
    pub nodes: Vec<Node>,
    pub agent_ttl: &'static str,
}

/// `n` consecutive free ports, as FIRST-LAST.
pub fn port_range(n: u16) -> String {
    let mut start = free_port();
    let mut last = start;
    while last - start + 1 < n {
        let p = free_port();
        if p == last + 1 {
            last = p;
        } else {
            start = p;
            last = p;
        }
    }
    format!("{start}-{last}")
}

fn in_ns(ns: &Option<String>, program: &str) -> Command {
    match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, program]);
            c
        }
        None => Command::new(program),
    }
}

fn start_etcd(dir: &Path, ns: &Option<String>, ip: &str) -> (Proc, String) {
    let (client, peer) = (free_port(), free_port());
    let url = format!("http://{ip}:{client}");
    let peer_url = format!("http://{ip}:{peer}");
    let child = in_ns(ns, "etcd")
        .args(["--name", "t", "--data-dir"])
        .arg(dir)
        .args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .args([
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
        ])
        .args(["--initial-cluster", &format!("t={peer_url}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcd (Debian's etcd-server) must be installed");
    let proc = Proc {
        child,
        ready: serde_json::Value::Null,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ok = in_ns(ns, "etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &url, "endpoint", "health"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "etcd did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    (proc, url)
}

impl Cluster {
    /// etcd, a controller and one agent per `(name, zone)`, on loopback.
    pub fn local(dir: &Path, nodes: &[(&str, &str)], replenish_wait: &str) -> Cluster {
        Self::build(dir, None, nodes, replenish_wait)
    }

    /// The same with every node in a namespace of `lab` (host 0 runs etcd
    /// and the controller, host i+1 node i).
    pub fn in_lab(dir: &Path, lab: &Lab, nodes: &[(&str, &str)], replenish_wait: &str) -> Cluster {
        Self::build(dir, Some(lab), nodes, replenish_wait)
    }

    fn build(dir: &Path, lab: Option<&Lab>, nodes: &[(&str, &str)], wait: &str) -> Cluster {
        let ctl_ns = lab.map(|l| l.host(0).ns.clone());
        let ctl_ip = lab.map_or("127.0.0.1".to_string(), |l| l.host(0).ip.clone());
        let (etcd, etcd_url) = start_etcd(&dir.join("etcd"), &ctl_ns, &ctl_ip);
        let mut c = Cluster {
            dir: dir.to_path_buf(),
            etcd,
            etcd_url,
            controller: None,
            url: String::new(),
            ctl_ns,
            nodes: nodes
                .iter()
                .enumerate()
                .map(|(i, (name, zone))| Node {
                    name: name.to_string(),
                    zone: zone.to_string(),
                    ns: lab.map(|l| l.host(i + 1).ns.clone()),
                    ip: lab.map_or("127.0.0.1".to_string(), |l| l.host(i + 1).ip.clone()),
                    disk: dir.join(name).join("disk"),
                    ports: if lab.is_some() {
                        "10100-10199".to_string()
                    } else {
                        port_range(12)
                    },
                    agent: None,
                })
                .collect(),
            agent_ttl: "3s",
        };
        c.start_controller(&ctl_ip, wait);
        for i in 0..c.nodes.len() {
            c.start_agent(i);
        }
        c.wait_for(Duration::from_secs(20), "every node registered", |c| {
            c.json(&["node", "ls", "--json"])
                .as_array()
                .is_some_and(|a| a.iter().filter(|n| n["alive"] == true).count() == c.nodes.len())
        });
        c
    }

    fn start_controller(&mut self, ip: &str, wait: &str) {
        let listen = format!("{ip}:{}", free_port());
        let args = [
            "controller",
            "--etcd",
            &self.etcd_url,
            "--listen",
            &listen,
            "--replica-replenish-wait",
            wait,
            "--leader-ttl",
            "3s",
        ];
        let p = match &self.ctl_ns {
            Some(ns) => Proc::start_in(ns, &args),
            None => Proc::start(&args),
        };
        self.url = format!("http://{listen}");
        self.controller = Some(p);
    }

    pub fn start_agent(&mut self, i: usize) {
        let n = &self.nodes[i];
        let listen = format!("{}:{}", n.ip, free_port());
        let args = [
            "agent",
            "--node",
            &n.name,
            "--etcd",
            &self.etcd_url,
            "--listen",
            &listen,
            "--disk",
            n.disk.to_str().unwrap(),
            "--zone",
            &n.zone,
            "--ports",
            &n.ports,
            "--ttl",
            self.agent_ttl,
        ];
        let p = match &n.ns {
            Some(ns) => Proc::start_in(ns, &args),
            None => Proc::start(&args),
        };
        self.nodes[i].agent = Some(p);
    }

    /// Every process of node `i` (its agent, replicas and engines),
    /// SIGKILLed: the node is lost as in a power cut.
    pub fn kill_node(&mut self, i: usize) {
        if let Some(mut a) = self.nodes[i].agent.take() {
            a.kill9();
        }
        kill_matching(self.nodes[i].disk.to_str().unwrap());
    }

    /// Runs `rvol ARGS --cluster URL` (in the controller's namespace).
    pub fn cli(&self, args: &[&str]) -> Output {
        in_ns(&self.ctl_ns, RVOL)
            .args(args)
            .args(["--cluster", &self.url])
            .env("RUST_LOG", "warn")
            .output()
            .expect("rvol")
    }

    /// The same, which must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "rvol {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The same, which must fail; its stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            !out.status.success(),
            "rvol {args:?} succeeded: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        serde_json::from_str(&self.ok(args)).unwrap_or(serde_json::Value::Null)
    }

    pub fn volume(&self, name: &str) -> serde_json::Value {
        self.json(&["volume", "get", name, "--json"])
    }

    /// Attaches `volume` on node `i`; its NBD URI.
    pub fn attach(&self, volume: &str, i: usize) -> String {
        let v = self.json(&["volume", "attach", volume, "--node", &self.nodes[i].name]);
        v["nbd"].as_str().expect("an NBD export").to_string()
    }

    pub fn node_index(&self, name: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .expect("a node of the test")
    }

    /// Polls `cond` until it holds, or fails naming `what`.
    pub fn wait_for(&self, limit: Duration, what: &str, cond: impl Fn(&Cluster) -> bool) {
        let deadline = Instant::now() + limit;
        while !cond(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// `qemu-io` on `uri` from node `i`'s namespace.
    pub fn qemu_io(&self, i: usize, uri: &str, cmds: &[&str]) -> Output {
        let mut c = in_ns(&self.nodes[i].ns, "qemu-io");
        c.args(["-f", "raw"]);
        for cmd in cmds {
            c.args(["-c", cmd]);
        }
        c.arg(uri).output().expect("qemu-io")
    }
}

/// Pids of processes whose command line contains `needle`.
pub fn pids_matching(needle: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
        .collect()
}

pub fn kill_matching(needle: &str) {
    for pid in pids_matching(needle) {
        // SAFETY: kill(2) on processes this test started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut a) = n.agent.take() {
                a.kill9();
            }
        }
        kill_matching(self.dir.to_str().unwrap_or("/nonexistent"));
    }
}
