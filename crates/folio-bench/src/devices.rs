//! `folio bench devices`: one aggregator (`folio serve --data device`, small
//! preset, in a child process) holding 10,000 device sessions: real native
//! clients on loopback, each with a small text of its own. Measures the join
//! rate, the server's memory, `/api/status` latency with every device
//! connected, and how long the first round (100 devices drawn from all of
//! them) takes to close.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use burn::prelude::Device;
use folio_client::native::WsTransport;
use folio_client::{ClientEvent, ClientOptions};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::server::{memory, status_latency};

#[derive(clap::Args)]
pub struct DevicesBenchArgs {
    /// Device sessions held open at once.
    #[arg(long, default_value_t = 10_000)]
    devices: usize,
    /// Devices in the round.
    #[arg(long, default_value_t = 100)]
    round: usize,
    /// Joins under way at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// `/api/status` requests timed once every device is connected.
    #[arg(long, default_value_t = 200)]
    status_samples: usize,
}

/// What the bench's devices tell it.
enum Seen {
    Joined,
    Trained,
    Failed(String),
}

/// Device `i`'s own text: a few lines no other device has.
fn device_text(i: usize) -> String {
    format!("Device {i} keeps these lines of its own, and trains on them.\n").repeat(24)
}

pub fn run(args: DevicesBenchArgs, data_dir: &Path) -> anyhow::Result<()> {
    // This process holds one socket per device, the server another.
    let files = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(1024);
    anyhow::ensure!(
        files as usize > args.devices + 100,
        "{} devices need as many open files, and {files} are allowed: raise `ulimit -n`",
        args.devices
    );
    let addr = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .to_string();
    let state = std::env::temp_dir().join(format!("folio-bench-devices-{}", std::process::id()));
    let cap = (args.devices + 100).to_string();
    // The round starts with one device more than the bench holds open, so that
    // the status is timed first with every device connected and no round; one
    // batch each keeps the round's training (on this machine's cores) short.
    let mut child = Command::new(std::env::current_exe()?)
        .arg("--data-dir")
        .arg(data_dir)
        .args(["serve", "--data", "device", "--preset", "small", "--fresh"])
        .args(["--addr", &addr, "--state-dir"])
        .arg(&state)
        .args(["--clients-per-round", &args.round.to_string()])
        .args(["--min-clients", &(args.devices + 1).to_string()])
        .args(["--quorum", &args.round.to_string()])
        .args(["--max-batches", "1", "--skip-device-check"])
        .args(["--max-connections", &cap])
        .args(["--max-connections-per-address", &cap])
        .args(["--max-connections-per-network", &cap])
        .args(["--max-sessions", &cap])
        .args(["--session-burst", &cap])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start `folio serve`")?;
    let runtime = tokio::runtime::Runtime::new()?;
    let result = runtime.block_on(measure(&args, &addr, child.id()));
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&state);
    result
}

