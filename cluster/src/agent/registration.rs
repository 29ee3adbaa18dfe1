//! An agent's presence in the cluster: its node's record, kept under the
//! agent's lease.
//!
//! **One live agent per node name.** The record is created only where none
//! exists ([`Expect::Absent`]), and it exists only while its lease lives:
//! a second agent started under a live agent's name is refused, naming
//! it. The agent remembers its lease in a file on its first disk, so an
//! agent restarted after a crash (the SIGKILLed agent) finds its
//! own record still leased to it and resumes it at once instead of being
//! refused until the lease runs out; a record leased to anyone else is
//! never taken over.
//!
//! **Heartbeat.** [`Registration::heartbeat`] renews the lease every third
//! of its time to live and rewrites the record (with the disks' free space
//! now) at the revision it last wrote, so a record someone else replaced
//! is never overwritten: the agent stops instead. If the lease expired
//! meanwhile (the store was away longer than the time to live), the agent
//! registers again, which succeeds unless another agent took the name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::model::{decode, encode, Disk, Node, NodeName, PortRange, PROTOCOL};
use crate::store::{Expect, LeaseId, Revision, Store, StoreError};

/// What an agent says about its node.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node: NodeName,
    /// Where the agent is reached.
    pub address: String,
    /// The IP replicas and exports of this node listen on.
    pub advertise: String,
    /// The ports they may use.
    pub ports: PortRange,
    pub zone: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// At least one; the first also keeps the agent's lease file.
    pub disks: Vec<PathBuf>,
    /// How long the node stays registered without a heartbeat.
    pub ttl: Duration,
    /// The node's certificate, key and the cluster's CA: given, replicas
    /// serve mutual TLS only and engines run with certificates the
    /// controller signs.
    pub tls: Option<rvol_tls::TlsFiles>,
    /// Where the keys of encrypted volumes are ([`crate::keys`]).
    pub keys_dir: PathBuf,
    /// The most MiB/s each of this node's engines copies to rebuild a
    /// replica (0: no limit), so rebuilds leave the disks and the
    /// network room for the volumes' own I/O.
    pub rebuild_rate_mib: f64,
    /// Engines evict a replica that stays this many seconds far slower
    /// than its peers (the controller then replaces it); none: they only
    /// report it.
    pub evict_slow_replicas: Option<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("node {node} is held by a live agent at {address}: stop it, or wait up to {ttl:?} after it died")]
    NameTaken {
        node: NodeName,
        address: String,
        ttl: Duration,
    },
    #[error("disk {path}: {message}")]
    Disk { path: String, message: String },
}

/// A registered agent; see the module docs.
pub struct Registration<S> {
    store: Arc<S>,
    config: AgentConfig,
    lease: LeaseId,
    revision: Revision,
}

const LEASE_FILE: &str = ".rvol-agent-lease";

fn disk(path: &Path) -> Result<Disk, AgentError> {
    let err = |message: String| AgentError::Disk {
        path: path.display().to_string(),
        message,
    };
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| err("the path holds a NUL byte".into()))?;
    // SAFETY: statvfs with a valid C string and a zeroed out-struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(err(std::io::Error::last_os_error().to_string()));
    }
    let unit = st.f_frsize as u64;
    Ok(Disk {
        path: path.display().to_string(),
        capacity_bytes: st.f_blocks as u64 * unit,
        free_bytes: st.f_bavail as u64 * unit,
    })
}

impl AgentConfig {
    fn record(&self, lease: LeaseId) -> Result<Node, AgentError> {
        Ok(Node {
            protocol: PROTOCOL,
            name: self.node.clone(),
            address: self.address.clone(),
            advertise: self.advertise.clone(),
            ports: self.ports,
            zone: self.zone.clone(),
            labels: self.labels.clone(),
            disks: self
                .disks
                .iter()
                .map(|d| disk(d))
                .collect::<Result<_, _>>()?,
            lease: lease.0,
        })
    }

