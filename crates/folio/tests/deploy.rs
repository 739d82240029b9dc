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

/// GETs `path` from a plain-HTTP server: the status code and the body (`None`
/// while it does not answer).
fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    let code = answer
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Some((code, body.to_owned()))
}

/// A real Prometheus scrapes `folio serve`'s `/metrics` over HTTPS with the
/// admin token, and its query API returns the rounds the aggregator committed.
#[test]
fn prometheus_scrapes_the_aggregator_and_its_query_api_returns_the_rounds() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path());
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    ca.issue(&["localhost"], "folio", &cert, &key);
    let token = dir.path().join("admin-token");
    std::fs::write(&token, "metrics-reader-secret\n").unwrap();
    let addr = free_address();
    let state = tempfile::tempdir().unwrap();
    let mut server = folio()
        .args([
            "serve",
            "--preset",
            "small",
            "--fresh",
            "--max-batches",
            "1",
        ])
        .args(["--addr", &addr, "--clients-per-round", "2"])
        .arg("--admin-token-file")
        .arg(&token)
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .arg("--state-dir")
        .arg(state.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let port = addr.rsplit(':').next().unwrap();
    let url = format!("wss://localhost:{port}/ws");
    let mut clients: Vec<_> = (0..2)
        .map(|_| {
            folio()
                .args(["client", "--server", &url])
                .env("SSL_CERT_FILE", &ca.cert)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();

    let prometheus_addr = free_address();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s, scrape_timeout: 1s}}\n\
             scrape_configs:\n\
             - job_name: folio\n  scheme: https\n  \
               tls_config: {{ca_file: '{ca}', server_name: localhost}}\n  \
               authorization: {{credentials_file: '{token}'}}\n  \
               static_configs: [{{targets: ['{addr}']}}]\n",
            ca = ca.cert.display(),
            token = token.display(),
        ),
    )
    .unwrap();
    let mut prometheus = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={prometheus_addr}"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("prometheus is installed by scripts/test.sh (Debian package prometheus)");

    let query = |expression: &str| -> Option<f64> {
        let (code, body) = http_get(
            &prometheus_addr,
            &format!("/api/v1/query?query={expression}"),
        )?;
        let answer: serde_json::Value = serde_json::from_str(&body).ok()?;
        (code == 200).then_some(())?;
        answer["data"]["result"][0]["value"][1]
            .as_str()?
            .parse()
            .ok()
    };
    let started = std::time::Instant::now();
    let rounds = loop {
        if let Some(rounds) = query("folio_rounds_completed_total").filter(|&r| r >= 2.0) {
            break rounds;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "Prometheus never saw 2 rounds; up: {:?}",
            query("up")
        );
        std::thread::sleep(std::time::Duration::from_millis(250));
    };
    let up = query("up{job=\"folio\"}");
    let updates = query("folio_updates_accepted_total");
    let loss = query("folio_eval_loss");
    for child in clients.iter_mut().chain([&mut server, &mut prometheus]) {
        let _ = child.kill();
        let _ = child.wait();
    }
    eprintln!(
        "Prometheus: folio_rounds_completed_total {rounds}, up {up:?}, \
         folio_updates_accepted_total {updates:?}, folio_eval_loss {loss:?}"
    );
    assert_eq!(up, Some(1.0));
    assert!(updates.is_some_and(|u| u >= 2.0), "{updates:?}");
    assert!(loss.is_some_and(|l| l > 0.0 && l < 5.0), "{loss:?}");
}
