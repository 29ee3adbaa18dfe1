//! The table of what an agent runs, brought to what the cluster wants on
//! every pass ([`Supervisor::converge`]): level-triggered, so a pass after
//! a crash, a lost update or an agent restart does the same as any other.
//!
//! - A wanted process that is not running is started, unless its start is
//!   held (an engine waiting for an in-sync replica); one that exited is
//!   restarted after a delay that doubles with each restart up to
//!   [`MAX_BACKOFF`], except on an exit code it names as final (an engine
//!   fenced by a newer one must stay down).
//! - A process no longer wanted gets SIGTERM (an engine then flushes and
//!   marks its replicas clean), SIGKILL after [`STOP_GRACE`], and leaves
//!   the table once it has exited.
//! - At start, every process a previous agent recorded is adopted if it
//!   still runs (see [`super::process`]); nothing is restarted for it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::process::{last_log_line, Liveness, Process, Spec};
use crate::model::ProcessState;

/// The longest wait between restarts of a crashing process.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long a process asked to stop has before it is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(30);

/// A process the cluster wants.
#[derive(Debug, Clone)]
pub struct Wanted {
    pub spec: Spec,
    /// Why it must not be started yet, if it must not.
    pub hold: Option<String>,
    /// An exit code after which it stays down.
    pub final_exit: Option<i32>,
}

#[derive(Debug)]
struct Entry {
    process: Option<Process>,
    state: ProcessState,
    restarts: u32,
    retry_at: Instant,
    /// When it was asked to stop.
    stopping: Option<Instant>,
}

pub struct Supervisor {
    run_dir: PathBuf,
    table: BTreeMap<String, Entry>,
}

impl Supervisor {
    /// Adopts whatever a previous agent left running in `run_dir`.
    pub fn new(run_dir: &Path) -> Supervisor {
        let mut table = BTreeMap::new();
        for key in Process::recorded(run_dir) {
            match Process::adopt(run_dir, &key) {
                Some(p) => {
                    tracing::info!(%key, pid = p.pid, "adopted a running process");
                    table.insert(
                        key,
                        Entry {
                            state: ProcessState::Running { pid: p.pid },
                            process: Some(p),
                            restarts: 0,
                            retry_at: Instant::now(),
                            stopping: None,
                        },
                    );
                }
                None => {
                    let _ = std::fs::remove_file(run_dir.join(format!("{key}.pid")));
                }
            }
        }
        Supervisor {
            run_dir: run_dir.to_path_buf(),
            table,
        }
    }

    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// One pass; see the module docs.
    pub fn converge(&mut self, wanted: &[Wanted]) {
        let now = Instant::now();
        for w in wanted {
            let key = &w.spec.key;
            let entry = self.table.entry(key.clone()).or_insert_with(|| Entry {
                process: None,
                state: ProcessState::Starting,
                restarts: 0,
                retry_at: now,
                stopping: None,
            });
            entry.stopping = None;
            if let Some(p) = &entry.process {
                match p.poll() {
                    Liveness::Running => {
                        entry.state = ProcessState::Running { pid: p.pid };
                        continue;
                    }
                    Liveness::Exited(code) => {
                        let words = p.last_words();
                        let error = match code {
                            Some(c) => format!("exited with status {c}: {words}"),
                            None => format!("exited: {words}"),
                        };
                        tracing::warn!(%key, %error, "process ended");
                        if let Some(p) = entry.process.take() {
                            p.forget();
                        }
                        let delay =
                            Duration::from_secs(1 << entry.restarts.min(5)).min(MAX_BACKOFF);
                        entry.retry_at = now + delay;
                        entry.state = ProcessState::Failed {
                            error,
                            restarts: entry.restarts,
                        };
                        if code.is_some() && code == w.final_exit {
                            // Stays down for as long as it is wanted so.
                            entry.retry_at = now + Duration::from_secs(u32::MAX as u64);
                        }
                        continue;
                    }
                }
            }
            if let Some(reason) = &w.hold {
                entry.state = ProcessState::Waiting {
                    reason: reason.clone(),
                };
                continue;
            }
            if now < entry.retry_at {
                continue;
            }
            match Process::start(&self.run_dir, w.spec.clone()) {
                Ok(p) => {
                    tracing::info!(%key, pid = p.pid, "started");
                    if matches!(entry.state, ProcessState::Failed { .. }) {
                        entry.restarts += 1;
                    }
                    entry.state = ProcessState::Starting;
                    entry.process = Some(p);
                }
                Err(e) => {
                    entry.retry_at = now + MAX_BACKOFF.min(Duration::from_secs(5));
                    entry.state = ProcessState::Failed {
                        error: format!("cannot start: {e}"),
                        restarts: entry.restarts,
                    };
                }
            }
        }
        // What is no longer wanted stops.
        let keys: Vec<String> = self.table.keys().cloned().collect();
        for key in keys {
            if wanted.iter().any(|w| w.spec.key == key) {
                continue;
            }
            let Some(entry) = self.table.get_mut(&key) else {
                continue;
            };
            let running = entry
                .process
                .as_ref()
                .is_some_and(|p| p.poll() == Liveness::Running);
            if !running {
                if let Some(p) = entry.process.take() {
                    p.forget();
                }
                self.table.remove(&key);
                continue;
            }
            let Some(p) = &entry.process else { continue };
            match entry.stopping {
                None => {
                    tracing::info!(%key, pid = p.pid, "stopping");
                    p.signal(libc::SIGTERM);
                    entry.stopping = Some(now);
                }
                Some(since) if now - since > STOP_GRACE => {
                    tracing::warn!(%key, pid = p.pid, "did not stop in time: killed");
                    p.signal(libc::SIGKILL);
                }
                Some(_) => {}
            }
        }
    }

    /// The state of `key`; a process that printed no ready line yet is
    /// still starting.
    pub fn state(&self, key: &str) -> Option<ProcessState> {
        let e = self.table.get(key)?;
        match (&e.state, &e.process) {
            (ProcessState::Running { .. }, Some(p)) if p.ready().is_none() => {
                Some(ProcessState::Starting)
            }
            (s, _) => Some(s.clone()),
        }
    }

    /// The running process of `key`, once it said it is ready, and what
    /// it said.
    pub fn ready(&self, key: &str) -> Option<(&Process, serde_json::Value)> {
        let p = self.table.get(key)?.process.as_ref()?;
        p.ready().map(|r| (p, r))
    }

    /// Whether a process is starting (no ready line yet) or stopping.
    pub fn busy(&self) -> bool {
        self.table
            .iter()
            .any(|(key, e)| e.stopping.is_some() || self.state(key) == Some(ProcessState::Starting))
    }

    /// Whether anything is known under `key`: a process running or
    /// stopping, one failed and waiting to restart, or one held.
    pub fn holds(&self, key: &str) -> bool {
        self.table.contains_key(key)
    }

    /// Whether a process runs (or is stopping) under `key`.
    pub fn runs(&self, key: &str) -> bool {
        self.table.get(key).is_some_and(|e| e.process.is_some())
    }

    /// The last line a process under `key` logged.
    pub fn last_words(&self, key: &str) -> String {
        last_log_line(&self.run_dir, key)
    }
}
