//! What an aggregator runs with.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use folio_fed::{Encoding, StrategyConfig};
use folio_model::Preset;
use folio_proto::Optimizer;

use crate::access::AccessConfig;
use crate::limits::Limits;

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
    /// Join and admin tokens, allowed origins.
    pub access: AccessConfig,
    pub limits: Limits,
    /// Stop after this many rounds (`None`: serve forever).
    pub max_rounds: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct RoundConfig {
    /// Selection, quorum, weighting, clipping, aggregation, server optimizer.
    pub strategy: StrategyConfig,
    pub deadline: Duration,
    pub local_epochs: u32,
    /// Batches per local epoch (the tutorial: 5).
    pub max_batches: Option<u32>,
    pub batch_size: u32,
    pub seq_len: u32,
    pub client_optimizer: Optimizer,
    pub client_lr: f32,
    /// Rounds from which the client learning rate is halved again (a step
    /// schedule: late rounds gain from smaller, less noisy steps).
    pub client_lr_halvings: Vec<u64>,
    /// The clients' own gradient clipping.
    pub clip_norm: Option<f32>,
    pub delta_encoding: Encoding,
    /// How the global model goes down to the clients (f32 or f16).
    pub model_encoding: Encoding,
    /// Central evaluation: test batches of this many fixed clients...
    pub eval_clients: usize,
    /// ...this many batches each.
    pub eval_batches: usize,
    /// Evaluate on this client's *training* batches instead (the tutorial's check).
    pub eval_client: Option<String>,
    /// Also evaluate on every client's test split (the population figure) after
    /// every this many rounds and after the last one.
    pub population_eval_every: Option<u64>,
}

impl RoundConfig {
    /// The tutorial's federation: 2 clients a round, 5 batches of 8 × 100, SGD 0.5,
    /// FedAvg weighted by examples (with the server's L2 clipping).
    pub fn tutorial() -> Self {
        Self {
            strategy: StrategyConfig::fedavg(2),
            deadline: Duration::from_secs(600),
            local_epochs: 1,
            max_batches: Some(5),
            batch_size: 8,
            seq_len: 100,
            client_optimizer: Optimizer::Sgd,
            client_lr: 0.5,
            client_lr_halvings: Vec::new(),
            clip_norm: None,
            delta_encoding: Encoding::F32,
            model_encoding: Encoding::F32,
            eval_clients: 8,
            eval_batches: 2,
            eval_client: None,
            population_eval_every: None,
        }
    }
}

impl RoundConfig {
    /// The client learning rate of `round`: `client_lr` halved once for every
    /// halving at or before it.
    pub fn client_lr_at(&self, round: u64) -> f32 {
        let halvings = self
            .client_lr_halvings
            .iter()
            .filter(|&&r| r <= round)
            .count();
        self.client_lr / 2f32.powi(halvings as i32)
    }

    /// The most examples a client with `train_ids` ids of training text can train
    /// on in one round: its batches (capped by the round's) × epochs × batch size.
    pub fn allowed_examples(&self, train_ids: usize) -> u64 {
        let batch = folio_data::BatchConfig {
            batch_size: self.batch_size as usize,
            seq_len: self.seq_len as usize,
            ..folio_data::BatchConfig::padded(0)
        };
        // Clients cut their text from a random offset: the most batches any gives.
        let mut batches = folio_data::batch::max_batch_count(train_ids, &batch) as u64;
        if let Some(max) = self.max_batches {
            batches = batches.min(u64::from(max));
        }
        u64::from(self.local_epochs.max(1)) * batches * u64::from(self.batch_size)
    }

    /// Refuses settings under which rounds could not run as configured.
    pub fn validate(&self) -> Result<(), String> {
        self.strategy.validate()?;
        if self.deadline.is_zero() {
            return Err("the round deadline must be above zero".into());
        }
        if self.batch_size == 0 || self.seq_len == 0 {
            return Err("batch size and sequence length must be above zero".into());
        }
        if self.model_encoding == Encoding::Int8 {
            return Err("the model goes down as f32 or f16; int8 is for deltas only".into());
        }
        if !(self.client_lr.is_finite() && self.client_lr > 0.0) {
            return Err(format!(
                "the client learning rate must be positive, not {}",
                self.client_lr
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The examples bound must hold whatever offset a client cuts its text at, or
    /// honest updates would be refused; and it stays a bound (an attacker's claim
    /// above it is refused elsewhere).
    #[test]
    fn allowed_examples_cover_every_offset_a_client_may_cut() {
        let config = RoundConfig {
            batch_size: 1,
            max_batches: None,
            ..RoundConfig::tutorial()
        };
        for len in (2..700).step_by(7) {
            let ids: Vec<u32> = (0..len as u32).map(|i| i % 80).collect();
            let allowed = config.allowed_examples(len);
            let most = (0..40)
                .map(|seed| {
                    let start = folio_proto::RoundStart {
                        round: 1,
                        model: 0,
                        weights: None,
                        weights_encoding: Encoding::F32,
                        deadline_ms: 1,
                        local_epochs: 1,
                        max_batches: None,
                        optimizer: Optimizer::Sgd,
                        learning_rate: 0.1,
                        clip_norm: None,
                        delta_encoding: Encoding::F32,
                        seed,
                    };
                    folio_client::local_batches(&ids, 1, 100, &start).len() as u64
                })
                .max()
                .unwrap();
            assert!(
                most <= allowed,
                "len {len}: {most} batches, {allowed} allowed"
            );
            assert!(
                allowed <= len.div_ceil(101) as u64 + 1,
                "len {len}: {allowed}"
            );
        }
    }
}
