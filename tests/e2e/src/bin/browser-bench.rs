//! Training chars/s in a headless-Chromium tab, on WebGPU (SwiftShader there) and on
//! the CPU fallback (on one thread, and on every core), side by side with native flex
//! on the same machine in one run; the WebGPU calls (dispatches, submits, buffer
//! writes, reads back) per training step; and the size of the page's wasm.
//! `cargo run --release -p folio-e2e --bin browser-bench`.
//! With `--first-batch`: the page's wasm over the wire (raw, gzip, brotli) and
//! the time from opening the page (cold cache, a throttled network) to the first
//! trained batch.

use std::time::Duration;

use anyhow::{Context, bail};
use burn::prelude::Device;
use clap::Parser;
use folio_e2e::LocalServer;
use folio_e2e::webdriver::{Driver, Session};
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
    /// Measure the tab on WebGPU too (SwiftShader here: minutes for `small`).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    webgpu: bool,
    /// Measure the page's load instead: wasm bytes over the wire and the time to
    /// the first trained batch.
    #[arg(long)]
    first_batch: bool,
    /// The network for `--first-batch`, in Mbit/s down (20 ms latency).
    #[arg(long, default_value_t = 20.0)]
    mbits: f64,
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

/// Where a tab runs `benchTrain`: on its main thread (where the WebGPU calls can
/// be counted) or, as the page trains, in a Web Worker, with the main build or
/// the threaded CPU build and its pool of one worker per core.
#[derive(Clone, Copy)]
enum Where {
    MainThread,
    Worker { threads: bool },
}

/// Runs in a fresh module worker: `[module URL, pool size or 0, benchTrain's arguments]`.
const BENCH_WORKER: &str = "
    onmessage = async ({ data: [url, pool, args] }) => {
        try {
            const code = await import(url);
            await code.default();
            if (pool > 0) await code.initThreadPool(pool);
            postMessage({ rate: await code.benchTrain(...args) });
        } catch (err) {
            postMessage({ error: String(err) });
        }
    };";

