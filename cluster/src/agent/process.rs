//! The processes an agent runs (replicas and engines), started so that
//! they outlive it.
//!
//! **An agent's death takes nothing with it.** Each process gets its own
//! session (`setsid`), so no signal meant for the agent's terminal or
//! process group reaches it, and its stdout and stderr go to files in the
//! agent's run directory, never to a pipe the agent holds: a dead agent
//! leaves no reader whose absence could kill a writer.
//!
//! **Adoption is exact.** Next to each process, a pid file holds its pid
//! and its command line. A new agent adopts a process only if
//! `/proc/PID/cmdline` is still exactly that command line, so a pid the
//! kernel gave to something else since is never mistaken for it (and
//! never signalled).
//!
//! **Liveness.** A process this agent started is its child: it is reaped
//! with `waitpid(WNOHANG)`, which also yields its exit status. An adopted
//! one is not (init reaps it), so it is alive while `/proc/PID` exists,
//! is not a zombie and runs the same command line; its exit status is not
//! known.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

/// What to run, under a key unique in the agent (`replica.VOL.UID.r1`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    pub key: String,
    /// The program and its arguments.
    pub argv: Vec<String>,
}

/// A running (or lately running) process.
#[derive(Debug)]
pub struct Process {
    pub spec: Spec,
    pub pid: u32,
    child: bool,
    run_dir: PathBuf,
}

/// How a process is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    Running,
    /// Exited; its status when known (the agent's own children only).
    Exited(Option<i32>),
}

fn pid_file(run_dir: &Path, key: &str) -> PathBuf {
    run_dir.join(format!("{key}.pid"))
}

/// Where the process's stdout goes: its `ready` line.
pub fn out_file(run_dir: &Path, key: &str) -> PathBuf {
    run_dir.join(format!("{key}.out"))
}

/// Where the process's log (stderr) goes.
pub fn log_file(run_dir: &Path, key: &str) -> PathBuf {
    run_dir.join(format!("{key}.log"))
}

fn cmdline(argv: &[String]) -> Vec<u8> {
    let mut v = Vec::new();
    for a in argv {
        v.extend_from_slice(a.as_bytes());
        v.push(0);
    }
    v
}

