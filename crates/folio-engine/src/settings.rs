//! How rounds run: the strategy's settings, what clients are asked to train,
//! encodings, evaluation.

use std::time::Duration;

use folio_data::TrainingPlan;
use folio_fed::{Encoding, StrategyConfig};
use folio_proto::Optimizer;

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
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
    /// Secure aggregation: the server learns only each round's sum (`None`:
    /// plain rounds, each update seen on its own).
    #[serde(default)]
    pub secure: Option<SecureRounds>,
    /// Asynchronous rounds (FedBuff): clients train continuously and the global
    /// model steps every `buffer` updates (`None`: synchronous rounds).
    #[serde(default)]
    pub asynchronous: Option<AsyncRounds>,
    /// Federated evaluation: devices measure candidate models on the text they
    /// hold out (`None`: only the server's own evaluation).
    #[serde(default)]
    pub federated_eval: Option<FederatedEval>,
}

/// How federated evaluation runs: every `every` rounds, before the round's
/// model is committed, up to `devices` devices drawn from those connected
/// measure it on the text they hold out and train nothing; the round commits
/// with what came back by `deadline`. Under secure aggregation, the round's
/// own devices measure the model they were sent before they train, and their
/// sums are unmasked only with the round's: the server sees no device's.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FederatedEval {
    pub every: u64,
    pub devices: usize,
    pub deadline: Duration,
    /// Characters one device measures at most (its answer is refused above).
    pub max_chars: u64,
}

impl FederatedEval {
    /// Every round, 16 devices, 60 s, up to 65,536 characters each (more than
    /// any Shakespeare character holds out).
    pub fn every(every: u64) -> Self {
        Self {
            every,
            devices: 16,
            deadline: Duration::from_secs(60),
            max_chars: 65_536,
        }
    }

    /// Whether `round`'s model is measured on the devices.
    pub fn due(&self, round: u64) -> bool {
        round > 0 && round.is_multiple_of(self.every.max(1))
    }
}

/// How asynchronous rounds run (FedBuff, Nguyen et al. 2022): up to
/// `clients_per_round` clients train at once, each on the latest model it was
/// given; the global model steps every `buffer` updates, each scaled by
/// 1/√(1 + s) for its staleness s (the steps the model moved since the
/// update's model), those staler than `max_staleness` refused.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AsyncRounds {
    /// Updates per step of the global model (K).
    pub buffer: usize,
    /// The most steps an update's model may be behind the global one.
    pub max_staleness: u64,
}

impl AsyncRounds {
    /// How much an update `staleness` steps behind counts: 1/√(1 + s).
    pub fn discount(staleness: u64) -> f64 {
        1.0 / (1.0 + staleness as f64).sqrt()
    }
}

/// How secure rounds run.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SecureRounds {
    /// Shares that rebuild a client's secrets (Shamir's t); `None`: a majority
    /// of its holders (its neighbours and itself).
    pub threshold: Option<u32>,
    /// Neighbours each client masks with: 0 for every other client (SecAgg),
    /// or a degree k for SecAgg+'s sparse graph.
    pub degree: u32,
    /// How long the key, share and unmasking steps each wait for stragglers.
    pub step_timeout: Duration,
    /// The fewest masked inputs a sum is revealed of ([`MIN_COHORT`] at least):
    /// with fewer, nothing is unmasked.
    #[serde(default = "min_cohort")]
    pub min_cohort: usize,
}

/// No secure sum is revealed of fewer inputs than this: a sum of one is that
/// input, and of two, each input to the other.
pub const MIN_COHORT: usize = 3;

fn min_cohort() -> usize {
    MIN_COHORT
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
            secure: None,
            asynchronous: None,
            federated_eval: None,
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

    /// The data side of a client's local training in a round seeded `seed`: what
    /// the round's start message tells clients, and what bounds their examples.
    pub fn plan(&self, seed: u64) -> TrainingPlan {
        TrainingPlan {
            batch_size: self.batch_size as usize,
            seq_len: self.seq_len as usize,
            local_epochs: self.local_epochs,
            max_batches: self.max_batches,
            seed,
        }
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
        if let Some(asynchronous) = &self.asynchronous {
            self.strategy.async_compatible()?;
            if self.secure.is_some() {
                return Err(
                    "secure aggregation needs a round's clients to mask together; asynchronous rounds have none: use one or the other"
                        .into(),
                );
            }
            if asynchronous.buffer == 0 {
                return Err("the asynchronous buffer must hold at least 1 update".into());
            }
        }
        if let Some(secure) = &self.secure {
            self.strategy.secure_compatible()?;
            if secure.step_timeout.is_zero() {
                return Err("a secure round's step timeout must be above zero".into());
            }
            if secure.threshold == Some(0) {
                return Err("a secure round's threshold must be at least 1".into());
            }
            if secure.min_cohort < MIN_COHORT {
                return Err(format!(
                    "a secure sum is revealed of at least {MIN_COHORT} inputs (it was set to {})",
                    secure.min_cohort
                ));
            }
        }
        if self.strategy.dp.distributed.is_some() {
            if self.strategy.kind != folio_fed::StrategyKind::DpFedAvg || self.secure.is_none() {
                return Err(
                    "distributed DP has the devices noise their updates inside a secure sum: it needs --strategy dp-fedavg and --secure"
                        .into(),
                );
            }
            if self.federated_eval.is_some() {
                return Err(
                    "under distributed DP the server sees no device figure un-noised: federated evaluation's held-out sums would be (leave out --federated-eval-every)"
                        .into(),
                );
            }
        }
        if let Some(federated) = &self.federated_eval {
            if federated.every == 0 || federated.devices == 0 || federated.max_chars == 0 {
                return Err(
                    "federated evaluation needs a round interval, a number of devices and a character cap, each above zero"
                        .into(),
                );
            }
            if federated.deadline.is_zero() {
                return Err("federated evaluation's deadline must be above zero".into());
            }
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
