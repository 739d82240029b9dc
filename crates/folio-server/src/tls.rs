//! HTTPS and `wss://`: browsers give a page WebGPU, cross-origin isolation (the
//! threaded CPU build) and Web Crypto only in a secure context, which off
//! localhost means TLS. The certificate comes from PEM files, read again
//! whenever they change, so a renewed certificate needs no restart, or from an
//! ACME CA ([`crate::acme`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::{Context, ensure};
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

/// Where the server's certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsConfig {
    /// A certificate chain and its private key, PEM files (as certbot, an ACME
    /// client or a CA hands them out).
    Files { cert: PathBuf, key: PathBuf },
    /// Obtained and renewed from an ACME CA.
    Acme(crate::acme::AcmeConfig),
}

/// How often the certificate files are looked at for a change.
const RELOAD_CHECK: Duration = Duration::from_secs(1);

/// `Strict-Transport-Security` when TLS is on: browsers use HTTPS for a year.
pub const HSTS: &str = "max-age=31536000";

/// The TLS side of a server: its handshakes, and the task that keeps its
/// certificate current.
pub struct Tls {
    pub acceptor: TlsAcceptor,
    pub reloader: tokio::task::JoinHandle<()>,
}

/// Reads the certificate (an error that names the file and what it should hold,
/// if it cannot be used) and starts watching its files.
pub fn start(config: &TlsConfig) -> anyhow::Result<Tls> {
    match config {
        TlsConfig::Files { cert, key } => {
            let files = Arc::new(CertificateFiles::load(cert.clone(), key.clone())?);
            let reloader = tokio::spawn(files.clone().watch());
            Ok(Tls {
                acceptor: acceptor(files, vec![b"http/1.1".to_vec()]),
                reloader,
            })
        }
        TlsConfig::Acme(acme) => {
            let certificates = Arc::new(crate::acme::AcmeCertificates::new(acme.clone())?);
            let reloader = tokio::spawn(certificates.clone().keep_current());
            Ok(Tls {
                acceptor: acceptor(certificates, crate::acme::AcmeCertificates::alpn()),
                reloader,
            })
        }
    }
}

/// HTTP/1.1 (the WebSocket upgrade is an HTTP/1.1 one), and whatever else `alpn` names.
fn acceptor(certificates: Arc<dyn ResolvesServerCert>, alpn: Vec<Vec<u8>>) -> TlsAcceptor {
    let mut config = ServerConfig::builder()
        .with_no_client_auth()
        .with_cert_resolver(certificates);
    config.alpn_protocols = alpn;
    TlsAcceptor::from(Arc::new(config))
}

pub(crate) fn provider() -> Arc<CryptoProvider> {
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

/// A chain and its key, checked to belong together.
pub(crate) fn read_certificate(cert: &Path, key: &Path) -> anyhow::Result<CertifiedKey> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| {
            format!(
                "cannot read the TLS certificate {} (a PEM file: the server's certificate, then its CA's)",
                cert.display()
            )
        })?;
    ensure!(
        !chain.is_empty(),
        "{} holds no certificate (a PEM file with a -----BEGIN CERTIFICATE----- block is wanted)",
        cert.display()
    );
    let private = PrivateKeyDer::from_pem_file(key).with_context(|| {
        format!(
            "cannot read the TLS private key {} (a PEM file with a PRIVATE KEY block)",
            key.display()
        )
    })?;
    CertifiedKey::from_der(chain, private, &provider()).with_context(|| {
        format!(
            "the key {} does not go with the certificate {}, or is of a kind not supported \
             (RSA, ECDSA P-256/P-384 and Ed25519 are)",
            key.display(),
            cert.display()
        )
    })
}

/// When a file last changed, and its size: a new certificate changes either.
type Stamp = Option<(SystemTime, u64)>;

fn stamp(path: &Path) -> Stamp {
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.modified().ok()?, metadata.len()))
}

/// The certificate of PEM files, swapped for the new one when they change.
#[derive(Debug)]
struct CertificateFiles {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertificateFiles {
    fn load(cert: PathBuf, key: PathBuf) -> anyhow::Result<Self> {
        let current = read_certificate(&cert, &key)?;
        Ok(Self {
            cert,
            key,
            current: RwLock::new(Arc::new(current)),
        })
    }

    fn stamps(&self) -> (Stamp, Stamp) {
        (stamp(&self.cert), stamp(&self.key))
    }

    /// Reads the files again whenever they change. A pair that does not load
    /// (half written, key and certificate out of step) keeps the old
    /// certificate in use and is tried again at the next change.
    async fn watch(self: Arc<Self>) {
        let mut seen = self.stamps();
        loop {
            tokio::time::sleep(RELOAD_CHECK).await;
            let now = self.stamps();
            if now == seen {
                continue;
            }
            seen = now;
            match read_certificate(&self.cert, &self.key) {
                Ok(renewed) => {
                    *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(renewed);
                    tracing::info!("TLS certificate {} reloaded", self.cert.display());
                }
                Err(err) => tracing::warn!("kept the TLS certificate in use: {err:#}"),
            }
        }
    }
}

impl ResolvesServerCert for CertificateFiles {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}
