//! Asynchronous rounds with tabs of two speeds: one trains on WebGPU
//! (SwiftShader here, the slowest device measured), one on the CPU fallback. No
//! tab waits for the other: the fast tab's updates step the model one by one
//! while the slow one trains, and the slow one's update, several steps behind
//! when it comes, still counts, discounted for its staleness. The page shows the
//! buffer and each step's staleness. Needs the built page (ignored by a plain
//! `cargo test`; `scripts/test.sh` runs it).

use std::time::{Duration, Instant};

use anyhow::ensure;
use folio_e2e::LocalServer;
use folio_e2e::webdriver::Driver;
use folio_fed::{Clipping, StrategyConfig};
use folio_server::{AsyncRounds, RoundConfig};

#[test]
#[ignore = "needs the built page; scripts/test.sh runs these with --ignored"]
fn a_fast_tab_steps_the_model_while_a_slow_one_trains_and_the_slow_update_still_counts()
-> anyhow::Result<()> {
    let rounds = RoundConfig {
        strategy: StrategyConfig {
            clipping: Clipping::Off,
            ..StrategyConfig::fedavg(2)
        },
        max_batches: Some(1),
        eval_clients: 1,
        eval_batches: 1,
        deadline: Duration::from_secs(120),
        asynchronous: Some(AsyncRounds {
            buffer: 1,
            max_staleness: 1_000,
        }),
        ..RoundConfig::tutorial()
    };
    let server = LocalServer::start(rounds, 1_000)?;
    let driver = Driver::chromium()?;
    let browser = driver.session(1280, 1400)?;
    browser.navigate(&server.url())?;
    let slow = browser.tab()?;
    browser.open_tab(&format!("{}?backend=cpu", server.url()))?;
    browser.switch_to(&slow)?;

    // Until a step made of a stale update (the slow tab's) is committed.
    let started = Instant::now();
    let stale_step = loop {
        let history = server.server.history();
        if let Some(step) = history
            .iter()
            .find(|r| r.staleness.is_some_and(|s| s > 0.0))
        {
            break step.clone();
        }
        ensure!(
            started.elapsed() < Duration::from_secs(150),
            "no stale update was taken; the aggregator: {}",
            server.server.status()
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    let status = server.server.status();
    let sessions = status["clients"].as_array().cloned().unwrap_or_default();
    let backends: Vec<String> = sessions
        .iter()
        .map(|c| c["backend"].as_str().unwrap_or_default().to_owned())
        .collect();
    ensure!(
        backends.iter().any(|b| b == "webgpu") && backends.iter().any(|b| b == "flex"),
        "{status}"
    );
    let rounds_of = |backend: &str| {
        sessions
            .iter()
            .find(|c| c["backend"] == backend)
            .and_then(|c| c["rounds"].as_u64())
            .unwrap_or(0)
    };
    ensure!(
        rounds_of("flex") > rounds_of("webgpu"),
        "the fast tab stepped the model more often: {status}"
    );
    ensure!(
        status["errors"].as_object().is_some_and(|e| e.is_empty()),
        "{status}"
    );
    let said = browser.wait_for(
        "the page to show the buffer and a stale step",
        "const text = document.getElementById('round-text').textContent; \
         const column = [...document.querySelectorAll('#history thead th')].findIndex(h => h.textContent === 'staleness'); \
         const stale = [...document.querySelectorAll('#history tbody tr')].some(r => Number(r.children[column].textContent) > 0); \
         return text.includes('asynchronous rounds') && stale ? text : null",
        Duration::from_secs(30),
    )?;
    let shot = folio_e2e::artifact("asynchronous-rounds.png")?;
    std::fs::write(&shot, browser.screenshot()?)?;
    eprintln!(
        "screenshot: {}; round {} took an update {} steps stale; the page says: {said}",
        shot.display(),
        stale_step.round,
        stale_step.staleness.unwrap_or_default()
    );
    Ok(())
}
