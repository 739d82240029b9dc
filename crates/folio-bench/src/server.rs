//! `folio bench server`: a real `folio serve` (small preset) in a child process,
//! loaded with 1,000 joined clients and then each flood an attacker can send;
//! after each, the server's resident memory (now and peak) and the latency of
//! `/api/status` while the flood runs.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use folio_client::ClientOptions;
use folio_proto::ClientMessage;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

#[derive(clap::Args)]
pub struct ServerBenchArgs {
    /// Joined clients held open at once.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// The server's connection cap (what floods of idle sockets run into).
    #[arg(long, default_value_t = 1500)]
    max_connections: usize,
}

/// A process's (VmRSS, VmHWM) in MiB.
pub fn memory(pid: u32) -> anyhow::Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .context("reading /proc (this bench needs Linux)")?;
    let field = |name: &str| -> f64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kib| kib.parse::<f64>().ok())
            .map_or(f64::NAN, |kib| kib / 1024.0)
    };
    Ok((field("VmRSS:"), field("VmHWM:")))
}

/// `/api/status`'s latency and body (a request of its own, HTTP/1.0).
pub async fn status_latency(addr: &str) -> anyhow::Result<(Duration, Vec<u8>)> {
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /api/status HTTP/1.0\r\nHost: bench\r\n\r\n")
        .await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    anyhow::ensure!(response.starts_with(b"HTTP/1.0 200"), "status failed");
    let body = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(Vec::new(), |at| response[at + 4..].to_vec());
    Ok((started.elapsed(), body))
}

/// Polls `/api/status` from a thread of its own (so that the flood's own work in
/// this process does not delay it) while `flood` runs; returns (median, max)
/// latency in ms and the status's size.
async fn during<F: std::future::Future<Output = anyhow::Result<()>>>(
    addr: &str,
    flood: F,
) -> anyhow::Result<(f64, f64, usize)> {
    let poller = {
        let addr = addr.to_owned();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let mut samples = Vec::new();
                let mut bytes = 0;
                for _ in 0..20 {
                    let (latency, body) = status_latency(&addr).await?;
                    samples.push(latency.as_secs_f64() * 1e3);
                    bytes = body.len();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                anyhow::Ok((samples, bytes))
            })
        })
    };
    flood.await?;
    let (mut samples, bytes) = poller
        .join()
        .map_err(|_| anyhow::anyhow!("the status poller panicked"))??;
    samples.sort_by(f64::total_cmp);
    Ok((
        samples[samples.len() / 2],
        samples[samples.len() - 1],
        bytes,
    ))
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn joined(url: &str, join: &ClientMessage) -> anyhow::Result<Socket> {
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await?;
    socket
        .send(Message::Binary(folio_proto::encode(join).into()))
        .await?;
    match socket.next().await {
        Some(Ok(Message::Binary(_))) => Ok(socket),
        other => anyhow::bail!("no welcome: {other:?}"),
    }
}

