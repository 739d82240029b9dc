//! `folio serve`, `folio client` and `folio simulate`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use burn::prelude::Device;
use clap::{Args, ValueEnum};
use folio_client::{ClientEvent, ClientOptions};
use folio_host::settings::RunSettings;
use folio_server::{AccessConfig, Limits, RoundRecord, Server, ServerConfig};
use folio_sim::population::Progress;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Args)]
pub struct ServeArgs {
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: std::net::SocketAddr,
    /// Serve HTTPS and wss:// with this certificate chain (PEM), read again
    /// whenever the file changes: a renewed certificate needs no restart.
    /// Browsers off localhost give the page WebGPU and threads only over HTTPS.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve HTTPS with a certificate for this name from an ACME CA (proved on
    /// this server's port by TLS-ALPN-01, which the CA checks at port 443),
    /// renewed before it gets old. Repeatable.
    #[arg(long, value_name = "NAME", conflicts_with = "tls_cert")]
    acme_domain: Vec<String>,
    /// The ACME CA's directory.
    #[arg(long, default_value = "https://acme-v02.api.letsencrypt.org/directory")]
    acme_directory: String,
    /// Where the ACME account and certificate are kept [default: STATE_DIR/acme]
    #[arg(long)]
    acme_cache: Option<PathBuf>,
    /// An address the CA may write to about the certificate (mailto:...).
    #[arg(long)]
    acme_contact: Vec<String>,
    /// A CA certificate (PEM) to trust for the ACME directory's own HTTPS (a
    /// test CA such as pebble's) instead of the system's.
    #[arg(long)]
    acme_directory_ca: Option<PathBuf>,
    /// How often the ACME certificate's age is checked.
    #[arg(long, default_value_t = 3600, hide = true)]
    acme_check_secs: u64,
    /// The most proof-of-work bits a new session is asked for when many
    /// sessions compete for places (0: never; at most 22, a second or two in a
    /// tab). None while there is room.
    #[arg(long, default_value_t = folio_proto::work::MAX_BITS)]
    join_work_bits: u8,
    /// A reverse proxy (an address or block, e.g. 127.0.0.1 or 10.0.0.0/8)
    /// whose --client-address-header is believed: devices behind it are then
    /// capped, rate-limited and selected by their own addresses. Repeatable.
    #[arg(long, value_name = "CIDR")]
    trusted_proxy: Vec<folio_server::proxy::Cidr>,
    /// The header the trusted proxies append each client's address to:
    /// x-forwarded-for (nginx's $proxy_add_x_forwarded_for, Caddy's default) or
    /// forwarded (RFC 7239).
    #[arg(long, default_value = "x-forwarded-for", requires = "trusted_proxy")]
    client_address_header: folio_server::proxy::ClientHeader,
    /// Checkpoints and metrics; restarting on the same folder resumes [default:
    /// data/state/PRESET, so that runs of different presets never share one]
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Stop after this many rounds.
    #[arg(long)]
    rounds: Option<u64>,
    /// A file holding the token clients must send to join [default: $FOLIO_JOIN_TOKEN; none: anyone may join]
    #[arg(long)]
    join_token_file: Option<PathBuf>,
    /// A file holding the token of the admin API [default: $FOLIO_ADMIN_TOKEN; none: the admin API is off]
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
    /// Another origin whose pages may open the WebSocket (repeatable; the page's own always may).
    #[arg(long)]
    allow_origin: Vec<String>,
    /// Select devices without first checking their arithmetic (by default each
    /// answers a known-answer probe when it joins and when its backend changes).
    #[arg(long)]
    skip_device_check: bool,
    /// WebSockets (sessions) open at most, in all (plain HTTP gets a few more
    /// connections)...
    #[arg(long, default_value_t = Limits::default().max_connections)]
    max_connections: usize,
    /// ...from one address...
    #[arg(long, default_value_t = Limits::default().max_connections_per_address)]
    max_connections_per_address: usize,
    /// ...and from one network (an IPv4 /24, an IPv6 /64).
    #[arg(long, default_value_t = Limits::default().max_connections_per_network)]
    max_connections_per_network: usize,
    /// Sessions kept (connected, or waiting to be resumed).
    #[arg(long, default_value_t = Limits::default().max_sessions)]
    max_sessions: usize,
    /// A disconnected session can be resumed for this long.
    #[arg(long, default_value_t = Limits::default().session_ttl.as_secs())]
    session_ttl_secs: u64,
    /// New sessions one network may open at once; then one a second.
    #[arg(long, default_value_t = Limits::default().new_sessions.burst)]
    session_burst: u32,
    /// Run as part of a cluster whose state lives in NATS JetStream at this URL
    /// (nats://127.0.0.1:4222), as the --role says.
    #[arg(long, requires = "role")]
    nats: Option<String>,
    /// In a cluster: an edge serves tabs and folds their deltas; the root (one
    /// at a time; another waits as a standby) runs the rounds over all edges.
    #[arg(long, value_enum, requires = "nats")]
    role: Option<ClusterRole>,
    /// This process's name in the cluster, unique among the edges [default: the
    /// role and --addr]
    #[arg(long)]
    name: Option<String>,
    /// Where tabs reach this edge, if not at --addr (ws://host:port/ws).
    #[arg(long)]
    public_url: Option<String>,
    /// The run's settings from this file (JSON, as every run writes them to
    /// its state dir's settings.json) instead of the flags.
    #[arg(long, conflicts_with = "RunSettings")]
    config: Option<PathBuf>,
    #[command(flatten)]
    round: RunSettings,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ClusterRole {
    Edge,
    Root,
}

#[derive(Args)]
pub struct ClientArgs {
    /// The aggregator; repeated (a cluster's edges), the next is tried whenever
    /// connecting to one fails.
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    server: Vec<String>,
    /// Train as this Shakespeare client (the simulation, `serve --data shakespeare`).
    #[arg(long, conflicts_with = "text")]
    client: Option<String>,
    /// Train on this text, which never leaves this machine: a file, or a folder
    /// of .txt files (for `serve --data device`). The last fifth of its lines is
    /// held out, for federated evaluation.
    #[arg(long)]
    text: Option<PathBuf>,
    /// A file holding the join token [default: $FOLIO_JOIN_TOKEN]
    #[arg(long)]
    token_file: Option<PathBuf>,
}

#[derive(Args)]
pub struct SimulateArgs {
    /// Sample each round's clients from every Shakespeare client, in this process
    /// (resumable from --state-dir), instead of running the aggregator with
    /// --clients native clients over WebSocket.
    #[arg(long, requires = "state_dir")]
    population: bool,
    #[arg(long, default_value_t = 2)]
    clients: usize,
    #[arg(long, default_value_t = 5)]
    rounds: u64,
    /// Tune, don't report: train on all but the last eighth of each client's
    /// training speeches and evaluate (population figures included) on that
    /// eighth; the test split is not loaded.
    #[arg(long, requires = "population")]
    validation: bool,
    /// Give each client a device (a native client, a tab on the CPU fallback,
    /// a tab on a software WebGPU: the speeds measured here, spread
    /// log-normally) and run on a simulated clock, logged per round to
    /// clock.jsonl; --mode async needs it.
    #[arg(long, requires = "population")]
    devices: bool,
    /// Checkpoints and metrics [default: a fresh temporary folder]
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// The run's settings from this file (JSON, as every run writes them to
    /// its state dir's settings.json) instead of the flags.
    #[arg(long, conflicts_with = "RunSettings")]
    config: Option<PathBuf>,
    #[command(flatten)]
    round: RunSettings,
}

/// The settings a run goes by: from `--config`, else the flags.
fn settings(config: Option<&Path>, flags: &RunSettings) -> anyhow::Result<RunSettings> {
    match config {
        Some(path) => RunSettings::load(path),
        None => Ok(flags.clone()),
    }
}

/// A server of `round`'s settings, which it writes to its state dir.
fn server_config(
    round: &RunSettings,
    addr: std::net::SocketAddr,
    state_dir: PathBuf,
    data_dir: &Path,
) -> anyhow::Result<ServerConfig> {
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("cannot create the state dir {}", state_dir.display()))?;
    round.save(&state_dir)?;
    Ok(ServerConfig {
        addr,
        tls: None,
        state_dir,
        data: round.data.source(),
        data_dir: data_dir.to_owned(),
        web_root: Path::new("index.html").exists().then(|| PathBuf::from(".")),
        preset: round.preset,
        init: round.init(),
        rounds: round.round_config()?,
        seed: round.seed,
        access: AccessConfig::default(),
        limits: Limits::default(),
        max_rounds: None,
    })
}

