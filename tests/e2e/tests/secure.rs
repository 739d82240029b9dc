//! A secure round of three real tabs: each runs the secure aggregation steps in
//! wasm (X25519, ChaCha20-Poly1305, Shamir, ChaCha masks, randomness from
//! crypto.getRandomValues), the aggregator commits the round from the sum alone,
//! and the page says so. Needs the built page (ignored by a plain `cargo test`;
//! `scripts/test.sh` runs it).

use std::time::Duration;

use anyhow::ensure;
use folio_e2e::LocalServer;
use folio_e2e::webdriver::Driver;
use folio_fed::{Clipping, StrategyConfig};
use folio_server::{RoundConfig, SecureRounds};

#[test]
#[ignore = "needs the built page; scripts/test.sh runs these with --ignored"]
fn three_tabs_run_a_secure_round_and_the_page_says_the_aggregator_saw_only_the_sum()
-> anyhow::Result<()> {
    let rounds = RoundConfig {
        strategy: StrategyConfig {
            clipping: Clipping::Fixed { bound: 0.5 },
            ..StrategyConfig::fedavg(3)
        },
        max_batches: Some(1),
        eval_clients: 1,
        eval_batches: 1,
        deadline: Duration::from_secs(90),
        secure: Some(SecureRounds {
            threshold: None,
            degree: 0,
            step_timeout: Duration::from_secs(30),
            min_cohort: 3,
        }),
        ..RoundConfig::tutorial()
    };
    let server = LocalServer::start(rounds, 1)?;
    let initial = server.server.weights();
    let driver = Driver::chromium()?;
    let browser = driver.session(1280, 1400)?;
    let url = format!("{}?backend=cpu", server.url());
    browser.navigate(&url)?;
    let first = browser.tab()?;
    browser.open_tab(&url)?;
    browser.open_tab(&url)?;
    browser.switch_to(&first)?;

    server.wait_for_rounds(1, Duration::from_secs(120), "no secure round completed")?;
    let status = server.server.status();
    let latest = &status["latest"];
    ensure!(
        latest["secure"] == true && latest["clients"] == 3,
        "{status}"
    );
    let sessions = status["clients"].as_array().cloned().unwrap_or_default();
    ensure!(
        sessions.len() == 3
            && sessions
                .iter()
                .all(|c| c["kind"] == "browser" && c["rounds"] == 1 && c["last"].is_null()),
        "{status}"
    );
    ensure!(
        server.server.weights() != initial,
        "the sum moved the model"
    );
    ensure!(
        status["errors"].as_object().is_some_and(|e| e.is_empty()),
        "{status}"
    );

    let said = browser.wait_for(
        "the page to say the round was secure",
        "const p = document.getElementById('secure'); \
         if (p.hidden || !p.textContent.includes('round 1 was secure')) return null; \
         p.scrollIntoView({block: 'center'}); return p.textContent",
        Duration::from_secs(30),
    )?;
    let said = said.as_str().unwrap_or_default().to_owned();
    // A private federation's page names no count of the round's devices, and
    // lists only this tab's own session.
    ensure!(said.contains("only the sum of its devices"), "{said}");
    let listed = browser.wait_for(
        "the page to list this tab's own session alone",
        "const rows = document.querySelectorAll('#clients tbody tr');          return !document.getElementById('private-note').hidden && rows.length === 1 ? rows.length : null",
        Duration::from_secs(30),
    )?;
    ensure!(listed == 1, "{listed}");
    let sent = browser.execute(
        "return [...document.querySelectorAll('#device-rounds tbody tr')].map(r => r.lastElementChild.textContent)",
        serde_json::json!([]),
    )?;
    ensure!(
        sent == serde_json::json!(["masked"]),
        "this tab's rounds: {sent}"
    );
    let shot = folio_e2e::artifact("secure-round.png")?;
    std::fs::write(&shot, browser.screenshot()?)?;
    eprintln!("screenshot: {}; the page says: {said}", shot.display());
    Ok(())
}
