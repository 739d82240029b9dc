//! The aggregator: Federated Averaging over WebSocket, for untrusted clients. A
//! host of the round engine ([`folio_engine`]), which owns every rule of the
//! rounds; this crate carries frames, runs the engine's heavy jobs and keeps its
//! state on disk.
//!
//! The folder follows the work: `net` (TCP: connection caps, idle timeouts),
//! `http` (the page, status, history, model, admin API), `ws` (one client
//! connection), `outbox` (its bounded queue), `access` (tokens, origins,
//! lockouts), `driver` (the engine's actions and clock), `limits` (every
//! bound). Start-up, evaluation and durable state are every host's, in
//! `folio_host`.
//!
//! A server plays one of two roles: the whole federation ([`Server::start`]) or
//! a cluster's edge ([`Server::start_edge`]), each over its own engine type.

pub mod access;
pub mod acme;
pub mod config;
mod driver;
mod http;
pub mod limits;
mod metrics;
pub mod net;
pub mod outbox;
pub mod proxy;
pub mod tls;
pub mod work;
mod ws;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use folio_data::Corpus;
use folio_engine::{Edge, Engine, EngineConfig, Entropy, Start, Whole};
use folio_host::{eval, state};
use folio_model::ModelConfig;
use folio_model::checkpoint::{self, Precision};
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;

pub use access::AccessConfig;
pub use config::{DataSource, RoundConfig, ServerConfig};
use driver::Delivery;
pub use driver::Served;
pub use folio_engine::{AsyncRounds, FederatedEval, RoundRecord, SecureRounds};
pub use limits::Limits;
use net::{CappedListener, ConnectionCount};
pub use tls::TlsConfig;

pub struct Shared<R: Served> {
    engine: Mutex<Engine<R>>,
    /// The engine's actions, and connections coming and going, in order.
    deliveries: mpsc::UnboundedSender<Delivery<R>>,
    /// The engine may have a new timeout.
    wake: Notify,
    evaluator: Arc<eval::Evaluator>,
    /// The Shakespeare corpus the simulation hands out; `None` where devices
    /// bring their own text (the server holds none).
    corpus: Option<Arc<Corpus>>,
    model: ModelConfig,
    /// The starting model as a model file (f16).
    start_model: Bytes,
    config: ServerConfig,
    limits: Limits,
    access: access::Access,
    connections: Arc<ConnectionCount>,
    max_frame_bytes: usize,
    /// The tensors' lengths: the delta codecs' unit.
    segments: Vec<usize>,
    /// The number of completed rounds, for whoever waits on progress.
    completed: watch::Sender<u64>,
    /// Set when the server finishes: connections close cleanly.
    closing: watch::Sender<bool>,
    /// WebSocket connections open.
    websockets: watch::Sender<usize>,
    /// Held (shared) while a commit is saved; shutting down waits for it.
    saving: tokio::sync::RwLock<()>,
    /// An edge's folded shares, for its link to the root.
    parts: Option<mpsc::UnboundedSender<Share>>,
    /// A cluster's edges (their WebSocket URLs), for tabs to fail over to.
    edges: Mutex<Vec<String>>,
    /// Sums over the committed rounds, for `/metrics`.
    round_totals: Mutex<metrics::RoundTotals>,
    /// Device checks' reference computations running at once: however many
    /// devices answer together, the memory they take stays bounded.
    probe_slots: tokio::sync::Semaphore,
    /// What public surfaces and logs show (fixed by the settings).
    release: folio_engine::Release,
}

/// Device checks computed at once (each holds a model and its gradients).
const PROBES_AT_ONCE: usize = 2;

/// An edge's share of a round: what its sessions reported, and their deltas folded.
pub type Share = (folio_engine::ShareReport, folio_fed::Partial);

/// Where a cluster's edge starts: the root's last commit.
pub struct EdgeStart {
    pub start: Start,
    /// Round 0's weights: the model the federation started from.
    pub first: Vec<f32>,
    /// Where the edge's shares go, for its link to the root.
    pub parts: mpsc::UnboundedSender<Share>,
}

impl<R: Served> Shared<R> {
    fn lock(&self) -> MutexGuard<'_, Engine<R>> {
        // A panic while holding the lock is a bug; the engine is still consistent
        // (every method leaves it so before it can panic), so keep serving.
        self.engine
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs an event through the engine and hands the actions it queued to the
    /// dispatcher, in order, before the lock is released. Nothing heavy runs here.
    fn engine<T>(&self, event: impl FnOnce(&mut Engine<R>) -> T) -> T {
        let mut engine = self.lock();
        let result = event(&mut engine);
        while let Some(action) = engine.poll_action() {
            self.deliver(Delivery::Action(action));
        }
        drop(engine);
        self.wake.notify_one();
        result
    }

    /// Counts a frame's bytes: no action, no new timeout, so the clock is left
    /// asleep (every frame comes through here).
    fn count_bytes(&self, session: u64, up: u64, down: u64) {
        self.lock().add_bytes(session, up, down);
    }