pub fn serve(args: ServeArgs, data_dir: &Path) -> anyhow::Result<()> {
    let round = settings(args.config.as_deref(), &args.round)?;
    let state_dir = args
        .state_dir
        .unwrap_or_else(|| Path::new("data/state").join(round.preset.name()));
    let mut config = server_config(&round, args.addr, state_dir, data_dir)?;
    if let (Some(cert), Some(key)) = (args.tls_cert, args.tls_key) {
        config.tls = Some(folio_server::TlsConfig::Files { cert, key });
    }
    if !args.acme_domain.is_empty() {
        config.tls = Some(folio_server::TlsConfig::Acme(
            folio_server::acme::AcmeConfig {
                domains: args.acme_domain,
                directory: args.acme_directory,
                cache: args
                    .acme_cache
                    .unwrap_or_else(|| config.state_dir.join("acme")),
                contact: args.acme_contact,
                directory_ca: args.acme_directory_ca,
                check_every: Duration::from_secs(args.acme_check_secs.max(1)),
            },
        ));
    }
    let (http, ws) = match config.tls {
        Some(_) => ("https", "wss"),
        None => ("http", "ws"),
    };
    config.access = AccessConfig {
        join_token: folio_server::access::secret(
            args.join_token_file.as_deref(),
            "FOLIO_JOIN_TOKEN",
        )?,
        admin_token: folio_server::access::secret(
            args.admin_token_file.as_deref(),
            "FOLIO_ADMIN_TOKEN",
        )?,
        allowed_origins: args.allow_origin,
        check_devices: !args.skip_device_check,
        trusted_proxies: folio_server::proxy::TrustedProxies {
            proxies: args.trusted_proxy,
            header: args.client_address_header,
        },
        join_work_bits: args.join_work_bits.min(folio_proto::work::MAX_BITS),
    };
    config.limits = Limits {
        max_connections: args.max_connections,
        max_connections_per_address: args.max_connections_per_address,
        max_connections_per_network: args.max_connections_per_network,
        session_ttl: Duration::from_secs(args.session_ttl_secs),
        max_sessions: args.max_sessions,
        new_sessions: folio_engine::SessionRate {
            burst: args.session_burst,
            ..Limits::default().new_sessions
        },
        ..Limits::default()
    };
    config.max_rounds = args.rounds;
    let runtime = tokio::runtime::Runtime::new()?;
    if let (Some(nats), Some(role)) = (args.nats, args.role) {
        let name = args.name.unwrap_or_else(|| match role {
            ClusterRole::Edge => format!("edge-{}", args.addr),
            ClusterRole::Root => format!("root-{}", std::process::id()),
        });
        let served = runtime.block_on(async {
            match role {
                ClusterRole::Root => run_root(config, nats, name).await,
                ClusterRole::Edge => {
                    let edge = folio_cluster::Edge::start(folio_cluster::EdgeConfig {
                        server: config,
                        nats,
                        name: name.clone(),
                        public_url: args.public_url,
                    })
                    .await?;
                    println!(
                        "folio edge {name} on {http}://{} (WebSocket {}), rounds from the root",
                        edge.server.addr, edge.url
                    );
                    follow(&edge.server, args.rounds).await;
                    edge.server.shutdown().await;
                    anyhow::Ok(())
                }
            }
        });
        runtime.shutdown_timeout(Duration::from_secs(1));
        return served;
    }
    let served = runtime.block_on(async {
        let server = Server::start(config).await?;
        println!(
            "folio aggregator on {http}://{0} (WebSocket {ws}://{0}/ws, status {http}://{0}/api/status)",
            server.addr
        );
        println!(
            "open {http}://{} in several tabs, or run `folio client` in several terminals",
            server.addr
        );
        follow(&server, args.rounds).await;
        server.shutdown().await;
        anyhow::Ok(())
    });
    // An evaluation still running on the blocking pool belongs to an abandoned
    // round: not worth waiting for.
    runtime.shutdown_timeout(Duration::from_secs(1));
    served
}

