//! The aggregator: Federated Averaging over WebSocket.
//!
//! `GET /ws` is the clients' WebSocket ([`folio_proto`] frames), `GET /api/status`
//! the JSON status, `GET /api/model` the current global model (f16 safetensors),
//! and `/` and `/web/` serve the page. A driver task runs the rounds: pick clients among those
//! connected, send the global weights, collect updates until every selected client
//! reported or the deadline passed with a quorum, aggregate, step the server
//! optimizer, evaluate centrally, broadcast the result, checkpoint.

pub mod config;
pub mod federation;
pub mod state;
mod ws;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use burn::prelude::Device;
use folio_data::batch::batches;
use folio_data::{Batch, BatchConfig, Corpus, vocab};
use folio_fed::ServerOptimizer;
use folio_fed::sampling::sample_clients;
use folio_model::checkpoint::{self, Precision};
use folio_model::eval::evaluate;
use folio_model::{CharRnn, Metrics};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tower_http::services::{ServeDir, ServeFile};

pub use config::{RoundConfig, ServerConfig};
use federation::{Deliveries, Federation, RoundPhase, RoundRecord};

/// How often the driver looks at the open round.
const POLL: Duration = Duration::from_millis(20);

pub struct Shared {
    fed: Mutex<Federation>,
    eval_batches: Vec<Batch>,
    config: ServerConfig,
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
        let corpus = Corpus::load(&config.data_dir.join("shakespeare"))?;
        let model = config.preset.config();
        std::fs::create_dir_all(&config.state_dir).with_context(|| {
            format!("cannot create the state dir {}", config.state_dir.display())
        })?;
        let rounds = &config.rounds;
        let (weights, optimizer, completed) = match state::load(
            &config.state_dir,
            rounds.server_optimizer,
            model.num_params(),
        )? {
            Some(saved) => (saved.weights, saved.optimizer, saved.completed_rounds),
            None => {
                let weights = match &config.init {
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
                (
                    weights,
                    ServerOptimizer::new(rounds.server_optimizer, model.num_params()),
                    0,
                )
            }
        };
        let eval_batches = eval_batches(&corpus, rounds, config.seed)?;
        let history = state::load_history(&config.state_dir, completed);
        let fed = Federation::new(
            model,
            config.preset.to_string(),
            rounds.clone(),
            config.seed,
            config.join_token.clone(),
            corpus,
            weights,
            optimizer,
            completed,
            history,
        );
        let listener = TcpListener::bind(config.addr).await.with_context(|| {
            format!(
                "cannot listen on {}: is another server running?",
                config.addr
            )
        })?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            fed: Mutex::new(fed),
            eval_batches,
            completed: watch::channel(completed).0,
            closing: watch::channel(false).0,
            config,
        });
        let router = router(shared.clone());
        let http = tokio::spawn(async move {
            if let Err(err) = axum::serve(listener, router).await {
                eprintln!("error: the HTTP server stopped: {err}");
            }
        });
        let driver = tokio::spawn(drive(shared.clone()));
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
        status_json(&self.shared)
    }

    /// Closes every client connection cleanly (after the last round).
    pub async fn close_connections(&self) {
        self.shared.closing.send_replace(true);
        // Let the writers send what is queued and their close frames.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    /// Stops serving at once, as a killed process would (the last checkpoint stays).
    pub fn abort(self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn router(shared: Arc<Shared>) -> Router {
    let mut router = Router::new()
        .route("/ws", get(ws::upgrade))
        .route(
            "/api/status",
            get(|State(shared): State<Arc<Shared>>| async move { Json(status_json(&shared)) }),
        )
        .route("/api/model", get(model_file));
    if let Some(root) = &shared.config.web_root {
        // The page and its assets only, not the folder they live in.
        router = router
            .route_service("/", ServeFile::new(root.join("index.html")))
            .nest_service("/web", ServeDir::new(root.join("web")))
            // The wasm is 34 MB, 5 MB gzipped: `build_page` leaves a .gz beside it.
            .nest_service("/pkg", ServeDir::new(root.join("pkg")).precompressed_gzip())
            .nest_service("/models", ServeDir::new(root.join("models")));
    }
    router.with_state(shared)
}

async fn model_file(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let (model, weights, round) = {
        let fed = shared.fed();
        (fed.model, fed.weights.clone(), fed.round - 1)
    };
    let metadata = BTreeMap::from([("round".to_owned(), round.to_string())]);
    match checkpoint::encode(model, &weights, Precision::F16, &metadata) {
        Ok(bytes) => ([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response(),
        Err(err) => (
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            err.to_string(),
        )
            .into_response(),
    }
}

fn status_json(shared: &Shared) -> serde_json::Value {
    let fed = shared.fed();
    let open = fed.open_round(Instant::now()).map(|(round, left, selected, reported)| {
        serde_json::json!({
            "round": round, "seconds_left": left.as_secs_f64(), "selected": selected, "reported": reported,
        })
    });
    let rounds = &fed.config;
    serde_json::json!({
        "preset": fed.preset,
        "parameters": fed.model.num_params(),
        "next_round": fed.round,
        "completed_rounds": fed.round - 1,
        "open_round": open,
        "connected": fed.connected(),
        "clients": fed.sessions().collect::<Vec<_>>(),
        "errors": fed.errors,
        "history": fed.history,
        "config": {
            "clients_per_round": rounds.clients_per_round,
            "min_clients": rounds.min_clients,
            "quorum": rounds.quorum,
            "deadline_seconds": rounds.deadline.as_secs_f64(),
            "local_epochs": rounds.local_epochs,
            "max_batches": rounds.max_batches,
            "client_lr": rounds.client_lr,
            "server_optimizer": rounds.server_optimizer.name(),
            "delta_encoding": format!("{:?}", rounds.delta_encoding),
            "max_rounds": shared.config.max_rounds,
        },
    })
}

/// The fixed held-out set: the tutorial's check (one client's first training
/// batches) when `eval_client` is set, else the test split of a seeded sample of
/// clients.
fn eval_batches(corpus: &Corpus, rounds: &RoundConfig, seed: u64) -> anyhow::Result<Vec<Batch>> {
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

async fn evaluate_weights(shared: &Arc<Shared>, weights: Vec<f32>) -> anyhow::Result<Metrics> {
    let shared = shared.clone();
    tokio::task::spawn_blocking(move || {
        let model = CharRnn::from_flat(shared.config.preset.config(), &weights, &Device::flex())?;
        Ok(pollster::block_on(evaluate(&model, &shared.eval_batches))?)
    })
    .await?
}

fn deliver(frames: Deliveries) {
    for (outbox, frame) in frames {
        // A closed outbox is a connection that just left; the disconnect handles it.
        let _ = outbox.send(frame);
    }
}

/// Runs rounds until `max_rounds`; errors are printed, and the round retried.
async fn drive(shared: Arc<Shared>) {
    if shared.fed().history.is_empty() {
        let weights = shared.fed().weights.clone();
        match evaluate_weights(&shared, weights).await {
            Ok(metrics) => {
                let record = RoundRecord {
                    round: 0,
                    clients: 0,
                    train_loss: None,
                    train_accuracy: None,
                    eval_loss: metrics.loss,
                    eval_accuracy: metrics.accuracy,
                    bytes_up: 0,
                    bytes_down: 0,
                    seconds: 0.0,
                };
                if let Err(err) = state::append_history(&shared.config.state_dir, &record) {
                    eprintln!("error: {err:#}");
                }
                shared.fed().history.push(record);
            }
            Err(err) => eprintln!("error: evaluating the initial model: {err:#}"),
        }
    }
    loop {
        let completed = shared.fed().round - 1;
        if shared.config.max_rounds.is_some_and(|max| completed >= max) {
            return;
        }
        let sends = loop {
            if let Some(sends) = shared.fed().try_start_round(Instant::now()) {
                break sends;
            }
            tokio::time::sleep(POLL).await;
        };
        deliver(sends);
        let phase = loop {
            let phase = shared.fed().round_phase(Instant::now());
            if phase != RoundPhase::Collecting {
                break phase;
            }
            tokio::time::sleep(POLL).await;
        };
        if phase == RoundPhase::Failed {
            deliver(shared.fed().abandon_round());
            continue;
        }
        if let Err(err) = close_round(&shared).await {
            eprintln!("error: closing a round: {err:#}");
        }
    }
}

async fn close_round(shared: &Arc<Shared>) -> anyhow::Result<()> {
    let (closed, optimizer) = {
        let mut fed = shared.fed();
        let Some((closed, notices)) = fed.close_round(Instant::now()) else {
            return Ok(());
        };
        deliver(notices);
        (closed, fed.optimizer.clone())
    };
    state::save(
        &shared.config.state_dir,
        closed.round,
        &closed.weights,
        &optimizer,
        shared.config.seed,
    )?;
    let eval_started = Instant::now();
    let metrics = evaluate_weights(shared, closed.weights).await?;
    let record = RoundRecord {
        round: closed.round,
        clients: closed.clients,
        train_loss: Some(closed.train_loss),
        train_accuracy: Some(closed.train_accuracy),
        eval_loss: metrics.loss,
        eval_accuracy: metrics.accuracy,
        bytes_up: closed.bytes_up,
        bytes_down: closed.bytes_down,
        seconds: closed.seconds + eval_started.elapsed().as_secs_f64(),
    };
    state::append_history(&shared.config.state_dir, &record)?;
    deliver(shared.fed().record(record));
    shared.completed.send_replace(closed.round);
    Ok(())
}
