//! The page of a differentially private federation: a headless Chromium tab
//! trains DP-FedAvg rounds until the ε budget stops them, and the page shows ε,
//! δ, the noise, and why training stopped. Needs the built page (ignored by a
//! plain `cargo test`; `scripts/test.sh` runs it).

use std::time::{Duration, Instant};

use anyhow::ensure;
use folio_e2e::LocalServer;
use folio_e2e::webdriver::Driver;
use folio_fed::{Clipping, DpConfig, StrategyConfig, StrategyKind};
use folio_server::RoundConfig;

#[test]
#[ignore = "needs the built page; scripts/test.sh runs these with --ignored"]
fn the_page_shows_epsilon_and_why_the_budget_stopped_training() -> anyhow::Result<()> {
    // Every client sampled every round (clients per round = the population, so
    // q = 1): each connected tab trains each round. z = 2 spends ε = 1.67, 2.50,
    // 3.18 after rounds 1–3 at δ = 1/1103^1.1: a budget of 3 allows two.
    let rounds = RoundConfig {
        strategy: StrategyConfig {
            kind: StrategyKind::DpFedAvg,
            min_clients: 1,
            quorum: 1,
            clipping: Clipping::Fixed { bound: 0.5 },
            dp: DpConfig {
                noise_multiplier: 2.0,
                delta: None,
                epsilon_budget: Some(3.0),
                adaptive: None,
                distributed: None,
            },
            ..StrategyConfig::fedavg(1103)
        },
        max_batches: Some(1),
        eval_clients: 1,
        eval_batches: 1,
        deadline: Duration::from_secs(60),
        ..RoundConfig::tutorial()
    };
    let server = LocalServer::start(rounds, 100)?;
    let driver = Driver::chromium()?;
    let tab = driver.session(1280, 1000)?;
    tab.navigate(&format!("{}?backend=cpu", server.url()))?;

    let page_says = || {
        tab.execute(
            "return document.getElementById('device-status').textContent",
            serde_json::json!([]),
        )
        .unwrap_or_default()
    };
    let started = Instant::now();
    while server.server.status()["stopped"].is_null() {
        ensure!(
            started.elapsed() < Duration::from_secs(90),
            "the budget did not stop training; the tab says {}; the aggregator: {}",
            page_says(),
            server.server.status()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let status = server.server.status();
    let privacy = &status["privacy"];
    assert_eq!(privacy["rounds"], 2, "{status}");
    let epsilon = privacy["epsilon"].as_f64().unwrap();
    assert!((epsilon - 2.500).abs() < 1e-3, "{status}");
    assert!(epsilon <= 3.0);
    assert_eq!(status["completed_rounds"], 2);
    assert_eq!(status["phase"], "finished");

    let shown = tab.wait_for(
        "the page to show the privacy spent and the stop",
        "const p = document.getElementById('privacy'); \
         if (p.hidden || !p.textContent.includes('stopped')) return null; \
         p.scrollIntoView({block: 'center'}); return p.textContent",
        Duration::from_secs(30),
    )?;
    let shown = shown.as_str().unwrap_or_default().to_owned();
    assert!(shown.contains(&format!("ε = {epsilon:.3}")), "{shown}");
    assert!(shown.contains("noise multiplier 2"), "{shown}");
    assert!(shown.contains("over the budget of 3"), "{shown}");
    let cells = tab.execute(
        "const column = [...document.querySelectorAll('#history thead th')].findIndex(h => h.textContent === 'ε'); \
         return [...document.querySelectorAll('#history tbody tr')].map(r => r.children[column].textContent)",
        serde_json::json!([]),
    )?;
    let cells: Vec<f64> = serde_json::from_value::<Vec<String>>(cells)?
        .iter()
        .map(|c| c.parse())
        .collect::<Result<_, _>>()?;
    assert_eq!(cells.len(), 3, "rounds 2, 1, 0: {cells:?}");
    assert!((cells[0] - epsilon).abs() < 1e-3 && (cells[1] - 1.67).abs() < 0.01 && cells[2] == 0.0);
    let shot = folio_e2e::artifact("dp-budget-spent.png")?;
    std::fs::write(&shot, tab.screenshot()?)?;
    eprintln!("screenshot: {}; the page says: {shown}", shot.display());
    Ok(())
}