/// `benchTrain` from the page's wasm in `place`, and the WebGPU calls per
/// training step (averaged over the warm-up step and the timed ones). Polled: a
/// seed-size model on SwiftShader takes longer than any one WebDriver script may.
fn in_tab(
    tab: &Session,
    preset: Preset,
    backend: &str,
    place: Where,
    args: &Args,
) -> anyhow::Result<(f64, GpuCalls)> {
    let (module, pool) = match place {
        Where::Worker { threads: true } => {
            ("/pkg/threads/folio_web.js", "navigator.hardwareConcurrency")
        }
        _ => ("/pkg/folio_web.js", "0"),
    };
    let run = match place {
        Where::MainThread => format!(
            "import('{module}').then(async (m) => {{ await m.default(); return m.benchTrain(...args); }})"
        ),
        Where::Worker { .. } => format!(
            "new Promise((resolve, reject) => {{
                const source = new Blob([{BENCH_WORKER:?}], {{ type: 'text/javascript' }});
                const worker = new Worker(URL.createObjectURL(source), {{ type: 'module' }});
                worker.onmessage = ({{ data }}) => {{
                    worker.terminate();
                    if ('error' in data) reject(data.error); else resolve(data.rate);
                }};
                worker.onerror = (err) => reject(err.message);
                worker.postMessage([new URL('{module}', location.href).href, {pool}, args]);
             }})"
        ),
    };
    tab.execute(
        &format!(
            "{COUNT_GPU_CALLS}
         const args = [...arguments];
         window.benchResult = null;
         const before = {{ ...(window.gpuCalls || {{}}) }};
         {run}
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

/// A loopback proxy to `target` that sends its answers at most `bytes_per_second`
/// (each connection on its own: a browser's parallel downloads share no budget,
/// which only flatters the page), after `latency` per connection. Returns its
/// address. DevTools' throttling would miss the Web Worker that fetches the wasm.
fn throttled_proxy(
    target: std::net::SocketAddr,
    bytes_per_second: f64,
    latency: Duration,
) -> anyhow::Result<std::net::SocketAddr> {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let address = listener.local_addr()?;
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(server) = TcpStream::connect(target) else {
                continue;
            };
            let (Ok(mut client_in), Ok(mut server_out)) = (client.try_clone(), server.try_clone())
            else {
                continue;
            };
            std::thread::spawn(move || std::io::copy(&mut client_in, &mut server_out));
            let (mut server_in, mut client_out) = (server, client);
            std::thread::spawn(move || {
                std::thread::sleep(latency);
                let mut chunk = [0u8; 16 * 1024];
                while let Ok(n) = server_in.read(&mut chunk) {
                    if n == 0 || client_out.write_all(&chunk[..n]).is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_secs_f64(n as f64 / bytes_per_second));
                }
                let _ = client_out.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    Ok(address)
}

/// The page's load: its wasm over the wire, then (per backend) a fresh browser
/// opening the page on a throttled network until its first trained batch.
fn first_batch(args: &Args) -> anyhow::Result<()> {
    // Rounds of one device each, one batch: a round starts as soon as a tab joins.
    let rounds = folio_server::RoundConfig {
        strategy: folio_fed::StrategyConfig::fedavg(1),
        max_batches: Some(1),
        eval_clients: 1,
        eval_batches: 1,
        ..folio_server::RoundConfig::tutorial()
    };
    let server = LocalServer::start(rounds, 100)?;
    let wasm = format!("{}pkg/folio_web_bg.wasm", server.url());
    for encoding in ["identity", "gzip", "br"] {
        let sent = folio_e2e::get_encoded(&wasm, encoding)?;
        let bytes = sent.body.len();
        println!(
            "page wasm asked as {encoding:<8}: {bytes:>10} bytes ({:.2} MB), sent as {}",
            bytes as f64 / 1e6,
            sent.encoding
        );
    }
    let proxy = throttled_proxy(
        server.server.addr,
        args.mbits * 1e6 / 8.0,
        Duration::from_millis(20),
    )?;
    let driver = Driver::chromium()?;
    for backend in ["cpu&threads=off", "cpu", "auto"] {
        // A fresh profile: nothing cached.
        let tab = driver.session(1200, 900)?;
        tab.navigate(&format!(
            "http://{proxy}/?backend={backend}&client=THE_TRAGEDY_OF_KING_LEAR_LEAR"
        ))?;
        let ms = tab.wait_for(
            "the first trained batch",
            "return document.body.dataset.firstBatchMs",
            Duration::from_secs(1800),
        )?;
        println!(
            "open the page → first trained batch, backend {backend}, {} Mbit/s: {} ms",
            args.mbits,
            ms.as_str().unwrap_or("?")
        );
        // The next backend joins as a new device.
        drop(tab);
        std::thread::sleep(Duration::from_secs(1));
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.first_batch {
        return first_batch(&args);
    }
    let wasm = folio_e2e::repo_root().join("pkg/folio_web_bg.wasm");
    // The page only: `?device=off` keeps the tab from joining as a device.
    let server = LocalServer::start(folio_server::RoundConfig::tutorial(), 1)?;
    let driver = Driver::chromium()?;
    let tab = driver.session(1200, 900)?;
    tab.navigate(&format!("{}?device=off", server.url()))?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "training chars/s, B × T = {} × {}, {} timed steps after a warm-up, {cores} cores",
        args.batch, args.seq_len, args.steps
    );
    println!(
        "{:<6}  {:>12}  {:>20}  {:>20}  {:>20}  {:>38}",
        "preset",
        "native flex",
        "tab webgpu (ratio)",
        "tab cpu 1 (ratio)",
        format!("tab cpu {cores} (ratio)"),
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
        let (webgpu, calls) = if args.webgpu {
            in_tab(&tab, preset, "auto", Where::MainThread, &args)?
        } else {
            (f64::NAN, GpuCalls::default())
        };
        eprintln!("measuring {preset}: the tab on its CPU fallback, one thread…");
        let one_thread = Where::Worker { threads: false };
        let (cpu, _) = in_tab(&tab, preset, "cpu", one_thread, &args)?;
        eprintln!("measuring {preset}: the tab on its CPU fallback, {cores} threads…");
        let every_core = Where::Worker { threads: true };
        let (threaded, _) = in_tab(&tab, preset, "cpu", every_core, &args)?;
        println!(
            "{:<6}  {native:>12.0}  {:>12.0} ({:>5.3})  {:>12.0} ({:>5.3})  {:>12.0} ({:>5.3})  {:>38}",
            preset.name(),
            webgpu,
            webgpu / native,
            cpu,
            cpu / native,
            threaded,
            threaded / native,
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
