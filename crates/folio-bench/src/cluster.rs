//! `folio bench cluster`: the fan-in of a cluster against one `folio serve` on
//! the same load. Light synthetic clients (no training: each answers a round with
//! one pre-encoded int8 delta at once) hold `--sessions` joined WebSockets spread
//! over the edges; every serving process is a child (`folio serve`, or a root and
//! E edges over a `nats-server`). Per setup: updates folded per second, the bytes
//! the aggregating process takes in per round, the p99 of an update's send to
//! the commit that holds it, and each process's memory.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use folio_client::ClientOptions;
use folio_cluster::nats_server::NatsServer;
use folio_cluster::store::Store;
use folio_fed::{Encoding, codec};
use folio_model::Preset;
use folio_proto::{ClientMessage, ServerMessage, Update};

use crate::server::memory;
use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

#[derive(clap::Args)]
pub struct ClusterBenchArgs {
    /// Joined sessions, spread evenly over the edges.
    #[arg(long, default_value_t = 1000)]
    sessions: usize,
    /// Edge counts to measure (0: one `folio serve`, no cluster).
    #[arg(long, value_delimiter = ',', default_value = "0,1,2,4")]
    edges: Vec<usize>,
    /// Clients per round (each sends one update).
    #[arg(long, default_value_t = 100)]
    clients_per_round: usize,
    /// Rounds measured (after one warm-up round).
    #[arg(long, default_value_t = 5)]
    rounds: u64,
    #[arg(long, default_value = "medium")]
    preset: Preset,
}

fn free_address() -> anyhow::Result<String> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .to_string())
}

/// The serving processes of one setup, killed when dropped.
struct Setup {
    children: Vec<(String, Child)>,
    urls: Vec<String>,
    nats: Option<NatsServer>,
    state: tempdir::Dir,
}

mod tempdir {
    /// A scratch folder, removed when dropped.
    pub struct Dir(pub std::path::PathBuf);

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn folio(data_dir: &Path, state: &Path, name: &str) -> anyhow::Result<Command> {
    let mut command = Command::new(std::env::current_exe()?);
    command.arg("--data-dir").arg(data_dir);
    let log = std::fs::File::create(state.join(format!("{name}.log")))?;
    command.stdout(Stdio::null()).stderr(log);
    Ok(command)
}

impl Setup {
    fn start(args: &ClusterBenchArgs, edges: usize, data_dir: &Path) -> anyhow::Result<Setup> {
        let state = tempdir::Dir(std::env::temp_dir().join(format!(
            "folio-bench-cluster-{}-{edges}",
            std::process::id()
        )));
        std::fs::create_dir_all(&state.0)?;
        let caps = args.sessions.to_string();
        let k = args.clients_per_round.to_string();
        // No round starts before every session joined.
        let all = args.sessions.to_string();
        let serving = |command: &mut Command| {
            command
                .args([
                    "--max-connections",
                    &caps,
                    "--max-connections-per-address",
                    &caps,
                ])
                .args([
                    "--max-connections-per-network",
                    &caps,
                    "--session-burst",
                    &caps,
                ])
                .args(["--max-sessions", &caps]);
        };
        let rounds = |command: &mut Command| {
            command
                .args(["--preset", &args.preset.to_string(), "--fresh"])
                .args([
                    "--clients-per-round",
                    &k,
                    "--min-clients",
                    &all,
                    "--quorum",
                    &k,
                ])
                .args(["--encoding", "int8", "--deadline-secs", "120"])
                .args(["--eval-clients", "1", "--eval-batches", "1"]);
        };
        let mut setup = Setup {
            children: Vec::new(),
            urls: Vec::new(),
            nats: None,
            state,
        };
        if edges == 0 {
            let addr = free_address()?;
            let mut command = folio(data_dir, &setup.state.0, "serve")?;
            command.args(["serve", "--addr", &addr, "--state-dir"]);
            command.arg(setup.state.0.join("serve"));
            serving(&mut command);
            rounds(&mut command);
            setup.children.push(("serve".into(), command.spawn()?));
            setup.urls.push(format!("ws://{addr}/ws"));
            return Ok(setup);
        }
        let nats = NatsServer::start(&setup.state.0.join("nats"))?;
        let mut root = folio(data_dir, &setup.state.0, "root")?;
        root.args([
            "serve",
            "--nats",
            &nats.url(),
            "--role",
            "root",
            "--state-dir",
        ]);
        root.arg(setup.state.0.join("root"));
        rounds(&mut root);
        setup.children.push(("root".into(), root.spawn()?));
        for e in 0..edges {
            let addr = free_address()?;
            let name = format!("edge-{e}");
            let mut edge = folio(data_dir, &setup.state.0, &name)?;
            edge.args(["serve", "--nats", &nats.url(), "--role", "edge"]);
            edge.args(["--name", &name, "--addr", &addr, "--state-dir"]);
            edge.arg(setup.state.0.join(&name));
            serving(&mut edge);
            setup.children.push((name, edge.spawn()?));
            setup.urls.push(format!("ws://{addr}/ws"));
        }
        setup.nats = Some(nats);
        Ok(setup)
    }

