//! `folio` deployed beyond loopback's defaults: `serve` over TLS with native
//! clients on `wss://`.

use std::path::Path;
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
/// `folio serve` of the small preset (one batch a round) on `addr` over TLS
/// with `cert` and `key`, its state in `state`, with `extra` flags.
fn serve_tls(addr: &str, (cert, key): (&Path, &Path), state: &Path, extra: &[&str]) -> Command {
    let mut command = folio();
    command
        .args([
            "serve",
            "--preset",
            "small",
            "--fresh",
            "--max-batches",
            "1",
        ])
        .args(["--addr", addr])
        .args(extra)
        .arg("--tls-cert")
        .arg(cert)
        .arg("--tls-key")
        .arg(key)
        .arg("--state-dir")
        .arg(state);
    command
}

/// `folio client` on `url`, trusting the CA certificate `trusted`.
fn wss_client(url: &str, trusted: &Path) -> Command {
    let mut command = folio();
    command
        .args(["client", "--server", url])
        .env("SSL_CERT_FILE", trusted);
    command
}

#[test]
fn native_clients_train_over_wss_against_a_certificate_they_check() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path());
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    ca.issue(&["localhost"], "folio", &cert, &key);
    let addr = free_address();
    let port = addr.rsplit(':').next().unwrap().to_owned();
    let state = tempfile::tempdir().unwrap();
    let server = serve_tls(
        &addr,
        (&cert, &key),
        state.path(),
        &[
            "--rounds",
            "2",
            "--clients-per-round",
            "2",
            "--log-format",
            "json",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let url = format!("wss://localhost:{port}/ws");
    let client = |trusted: &Path| {
        wss_client(&url, trusted)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let clients = [client(&ca.cert), client(&ca.cert)];
    let output = server.wait_with_output().unwrap();
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(table.contains("https://"), "{table}");
    // --log-format json: every log line one JSON object, the rounds among them.
    let logs = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "round committed" && l["fields"]["round"] == 2),
        "{logs}"
    );
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
    let mut server = serve_tls(&addr, (&cert, &key), state.path(), &[])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    while std::net::TcpStream::connect(&addr).is_err() {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let mut refused = client(&stranger.cert);
    // It stops by itself, at once: a client retrying forever fails the test.
    let started = std::time::Instant::now();
    while refused.try_wait().unwrap().is_none() {
        if started.elapsed() > std::time::Duration::from_secs(20) {
            let _ = refused.kill();
            panic!("a client with a certificate it cannot trust kept retrying");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let refused = refused.wait_with_output().unwrap();
    server.kill().unwrap();
    let _ = server.wait();
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{said}");
    assert!(said.to_lowercase().contains("certificate"), "{said}");
}

/// GETs `path` from a plain-HTTP server: the status code and the body (`None`
/// while it does not answer).
fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    http_get_with(addr, path, "")
}

/// The same with more request headers (`Name: value\r\n` each).
fn http_get_with(addr: &str, path: &str, headers: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Connection: close\r\n\r\n"
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
    let token_arg = token.display().to_string();
    let mut server = serve_tls(
        &addr,
        (&cert, &key),
        state.path(),
        &["--clients-per-round", "2", "--admin-token-file", &token_arg],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let port = addr.rsplit(':').next().unwrap();
    let url = format!("wss://localhost:{port}/ws");
    let mut clients: Vec<_> = (0..2)
        .map(|_| {
            wss_client(&url, &ca.cert)
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

/// GETs `path` over HTTPS from `addr` as `name`, trusting the CA certificates of
/// PEM `roots`: the certificate presented, and the answer's body.
fn https_get(addr: &str, name: &str, roots: &[u8], path: &str) -> Option<(Vec<u8>, String)> {
    use rustls::pki_types::pem::PemObject;
    use std::io::{Read, Write};
    let mut store = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(roots) {
        store.add(cert.ok()?).ok()?;
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(store)
        .with_no_client_auth();
    let server_name = rustls::pki_types::ServerName::try_from(name.to_owned()).ok()?;
    let connection =
        rustls::ClientConnection::new(std::sync::Arc::new(config), server_name).ok()?;
    let tcp = std::net::TcpStream::connect(addr).ok()?;
    let mut tls = rustls::StreamOwned::new(connection, tcp);
    write!(
        tls,
        "GET {path} HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer);
    let presented = tls.conn.peer_certificates()?.first()?.to_vec();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let body = answer
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Some((presented, body))
}

/// A process stopped when dropped.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `folio serve --acme-domain` gets its certificate from a real ACME CA
/// (Debian's pebble, its names resolved by pebble-challtestsrv to loopback),
/// proving the name by TLS-ALPN-01 on its own port, and serves it; when the
/// certificate gets old it orders a new one and serves that, without a restart.
#[test]
fn an_acme_ca_issues_the_certificate_and_a_renewal_is_served_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path());
    let (pebble_cert, pebble_key) = (
        dir.path().join("pebble.pem"),
        dir.path().join("pebble-key.pem"),
    );
    ca.issue(
        &["localhost", "127.0.0.1"],
        "pebble",
        &pebble_cert,
        &pebble_key,
    );
    let (folio_addr, pebble_addr, management, dns) = (
        free_address(),
        free_address(),
        free_address(),
        free_address(),
    );
    let folio_port = folio_addr.rsplit(':').next().unwrap().to_owned();
    let config = dir.path().join("pebble.json");
    std::fs::write(
        &config,
        serde_json::json!({"pebble": {
            "listenAddress": pebble_addr,
            "managementListenAddress": management,
            "certificate": pebble_cert,
            "privateKey": pebble_key,
            "httpPort": 5002,
            "tlsPort": folio_port.parse::<u16>().unwrap(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false
        }})
        .to_string(),
    )
    .unwrap();
    // Every name is 127.0.0.1 (no AAAA answers: folio listens on IPv4).
    let _dns = Running(
        Command::new("pebble-challtestsrv")
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .args([
                "-dns01",
                &dns,
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
            ])
            .args(["-management", &free_address()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("pebble-challtestsrv is installed by scripts/test.sh (Debian package pebble)"),
    );
    let _pebble = Running(
        Command::new("pebble")
            .arg("-config")
            .arg(&config)
            .args(["-dnsserver", &dns])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("pebble is installed by scripts/test.sh (Debian package pebble)"),
    );
    let test_ca = std::fs::read(&ca.cert).unwrap();
    let wait = |what: &str, seconds: u64, mut done: Box<dyn FnMut() -> bool + '_>| {
        let started = std::time::Instant::now();
        while !done() {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(seconds),
                "{what}: not within {seconds} s"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    let mut roots = Vec::new();
    wait(
        "pebble's root",
        30,
        Box::new(
            || match https_get(&management, "localhost", &test_ca, "/roots/0") {
                Some((_, body)) if body.contains("BEGIN CERTIFICATE") => {
                    roots = body.into_bytes();
                    true
                }
                _ => false,
            },
        ),
    );

    let state = tempfile::tempdir().unwrap();
    let cache = state.path().join("acme");
    let _server = Running(
        folio()
            .args([
                "serve",
                "--preset",
                "small",
                "--fresh",
                "--addr",
                &folio_addr,
            ])
            .args(["--acme-domain", "folio.test", "--acme-check-secs", "1"])
            .arg("--acme-directory")
            .arg(format!("https://{pebble_addr}/dir"))
            .arg("--acme-directory-ca")
            .arg(&ca.cert)
            .arg("--state-dir")
            .arg(state.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut issued = Vec::new();
    wait(
        "a certificate from pebble, served",
        60,
        Box::new(
            || match https_get(&folio_addr, "folio.test", &roots, "/api/status") {
                Some((presented, body)) if body.contains("completed_rounds") => {
                    issued = presented;
                    true
                }
                _ => false,
            },
        ),
    );
    assert!(cache.join("cert.pem").is_file() && cache.join("account.json").is_file());

    // Sixty-one days later (the file's time moved back), a new one is ordered and served.
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(61 * 24 * 3600);
    std::fs::File::options()
        .write(true)
        .open(cache.join("cert.pem"))
        .unwrap()
        .set_modified(old)
        .unwrap();
    wait(
        "the renewed certificate, served",
        60,
        Box::new(|| {
            https_get(&folio_addr, "folio.test", &roots, "/api/status")
                .is_some_and(|(presented, _)| presented != issued)
        }),
    );
    eprintln!(
        "pebble issued {} bytes of certificate for folio.test, and a renewal, both served by one folio serve",
        issued.len()
    );
}

/// Every key of `value`, at any depth.
fn keys(value: &serde_json::Value, into: &mut std::collections::BTreeSet<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, inner) in map {
                into.insert(key.clone());
                keys(inner, into);
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| keys(v, into)),
        _ => {}
    }
}

/// Runs a private federation (`folio serve` with `extra`: DP-FedAvg, q = 1 so
/// all three `folio client`s take part in all 6 rounds), reading every public
/// endpoint through the run; fails on any participant or exact count published
/// there, in the printed table or in the logs. Returns the public bodies read.
fn no_participant_published(extra: &[&str]) -> Vec<String> {
    let state = tempfile::tempdir().unwrap();
    let addr = free_address();
    let mut server = folio()
        .args(["serve", "--preset", "small", "--fresh"])
        .args(["--max-batches", "1", "--addr", &addr, "--rounds", "6"])
        .args(["--min-clients", "3"])
        // More clients a round than the corpus has: q = 1, all three in every
        // round, so there is participation to leak.
        .args(["--clients-per-round", "100000", "--quorum", "1"])
        .args(["--strategy", "dp-fedavg", "--clip-bound", "0.5"])
        .args(extra)
        .arg("--state-dir")
        .arg(state.path())
        .env("FOLIO_ADMIN_TOKEN", "operator-secret")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    while std::net::TcpStream::connect(&addr).is_err() {
        if let Some(exit) = server.try_wait().unwrap() {
            let mut why = String::new();
            std::io::Read::read_to_string(server.stderr.as_mut().unwrap(), &mut why).unwrap();
            panic!("folio serve stopped ({exit}): {why}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // The operator's views stay behind the token; a wrong one is refused.
    let wrong = "Authorization: Bearer guess\r\n";
    assert_eq!(http_get_with(&addr, "/api/status", wrong).unwrap().0, 401);
    assert_eq!(http_get(&addr, "/metrics").unwrap().0, 401);
    // A proxy's own credentials are not an admin's: the public view.
    let basic = "Authorization: Basic dXNlcjpwYXNz\r\n";
    assert_eq!(http_get_with(&addr, "/api/status", basic).unwrap().0, 200);
    let clients: Vec<_> = (0..3)
        .map(|_| {
            folio()
                .args(["client", "--server", &format!("ws://{addr}/ws")])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    // Read every public endpoint until the run ends (rounds open and closed).
    let mut public = Vec::new();
    let mut operator = None;
    // Rounds done at each read: the reads span the run.
    let mut seen = std::collections::BTreeSet::new();
    let admin = "Authorization: Bearer operator-secret\r\n";
    while let Some((200, status)) = http_get(&addr, "/api/status") {
        if let Ok(value) = serde_json::from_str::<serde_json::Value>(&status) {
            seen.insert(value["completed_rounds"].as_u64());
        }
        public.push(status);
        if let Some((200, history)) = http_get(&addr, "/api/history") {
            public.push(history);
        }
        // A session token that proves nothing shows no row.
        if let Some((200, forged)) = http_get_with(&addr, "/api/status", "folio-session: 1.00\r\n")
        {
            public.push(forged);
        }
        if let Some((200, full)) = http_get_with(&addr, "/api/status", admin) {
            operator = Some(full);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let output = server.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut ids = Vec::new();
    for client in clients {
        let said = String::from_utf8_lossy(&client.wait_with_output().unwrap().stdout).to_string();
        let id = said
            .lines()
            .find_map(|l| l.strip_prefix("training as "))
            .and_then(|l| l.split(' ').next())
            .unwrap_or_else(|| panic!("no client id in {said}"))
            .to_owned();
        ids.push(id);
    }
    let operator = operator.expect("the operator's status was read");
    // What the operator sees: the data a public surface must not show exist.
    for id in &ids {
        assert!(
            operator.contains(&format!("\"{id}\"")),
            "{id} not in {operator}"
        );
    }
    let full: serde_json::Value = serde_json::from_str(&operator).unwrap();
    let took_part = full["clients"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| !c["reported_rounds"].as_array().unwrap().is_empty())
        .count();
    assert_eq!(took_part, 3, "{operator}");
    let withheld = [
        "client_id",
        "reported_rounds",
        "selected_sessions",
        "reported_sessions",
        "dropped_sessions",
        "selected",
        "reported",
        "clients",
        "examples",
        "clipped",
        "delta_norm",
        "train_loss",
        "train_accuracy",
        "bytes_up",
        "bytes_down",
        "errors",
        "federated",
        "seconds",
        "attempt",
    ];
    assert!(seen.len() >= 3, "read at rounds {seen:?} only");
    for body in &public {
        let value: serde_json::Value =
            serde_json::from_str(body).unwrap_or_else(|_| panic!("{body}"));
        let mut found = std::collections::BTreeSet::new();
        keys(&value, &mut found);
        for field in withheld {
            assert!(!found.contains(field), "{field} published: {body}");
        }
        for id in &ids {
            assert!(!body.contains(id.as_str()), "{id} published: {body}");
        }
    }
    // Neither the table the server prints nor its logs.
    let printed = String::from_utf8_lossy(&output.stdout);
    let logs = String::from_utf8_lossy(&output.stderr);
    for id in &ids {
        assert!(
            !printed.contains(id.as_str()) && !logs.contains(id.as_str()),
            "{id}"
        );
    }
    assert!(!logs.contains("clients="), "{logs}");
    let row = printed
        .lines()
        .find(|l| l.trim_start().starts_with("6 "))
        .expect("round 6");
    assert!(row.split_whitespace().nth(1) == Some("-"), "{row}");
    public
}

/// A DP run of `folio serve` with three `folio client`s: every public endpoint,
/// read throughout, and the server's output name no client that took part and
/// give no exact count or norm; the operator, with the admin token, sees them.
#[test]
fn a_dp_run_publishes_no_participant_on_any_public_surface() {
    no_participant_published(&[]);
}

/// Distributed DP on the binary: the same surfaces publish nothing of the
/// participants, every round is a secure sum the devices noised, and ε grows.
#[test]
fn a_distributed_dp_run_publishes_no_participant_and_its_noise_is_the_devices() {
    let public = no_participant_published(&[
        "--secure-aggregation",
        "--distributed-dp",
        "--ddp-min-inputs",
        "3",
    ]);
    let mut epsilons = Vec::new();
    let mut secure_rounds = std::collections::BTreeSet::new();
    for body in &public {
        let value: serde_json::Value = serde_json::from_str(body).unwrap();
        if let Some(privacy) = value.get("privacy").filter(|p| !p.is_null()) {
            assert_eq!(privacy["distributed"], true, "{body}");
            epsilons.push(privacy["epsilon"].as_f64().unwrap());
        }
        // /api/history: the records, an array.
        for record in value.as_array().into_iter().flatten() {
            if record["round"].as_u64() > Some(0) {
                assert_eq!(record["secure"], true, "{record}");
                secure_rounds.insert(record["round"].as_u64());
            }
        }
    }
    assert!(secure_rounds.len() >= 5, "{secure_rounds:?}");
    assert!(epsilons.windows(2).all(|w| w[0] <= w[1]), "{epsilons:?}");
    assert!(epsilons.last() > Some(&0.0), "{epsilons:?}");
}
