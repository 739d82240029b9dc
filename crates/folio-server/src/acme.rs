//! Certificates from an ACME CA (Let's Encrypt, or any RFC 8555 one): the
//! server proves it holds its names with the TLS-ALPN-01 challenge on its own
//! port (no port 80 needed), keeps the account and the certificate in a cache
//! folder, and orders a new certificate before the old one gets old.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail, ensure};
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// What to ask an ACME CA for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeConfig {
    /// The names the certificate is for (each must reach this server's port 443,
    /// or the port the CA checks).
    pub domains: Vec<String>,
    /// The CA's directory URL.
    pub directory: String,
    /// Where the account key and the certificate are kept across restarts.
    pub cache: PathBuf,
    /// `mailto:` addresses the CA may write to about the certificate.
    pub contact: Vec<String>,
    /// A CA to trust for the directory's own HTTPS (a test CA); `None`: the system's.
    pub directory_ca: Option<PathBuf>,
    /// How often the certificate's age is looked at (a file's time: cheap).
    pub check_every: Duration,
}

/// The TLS-ALPN-01 protocol: a CA's check of a name, answered with a
/// certificate made for it.
const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// A certificate older than this is renewed (Let's Encrypt's last 90 days).
const RENEW_AFTER: Duration = Duration::from_secs(60 * 24 * 3600);
/// After a failed order, the next try.
const RETRY_AFTER: Duration = Duration::from_secs(60);

/// Serves the certificate obtained (none until the first order completes) and
/// the answers to the CA's challenges.
#[derive(Debug)]
pub struct AcmeCertificates {
    config: AcmeConfig,
    current: RwLock<Option<Arc<CertifiedKey>>>,
    /// The challenge certificates of an order in progress, by name.
    challenges: RwLock<Vec<(String, Arc<CertifiedKey>)>>,
}

impl AcmeCertificates {
    /// The certificate cached by an earlier run, if any.
    pub fn new(config: AcmeConfig) -> anyhow::Result<Self> {
        ensure!(
            !config.domains.is_empty(),
            "--acme-domain: at least one name is needed"
        );
        std::fs::create_dir_all(&config.cache)
            .with_context(|| format!("cannot create the ACME cache {}", config.cache.display()))?;
        let (cert, key) = cached(&config.cache);
        let current = crate::tls::read_certificate(&cert, &key).ok().map(Arc::new);
        Ok(Self {
            config,
            current: RwLock::new(current),
            challenges: RwLock::new(Vec::new()),
        })
    }

    /// The ALPN protocols to offer: HTTP/1.1, and the CA's check.
    pub fn alpn() -> Vec<Vec<u8>> {
        vec![b"http/1.1".to_vec(), ACME_TLS_ALPN.to_vec()]
    }

    /// Orders a certificate when there is none or it is old, forever.
    pub async fn keep_current(self: Arc<Self>) {
        loop {
            let wait = match self.needs_order() {
                false => self.config.check_every,
                true => match self.order().await {
                    Ok(()) => {
                        tracing::info!(
                            "ACME: a certificate for {} from {}",
                            self.config.domains.join(", "),
                            self.config.directory
                        );
                        self.config.check_every
                    }
                    Err(err) => {
                        tracing::warn!(
                            "ACME: no certificate from {} ({err:#}); trying again in {} s",
                            self.config.directory,
                            RETRY_AFTER.as_secs()
                        );
                        RETRY_AFTER
                    }
                },
            };
            tokio::time::sleep(wait).await;
        }
    }

