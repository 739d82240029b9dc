//! A tab whose WebGPU computes wrong gradients (a page built with the
//! `faulty-webgpu` feature: its gradients come out zero) answers the aggregator's
//! device check wrong: it is told why and never selected; the page says so and
//! starts the device again on its CPU fallback, whose answer checks out, and the
//! tab trains. Needs the faulty page (`scripts/test.sh` builds it and names it in
//! FOLIO_FAULTY_PAGE) and the real one (for the CPU build in pkg/threads/).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, ensure};
use folio_e2e::LocalServer;
use folio_e2e::webdriver::Driver;
use folio_server::RoundConfig;

/// A web root with the page's files, the faulty build as its main wasm and the
/// real threaded CPU build (copies: the server serves nothing from outside its root).
fn faulty_web_root() -> anyhow::Result<tempfile::TempDir> {
    let faulty = PathBuf::from(std::env::var_os("FOLIO_FAULTY_PAGE").context(
        "FOLIO_FAULTY_PAGE is unset: scripts/test.sh builds the faulty page and sets it",
    )?);
    ensure!(
        faulty.join("folio_web_bg.wasm").is_file(),
        "{} holds no page build: run scripts/test.sh",
        faulty.display()
    );
    folio_e2e::check_page_built()?;
    let repo = folio_e2e::repo_root();
    let root = tempfile::tempdir()?;
    for name in ["index.html", "web", "models"] {
        copy(&repo.join(name), &root.path().join(name))?;
    }
    copy(&faulty, &root.path().join("pkg"))?;
    copy(&repo.join("pkg/threads"), &root.path().join("pkg/threads"))?;
    Ok(root)
}

fn copy(from: &Path, to: &Path) -> anyhow::Result<()> {
    if from.is_dir() {
        std::fs::create_dir_all(to)?;
        for entry in std::fs::read_dir(from)? {
            let entry = entry?;
            copy(&entry.path(), &to.join(entry.file_name()))?;
        }
    } else {
        std::fs::copy(from, to).with_context(|| format!("copying {}", from.display()))?;
    }
    Ok(())
}

#[test]
#[ignore = "needs the built pages; scripts/test.sh runs these with --ignored"]
fn a_tab_whose_webgpu_is_wrong_is_not_selected_and_trains_on_its_cpu_fallback() -> anyhow::Result<()>
{
    let root = faulty_web_root()?;
    let rounds = RoundConfig {
        max_batches: Some(1),
        eval_clients: 1,
        eval_batches: 1,
        strategy: folio_fed::StrategyConfig::fedavg(1),
        ..RoundConfig::tutorial()
    };
    let server = LocalServer::start_serving(rounds, 2, root.path().to_owned())?;
    let driver = Driver::chromium()?;
    let browser = driver.session(1280, 1400)?;
    browser.navigate(&server.url())?;

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
