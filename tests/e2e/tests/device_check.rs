//! A tab whose WebGPU computes wrong gradients (the page's own
//! `?backend=faulty-webgpu`: its gradients come out zero) answers the aggregator's
//! device check wrong: it is told why and never selected; the page says so and
//! starts the device again on its CPU fallback, whose answer checks out, and the
//! tab trains.

use std::time::Duration;

use anyhow::ensure;
use folio_e2e::LocalServer;
use folio_e2e::webdriver::Driver;
use folio_server::RoundConfig;

#[test]
#[ignore = "needs the built page; scripts/test.sh runs these with --ignored"]
fn a_tab_whose_webgpu_is_wrong_is_not_selected_and_trains_on_its_cpu_fallback() -> anyhow::Result<()>
{
    let rounds = RoundConfig {
        max_batches: Some(1),
        eval_clients: 1,
        eval_batches: 1,
        strategy: folio_fed::StrategyConfig::fedavg(1),
        ..RoundConfig::tutorial()
    };
    let server = LocalServer::start(rounds, 2)?;
    let driver = Driver::chromium()?;
    let browser = driver.session(1280, 1400)?;
    browser.navigate(&format!("{}?backend=faulty-webgpu", server.url()))?;

    server.wait_for_rounds(1, Duration::from_secs(150), "the tab never trained")?;
    let status = server.server.status();
    ensure!(status["errors"]["device_check_failed"] == 1, "{status}");
    let sessions = status["clients"].as_array().cloned().unwrap_or_default();
    ensure!(
        sessions.len() == 1,
        "one session, resumed on the CPU: {status}"
    );
    let session = &sessions[0];
    ensure!(
        session["backend"] == "flex"
            && session["check"] == "passed"
            && session["rounds"].as_u64() >= Some(1),
        "{status}"
    );
    let notices = browser.wait_for(
        "the page to say why it left WebGPU",
        "const text = document.getElementById('device-notices').textContent; \
         return text.includes('failed the aggregator') ? text : null",
        Duration::from_secs(30),
    )?;
    let notices = notices.as_str().unwrap_or_default().to_owned();
    ensure!(notices.contains("CPU fallback"), "{notices}");
    browser.wait_for(
        "the devices table to show the tab checked on the CPU",
        "return document.getElementById('clients').textContent.includes('flex · checked') || null",
        Duration::from_secs(30),
    )?;
    let shot = folio_e2e::artifact("device-check.png")?;
    std::fs::write(&shot, browser.screenshot()?)?;
    eprintln!(
        "screenshot: {}; the page's notices: {notices}",
        shot.display()
    );
    Ok(())
}
