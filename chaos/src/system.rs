//! The system under test: replica processes on their nodes, one engine
//! at a time, and what the clients need to find it. Every process is a
//! real `rvol` in its node's namespace, logging to a file under the run's
//! directory.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::history::{Epoch, Instance, Nanos};
use crate::lab::{path, Lab};

pub const VOLUME: &str = "chaos";
const NBD_PORT: u16 = 10809;
const ADMIN_PORT: u16 = 9800;
const REPLICA_PORT: u16 = 4001;

/// What the clients share with the soak.
pub struct Shared {
    pub started: Instant,
    /// The engine serving now, if one is.
    pub engine: Mutex<Option<(Epoch, SocketAddr)>>,
    /// Clients hold it shared for each request; the soak holds it alone
    /// to read the volume quietly (checkpoints).
    pub gate: RwLock<()>,
    pub stop: AtomicBool,
}

impl Shared {
    pub fn now(&self) -> Nanos {
        self.started.elapsed().as_nanos() as Nanos
    }
}

pub struct Proc {
    child: Child,
    pub stopped: bool,
}

impl Proc {
    fn spawn(ns: &str, program: &Path, args: &[String], log: &Path) -> Result<Proc> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(program)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting rvol")?;
        Ok(Proc {
            child,
            stopped: false,
        })
    }

    pub fn signal(&mut self, sig: i32) {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
        if sig == libc::SIGSTOP {
            self.stopped = true;
        } else if sig == libc::SIGCONT {
            self.stopped = false;
        }
    }

    pub fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }

    /// SIGTERM, then SIGKILL after `limit`.
    pub fn terminate(&mut self, limit: Duration) {
        if self.stopped {
            self.signal(libc::SIGCONT);
        }
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.exited() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
    }

    pub fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct Engine {
    pub proc: Proc,
    pub epoch: Epoch,
    pub node: String,
}

pub struct System {
    pub lab: Lab,
    rvol: PathBuf,
    work: PathBuf,
    pub shared: Arc<Shared>,
    pub initial_size: u64,
    /// Replica processes by node, and each node's replica directory.
    pub replicas: BTreeMap<String, Proc>,
    dirs: BTreeMap<String, PathBuf>,
    /// The volume's replica set, by node.
    pub members: Vec<String>,
    pub engine: Option<Engine>,
    pub instances: Vec<Instance>,
    extra_engine_args: Vec<String>,
}

impl System {
    pub fn new(
        lab: Lab,
        rvol: PathBuf,
        work: PathBuf,
        size: u64,
        members: Vec<String>,
        extra_engine_args: Vec<String>,
    ) -> System {
        System {
            lab,
            rvol,
            work,
            shared: Arc::new(Shared {
                started: Instant::now(),
                engine: Mutex::new(None),
                gate: RwLock::new(()),
                stop: AtomicBool::new(false),
            }),
            initial_size: size,
            replicas: BTreeMap::new(),
            dirs: BTreeMap::new(),
            members,
            engine: None,
            instances: Vec::new(),
            extra_engine_args,
        }
    }

    pub fn replica_addr(&self, node: &str) -> String {
        format!("{}:{REPLICA_PORT}", self.lab.node(node).ip)
    }

    pub fn log(&self, what: &str) -> PathBuf {
        self.work.join(format!("{what}.log"))
    }

    /// Starts (or restarts) the replica process of `node`; `fresh` gives
    /// it a new, empty directory.
    pub fn start_replica(&mut self, node: &str, fresh: bool) -> Result<()> {
        if fresh || !self.dirs.contains_key(node) {
            let disk = self.lab.node(node).disk.clone().context("no disk")?;
            let n = std::fs::read_dir(&disk)?.count();
            let dir = disk.join(format!("replica{n}"));
            self.dirs.insert(node.to_string(), dir);
        }
        let args: Vec<String> = [
            "replica",
            "--dir",
            path(&self.dirs[node])?,
            "--listen",
            &self.replica_addr(node),
            "--size",
            &self.initial_size.to_string(),
        ]
        .map(String::from)
        .to_vec();
        let ns = self.lab.node(node).ns.clone();
        let p = Proc::spawn(
            &ns,
            &self.rvol,
            &args,
            &self.log(&format!("replica-{node}")),
        )?;
        self.replicas.insert(node.to_string(), p);
        Ok(())
    }

    pub fn replica_dir(&self, node: &str) -> Option<&PathBuf> {
        self.dirs.get(node)
    }

    /// Starts an engine on `node` over the replica set and waits until it
    /// answers; the clients find it once this returns.
    pub fn start_engine(&mut self, node: &str) -> Result<()> {
        let epoch = self.instances.len() as Epoch;
        let ip = self.lab.node(node).ip.clone();
        let mut args: Vec<String> = [
            "engine",
            "--name",
            VOLUME,
            "--size",
            &self.initial_size.to_string(),
            "--nbd-listen",
            &format!("{ip}:{NBD_PORT}"),
            "--admin-listen",
            &format!("{ip}:{ADMIN_PORT}"),
        ]
        .map(String::from)
        .to_vec();
        for m in &self.members {
            args.extend(["--replica".into(), self.replica_addr(m)]);
        }
        args.extend(self.extra_engine_args.iter().cloned());
        let ns = self.lab.node(node).ns.clone();
        let mut proc = Proc::spawn(&ns, &self.rvol, &args, &self.log(&format!("engine-{node}")))?;
        let started = self.shared.now();
        let admin: SocketAddr = format!("{ip}:{ADMIN_PORT}").parse()?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if proc.exited() {
                bail!("the engine on {node} exited at start (see its log)");
            }
            if http(admin, "GET", "/v1/volume", None).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                proc.kill();
                bail!("the engine on {node} did not answer within 60 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.instances.push(Instance {
            epoch,
            node: node.to_string(),
            started,
            ended: None,
        });
        self.engine = Some(Engine {
            proc,
            epoch,
            node: node.to_string(),
        });
        let nbd = format!("{ip}:{NBD_PORT}").parse()?;
        *self.shared.engine.lock().unwrap_or_else(|e| e.into_inner()) = Some((epoch, nbd));
        Ok(())
    }

    /// Takes the engine away from the clients (they reconnect to the next).
    pub fn hide_engine(&self) {
        *self.shared.engine.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Records the end of the engine, which is gone (killed or exited).
    pub fn engine_gone(&mut self) -> Option<Engine> {
        let e = self.engine.take()?;
        self.hide_engine();
        let now = self.shared.now();
        if let Some(i) = self.instances.iter_mut().find(|i| i.epoch == e.epoch) {
            i.ended = Some(now);
        }
        Some(e)
    }

    pub fn admin(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(u16, serde_json::Value)> {
        let e = self.engine.as_ref().context("no engine")?;
        let addr: SocketAddr = format!("{}:{ADMIN_PORT}", self.lab.node(&e.node).ip).parse()?;
        http(addr, method, path, body)
    }
}

/// One HTTP/1.1 request on its own connection; the status and the JSON
/// answer (null when empty).
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<(u16, serde_json::Value)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    // An engine busy with a frozen replica answers late; the soak goes
    // on lifting faults meanwhile.
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: rvol\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)
        .with_context(|| format!("{method} {path}: no answer"))?;
    let text = String::from_utf8_lossy(&answer);
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .context("an HTTP answer without a body")?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("an HTTP answer without a status")?;
    let json = if rest.trim().is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(rest).with_context(|| format!("{path}: {rest}"))?
    };
    Ok((code, json))
}
