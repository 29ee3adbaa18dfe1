//! The command line's TLS: the `--tls-*` flags every process takes, and
//! `rvol cert`, which makes a cluster's CA and issues its certificates
//! ([`rvol_tls::pki`]).

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Subcommand};
use rvol_tls::pki::{Ca, Issue};
use rvol_tls::{ClientTls, Identity, ServerTls, TlsFiles};

/// Mutual TLS: this process's certificate and key, and the cluster's CA.
/// The files are read again when they change (certificate rotation).
#[derive(Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// PEM certificate (chain) of this process.
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires_all = ["tls_cert", "tls_ca"])]
    pub tls_key: Option<PathBuf>,
    /// PEM certificate of the CA that signs every party's certificate.
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    fn files(&self) -> anyhow::Result<Option<TlsFiles>> {
        Ok(TlsFiles::from_flags(
            self.tls_cert.clone(),
            self.tls_key.clone(),
            self.tls_ca.clone(),
        )?)
    }

    /// A server whose clients present a certificate of the CA.
    pub fn server(&self) -> anyhow::Result<Option<Arc<ServerTls>>> {
        self.files()?
            .map(|f| ServerTls::new(f).map(Arc::new))
            .transpose()
            .context("loading the TLS files")
    }

    /// A server whose clients present none (they bring a token).
    pub fn anonymous_clients_server(&self) -> anyhow::Result<Option<Arc<ServerTls>>> {
        self.files()?
            .map(|f| ServerTls::anonymous_clients(f).map(Arc::new))
            .transpose()
            .context("loading the TLS files")
    }

    /// The client side for an engine of `volume`, whose certificate must
    /// name it: replicas would refuse it anyway, one by one, less clearly.
    pub fn engine_client(&self, volume: &str) -> anyhow::Result<Option<Arc<ClientTls>>> {
        let Some(files) = self.files()? else {
            return Ok(None);
        };
        let tls = ClientTls::new(files).context("loading the TLS files")?;
        require(
            &tls,
            Identity::Volume(volume.to_string()),
            "replicas would refuse it",
        )?;
        Ok(Some(Arc::new(tls)))
    }

    /// An agent's files (made absolute, as the processes it starts get
    /// them), whose certificate must name its node.
    pub fn node_files(&self, node: &str) -> anyhow::Result<Option<TlsFiles>> {
        let Some(files) = self.files()? else {
            return Ok(None);
        };
        let abs = |p: &PathBuf| std::path::absolute(p).with_context(|| p.display().to_string());
        let files = TlsFiles {
            cert: abs(&files.cert)?,
            key: abs(&files.key)?,
            ca: abs(&files.ca)?,
        };
        let tls = ClientTls::new(files.clone()).context("loading the TLS files")?;
        require(
            &tls,
            Identity::Node(node.to_string()),
            "it is not this node's certificate",
        )?;
        Ok(Some(files))
    }
}

/// Fails unless the certificate of `tls` names `wanted`.
fn require(tls: &ClientTls, wanted: Identity, otherwise: &str) -> anyhow::Result<()> {
    let ids = tls.own_identities()?;
    if !ids.contains(&wanted) {
        anyhow::bail!(
            "--tls-cert does not name {wanted} (it names {}); {otherwise}",
            if ids.is_empty() {
                "no rvol identity".to_string()
            } else {
                ids.iter()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        );
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum CertCommand {
    /// Make a cluster CA: DIR/ca.crt and DIR/ca.key (mode 0600).
    Ca {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "rvol cluster CA")]
        name: String,
    },
    /// Issue a certificate signed by the CA in --ca-dir: OUT.crt, OUT.key.
    Issue {
        #[arg(long)]
        ca_dir: PathBuf,
        /// Path prefix of the files to write.
        #[arg(long)]
        out: PathBuf,
        /// For an engine of this volume (rvol://volume/NAME).
        #[arg(long)]
        volume: Option<String>,
        /// For the replicas or agent of this node (rvol://node/NAME).
        #[arg(long)]
        node: Option<String>,
        /// For the cluster controller (rvol://role/controller).
        #[arg(long)]
        controller: bool,
        /// A DNS name this party serves at; repeat for several.
        #[arg(long)]
        dns: Vec<String>,
        /// An IP address this party serves at; repeat for several.
        #[arg(long)]
        ip: Vec<IpAddr>,
        #[arg(long, default_value_t = 365)]
        days: u64,
    },
}

pub fn run(c: CertCommand) -> anyhow::Result<u8> {
    match c {
        CertCommand::Ca { dir, name } => {
            Ca::generate(&name)?.write(&dir)?;
            println!("CA written to {}", dir.display());
        }
        CertCommand::Issue {
            ca_dir,
            out,
            volume,
            node,
            controller,
            dns,
            ip,
            days,
        } => {
            let mut ids: Vec<Identity> = volume.into_iter().map(Identity::Volume).collect();
            ids.extend(node.map(Identity::Node));
            if controller {
                ids.push(Identity::Controller);
            }
            if ids.is_empty() {
                anyhow::bail!("name what the certificate is for: --volume, --node or --controller");
            }
            let mut what = Issue::new(ids, days);
            what.dns = dns;
            what.ips = ip;
            Ca::load(&ca_dir)?.issue_to(&what, &out)?;
            println!("{0}.crt and {0}.key written", out.display());
        }
    }
    Ok(0)
}
