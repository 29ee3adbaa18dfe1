//! The cluster store on etcd (v3 API): each [`Store`] operation is one
//! etcd request, a conditional write one transaction.
//!
//! - `put`/`delete` with [`Expect`]: a transaction comparing the key's
//!   `mod_revision` (0 when absent) and, when the comparison fails,
//!   reading the key so the conflict can say where it is now.
//! - `list`: a prefix range read; the response header's revision is the
//!   listing's, so a watch from it misses nothing.
//! - `watch`: a prefix watch from `after + 1`; a watch cancelled because
//!   that revision was compacted becomes [`StoreError::Compacted`].
//! - Every request is bounded by a timeout, so a lost etcd is an error
//!   within seconds, never a hang.
//! - **Failover among members.** Each member has a client of its own and
//!   requests go to one of them until it cannot be reached; then the next
//!   is tried, as etcd's own Go client does. (etcd-client's balanced
//!   channel over several endpoints fails every request while any one of
//!   them is down: etcdv3/etcd-client#39.) A request that did not complete
//!   on a member (transport errors, `Unavailable`, `Unknown`, timeouts) is
//!   sent to the next, as is one that took longer than
//!   [`MEMBER_TIMEOUT`] while another member is left to try. Every write but a lease's is conditional or sets
//!   the same value again, so one that did apply before its answer was
//!   lost is not applied twice: it meets a conflict instead, which every
//!   caller already handles as "changed meanwhile". While etcd elects a
//!   new leader (after losing its leader member), requests are tried again
//!   for a few seconds instead of failing.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    TxnOpResponse, WatchOptions,
};
use futures::stream::{self, BoxStream, StreamExt};
use tonic::Code;

use crate::store::{
    Change, Expect, LeaseId, Listing, Result, Revision, Store, StoreError, Versioned,
};

/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How rvol's processes reach a TLS-guarded etcd: the CA that signed its
/// members' certificates, and a client certificate and key for
/// `--client-cert-auth` (with etcd's auth enabled, the certificate's CN is
/// the etcd user). Files, never arguments' contents.
#[derive(Debug, Clone, Default)]
pub struct EtcdTls {
    pub ca: Option<std::path::PathBuf>,
    pub cert: Option<std::path::PathBuf>,
    pub key: Option<std::path::PathBuf>,
}

impl EtcdTls {
    fn options(&self) -> Result<Option<etcd_client::TlsOptions>> {
        let read = |p: &std::path::Path| {
            std::fs::read(p)
                .map_err(|e| StoreError::Refused(format!("etcd TLS: reading {}: {e}", p.display())))
        };
        let Some(ca) = &self.ca else {
            if self.cert.is_some() || self.key.is_some() {
                return Err(StoreError::Refused(
                    "etcd TLS: a client certificate needs the CA of etcd's certificates too".into(),
                ));
            }
            return Ok(None);
        };
        let mut t = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(read(ca)?));
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let key = zeroize::Zeroizing::new(read(key)?);
                t = t.identity(etcd_client::Identity::from_pem(read(cert)?, &*key));
            }
            (None, None) => {}
            _ => {
                return Err(StoreError::Refused(
                    "etcd TLS: a client certificate and its key go together".into(),
                ))
            }
        }
        Ok(Some(t))
    }
}
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one member may take before the next is tried.
const MEMBER_TIMEOUT: Duration = Duration::from_millis(1500);

/// A handle on an etcd cluster; cheap to clone.
#[derive(Clone)]
pub struct EtcdStore {
    /// One per member, in the order given.
    clients: Arc<[Client]>,
    /// The member requests go to now.
    current: Arc<AtomicUsize>,
    endpoints: String,
}

/// Whether `e` is etcd saying it has no leader at the moment.
fn electing(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s)
        if s.code() == Code::Unavailable
            && (s.message().contains("leader changed") || s.message().contains("no leader")))
}

/// Whether `e` means the request did not complete on the member.
fn unreached(e: &etcd_client::Error) -> bool {
    use etcd_client::Error as E;
    match e {
        E::TransportError(_) | E::IoError(_) => true,
        E::GRpcStatus(s) => matches!(
            s.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
        ),
        _ => false,
    }
}

impl EtcdStore {
    /// Connects to etcd at `endpoints` (`http://host:port`, comma
    /// separated). Succeeds while etcd is down: requests fail until it is
    /// back.
    pub async fn connect(endpoints: &str) -> Result<EtcdStore> {
        EtcdStore::connect_with(endpoints, &EtcdTls::default()).await
    }

