//! Shared helpers for tests that run real `rvol` processes and real clients.
#![allow(dead_code)]

pub mod browser;
pub mod cluster;
pub mod direct;
pub mod netns;
pub mod tls;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const RVOL: &str = env!("CARGO_BIN_EXE_rvol");

/// A running `rvol` process; SIGKILLed when dropped if still running.
pub struct Proc {
    pub child: Child,
    pub ready: serde_json::Value,
}

impl Proc {
    /// Starts `rvol ARGS` and waits for its ready line.
    pub fn start(args: &[&str]) -> Proc {
        Self::try_start(args).unwrap_or_else(|e| panic!("rvol {args:?}: {e}"))
    }

    pub fn try_start(args: &[&str]) -> Result<Proc, String> {
        Self::try_start_in(None, args)
    }

    /// Starts `rvol ARGS` inside network namespace `ns`.
    pub fn start_in(ns: &str, args: &[&str]) -> Proc {
        Self::try_start_in(Some(ns), args).unwrap_or_else(|e| panic!("rvol {args:?} in {ns}: {e}"))
    }

    fn try_start_in(ns: Option<&str>, args: &[&str]) -> Result<Proc, String> {
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, RVOL]);
                c
            }
            None => Command::new(RVOL),
        };
        let mut child = cmd
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        match serde_json::from_str::<serde_json::Value>(&line) {
            Ok(v) if v["event"] == "ready" => Ok(Proc { child, ready: v }),
            _ => {
                let status = child.wait().map_err(|e| e.to_string())?;
                Err(format!("did not become ready ({status}); stdout: {line:?}"))
            }
        }
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, sig);
        }
    }

    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }

    /// SIGTERM, then the exit code.
    pub fn stop(&mut self) -> i32 {
        self.signal(libc::SIGTERM);
        self.wait_exit(Duration::from_secs(30))
    }

    pub fn wait_exit(&mut self, limit: Duration) -> i32 {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "process did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.is_running() {
            self.kill9();
        }
    }
}

/// A replica process with its directory.
pub struct ReplicaProc {
    pub dir: PathBuf,
    pub proc: Proc,
    pub addr: String,
}

impl ReplicaProc {
    /// Starts a replica in `dir` on a fresh loopback port (or the port it had).
    pub fn start(dir: &Path, size: &str, listen: &str) -> ReplicaProc {
        let tls = if tls::enabled() && !listen.starts_with("unix:") {
            tls::replica(listen)
        } else {
            Vec::new()
        };
        let mut args = vec![
            "replica",
            "--dir",
            dir.to_str().unwrap(),
            "--listen",
            listen,
            "--size",
            size,
        ];
        args.extend(tls.iter().map(String::as_str));
        let proc = Proc::start(&args);
        let addr = proc.ready["listen"].as_str().unwrap().to_string();
        ReplicaProc {
            dir: dir.to_path_buf(),
            proc,
            addr,
        }
    }

    pub fn restart(&mut self, size: &str) {
        let addr = self.addr.clone();
        *self = ReplicaProc::start(&self.dir.clone(), size, &addr);
    }
}

/// A loopback TCP port for an address that must outlive its process, such
/// as a replica restarted where the engine expects it. Anything that only
/// needs *a* port binds port 0 and reports what it got instead.
///
/// Ports come from below the kernel's ephemeral range (32768 and up by
/// default), distinct within this test binary: a port picked from that
/// range and released could be taken by any outgoing connection or
/// port-0 listener before its process binds it again.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    const FIRST: u16 = 20_000;
    const SPAN: u16 = 12_000;
    static NEXT: AtomicU16 = AtomicU16::new(0);
    // Test binaries run one after another; starting each at its own place
    // keeps a port from being reused while a dead one's sockets linger.
    let start = (std::process::id() % u32::from(SPAN)) as u16;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = FIRST + (start.wrapping_add(n)) % SPAN;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// An engine over the given replica addresses, NBD on a port of its own
/// choosing; returns it, its NBD URI and its admin API's address.
pub fn start_engine(
    name: &str,
    size: &str,
    replicas: &[String],
    extra: &[&str],
) -> (Proc, String, String) {
    let mut frontend = vec!["--nbd-listen", "127.0.0.1:0"];
    frontend.extend_from_slice(extra);
    let (p, admin) = start_engine_with(name, size, replicas, &frontend);
    let nbd = p.ready["nbd"][0].as_str().expect("NBD address").to_string();
    (p, format!("nbd://{nbd}"), admin)
}

/// An engine in maintenance mode (`--frontend none`): the admin API only.
pub fn start_maintenance_engine(name: &str, size: &str, replicas: &[String]) -> (Proc, String) {
    start_engine_with(name, size, replicas, &["--frontend", "none"])
}

