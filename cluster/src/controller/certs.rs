//! The leader signs engine certificates (see [`crate::model::EngineCert`]):
//! a request is signed for the volume's identity only when the volume's
//! record attaches it to the requesting node with that serial, so no node
//! gets a certificate for a volume it does not serve. Requests of
//! attachments that are gone are deleted. The issuing CA's key
//! (`--issuer-dir`) is the one secret the controller holds: it opens
//! every volume, and is guarded like the CA.

use std::collections::BTreeSet;

use rvol_tls::pki::{Ca, Issue};
use rvol_tls::Identity;

use crate::model::{encode, engine_cert_key, VolumeName};
use crate::store::{Expect, Store, StoreError};
use crate::view::ClusterView;

/// How long an engine certificate is valid. An attachment that outlives it
/// needs a new one (re-attaching gets it); rotating it in place is not
/// done yet.
const DAYS: u64 = 365;

/// One pass over the requests; `warned` remembers requests already said
/// to be unsignable, so that the log says it once.
pub async fn sign<S: Store>(
    store: &S,
    issuer: Option<&Ca>,
    view: &ClusterView,
    warned: &mut BTreeSet<(VolumeName, u64)>,
) {
    for (name, (c, revision)) in &view.engine_certs {
        let current = view.volumes.get(name).is_some_and(|(v, _)| {
            v.uid == c.uid
                && v.attachment
                    .as_ref()
                    .is_some_and(|a| a.serial == c.serial && a.node == c.node)
        });
        let key = engine_cert_key(name);
        let written = if !current {
            store.delete(&key, Expect::At(*revision)).await.map(|_| ())
        } else if c.cert.is_some() {
            continue;
        } else {
            let Some(ca) = issuer else {
                if warned.insert((name.clone(), c.serial)) {
                    tracing::warn!(volume = %name, node = %c.node, "an engine certificate is asked for, but this controller has no --issuer-dir: the engine cannot start");
                }
                continue;
            };
            let what = Issue::new(vec![Identity::Volume(name.to_string())], DAYS);
            match ca.sign_request(&c.request, &what) {
                Ok(cert) => {
                    let mut next = c.clone();
                    next.cert = Some(cert);
                    tracing::info!(volume = %name, node = %c.node, serial = c.serial, "engine certificate signed");
                    store
                        .put(&key, encode(&next), Expect::At(*revision), None)
                        .await
                        .map(|_| ())
                }
                Err(e) => {
                    if warned.insert((name.clone(), c.serial)) {
                        tracing::warn!(volume = %name, node = %c.node, error = %e, "an engine certificate request is refused");
                    }
                    continue;
                }
            }
        };
        match written {
            Ok(()) | Err(StoreError::Conflict { .. }) => {}
            Err(e) => tracing::warn!(volume = %name, error = %e, "engine certificate not written"),
        }
    }
}
