//! `folio bench responsiveness`: does the aggregator keep answering while it
//! works, and does it bound a slow client in time? A real `folio serve` (any
//! binary, so that two versions can be compared side by side) in a child process:
//!
//! 1. `clients` native clients join a medium-preset federation that aggregates by
//!    coordinate-wise median; each sends one update of random values; meanwhile
//!    `/api/status` is polled every 10 ms, and its latency is reported over the
//!    window from the first update to the round's commit;
//! 2. a request that trickles one header byte every `trickle_secs`: how long the
//!    server keeps it open.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use folio_client::ClientOptions;
use folio_data::rng::SplitMix64;
use folio_fed::codec;
use folio_model::Preset;
use folio_proto::{ClientMessage, ServerMessage, Update};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::server::status_latency;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

#[derive(clap::Args)]
pub struct ResponsivenessArgs {
    /// The `folio` binary to measure [default: this one].
    #[arg(long)]
    server: Option<PathBuf>,
    /// Clients in the round (all send an update).
    #[arg(long, default_value_t = 100)]
    clients: usize,
    /// Seconds between the trickling request's bytes.
    #[arg(long, default_value_t = 10)]
    trickle_secs: u64,
    /// Give up on the trickling request after this long.
    #[arg(long, default_value_t = 120)]
    trickle_limit_secs: u64,
}