/// An engine with the admin API on a port of its own choosing; returns it
/// and the API's address.
fn start_engine_with(
    name: &str,
    size: &str,
    replicas: &[String],
    extra: &[&str],
) -> (Proc, String) {
    let args = engine_args_as_run(name, size, replicas, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let p = Proc::start(&args);
    let admin = p.ready["admin"]
        .as_str()
        .expect("admin address")
        .to_string();
    (p, admin)
}

/// Whether every engine the helpers start encrypts its volume
/// (`RVOL_TEST_ENCRYPTION=1`; `scripts/test.sh` runs a selection so).
pub fn encryption_enabled() -> bool {
    std::env::var("RVOL_TEST_ENCRYPTION").is_ok_and(|v| v == "1")
}

/// A key file of 32 random bytes in the test binary's scratch space.
pub fn new_key_file(name: &str) -> PathBuf {
    let path =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}.key", std::process::id()));
    let mut secret = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut secret))
        .unwrap();
    std::fs::write(&path, secret).unwrap();
    path
}

/// The one key of this test binary's engines when encryption is on.
fn test_key() -> &'static Path {
    static KEY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    KEY.get_or_init(|| new_key_file("volumes"))
}

/// The engine flags of [`encryption_enabled`]: none when it is off.
pub fn encryption_args() -> Vec<String> {
    match encryption_enabled() {
        true => vec![
            "--encryption-key-file".to_string(),
            test_key().display().to_string(),
        ],
        false => Vec::new(),
    }
}

