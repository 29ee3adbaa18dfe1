//! `rvol controller`: the cluster's API and its reconcilers.
//!
//! Several controllers may run; one leads ([`crate::leader`]). Every one
//! answers reads (they come from the store), but only the leader changes
//! anything: it alone serves changes through the API, serialised in the
//! process, and runs the reconcilers ([`heal`]). A follower answers a
//! change with 503 and the leader's address; the CLI, given every
//! controller's URL, tries the next. Changes are written with revision
//! checks all the same, so in the moment two processes believe they lead,
//! neither can undo the other's write.
//!
//! Who may call it: a bearer token that controls or one that only reads
//! (`rvol_access`), and HTTPS on TCP when it has a certificate; `/healthz`
//! alone answers anyone, saying nothing but "ok", and so do the
//! dashboard's assets at `/ui/` (`rvol_dashboard`), which hold no data.
//!
//! The controller never talks to agents or engines: it writes what should
//! be (volume records) and reads what is (the agents' reports), both in
//! the store. So a controller can die at any point of any operation and
//! its successor, reading the same records, carries on from there.

pub mod api;
mod certs;
pub mod heal;
pub mod nodes;
pub mod snapshots;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Mutex};

use crate::leader::Candidate;
use crate::model::PREFIX;
use crate::placement::Policy;
use crate::store::Store;

pub struct ControllerOptions {
    /// This controller's API address, as others should reach it.
    pub address: String,
    /// How long a replica's node may be away before it is replaced.
    pub replenish_wait: Duration,
    /// How long the leader's lease lasts without a renewal.
    pub leader_ttl: Duration,
    pub policy: Policy,
    /// How often the reconcilers run.
    pub tick: Duration,
    /// Who may call the API.
    pub tokens: Arc<rvol_access::Tokens>,
    /// Serve HTTPS with this certificate.
    pub tls: Option<Arc<rvol_tls::ServerTls>>,
    /// The CA that signs engine certificates, in a cluster with mutual TLS.
    pub issuer: Option<Arc<rvol_tls::pki::Ca>>,
}

/// What the API handlers share.
pub struct Ctl<S> {
    pub store: Arc<S>,
    pub policy: Policy,
    pub address: String,
    pub issuer: Option<Arc<rvol_tls::pki::Ca>>,
    leading: watch::Receiver<bool>,
    /// Serialises changes within the leader.
    pub changes: Mutex<()>,
    candidate: Candidate<S>,
    /// The healer's passes.
    pub reconcile: crate::metrics::LoopMetrics,
}

impl<S: Store> Ctl<S> {
    pub fn leading(&self) -> bool {
        *self.leading.borrow()
    }

    /// Who leads, for a follower's answer.
    pub async fn leader(&self) -> crate::store::Result<Option<String>> {
        self.candidate.leader().await
    }
}

pub fn leader_key() -> String {
    format!("{PREFIX}leader")
}

/// Serves the API on `listener` and leads when elected, until `stop`.
pub async fn run<S: Store>(
    store: Arc<S>,
    opts: ControllerOptions,
    listener: tokio::net::TcpListener,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // The store may come up after the controller: wait for it.
    loop {
        match crate::model::check_version(&*store).await {
            Ok(()) => break,
            Err(crate::store::StoreError::Unavailable(e)) => {
                tracing::warn!(error = %e, "the cluster store is unavailable; waiting");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(std::io::Error::other(e.to_string())),
        }
    }
    let (leading_tx, leading) = watch::channel(false);
    let ctl = Arc::new(Ctl {
        store: store.clone(),
        policy: opts.policy,
        address: opts.address.clone(),
        issuer: opts.issuer.clone(),
        leading,
        changes: Mutex::new(()),
        reconcile: Default::default(),
        candidate: Candidate::new(store.clone(), &leader_key(), &opts.address, opts.leader_ttl),
    });
    if opts.tokens.is_open() {
        tracing::warn!(
            address = %opts.address,
            "the cluster API has no token: whoever reaches it can create, attach and delete \
             volumes (--token-file)"
        );
    }
    let app = axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .merge(rvol_dashboard::router(rvol_dashboard::Kind::Cluster))
        .merge(
            api::router(ctl.clone()).layer(axum::middleware::from_fn_with_state(
                opts.tokens.clone(),
                rvol_access::guard,
            )),
        );
    let tls = opts.tls.clone();
    let elector = tokio::spawn(lead(ctl, leading_tx, opts));
    let served = match tls {
        Some(tls) => {
            let l = rvol_access::https::TlsListener::start(listener, tls)?;
            axum::serve(l, app).with_graceful_shutdown(stop).await
        }
        None => {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .await
        }
    };
    elector.abort();
    served
}

/// Campaigns, and while leading runs the reconcilers; campaigns again when
/// leadership is lost.
async fn lead<S: Store>(ctl: Arc<Ctl<S>>, leading: watch::Sender<bool>, opts: ControllerOptions) {
    loop {
        let mut leadership = match ctl.candidate.campaign().await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "campaigning for leadership failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        tracing::info!(address = %opts.address, "leading the cluster");
        let _ = leading.send(true);
        let mut healer = heal::Healer::new(ctl.clone(), opts.replenish_wait);
        tokio::select! {
            _ = leadership.lost() => {}
            _ = async {
                loop {
                    healer.pass().await;
                    tokio::time::sleep(opts.tick).await;
                }
            } => {}
        }
        let _ = leading.send(false);
        tracing::warn!("no longer leading");
    }
}
