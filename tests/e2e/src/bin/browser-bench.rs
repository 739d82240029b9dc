//! Training chars/s in a headless-Chromium tab, on WebGPU (SwiftShader there) and on
//! the CPU fallback, side by side with native flex on the same machine in one run;
//! the WebGPU calls (dispatches, submits, buffer writes, reads back) per training
//! step; and the size of the page's wasm. `cargo run --release -p folio-e2e --bin browser-bench`.

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

/// What a tab asked of its GPU during a measurement: WebGPU calls counted by
/// wrapping the API's own methods (the wasm reaches them through these prototypes).
#[derive(Debug, Default, Clone, Copy)]
struct GpuCalls {
    dispatches: f64,
    submits: f64,
    writes: f64,
    reads: f64,
}

/// Installed once per tab; `window.gpuCalls` holds the running totals.
const COUNT_GPU_CALLS: &str = "
    if (!window.gpuCalls && window.GPUComputePassEncoder) {
        window.gpuCalls = { dispatches: 0, submits: 0, writes: 0, reads: 0 };
        const count = (proto, method, key) => {
            const original = proto[method];
            proto[method] = function (...args) { window.gpuCalls[key]++; return original.apply(this, args); };
        };
        count(GPUComputePassEncoder.prototype, 'dispatchWorkgroups', 'dispatches');
        count(GPUQueue.prototype, 'submit', 'submits');
        count(GPUQueue.prototype, 'writeBuffer', 'writes');
        count(GPUBuffer.prototype, 'mapAsync', 'reads');
    }";

/// `benchTrain` from the page's wasm, on the tab's main thread, and the WebGPU
/// calls per training step (averaged over the warm-up step and the timed ones).
/// Polled: a seed-size model on SwiftShader takes longer than any one WebDriver
/// script may.
fn in_tab(
    tab: &Session,
    preset: Preset,
    backend: &str,
    args: &Args,
) -> anyhow::Result<(f64, GpuCalls)> {
    tab.execute(
        &format!(
            "{COUNT_GPU_CALLS}
         const [preset, backend, batch, seqLen, steps] = arguments;
         window.benchResult = null;
         const before = {{ ...(window.gpuCalls || {{}}) }};
         import('/pkg/folio_web.js')
           .then(async (m) => {{ await m.default(); return m.benchTrain(preset, backend, batch, seqLen, steps); }})
           .then((rate) => {{
                    const calls = {{}};
                    for (const key in window.gpuCalls || {{}}) calls[key] = window.gpuCalls[key] - before[key];
                    window.benchResult = {{ rate, calls }};
                 }},
                 (err) => {{ window.benchResult = {{ error: String(err) }}; }});"
        ),
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
    let rate = answer["rate"]
        .as_f64()
        .context("benchTrain returned no rate")?;
    let steps = (args.steps + 1) as f64;
    let per_step = |key: &str| answer["calls"][key].as_f64().unwrap_or(0.0) / steps;
    Ok((
        rate,
        GpuCalls {
            dispatches: per_step("dispatches"),
            submits: per_step("submits"),
            writes: per_step("writes"),
            reads: per_step("reads"),
        },
    ))
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
        "{:<6}  {:>12}  {:>20}  {:>20}  {:>38}",
        "preset",
        "native flex",
        "tab webgpu (ratio)",
        "tab cpu (ratio)",
        "webgpu per step: dispatches/submits/writes/reads"
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
        let (webgpu, calls) = in_tab(&tab, preset, "auto", &args)?;
        eprintln!("measuring {preset}: the tab on its CPU fallback…");
        let (cpu, _) = in_tab(&tab, preset, "cpu", &args)?;
        println!(
            "{:<6}  {native:>12.0}  {:>12.0} ({:>5.3})  {:>12.0} ({:>5.3})  {:>38}",
            preset.name(),
            webgpu,
            webgpu / native,
            cpu,
            cpu / native,
            format!(
                "{:.0} / {:.0} / {:.0} / {:.0}",
                calls.dispatches, calls.submits, calls.writes, calls.reads
            )
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
