//! The real page in headless Chromium against the real aggregator on loopback:
//! browser tabs train as federated devices. They need the page built into pkg/, so
//! they are ignored by a plain `cargo test`: `scripts/test.sh` builds the page, then
//! runs them with `cargo test --workspace --exclude folio-web --release --test tabs --
//! --ignored` (the native tests' package selection, so no second build).

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use folio_e2e::LocalServer;
use folio_e2e::webdriver::{Driver, Session};
use folio_server::RoundConfig;
use serde_json::{Value, json};

/// Rounds on SwiftShader take minutes on two busy cores.
const ROUND_TIMEOUT: Duration = Duration::from_secs(900);

fn rounds(clients: usize, quorum: usize, max_batches: u32) -> RoundConfig {
    RoundConfig {
        strategy: folio_fed::StrategyConfig {
            quorum,
            ..folio_fed::StrategyConfig::fedavg(clients)
        },
        max_batches: Some(max_batches),
        client_lr: 0.1,
        eval_clients: 2,
        eval_batches: 1,
        ..RoundConfig::tutorial()
    }
}

/// Polls the status API until `done` holds, printing progress.
fn wait_until(
    server: &LocalServer,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let started = Instant::now();
    let mut last_print = Instant::now();
    loop {
        let status = server.server.status();
        if done(&status) {
            eprintln!("[{:>4.0} s] {what}", started.elapsed().as_secs_f64());
            return Ok(status);
        }
        ensure!(
            started.elapsed() < ROUND_TIMEOUT,
            "gave up waiting for {what}; status: {status:#}"
        );
        if last_print.elapsed() > Duration::from_secs(30) {
            eprintln!(
                "[{:>4.0} s] waiting for {what}: completed rounds {}, open round {}, connected {}",
                started.elapsed().as_secs_f64(),
                status["completed_rounds"],
                status["open_round"],
                status["connected"]
            );
            last_print = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn completed(status: &Value) -> u64 {
    status["completed_rounds"].as_u64().unwrap_or(0)
}

/// Sessions that reported in `round`, as (kind, backend).
fn reporters(status: &Value, round: u64) -> Vec<(String, String)> {
    status["clients"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| {
            c["reported_rounds"]
                .as_array()
                .is_some_and(|r| r.contains(&json!(round)))
        })
        .map(|c| {
            (
                c["kind"].as_str().unwrap_or("").to_owned(),
                c["backend"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

/// A browser with three tabs on the page; the first is current. Returns it and
/// the tabs' handles.
fn open_three_tabs(
    driver: &Driver,
    server: &LocalServer,
) -> anyhow::Result<(Session, [String; 3])> {
    open_three_tabs_at(driver, &server.url())
}

/// Three tabs of the page at `url`, the first one in front.
fn open_three_tabs_at(driver: &Driver, url: &str) -> anyhow::Result<(Session, [String; 3])> {
    let browser = driver.session(1200, 1600)?;
    browser.navigate(url)?;
    let first = browser.tab()?;
    let second = browser.open_tab(url)?;
    let third = browser.open_tab(url)?;
    browser.switch_to(&first)?;
    Ok((browser, [first, second, third]))
}

/// That `count` browser tabs on `backend` reported in `round`.
fn ensure_tabs_reported(
    status: &Value,
    round: u64,
    count: usize,
    backend: &str,
) -> anyhow::Result<()> {
    let seen = reporters(status, round);
    ensure!(
        seen.len() == count && seen.iter().all(|(k, b)| k == "browser" && b == backend),
        "round {round}: expected {count} browser tabs on {backend}, got {seen:?}"
    );
    Ok(())
}

fn page_text(tab: &Session, id: &str) -> anyhow::Result<String> {
    let value = tab.execute(
        "return document.getElementById(arguments[0]).textContent",
        json!([id]),
    )?;
    Ok(value.as_str().unwrap_or_default().to_owned())
}

/// One pane of the page's generator: the chars after the prompt and where its
/// model came from.
struct Generated {
    text: String,
    source: String,
}

/// Clicks the page's Generate for `length` chars, waits for both panes (the
/// starting model, then the federated one), and returns them in that order.
fn generate_on_page(tab: &Session, length: usize) -> anyhow::Result<[Generated; 2]> {
    // The button is enabled once the page has found its device code.
    tab.wait_for(
        "the generator's button",
        "return !document.getElementById('gen-button').disabled",
        ROUND_TIMEOUT,
    )?;
    tab.execute(
        "document.getElementById('gen-length').value = arguments[0];
         document.getElementById('gen-button').click();",
        json!([length]),
    )?;
    tab.wait_for(
        "the page's generator",
        "return document.body.dataset.generated === 'yes'",
        ROUND_TIMEOUT,
    )?;
    let prompt = tab.execute(
        "return document.getElementById('gen-prompt').value",
        json!([]),
    )?;
    let pane = |output: &str, source: &str| -> anyhow::Result<Generated> {
        let shown = page_text(tab, output)?;
        let source = page_text(tab, source)?;
        eprintln!("generated {source}: {shown:?}");
        let text = shown
            .strip_prefix(prompt.as_str().unwrap_or_default())
            .context("the prompt starts the text")?;
        ensure!(
            text.chars().count() == length,
            "the generator should stream {length} chars after the prompt, shown: {shown:?}"
        );
        Ok(Generated {
            text: text.to_owned(),
            source,
        })
    };
    Ok([
        pane("gen-start-output", "gen-start-source")?,
        pane("gen-output", "gen-source")?,
    ])
}

#[test]
#[ignore = "needs the built page; scripts/test.sh runs these with --ignored"]
fn three_tabs_train_on_webgpu_generate_text_and_survive_a_closed_tab() -> anyhow::Result<()> {
    // Quorum 2 of 3: a round still closes when one tab goes away. Rounds enough
    // that one is still to come after the generator's (a round takes seconds).
    let server = LocalServer::start(rounds(3, 2, 1), 8)?;
    let initial = server.server.weights();
    let driver = Driver::chromium()?;
    let (browser, [_, _, third]) = open_three_tabs(&driver, &server)?;
    let status = wait_until(&server, "round 1", |s| completed(s) >= 1)?;
    ensure_tabs_reported(&status, 1, 3, "webgpu")?;
    let changed = server
        .server
        .weights()
        .iter()
        .zip(&initial)
        .filter(|(a, b)| a != b)
        .count();
    ensure!(
        changed > initial.len() / 2,
        "only {changed} of {} weights changed",
        initial.len()
    );
    // The generator runs the current global model in the tab, beside its training.
    let [start, now] = generate_on_page(&browser, 24)?;
    ensure!(
        start.source == "(from the federation's starting model)"
            && now.source == "(from the current global model)",
        "{} / {}",
        start.source,
        now.source
    );

    // A screenshot during a round, with the generator's text on the page.
    wait_until(&server, "an open round", |s| !s["open_round"].is_null())?;
    let shot = folio_e2e::artifact("three-tabs-during-a-round.png")?;
    std::fs::write(&shot, browser.screenshot()?)?;
    eprintln!("screenshot: {}", shot.display());

    // Close a tab while it trains (whichever round is open by then): the other
    // two close that round.
    browser.switch_to(&third)?;
    browser.wait_for(
        "the third tab to train",
        "return (document.body.dataset.deviceState || '').startsWith('training')",
        ROUND_TIMEOUT,
    )?;
    let round = server.server.status()["open_round"]["round"]
        .as_u64()
        .context("no open round while a tab trains")?;
    browser.close_tab()?;
    let status = wait_until(&server, "the round without the closed tab", |s| {
        completed(s) >= round
    })?;
    let record = server.server.history()[round as usize].clone();
    ensure!(
        record.round == round && record.clients == 2,
        "round {round} should close with 2 updates: {record:?}"
    );
    ensure_tabs_reported(&status, round, 2, "webgpu")?;
    let connected = status["connected"].as_u64().unwrap_or(0);
    ensure!(
        connected == 2,
        "{connected} tabs still connected, expected 2"
    );
    Ok(())
}

#[test]
#[ignore = "needs the built page; scripts/test.sh runs these with --ignored"]
fn three_tabs_in_firefox_train_on_the_cpu_fallback_and_generate_text() -> anyhow::Result<()> {
    let server = LocalServer::start(rounds(3, 3, 1), 2)?;
    let initial = server.server.weights();
    let driver = Driver::firefox()?;
    // The single-threaded CPU build: in headless Firefox the threaded one now and
    // then never comes up in a tab (about one load in seven here; the Chromium
    // tests cover the threaded build).
    let (browser, _) = open_three_tabs_at(&driver, &format!("{}?threads=off", server.url()))?;
    let status = wait_until(&server, "round 1 in Firefox", |s| completed(s) >= 1)?;
    // Headless Firefox here has no WebGPU adapter: every tab takes the CPU fallback.
    ensure_tabs_reported(&status, 1, 3, "flex")?;
    ensure!(
        server.server.weights() != initial,
        "the global model did not change"
    );
    let [start, now] = generate_on_page(&browser, 24)?;
    ensure!(
        start.source == "(from the federation's starting model)"
            && now.source == "(from the current global model)",
        "{} / {}",
        start.source,
        now.source
    );
    Ok(())
}

/// One round of 4 epochs over Lear's lines, and a tab opened to train it as Lear
/// on the CPU fallback: seconds of training. (The tab first, so that it closes
/// before its browser.)
fn lear_trains_on_the_cpu_fallback() -> anyhow::Result<(Session, Driver, LocalServer)> {
    let long_round = RoundConfig {
        local_epochs: 4,
        max_batches: None,
        ..rounds(1, 1, 1)
    };
    let server = LocalServer::start(long_round, 1)?;
    let driver = Driver::chromium()?;
    let browser = driver.session(1200, 900)?;
    browser.navigate(&format!(
        "{}?backend=cpu&client=THE_TRAGEDY_OF_KING_LEAR_LEAR",
        server.url()
    ))?;
    Ok((browser, driver, server))
}

#[test]
#[ignore = "needs the built page; scripts/test.sh runs these with --ignored"]
fn a_tab_on_the_cpu_fallback_trains_on_every_core_and_its_page_stays_responsive()
-> anyhow::Result<()> {
    // Seconds of training, which on the page's main thread would hold the page the
    // whole time (the CPU backend never yields).
    let (browser, _driver, server) = lear_trains_on_the_cpu_fallback()?;
    let status = wait_until(&server, "a round on the CPU fallback", |s| {
        completed(s) >= 1
    })?;
    let seen = reporters(&status, 1);
    ensure!(
        seen == [("browser".to_owned(), "flex".to_owned())],
        "{seen:?}"
    );
    // The page is cross-origin isolated, so the tab took the threaded build: a
    // rayon pool of one Web Worker per core.
    let cores = std::thread::available_parallelism()?.get();
    let pool = &status["clients"][0]["adapter"];
    ensure!(
        pool.as_str() == Some(format!("{cores} threads").as_str()),
        "the tab trained on {pool} instead of a pool of {cores} threads"
    );
    let last = &status["clients"][0]["last"];
    let seconds = last["train_seconds"].as_f64().context("no training time")?;
    let examples = &last["examples"];
    let stall = browser.execute(
        "return Number(document.body.dataset.longestStallMs)",
        json!([]),
    )?;
    eprintln!(
        "trained {examples} sequences in {seconds:.1} s; the page's longest stall: {stall} ms"
    );
    ensure!(
        seconds > 1.0,
        "training took only {seconds:.1} s: too short to tell"
    );
    ensure!(
        stall.as_f64().is_some_and(|ms| ms < 500.0),
        "the page stalled {stall} ms while training took {seconds:.1} s"
    );
    Ok(())
}

/// The one session's bytes sent down so far.
fn bytes_down(status: &Value) -> anyhow::Result<u64> {
    let clients = status["clients"].as_array().context("no clients")?;
    ensure!(clients.len() == 1, "one session expected: {clients:#?}");
    clients[0]["bytes_down"].as_u64().context("no bytes down")
}

#[test]
#[ignore = "needs the built page; scripts/test.sh runs these with --ignored"]
fn a_tab_reloaded_mid_round_resumes_without_downloading_the_model_again() -> anyhow::Result<()> {
    // Seconds of training to reload in.
    let (browser, _driver, server) = lear_trains_on_the_cpu_fallback()?;
    browser.wait_for(
        "the tab to train",
        "return (document.body.dataset.deviceState || '').startsWith('training')",
        ROUND_TIMEOUT,
    )?;
    let status = server.server.status();
    let model_bytes = 4 * status["parameters"].as_u64().context("no parameters")?;
    let before = bytes_down(&status)?;
    ensure!(
        before > model_bytes,
        "{before} bytes down before the reload: the model ({model_bytes} bytes) should be among them"
    );
    browser.execute("location.reload()", json!([]))?;
    let status = wait_until(&server, "round 1 after the reload", |s| completed(s) >= 1)?;
    ensure!(
        reporters(&status, 1) == [("browser".to_owned(), "flex".to_owned())],
        "{:?}",
        reporters(&status, 1)
    );
    // The welcome again (with Lear's lines) and the round without its model.
    let after = bytes_down(&status)? - before;
    let notices = page_text(&browser, "device-notices")?;
    eprintln!("bytes down: {before} before the reload (model {model_bytes}), {after} after it");
    ensure!(
        after < model_bytes / 4,
        "{after} bytes down after the reload: the model ({model_bytes} bytes) was sent again; the page: {notices:?}"
    );
    ensure!(
        notices.contains("Kept from before: round 1's global model"),
        "the page does not say it kept the model: {notices:?}"
    );
    Ok(())
}

#[test]
#[ignore = "needs the built page; scripts/test.sh runs these with --ignored"]
fn tabs_reconnect_to_a_restarted_aggregator_and_the_next_round_completes() -> anyhow::Result<()> {
    // The first aggregator stops after round 1, so round 2 can only run on the
    // restarted one: a round takes less than a status poll here.
    let mut server = LocalServer::start(rounds(2, 2, 1), 1)?;
    let driver = Driver::chromium()?;
    let browser = driver.session(1200, 900)?;
    // On one thread: the main build's CPU fallback, as where the page is not
    // cross-origin isolated.
    let url = format!("{}?backend=cpu&threads=off", server.url());
    browser.navigate(&url)?;
    browser.open_tab(&url)?;
    wait_until(&server, "round 1", |s| completed(s) >= 1)?;
    server.restart(2)?;
    let status = wait_until(&server, "round 2 on the restarted aggregator", |s| {
        completed(s) >= 2
    })?;
    ensure_tabs_reported(&status, 2, 2, "flex")?;
    let pools: Vec<_> = status["clients"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| &c["adapter"])
        .collect();
    ensure!(
        pools.iter().all(|p| p.is_null()),
        "asked for one thread, the tabs had {pools:?}"
    );
    // Once back, the page says so, and no longer that it lost the aggregator.
    let notices = page_text(&browser, "device-notices")?;
    ensure!(
        notices.contains("Back with the aggregator") && !notices.contains("Lost the aggregator"),
        "the page's notices after the reconnection: {notices:?}"
    );

    // The page as a person sees it, wide and narrow, with the shipped models'
    // text in the generator.
    browser.execute(
        "document.getElementById('gen-start-model').value = 'dickens';
         document.getElementById('gen-model').value = 'federated';",
        json!([]),
    )?;
    let [dickens, federated] = generate_on_page(&browser, 160)?;
    ensure!(
        dickens.source == "(from the shipped Dickens model)"
            && federated.source == "(from the shipped federated model)",
        "{} / {}",
        dickens.source,
        federated.source
    );
    for (width, height) in [(1280, 2300), (400, 4200)] {
        browser.resize(width, height)?;
        // Two status polls: the layout and the plot follow the new size.
        std::thread::sleep(Duration::from_millis(2500));
        let rows = browser.execute(
            "return [document.querySelectorAll('#clients tbody tr').length,
                     document.querySelectorAll('#device-rounds tbody tr').length]",
            json!([]),
        )?;
        ensure!(
            rows == json!([2, 3]) || rows == json!([2, 2]),
            "the tables show {rows} rows (devices, this tab's rounds); the page says {:?}",
            page_text(&browser, "summary")?
        );
        // Nothing wider than the window, no table to scroll sideways.
        let overflow = browser.execute(
            "return Math.max(...[document.documentElement, ...document.querySelectorAll('.table-scroll')]
                .map((e) => e.scrollWidth - e.clientWidth))",
            json!([]),
        )?;
        ensure!(
            overflow.as_i64() == Some(0),
            "the page or a table is {overflow} px wider than a {width} px window"
        );
        let shot = folio_e2e::artifact(&format!("page-{width}px.png"))?;
        std::fs::write(&shot, browser.screenshot()?)?;
        eprintln!("screenshot: {}", shot.display());
    }
    Ok(())
}

#[test]
#[ignore = "needs the built page; scripts/test.sh runs these with --ignored"]
fn a_tab_opened_while_the_page_builds_shows_the_build_and_joins_when_it_is_ready()
-> anyhow::Result<()> {
    folio_e2e::check_page_built()?;
    let repo = folio_e2e::repo_root();
    // A web root whose pkg/ holds only the build's progress, as scripts/run.sh
    // leaves it while the wasm compiles behind the server.
    let root = tempfile::tempdir()?;
    for shared in ["index.html", "web", "models"] {
        std::os::unix::fs::symlink(repo.join(shared), root.path().join(shared))?;
    }
    let pkg = root.path().join("pkg");
    std::fs::create_dir(&pkg)?;
    std::fs::write(
        pkg.join("build.json"),
        r#"{"state":"building","step":"page","done":123,"total":456,"crates":"wgpu-core","seconds":300}"#,
    )?;
    let server = LocalServer::start_serving(rounds(1, 1, 1), 1, root.path().to_owned())?;
    let driver = Driver::chromium()?;
    let browser = driver.session(1200, 900)?;
    browser.navigate(&format!("{}?backend=cpu", server.url()))?;
    browser.wait_for(
        "the tab to show the build",
        "return document.body.dataset.deviceState === 'waiting for the device code'
            && document.getElementById('build-status').textContent.includes('123 of 456 crates')
            && document.getElementById('build-progress').value === 123",
        Duration::from_secs(60),
    )?;
    ensure!(
        server.server.status()["connected"] == json!(0),
        "the tab joined before its device code existed"
    );
    // The same document must join: no reload.
    browser.execute("window.beforeTheBuild = true", json!([]))?;

    // The build finishes as build_page installs it: the wasm first, the module last.
    for file in ["folio_web_bg.wasm", "folio_web_bg.wasm.gz", "folio_web.js"] {
        std::fs::copy(repo.join("pkg").join(file), pkg.join(file))?;
    }
    std::fs::write(pkg.join("build.json"), r#"{"state":"ready","seconds":700}"#)?;
    wait_until(&server, "the waiting tab to join", |s| {
        s["connected"] == json!(1)
    })?;
    let same_document = browser.execute("return window.beforeTheBuild === true", json!([]))?;
    ensure!(same_document == json!(true), "the tab reloaded to join");
    browser.wait_for(
        "the build's progress to go away",
        "return document.getElementById('build').hidden",
        Duration::from_secs(10),
    )?;
    Ok(())
}

#[test]
#[ignore = "needs the built page; scripts/test.sh runs these with --ignored"]
fn the_page_wasm_goes_out_compressed_and_is_not_sent_again_while_unchanged() -> anyhow::Result<()> {
    let server = LocalServer::start(rounds(1, 1, 1), 1)?;
    let wasm = format!("{}pkg/folio_web_bg.wasm", server.url());
    let fetch = |accept: &str| {
        folio_e2e::get_encoded(&wasm, accept).map(|sent| (sent.encoding, sent.body, sent.headers))
    };
    let (plain_as, plain, headers) = fetch("identity")?;
    ensure!(
        plain_as == "identity" && plain.starts_with(b"\0asm"),
        "not a wasm module"
    );
    let (gzip_as, gzipped, _) = fetch("gzip")?;
    let (br_as, brotli, br_headers) = fetch("gzip, deflate, br")?;
    eprintln!(
        "the page's wasm: {} bytes, {} gzipped, {} as brotli",
        plain.len(),
        gzipped.len(),
        brotli.len()
    );
    ensure!((gzip_as.as_str(), br_as.as_str()) == ("gzip", "br"));
    ensure!(gzipped.len() * 3 < plain.len() && brotli.len() < gzipped.len());
    // Every asset is revalidated, and an unchanged one is not sent again.
    ensure!(
        headers
            .get("cache-control")
            .is_some_and(|c| c == "no-cache"),
        "{headers:?}"
    );
    let modified = br_headers
        .get("last-modified")
        .context("no Last-Modified")?
        .to_str()?
        .to_owned();
    let again = ureq::get(&wasm)
        .header("Accept-Encoding", "gzip, deflate, br")
        .header("If-Modified-Since", &modified)
        .config()
        .http_status_as_error(false)
        .build()
        .call()?;
    ensure!(again.status() == 304, "revalidated: {}", again.status());
    Ok(())
}

#[test]
#[ignore = "needs the built page; scripts/test.sh runs these with --ignored"]
fn the_generator_falls_back_to_the_shipped_models_without_an_aggregator() -> anyhow::Result<()> {
    folio_e2e::check_page_built()?;
    // A plain static server of the repository: no aggregator, no /api/model.
    let runtime = tokio::runtime::Runtime::new()?;
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let url = format!(
        "http://{}/index.html?device=off&backend=cpu",
        listener.local_addr()?
    );
    let files = axum::Router::new()
        .fallback_service(tower_http::services::ServeDir::new(folio_e2e::repo_root()));
    runtime.spawn(async move { axum::serve(listener, files).await });

    let driver = Driver::chromium()?;
    let browser = driver.session(1200, 900)?;
    browser.navigate(&url)?;
    let [start, federated] = generate_on_page(&browser, 60)?;
    ensure!(
        start.source == "(from the shipped Dickens model)"
            && federated.source == "(from the shipped federated model)",
        "{} / {}",
        start.source,
        federated.source
    );
    // Both trained: mostly letters and spaces (uniform sampling: 62%); the same
    // draws through different models give different text.
    for Generated { text, source } in [&start, &federated] {
        let wordy = text
            .chars()
            .filter(|c| c.is_ascii_alphabetic() || *c == ' ')
            .count();
        ensure!(
            wordy >= 42,
            "{source}: {wordy} of 60 letters or spaces: {text:?}"
        );
    }
    ensure!(start.text != federated.text, "{:?}", start.text);
    Ok(())
}