/// Prints each committed round until `rounds` are, or a signal comes.
async fn follow<R: folio_server::Served>(server: &Server<R>, rounds: Option<u64>) {
    println!("{}", RoundRecord::TABLE_HEADER);
    let mut shown = 0;
    let mut stop = std::pin::pin!(stop_signal());
    loop {
        for record in server.history_from(shown) {
            println!("{}", server.release().table_row(&record));
            shown = record.round + 1;
        }
        if rounds.is_some_and(|max| shown > max) {
            break;
        }
        tokio::select! {
            () = server.wait_for_round(shown) => {}
            signal = &mut stop => {
                tracing::info!("{signal}: stopping; the open round, if any, is abandoned");
                break;
            }
        }
    }
}

/// The cluster's root: runs rounds until `--rounds` are committed, the lease is
/// lost, or a signal comes.
async fn run_root(config: ServerConfig, nats: String, name: String) -> anyhow::Result<()> {
    println!("folio root {name}: rounds over the edges of the cluster at {nats}");
    let root = folio_cluster::Root::start(folio_cluster::RootConfig {
        server: config,
        nats,
        name,
    })
    .await?;
    println!("{}", RoundRecord::TABLE_HEADER);
    let mut records = root.records();
    let release = root.release();
    let mut stop = std::pin::pin!(stop_signal());
    let mut finished = std::pin::pin!(root.join());
    loop {
        tokio::select! {
            changed = records.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                if let Some(record) = records.borrow_and_update().clone() {
                    println!("{}", release.table_row(&record));
                }
            }
            done = &mut finished => return done,
            signal = &mut stop => {
                tracing::info!("{signal}: stopping; the open round runs again under the next root");
                return Ok(());
            }
        }
    }
}

