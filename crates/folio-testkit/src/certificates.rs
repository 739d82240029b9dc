//! Certificates for TLS tests: a CA of the test's own and the server
//! certificates it signs, as the PEM files `folio serve --tls-cert/--tls-key`
//! reads.

use std::path::{Path, PathBuf};

use base64::Engine;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, PublicKeyData};

/// A CA that signs server certificates; its own certificate in `ca.pem`.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA's certificate (PEM), for clients to trust.
    pub cert: PathBuf,
}

/// A server certificate and its key, as PEM files.
pub struct ServerCertificate {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The certificate itself (DER), to tell which one a server presents.
    pub der: Vec<u8>,
    /// SHA-256 of its public key (SubjectPublicKeyInfo), base64: what
    /// Chromium's `--ignore-certificate-errors-spki-list` takes.
    pub spki_sha256: String,
}

impl TestCa {
    /// A new CA, its certificate written to `dir/ca.pem`.
    pub fn new(dir: &Path) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("no names");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "folio test CA");
        let key = KeyPair::generate().expect("a CA key");
        let cert = params.self_signed(&key).expect("the CA's certificate");
        let path = dir.join("ca.pem");
        std::fs::write(&path, cert.pem()).expect("ca.pem written");
        Self {
            issuer: Issuer::new(params, key),
            cert: path,
        }
    }

    /// A certificate for `names` (DNS names or IP addresses) named `common_name`,
    /// written to `cert` and `key` (the chain: the certificate, then the CA's).
    pub fn issue(
        &self,
        names: &[&str],
        common_name: &str,
        cert: &Path,
        key: &Path,
    ) -> ServerCertificate {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("valid names");
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.use_authority_key_identifier_extension = true;
        let key_pair = KeyPair::generate().expect("a server key");
        let signed = params
            .signed_by(&key_pair, &self.issuer)
            .expect("the server's certificate");
        let ca = std::fs::read_to_string(&self.cert).expect("ca.pem");
        std::fs::write(cert, format!("{}{ca}", signed.pem())).expect("the certificate written");
        std::fs::write(key, key_pair.serialize_pem()).expect("the key written");
        let spki = ring::digest::digest(&ring::digest::SHA256, &key_pair.subject_public_key_info());
        ServerCertificate {
            cert: cert.to_owned(),
            key: key.to_owned(),
            der: signed.der().to_vec(),
            spki_sha256: base64::engine::general_purpose::STANDARD.encode(spki.as_ref()),
        }
    }
}