pub fn run(args: ServerBenchArgs, data_dir: &Path) -> anyhow::Result<()> {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .to_string();
    let state = std::env::temp_dir().join(format!("folio-bench-server-{}", std::process::id()));
    // No round ever starts (it would need 100,000 clients): the floods meet an
    // idle federation with `clients` sessions.
    let mut child = Command::new(std::env::current_exe()?)
        .arg("--data-dir")
        .arg(data_dir)
        .args([
            "serve",
            "--preset",
            "small",
            "--fresh",
            "--addr",
            &addr,
            "--state-dir",
        ])
        .arg(&state)
        .args([
            "--clients-per-round",
            "10",
            "--min-clients",
            "100000",
            "--quorum",
            "1",
        ])
        .args(["--max-connections", &args.max_connections.to_string()])
        .args([
            "--max-connections-per-address",
            &args.max_connections.to_string(),
        ])
        .args([
            "--max-connections-per-network",
            &args.max_connections.to_string(),
        ])
        .args(["--session-burst", &args.max_connections.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?;
    let runtime = tokio::runtime::Runtime::new()?;
    let result = runtime.block_on(async {
        let started = Instant::now();
        while status_latency(&addr).await.is_err() {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(60),
                "the server did not start"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let url = format!("ws://{addr}/ws");
        let row = |what: &str, child: &Child, latency: (f64, f64, usize)| -> anyhow::Result<()> {
            let (rss, peak) = memory(child.id())?;
            println!(
                "{what:<52} {rss:>8.1} {peak:>9.1} {:>11.1} {:>9.1} {:>11}",
                latency.0, latency.1, latency.2
            );
            Ok(())
        };
        println!(
            "{:<52} {:>8} {:>9} {:>11} {:>9} {:>11}",
            "load (server: small preset, child process)",
            "RSS MiB",
            "peak MiB",
            "status p50",
            "max ms",
            "status B"
        );
        row("idle", &child, during(&addr, async { Ok(()) }).await?)?;

        let mut options = ClientOptions::native();
        options.join.backend = "bench".into();
        let join = ClientMessage::Join(options.join.clone());
        let mut clients = Vec::new();
        for _ in 0..args.clients {
            clients.push(joined(&url, &join).await?);
        }
        row(
            &format!("{} joined clients, connected", args.clients),
            &child,
            during(&addr, async { Ok(()) }).await?,
        )?;

        // Joins with oversized strings: refused before any work, nothing kept.
        let mut big = options.join.clone();
        big.backend = "w".repeat(300_000);
        let big = folio_proto::encode(&ClientMessage::Join(big));
        let flood = async {
            for _ in 0..200 {
                let (mut socket, _) = tokio_tungstenite::connect_async(&url).await?;
                socket.send(Message::Binary(big.clone().into())).await?;
                let _ = socket.next().await;
            }
            anyhow::Ok(())
        };
        row(
            "+ 200 joins with a 300 kB backend string",
            &child,
            during(&addr, flood).await?,
        )?;

        // Frames of 120 MiB: cut off from their header.
        let flood = async {
            let sends = (0..5).map(|_| async {
                let (mut socket, _) = tokio_tungstenite::connect_async(&url).await?;
                let _ = socket
                    .send(Message::Binary(vec![0u8; 120 << 20].into()))
                    .await;
                let _ = socket.next().await;
                anyhow::Ok(())
            });
            for sent in futures_util::future::join_all(sends).await {
                sent?;
            }
            Ok(())
        };
        row(
            "+ 5 concurrent 120 MiB frames",
            &child,
            during(&addr, flood).await?,
        )?;

        // Garbage frames: each connection closed after its error budget.
        let flood = async {
            for _ in 0..100 {
                let (mut socket, _) = tokio_tungstenite::connect_async(&url).await?;
                for _ in 0..40 {
                    if socket
                        .send(Message::Binary(vec![0xff; 64].into()))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                while let Some(Ok(_)) = socket.next().await {}
            }
            Ok(())
        };
        row(
            "+ 100 connections x 40 garbage frames",
            &child,
            during(&addr, flood).await?,
        )?;

        // Half-sent HTTP requests and WebSockets that never join: held, then
        // closed by the idle and join timeouts.
        let mut half_open = Vec::new();
        for _ in 0..200 {
            let mut stream = TcpStream::connect(&addr).await?;
            stream.write_all(b"GET /api/status HTTP/1.1\r\nHost:").await?;
            half_open.push(stream);
        }
        let mut silent = Vec::new();
        for _ in 0..200 {
            silent.push(tokio_tungstenite::connect_async(&url).await?.0);
        }
        row(
            "+ 200 half-sent requests, 200 never-joined sockets",
            &child,
            during(&addr, async { Ok(()) }).await?,
        )?;
        let started = Instant::now();
        let mut left = half_open.len() + silent.len();
        while left > 0 && started.elapsed() < Duration::from_secs(60) {
            left = 0;
            for stream in &mut half_open {
                let mut byte = [0u8; 64];
                match tokio::time::timeout(Duration::from_millis(1), stream.read(&mut byte)).await {
                    Ok(Ok(0) | Err(_)) => {}
                    _ => left += 1,
                }
            }
            for socket in &mut silent {
                match tokio::time::timeout(Duration::from_millis(1), socket.next()).await {
                    Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => {}
                    _ => left += 1,
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        println!(
            "  ...{} of 400 closed by the server after {:.0} s (join timeout 10 s, idle timeout 30 s)",
            400 - left,
            started.elapsed().as_secs_f64()
        );
        drop((half_open, silent));

        // Idle sockets past the connection cap: the excess is closed at accept.
        let mut idle = Vec::new();
        for _ in 0..args.max_connections {
            if let Ok(stream) = TcpStream::connect(&addr).await {
                idle.push(stream);
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut closed = 0;
        for stream in &mut idle {
            let mut byte = [0u8; 1];
            if let Ok(Ok(0)) =
                tokio::time::timeout(Duration::from_millis(1), stream.read(&mut byte)).await
            {
                closed += 1;
            }
        }
        let (rss, peak) = memory(child.id())?;
        println!(
            "{:<52} {rss:>8.1} {peak:>9.1}   ({closed} closed at accept: {} connections at most, {} held by clients)",
            format!("+ {} idle TCP sockets", args.max_connections),
            args.max_connections,
            args.clients
        );
        drop(idle);
        let still = clients.len();
        let mut open = 0;
        for socket in &mut clients {
            if socket
                .send(Message::Binary(
                    folio_proto::encode(&ClientMessage::Heartbeat).into(),
                ))
                .await
                .is_ok()
            {
                open += 1;
            }
        }
        println!("joined clients still connected after the floods: {open} of {still}");
        Ok(())
    });
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&state);
    result
}
