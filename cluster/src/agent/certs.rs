//! The certificates of the engines an agent runs, in a cluster with mutual
//! TLS (see [`crate::model::EngineCert`] for the exchange).
//!
//! For each attachment the agent makes a key in its run directory (0600),
//! next to the request for it, and writes the request to the store; once
//! the controller has signed it, the certificate is written beside the
//! key and the engine may start with both. The key never leaves the node.
//! Files are named after the attachment (`e-UID.SERIAL.*`, as the engine's
//! socket is), so a new attachment never runs on an old one's key, and
//! they are deleted once no engine of theirs is wanted or runs.

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::model::{encode, engine_cert_key, Attachment, EngineCert, NodeName, Volume, PROTOCOL};
use crate::store::{Expect, Store, StoreError};
use crate::view::ClusterView;

/// The files of an attachment's engine certificate.
pub struct EngineFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    request: PathBuf,
}

/// The stem of the names of the engine's files (socket, key, certificate)
/// for attachment `serial` of the volume of `uid`: short, as socket paths
/// must be.
pub fn stem(uid: &str, serial: u64) -> String {
    format!("e-{uid}.{serial}")
}

pub fn files(run_dir: &Path, v: &Volume, serial: u64) -> EngineFiles {
    let stem = stem(&v.uid, serial);
    EngineFiles {
        cert: run_dir.join(format!("{stem}.crt")),
        key: run_dir.join(format!("{stem}.key")),
        request: run_dir.join(format!("{stem}.csr")),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Local(String),
}

/// Brings the certificate of `v`'s attachment `a` (to this node) one step
/// on; true once its files are there.
pub async fn ensure<S: Store>(
    store: &S,
    view: &ClusterView,
    me: &NodeName,
    run_dir: &Path,
    v: &Volume,
    a: &Attachment,
) -> Result<bool, CertError> {
    let f = files(run_dir, v, a.serial);
    if f.cert.exists() {
        return Ok(true);
    }
    let local = |what: &str, e: &dyn std::fmt::Display| CertError::Local(format!("{what}: {e}"));
    if !f.key.exists() || !f.request.exists() {
        let (request, key) =
            rvol_tls::pki::request().map_err(|e| local("making the engine's key", &e))?;
        write_private(&f.key, &key).map_err(|e| local(&f.key.display().to_string(), &e))?;
        std::fs::write(&f.request, request)
            .map_err(|e| local(&f.request.display().to_string(), &e))?;
    }
    let request = std::fs::read_to_string(&f.request)
        .map_err(|e| local(&f.request.display().to_string(), &e))?;
    let key = engine_cert_key(&v.name);
    let expect = match view.engine_certs.get(&v.name) {
        Some((c, _))
            if c.uid == v.uid && c.serial == a.serial && &c.node == me && c.request == request =>
        {
            let Some(cert) = &c.cert else {
                return Ok(false);
            };
            let tmp = f.cert.with_extension("crt.tmp");
            std::fs::write(&tmp, cert).map_err(|e| local(&tmp.display().to_string(), &e))?;
            std::fs::rename(&tmp, &f.cert).map_err(|e| local(&f.cert.display().to_string(), &e))?;
            tracing::info!(volume = %v.name, serial = a.serial, "engine certificate received");
            return Ok(true);
        }
        Some((_, revision)) => Expect::At(*revision),
        None => Expect::Absent,
    };
    let record = EngineCert {
        protocol: PROTOCOL,
        volume: v.name.clone(),
        uid: v.uid.clone(),
        serial: a.serial,
        node: me.clone(),
        request,
        cert: None,
    };
    match store.put(&key, encode(&record), expect, None).await {
        Ok(_) | Err(StoreError::Conflict { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Deletes the certificate files of attachments whose stem is not in
/// `keep`.
pub fn delete_others(run_dir: &Path, keep: &BTreeSet<String>) {
    let Ok(entries) = std::fs::read_dir(run_dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(stem) = [".crt", ".key", ".csr", ".crt.tmp"]
            .iter()
            .find_map(|ext| name.strip_suffix(ext))
        else {
            continue;
        };
        if stem.starts_with("e-") && !keep.contains(stem) {
            if let Err(err) = std::fs::remove_file(e.path()) {
                tracing::warn!(file = %name, error = %err, "deleting an old engine certificate file");
            }
        }
    }
}

/// Creates (or replaces) `path` with mode 0600 and `text`.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}