    fn log_tail(&self) -> String {
        let mut tail = String::new();
        for (name, _) in &self.children {
            let log = std::fs::read_to_string(self.state.0.join(format!("{name}.log")))
                .unwrap_or_default();
            let last: Vec<&str> = log.lines().rev().take(5).collect();
            tail += &format!(
                "--- {name}\n{}\n",
                last.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        tail
    }
}

/// When each round's update went out, and when its commit came back, per client.
#[derive(Default)]
struct Timings {
    sent: std::collections::BTreeMap<u64, Vec<Instant>>,
    committed: std::collections::BTreeMap<u64, Instant>,
    latencies: Vec<(u64, Duration)>,
}

/// One synthetic client: joins (retrying while the edge starts), answers each
/// round at once with `delta`, and times the commit.
async fn client(
    url: String,
    delta: Arc<Vec<u8>>,
    timings: Arc<Mutex<Timings>>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let (mut socket, _) = loop {
        match tokio_tungstenite::connect_async(&url).await {
            Ok(connected) => break connected,
            Err(_) if started.elapsed() < Duration::from_secs(120) => {
                tokio::time::sleep(Duration::from_millis(250)).await
            }
            Err(err) => anyhow::bail!("{url}: {err}"),
        }
    };
    let mut options = ClientOptions::native();
    options.join.backend = "bench".into();
    socket
        .send(Message::Binary(
            folio_proto::encode(&ClientMessage::Join(options.join)).into(),
        ))
        .await?;
    let mut sent_at = Instant::now();
    while let Some(message) = socket.next().await {
        let Message::Binary(frame) =
            message.with_context(|| format!("{url}: the connection broke"))?
        else {
            continue;
        };
        let reply = match folio_proto::decode_server(&frame)? {
            ServerMessage::Heartbeat => ClientMessage::Heartbeat,
            ServerMessage::RoundStart(start) => {
                sent_at = Instant::now();
                timings
                    .lock()
                    .unwrap()
                    .sent
                    .entry(start.round)
                    .or_default()
                    .push(sent_at);
                ClientMessage::Update(Update {
                    round: start.round,
                    examples: 1,
                    encoding: Encoding::Int8,
                    delta: delta.as_ref().clone(),
                    train_loss: 1.0,
                    train_accuracy: 0.5,
                    train_seconds: 0.0,
                })
            }
            ServerMessage::RoundResult(result) => {
                let now = Instant::now();
                let mut timings = timings.lock().unwrap();
                timings.committed.entry(result.round).or_insert(now);
                if timings
                    .sent
                    .get(&result.round)
                    .is_some_and(|s| s.contains(&sent_at))
                {
                    timings.latencies.push((result.round, now - sent_at));
                }
                continue;
            }
            ServerMessage::Error(refused) => {
                anyhow::bail!(
                    "{url} refused: {} ({})",
                    refused.message,
                    refused.code.name()
                )
            }
            _ => continue,
        };
        socket
            .send(Message::Binary(folio_proto::encode(&reply).into()))
            .await?;
    }
    anyhow::bail!("{url} closed the connection")
}

fn setup_name(edges: usize) -> String {
    match edges {
        0 => "one serve".to_owned(),
        1 => "1 edge".to_owned(),
        _ => format!("{edges} edges"),
    }
}

fn p99(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values
        .get(((values.len() as f64 * 0.99).ceil() as usize).saturating_sub(1))
        .copied()
        .unwrap_or(f64::NAN)
}

/// Sessions one serving process can hold: one per Shakespeare client with text
/// to train on (a session trains as a character of its own).
fn clients_per_process(data_dir: &Path, preset: Preset) -> anyhow::Result<usize> {
    let corpus = folio_data::Corpus::load(&data_dir.join("shakespeare"))?;
    let config = folio_host::engine_config(
        preset,
        folio_server::RoundConfig::tutorial(),
        0,
        folio_engine::Entropy::from_seed(0),
    );
    let start = folio_engine::Start {
        weights: vec![0.0; preset.config().num_params()],
        strategy: None,
        history: Vec::new(),
    };
    let engine: folio_engine::Engine =
        folio_host::build_engine(config, folio_host::corpus_clients(&corpus), start)?;
    Ok(engine.clients().len())
}

pub fn run(args: ClusterBenchArgs, data_dir: &Path) -> anyhow::Result<()> {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let most = clients_per_process(data_dir, args.preset)?;
    for &edges in &args.edges {
        let each = args.sessions.div_ceil(edges.max(1));
        anyhow::ensure!(
            each <= most,
            "{each} sessions for each serving process ({}): one holds at most {most} (one per \
             Shakespeare client); lower --sessions or add edges",
            setup_name(edges)
        );
    }
    let model = args.preset.config();
    let num_params = model.num_params();
    let segments = folio_host::segments(model);
    let delta = Arc::new(codec::encode(
        &vec![1e-4f32; num_params],
        &segments,
        Encoding::Int8,
    ));
    println!(
        "{} sessions, {} updates a round ({} preset: {} parameters, int8 deltas of {} B); {} rounds after a warm-up",
        args.sessions,
        args.clients_per_round,
        args.preset,
        num_params,
        delta.len(),
        args.rounds
    );
    println!(
        "{:<14} {:>10} {:>12} {:>14} {:>13} {:>18} {:>22}",
        "setup",
        "updates/s",
        "round s",
        "agg. in/round",
        "p99 commit s",
        "aggregator RSS MiB",
        "edges RSS MiB (max)"
    );
    for &edges in &args.edges {
        let setup = Setup::start(&args, edges, data_dir)?;
        let runtime = tokio::runtime::Runtime::new()?;
        let timings: Arc<Mutex<Timings>> = Arc::default();
        let result = runtime.block_on(async {
            let mut tasks = Vec::new();
            for i in 0..args.sessions {
                let url = setup.urls[i % setup.urls.len()].clone();
                tasks.push(tokio::spawn(client(url, delta.clone(), timings.clone())));
                if i % 100 == 99 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            let last = args.rounds + 1;
            let started = Instant::now();
            loop {
                if timings.lock().unwrap().committed.contains_key(&last) {
                    break;
                }
                if let Some(stopped) = tasks.iter_mut().find(|t| t.is_finished()) {
                    let why = match stopped.await {
                        Ok(Err(err)) => format!("{err:#}"),
                        other => format!("{other:?}"),
                    };
                    anyhow::bail!("a client stopped early ({why}):\n{}", setup.log_tail());
                }
                anyhow::ensure!(
                    started.elapsed() < Duration::from_secs(600),
                    "round {last} not committed within 10 min:\n{}",
                    setup.log_tail()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let shares = match &setup.nats {
                Some(nats) => Store::connect(&nats.url()).await?.notices().await?,
                None => Vec::new(),
            };
            for task in &tasks {
                task.abort();
            }
            anyhow::Ok(shares)
        });
        let shares = result?;
        let timings = timings.lock().unwrap();
        let (first, last) = (timings.committed[&1], timings.committed[&(args.rounds + 1)]);
        let seconds = (last - first).as_secs_f64();
        let updates = args.clients_per_round as f64 * args.rounds as f64;
        let measured: Vec<f64> = timings
            .latencies
            .iter()
            .filter(|(round, _)| *round > 1)
            .map(|(_, d)| d.as_secs_f64())
            .collect();
        // What the aggregating process reads a round: every update (one
        // server), or every edge's share (the root).
        let bytes_in = if edges == 0 {
            args.clients_per_round as f64 * delta.len() as f64
        } else {
            let measured_shares: Vec<&(folio_cluster::store::ShareNotice, usize)> = shares
                .iter()
                .filter(|(n, _)| (2..=args.rounds + 1).contains(&n.report.round))
                .collect();
            measured_shares
                .iter()
                .map(|(n, len)| {
                    *len as f64
                        + if n.updates > 0 {
                            4.0 * num_params as f64
                        } else {
                            0.0
                        }
                })
                .sum::<f64>()
                / args.rounds as f64
        };
        let aggregator = &setup.children[0].1;
        let (rss, peak) = memory(aggregator.id())?;
        let edge_peaks: Vec<f64> = setup.children[1..]
            .iter()
            .map(|(_, c)| memory(c.id()).map(|(_, peak)| peak))
            .collect::<anyhow::Result<_>>()?;
        let edge_peak = edge_peaks.iter().copied().fold(f64::NAN, f64::max);
        let name = setup_name(edges);
        println!(
            "{name:<14} {:>10.0} {:>12.2} {:>11.1} MB {:>13.2} {:>8.0} (peak {:>4.0}) {:>22}",
            updates / seconds,
            seconds / args.rounds as f64,
            bytes_in / 1e6,
            p99(measured),
            rss,
            peak,
            if edges == 0 {
                "-".to_owned()
            } else {
                format!("{edge_peak:.0}")
            }
        );
        drop(setup);
    }
    Ok(())
}