/// `rvol engine` arguments for a volume over `replicas`, the admin API on
/// a port of its own choosing, then `extra`.
pub fn engine_args(name: &str, size: &str, replicas: &[String], extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["engine", "--name", name, "--size", size]
        .into_iter()
        .chain(["--admin-listen", "127.0.0.1:0"])
        .map(String::from)
        .collect();
    if !extra.contains(&"--encryption-key-file") {
        args.extend(encryption_args());
    }
    for r in replicas {
        args.extend(["--replica".to_string(), r.clone()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// [`engine_args`] with the TLS flags the helpers' engines get when the
/// run is with TLS (`RVOL_TEST_TLS=1`).
pub fn engine_args_as_run(
    name: &str,
    size: &str,
    replicas: &[String],
    extra: &[&str],
) -> Vec<String> {
    let mut args = engine_args(name, size, replicas, extra);
    if tls::enabled() {
        args.extend(tls::engine(name));
    }
    args
}

/// Runs a command, returning its output; panics if it cannot start.
pub fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd).args(args).output().unwrap_or_else(|e| {
        panic!("cannot run {cmd}: {e} (is it installed? scripts/test.sh installs it)")
    })
}

/// How long a process that must refuse to start may take to exit.
pub const REFUSAL_LIMIT: Duration = Duration::from_secs(20);

/// Runs a command that should exit by itself, such as a server that must
/// refuse to start. Kills it and fails the test if it is still running
/// after `limit`: a server that wrongly started would otherwise hang the
/// test instead of failing it.
pub fn run_within(limit: Duration, cmd: &str, args: &[&str]) -> Output {
    let mut child = Command::new(cmd)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{cmd} {args:?} still running after {limit:?}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Runs a command and asserts it succeeded; returns stdout.
pub fn run_ok(cmd: &str, args: &[&str]) -> String {
    let out = run(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The engine's status as JSON, through the CLI.
pub fn status(admin: &str) -> serde_json::Value {
    let out = run_ok(RVOL, &["volume", "status", "--admin", admin, "--json"]);
    serde_json::from_str(&out).expect("status JSON")
}

/// GETs `path` from an admin address over plain HTTP; returns the body.
pub fn http_get(admin: &str, path: &str) -> String {
    let mut s = TcpStream::connect(admin).expect("connecting to the admin API");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: rvol\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").expect("an HTTP reply");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

pub fn tool_available(name: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Three replicas under `base`, each on a fresh port.
pub fn three_replicas(base: &Path, size: &str) -> Vec<ReplicaProc> {
    (0..3)
        .map(|i| ReplicaProc::start(&base.join(format!("r{i}")), size, "127.0.0.1:0"))
        .collect()
}

/// `n` replicas under `base`, each on a Unix socket of its own (no TLS
/// there, whatever the helpers' mode).
pub fn unix_replicas(base: &Path, n: usize, size: &str) -> Vec<ReplicaProc> {
    (0..n)
        .map(|i| {
            let sock = format!("unix:{}", base.join(format!("r{i}.sock")).display());
            ReplicaProc::start(&base.join(format!("r{i}")), size, &sock)
        })
        .collect()
}

/// Replicas on ports chosen now, so that each can be restarted at the same
/// address.
pub fn replicas_on_fixed_ports(base: &Path, n: usize, size: &str) -> Vec<ReplicaProc> {
    (0..n)
        .map(|i| {
            ReplicaProc::start(
                &base.join(format!("r{i}")),
                size,
                &format!("127.0.0.1:{}", free_port()),
            )
        })
        .collect()
}

/// Each replica's mode (RW/WO/ERR) as the engine's status reports it.
pub fn modes(admin: &str) -> Vec<String> {
    status(admin)["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["mode"].as_str().unwrap().to_string())
        .collect()
}

pub fn addrs(rs: &[ReplicaProc]) -> Vec<String> {
    rs.iter().map(|r| r.addr.clone()).collect()
}

/// Runs qemu-io on a raw NBD export with each of `cmds` (`-c`); asserts it
/// succeeded (a failed pattern check fails it) and returns its stdout.
/// qemu-io writes through (every write FUA) unless told otherwise.
pub fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut args = vec!["-f", "raw", uri];
    for c in cmds {
        args.extend(["-c", c]);
    }
    run_ok("qemu-io", &args)
}

/// A deterministic xorshift generator for tests.
pub fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

/// Copies a raw image file into the volume at `uri` (qemu-img).
pub fn import_file(src: &Path, uri: &str) {
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            src.to_str().unwrap(),
            uri,
        ],
    );
}

/// Bytes allocated on disk by the files of a directory.
pub fn du(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().blocks() * 512)
        .sum()
}

pub fn export_to_file(uri: &str, dest: &Path) {
    let dest = dest.to_str().unwrap();
    run_ok(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", uri, dest],
    );
}

/// sha256 of the whole export, copied out with qemu-img into `tmp`.
pub fn export_sha(uri: &str, tmp: &Path) -> String {
    let out = tmp.join("export.img");
    export_to_file(uri, &out);
    let sha = sha256_file(&out);
    std::fs::remove_file(&out).unwrap();
    sha
}

/// A deterministic pseudo-random byte stream (xorshift).
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn sha256_file(path: &Path) -> String {
    run_ok("sha256sum", &[path.to_str().unwrap()])
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Runs a Python script with libnbd's bindings (Debian's python3-libnbd,
/// which lives beside Debian's python, whatever `python3` is on PATH).
pub fn libnbd_python(script: &str) -> String {
    run_ok("/usr/bin/python3", &["-c", script])
}

pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_GO: u32 = 7;
pub const REP_ACK: u32 = 1;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

/// A byte stream to an NBD server (TCP or Unix).
pub trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// A raw NBD client: every byte on the wire is the test's choice.
pub struct RawNbd(pub Box<dyn Stream>);

impl RawNbd {
    pub fn connect(uri: &str) -> RawNbd {
        let mut r = if let Some(path) = uri.strip_prefix("unix:") {
            let s = std::os::unix::net::UnixStream::connect(path).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            RawNbd(Box::new(s))
        } else {
            let s = TcpStream::connect(uri.trim_start_matches("nbd://")).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            RawNbd(Box::new(s))
        };
        let mut hello = [0u8; 18];
        r.0.read_exact(&mut hello).unwrap();
        assert_eq!(&hello[..8], b"NBDMAGIC");
        r.0.write_all(&3u32.to_be_bytes()).unwrap(); // fixed newstyle, no zeroes
        r
    }

    pub fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.0.write_all(&b).unwrap();
    }

    /// Reads one option reply: (type, data).
    pub fn option_reply(&mut self) -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.0.read_exact(&mut h).unwrap();
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        self.0.read_exact(&mut d).unwrap();
        (kind, d)
    }

    pub fn go(&mut self, name: &str) -> u32 {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        self.option(OPT_GO, &d);
        loop {
            let (kind, _) = self.option_reply();
            if kind != 3 {
                return kind;
            }
        }
    }

    pub fn request(&mut self, cmd: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) {
        let mut b = 0x2560_9513u32.to_be_bytes().to_vec();
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&cmd.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.0.write_all(&b).unwrap();
    }

    /// Reads a simple reply: (error, cookie), then `data` bytes on success.
    pub fn reply(&mut self, data: usize) -> (u32, u64, Vec<u8>) {
        let mut h = [0u8; 16];
        self.0.read_exact(&mut h).unwrap();
        assert_eq!(u32::from_be_bytes(h[..4].try_into().unwrap()), 0x6744_6698);
        let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let mut d = vec![0u8; if err == 0 { data } else { 0 }];
        self.0.read_exact(&mut d).unwrap();
        (err, cookie, d)
    }

    pub fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.0.read(&mut b), Ok(0) | Err(_))
    }
}

impl RawNbd {
    /// Like `request`, but reports a broken connection instead of panicking.
    pub fn try_request(
        &mut self,
        cmd: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> std::io::Result<()> {
        let mut b = 0x2560_9513u32.to_be_bytes().to_vec();
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&cmd.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.0.write_all(&b)
    }

    /// Like `reply`, but reports a broken connection instead of panicking.
    pub fn try_reply(&mut self, data: usize) -> std::io::Result<(u32, u64, Vec<u8>)> {
        let mut h = [0u8; 16];
        self.0.read_exact(&mut h)?;
        let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let mut d = vec![0u8; if err == 0 { data } else { 0 }];
        self.0.read_exact(&mut d)?;
        Ok((err, cookie, d))
    }

    /// Connects and enters transmission on the default export.
    pub fn open(uri: &str) -> RawNbd {
        let mut c = RawNbd::connect(uri);
        assert_eq!(c.go(""), REP_ACK);
        c
    }
}

/// Runs a command inside network namespace `ns`; asserts success.
pub fn run_in_ok(ns: &str, cmd: &str, args: &[&str]) -> String {
    let mut all = vec!["netns", "exec", ns, cmd];
    all.extend_from_slice(args);
    run_ok("ip", &all)
}

/// A writer thread: 4 KiB writes of unique data with a flush every 32,
/// failing on any error reply; on `finish` it reads every block back and
/// checks it holds the newest acknowledged write.
pub struct Writer {
    pub acked: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<()>,
}

impl Writer {
    pub fn start(uri: &str, blocks: u64) -> Writer {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let acked = std::sync::Arc::new(AtomicU64::new(0));
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let (a, st, uri) = (acked.clone(), stop.clone(), uri.to_string());
        let handle = std::thread::spawn(move || {
            let mut c = RawNbd::open(&uri);
            let mut newest = std::collections::HashMap::new();
            let mut n = 0u64;
            while !st.load(Ordering::Acquire) {
                n += 1;
                let block = (n * 7919) % blocks;
                let data = pseudo_random(n, 4096);
                c.request(1, n, block * 4096, 4096, &data);
                assert_eq!(c.reply(0).0, 0, "write {n} failed");
                if n.is_multiple_of(32) {
                    c.request(3, 0, 0, 0, &[]);
                    assert_eq!(c.reply(0).0, 0, "flush failed");
                }
                newest.insert(block, data);
                a.fetch_add(1, Ordering::Release);
            }
            for (b, d) in newest {
                c.request(0, b, b * 4096, 4096, &[]);
                let (err, _, got) = c.reply(4096);
                assert_eq!(err, 0);
                assert!(got == d, "block {b} lost an acknowledged write");
            }
        });
        Writer {
            acked,
            stop,
            handle,
        }
    }

    pub fn acked(&self) -> u64 {
        self.acked.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Waits until `more` further writes are acknowledged.
    pub fn wait_progress(&self, more: u64, limit: Duration) {
        let target = self.acked() + more;
        let deadline = Instant::now() + limit;
        while self.acked() < target {
            assert!(
                Instant::now() < deadline,
                "the writer made no progress ({} acked)",
                self.acked()
            );
            assert!(!self.handle.is_finished(), "the writer failed");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops, then verifies every block; panics if the writer saw an error.
    pub fn finish(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        self.handle
            .join()
            .expect("the writer saw an error or lost data");
    }
}

pub fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Block contents that name the write that produced them.
pub fn block_for(id: u64, block: u64) -> Vec<u8> {
    let mut b = pseudo_random(
        id.wrapping_mul(0x9e37_79b9) ^ block,
        rvol_replica::BLOCK_SIZE as usize,
    );
    b[..8].copy_from_slice(&id.to_le_bytes());
    b[8..16].copy_from_slice(&block.to_le_bytes());
    b
}

pub fn id_of(data: &[u8], block: u64) -> Option<u64> {
    if data.iter().all(|&b| b == 0) {
        return None;
    }
    let id = u64::from_le_bytes(data[..8].try_into().unwrap());
    assert_eq!(
        data,
        &block_for(id, block)[..],
        "block {block} holds a torn or foreign write"
    );
    Some(id)
}

/// Parses an exposition with `prometheus_client`'s OpenMetrics parser;
/// returns each sample's value by its name and sorted labels.
pub fn parse_openmetrics(exposition: &str) -> std::collections::HashMap<String, f64> {
    let script = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "volume")
        out[f"{s.name}{{{labels}}}"] = s.value
print(json.dumps(out))
"#;
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the exposition does not parse: {}\n{exposition}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}