/// The first of SIGINT (Ctrl-C) and SIGTERM, named.
async fn stop_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut term) = signal(SignalKind::terminate()) else {
            let _ = tokio::signal::ctrl_c().await;
            return "SIGINT";
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "Ctrl-C"
    }
}

pub fn client(args: ClientArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut options = ClientOptions::native();
    options.join.client = args.client;
    options.text = match &args.text {
        Some(path) => Some(
            folio_data::device::read_device_text(path)
                .with_context(|| format!("cannot train on {}", path.display()))?,
        ),
        None => None,
    };
    options.join.token =
        folio_server::access::secret(args.token_file.as_deref(), "FOLIO_JOIN_TOKEN")?;
    runtime.block_on(async {
        folio_client::native::run_reconnecting(
            &args.server,
            &Device::flex(),
            &options,
            |event| match event {
                ClientEvent::Welcomed {
                    client_id,
                    data: folio_proto::DataSource::Device,
                    train_chars,
                    held_out_chars,
                    ..
                } => println!(
                    "joined as {client_id}: training on {train_chars} chars of this machine's text, {held_out_chars} held out; the text never leaves it"
                ),
                ClientEvent::Welcomed {
                    client_id,
                    train_chars,
                    ..
                } => {
                    println!("training as {client_id} ({train_chars} chars of lines)")
                }
                ClientEvent::Evaluated(answer) => println!(
                    "round {} evaluated here: loss {:.4}, accuracy {:.4} on {} held-out chars",
                    answer.round,
                    answer.loss_sum / answer.chars.max(1) as f64,
                    answer.correct as f64 / answer.chars.max(1) as f64,
                    answer.chars
                ),
                ClientEvent::Trained(report) => println!(
                    "round {}: {} examples, loss {:.4}, accuracy {:.4}, {:.1}s, {} bytes up",
                    report.round,
                    report.examples,
                    report.train_loss,
                    report.train_accuracy,
                    report.train_seconds,
                    report.bytes_up
                ),
                ClientEvent::RoundResult(result) => println!(
                    "round {} global: eval loss {:.4}, accuracy {:.4} ({} clients)",
                    result.round, result.eval_loss, result.eval_accuracy, result.clients
                ),
                // Never selected on this backend: nothing left to do here.
                ClientEvent::ServerError(error)
                    if error.code == folio_proto::ErrorCode::DeviceCheckFailed =>
                {
                    eprintln!(
                        "error: this machine failed the aggregator's device check, so it will never be selected: {}\n\
                         Its CPU backend computes wrong gradients: try a build for another CPU (or without target-cpu flags), or another machine.",
                        error.message
                    );
                    std::process::exit(2);
                }
                ClientEvent::ServerError(error) => {
                    eprintln!("server: {} ({})", error.message, error.code.name())
                }
                ClientEvent::Solved { bits, seconds } => {
                    eprintln!("a new session's work: {bits} bits, solved in {seconds:.2} s")
                }
                ClientEvent::SecureRefused { round, why } => {
                    eprintln!("left secure round {round}: {why}")
                }
                ClientEvent::State(_) | ClientEvent::ModelReceived { .. } => {}
            },
            |err, wait| eprintln!("{err}; reconnecting in {:.1}s", wait.as_secs_f64()),
        )
        .await?;
        Ok(())
    })
}

/// A progress bar over `rounds` rounds.
fn rounds_bar(rounds: u64) -> ProgressBar {
    let bar = ProgressBar::new(rounds);
    bar.set_style(
        ProgressStyle::with_template("[{bar:30}] round {pos}/{len}, {elapsed}, ETA {eta} {msg}")
            .expect("valid template"),
    );
    bar
}

