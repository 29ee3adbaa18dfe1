//! A backup target: an object store (S3 or a directory) under a prefix,
//! through `object_store`, with every request counted.
//!
//! `s3://BUCKET/PREFIX` takes its endpoint, region and credentials from
//! the `AWS_*` settings given ([`StoreOptions::from_env`] collects the
//! caller's environment: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT_URL`, ...).
//! `file:///DIR` is a directory on this machine (or a mounted NFS share).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey, S3ConditionalPut};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore, PutMode, PutOptions, PutPayload, UpdateVersion};
use serde::{Deserialize, Serialize};

use crate::format::{decode_chunk, manifest_key, ChunkId, Manifest};

/// Settings of an S3 target, by their `AWS_*` names.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StoreOptions(pub BTreeMap<String, String>);

impl StoreOptions {
    /// The `AWS_*` variables of this process's environment.
    pub fn from_env() -> StoreOptions {
        StoreOptions(
            std::env::vars()
                .filter(|(k, _)| k.starts_with("AWS_"))
                .collect(),
        )
    }
}

/// A version of an object, for a conditional overwrite.
#[derive(Debug, Clone)]
pub struct Version(UpdateVersion);

/// Why a conditional put did not happen.
#[derive(Debug)]
pub enum PutRefused {
    /// Create: the object exists. Update: it changed since it was read.
    Conflict,
    Other(anyhow::Error),
}

pub struct Target {
    url: String,
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    /// Conditional overwrites (If-Match): S3 has them; a directory does
    /// not, and overwrites after a check instead.
    if_match: bool,
    requests: AtomicU64,
}

impl Target {
    /// Opens the target at `url`. Nothing is sent yet; see [`Self::check`].
    pub fn open(url: &str, options: &StoreOptions) -> anyhow::Result<Target> {
        let (scheme, rest) = url.split_once("://").with_context(|| {
            format!("target {url:?} is not a URL: use s3://BUCKET/PREFIX or file:///DIR")
        })?;
        let (store, prefix, if_match): (Arc<dyn ObjectStore>, &str, bool) = match scheme {
            "s3" => {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.is_empty() {
                    bail!("target {url}: no bucket named");
                }
                let mut b = AmazonS3Builder::new()
                    .with_bucket_name(bucket)
                    .with_conditional_put(S3ConditionalPut::ETagMatch);
                for (k, v) in &options.0 {
                    if let Ok(key) = k.to_ascii_lowercase().parse::<AmazonS3ConfigKey>() {
                        b = b.with_config(key, v);
                    }
                }
                if options
                    .0
                    .iter()
                    .any(|(k, v)| k.starts_with("AWS_ENDPOINT") && v.starts_with("http://"))
                {
                    b = b.with_allow_http(true);
                }
                // Retries ride out a server restart, but a target that is
                // gone fails a backup in half a minute, not object_store's
                // default three.
                let retry = object_store::RetryConfig {
                    max_retries: 10,
                    retry_timeout: std::time::Duration::from_secs(30),
                    backoff: object_store::BackoffConfig {
                        init_backoff: std::time::Duration::from_millis(250),
                        max_backoff: std::time::Duration::from_secs(8),
                        base: 2.0,
                    },
                };
                let s3 = b
                    .with_retry(retry)
                    .build()
                    .with_context(|| format!("target {url}"))?;
                (Arc::new(s3), prefix, true)
            }
            "file" => {
                if !rest.starts_with('/') {
                    bail!("target {url}: a file target names an absolute directory (file:///DIR)");
                }
                std::fs::create_dir_all(rest)
                    .with_context(|| format!("target {url}: creating {rest}"))?;
                let fs = LocalFileSystem::new_with_prefix(rest)
                    .with_context(|| format!("target {url}"))?;
                (Arc::new(fs), "", false)
            }
            other => bail!(
                "target {url}: unknown scheme {other:?}: use s3://BUCKET/PREFIX or file:///DIR"
            ),
        };
        Ok(Target {
            url: url.to_string(),
            store,
            prefix: Path::from(prefix.trim_matches('/')),
            if_match,
            requests: AtomicU64::new(0),
        })
    }