    /// Reads the engine without moving it.
    fn read<T>(&self, read: impl FnOnce(&Engine<R>) -> T) -> T {
        read(&self.lock())
    }

    fn deliver(&self, delivery: Delivery<R>) {
        // Only fails once the dispatcher is gone, when the server stops.
        let _ = self.deliveries.send(delivery);
    }
}

/// A running aggregator: the whole federation, or a cluster's edge.
pub struct Server<R: Served = Whole> {
    pub addr: SocketAddr,
    shared: Arc<Shared<R>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Server {
    /// Loads the corpus and the model (or the saved state), binds, and starts
    /// serving and running rounds.
    pub async fn start(config: ServerConfig) -> anyhow::Result<Server> {
        let model = config.preset.config();
        std::fs::create_dir_all(&config.state_dir).with_context(|| {
            format!("cannot create the state dir {}", config.state_dir.display())
        })?;
        let first =
            folio_host::starting_weights(model, config.init.as_deref(), config.seed).await?;
        let start = folio_host::resume_or(&config.state_dir, model.num_params(), first.clone())?;
        Self::serve(config, start, first, None).await
    }
}

impl Server<Edge> {
    /// Starts a cluster's edge from the root's last commit: it serves its
    /// sessions and hands each round's share to `edge.parts`; the round orders
    /// and commits come in through its [`Handle`].
    pub async fn start_edge(config: ServerConfig, edge: EdgeStart) -> anyhow::Result<Self> {
        Self::serve(config, edge.start, edge.first, Some(edge.parts)).await
    }

    /// A handle to the running engine, for a cluster's link to its root.
    pub fn handle(&self) -> Handle {
        Handle(self.shared.clone())
    }
}

impl<R: Served> Server<R> {
    /// Builds the engine from `start` (`first`: round 0's weights, kept for the
    /// page's side-by-side generator however far the rounds have gone), binds,
    /// and starts serving and running rounds.
    async fn serve(
        config: ServerConfig,
        start: Start,
        first: Vec<f32>,
        parts: Option<mpsc::UnboundedSender<Share>>,
    ) -> anyhow::Result<Self> {
        let corpus = match config.data {
            DataSource::Shakespeare => Some(Arc::new(Corpus::load(
                &config.data_dir.join("shakespeare"),
            )?)),
            DataSource::Device => None,
        };
        let model = config.preset.config();
        let start_model = Bytes::from(checkpoint::encode(
            model,
            &first,
            Precision::F16,
            &BTreeMap::from([("round".to_owned(), "0".to_owned())]),
        )?);
        let limits = fit_to_file_limit(config.limits.clone());
        let engine_config = EngineConfig {
            max_sessions: limits.max_sessions,
            session_ttl: limits.session_ttl,
            new_sessions: limits.new_sessions,
            max_rounds: config.max_rounds,
            check_devices: config.access.check_devices,
            data: config.data,
            ..folio_host::engine_config(
                config.preset,
                config.rounds.clone(),
                config.seed,
                Entropy::from_os(),
            )
        };
        let clients = corpus
            .as_deref()
            .map(folio_host::corpus_clients)
            .unwrap_or_default();
        let engine = folio_host::build_engine(engine_config, clients, start)?;
        let evaluator = Arc::new(match &corpus {
            Some(corpus) => eval::Evaluator::new(model, corpus, &config.rounds, config.seed)?,
            None => eval::Evaluator::without_text(model),
        });
        let completed = engine.completed_rounds();
        let tls = config.tls.as_ref().map(tls::start).transpose()?;
        let listener = TcpListener::bind(config.addr).await.with_context(|| {
            format!(
                "cannot listen on {}: is another server running?",
                config.addr
            )
        })?;
        let addr = listener.local_addr()?;
        let connections = Arc::new(ConnectionCount::new(net::Caps {
            total: limits.max_connections,
            per_address: limits.max_connections_per_address,
            per_network: limits.max_connections_per_network,
        }));
        let listener = CappedListener::new(
            listener,
            connections.clone(),
            limits.http_idle,
            config.access.trusted_proxies.clone(),
        );
        let (deliveries, delivered) = mpsc::unbounded_channel();
        let release = engine.release();
        let shared = Arc::new(Shared {
            release,
            engine: Mutex::new(engine),
            deliveries,
            wake: Notify::new(),
            evaluator,
            corpus,
            model,
            start_model,
            access: access::Access::new(
                config.access.clone(),
                limits.token_lockout,
                limits.max_token_lockout,
            ),
            limits,
            connections,
            max_frame_bytes: limits::max_frame_bytes(model.num_params()),
            segments: folio_host::segments(model),
            completed: watch::channel(completed).0,
            closing: watch::channel(false).0,
            websockets: watch::channel(0).0,
            saving: tokio::sync::RwLock::new(()),
            probe_slots: tokio::sync::Semaphore::new(PROBES_AT_ONCE),
            parts,
            edges: Mutex::new(Vec::new()),
            round_totals: Mutex::default(),
            config,
        });
        let router = http::router(shared.clone());
        let (acceptor, reloader) = match tls {
            Some(tls) => (Some(tls.acceptor), Some(tls.reloader)),
            None => (None, None),
        };
        let http = tokio::spawn(net::serve(
            listener,
            acceptor,
            router,
            shared.limits.header_timeout,
            shared.closing.subscribe(),
        ));
        // The engine queued its first actions (round 0's evaluation) when made.
        shared.engine(|_| ());
        let dispatcher = tokio::spawn(driver::dispatch(shared.clone(), delivered));
        let clock = tokio::spawn(driver::clock(shared.clone()));
        let mut tasks = vec![http, dispatcher, clock];
        tasks.extend(reloader);
        Ok(Server {
            addr,
            shared,
            tasks,
        })
    }

