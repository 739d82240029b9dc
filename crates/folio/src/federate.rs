//! `folio serve`, `folio client` and `folio simulate`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use burn::prelude::Device;
use clap::{Args, ValueEnum};
use folio_client::native::WsTransport;
use folio_client::{ClientEvent, ClientOptions};
use folio_fed::{
    AdaptiveClip, Aggregation, Clipping, DpConfig, Encoding, Selection, ServerOptimizerConfig,
    StrategyConfig, StrategyKind, Weighting,
};
use folio_model::Preset;
use folio_proto::Optimizer;
use folio_server::{
    AccessConfig, AsyncRounds, Limits, RoundConfig, RoundRecord, SecureRounds, Server, ServerConfig,
};
use folio_sim::population::Progress;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Clone, Copy, ValueEnum)]
pub enum ServerOpt {
    Fedavg,
    Fedavgm,
    Fedadagrad,
    Fedadam,
    Fedyogi,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StrategyRule {
    Fedavg,
    Krum,
    /// User-level differential privacy: Poisson sampling, every delta clipped to
    /// --clip-bound, Gaussian noise of --noise-multiplier × the bound on the sum.
    DpFedavg,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoundMode {
    Sync,
    Async,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ClientOpt {
    Sgd,
    Adam,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ClipRule {
    /// No bound on an update's norm (undefended; for comparison only).
    Off,
    Fixed,
    /// Follows the median norm of the clients' deltas (Andrew et al. 2021).
    Adaptive,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum AggregationRule {
    Mean,
    TrimmedMean,
    Median,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ModelEncoding {
    F32,
    F16,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum DeltaEncoding {
    F32,
    F16,
    Int8,
}

/// How rounds run. Defaults: the better setup found by `folio simulate` (see the
/// README); `--tutorial` gives the tutorial's.
#[derive(Args, Clone)]
pub struct RoundArgs {
    /// The tutorial's setup: 2 clients, 5 batches, SGD 0.5, FedAvg, eval on 2
    /// batches of King Lear's Lear (overrides the flags below).
    #[arg(long)]
    tutorial: bool,
    #[arg(long, default_value = "seed")]
    preset: Preset,
    /// Initial global model [default: the preset's shipped Dickens model,
    /// models/dickens-PRESET.safetensors]
    #[arg(long, conflicts_with = "fresh")]
    init: Option<PathBuf>,
    /// Start from fresh (seeded random) weights, not a pre-trained model.
    #[arg(long)]
    fresh: bool,
    /// The round's rules: hardened FedAvg, multi-Krum (drops the updates far
    /// from the others; see --byzantine), or DP-FedAvg (see --noise-multiplier).
    #[arg(long, value_enum, default_value = "fedavg")]
    strategy: StrategyRule,
    /// DP-FedAvg: the noise's standard deviation over the clip bound (z).
    #[arg(long, default_value_t = 1.0)]
    noise_multiplier: f64,
    /// DP-FedAvg: δ of the (ε, δ) guarantee [default: 1 / N^1.1 for N clients]
    #[arg(long)]
    dp_delta: Option<f64>,
    /// DP-FedAvg: stop training before a round would spend more than this ε.
    #[arg(long)]
    epsilon_budget: Option<f64>,
    /// DP-FedAvg: let the clip bound follow this quantile of the update norms
    /// (private adaptive clipping, e.g. 0.5); it starts at --clip-bound.
    #[arg(long)]
    dp_adaptive_quantile: Option<f64>,
    /// DP-FedAvg, adaptive: the noise on the count of updates under the bound
    /// [default: clients per round / 20]
    #[arg(long)]
    dp_count_noise: Option<f64>,
    /// DP-FedAvg, adaptive: how fast the bound moves.
    #[arg(long, default_value_t = 0.2)]
    dp_clip_lr: f64,
    /// Updates Krum assumes may be hostile in a round.
    #[arg(long, default_value_t = 0)]
    byzantine: usize,
    #[arg(long, default_value_t = 2)]
    clients_per_round: usize,
    /// Draw each round's clients in proportion to their training text (without
    /// replacement) and average their deltas uniformly: close to training on
    /// everyone's text pooled, without one large client's many local steps
    /// dominating its round.
    #[arg(long)]
    sample_by_size: bool,
    /// Connected clients needed to start a round [default: --clients-per-round]
    #[arg(long)]
    min_clients: Option<usize>,
    /// Updates that close a round at its deadline [default: half the round, at least 1]
    #[arg(long)]
    quorum: Option<usize>,
    /// How long a round (an asynchronous task) waits for its clients; a
    /// --population run without --devices has none to wait for and ignores it.
    #[arg(long, default_value_t = 600.0)]
    deadline_secs: f64,
    #[arg(long, default_value_t = 1)]
    local_epochs: u32,
    /// Batches per local epoch (0: all).
    #[arg(long, default_value_t = 5)]
    max_batches: u32,
    /// Sequences per local batch (of 100 characters each): fewer give a client
    /// more local steps over the same text.
    #[arg(long, default_value_t = 8)]
    batch_size: u32,
    #[arg(long, value_enum, default_value = "sgd")]
    client_optimizer: ClientOpt,
    #[arg(long, default_value_t = 0.1)]
    client_lr: f32,
    /// Halve the client learning rate from each of these rounds on (e.g. 250,600).
    #[arg(long, value_delimiter = ',')]
    client_lr_halve_at: Vec<u64>,
    #[arg(long)]
    clip_norm: Option<f32>,
    #[arg(long, value_enum, default_value = "fedavg")]
    server_optimizer: ServerOpt,
    #[arg(long, default_value_t = 1.0)]
    server_lr: f32,
    /// FedAvgM momentum, or β1 of the adaptive optimizers.
    #[arg(long, default_value_t = 0.9)]
    server_momentum: f32,
    /// τ of the adaptive optimizers: per-coordinate scales below it are not
    /// normalised (set it under the deltas' typical size for Adam-like steps).
    #[arg(long, default_value_t = 1e-3)]
    server_tau: f32,
    /// β2 of FedAdam and FedYogi: how many rounds (≈ 1 / (1 − β2)) the second
    /// moment averages.
    #[arg(long, default_value_t = 0.99)]
    server_beta2: f32,
    /// Correct FedAdam's moments for their zero start, as Adam does (keeps its
    /// first rounds' steps from being inflated, above all with --server-beta2
    /// near 1).
    #[arg(long)]
    server_bias_correction: bool,
    #[arg(long, value_enum, default_value = "f32")]
    encoding: DeltaEncoding,
    /// How the global model goes down to the clients each round: f16 halves the
    /// bytes (the clients train from, and report against, what they received).
    #[arg(long, value_enum, default_value = "f16")]
    model_encoding: ModelEncoding,
    /// How the server bounds each delta's L2 norm.
    #[arg(long, value_enum, default_value = "adaptive")]
    clip: ClipRule,
    /// The L2 bound (fixed), or the most the first round's median norm may set
    /// it to (adaptive).
    #[arg(long, default_value_t = 1.0)]
    clip_bound: f32,
    /// The adaptive bound never grows past this multiple of the first round's.
    #[arg(long, default_value_t = folio_fed::robust::DEFAULT_CEILING)]
    clip_ceiling: f32,
    /// How the round's (clipped) deltas are combined.
    #[arg(long, value_enum, default_value = "mean")]
    aggregation: AggregationRule,
    /// The fraction trimmed at each end by --aggregation trimmed-mean.
    #[arg(long, default_value_t = 0.1)]
    trim: f32,
    /// Weight client deltas uniformly rather than by examples.
    #[arg(long)]
    uniform: bool,
    /// Central evaluation on the test split of this many clients...
    #[arg(long, default_value_t = 8)]
    eval_clients: usize,
    /// ...this many batches each.
    #[arg(long, default_value_t = 2)]
    eval_batches: usize,
    /// Evaluate on this client's first training batches instead.
    #[arg(long)]
    eval_client: Option<String>,
    /// Also evaluate on every client's test split after every this many rounds
    /// and the last (0: never; `small` takes seconds, `seed` minutes).
    #[arg(long, default_value_t = 0)]
    population_eval_every: u64,
    /// Secure aggregation: the server learns only each round's sum. Clients
    /// clip their own deltas to --clip-bound (fixed clipping), the mean is
    /// the aggregation.
    #[arg(long)]
    secure_aggregation: bool,
    /// Shares that rebuild a client's secrets in a secure round (default: a
    /// majority of the client and its neighbours). More tolerates fewer
    /// dropouts; fewer tolerates fewer colluding clients.
    #[arg(long)]
    secagg_threshold: Option<u32>,
    /// Neighbours each client masks with in a secure round: 0 for every other
    /// client (SecAgg), k for SecAgg+'s random k-regular graph (cheaper for
    /// large rounds; at most 254).
    #[arg(long, default_value_t = 0)]
    secagg_degree: u32,
    /// How long a secure round's key, share and unmasking steps wait for
    /// stragglers (seconds).
    #[arg(long, default_value_t = 30.0)]
    secagg_step_secs: f64,
    /// Synchronous rounds, or asynchronous ones (FedBuff): clients train
    /// continuously, --clients-per-round at once, each on the latest model it
    /// was given, and the global model steps every --buffer updates.
    #[arg(long, value_enum, default_value = "sync")]
    mode: RoundMode,
    /// Asynchronous rounds: updates per step of the global model (K).
    #[arg(long, default_value_t = 10)]
    buffer: usize,
    /// Asynchronous rounds: an update counts 1/√(1 + s) for the s steps the
    /// global model moved since its model, and is refused past this many.
    #[arg(long, default_value_t = 4)]
    max_staleness: u64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl RoundArgs {
    pub fn round_config(&self) -> RoundConfig {
        if self.tutorial {
            return RoundConfig {
                eval_client: Some("THE_TRAGEDY_OF_KING_LEAR_LEAR".into()),
                ..RoundConfig::tutorial()
            };
        }
        let (lr, beta1) = (self.server_lr, self.server_momentum);
        let (beta2, tau) = (self.server_beta2, self.server_tau);
        let server_optimizer = match self.server_optimizer {
            ServerOpt::Fedavg => ServerOptimizerConfig::FedAvg { lr },
            ServerOpt::Fedavgm => ServerOptimizerConfig::FedAvgM {
                lr,
                momentum: beta1,
            },
            ServerOpt::Fedadagrad => ServerOptimizerConfig::FedAdagrad { lr, beta1, tau },
            ServerOpt::Fedadam => ServerOptimizerConfig::FedAdam {
                lr,
                beta1,
                beta2,
                tau,
                bias_correction: self.server_bias_correction,
            },
            ServerOpt::Fedyogi => ServerOptimizerConfig::FedYogi {
                lr,
                beta1,
                beta2,
                tau,
            },
        };
        let strategy = StrategyConfig {
            kind: match self.strategy {
                StrategyRule::Fedavg => StrategyKind::FedAvg,
                StrategyRule::Krum => StrategyKind::Krum,
                StrategyRule::DpFedavg => StrategyKind::DpFedAvg,
            },
            byzantine: self.byzantine,
            clients_per_round: self.clients_per_round,
            min_clients: self.min_clients.unwrap_or(self.clients_per_round),
            quorum: self.quorum.unwrap_or(self.clients_per_round.div_ceil(2)),
            selection: if self.sample_by_size {
                Selection::BySize
            } else {
                Selection::Uniform
            },
            weighting: if self.uniform || self.sample_by_size {
                Weighting::Uniform
            } else {
                Weighting::Examples
            },
            clipping: match self.clip {
                // Both clip every delta to a bound known before the round.
                _ if self.strategy == StrategyRule::DpFedavg || self.secure_aggregation => {
                    Clipping::Fixed {
                        bound: self.clip_bound,
                    }
                }
                ClipRule::Off => Clipping::Off,
                ClipRule::Fixed => Clipping::Fixed {
                    bound: self.clip_bound,
                },
                ClipRule::Adaptive => Clipping::adaptive_to(self.clip_bound, self.clip_ceiling),
            },
            aggregation: match self.aggregation {
                AggregationRule::Mean => Aggregation::Mean,
                AggregationRule::TrimmedMean => Aggregation::TrimmedMean { trim: self.trim },
                AggregationRule::Median => Aggregation::Median,
            },
            server_optimizer,
            dp: DpConfig {
                noise_multiplier: self.noise_multiplier,
                delta: self.dp_delta,
                epsilon_budget: self.epsilon_budget,
                adaptive: self.dp_adaptive_quantile.map(|quantile| AdaptiveClip {
                    quantile,
                    count_noise: self
                        .dp_count_noise
                        .unwrap_or(self.clients_per_round as f64 / 20.0),
                    learning_rate: self.dp_clip_lr,
                }),
            },
        };
        RoundConfig {
            strategy,
            deadline: Duration::from_secs_f64(self.deadline_secs),
            local_epochs: self.local_epochs,
            max_batches: (self.max_batches > 0).then_some(self.max_batches),
            batch_size: self.batch_size,
            seq_len: 100,
            client_optimizer: match self.client_optimizer {
                ClientOpt::Sgd => Optimizer::Sgd,
                ClientOpt::Adam => Optimizer::Adam,
            },
            client_lr: self.client_lr,
            client_lr_halvings: self.client_lr_halve_at.clone(),
            clip_norm: self.clip_norm,
            delta_encoding: match self.encoding {
                DeltaEncoding::F32 => Encoding::F32,
                DeltaEncoding::F16 => Encoding::F16,
                DeltaEncoding::Int8 => Encoding::Int8,
            },
            model_encoding: match self.model_encoding {
                ModelEncoding::F32 => Encoding::F32,
                ModelEncoding::F16 => Encoding::F16,
            },
            eval_clients: self.eval_clients,
            eval_batches: self.eval_batches,
            eval_client: self.eval_client.clone(),
            population_eval_every: (self.population_eval_every > 0)
                .then_some(self.population_eval_every),
            secure: self.secure_aggregation.then(|| SecureRounds {
                threshold: self.secagg_threshold,
                degree: self.secagg_degree,
                step_timeout: Duration::from_secs_f64(self.secagg_step_secs.max(0.001)),
            }),
            asynchronous: (self.mode == RoundMode::Async).then_some(AsyncRounds {
                buffer: self.buffer,
                max_staleness: self.max_staleness,
            }),
        }
    }

    /// The model to start from; `None`: fresh weights.
    pub fn init(&self) -> Option<PathBuf> {
        if self.fresh {
            return None;
        }
        Some(self.init.clone().unwrap_or_else(|| {
            PathBuf::from(format!("models/dickens-{}.safetensors", self.preset.name()))
        }))
    }
}

#[derive(Args)]
pub struct ServeArgs {
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: std::net::SocketAddr,
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
    #[command(flatten)]
    round: RoundArgs,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ClusterRole {
    Edge,
    Root,
}

/// A secret from a file (trailing newline dropped) or else an environment
/// variable; never from the command line, which other users can read.
pub fn secret(file: Option<&Path>, env: &str) -> anyhow::Result<Option<String>> {
    let value = match file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the token file {}", path.display()))?
                .trim_end_matches(['\n', '\r'])
                .to_owned(),
        ),
        None => std::env::var(env).ok(),
    };
    match value {
        Some(token) if token.is_empty() => {
            anyhow::bail!("the token from {env} or its file is empty")
        }
        Some(token) if token.len() > folio_server::limits::MAX_TOKEN_BYTES => anyhow::bail!(
            "the token from {env} or its file is above {} bytes",
            folio_server::limits::MAX_TOKEN_BYTES
        ),
        other => Ok(other),
    }
}

#[derive(Args)]
pub struct ClientArgs {
    /// The aggregator; repeated (a cluster's edges), the next is tried whenever
    /// connecting to one fails.
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    server: Vec<String>,
    /// Train as this Shakespeare client.
    #[arg(long)]
    client: Option<String>,
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
    #[command(flatten)]
    round: RoundArgs,
}

fn server_config(
    round: &RoundArgs,
    addr: std::net::SocketAddr,
    state_dir: PathBuf,
    data_dir: &Path,
) -> ServerConfig {
    ServerConfig {
        addr,
        state_dir,
        data_dir: data_dir.to_owned(),
        web_root: Path::new("index.html").exists().then(|| PathBuf::from(".")),
        preset: round.preset,
        init: round.init(),
        rounds: round.round_config(),
        seed: round.seed,
        access: AccessConfig::default(),
        limits: Limits::default(),
        max_rounds: None,
    }
}

pub fn serve(args: ServeArgs, data_dir: &Path) -> anyhow::Result<()> {
    let state_dir = args
        .state_dir
        .unwrap_or_else(|| Path::new("data/state").join(args.round.preset.name()));
    let mut config = server_config(&args.round, args.addr, state_dir, data_dir);
    config.access = AccessConfig {
        join_token: secret(args.join_token_file.as_deref(), "FOLIO_JOIN_TOKEN")?,
        admin_token: secret(args.admin_token_file.as_deref(), "FOLIO_ADMIN_TOKEN")?,
        allowed_origins: args.allow_origin,
        check_devices: !args.skip_device_check,
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
        anyhow::ensure!(
            args.round.mode == RoundMode::Sync,
            "a cluster runs synchronous rounds: drop --mode async or --role"
        );
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
                        "folio edge {name} on http://{} (WebSocket {}), rounds from the root",
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
            "folio aggregator on http://{0} (WebSocket ws://{0}/ws, status http://{0}/api/status)",
            server.addr
        );
        println!(
            "open http://{} in several tabs, or run `folio client` in several terminals",
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
async fn follow(server: &Server, rounds: Option<u64>) {
    println!("{TABLE_HEADER}");
    let mut shown = 0;
    let mut stop = std::pin::pin!(stop_signal());
    loop {
        for record in server.history_from(shown) {
            println!("{}", row(&record));
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
    println!("{TABLE_HEADER}");
    let mut records = root.records();
    let mut stop = std::pin::pin!(stop_signal());
    let mut finished = std::pin::pin!(root.join());
    loop {
        tokio::select! {
            changed = records.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                if let Some(record) = records.borrow_and_update().clone() {
                    println!("{}", row(&record));
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
    options.join.token = secret(args.token_file.as_deref(), "FOLIO_JOIN_TOKEN")?;
    runtime.block_on(async {
        folio_client::native::run_reconnecting(
            &args.server,
            &Device::flex(),
            &options,
            |event| match event {
                ClientEvent::Welcomed {
                    client_id,
                    train_chars,
                    ..
                } => {
                    println!("training as {client_id} ({train_chars} chars of lines)")
                }
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

pub const TABLE_HEADER: &str = "round  clients  train loss  train acc  eval loss  eval acc    bytes up   seconds  population acc";

pub fn row(r: &RoundRecord) -> String {
    let opt = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.4}"));
    format!(
        "{:>5}  {:>7}  {:>10}  {:>9}  {:>9.4}  {:>8.4}  {:>10}  {:>8.1}",
        r.round,
        r.clients,
        opt(r.train_loss),
        opt(r.train_accuracy),
        r.eval_loss,
        r.eval_accuracy,
        r.bytes_up,
        r.seconds
    ) + &r
        .population_accuracy
        .map_or_else(String::new, |acc| format!("  {acc:>14.4}"))
        + &r.epsilon
            .map_or_else(String::new, |e| format!("  ε {e:.3}"))
}

pub fn simulate(args: SimulateArgs, data_dir: &Path) -> anyhow::Result<()> {
    if args.population {
        let state_dir = args.state_dir.clone().expect("clap requires it");
        return population(&args, state_dir, data_dir);
    }
    let temp = std::env::temp_dir().join(format!("folio-simulate-{}", std::process::id()));
    let state_dir = args.state_dir.clone().unwrap_or_else(|| temp.clone());
    let mut config = server_config(&args.round, "127.0.0.1:0".parse()?, state_dir, data_dir);
    config.max_rounds = Some(args.rounds);
    config.web_root = None;
    let clients = args.clients;
    anyhow::ensure!(
        clients >= config.rounds.strategy.min_clients,
        "{clients} clients can never start a round that needs {}",
        config.rounds.strategy.min_clients
    );
    let runtime = tokio::runtime::Runtime::new()?;
    let started = Instant::now();
    let history = runtime.block_on(async {
        let server = Server::start(config)
            .await
            .context("starting the aggregator")?;
        let url = format!("ws://{}/ws", server.addr);
        let mut threads: Vec<_> = (0..clients)
            .map(|_| {
                let url = url.clone();
                // Training is CPU work: each client gets its own thread and runtime.
                std::thread::spawn(move || -> anyhow::Result<()> {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    runtime.block_on(async {
                        let mut transport = WsTransport::connect(&url).await?;
                        folio_client::run(
                            &mut transport,
                            &Device::flex(),
                            &ClientOptions::native(),
                            |_| {},
                        )
                        .await?;
                        Ok(())
                    })
                })
            })
            .collect();
        let bar = rounds_bar(args.rounds);
        let print = |line: String| print_above(&bar, line);
        print(TABLE_HEADER.to_owned());
        let mut shown = 0;
        while shown <= args.rounds as usize {
            let history = server.history();
            for record in &history[shown.min(history.len())..] {
                print(row(record));
                bar.set_position(record.round);
            }
            shown = history.len();
            if let Some(finished) = threads.iter().position(|t| t.is_finished())
                && shown <= args.rounds as usize
            {
                let outcome = threads.swap_remove(finished).join();
                let why = match outcome {
                    Ok(Err(err)) => format!("{err:#}"),
                    Ok(Ok(())) => "the server closed its connection".to_owned(),
                    Err(_) => "it panicked".to_owned(),
                };
                anyhow::bail!("a client stopped before the last round: {why}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bar.finish_and_clear();
        let history = server.history();
        server.shutdown().await;
        anyhow::Ok(history)
    })?;
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
fn population(args: &SimulateArgs, state_dir: PathBuf, data_dir: &Path) -> anyhow::Result<()> {
    let (round, rounds) = (&args.round, args.rounds);
    let sim = folio_sim::population::Population {
        rounds: round.round_config(),
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
            print(TABLE_HEADER.to_owned());
            bar.set_position(completed.min(rounds));
        }
        Progress::Training { clients } => bar.set_message(format!("{clients} clients training")),
        Progress::Committed(record) => {
            print(row(record));
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
