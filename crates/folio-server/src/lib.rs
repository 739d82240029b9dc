//! The aggregator: Federated Averaging over WebSocket, for untrusted clients.
//!
//! The folder follows the work: `net` (TCP: connection caps, idle timeouts),
//! `http` (the page, status, model, admin API), `ws` (one client connection),
//! `access` (tokens, origins, lockouts), `sessions`, `round` (one round's
//! bookkeeping), `federation` (state and round state machine), `driver` (runs
//! rounds, evaluates, commits), `state` (atomic commits), `limits` (every bound).
//! The round's decisions live in [`folio_fed::Strategy`].

pub mod access;
pub mod config;
mod driver;
pub mod federation;
mod http;
pub mod limits;
pub mod net;
pub mod record;
pub mod round;
pub mod sessions;
pub mod state;
mod ws;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context;
use burn::prelude::Device;
use bytes::Bytes;
use folio_data::batch::batches;
use folio_data::{Batch, BatchConfig, Corpus, vocab};
use folio_fed::sampling::sample_clients;
use folio_model::CharRnn;
use folio_model::checkpoint::{self, Precision};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use access::AccessConfig;
pub use config::{RoundConfig, ServerConfig};
use federation::{Federation, FederationInit};
pub use limits::Limits;
use net::{CappedListener, ConnectionCount, PeerInfo};
pub use record::RoundRecord;

pub struct Shared {
    fed: Mutex<Federation>,
    corpus: Arc<Corpus>,
    eval_batches: Vec<Batch>,
    /// Every client's test ids, when the population is evaluated.
    population: Vec<Vec<u32>>,
    /// The starting model as a model file (f16).
    start_model: Bytes,
    config: ServerConfig,
    limits: Limits,
    access: access::Access,
    connections: Arc<ConnectionCount>,
    max_frame_bytes: usize,
    /// The number of completed rounds, for whoever waits on progress.
    completed: watch::Sender<u64>,
    /// Set when the server finishes: connections close cleanly.
    closing: watch::Sender<bool>,
}

impl Shared {
    fn fed(&self) -> MutexGuard<'_, Federation> {
        // A panic while holding the lock is a bug; the state is still consistent
        // (every method leaves it so before it can panic), so keep serving.
        self.fed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A running aggregator.
pub struct Server {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl Server {
    /// Loads the corpus and the model (or the saved state), binds, and starts
    /// serving and running rounds.
    pub async fn start(config: ServerConfig) -> anyhow::Result<Server> {
        config
            .rounds
            .validate()
            .map_err(|why| anyhow::anyhow!("inconsistent round settings: {why}"))?;
        let corpus = Arc::new(Corpus::load(&config.data_dir.join("shakespeare"))?);
        let model = config.preset.config();
        std::fs::create_dir_all(&config.state_dir).with_context(|| {
            format!("cannot create the state dir {}", config.state_dir.display())
        })?;
        let rounds = &config.rounds;
        // The model the federation starts from, kept for the page's side-by-side
        // generator however far the rounds have gone.
        let start = match &config.init {
            Some(path) => {
                checkpoint::load(path, Some(model))
                    .with_context(|| format!("cannot start from {}", path.display()))?
                    .weights
            }
            None => {
                CharRnn::init(model, config.seed, &Device::flex())
                    .to_flat()
                    .await?
            }
        };
        let start_model = Bytes::from(checkpoint::encode(
            model,
            &start,
            Precision::F16,
            &BTreeMap::from([("round".to_owned(), "0".to_owned())]),
        )?);
        let (weights, strategy_state, history) = match state::load(
            &config.state_dir,
            rounds.strategy.server_optimizer,
            model.num_params(),
        )? {
            Some(saved) => {
                // The history file is a copy: make it match what was committed.
                state::write_history(&config.state_dir, &saved.history)?;
                (saved.weights, saved.strategy, saved.history)
            }
            None => (start, None, Vec::new()),
        };
        let completed = history.last().map_or(0, |r| r.round);
        let eval_batches = eval_batches(&corpus, rounds, config.seed)?;
        let population = match rounds.population_eval_every {
            Some(_) => population_ids(&corpus),
            None => Vec::new(),
        };
        let limits = fit_to_file_limit(config.limits.clone());
        let fed = Federation::new(FederationInit {
            model,
            preset: config.preset.to_string(),
            config: rounds.clone(),
            limits: limits.clone(),
            seed: config.seed,
            corpus: corpus.clone(),
            weights,
            state: strategy_state,
            history,
        });
        let listener = TcpListener::bind(config.addr).await.with_context(|| {
            format!(
                "cannot listen on {}: is another server running?",
                config.addr
            )
        })?;
        let addr = listener.local_addr()?;
        let connections = Arc::new(ConnectionCount::default());
        let listener = CappedListener::new(
            listener,
            connections.clone(),
            limits.max_connections,
            limits.max_connections_per_address,
            limits.http_idle,
        );
        let shared = Arc::new(Shared {
            fed: Mutex::new(fed),
            corpus,
            eval_batches,
            population,
            start_model,
            access: access::Access::new(
                config.access.clone(),
                limits.token_lockout,
                limits.max_token_lockout,
            ),
            limits,
            connections,
            max_frame_bytes: limits::max_frame_bytes(model.num_params()),
            completed: watch::channel(completed).0,
            closing: watch::channel(false).0,
            config,
        });
        let router = http::router(shared.clone());
        let http = tokio::spawn(async move {
            let service = router.into_make_service_with_connect_info::<PeerInfo>();
            if let Err(err) = axum::serve(listener, service).await {
                eprintln!("error: the HTTP server stopped: {err}");
            }
        });
        let driver = tokio::spawn(driver::drive(shared.clone()));
        Ok(Server {
            addr,
            shared,
            tasks: vec![http, driver],
        })
    }

