//! What every host of a federation shares, whatever carries its frames (the
//! WebSocket server, a cluster's root over NATS, the in-process simulator):
//!
//! - start-up: the corpus, the starting model, the engine built for a role;
//! - [`jobs`]: the commit pipeline's heavy jobs, run off the engine;
//! - [`settings`]: a run's settings, from flags or a file;
//! - [`provenance`]: what a model file says of the run it comes from;
//! - [`eval`]: central evaluation; [`state`]: commits saved durably.
//!
//! It holds no network: no axum, no NATS.

pub mod eval;
pub mod jobs;
pub mod provenance;
pub mod settings;
pub mod state;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use burn::prelude::Device;
use folio_data::{Corpus, vocab};
use folio_engine::{
    Engine, EngineConfig, Entropy, Role, RoundConfig, RoundRecord, SessionRate, Start,
};
use folio_model::checkpoint;
use folio_model::{CharRnn, ModelConfig, Preset};
use folio_proto::{DataSource, ModelShape};

/// Sessions an engine keeps unless its host says otherwise.
pub const MAX_SESSIONS: usize = 4096;
/// How long a disconnected session may be resumed unless its host says otherwise.
pub const SESSION_TTL: Duration = Duration::from_secs(600);
/// New sessions one network may open unless its host says otherwise: a burst,
/// then one a second.
pub const NEW_SESSIONS: SessionRate = SessionRate {
    burst: 64,
    every: Duration::from_secs(1),
};
/// After a failed job, the engine runs the round again this much later.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// The engine's settings for a federation of `preset` models run as `rounds`
/// say, its secret draws seeded by `entropy`, with default limits and no limit
/// on rounds.
pub fn engine_config(
    preset: Preset,
    rounds: RoundConfig,
    seed: u64,
    entropy: Entropy,
) -> EngineConfig {
    let model = preset.config();
    EngineConfig {
        rounds,
        preset: preset.to_string(),
        model: ModelShape {
            vocab: model.vocab as u32,
            embed: model.embed as u32,
            hidden: model.hidden as u32,
        },
        segments: segments(model),
        seed,
        entropy,
        data: DataSource::Shakespeare,
        population: 0,
        max_sessions: MAX_SESSIONS,
        session_ttl: SESSION_TTL,
        max_rounds: None,
        new_sessions: NEW_SESSIONS,
        retry_after: RETRY_AFTER,
        check_devices: false,
    }
}

/// The tensors' lengths in parameter order.
pub fn segments(model: ModelConfig) -> Vec<usize> {
    model
        .param_shapes()
        .iter()
        .map(|(_, shape)| shape.iter().product())
        .collect()
}

/// The model a federation starts from: a model file, or fresh seeded weights.
pub async fn starting_weights(
    model: ModelConfig,
    init: Option<&Path>,
    seed: u64,
) -> anyhow::Result<Vec<f32>> {
    Ok(match init {
        Some(path) => {
            checkpoint::load(path, Some(model))
                .with_context(|| format!("cannot start from {}", path.display()))?
                .weights
        }
        None => {
            CharRnn::init(model, seed, &Device::flex())
                .to_flat()
                .await?
        }
    })
}

/// Where a federation kept in `state_dir` starts: its saved state if there is
/// one, else `weights` with no history.
pub fn resume_or(state_dir: &Path, num_params: usize, weights: Vec<f32>) -> anyhow::Result<Start> {
    Ok(match state::open(state_dir, num_params)? {
        Some(saved) => Start {
            weights: saved.weights,
            strategy: Some(saved.strategy),
            history: saved.history,
        },
        None => Start {
            weights,
            strategy: None,
            history: Vec::new(),
        },
    })
}

/// Each corpus client with its training characters.
pub fn corpus_clients(corpus: &Corpus) -> Vec<(String, usize)> {
    corpus
        .clients
        .iter()
        .map(|c| (c.id.clone(), vocab::encode(&c.train_text()).0.len()))
        .collect()
}

/// An engine of role `R` for `clients` (id, training characters), starting
/// from `start`; its population is the clients with text, or where devices
/// bring their own text (and `clients` is empty), as many as it keeps sessions.
pub fn build_engine<R: Role>(
    config: EngineConfig,
    clients: Vec<(String, usize)>,
    start: Start,
) -> anyhow::Result<Engine<R>> {
    let population = match config.data {
        DataSource::Shakespeare => clients.iter().filter(|(_, chars)| *chars > 0).count(),
        DataSource::Device => config.max_sessions,
    };
    let config = EngineConfig {
        population,
        ..config
    };
    Ok(Engine::new(config, clients, start, Instant::now())?)
}

/// Logs a committed round (every host's one line per round): a private
/// federation's without how many took part.
pub fn log_committed(record: &RoundRecord, release: folio_engine::Release) {
    let clients = (!release.is_private()).then_some(record.clients);
    tracing::info!(
        round = record.round,
        clients,
        eval_loss = record.eval_loss,
        eval_accuracy = record.eval_accuracy,
        "round committed"
    );
}
