//! Devices that keep their own text: two headless Chromium tabs (text typed into
//! the page) and a native client (text of its own) train, and are asked to
//! measure the model, on text holding a canary string that exists only on that
//! device. Everything the aggregator received (each WebSocket message, unmasked,
//! and each HTTP request, through a tap in front of it), everything it answered,
//! its logs, its state directory and every HTTP endpoint are searched for each
//! canary: it is nowhere, and the model still learnt the text (its loss on the
//! canary texts fell). Needs the built page (ignored by a plain `cargo test`;
//! `scripts/test.sh` runs it).

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, ensure};
use burn::prelude::Device;
use folio_e2e::LocalServer;
use folio_e2e::tap::{Tap, contains};
use folio_e2e::webdriver::Driver;
use folio_fed::{Clipping, StrategyConfig};
use folio_proto::ClientMessage;
use folio_server::{FederatedEval, RoundConfig};

/// Everything the aggregator logs, at debug level and above.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A device's text: one sentence holding its canary, many times over.
fn text_with(canary: &str) -> String {
    format!("Marigold said {canary} and kept the folio at home.\n").repeat(60)
}

/// Every file under `dir`, read whole.
fn files_under(dir: &Path) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            files.extend(files_under(&path)?);
        } else {
            files.push((path.display().to_string(), std::fs::read(&path)?));
        }
    }
    Ok(files)
}

/// The loss of `weights` (small preset) on `texts`.
fn loss_on(weights: &[f32], texts: &[String]) -> anyhow::Result<f64> {
    let config = folio_model::Preset::Small.config();
    let model = folio_model::CharRnn::from_flat(config, weights, &Device::flex())?;
    let ids: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| folio_data::vocab::encode(t).0)
        .collect();
    let metrics = pollster::block_on(folio_model::eval::evaluate_population(
        &model,
        &ids,
        32,
        usize::MAX,
        |_, _| {},
    ))?;
    Ok(metrics.loss)
}