    /// [`Self::connect`] over TLS, when `tls` names a CA: `https://`
    /// endpoints whose certificates that CA signed, and this process's
    /// certificate for etcd's `--client-cert-auth` when it names one.
    pub async fn connect_with(endpoints: &str, tls: &EtcdTls) -> Result<EtcdStore> {
        let list: Vec<&str> = endpoints.split(',').map(str::trim).collect();
        if list.iter().any(|e| e.is_empty()) {
            return Err(StoreError::Refused(format!(
                "{endpoints:?} is not a list of etcd endpoints"
            )));
        }
        let mut options = ConnectOptions::new()
            .with_timeout(REQUEST_TIMEOUT)
            .with_connect_timeout(CONNECT_TIMEOUT);
        if let Some(t) = tls.options()? {
            if let Some(e) = list.iter().find(|e| !e.starts_with("https://")) {
                return Err(StoreError::Refused(format!(
                    "etcd endpoint {e} is not https:// while etcd TLS is configured"
                )));
            }
            options = options.with_tls(t);
        }
        let mut clients = Vec::with_capacity(list.len());
        for e in list {
            // One endpoint connects lazily: a member down now is no error.
            let client = Client::connect([e], Some(options.clone()))
                .await
                .map_err(|err| StoreError::Unavailable(format!("etcd at {e}: {err}")))?;
            clients.push(client);
        }
        Ok(EtcdStore {
            clients: clients.into(),
            current: Arc::new(AtomicUsize::new(0)),
            endpoints: endpoints.to_string(),
        })
    }

    /// Runs `op` on the current member, and on the next ones while it
    /// does not reach them; while etcd elects a leader (every member
    /// answers "leader changed" or "no leader"), tries again for up to
    /// [`REQUEST_TIMEOUT`]. See the module docs.
    async fn call<T, F, Fut>(&self, op: F) -> std::result::Result<T, etcd_client::Error>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
        loop {
            match self.call_members(&op).await {
                Err(e) if electing(&e) && tokio::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "etcd is electing a leader; trying again");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                result => return result,
            }
        }
    }

    async fn call_members<T, F, Fut>(&self, op: &F) -> std::result::Result<T, etcd_client::Error>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let n = self.clients.len();
        let first = self.current.load(Ordering::Relaxed) % n;
        let mut i = first;
        let mut election = None;
        loop {
            let last = (i + 1) % n == first;
            // While another member is left to try, one that does not
            // answer soon counts as unreachable.
            let attempt = if last {
                op(self.clients[i].clone()).await
            } else {
                tokio::time::timeout(MEMBER_TIMEOUT, op(self.clients[i].clone()))
                    .await
                    .unwrap_or_else(|_| {
                        Err(etcd_client::Error::IoError(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "no answer in time",
                        )))
                    })
            };
            match attempt {
                Err(e) if unreached(&e) && !last => {
                    tracing::debug!(error = %e, "etcd member unreachable; trying the next");
                    if electing(&e) {
                        election = Some(e);
                    }
                    i = (i + 1) % n;
                }
                Ok(v) => {
                    self.current.store(i, Ordering::Relaxed);
                    return Ok(v);
                }
                // A member said an election is under way: that, not the
                // last member's error, is why the round failed.
                Err(e) => return Err(election.filter(|_| unreached(&e)).unwrap_or(e)),
            }
        }
    }

    fn err(&self, e: etcd_client::Error) -> StoreError {
        use etcd_client::Error as E;
        match e {
            E::GRpcStatus(s)
                if matches!(s.code(), Code::InvalidArgument | Code::FailedPrecondition) =>
            {
                StoreError::Refused(s.message().to_string())
            }
            e => StoreError::Unavailable(format!("etcd at {}: {e}", self.endpoints)),
        }
    }

    async fn conditional(&self, key: &str, expect: Expect, op: TxnOp) -> Result<TxnOutcome> {
        let compare = match expect {
            Expect::Anything => None,
            Expect::Absent => Some(Compare::mod_revision(key, CompareOp::Equal, 0)),
            Expect::At(r) => Some(Compare::mod_revision(key, CompareOp::Equal, r.0)),
        };
        let mut txn = Txn::new();
        if let Some(c) = compare {
            txn = txn.when([c]);
        }
        let txn = txn.and_then([op]).or_else([TxnOp::get(key, None)]);
        let resp = self
            .call(|mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await
            .map_err(|e| self.err(e))?;
        let revision = Revision(resp.header().map_or(0, |h| h.revision()));
        if resp.succeeded() {
            let deleted = resp
                .op_responses()
                .iter()
                .any(|r| matches!(r, TxnOpResponse::Delete(d) if d.deleted() > 0));
            return Ok(TxnOutcome { revision, deleted });
        }
        let current = resp.op_responses().iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => g.kvs().first().map(|kv| Revision(kv.mod_revision())),
            _ => None,
        });
        Err(StoreError::Conflict {
            key: key.to_string(),
            current,
        })
    }
}

