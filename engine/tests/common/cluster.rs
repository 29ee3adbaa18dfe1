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
    pub etcd: Vec<EtcdMember>,
    pub etcd_url: String,
    /// The controllers, and the CLI's `--cluster` naming all of them.
    pub controllers: Vec<Proc>,
    pub url: String,
    ctl_ip: String,
    wait: String,
    /// Where the controller and etcd run, when nodes are namespaces.
    pub ctl_ns: Option<String>,
    pub nodes: Vec<Node>,
    pub agent_ttl: &'static str,
    pub access: Access,
    /// How the controllers and agents reach etcd over TLS (none: plain).
    etcd_args: Vec<String>,
}

/// How the cluster's API is guarded: flags every controller gets, the
/// environment of every CLI call (its token and CA files), and whether its
/// URLs are `https://`.
#[derive(Debug, Clone, Default)]
pub struct Access {
    pub controller_args: Vec<String>,
    /// Flags for each node's agent, by node index.
    pub agent_args: Vec<Vec<String>>,
    pub cli_env: Vec<(String, String)>,
    pub https: bool,
    /// etcd with TLS and client certificates (`--client-cert-auth`).
    pub etcd_tls: bool,
}

/// The certificates of a TLS-guarded etcd: its members', and the one the
/// cluster's processes present to it (each as `--tls-cert X --tls-key Y
/// --tls-ca Z`, as `tls::issue` gives them).
struct EtcdCerts {
    server: Vec<String>,
    client: Vec<String>,
}

impl EtcdCerts {
    fn issue(ip: &str) -> EtcdCerts {
        EtcdCerts {
            server: super::tls::issue(&["--node", "etcd", "--ip", ip]),
            client: super::tls::issue(&["--controller", "--ip", ip]),
        }
    }

    /// etcdctl's flags for the client certificate.
    fn etcdctl(&self) -> Vec<String> {
        let c = &self.client;
        ["--cacert", &c[5], "--cert", &c[1], "--key", &c[3]]
            .map(String::from)
            .to_vec()
    }

    /// rvol's flags for the client certificate.
    fn rvol(&self) -> Vec<String> {
        let c = &self.client;
        [
            "--etcd-ca-file",
            &c[5],
            "--etcd-cert-file",
            &c[1],
            "--etcd-key-file",
            &c[3],
        ]
        .map(String::from)
        .to_vec()
    }
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

/// One member of the test's etcd cluster; it can be stopped and started
/// again on the same ports and data.
pub struct EtcdMember {
    name: String,
    dir: PathBuf,
    ns: Option<String>,
    client: String,
    peer: String,
    initial: String,
    /// The member's TLS flags, and etcdctl's.
    tls: Vec<String>,
    ctl_tls: Vec<String>,
    pub proc: Option<Proc>,
}

impl EtcdMember {
    pub fn start(&mut self) {
        let child = in_ns(&self.ns, "etcd")
            .args(["--name", &self.name, "--data-dir"])
            .arg(&self.dir)
            .args([
                "--listen-client-urls",
                &self.client,
                "--advertise-client-urls",
                &self.client,
            ])
            .args([
                "--listen-peer-urls",
                &self.peer,
                "--initial-advertise-peer-urls",
                &self.peer,
            ])
            .args(["--initial-cluster", &self.initial])
            .args(&self.tls)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd (Debian's etcd-server) must be installed");
        self.proc = Some(Proc {
            child,
            ready: serde_json::Value::Null,
        });
    }

    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
    }