    fn needs_order(&self) -> bool {
        let (cert, _) = cached(&self.config.cache);
        let age = std::fs::metadata(&cert)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|modified| SystemTime::now().duration_since(modified).ok());
        let have = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_some();
        !have || age.is_none_or(|age| age > RENEW_AFTER)
    }

    async fn account(&self) -> anyhow::Result<Account> {
        let builder = || match &self.config.directory_ca {
            Some(ca) => Account::builder_with_root(ca),
            None => Account::builder(),
        };
        let path = self.config.cache.join("account.json");
        if let Ok(text) = std::fs::read_to_string(&path) {
            let credentials: AccountCredentials = serde_json::from_str(&text)
                .with_context(|| format!("{} is not an ACME account", path.display()))?;
            return Ok(builder()?.from_credentials(credentials).await?);
        }
        let contact: Vec<&str> = self.config.contact.iter().map(String::as_str).collect();
        let (account, credentials) = builder()?
            .create(
                &NewAccount {
                    contact: &contact,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                self.config.directory.clone(),
                None,
            )
            .await
            .with_context(|| format!("cannot open an account at {}", self.config.directory))?;
        write_private(&path, serde_json::to_string(&credentials)?.as_bytes())?;
        Ok(account)
    }

    /// One order: each name proved by TLS-ALPN-01, the certificate fetched,
    /// cached and served.
    async fn order(&self) -> anyhow::Result<()> {
        let account = self.account().await?;
        let identifiers: Vec<Identifier> = self
            .config
            .domains
            .iter()
            .map(|d| Identifier::Dns(d.clone()))
            .collect();
        let mut order = account.new_order(&NewOrder::new(&identifiers)).await?;
        let mut authorizations = order.authorizations();
        while let Some(authorization) = authorizations.next().await {
            let mut authorization = authorization?;
            match authorization.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                status => bail!("an authorization is {status:?}"),
            }
            let mut challenge = authorization
                .challenge(ChallengeType::TlsAlpn01)
                .context("the CA offers no tls-alpn-01 challenge")?;
            let name = challenge.identifier().to_string();
            let answer = challenge_certificate(&name, challenge.key_authorization().digest())?;
            self.challenges
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .push((name, Arc::new(answer)));
            challenge.set_ready().await?;
        }
        let status = order.poll_ready(&RetryPolicy::default()).await?;
        self.challenges
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        ensure!(status == OrderStatus::Ready, "the order is {status:?}");
        let key = order.finalize().await?;
        let chain = order.poll_certificate(&RetryPolicy::default()).await?;
        let (cert_path, key_path) = cached(&self.config.cache);
        write_private(&key_path, key.as_bytes())?;
        write_private(&cert_path, chain.as_bytes())?;
        let certified = crate::tls::read_certificate(&cert_path, &key_path)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(certified));
        Ok(())
    }
}

impl ResolvesServerCert for AcmeCertificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let challenged = hello
            .alpn()
            .is_some_and(|mut protocols| protocols.any(|p| p == ACME_TLS_ALPN));
        if challenged {
            let name = hello.server_name()?;
            let challenges = self.challenges.read().unwrap_or_else(|p| p.into_inner());
            return challenges
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, certificate)| certificate.clone());
        }
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The cached certificate chain and key.
fn cached(cache: &Path) -> (PathBuf, PathBuf) {
    (cache.join("cert.pem"), cache.join("key.pem"))
}

/// RFC 8737's answer: a self-signed certificate for `name` carrying the
/// digest of the key authorization.
fn challenge_certificate(name: &str, digest: impl AsRef<[u8]>) -> anyhow::Result<CertifiedKey> {
    let mut params = rcgen::CertificateParams::new(vec![name.to_owned()])?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest.as_ref())];
    let key = rcgen::KeyPair::generate()?;
    let certificate = params.self_signed(&key)?;
    let private = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der())
        .map_err(|err| anyhow::anyhow!("the challenge key: {err}"))?;
    // Not `from_der`: its check of the key parses the certificate, which
    // refuses the critical acmeIdentifier extension the CA asks for.
    let signing = crate::tls::provider()
        .key_provider
        .load_private_key(private)?;
    Ok(CertifiedKey::new(vec![certificate.der().clone()], signing))
}

/// Writes a file only its owner reads, by a rename (never half written).
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let partial = path.with_extension("partial");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(&partial)
        .with_context(|| format!("cannot write {}", partial.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&partial, path).with_context(|| format!("cannot write {}", path.display()))
}