    /// Waits until `rounds` rounds are complete (counting rounds before a restart).
    pub async fn wait_for_round(&self, rounds: u64) {
        let mut completed = self.shared.completed.subscribe();
        let _ = completed.wait_for(|&done| done >= rounds).await;
    }

    pub fn history(&self) -> Vec<RoundRecord> {
        self.shared.fed().history.clone()
    }

    pub fn weights(&self) -> Vec<f32> {
        self.shared.fed().weights.clone()
    }

    pub fn status(&self) -> serde_json::Value {
        http::status_json(&self.shared)
    }

    /// Open TCP connections.
    pub fn open_connections(&self) -> u64 {
        self.shared.connections.open()
    }

    /// Closes every client connection cleanly (after the last round).
    pub async fn close_connections(&self) {
        self.shared.closing.send_replace(true);
        // Let the writers send what is queued and their close frames.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    /// Stops serving at once, as a killed process would (the last commit stays).
    pub fn abort(self) {
        for task in &self.tasks {
            task.abort();
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
    let room = files.saturating_sub(SPARE_FILES).max(1) as usize;
    if limits.max_connections > room {
        eprintln!(
            "warning: {} connections asked for, but only {files} open files are allowed: \
             at most {room} connections (raise `ulimit -n` for more)",
            limits.max_connections
        );
        limits.max_connections = room;
    }
    limits
}

/// Every client's test split, as ids: the population evaluation's data.
pub fn population_ids(corpus: &Corpus) -> Vec<Vec<u32>> {
    corpus
        .clients
        .iter()
        .map(|c| vocab::encode(&c.test_text()).0)
        .collect()
}

/// The fixed held-out set: the tutorial's check (one client's first training
/// batches) when `eval_client` is set, else the test split of a seeded sample of
/// clients.
pub fn eval_batches(
    corpus: &Corpus,
    rounds: &RoundConfig,
    seed: u64,
) -> anyhow::Result<Vec<Batch>> {
    let tutorial = BatchConfig::tutorial(0);
    let take = |text: String| {
        let (ids, _) = vocab::encode(&text);
        let mut all = batches(&ids, &tutorial);
        all.truncate(rounds.eval_batches);
        all
    };
    let batches: Vec<Batch> = match &rounds.eval_client {
        Some(id) => take(corpus.client(id)?.train_text()),
        None => {
            let eligible: Vec<&folio_data::Client> = corpus
                .clients
                .iter()
                .filter(|c| c.test_text().len() >= tutorial.ids_per_batch())
                .collect();
            sample_clients(&eligible, rounds.eval_clients, seed, u64::MAX)
                .into_iter()
                .flat_map(|c| take(c.test_text()))
                .collect()
        }
    };
    anyhow::ensure!(
        !batches.is_empty(),
        "no evaluation batches: check --eval-client / --eval-clients"
    );
    Ok(batches)
}
