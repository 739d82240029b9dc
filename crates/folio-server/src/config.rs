//! What an aggregator runs with.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use folio_fed::{Encoding, ServerOptimizerConfig, Weighting};
use folio_model::Preset;
use folio_proto::Optimizer;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub addr: SocketAddr,
    /// Checkpoints and the metrics history; restarting on it resumes.
    pub state_dir: PathBuf,
    /// The data cache holding `shakespeare/`.
    pub data_dir: PathBuf,
    /// Served at `/` (index.html, web/, the built wasm under pkg/).
    pub web_root: Option<PathBuf>,
    pub preset: Preset,
    /// Initial global model; `None`: fresh weights from `seed`.
    pub init: Option<PathBuf>,
    pub rounds: RoundConfig,
    pub seed: u64,
    /// Clients must present this token to join.
    pub join_token: Option<String>,
    /// Stop after this many rounds (`None`: serve forever).
    pub max_rounds: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct RoundConfig {
    /// Clients picked per round (among those connected).
    pub clients_per_round: usize,
    /// Connected clients needed before a round starts.
    pub min_clients: usize,
    /// Updates needed to close a round at its deadline.
    pub quorum: usize,
    pub deadline: Duration,
    pub local_epochs: u32,
    /// Batches per local epoch (the tutorial: 5).
    pub max_batches: Option<u32>,
    pub batch_size: u32,
    pub seq_len: u32,
    pub client_optimizer: Optimizer,
    pub client_lr: f32,
    pub clip_norm: Option<f32>,
    pub server_optimizer: ServerOptimizerConfig,
    pub weighting: Weighting,
    pub delta_encoding: Encoding,
    /// Central evaluation: test batches of this many fixed clients...
    pub eval_clients: usize,
    /// ...this many batches each.
    pub eval_batches: usize,
    /// Evaluate on this client's *training* batches instead (the tutorial's check).
    pub eval_client: Option<String>,
}

impl RoundConfig {
    /// The tutorial's federation: 2 clients a round, 5 batches of 8 × 100, SGD 0.5,
    /// plain FedAvg weighted by examples.
    pub fn tutorial() -> Self {
        Self {
            clients_per_round: 2,
            min_clients: 2,
            quorum: 2,
            deadline: Duration::from_secs(600),
            local_epochs: 1,
            max_batches: Some(5),
            batch_size: 8,
            seq_len: 100,
            client_optimizer: Optimizer::Sgd,
            client_lr: 0.5,
            clip_norm: None,
            server_optimizer: ServerOptimizerConfig::fedavg(),
            weighting: Weighting::Examples,
            delta_encoding: Encoding::F32,
            eval_clients: 8,
            eval_batches: 2,
            eval_client: None,
        }
    }
}
