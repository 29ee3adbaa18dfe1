//! A real browser and a real reverse proxy for the dashboard's tests:
//! headless Chromium driven through chromedriver by `support/browser.py`
//! (one command a line), and nginx serving an API's Unix socket under a
//! path prefix.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

/// Whether the browser, its driver, selenium and nginx are installed
/// (`scripts/test.sh` installs them). Without them a test says so and
/// passes outside CI; in CI (`CI=true`) their absence fails it.
pub fn available() -> bool {
    let ok = [
        "/usr/bin/chromium",
        "/usr/bin/chromedriver",
        "/usr/sbin/nginx",
    ]
    .iter()
    .all(|p| Path::new(p).exists())
        && Command::new("python3")
            .args(["-c", "import selenium"])
            .status()
            .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var("CI").is_err(),
            "chromium, chromedriver, nginx or selenium is missing: scripts/test.sh installs them"
        );
        eprintln!("SKIPPED: chromium, chromedriver, nginx or selenium is missing");
    }
    ok
}

/// Where a test's screenshots go: `target/test-artifacts/NAME/`.
pub fn artifacts(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target/")
        .join("test-artifacts")
        .join(name)
}

pub struct Browser {
    child: Child,
    to: ChildStdin,
    from: BufReader<ChildStdout>,
}

impl Browser {
    pub fn start(artifacts: &Path) -> Browser {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/browser.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg(artifacts)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let to = child.stdin.take().expect("stdin");
        let from = BufReader::new(child.stdout.take().expect("stdout"));
        let mut b = Browser { child, to, from };
        b.answer().expect("the browser did not start");
        b
    }

    fn answer(&mut self) -> Result<String, String> {
        let mut line = String::new();
        self.from.read_line(&mut line).expect("reading the browser");
        match line.trim_end().split_once(' ') {
            Some(("ok", rest)) => Ok(rest.to_string()),
            Some(("error", rest)) => Err(rest.to_string()),
            _ => Err(format!("the browser said {line:?}")),
        }
    }

    /// Sends one command; its answer or why it failed.
    pub fn try_cmd(&mut self, cmd: &str) -> Result<String, String> {
        writeln!(self.to, "{cmd}").expect("writing to the browser");
        self.answer()
    }

    /// Sends one command; panics (naming it) if it failed.
    pub fn cmd(&mut self, cmd: &str) -> String {
        self.try_cmd(cmd)
            .unwrap_or_else(|e| panic!("browser: {cmd}: {e}"))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = writeln!(self.to, "quit");
        let _ = self.child.wait();
    }
}

/// nginx on a loopback port, proxying `PREFIX/` to a Unix socket's `/`.
pub struct Nginx {
    child: Child,
    pub port: u16,
}

impl Nginx {
    pub fn start(dir: &Path, prefix: &str, socket: &Path) -> Nginx {
        let port = super::free_port();
        std::fs::create_dir_all(dir).unwrap();
        let d = dir.display();
        // The socket is 0600: the proxy's workers run as its owner, as a
        // proxy given access to it would.
        let conf = format!(
            "daemon off; user root; pid {d}/nginx.pid; error_log {d}/error.log;\n\
             events {{}}\n\
             http {{ access_log off; client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
               server {{ listen 127.0.0.1:{port};\n\
                 location {prefix}/ {{ proxy_pass http://unix:{}:/; }} }} }}\n",
            socket.display()
        );
        let path = dir.join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        let child = Command::new("/usr/sbin/nginx")
            .arg("-c")
            .arg(&path)
            .arg("-p")
            .arg(dir)
            .spawn()
            .expect("nginx");
        super::wait_until(
            "nginx listening",
            std::time::Duration::from_secs(10),
            || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        );
        Nginx { child, port }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers too (SIGKILL would orphan them).
        // SAFETY: kill(2) on our own child.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }
}