    /// Waits until `rounds` rounds are complete (counting rounds before a restart).
    pub async fn wait_for_round(&self, rounds: u64) {
        let mut completed = self.shared.completed.subscribe();
        let _ = completed.wait_for(|&done| done >= rounds).await;
    }

    /// Every committed round, from round 0.
    pub fn history(&self) -> Vec<RoundRecord> {
        self.history_from(0)
    }

    /// The committed rounds from `round` on.
    pub fn history_from(&self, round: u64) -> Vec<RoundRecord> {
        self.shared.read(|e| e.history(round, usize::MAX).to_vec())
    }

    pub fn weights(&self) -> Vec<f32> {
        self.shared.read(|e| e.weights().to_vec())
    }

    /// The status in full (the operator's view).
    pub fn status(&self) -> serde_json::Value {
        serde_json::to_value(http::status(
            &self.shared,
            folio_engine::Release::Full,
            None,
        ))
        .expect("the status serialises")
    }

    /// What this federation's public surfaces show.
    pub fn release(&self) -> folio_engine::Release {
        self.shared.release
    }

    /// Open TCP connections.
    pub fn open_connections(&self) -> u64 {
        self.shared.connections.open()
    }

    /// Stops cleanly: no new connections; every client is sent what is queued for
    /// it and a close frame; a commit being saved is finished (an open round is
    /// abandoned: it was never committed, and runs again after a restart).
    pub async fn shutdown(self) {
        self.shared.closing.send_replace(true);
        let mut open = self.shared.websockets.subscribe();
        // Each connection's writer gets a second for its last frames.
        let _ =
            tokio::time::timeout(Duration::from_secs(2), open.wait_for(|&open| open == 0)).await;
        let shared = self.shared.clone();
        let _saved = shared.saving.write().await;
        self.abort();
    }

    /// Stops serving at once, as a killed process would (the last commit stays).
    pub fn abort(self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// What a cluster's edge does to its server's engine.
#[derive(Clone)]
pub struct Handle(Arc<Shared<Edge>>);

impl Handle {
    /// Starts the round the root ordered (its sessions are this edge's own).
    pub fn order(&self, order: &folio_engine::RoundOrder) -> Result<(), folio_engine::EngineError> {
        self.0.engine(|e| e.order(order, Instant::now()))
    }

    /// Takes the root's commit as the global model, the records of rounds
    /// committed since the last one adopted (`missed`) into the history first.
    pub fn adopt(&self, missed: Vec<RoundRecord>, record: RoundRecord, weights: Vec<f32>) {
        let round = record.round;
        self.0.engine(|e| {
            e.fill_history(missed);
            e.adopt(record, weights, Instant::now())
        });
        self.0.completed.send_replace(round);
    }

    /// The sessions connected here, as a round's candidates, with the
    /// Shakespeare client each trains as.
    pub fn candidates(&self) -> Vec<(folio_fed::Candidate, String)> {
        self.0.read(|e| {
            e.candidates()
                .into_iter()
                .map(|c| (c, e.client_of(c.client).unwrap_or_default().to_owned()))
                .collect()
        })
    }

    /// The fingerprint of the global model served.
    pub fn fingerprint(&self) -> u64 {
        self.0.read(|e| e.fingerprint())
    }

    /// The cluster's live edges: in `/api/status`, and their pages may open
    /// this edge's WebSocket.
    pub fn set_edges(&self, urls: Vec<String>) {
        self.0.access.set_peers(&urls);
        if let Ok(mut edges) = self.0.edges.lock() {
            *edges = urls;
        }
    }
}

/// File descriptors kept free for the listener, state files and the like.
const SPARE_FILES: u64 = 64;

/// Raises the open-files limit to what the system allows and keeps the connection
/// cap under it, so that a flood of sockets meets the cap, not `accept` failing.
fn fit_to_file_limit(mut limits: Limits) -> Limits {
    let Ok(files) = rlimit::increase_nofile_limit(u64::MAX) else {
        return limits;
    };
    let room = files
        .saturating_sub(SPARE_FILES + net::HTTP_ROOM.total as u64)
        .max(1) as usize;
    if limits.max_connections > room {
        tracing::warn!(
            "{} connections asked for, but only {files} open files are allowed: \
             at most {room} connections (raise `ulimit -n` for more)",
            limits.max_connections
        );
        limits.max_connections = room;
    }
    limits
}