impl Process {
    /// Starts `spec` in its own session; see the module docs.
    pub fn start(run_dir: &Path, spec: Spec) -> std::io::Result<Process> {
        let (program, args) = spec
            .argv
            .split_first()
            .ok_or_else(|| std::io::Error::other("an empty command line"))?;
        let out = std::fs::File::create(out_file(run_dir, &spec.key))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_file(run_dir, &spec.key))?;
        let mut cmd = std::process::Command::new(program);
        cmd.args(args)
            .stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(log);
        // SAFETY: setsid is async-signal-safe and touches no memory.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        let pid = child.id();
        // The handle is dropped without waiting: `poll` reaps the child.
        drop(child);
        let mut record = format!("{pid}\n").into_bytes();
        record.extend_from_slice(&cmdline(&spec.argv));
        let path = pid_file(run_dir, &spec.key);
        let tmp = path.with_extension("pid.tmp");
        std::fs::write(&tmp, record).and_then(|_| std::fs::rename(&tmp, &path))?;
        Ok(Process {
            spec,
            pid,
            child: true,
            run_dir: run_dir.to_path_buf(),
        })
    }

    /// The process a previous agent started for `key`, if it still runs
    /// (see the module docs); returns its command line too.
    pub fn adopt(run_dir: &Path, key: &str) -> Option<Process> {
        let record = std::fs::read(pid_file(run_dir, key)).ok()?;
        let newline = record.iter().position(|&b| b == b'\n')?;
        let pid: u32 = std::str::from_utf8(&record[..newline])
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let line = &record[newline + 1..];
        let argv: Vec<String> = line
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let p = Process {
            spec: Spec {
                key: key.to_string(),
                argv,
            },
            pid,
            child: false,
            run_dir: run_dir.to_path_buf(),
        };
        (p.same_program_running()).then_some(p)
    }

    /// The keys of every pid file in `run_dir`.
    pub fn recorded(run_dir: &Path) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(run_dir) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                name.strip_suffix(".pid").map(str::to_string)
            })
            .collect()
    }

    fn same_program_running(&self) -> bool {
        let proc = PathBuf::from(format!("/proc/{}", self.pid));
        let running = std::fs::read_to_string(proc.join("stat")).is_ok_and(|stat| {
            // The state follows the parenthesised command name.
            stat.rsplit_once(") ")
                .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X'))
        });
        running && std::fs::read(proc.join("cmdline")).ok() == Some(cmdline(&self.spec.argv))
    }

    /// Whether it still runs; reaps it if it is this agent's child.
    pub fn poll(&self) -> Liveness {
        if self.child {
            let mut status = 0;
            // SAFETY: waitpid on our own child's pid with a valid pointer.
            let r = unsafe { libc::waitpid(self.pid as i32, &mut status, libc::WNOHANG) };
            if r == self.pid as i32 {
                let code = if libc::WIFEXITED(status) {
                    Some(libc::WEXITSTATUS(status))
                } else {
                    None
                };
                return Liveness::Exited(code);
            }
            if r == 0 {
                return Liveness::Running;
            }
        }
        if self.same_program_running() {
            Liveness::Running
        } else {
            Liveness::Exited(None)
        }
    }

    /// Sends `signal` if the process is still the one started.
    pub fn signal(&self, signal: i32) {
        if self.poll() == Liveness::Running {
            // SAFETY: kill with a pid checked to run our program.
            unsafe { libc::kill(self.pid as i32, signal) };
        }
    }

    /// Forgets the process: its pid file goes.
    pub fn forget(self) {
        let _ = std::fs::remove_file(pid_file(&self.run_dir, &self.spec.key));
    }

    /// The JSON `ready` line the process printed, once it has.
    pub fn ready(&self) -> Option<serde_json::Value> {
        let out = std::fs::read_to_string(out_file(&self.run_dir, &self.spec.key)).ok()?;
        out.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["event"] == "ready")
    }

    /// The last line of its log, to explain a failure.
    pub fn last_words(&self) -> String {
        last_log_line(&self.run_dir, &self.spec.key)
    }
}

/// The last non-empty line of a process's log.
pub fn last_log_line(run_dir: &Path, key: &str) -> String {
    let log = std::fs::read(log_file(run_dir, key)).unwrap_or_default();
    let tail = &log[log.len().saturating_sub(4096)..];
    String::from_utf8_lossy(tail)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_string()
}

/// `argv` as owned strings.
pub fn argv(program: &Path, args: impl IntoIterator<Item = impl Into<OsString>>) -> Vec<String> {
    std::iter::once(program.as_os_str().to_owned())
        .chain(args.into_iter().map(Into::into))
        .map(|a| a.to_string_lossy().into_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_outlives_its_handle_and_is_adopted_only_while_it_is_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let spec = Spec {
            key: "sleeper".into(),
            argv: argv(Path::new("/bin/sleep"), ["30"]),
        };
        let p = Process::start(dir.path(), spec.clone()).unwrap();
        assert_eq!(p.poll(), Liveness::Running);
        let adopted = Process::adopt(dir.path(), "sleeper").expect("adopted");
        assert_eq!((adopted.pid, &adopted.spec), (p.pid, &spec));
        assert_eq!(Process::recorded(dir.path()), vec!["sleeper".to_string()]);
        p.signal(libc::SIGKILL);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match p.poll() {
                Liveness::Exited(_) => break,
                Liveness::Running => {
                    assert!(std::time::Instant::now() < deadline, "not reaped");
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            }
        }
        // Gone (and reaped): nothing to adopt any more.
        assert!(Process::adopt(dir.path(), "sleeper").is_none());
        assert_eq!(adopted.poll(), Liveness::Exited(None));
    }

    #[test]
    fn a_pid_running_another_program_is_not_adopted() {
        let dir = tempfile::tempdir().unwrap();
        // Our own pid, recorded with a command line that is not ours.
        let record = format!("{}\n/bin/sleep\x0030\x00", std::process::id());
        std::fs::write(dir.path().join("x.pid"), record).unwrap();
        assert!(Process::adopt(dir.path(), "x").is_none());
    }
}