    /// Whether this member is etcd's (raft) leader now.
    pub fn is_leader(&self) -> bool {
        let out = in_ns(&self.ns, "etcdctl")
            .env("ETCDCTL_API", "3")
            .args([
                "--endpoints",
                &self.client,
                "endpoint",
                "status",
                "-w",
                "json",
            ])
            .args(&self.ctl_tls)
            .output()
            .expect("etcdctl");
        let status: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        let s = &status[0]["Status"];
        s["header"]["member_id"]
            .as_u64()
            .is_some_and(|m| Some(m) == s["leader"].as_u64())
    }
}

/// `members` etcd members, started, once they answer.
fn start_etcd(
    dir: &Path,
    ns: &Option<String>,
    ip: &str,
    members: usize,
    certs: Option<&EtcdCerts>,
) -> (Vec<EtcdMember>, String) {
    let scheme = if certs.is_some() { "https" } else { "http" };
    let tls: Vec<String> = certs.map_or(Vec::new(), |c| {
        let s = &c.server;
        [
            "--cert-file",
            &s[1],
            "--key-file",
            &s[3],
            "--trusted-ca-file",
            &s[5],
            "--client-cert-auth",
        ]
        .map(String::from)
        .to_vec()
    });
    let ctl_tls = certs.map_or(Vec::new(), EtcdCerts::etcdctl);
    let ports: Vec<(u16, u16)> = (0..members).map(|_| (free_port(), free_port())).collect();
    let initial: Vec<String> = ports
        .iter()
        .enumerate()
        .map(|(i, (_, peer))| format!("m{i}=http://{ip}:{peer}"))
        .collect();
    let mut etcd: Vec<EtcdMember> = ports
        .iter()
        .enumerate()
        .map(|(i, (client, peer))| EtcdMember {
            name: format!("m{i}"),
            dir: dir.join(format!("m{i}")),
            ns: ns.clone(),
            client: format!("{scheme}://{ip}:{client}"),
            peer: format!("http://{ip}:{peer}"),
            initial: initial.join(","),
            tls: tls.clone(),
            ctl_tls: ctl_tls.clone(),
            proc: None,
        })
        .collect();
    for m in &mut etcd {
        m.start();
    }
    let urls: Vec<String> = etcd.iter().map(|m| m.client.clone()).collect();
    let url = urls.join(",");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = in_ns(ns, "etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &url, "endpoint", "health"])
            .args(&ctl_tls)
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "etcd did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    (etcd, url)
}

impl Cluster {
    /// etcd, a controller and one agent per `(name, zone)`, on loopback.
    pub fn local(dir: &Path, nodes: &[(&str, &str)], replenish_wait: &str) -> Cluster {
        Self::build(dir, None, nodes, replenish_wait, 1, Access::default())
    }

    /// The same with the API guarded as `access` says.
    pub fn local_with_access(dir: &Path, nodes: &[(&str, &str)], access: Access) -> Cluster {
        Self::build(dir, None, nodes, "10m", 1, access)
    }

    /// The same on an etcd of `members` members.
    pub fn local_with_etcd(
        dir: &Path,
        nodes: &[(&str, &str)],
        replenish_wait: &str,
        members: usize,
    ) -> Cluster {
        Self::build(dir, None, nodes, replenish_wait, members, Access::default())
    }

    /// The same with every node in a namespace of `lab` (host 0 runs etcd
    /// and the controller, host i+1 node i).
    pub fn in_lab(dir: &Path, lab: &Lab, nodes: &[(&str, &str)], replenish_wait: &str) -> Cluster {
        Self::build(dir, Some(lab), nodes, replenish_wait, 1, Access::default())
    }

    /// The same with the processes' flags of `access`.
    pub fn in_lab_with_access(
        dir: &Path,
        lab: &Lab,
        nodes: &[(&str, &str)],
        access: Access,
    ) -> Cluster {
        Self::build(dir, Some(lab), nodes, "10m", 1, access)
    }

    fn build(
        dir: &Path,
        lab: Option<&Lab>,
        nodes: &[(&str, &str)],
        wait: &str,
        members: usize,
        access: Access,
    ) -> Cluster {
        let ctl_ns = lab.map(|l| l.host(0).ns.clone());
        let ctl_ip = lab.map_or("127.0.0.1".to_string(), |l| l.host(0).ip.clone());
        let certs = access.etcd_tls.then(|| EtcdCerts::issue(&ctl_ip));
        let (etcd, etcd_url) =
            start_etcd(&dir.join("etcd"), &ctl_ns, &ctl_ip, members, certs.as_ref());
        let etcd_args = certs.as_ref().map_or(Vec::new(), EtcdCerts::rvol);
        let mut c = Cluster {
            dir: dir.to_path_buf(),
            etcd,
            etcd_url,
            controllers: Vec::new(),
            url: String::new(),
            ctl_ip: ctl_ip.clone(),
            wait: wait.to_string(),
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
            access,
            etcd_args,
        };
        c.add_controller();
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

    /// Starts one more controller (a standby, unless none leads).
    pub fn add_controller(&mut self) {
        let listen = format!("{}:{}", self.ctl_ip, free_port());
        let mut args = vec![
            "controller",
            "--etcd",
            &self.etcd_url,
            "--listen",
            &listen,
            "--replica-replenish-wait",
            &self.wait,
            "--leader-ttl",
            "3s",
            // The test's disks are the host's: its fill level must not
            // decide placement.
            "--min-free",
            "0",
        ];
        args.extend(self.access.controller_args.iter().map(String::as_str));
        args.extend(self.etcd_args.iter().map(String::as_str));
        let p = match &self.ctl_ns {
            Some(ns) => Proc::start_in(ns, &args),
            None => Proc::start(&args),
        };
        if !self.url.is_empty() {
            self.url.push(',');
        }
        let scheme = if self.access.https { "https" } else { "http" };
        self.url.push_str(&format!("{scheme}://{listen}"));
        self.controllers.push(p);
    }

    /// Where node `i`'s agent finds encrypted volumes' keys: beside its
    /// disk, not in it (tests find a node's processes by the disk's path).
    pub fn keys_dir(&self, i: usize) -> PathBuf {
        let disk = &self.nodes[i].disk;
        disk.parent().unwrap_or(disk).join("keys")
    }

    pub fn start_agent(&mut self, i: usize) {
        let keys = self.keys_dir(i).display().to_string();
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
            "--keys-dir",
            &keys,
        ];
        let mut args = args.to_vec();
        if let Some(extra) = self.access.agent_args.get(i) {
            args.extend(extra.iter().map(String::as_str));
        }
        args.extend(self.etcd_args.iter().map(String::as_str));
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
        self.cli_with(&[], args)
    }

    /// The same with `env` set over the cluster's CLI environment.
    pub fn cli_with(&self, env: &[(&str, &str)], args: &[&str]) -> Output {
        let mut c = in_ns(&self.ctl_ns, RVOL);
        c.args(args)
            .args(["--cluster", &self.url])
            .env("RUST_LOG", "warn")
            .env_remove("RVOL_CLUSTER_TOKEN_FILE")
            .env_remove("RVOL_CLUSTER_CA_FILE");
        for (k, v) in &self.access.cli_env {
            c.env(k, v);
        }
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().expect("rvol")
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

    /// Waits until the controller sees node `name` alive (or away).
    pub fn wait_alive(&self, name: &str, alive: bool) {
        self.wait_for(
            Duration::from_secs(30),
            &format!("{name} alive={alive}"),
            |c| {
                c.json(&["node", "ls", "--json"])
                    .as_array()
                    .is_some_and(|a| a.iter().any(|n| n["name"] == name && n["alive"] == alive))
            },
        );
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

    /// fio writing and verifying `uri` (from node `i`'s namespace) for
    /// `secs` seconds at a steady rate.
    pub fn fio_verify(&self, i: usize, uri: &str, secs: u32) -> std::process::Child {
        in_ns(&self.nodes[i].ns, "fio")
            .args([
                "--name=verify",
                "--ioengine=nbd",
                &format!("--uri={uri}"),
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=8",
                "--size=32M",
                "--rate_iops=1000",
                &format!("--runtime={secs}"),
                "--time_based",
                "--verify=crc32c",
                "--verify_fatal=1",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .expect("fio")
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

/// Waits for a `fio_verify` run, which must end well with every block
/// verified.
pub fn fio_passed(fio: std::process::Child) {
    let out = fio.wait_with_output().expect("fio");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("verify: bad"),
        "fio: {text}"
    );
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