/// A line above the bar on a terminal, a plain line in a log.
fn print_above(bar: &ProgressBar, line: String) {
    if bar.is_hidden() {
        println!("{line}")
    } else {
        bar.println(line)
    }
}

pub fn simulate(args: SimulateArgs, data_dir: &Path) -> anyhow::Result<()> {
    let round = settings(args.config.as_deref(), &args.round)?;
    if args.population {
        let state_dir = args.state_dir.clone().expect("clap requires it");
        return population(&args, &round, state_dir, data_dir);
    }
    let temp = std::env::temp_dir().join(format!("folio-simulate-{}", std::process::id()));
    let state_dir = args.state_dir.clone().unwrap_or_else(|| temp.clone());
    let mut config = server_config(&round, "127.0.0.1:0".parse()?, state_dir, data_dir)?;
    config.max_rounds = Some(args.rounds);
    config.web_root = None;
    let clients = args.clients;
    let started = Instant::now();
    let bar = rounds_bar(args.rounds);
    print_above(&bar, RoundRecord::TABLE_HEADER.to_owned());
    let history = folio_sim::loopback::run(config, clients, |record| {
        print_above(&bar, record.table_row());
        bar.set_position(record.round);
    })?;
    bar.finish_and_clear();
    if args.state_dir.is_none() {
        let _ = std::fs::remove_dir_all(&temp);
    }
    let first = history.first().map_or(0.0, |r| r.eval_accuracy);
    let last = history.last().map_or(0.0, |r| r.eval_accuracy);
    println!(
        "{} rounds, {clients} clients: eval accuracy {first:.4} -> {last:.4} in {:.0}s",
        args.rounds,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `folio simulate --population`: every Shakespeare client in this process, with
/// a progress bar and the table of rounds.
fn population(
    args: &SimulateArgs,
    round: &RunSettings,
    state_dir: PathBuf,
    data_dir: &Path,
) -> anyhow::Result<()> {
    let rounds = args.rounds;
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("cannot create {}", state_dir.display()))?;
    round.save(&state_dir)?;
    let sim = folio_sim::population::Population {
        rounds: round.round_config()?,
        preset: round.preset,
        init: round.init(),
        seed: round.seed,
        max_rounds: rounds,
        state_dir: state_dir.clone(),
        data_dir: data_dir.to_owned(),
        validation: args.validation,
        devices: args.devices,
    };
    let bar = rounds_bar(rounds);
    let print = |line: String| print_above(&bar, line);
    let history = folio_sim::population::run(&sim, |progress| match progress {
        Progress::Started { clients, completed } => {
            print(format!(
                "{clients} clients to sample from, {} a round; {completed} of {rounds} rounds done in {}",
                sim.rounds.strategy.clients_per_round,
                state_dir.display()
            ));
            print(RoundRecord::TABLE_HEADER.to_owned());
            bar.set_position(completed.min(rounds));
        }
        Progress::Training { clients } => bar.set_message(format!("{clients} clients training")),
        Progress::Committed(record) => {
            print(record.table_row());
            bar.set_position(record.round);
        }
        Progress::Stopped(why) => print(format!("stopped: {why}")),
    })?;
    bar.finish_and_clear();
    let last = history.last().expect("round 0 at least");
    println!(
        "{} rounds in {}: eval accuracy {:.4}{}",
        last.round,
        state_dir.display(),
        last.eval_accuracy,
        last.population_accuracy
            .map_or_else(String::new, |acc| format!(", population accuracy {acc:.4}"))
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Serve {
        #[command(flatten)]
        args: ServeArgs,
    }

    #[test]
    fn a_settings_file_replaces_the_round_flags_and_excludes_them() {
        let dir = tempfile::tempdir().unwrap();
        let written = Serve::parse_from(["serve", "--preset", "small", "--mode", "async"])
            .args
            .round;
        written.save(dir.path()).unwrap();
        let path = dir.path().join(folio_host::settings::SETTINGS_FILE);
        let config = path.to_str().unwrap();
        let read = Serve::parse_from(["serve", "--config", config]).args;
        assert_eq!(
            settings(read.config.as_deref(), &read.round).unwrap(),
            written
        );
        let both = Serve::try_parse_from(["serve", "--config", config, "--seed", "1"]);
        assert!(both.is_err(), "--config and a round flag at once");
    }
}