fn completed(body: &[u8]) -> u64 {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|s| s["completed_rounds"].as_u64())
        .unwrap_or(0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub fn run(args: ResponsivenessArgs, data_dir: &Path) -> anyhow::Result<()> {
    if let Ok(addr) = std::env::var("FOLIO_BENCH_ADDR") {
        let runtime = tokio::runtime::Runtime::new()?;
        return runtime.block_on(measure(&args, &addr, Path::new("external")));
    }
    let binary = match &args.server {
        Some(path) => path.clone(),
        None => std::env::current_exe()?,
    };
    let addr = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .to_string();
    let state = std::env::temp_dir().join(format!("folio-bench-resp-{}", std::process::id()));
    let clients = args.clients.to_string();
    let mut child = Command::new(&binary)
        .arg("--data-dir")
        .arg(data_dir)
        .args(["serve", "--preset", "medium", "--fresh", "--addr", &addr])
        .arg("--state-dir")
        .arg(&state)
        .args(["--clients-per-round", &clients, "--quorum", &clients])
        .args(["--aggregation", "median", "--clip", "off"])
        .args(["--eval-clients", "1", "--eval-batches", "1"])
        .args(["--max-connections-per-address", "1000"])
        .args(["--max-connections-per-network", "1000"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot start {}", binary.display()))?;
    let runtime = tokio::runtime::Runtime::new()?;
    let result = runtime.block_on(measure(&args, &addr, &binary));
    // A server that died is the finding, not the bench's own error.
    let died = child.try_wait()?;
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&state);
    match died {
        Some(status) => Err(anyhow::anyhow!("the server exited: {status}")),
        None => result,
    }
}

async fn measure(args: &ResponsivenessArgs, addr: &str, binary: &Path) -> anyhow::Result<()> {
    let addr = addr.to_owned();
    {
        let started = Instant::now();
        while status_latency(&addr).await.is_err() {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(120),
                "the server did not start"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let model = Preset::Medium.config();
        let segments: Vec<usize> = model
            .param_shapes()
            .iter()
            .map(|(_, shape)| shape.iter().product())
            .collect();
        let url = format!("ws://{addr}/ws");
        let mut options = ClientOptions::native();
        options.join.backend = "bench".into();
        let join = folio_proto::encode(&ClientMessage::Join(options.join.clone()));
        let mut sockets = Vec::new();
        for _ in 0..args.clients {
            let (mut socket, _) =
                tokio_tungstenite::connect_async(&url)
                    .await
                    .with_context(|| {
                        format!(
                            "client {} of {} could not connect",
                            sockets.len() + 1,
                            args.clients
                        )
                    })?;
            socket.send(Message::Binary(join.clone().into())).await?;
            sockets.push(socket);
        }
        // Each client's round start, then one update of random values each.
        let mut updates = Vec::new();
        for (i, socket) in sockets.iter_mut().enumerate() {
            let start = loop {
                let Some(Ok(Message::Binary(frame))) = socket.next().await else {
                    anyhow::bail!("a client's connection closed before its round");
                };
                if let Ok(ServerMessage::RoundStart(start)) = folio_proto::decode_server(&frame) {
                    break start;
                }
            };
            let mut rng = SplitMix64::new(i as u64);
            let delta: Vec<f32> = (0..model.num_params())
                .map(|_| (rng.next_f64() as f32 - 0.5) * 1e-3)
                .collect();
            updates.push(folio_proto::encode(&ClientMessage::Update(Update {
                round: start.round,
                examples: 1,
                encoding: start.delta_encoding,
                delta: codec::encode(&delta, &segments, start.delta_encoding),
                train_loss: 1.0,
                train_accuracy: 0.5,
                train_seconds: 1.0,
            })));
        }
        let poller = {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(async {
                    let mut samples = Vec::new();
                    let (mut bytes, started) = (0, Instant::now());
                    loop {
                        let (latency, body) = status_latency(&addr)
                            .await
                            .context("polling /api/status during the round")?;
                        samples.push(latency.as_secs_f64() * 1e3);
                        bytes = bytes.max(body.len());
                        if completed(&body) >= 1 {
                            break;
                        }
                        anyhow::ensure!(
                            started.elapsed() < Duration::from_secs(600),
                            "round 1 was not committed in 10 minutes"
                        );
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    anyhow::Ok((samples, bytes, started.elapsed()))
                })
            })
        };
        for (socket, update) in sockets.iter_mut().zip(updates) {
            socket.send(Message::Binary(update.into())).await?;
        }
        let (mut samples, bytes, window) = poller
            .join()
            .map_err(|_| anyhow::anyhow!("the status poller panicked"))??;
        samples.sort_by(f64::total_cmp);
        println!(
            "{}: {} clients, median aggregation of the medium preset, from the first update to the commit ({:.1} s):",
            binary.display(),
            args.clients,
            window.as_secs_f64()
        );
        println!(
            "  /api/status: {} polls, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; {bytes} bytes",
            samples.len(),
            percentile(&samples, 0.5),
            percentile(&samples, 0.99),
            percentile(&samples, 1.0)
        );
        drop(sockets);
        // A request trickling its head: one byte every `trickle_secs`.
        let request = b"GET /api/status HTTP/1.1\r\nHost: bench\r\nX-Slow: ";
        let mut stream = TcpStream::connect(&addr).await?;
        let opened = Instant::now();
        let limit = Duration::from_secs(args.trickle_limit_secs);
        let mut sent = 0;
        let closed = loop {
            let byte = request[sent % request.len()];
            if stream.write_all(&[byte]).await.is_err() {
                break Some(opened.elapsed());
            }
            sent += 1;
            let mut buf = [0u8; 256];
            let wait = Duration::from_secs(args.trickle_secs);
            match tokio::time::timeout(wait, stream.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => break Some(opened.elapsed()),
                Ok(Ok(_)) => {}
                Err(_) => {}
            }
            if opened.elapsed() > limit {
                break None;
            }
        };
        match closed {
            Some(after) => println!(
                "  a request trickling one header byte every {} s: closed after {:.1} s ({sent} bytes sent)",
                args.trickle_secs,
                after.as_secs_f64()
            ),
            None => println!(
                "  a request trickling one header byte every {} s: still open after {} s ({sent} bytes sent)",
                args.trickle_secs, args.trickle_limit_secs
            ),
        }
        anyhow::Ok(())
    }
}
