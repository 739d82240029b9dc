//! Training chars/s in a headless-Chromium tab, on WebGPU (SwiftShader there) and on
//! the CPU fallback, side by side with native flex on the same machine in one run;
//! and the size of the page's wasm. `cargo run --release -p folio-e2e --bin browser-bench`.

use std::time::Duration;

use anyhow::{Context, bail};
use burn::prelude::Device;
use clap::Parser;
use folio_e2e::LocalServer;
use folio_e2e::webdriver::{ChromeDriver, Session};
use folio_model::Preset;
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// Presets to measure.
    #[arg(long, value_delimiter = ',', default_value = "small,seed")]
    presets: Vec<Preset>,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 100)]
    seq_len: usize,
    /// Timed steps per measurement (after one warm-up step).
    #[arg(long, default_value_t = 2)]
    steps: usize,
}

/// `benchTrain` from the page's wasm, on the tab's main thread. Polled: a seed-size
/// model on SwiftShader takes longer than any one WebDriver script may.
fn in_tab(tab: &Session, preset: Preset, backend: &str, args: &Args) -> anyhow::Result<f64> {
    tab.execute(
        "const [preset, backend, batch, seqLen, steps] = arguments;
         window.benchResult = null;
         import('/pkg/folio_web.js')
           .then(async (m) => { await m.default(); return m.benchTrain(preset, backend, batch, seqLen, steps); })
           .then((rate) => { window.benchResult = { rate }; },
                 (err) => { window.benchResult = { error: String(err) }; });",
        json!([preset.name(), backend, args.batch, args.seq_len, args.steps]),
    )?;
    let answer = tab.wait_for(
        &format!("benchTrain({preset}, {backend})"),
        "return window.benchResult",
        Duration::from_secs(4 * 3600),
    )?;
    if let Some(error) = answer["error"].as_str() {
        bail!("benchTrain({preset}, {backend}) in the tab: {error}");
    }
    answer["rate"]
        .as_f64()
        .context("benchTrain returned no rate")
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let wasm = folio_e2e::repo_root().join("pkg/folio_web_bg.wasm");
    // The page only: `?device=off` keeps the tab from joining as a device.
    let server = LocalServer::start(folio_server::RoundConfig::tutorial(), 1)?;
    let driver = ChromeDriver::start()?;
    let tab = driver.session(1200, 900)?;
    tab.navigate(&format!("{}?device=off", server.url()))?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "training chars/s, B × T = {} × {}, {} timed steps after a warm-up, {cores} cores",
        args.batch, args.seq_len, args.steps
    );
    println!(
        "{:<6}  {:>12}  {:>20}  {:>20}",
        "preset", "native flex", "tab webgpu (ratio)", "tab cpu (ratio)"
    );
    for &preset in &args.presets {
        eprintln!("measuring {preset}: native flex…");
        let native = pollster::block_on(folio_client::bench::train_chars_per_second(
            preset.config(),
            &Device::flex().autodiff(),
            args.batch,
            args.seq_len,
            args.steps,
        ))?;
        eprintln!("{preset}: native flex {native:.0} chars/s; now the tab on WebGPU…");
        let webgpu = in_tab(&tab, preset, "auto", &args)?;
        eprintln!("measuring {preset}: the tab on its CPU fallback…");
        let cpu = in_tab(&tab, preset, "cpu", &args)?;
        println!(
            "{:<6}  {native:>12.0}  {:>12.0} ({:>5.3})  {:>12.0} ({:>5.3})",
            preset.name(),
            webgpu,
            webgpu / native,
            cpu,
            cpu / native
        );
    }
    let size = std::fs::metadata(&wasm)?.len();
    println!(
        "page wasm: {} ({:.1} MiB)",
        wasm.display(),
        size as f64 / (1 << 20) as f64
    );
    Ok(())
}