#[test]
#[ignore = "needs the built page; scripts/test.sh runs these with --ignored"]
fn text_kept_on_devices_never_reaches_the_aggregator_and_still_trains_the_model()
-> anyhow::Result<()> {
    let logs = Logs::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_env_filter("debug")
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();
    let rounds = RoundConfig {
        strategy: StrategyConfig {
            clipping: Clipping::Off,
            ..StrategyConfig::fedavg(3)
        },
        client_lr: 0.5,
        deadline: Duration::from_secs(120),
        federated_eval: Some(FederatedEval {
            devices: 3,
            ..FederatedEval::every(1)
        }),
        ..RoundConfig::tutorial()
    };
    let server = LocalServer::start_device_data(rounds, 2)?;
    let initial = server.server.weights();
    let tap = Tap::start(server.server.addr)?;
    let page = format!("http://{}/?backend=cpu", tap.addr);
    let socket = format!("ws://{}/ws", tap.addr);
    let run = std::process::id();
    let canaries: Vec<String> = ["tab-one", "tab-two", "native"]
        .iter()
        .map(|device| format!("canary-{run:x}-{device}"))
        .collect();
    let texts: Vec<String> = canaries.iter().map(|c| text_with(c)).collect();

    // The control: a string the aggregator does receive (a join's backend
    // name) is found where the canaries are searched for.
    let control = format!("control-{run:x}");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut transport = folio_client::native::WsTransport::connect(&socket).await?;
        let mut join = folio_client::ClientOptions::native().join;
        join.backend = control.clone();
        use folio_client::Transport;
        transport
            .send(folio_proto::encode(&ClientMessage::Join(join)))
            .await?;
        transport.recv().await?;
        anyhow::Ok(())
    })?;

    // A browser's storage is one device's: each tab here is a browser of its own.
    let driver = Driver::chromium()?;
    let mut browsers = Vec::new();
    for text in &texts[..2] {
        let browser = driver.session(1280, 1600)?;
        browser.navigate(&page)?;
        browser.wait_for(
            "the page to offer its text form",
            "return !document.getElementById('text-form').hidden",
            Duration::from_secs(60),
        )?;
        browser.execute(
            "document.getElementById('own-text').value = arguments[0]; \
             document.getElementById('text-form').requestSubmit();",
            serde_json::json!([text]),
        )?;
        browsers.push(browser);
    }
    let native_text = texts[2].clone();
    let native_socket = socket.clone();
    let native = std::thread::spawn(move || {
        let options = folio_client::ClientOptions {
            text: Some(native_text),
            max_rounds: Some(2),
            ..folio_client::ClientOptions::native()
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(folio_client::native::run_reconnecting(
            &[native_socket],
            &Device::flex(),
            &options,
            |_| {},
            |_, _| {},
        ))?;
        anyhow::Ok(())
    });

    let pages = || {
        browsers
            .iter()
            .map(|b| {
                b.execute(
                    "return document.getElementById('device-status').textContent + ' | ' + \
                     document.getElementById('device-notices').textContent + ' | ' + \
                     document.getElementById('text-note').textContent",
                    serde_json::json!([]),
                )
                .map_or_else(|e| e.to_string(), |v| v.to_string())
            })
            .collect::<Vec<_>>()
    };
    server
        .wait_for_rounds(2, Duration::from_secs(180), "two rounds did not complete")
        .with_context(|| format!("the tabs: {:?}", pages()))?;
    native.join().expect("the native client ran")?;
    let status = server.server.status();
    ensure!(status["latest"]["clients"] == 3, "{status}");
    let history = server.server.history_from(0);
    for record in &history[1..] {
        let federated = record
            .federated
            .with_context(|| format!("round {} has no federated evaluation", record.round))?;
        ensure!(federated.devices == 3 && federated.chars > 0, "{record:?}");
        ensure!(
            record.eval_loss.is_nan(),
            "the server has no text to evaluate on: {record:?}"
        );
    }

    // The tap read the protocol: joins, updates, evaluations.
    let messages = tap.messages();
    let decoded: Vec<ClientMessage> = messages
        .iter()
        .filter_map(|m| folio_proto::decode_client(m).ok())
        .collect();
    let count = |kind: fn(&ClientMessage) -> bool| decoded.iter().filter(|m| kind(m)).count();
    let (updates, evaluations) = (
        count(|m| matches!(m, ClientMessage::Update(_))),
        count(|m| matches!(m, ClientMessage::Evaluation(_))),
    );
    ensure!(
        updates >= 6 && evaluations >= 6,
        "{updates} updates, {evaluations} evaluations"
    );
    ensure!(
        tap.find(control.as_bytes())?
            .contains(&"a WebSocket message"),
        "the control string was not found where the canaries are searched for"
    );

    // Every HTTP endpoint a visitor can read, asked directly.
    let base = server.url();
    let mut answers = Vec::new();
    for path in [
        "",
        "api/status",
        "api/history",
        "api/characters",
        "api/model",
        "api/model/start",
    ] {
        let mut response = ureq::get(&format!("{base}{path}")).call()?;
        answers.push((path, response.body_mut().read_to_vec()?));
    }
    let state = files_under(server.state_dir())?;
    ensure!(!state.is_empty(), "the state directory holds the run");
    let logs = logs.0.lock().unwrap().clone();
    ensure!(
        contains(&logs, b"round committed"),
        "the logs were captured"
    );
    for canary in &canaries {
        let needle = canary.as_bytes();
        let found = tap.find(needle)?;
        ensure!(
            found.is_empty(),
            "{canary} reached the aggregator: in {found:?}"
        );
        ensure!(
            !contains(&logs, needle),
            "{canary} is in the aggregator's logs"
        );
        for (file, bytes) in &state {
            ensure!(!contains(bytes, needle), "{canary} is in {file}");
        }
        for (path, body) in &answers {
            ensure!(!contains(body, needle), "{canary} is in GET /{path}");
        }
    }

    // The model learnt the text it never saw.
    let (before, after) = (
        loss_on(&initial, &texts)?,
        loss_on(&server.server.weights(), &texts)?,
    );
    ensure!(
        after < before - 0.5,
        "loss on the devices' texts: {before:.3} -> {after:.3}"
    );

    // The page: what it says leaves the device, a screenshot, the text kept
    // across a reload, and deleted for good.
    let browser = &browsers[0];
    let said = browser.execute(
        "const p = document.getElementById('data-mode'); p.scrollIntoView(); return p.textContent",
        serde_json::json!([]),
    )?;
    ensure!(
        said.as_str().is_some_and(|s| s.contains("never sees")),
        "{said}"
    );
    let shot = folio_e2e::artifact("own-text.png")?;
    std::fs::write(&shot, browser.screenshot()?)?;

    // Personalization: the global model fine-tuned on the tab's text, kept in
    // the browser, generating in the page; its loss on the held-out text fell.
    browser.execute(
        "document.getElementById('text-personalize').click()",
        serde_json::json!([]),
    )?;
    let tuned = browser.wait_for(
        "the tab to fine-tune its model",
        "return document.body.dataset.personalized === 'yes' \
         && document.body.dataset.personalizedLoss",
        Duration::from_secs(120),
    )?;
    let losses: Vec<f64> = tuned
        .as_str()
        .unwrap_or_default()
        .split(' ')
        .filter_map(|word| word.parse().ok())
        .collect();
    ensure!(
        matches!(losses.as_slice(), [before, after] if after < before),
        "fine-tuning did not lower the loss on the held-out text: {tuned}"
    );
    browser.execute(
        "document.getElementById('gen-model').value = 'mine'; \
         document.getElementById('gen-length').value = 40; \
         document.getElementById('gen-form').requestSubmit();",
        serde_json::json!([]),
    )?;
    let source = browser.wait_for(
        "the generator to run on the tab's own model",
        "return document.body.dataset.generated === 'yes' \
         && document.getElementById('gen-source').textContent",
        Duration::from_secs(120),
    )?;
    ensure!(
        source.as_str().is_some_and(|s| s.contains("my model")),
        "{source}"
    );
    browser.navigate(&page)?;
    let kept = browser.wait_for(
        "the reloaded tab to show its kept text",
        "return document.getElementById('own-text').value",
        Duration::from_secs(60),
    )?;
    ensure!(
        kept == serde_json::json!(texts[0]),
        "the text was not kept across a reload"
    );
    browser.execute(
        "document.getElementById('text-delete').click()",
        serde_json::json!([]),
    )?;
    let stopped = browser.wait_for(
        "the tab to stop once its text is deleted",
        "return document.body.dataset.deviceState === 'stopped: no text to train on' \
         && document.getElementById('own-text').value === ''",
        Duration::from_secs(30),
    )?;
    ensure!(stopped == serde_json::json!(true));
    let left = browser.execute_async(
        "const done = arguments[arguments.length - 1]; \
         import('./web/store.js').then(async (s) => \
           [await s.ownText(), (await s.store('models', 'readonly', (m) => m.get('mine'))) ?? null]) \
         .then(done, (e) => done(String(e)));",
        serde_json::json!([]),
    )?;
    ensure!(
        left == serde_json::json!(["", null]),
        "text or a model fine-tuned on it left in the browser's storage: {left}"
    );
    eprintln!(
        "searched {} messages, {} bytes of answers, {} state files, {} bytes of logs and {} endpoints: no canary; loss on the devices' texts {before:.3} -> {after:.3}; screenshot {}",
        messages.len(),
        answers.iter().map(|(_, b)| b.len()).sum::<usize>(),
        state.len(),
        logs.len(),
        answers.len(),
        shot.display()
    );
    Ok(())
}
