//! What an engine is built with: its settings, where it starts from, the
//! entropy its draws come from, and the role/mode combinations it refuses.

use std::time::Duration;

use folio_fed::{Selection, StateRecord};
use folio_proto::{DataSource, ModelShape};

use crate::{Role, RoundConfig, RoundRecord};

/// What the engine is set up with.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub rounds: RoundConfig,
    /// The model's preset name and shape, told to clients.
    pub preset: String,
    pub model: ModelShape,
    /// Lengths of the model's tensors in parameter order (the delta codecs' unit).
    pub segments: Vec<usize>,
    /// The seed of the public draws: the order clients are handed out, selection,
    /// each round's training plan.
    pub seed: u64,
    /// The seed of every draw that must stay secret (resume tokens, probe ids,
    /// secure rounds' graphs, DP's sample and noise).
    pub entropy: Entropy,
    /// Where devices' text comes from: handed out (the Shakespeare simulation),
    /// or their own, which the engine never sees.
    pub data: DataSource,
    /// Clients in the federation's population, connected or not (DP-FedAvg's
    /// sampling rate and δ depend on it).
    pub population: usize,
    /// Sessions kept (connected or waiting to be resumed).
    pub max_sessions: usize,
    /// A disconnected session can be resumed for this long.
    pub session_ttl: Duration,
    /// Stop after this many rounds (`None`: run forever).
    pub max_rounds: Option<u64>,
    /// How fast one group may open new sessions (resuming one is free).
    pub new_sessions: SessionRate,
    /// After a job fails (an evaluation, a save), the round runs again this much
    /// later (a full disk or a lost store gets a moment, not a busy loop).
    pub retry_after: Duration,
    /// Check each device with a known-answer probe when it joins (and when its
    /// backend changes) before it may be selected.
    pub check_devices: bool,
}

impl EngineConfig {
    pub fn num_params(&self) -> usize {
        self.segments.iter().sum()
    }
}

/// The 32 bytes every secret draw of an engine starts from.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Entropy(pub [u8; 32]);

impl Entropy {
    /// From the OS: what a served federation uses, so that nobody can predict
    /// its tokens, graphs or noise.
    pub fn from_os() -> Self {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).expect("the OS random number generator works");
        Self(bytes)
    }

    /// From a seed: a simulation replays bit for bit, and nothing it draws is
    /// private.
    pub fn from_seed(seed: u64) -> Self {
        let mut bytes = [0u8; 32];
        for (i, chunk) in bytes.chunks_mut(8).enumerate() {
            let word = (seed ^ 0x5EC2_E7D5_EED5_u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ (i as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        Self(bytes)
    }
}

impl std::fmt::Debug for Entropy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Entropy(..)")
    }
}

/// New sessions one group may open: `burst` at once, then one every `every`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionRate {
    pub burst: u32,
    pub every: Duration,
}

/// Where a federation starts: its global model, and what a saved state holds.
#[derive(Debug, Clone)]
pub struct Start {
    pub weights: Vec<f32>,
    /// The strategy's saved state (`None`: a fresh one; one the strategy
    /// cannot continue is refused).
    pub strategy: Option<StateRecord>,
    /// Committed rounds, from round 0; empty for a new federation.
    pub history: Vec<RoundRecord>,
}

/// Why an engine cannot be built as asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    #[error("inconsistent round settings: {0}")]
    Rounds(String),
    #[error(
        "a cluster runs synchronous rounds: its root orders each round from the edges' sessions (run asynchronous rounds on one server)"
    )]
    AsynchronousCluster,
    #[error("the starting model has {weights} weights, the model has {params}")]
    Weights { weights: usize, params: usize },
    #[error("devices bring their own text, so {0}")]
    DeviceData(&'static str),
    #[error(
        "the saved run cannot be continued with these settings ({0}): restart it with the strategy that wrote it (another --server-optimizer is fine), or give another --state-dir"
    )]
    StrategyState(String),
}

/// Refuses what `R` cannot run.
pub(crate) fn check<R: Role>(config: &EngineConfig, start: &Start) -> Result<(), BuildError> {
    config.rounds.validate().map_err(BuildError::Rounds)?;
    if !(R::HOLDS_SESSIONS && R::COMMITS) && config.rounds.asynchronous.is_some() {
        return Err(BuildError::AsynchronousCluster);
    }
    if config.data == DataSource::Device {
        check_device_data(&config.rounds)?;
    }
    if start.weights.len() != config.num_params() {
        return Err(BuildError::Weights {
            weights: start.weights.len(),
            params: config.num_params(),
        });
    }
    Ok(())
}

/// What a federation whose server never sees the text cannot do: bound an
/// update's weight by a text size it cannot check, or evaluate on text it lacks.
fn check_device_data(rounds: &crate::RoundConfig) -> Result<(), BuildError> {
    if rounds.max_batches.is_none() {
        return Err(BuildError::DeviceData(
            "an update's weight must be bounded by the round's plan: set a cap on batches per epoch (--max-batches)",
        ));
    }
    if rounds.strategy.selection == Selection::BySize {
        return Err(BuildError::DeviceData(
            "the server does not know how much text each has: select uniformly (--selection uniform)",
        ));
    }
    if rounds.population_eval_every.is_some() || rounds.eval_client.is_some() {
        return Err(BuildError::DeviceData(
            "the server has no text to evaluate on: evaluate on the devices (--federated-eval-every)",
        ));
    }
    Ok(())
}