struct TxnOutcome {
    revision: Revision,
    deleted: bool,
}

fn versioned(kv: &etcd_client::KeyValue) -> Versioned {
    Versioned {
        value: kv.value().to_vec(),
        revision: Revision(kv.mod_revision()),
    }
}

impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>> {
        let resp = self
            .call(|mut c| async move { c.get(key, None).await })
            .await
            .map_err(|e| self.err(e))?;
        Ok(resp.kvs().first().map(versioned))
    }

    async fn list(&self, prefix: &str) -> Result<Listing> {
        let resp = self
            .call(|mut c| async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await })
            .await
            .map_err(|e| self.err(e))?;
        let mut items = Vec::with_capacity(resp.kvs().len());
        for kv in resp.kvs() {
            let key = kv.key_str().map_err(|e| {
                StoreError::Refused(format!("a key under {prefix:?} is not UTF-8: {e}"))
            })?;
            items.push((key.to_string(), versioned(kv)));
        }
        Ok(Listing {
            items,
            revision: Revision(resp.header().map_or(0, |h| h.revision())),
        })
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        expect: Expect,
        lease: Option<LeaseId>,
    ) -> Result<Revision> {
        let options = lease.map(|l| PutOptions::new().with_lease(l.0));
        let op = TxnOp::put(key, value, options);
        self.conditional(key, expect, op).await.map(|o| o.revision)
    }

    async fn delete(&self, key: &str, expect: Expect) -> Result<bool> {
        let op = TxnOp::delete(key, None);
        self.conditional(key, expect, op).await.map(|o| o.deleted)
    }

    async fn watch(
        &self,
        prefix: &str,
        after: Revision,
    ) -> Result<BoxStream<'static, Result<Change>>> {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(after.0 + 1);
        let watch = self
            .call(|mut c| {
                let options = options.clone();
                async move { c.watch(prefix, Some(options)).await }
            })
            .await
            .map_err(|e| self.err(e))?;
        let this = self.clone();
        let changes = watch.flat_map(move |resp| {
            let batch: Vec<Result<Change>> = match resp {
                Err(e) => vec![Err(this.err(e))],
                Ok(r) if r.canceled() && r.compact_revision() > 0 => {
                    vec![Err(StoreError::Compacted(after))]
                }
                Ok(r) if r.canceled() => vec![Err(StoreError::Unavailable(format!(
                    "etcd at {} cancelled the watch: {}",
                    this.endpoints,
                    r.cancel_reason()
                )))],
                Ok(r) => r
                    .events()
                    .iter()
                    .filter_map(|ev| {
                        let kv = ev.kv()?;
                        let key = String::from_utf8_lossy(kv.key()).into_owned();
                        let revision = Revision(kv.mod_revision());
                        Some(Ok(match ev.event_type() {
                            EventType::Put => Change::Put {
                                key,
                                value: kv.value().to_vec(),
                                revision,
                            },
                            EventType::Delete => Change::Delete { key, revision },
                        }))
                    })
                    .collect(),
            };
            stream::iter(batch)
        });
        Ok(changes.boxed())
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        let secs = ttl.as_secs().max(1) as i64;
        let resp = self
            .call(|mut c| async move { c.lease_grant(secs, None).await })
            .await
            .map_err(|e| self.err(e))?;
        Ok(LeaseId(resp.id()))
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration> {
        // etcd says a lease it does not know is "not found".
        let err = |e| match e {
            etcd_client::Error::LeaseKeepAliveError(_) => StoreError::LeaseExpired(lease),
            e => self.err(e),
        };
        let ttl = self
            .call(|mut c| async move {
                let (mut keeper, mut replies) = c.lease_keep_alive(lease.0).await?;
                keeper.keep_alive().await?;
                Ok(replies.message().await?.map_or(0, |r| r.ttl()))
            })
            .await
            .map_err(err)?;
        if ttl > 0 {
            Ok(Duration::from_secs(ttl as u64))
        } else {
            Err(StoreError::LeaseExpired(lease))
        }
    }

    async fn revoke(&self, lease: LeaseId) -> Result<()> {
        match self
            .call(|mut c| async move { c.lease_revoke(lease.0).await })
            .await
        {
            Ok(_) => Ok(()),
            Err(etcd_client::Error::GRpcStatus(s)) if s.code() == Code::NotFound => {
                Err(StoreError::LeaseExpired(lease))
            }
            Err(e) => Err(self.err(e)),
        }
    }
}
