//! A small certificate authority for a cluster's rvol processes (`rvol
//! cert`): makes the CA and issues certificates naming rvol identities.
//!
//! Any CA that puts the `rvol://` URIs in the subjectAltName works
//! (cert-manager, openssl, a corporate PKI); this one exists so that a
//! cluster, a test or the demo needs nothing else. Keys are ECDSA P-256;
//! private keys are written mode 0600 and never printed.

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::{file_err, Identity, Result, TlsError};

/// The CA's certificate and key, as `ca.crt` and `ca.key` in its folder.
pub struct Ca {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// What a certificate is issued for.
#[derive(Debug, Clone)]
pub struct Issue {
    pub identities: Vec<Identity>,
    /// DNS names and IP addresses the holder serves at.
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Issue {
    /// Valid from an hour ago (clock skew) for `days` days.
    pub fn new(identities: Vec<Identity>, days: u64) -> Issue {
        let now = SystemTime::now();
        Issue {
            identities,
            dns: Vec::new(),
            ips: Vec::new(),
            not_before: now - Duration::from_secs(3600),
            not_after: now + Duration::from_secs(days * 86400),
        }
    }
}

fn rc(e: rcgen::Error) -> TlsError {
    TlsError::Config(format!("certificate: {e}"))
}

impl Ca {
    /// A new CA, valid for ten years.
    pub fn generate(name: &str) -> Result<Ca> {
        let key = KeyPair::generate().map_err(rc)?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(3600)).into();
        params.not_after = (now + Duration::from_secs(3650 * 86400)).into();
        let cert = params.self_signed(&key).map_err(rc)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Reads `ca.crt` and `ca.key` from `dir`.
    pub fn load(dir: &Path) -> Result<Ca> {
        let read = |name: &str| {
            let p = dir.join(name);
            std::fs::read_to_string(&p).map_err(|e| file_err(&p, e))
        };
        let (cert_pem, key_pem) = (read("ca.crt")?, read("ca.key")?);
        let key = KeyPair::from_pem(&key_pem).map_err(|e| file_err(&dir.join("ca.key"), e))?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
            .map_err(|e| file_err(&dir.join("ca.crt"), e))?;
        Ok(Ca { cert_pem, issuer })
    }

    /// Writes `ca.crt` and `ca.key` into `dir`; refuses to overwrite a CA.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
        write_new(
            &dir.join("ca.key"),
            &self.issuer.key().serialize_pem(),
            0o600,
        )?;
        write_new(&dir.join("ca.crt"), &self.cert_pem, 0o644)
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a certificate for `what`; returns it and its key, in PEM.
    pub fn issue(&self, what: &Issue) -> Result<(String, String)> {
        let key = KeyPair::generate().map_err(rc)?;
        let cert = params(what)?.signed_by(&key, &self.issuer).map_err(rc)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Signs the key of a certificate request (from [`request`]) with the
    /// identities and validity of `what`: everything else the request
    /// asks for is ignored, so the signer alone decides what the holder
    /// is. The request's signature proves its sender holds the key.
    pub fn sign_request(&self, csr_pem: &str, what: &Issue) -> Result<String> {
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem).map_err(rc)?;
        let cert = params(what)?
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(rc)?;
        Ok(cert.pem())
    }

    /// Issues a certificate and writes it as `PREFIX.crt` and `PREFIX.key`.
    pub fn issue_to(&self, what: &Issue, prefix: &Path) -> Result<()> {
        let (cert, key) = self.issue(what)?;
        let with = |ext: &str| {
            let mut p = prefix.as_os_str().to_owned();
            p.push(ext);
            std::path::PathBuf::from(p)
        };
        write_new(&with(".key"), &key, 0o600)?;
        write_new(&with(".crt"), &cert, 0o644)
    }
}

/// The certificate `what` describes, to be signed.
fn params(what: &Issue) -> Result<CertificateParams> {
    let mut params = CertificateParams::default();
    let cn = what
        .identities
        .first()
        .map_or_else(|| "rvol".to_string(), |i| i.to_string());
    params.distinguished_name.push(DnType::CommonName, cn);
    for id in &what.identities {
        let uri = id.to_string().try_into().map_err(rc)?;
        params.subject_alt_names.push(SanType::URI(uri));
    }
    for d in &what.dns {
        let name = d.clone().try_into().map_err(rc)?;
        params.subject_alt_names.push(SanType::DnsName(name));
    }
    for ip in &what.ips {
        params.subject_alt_names.push(SanType::IpAddress(*ip));
    }
    // keyEncipherment means nothing to an ECDSA key, but QEMU's
    // credential check refuses a certificate without it.
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    // Every rvol party is both: replicas accept engines and agents dial
    // the controller.
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = what.not_before.into();
    params.not_after = what.not_after.into();
    Ok(params)
}

/// A new key and a request to certify it, in PEM: the key stays with
/// whoever made it, the request goes to the signer ([`Ca::sign_request`]).
pub fn request() -> Result<(String, String)> {
    let key = KeyPair::generate().map_err(rc)?;
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .map_err(rc)?;
    Ok((csr.pem().map_err(rc)?, key.serialize_pem()))
}

/// Creates `path` with `mode`; an existing file is an error (a key is
/// never replaced by accident).
fn write_new(path: &Path, text: &str, mode: u32) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| file_err(path, e))?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| file_err(path, e))
}
