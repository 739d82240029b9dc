//! `folio serve` over TLS: HTTPS with HSTS, `wss://`, a renewed certificate
//! taken without a restart, and files that cannot be used refused with words.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use folio_server::{RoundConfig, Server, ServerConfig, TlsConfig};
use folio_testkit::certificates::TestCa;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn client_trusting(ca: &Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    // Every handshake a full one: a resumed session shows no certificate.
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

/// GETs `path` over HTTPS: the certificate the server presented, and the whole answer.
async fn https_get(
    client: &Arc<rustls::ClientConfig>,
    addr: std::net::SocketAddr,
    path: &str,
) -> anyhow::Result<(Vec<u8>, String)> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let connector = tokio_rustls::TlsConnector::from(client.clone());
    let mut tls = connector
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    let presented = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer).await;
    Ok((presented, String::from_utf8_lossy(&answer).into_owned()))
}

fn tls_config(state: &Path, cert: &Path, key: &Path) -> ServerConfig {
    ServerConfig {
        tls: Some(TlsConfig::Files {
            cert: cert.to_owned(),
            key: key.to_owned(),
        }),
        ..folio_testkit::server_config(state, RoundConfig::tutorial(), 1_000)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_and_wss_with_a_certificate_renewed_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path());
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let first = ca.issue(&["localhost", "127.0.0.1"], "first", &cert, &key);
    let state = tempfile::tempdir().unwrap();
    let server = Server::start(tls_config(state.path(), &cert, &key))
        .await
        .unwrap();
    let client = client_trusting(&ca.cert);

    let (presented, answer) = https_get(&client, server.addr, "/api/status")
        .await
        .unwrap();
    assert_eq!(presented, first.der);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("strict-transport-security: max-age=31536000"),
        "HSTS: {answer}"
    );

    // wss:// with the certificate checked against the CA.
    let connector = tokio_tungstenite::Connector::Rustls(client.clone());
    let url = format!("wss://localhost:{}/ws", server.addr.port());
    let (socket, response) =
        tokio_tungstenite::connect_async_tls_with_config(&url, None, false, Some(connector))
            .await
            .unwrap();
    assert_eq!(response.status(), 101);
    drop(socket);

    // Plain HTTP on the TLS port is no TLS handshake: closed, and the server serves on.
    let mut plain = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    plain
        .write_all(b"GET /api/status HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer).await;
    assert!(!String::from_utf8_lossy(&answer).contains("200 OK"));

    // A renewed certificate written over the files is served within seconds.
    let renewed = ca.issue(&["localhost", "127.0.0.1"], "renewed", &cert, &key);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (presented, _) = https_get(&client, server.addr, "/api/status")
            .await
            .unwrap();
        if presented == renewed.der {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the renewed certificate not served in 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A file that cannot be used (half written, say) keeps the certificate in use.
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nnot one\n").unwrap();
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let (presented, answer) = https_get(&client, server.addr, "/api/status")
        .await
        .unwrap();
    assert_eq!(presented, renewed.der);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    server.shutdown().await;
}

#[tokio::test]
async fn certificate_files_that_cannot_be_used_are_refused_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path());
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    ca.issue(&["localhost"], "one", &cert, &key);
    let (other_cert, other_key) = (
        dir.path().join("other.pem"),
        dir.path().join("other-key.pem"),
    );
    ca.issue(&["localhost"], "other", &other_cert, &other_key);
    let state = tempfile::tempdir().unwrap();
    let start = |cert: &Path, key: &Path| {
        let config = tls_config(state.path(), cert, key);
        async move {
            match Server::start(config).await {
                Ok(_) => panic!("started with unusable certificate files"),
                Err(err) => format!("{err:#}"),
            }
        }
    };
    let missing = start(&dir.path().join("nowhere.pem"), &key).await;
    assert!(
        missing.contains("cannot read the TLS certificate"),
        "{missing}"
    );
    let swapped = start(&cert, &other_key).await;
    assert!(
        swapped.contains("does not go with the certificate"),
        "{swapped}"
    );
    let not_a_key = start(&cert, &cert).await;
    assert!(
        not_a_key.contains("cannot read the TLS private key"),
        "{not_a_key}"
    );
}

/// A peer that starts a TLS handshake and never finishes it holds its
/// connection for the header timeout at most (not the longer idle timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_left_half_done_is_closed_at_the_header_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path());
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    ca.issue(&["localhost"], "one", &cert, &key);
    let state = tempfile::tempdir().unwrap();
    let mut config = tls_config(state.path(), &cert, &key);
    config.limits.header_timeout = Duration::from_secs(1);
    let server = Server::start(config).await.unwrap();
    let mut slow = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    // The first bytes of a ClientHello, then nothing.
    slow.write_all(&[0x16, 3, 1, 0x02, 0x00, 1, 0, 1, 0xfc])
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "still open after 10 s");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    server.abort();
}