async fn measure(args: &DevicesBenchArgs, addr: &str, server: u32) -> anyhow::Result<()> {
    let started = Instant::now();
    while status_latency(addr).await.is_err() {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "the server did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (idle_rss, _) = memory(server)?;
    let url = format!("ws://{addr}/ws");
    let (seen, mut events) = mpsc::unbounded_channel();
    let permits = Arc::new(Semaphore::new(args.concurrency));
    let joining = Instant::now();
    for i in 0..args.devices {
        let permit = permits.clone().acquire_owned().await?;
        spawn_device(i, &url, &seen, Some(permit));
    }
    let mut joined = 0;
    while joined < args.devices {
        match events.recv().await {
            Some(Seen::Joined) => joined += 1,
            Some(Seen::Failed(why)) => anyhow::bail!("a device failed to join: {why}"),
            Some(Seen::Trained) => {}
            None => anyhow::bail!("the devices stopped"),
        }
    }
    let join_seconds = joining.elapsed().as_secs_f64();
    let idle = time_status(addr, args.status_samples, None).await?;
    let (rss, peak) = memory(server)?;
    // One device more starts the round; the status is timed while it runs.
    let round_started = Instant::now();
    spawn_device(args.devices, &url, &seen, None);
    let busy = time_status(addr, args.status_samples, Some(1)).await?;
    let round_seconds = round_started.elapsed().as_secs_f64();
    let (_, body) = status_latency(addr).await?;
    let closed: serde_json::Value = serde_json::from_slice(&body)?;
    let mut trained = 0;
    while let Ok(seen) = events.try_recv() {
        match seen {
            Seen::Trained => trained += 1,
            Seen::Failed(why) => anyhow::bail!("a device failed: {why}"),
            Seen::Joined => {}
        }
    }
    let record = &closed["latest"];
    println!(
        "{} device sessions on one aggregator (small preset, server in a child process, clients in this one, loopback)",
        args.devices
    );
    println!(
        "joins: {:.0}/s ({} devices in {join_seconds:.1} s, {} at once)",
        args.devices as f64 / join_seconds,
        args.devices,
        args.concurrency
    );
    println!(
        "server memory: {idle_rss:.1} MiB idle, {rss:.1} MiB with every device connected (peak {peak:.1} MiB): {:.1} KiB a session",
        (rss - idle_rss) * 1024.0 / args.devices as f64
    );
    for (when, timed) in [("no round open", idle), ("during the round", busy)] {
        println!(
            "/api/status, every device connected, {when}: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {} requests of {} bytes",
            timed.p50, timed.p99, timed.max, timed.requests, timed.bytes
        );
    }
    println!(
        "round 1: {} of {} devices reported ({trained} trained here), closed {round_seconds:.1} s after the device that started it joined, {} bytes up",
        record["clients"], args.round, record["bytes_up"]
    );
    Ok(())
}

/// Starts device `i`: it joins with a text of its own and trains whenever it is
/// selected; `permit` is released once it is welcomed.
fn spawn_device(
    i: usize,
    url: &str,
    seen: &mpsc::UnboundedSender<Seen>,
    permit: Option<OwnedSemaphorePermit>,
) {
    let (url, seen) = (url.to_owned(), seen.clone());
    tokio::spawn(async move {
        let mut permit = permit;
        let options = ClientOptions {
            text: Some(device_text(i)),
            ..ClientOptions::native()
        };
        let outcome = async {
            let mut transport = WsTransport::connect(&url).await?;
            folio_client::run(&mut transport, &Device::flex(), &options, |event| {
                let said = match event {
                    ClientEvent::Welcomed { .. } => {
                        permit.take();
                        Seen::Joined
                    }
                    ClientEvent::Trained(report) if report.round == 1 => Seen::Trained,
                    _ => return,
                };
                let _ = seen.send(said);
            })
            .await
        }
        .await;
        if let Err(err) = outcome {
            let _ = seen.send(Seen::Failed(err.to_string()));
        }
    });
}

/// `/api/status` latencies, in ms.
struct Timed {
    requests: usize,
    p50: f64,
    p99: f64,
    max: f64,
    bytes: usize,
}

/// Times `samples` requests of `/api/status` one after another (and more, until
/// `until_round` is committed), from a thread of its own (the devices'
/// training in this process does not delay it).
async fn time_status(
    addr: &str,
    samples: usize,
    until_round: Option<u64>,
) -> anyhow::Result<Timed> {
    let addr = addr.to_owned();
    let timing = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let mut latencies = Vec::with_capacity(samples);
            let started = Instant::now();
            let bytes = loop {
                let (latency, body) = status_latency(&addr).await?;
                latencies.push(latency.as_secs_f64() * 1e3);
                let status: serde_json::Value = serde_json::from_slice(&body)?;
                let committed = status["completed_rounds"].as_u64().unwrap_or(0);
                if latencies.len() >= samples.max(1) && until_round.is_none_or(|r| committed >= r) {
                    break body.len();
                }
                anyhow::ensure!(
                    started.elapsed() < Duration::from_secs(600),
                    "round {until_round:?} did not close in 10 minutes: {status}"
                );
            };
            latencies.sort_by(f64::total_cmp);
            let at = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
            anyhow::Ok(Timed {
                requests: latencies.len(),
                p50: at(0.5),
                p99: at(0.99),
                max: at(1.0),
                bytes,
            })
        })
    });
    tokio::task::spawn_blocking(move || timing.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the status timer panicked"))?
}