    /// Opens the target and checks it answers (one LIST request), so that
    /// a missing bucket or bad credentials are named before any work.
    pub async fn open_checked(url: &str, options: &StoreOptions) -> anyhow::Result<Target> {
        let t = Target::open(url, options)?;
        t.count();
        t.store
            .list_with_delimiter(Some(&t.prefix))
            .await
            .map_err(|e| t.explain(e))
            .context("checking the target")?;
        Ok(t)
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Requests sent to the store so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    fn count(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    fn path(&self, key: &str) -> Path {
        self.prefix.parts().chain(Path::from(key).parts()).collect()
    }

    /// The error of a request, with what the store said in plain words.
    fn explain(&self, e: object_store::Error) -> anyhow::Error {
        let text = e.to_string();
        let hint = if text.contains("NoSuchBucket") {
            "the bucket does not exist"
        } else if [
            "AccessDenied",
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "403 Forbidden",
        ]
        .iter()
        .any(|k| text.contains(k))
        {
            "access denied: check the credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"
        } else {
            ""
        };
        match hint {
            "" => anyhow::anyhow!("target {}: {text}", self.url),
            h => anyhow::anyhow!("target {}: {h} ({text})", self.url),
        }
    }

    pub async fn get(&self, key: &str) -> anyhow::Result<Option<(Bytes, Version)>> {
        self.count();
        match self.store.get(&self.path(key)).await {
            Ok(r) => {
                let version = Version(UpdateVersion {
                    e_tag: r.meta.e_tag.clone(),
                    version: r.meta.version.clone(),
                });
                let bytes = r.bytes().await.map_err(|e| self.explain(e))?;
                Ok(Some((bytes, version)))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.explain(e)).with_context(|| format!("reading {key}")),
        }
    }

    pub async fn exists(&self, key: &str) -> anyhow::Result<bool> {
        self.count();
        match self.store.head(&self.path(key)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.explain(e)).with_context(|| format!("looking for {key}")),
        }
    }

    pub async fn put(&self, key: &str, data: Bytes) -> anyhow::Result<()> {
        self.count();
        self.store
            .put(&self.path(key), PutPayload::from(data))
            .await
            .map(drop)
            .map_err(|e| self.explain(e))
            .with_context(|| format!("writing {key}"))
    }

    /// Writes `key` only if it does not exist (`None`) or is still at
    /// `version`. Returns the new version.
    pub async fn put_if(
        &self,
        key: &str,
        data: Bytes,
        version: Option<&Version>,
    ) -> Result<Version, PutRefused> {
        let mode = match version {
            None => PutMode::Create,
            Some(v) if self.if_match => PutMode::Update(v.0.clone()),
            Some(_) => PutMode::Overwrite,
        };
        self.count();
        match self
            .store
            .put_opts(
                &self.path(key),
                PutPayload::from(data),
                PutOptions::from(mode),
            )
            .await
        {
            Ok(r) => Ok(Version(UpdateVersion {
                e_tag: r.e_tag,
                version: r.version,
            })),
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => Err(PutRefused::Conflict),
            Err(e) => Err(PutRefused::Other(
                self.explain(e).context(format!("writing {key}")),
            )),
        }
    }

    pub async fn delete(&self, key: &str) -> anyhow::Result<()> {
        self.count();
        match self.store.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.explain(e)).with_context(|| format!("deleting {key}")),
        }
    }

    /// Objects below `key_prefix`, with keys relative to the target.
    pub async fn list(&self, key_prefix: &str) -> anyhow::Result<Vec<(String, ObjectMeta)>> {
        self.count();
        let base = self.path(key_prefix);
        let skip = self.prefix.parts().count();
        let mut out = Vec::new();
        let mut s = self.store.list(Some(&base));
        loop {
            match s.try_next().await {
                Ok(Some(meta)) => {
                    let key: Vec<String> = meta
                        .location
                        .parts()
                        .skip(skip)
                        .map(|p| p.as_ref().to_string())
                        .collect();
                    out.push((key.join("/"), meta));
                }
                Ok(None) => break,
                Err(e) => {
                    return Err(self.explain(e)).with_context(|| format!("listing {key_prefix}"))
                }
            }
        }
        // One request per page of 1000.
        self.requests
            .fetch_add(out.len() as u64 / 1000, Ordering::Relaxed);
        Ok(out)
    }

    pub async fn put_chunk(&self, id: &ChunkId, object: Bytes) -> anyhow::Result<()> {
        self.put(&id.key(), object).await
    }

    /// A chunk's content, checked against its name.
    pub async fn chunk(&self, id: &ChunkId, len: usize) -> anyhow::Result<Vec<u8>> {
        let (object, _) = self
            .get(&id.key())
            .await?
            .with_context(|| format!("chunk {id} is missing from {}", self.url))?;
        tokio::task::spawn_blocking({
            let id = *id;
            move || decode_chunk(&id, &object, len)
        })
        .await?
        .map_err(|e| anyhow::anyhow!("target {}: {e}", self.url))
    }

    pub async fn manifest(&self, name: &str) -> anyhow::Result<Manifest> {
        let key = manifest_key(name).with_context(|| {
            format!("{name:?} is not a backup name (VOLUME.TIMESTAMP, as rvol backup ls shows)")
        })?;
        let (bytes, _) = self
            .get(&key)
            .await?
            .with_context(|| format!("no backup {name} in {}", self.url))?;
        let m: Manifest = serde_json::from_slice(&bytes)
            .with_context(|| format!("backup {name}: its manifest does not parse"))?;
        if m.name != name {
            bail!("backup {name}: its manifest names {}", m.name);
        }
        m.check().map_err(anyhow::Error::msg)?;
        Ok(m)
    }

    /// Every backup in the target, or of one volume, oldest first, and
    /// the manifests that could not be read (a sweep must not run past
    /// those: it would take their chunks for garbage).
    pub async fn manifests(
        &self,
        volume: Option<&str>,
    ) -> anyhow::Result<(Vec<Manifest>, Vec<anyhow::Error>)> {
        let prefix = match volume {
            Some(v) => format!("backups/{v}/"),
            None => "backups/".into(),
        };
        let (mut good, mut bad) = (Vec::new(), Vec::new());
        for (key, _) in self.list(&prefix).await? {
            let name = key
                .rsplit('/')
                .next()
                .and_then(|f| f.strip_suffix(".json"))
                .unwrap_or(&key);
            match self.manifest(name).await {
                Ok(m) => good.push(m),
                Err(e) => bad.push(e.context(format!("object {key}"))),
            }
        }
        good.sort_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)));
        Ok((good, bad))
    }
}
