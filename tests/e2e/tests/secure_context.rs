//! The page off localhost, as a phone or a lab machine opens it: at a name of its
//! own (`folio.test`, which Chromium maps to loopback). Over HTTPS, with a
//! certificate from the test's own CA, the page is a secure context: WebGPU
//! gives an adapter, the page is cross-origin isolated, Web Crypto is there, and
//! a tab on the CPU trains on the threaded build over `wss://`. Over plain HTTP at
//! the same name, the browser withholds all of these: the page says what it lost
//! and how to serve it over HTTPS, and trains on one thread. The page shows the
//! address other devices open, and its QR code.

use std::time::Duration;

use anyhow::ensure;
use folio_e2e::LocalServer;
use folio_e2e::webdriver::{Driver, Session};
use folio_server::{RoundConfig, TlsConfig};
use folio_testkit::certificates::TestCa;
use serde_json::{Value, json};

const NAME: &str = "folio.test";

fn one_short_round() -> RoundConfig {
    RoundConfig {
        max_batches: Some(1),
        eval_clients: 1,
        eval_batches: 1,
        strategy: folio_fed::StrategyConfig::fedavg(1),
        ..RoundConfig::tutorial()
    }
}

/// What the page's context grants, as the page's own scripts would find it.
fn context(browser: &Session) -> anyhow::Result<Value> {
    browser.execute_async(
        "const done = arguments[arguments.length - 1]; \
         (async () => { \
           const adapter = navigator.gpu ? await navigator.gpu.requestAdapter().catch(() => null) : null; \
           return { secure: isSecureContext, isolated: crossOriginIsolated, \
                    subtle: !!globalThis.crypto?.subtle, gpu: !!navigator.gpu, adapter: !!adapter }; \
         })().then(done, (e) => done(String(e)));",
        json!([]),
    )
}

/// The session that trained round 1, once it has.
fn trainer(server: &LocalServer) -> anyhow::Result<Value> {
    server.wait_for_rounds(1, Duration::from_secs(180), "the tab never trained")?;
    let status = server.server.status();
    let sessions = status["clients"].as_array().cloned().unwrap_or_default();
    sessions
        .into_iter()
        .find(|s| {
            s["reported_rounds"]
                .as_array()
                .is_some_and(|r| r.contains(&json!(1)))
        })
        .ok_or_else(|| anyhow::anyhow!("nobody reported round 1: {status}"))
}

#[test]
#[ignore = "needs the built page; scripts/test.sh runs these with --ignored"]
fn off_localhost_the_page_keeps_webgpu_and_threads_over_https_and_says_what_plain_http_costs()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = TestCa::new(dir.path());
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let certificate = ca.issue(&[NAME], NAME, &cert, &key);
    let driver = Driver::chromium()?;
    let browser_args = [
        format!("--host-resolver-rules=MAP {NAME} 127.0.0.1"),
        // The test CA's certificate, trusted as if a public CA had signed it.
        format!(
            "--ignore-certificate-errors-spki-list={}",
            certificate.spki_sha256
        ),
    ];

    let https = LocalServer::start_tls(one_short_round(), 1, TlsConfig::Files { cert, key })?;
    let browser = driver.session_with(1200, 900, &browser_args)?;
    browser.navigate(&format!("{}?backend=cpu", https.url_at(NAME)))?;
    let granted = context(&browser)?;
    eprintln!("over HTTPS at {NAME}: {granted}");
    ensure!(
        granted
            == json!({"secure": true, "isolated": true, "subtle": true, "gpu": true, "adapter": true}),
        "over HTTPS: {granted}"
    );
    let session = trainer(&https)?;
    let cores = std::thread::available_parallelism()?.get();
    ensure!(
        session["backend"] == "flex" && session["adapter"] == format!("{cores} threads"),
        "the tab on the CPU trained on the threaded build over wss: {session}"
    );
    let shown = browser.execute(
        "return document.getElementById('insecure-context').hidden",
        json!([]),
    )?;
    ensure!(shown == json!(true), "no warning over HTTPS");
    // The address other devices open, and its QR code for a phone's camera.
    let join = browser.wait_for(
        "the page to show where devices join, with its QR code",
        "const qr = document.getElementById('join-qr'); \
         return qr.complete && qr.naturalWidth > 0 ? document.getElementById('join-at').textContent : null",
        Duration::from_secs(30),
    )?;
    let address = https.url_at(NAME);
    ensure!(
        join.as_str().is_some_and(|j| j.contains(&address)),
        "{join} lacks {address}"
    );
    let shot = folio_e2e::artifact("https-off-localhost.png")?;
    std::fs::write(&shot, browser.screenshot()?)?;
    drop(browser);

    let http = LocalServer::start(one_short_round(), 1)?;
    let browser = driver.session_with(1200, 900, &browser_args)?;
    browser.navigate(&http.url_at(NAME))?;
    let withheld = context(&browser)?;
    eprintln!("over plain HTTP at {NAME}: {withheld}");
    ensure!(
        withheld
            == json!({"secure": false, "isolated": false, "subtle": false, "gpu": false, "adapter": false}),
        "over plain HTTP: {withheld}"
    );
    let said = browser.wait_for(
        "the page to say what plain HTTP costs",
        "const p = document.getElementById('insecure-context'); return p.hidden ? null : p.textContent",
        Duration::from_secs(30),
    )?;
    let said = said.as_str().unwrap_or_default().to_owned();
    for words in ["WebGPU", "threaded", "HTTPS", "--tls-cert"] {
        ensure!(said.contains(words), "the warning lacks {words:?}: {said}");
    }
    let session = trainer(&http)?;
    ensure!(
        session["backend"] == "flex",
        "over plain HTTP the tab trains on the CPU: {session}"
    );
    let shot = folio_e2e::artifact("plain-http.png")?;
    std::fs::write(&shot, browser.screenshot()?)?;
    eprintln!(
        "over plain HTTP the tab trained on {}; the page says: {said}; screenshot: {}",
        session["adapter"],
        shot.display()
    );
    Ok(())
}
