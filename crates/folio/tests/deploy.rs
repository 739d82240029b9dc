//! `folio` deployed beyond loopback's defaults: `serve` over TLS with native
//! clients on `wss://`.

use std::process::{Command, Stdio};

use folio_testkit::certificates::TestCa;
use folio_testkit::data_dir;

/// The `folio` binary as a process of its own (to run beside others).
fn folio() -> Command {
    let mut cmd = Command::new(assert_cmd::cargo::cargo_bin("folio"));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .arg("--data-dir")
        .arg(data_dir());
    cmd
}

fn free_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

/// `folio serve --tls-cert --tls-key` runs rounds with `folio client`s on
/// `wss://`, each checking the certificate against the CA it was told to trust
/// (`SSL_CERT_FILE`); a client trusting only the system's CAs refuses it.
#[test]
fn native_clients_train_over_wss_against_a_certificate_they_check() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path());
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    ca.issue(&["localhost"], "folio", &cert, &key);
    let addr = free_address();
    let port = addr.rsplit(':').next().unwrap().to_owned();
    let state = tempfile::tempdir().unwrap();
    let server = folio()
        .args([
            "serve",
            "--preset",
            "small",
            "--fresh",
            "--max-batches",
            "1",
        ])
        .args(["--addr", &addr, "--rounds", "2", "--clients-per-round", "2"])
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .arg("--state-dir")
        .arg(state.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let url = format!("wss://localhost:{port}/ws");
    let client = |trusted: &std::path::Path| {
        folio()
            .args(["client", "--server", &url])
            .env("SSL_CERT_FILE", trusted)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let clients = [client(&ca.cert), client(&ca.cert)];
    let table = server.wait_with_output().unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("https://"), "{table}");
    assert!(
        table.lines().any(|l| l.trim_start().starts_with("2 ")),
        "no round 2 over wss: {table}"
    );
    for client in clients {
        let out = client.wait_with_output().unwrap();
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.contains("round 2"), "{said}");
    }

    // A CA the client was not told to trust: the certificate is refused.
    let other = tempfile::tempdir().unwrap();
    let stranger = TestCa::new(other.path());
    let state = tempfile::tempdir().unwrap();
    let mut server = folio()
        .args(["serve", "--preset", "small", "--fresh", "--addr", &addr])
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .arg("--state-dir")
        .arg(state.path())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    while std::net::TcpStream::connect(&addr).is_err() {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let refused = client(&stranger.cert).wait_with_output().unwrap();
    server.kill().unwrap();
    let _ = server.wait();
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{said}");
    assert!(said.to_lowercase().contains("certificate"), "{said}");
}