    fn lease_file(&self) -> Result<PathBuf, AgentError> {
        self.disks
            .first()
            .map(|d| d.join(LEASE_FILE))
            .ok_or_else(|| AgentError::Disk {
                path: String::new(),
                message: "an agent needs at least one --disk".into(),
            })
    }

    fn remembered_lease(&self) -> Option<LeaseId> {
        let text = std::fs::read_to_string(self.lease_file().ok()?).ok()?;
        text.trim().parse().ok().map(LeaseId)
    }

    fn remember(&self, lease: LeaseId) -> Result<(), AgentError> {
        let path = self.lease_file()?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, lease.0.to_string())
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|e| AgentError::Disk {
                path: path.display().to_string(),
                message: e.to_string(),
            })
    }
}

impl<S: Store> Registration<S> {
    /// Registers the node, or resumes this agent's own live registration.
    pub async fn register(store: Arc<S>, config: AgentConfig) -> Result<Self, AgentError> {
        let key = config.node.key();
        if let Some(v) = store.get(&key).await? {
            let held: Node = decode(&key, &v)?;
            let mine = config.remembered_lease() == Some(LeaseId(held.lease));
            if mine && store.keep_alive(LeaseId(held.lease)).await.is_ok() {
                let lease = LeaseId(held.lease);
                let record = config.record(lease)?;
                let revision = store
                    .put(&key, encode(&record), Expect::At(v.revision), Some(lease))
                    .await?;
                tracing::info!(node = %config.node, "resumed this node's registration");
                return Ok(Registration {
                    store,
                    config,
                    lease,
                    revision,
                });
            }
            return Err(AgentError::NameTaken {
                node: config.node.clone(),
                address: held.address,
                ttl: config.ttl,
            });
        }
        let lease = store.grant_lease(config.ttl).await?;
        let record = config.record(lease)?;
        match store
            .put(&key, encode(&record), Expect::Absent, Some(lease))
            .await
        {
            Ok(revision) => {
                config.remember(lease)?;
                tracing::info!(node = %config.node, "node registered");
                Ok(Registration {
                    store,
                    config,
                    lease,
                    revision,
                })
            }
            Err(e) => {
                let _ = store.revoke(lease).await;
                match e {
                    // Another agent registered the name a moment ago.
                    StoreError::Conflict { .. } => Err(AgentError::NameTaken {
                        node: config.node.clone(),
                        address: "(just registered)".into(),
                        ttl: config.ttl,
                    }),
                    e => Err(e.into()),
                }
            }
        }
    }

    pub fn lease(&self) -> LeaseId {
        self.lease
    }

    /// One heartbeat: renews the lease and rewrites the record; see the
    /// module docs. An error means the agent no longer holds its node.
    pub async fn beat(&mut self) -> Result<(), AgentError> {
        match self.store.keep_alive(self.lease).await {
            Ok(_) => {}
            Err(StoreError::LeaseExpired(_)) => {
                tracing::warn!(node = %self.config.node, "registration lapsed: registering again");
                let again = Registration::register(self.store.clone(), self.config.clone()).await?;
                *self = again;
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
        let record = self.config.record(self.lease)?;
        self.revision = self
            .store
            .put(
                &self.config.node.key(),
                encode(&record),
                Expect::At(self.revision),
                Some(self.lease),
            )
            .await?;
        Ok(())
    }

    /// Beats every third of the time to live until the node is lost to
    /// another agent (returned as the error); store outages are logged and
    /// retried. The lease in use (it changes when a lapsed registration is
    /// made again) is published on `lease`.
    pub async fn heartbeat(mut self, lease: tokio::sync::watch::Sender<LeaseId>) -> AgentError {
        loop {
            tokio::time::sleep(self.config.ttl / 3).await;
            match self.beat().await {
                Ok(()) => {
                    lease.send_if_modified(|l| std::mem::replace(l, self.lease) != self.lease);
                }
                Err(AgentError::Store(StoreError::Unavailable(e))) => {
                    tracing::warn!(error = %e, "heartbeat failed; retrying")
                }
                Err(e) => return e,
            }
        }
    }
}
