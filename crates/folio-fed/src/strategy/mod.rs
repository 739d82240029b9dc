//! The strategy seam (Flower's `Strategy`): everything about a round that is a
//! decision rather than plumbing: which clients train, how many updates make a
//! round, how much one update may weigh, how updates are bounded and combined, how
//! the combination moves the global model, and the state all that carries from
//! round to round. The round engine holds a `dyn Strategy` and never names an
//! implementation; central evaluation needs the model and stays with the hosts.
//!
//! A strategy's state is a [`StateRecord`]: self-describing (its kind, a version,
//! named values and named tensors), so the hosts save and restore any strategy's
//! state in one format, and a new strategy needs no new file format.
//!
//! Adding a strategy: write a type implementing [`Strategy`] in a file of this
//! folder (see `krum.rs`), add a [`StrategyKind`] for it, and build it in
//! [`build`]; `folio serve` and `folio simulate` take it with `--strategy`.

mod dp;
mod fedavg;
mod krum;

use std::any::Any;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::FedError;
use crate::codec::CheckedDelta;
use crate::robust::{Aggregation, Clipping, FirstBound};
use crate::server_opt::{ServerOptimizer, ServerOptimizerConfig};

pub use dp::distributed::ROUNDING_BETA;
pub use dp::{
    AdaptiveClip, DeviceNoisePlan, DistributedDp, DpConfig, DpFedAvg, PrivacySpent, default_delta,
    default_min_inputs,
};
pub use fedavg::RobustFedAvg;
pub use krum::Krum;

/// The strategies folio ships.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum StrategyKind {
    /// FedAvg hardened for untrusted clients: bounded weights, L2 clipping, mean /
    /// trimmed mean / median, then a server optimizer.
    #[default]
    FedAvg,
    /// Multi-Krum (Blanchard et al. 2017): the updates closest to their neighbours
    /// are averaged, the rest dropped.
    Krum,
    /// User-level DP-FedAvg (McMahan et al. 2018): Poisson sampling, a fixed
    /// clip bound, Gaussian noise on the sum, a fixed denominator, a privacy
    /// ledger.
    DpFedAvg,
}

/// What a host gives the strategy it builds besides its settings.
#[derive(Debug, Clone)]
pub struct StrategyContext {
    /// The seed its public draws (selection) start from.
    pub seed: u64,
    /// Clients in the federation's population (the corpus), whether connected or
    /// not: DP-FedAvg's sampling rate and δ depend on it.
    pub population: usize,
    /// Keys the draws that must stay secret (DP's sampling and noise): the host
    /// draws it from the OS.
    pub secret: [u8; 32],
}

impl StrategyContext {
    /// A context for tests and tools: its secret is derived from the seed, so
    /// nothing drawn from it is private.
    pub fn seeded(seed: u64) -> Self {
        let mut secret = [0u8; 32];
        for (i, chunk) in secret.chunks_mut(8).enumerate() {
            chunk.copy_from_slice(
                &(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)).to_le_bytes(),
            );
        }
        Self {
            seed,
            population: 0,
            secret,
        }
    }
}

/// Builds the strategy `config` names.
pub fn build(config: StrategyConfig, context: &StrategyContext) -> Arc<dyn Strategy> {
    match config.kind {
        StrategyKind::FedAvg => Arc::new(RobustFedAvg::new(config, context.seed)),
        StrategyKind::Krum => Arc::new(Krum::new(config, context.seed)),
        StrategyKind::DpFedAvg => Arc::new(DpFedAvg::new(config, context)),
    }
}

/// How client deltas are weighted (the tutorial's `client_weight_fn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Weighting {
    /// By the examples the client trained on (FedAvg's default), which the server
    /// bounds by what that client's data and the round's plan allow.
    #[default]
    Examples,
    /// Every client counts the same.
    Uniform,
}

/// How a round's clients are drawn from those available.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Selection {
    /// Every available client equally likely.
    #[default]
    Uniform,
    /// In proportion to the size of a client's training text, without replacement
    /// (average such a round uniformly: [`Weighting::Uniform`]).
    BySize,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StrategyConfig {
    #[serde(default)]
    pub kind: StrategyKind,
    /// Clients picked per round (among those connected).
    pub clients_per_round: usize,
    /// Connected clients needed before a round starts.
    pub min_clients: usize,
    /// Updates needed to close a round; fewer and it is abandoned.
    pub quorum: usize,
    #[serde(default)]
    pub selection: Selection,
    pub weighting: Weighting,
    pub clipping: Clipping,
    pub aggregation: Aggregation,
    pub server_optimizer: ServerOptimizerConfig,
    /// Updates Krum assumes may be hostile.
    #[serde(default)]
    pub byzantine: usize,
    /// DP-FedAvg's noise, δ and ε budget.
    #[serde(default)]
    pub dp: DpConfig,
}

impl StrategyConfig {
    /// Plain FedAvg with every delta clipped to an L2 norm adapting to the median.
    pub fn fedavg(clients_per_round: usize) -> Self {
        Self {
            kind: StrategyKind::FedAvg,
            clients_per_round,
            min_clients: clients_per_round,
            quorum: clients_per_round,
            selection: Selection::Uniform,
            weighting: Weighting::Examples,
            clipping: Clipping::adaptive(1.0),
            aggregation: Aggregation::Mean,
            server_optimizer: ServerOptimizerConfig::fedavg(),
            byzantine: 0,
            dp: DpConfig::default(),
        }
    }

    /// Refuses settings under which no round could ever close as configured.
    pub fn validate(&self) -> Result<(), String> {
        let Self {
            clients_per_round,
            min_clients,
            quorum,
            ..
        } = *self;
        if clients_per_round == 0 || min_clients == 0 || quorum == 0 {
            return Err(format!(
                "clients per round ({clients_per_round}), min clients ({min_clients}) and quorum ({quorum}) must each be at least 1"
            ));
        }
        if quorum > clients_per_round {
            return Err(format!(
                "a quorum of {quorum} can never be met with {clients_per_round} clients per round: lower --quorum or raise --clients-per-round"
            ));
        }
        if quorum > min_clients {
            return Err(format!(
                "rounds start with {min_clients} connected clients but need {quorum} updates: raise --min-clients to at least {quorum}"
            ));
        }
        let bad_bound = |b: f32| !(b.is_finite() && b > 0.0);
        match self.clipping {
            Clipping::Fixed { bound } if bad_bound(bound) => {
                return Err(format!("the clipping bound must be positive, not {bound}"));
            }
            Clipping::Adaptive {
                first: FirstBound::Given(first) | FirstBound::Measured { at_most: first },
                quantile,
                ceiling,
                ..
            } if bad_bound(first)
                || !(0.0..=1.0).contains(&quantile)
                || ceiling.is_nan()
                || ceiling < 1.0 =>
            {
                return Err(format!(
                    "adaptive clipping needs a positive first bound ({first}), a quantile in [0, 1] ({quantile}) and a ceiling of at least 1 ({ceiling})"
                ));
            }
            _ => {}
        }
        if let ServerOptimizerConfig::FedAdam { beta1, beta2, .. }
        | ServerOptimizerConfig::FedYogi { beta1, beta2, .. } = self.server_optimizer
            && !((0.0..1.0).contains(&beta1) && (0.0..1.0).contains(&beta2))
        {
            return Err(format!(
                "the server's β1 ({beta1}) and β2 ({beta2}) must each be in [0, 1)"
            ));
        }
        if let Aggregation::TrimmedMean { trim } = self.aggregation
            && !(0.0..0.5).contains(&trim)
        {
            return Err(format!(
                "the trimmed fraction must be in [0, 0.5), not {trim}"
            ));
        }
        if self.kind == StrategyKind::Krum && quorum < 2 * self.byzantine + 3 {
            return Err(format!(
                "Krum tolerates {} hostile updates only in rounds of at least {} (2f + 3): raise --quorum",
                self.byzantine,
                2 * self.byzantine + 3
            ));
        }
        if self.kind == StrategyKind::DpFedAvg {
            self.dp.validate()?;
            if !matches!(self.clipping, Clipping::Fixed { .. }) {
                return Err(
                    "DP-FedAvg clips every delta to a fixed bound: use --clip fixed --clip-bound S"
                        .into(),
                );
            }
            if self.aggregation != Aggregation::Mean {
                return Err("DP-FedAvg noises the sum: its aggregation is the mean".into());
            }
        }
        Ok(())
    }

    /// Whether rounds can run asynchronously (FedBuff's buffer): the strategy
    /// must fold updates trained from different models, and no sample is drawn.
    pub fn async_compatible(&self) -> Result<(), String> {
        match self.kind {
            StrategyKind::FedAvg => Ok(()),
            StrategyKind::Krum => Err(
                "Krum compares the updates of one model; asynchronous updates come from several: use fedavg"
                    .into(),
            ),
            StrategyKind::DpFedAvg => Err(
                "DP-FedAvg's accounting assumes each round's clients are sampled at rate q; asynchronous rounds draw no sample: use fedavg"
                    .into(),
            ),
        }
    }

    /// Whether rounds can run with secure aggregation: the server then sees
    /// only a sum, so each client clips itself to a bound known in advance
    /// and the strategy must work from the sum alone.
    pub fn secure_compatible(&self) -> Result<(), String> {
        if self.kind == StrategyKind::Krum {
            return Err(
                "Krum compares single updates, which secure aggregation hides: use fedavg or dp-fedavg"
                    .into(),
            );
        }
        if self.aggregation != Aggregation::Mean {
            return Err(
                "secure aggregation gives the server a sum: the aggregation must be the mean"
                    .into(),
            );
        }
        if !matches!(self.clipping, Clipping::Fixed { .. }) {
            return Err(
                "in a secure round each client clips its own delta to a bound known in advance: use --clip fixed --clip-bound S"
                    .into(),
            );
        }
        if self.dp.adaptive.is_some() {
            return Err(
                "adaptive DP clipping counts single updates' norms, which secure aggregation hides"
                    .into(),
            );
        }
        Ok(())
    }
}

/// A strategy's state between rounds, in a form any host can save and restore:
/// which strategy wrote it and in which version of its format, small named values
/// (settings, counters, bounds) and large named tensors (optimizer moments).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StateRecord {
    pub kind: String,
    pub version: u32,
    pub values: BTreeMap<String, serde_json::Value>,
    pub tensors: BTreeMap<String, Vec<f32>>,
}

impl StateRecord {
    pub fn new(kind: &str, version: u32) -> Self {
        Self {
            kind: kind.to_owned(),
            version,
            ..Self::default()
        }
    }

    /// A value, read as `T`.
    pub fn value<T: serde::de::DeserializeOwned>(&self, name: &str) -> Result<T, String> {
        let value = self
            .values
            .get(name)
            .ok_or_else(|| format!("the saved {} state has no `{name}`", self.kind))?;
        serde_json::from_value(value.clone()).map_err(|err| {
            format!(
                "the saved {} state's `{name}` is unreadable: {err}",
                self.kind
            )
        })
    }

    pub fn set_value(&mut self, name: &str, value: impl Serialize) {
        let value = serde_json::to_value(value).expect("plain data serialises");
        self.values.insert(name.to_owned(), value);
    }

    /// A tensor, taken out of the record.
    pub fn take_tensor(&mut self, name: &str) -> Result<Vec<f32>, String> {
        self.tensors
            .remove(name)
            .ok_or_else(|| format!("the saved {} state has no tensor `{name}`", self.kind))
    }

    /// Whether `kind` wrote it, in a version this build reads.
    pub fn check(&self, kind: &str, version: u32) -> Result<(), String> {
        if self.kind != kind {
            return Err(format!("the saved state is {}'s, not {kind}'s", self.kind));
        }
        if self.version > version {
            return Err(format!(
                "the saved {kind} state is version {}; this build reads up to {version}",
                self.version
            ));
        }
        Ok(())
    }
}

/// A client a round may pick, with the size of its training text and the
/// group it belongs to (the network it connects from: a round takes clients
/// evenly across groups, so no one host fills it with sessions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    pub client: u64,
    pub size: u64,
    pub group: u64,
}

/// One round's accepted updates, folded as the strategy that opened it needs
/// (only that strategy reads it).
pub struct OpenUpdates(Box<dyn Any + Send + Sync>);

impl OpenUpdates {
    pub fn new<T: Any + Send + Sync>(folded: T) -> Self {
        Self(Box::new(folded))
    }

    /// The folded updates, if this strategy opened the round.
    pub fn get<T: Any>(&self) -> Result<&T, FedError> {
        self.0.downcast_ref().ok_or(FedError::ForeignRound)
    }

    pub fn get_mut<T: Any>(&mut self) -> Result<&mut T, FedError> {
        self.0.downcast_mut().ok_or(FedError::ForeignRound)
    }
}

/// One edge's share of a round in a cluster: its clients' checked, clipped,
/// weighted deltas summed (`sum / total_weight` is the edge's mean), with their
/// norms before clipping. Partials add up: the root sums them and divides once,
/// which is the single server's average up to the order of the f32 sum.
#[derive(Debug, Clone, PartialEq)]
pub struct Partial {
    /// Empty when no update was folded.
    pub sum: Vec<f32>,
    pub total_weight: f64,
    pub updates: usize,
    pub norms: Vec<f64>,
}

/// A round's result, not yet the global model: the host commits it (weights,
/// strategy state and history together) only once it is evaluated and saved.
#[derive(Debug, Clone)]
pub struct Aggregated {
    pub weights: Vec<f32>,
    pub state: StateRecord,
    /// The bound deltas were clipped to this round (`None`: no clipping).
    pub clip_bound: Option<f64>,
    /// Deltas above the bound (clipped), or dropped as outliers.
    pub clipped: usize,
    /// The median L2 norm of the round's deltas, before clipping.
    pub median_norm: f64,
}

pub trait Strategy: Send + Sync {
    /// What it is and how it is set, for people (`/api/status`).
    fn describe(&self) -> BTreeMap<&'static str, String>;

    /// Its settings.
    fn config(&self) -> &StrategyConfig;

    /// The seed its draws start from.
    fn seed(&self) -> u64;

    /// Connected clients needed before a round starts.
    fn min_clients(&self) -> usize {
        self.config().min_clients
    }

    /// Updates needed to close a round.
    fn quorum(&self) -> usize {
        self.config().quorum
    }

    /// The clients to train in attempt `attempt` of `round`, from the
    /// candidates; `None` while too few are connected. Clients that failed an
    /// earlier attempt of the round are avoided while enough others are connected.
    fn configure_round(
        &self,
        round: u64,
        attempt: u32,
        candidates: &[Candidate],
        failed: &BTreeSet<u64>,
    ) -> Option<Vec<u64>> {
        select(
            self.config(),
            self.seed(),
            round,
            attempt,
            candidates,
            failed,
        )
    }

    /// The state of a fresh federation.
    fn initial_state(&self, num_params: usize) -> StateRecord;

    /// A saved state, checked against these settings (and adapted where they
    /// allow, e.g. a new learning rate); `Err(why)` if it cannot be continued.
    fn restore(&self, saved: StateRecord, num_params: usize) -> Result<StateRecord, String>;

    fn open_round(&self, state: &StateRecord, num_params: usize) -> Result<OpenUpdates, FedError>;

    /// Checks, bounds and folds in one update: `claimed` examples, of at most
    /// `allowed` for that client this round. A refused update changes nothing.
    fn accept(
        &self,
        open: &mut OpenUpdates,
        delta: &CheckedDelta,
        claimed: u64,
        allowed: u64,
    ) -> Result<(), FedError>;

    /// Folds in an update trained from an older global model (an asynchronous
    /// round's buffer): checked and bounded as [`Strategy::accept`] does, then
    /// its delta scaled by `discount` (in (0, 1]: staler updates count less,
    /// and the buffer's mean is not renormalised). Strategies whose rounds
    /// cannot be asynchronous refuse.
    fn accept_stale(
        &self,
        _open: &mut OpenUpdates,
        _delta: &CheckedDelta,
        _claimed: u64,
        _allowed: u64,
        _discount: f64,
    ) -> Result<(), FedError> {
        Err(FedError::NotAsynchronous)
    }

    /// The round's new weights and state; refuses to produce a non-finite model.
    fn aggregate(
        &self,
        open: &OpenUpdates,
        weights: &[f32],
        state: &StateRecord,
    ) -> Result<Aggregated, FedError>;

    /// The bound a round's deltas are clipped to, known before the round opens
    /// (a cluster's root orders it to the edges; `None`: no clipping). A first
    /// bound that a single server measures on the round itself is, split across
    /// edges, its upper limit.
    fn ordered_bound(&self, _state: &StateRecord) -> Result<Option<f32>, FedError> {
        Err(FedError::NotSplittable)
    }

    /// Opens an edge's share of a round, clipping to `bound`.
    fn open_part(&self, _bound: Option<f32>, _num_params: usize) -> Result<OpenUpdates, FedError> {
        Err(FedError::NotSplittable)
    }

    /// An edge's share, folded: what it sends the root.
    fn part(&self, _open: &OpenUpdates) -> Result<Partial, FedError> {
        Err(FedError::NotSplittable)
    }

    /// The round's result from every edge's share (clipped to `bound`).
    fn combine(
        &self,
        _parts: &[Partial],
        _bound: Option<f32>,
        _weights: &[f32],
        _state: &StateRecord,
    ) -> Result<Aggregated, FedError> {
        Err(FedError::NotSplittable)
    }

    /// What the committed rounds in `state` cost in privacy (`None`: a strategy
    /// that promises none).
    /// Distributed DP: what each device of a secure round does to its
    /// `dims`-value update (`None`: the devices add no noise).
    fn device_noise(&self, _dims: usize) -> Result<Option<DeviceNoisePlan>, String> {
        Ok(None)
    }

    fn privacy(&self, _state: &StateRecord) -> Option<PrivacySpent> {
        None
    }

    /// Whether another round may run after `state`; `Err(why)` stops training
    /// (a privacy budget that round would exceed).
    fn admits_next_round(&self, _state: &StateRecord) -> Result<(), String> {
        Ok(())
    }
}

/// Checks a delta: right length, every value finite.
pub fn validate_delta(delta: &[f32], num_params: usize) -> Result<(), FedError> {
    if delta.len() != num_params {
        return Err(FedError::WrongLength {
            expected: num_params,
            found: delta.len(),
        });
    }
    match delta.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(FedError::NotFinite {
            index,
            value: delta[index],
        }),
        None => Ok(()),
    }
}

/// Refuses an update of the wrong length, or claiming no examples or more than
/// the client may have trained on.
pub fn check_update(
    delta: &CheckedDelta,
    num_params: usize,
    claimed: u64,
    allowed: u64,
) -> Result<(), FedError> {
    if delta.len() != num_params {
        return Err(FedError::WrongLength {
            expected: num_params,
            found: delta.len(),
        });
    }
    if claimed == 0 || claimed > allowed {
        return Err(FedError::BadExamples { claimed, allowed });
    }
    Ok(())
}

/// Moves `weights` by the round's aggregate `delta` with the server optimizer
/// saved in `state` (continued under `config`); never a non-finite model.
pub fn server_step(
    config: ServerOptimizerConfig,
    state: &StateRecord,
    weights: &[f32],
    delta: &[f32],
) -> Result<(Vec<f32>, ServerOptimizer), FedError> {
    let mut saved = state.clone();
    let mut optimizer = ServerOptimizer::restore(&mut saved, config, weights.len())
        .map_err(|_| FedError::ForeignRound)?;
    let mut new_weights = weights.to_vec();
    optimizer.step(&mut new_weights, delta)?;
    validate_delta(&new_weights, weights.len()).map_err(|_| FedError::NonFiniteModel)?;
    if !optimizer.is_finite() {
        return Err(FedError::NonFiniteModel);
    }
    Ok((new_weights, optimizer))
}

/// The clients configured rounds train: `min_clients` connected or `None`; the
/// clients that failed an earlier attempt are left out while enough others remain;
/// then `count` drawn as `selection` says, seeded by the seed, attempt and round,
/// evenly across groups: the i-th draw of every group before the (i+1)-th of any.
pub fn select(
    config: &StrategyConfig,
    seed: u64,
    round: u64,
    attempt: u32,
    candidates: &[Candidate],
    failed: &BTreeSet<u64>,
) -> Option<Vec<u64>> {
    let min = config.min_clients;
    if candidates.len() < min {
        return None;
    }
    let fresh: Vec<Candidate> = candidates
        .iter()
        .copied()
        .filter(|c| !failed.contains(&c.client))
        .collect();
    let pool = if fresh.len() >= min {
        &fresh
    } else {
        candidates
    };
    let seed = seed ^ u64::from(attempt).wrapping_mul(0xD1B5_4A32_D192_ED03);
    let drawn: Vec<Candidate> = match config.selection {
        Selection::Uniform => crate::sampling::sample_clients(pool, pool.len(), seed, round),
        Selection::BySize => {
            let sizes: Vec<u64> = pool.iter().map(|c| c.size).collect();
            crate::sampling::sample_by_size(&sizes, pool.len(), seed, round)
                .into_iter()
                .map(|i| pool[i])
                .collect()
        }
    };
    Some(evenly_across_groups(&drawn, config.clients_per_round))
}

/// The first `count` of `drawn`, in draw order within each group, taking the
/// i-th of every group before the (i+1)-th of any. When every client is a group
/// of its own, the first `count` drawn.
fn evenly_across_groups(drawn: &[Candidate], count: usize) -> Vec<u64> {
    let mut taken: BTreeMap<u64, usize> = BTreeMap::new();
    let mut ranked: Vec<(usize, usize, u64)> = drawn
        .iter()
        .enumerate()
        .map(|(position, c)| {
            let rank = taken.entry(c.group).or_default();
            *rank += 1;
            (*rank, position, c.client)
        })
        .collect();
    ranked.sort_unstable();
    ranked.into_iter().take(count).map(|(.., c)| c).collect()
}

/// The median of `norms` (0 for none).
pub fn median_norm(norms: &[f64]) -> f64 {
    let mut norms = norms.to_vec();
    norms.sort_by(f64::total_cmp);
    norms.get(norms.len() / 2).copied().unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidates(ids: &[u64]) -> Vec<Candidate> {
        ids.iter()
            .map(|&client| Candidate {
                client,
                size: 10,
                group: client,
            })
            .collect()
    }

    #[test]
    fn a_round_takes_clients_evenly_across_groups() {
        let config = StrategyConfig::fedavg(6);
        // 100 sessions from one network, 3 from a second, 1 from a third.
        let mut pool: Vec<Candidate> = (0..100)
            .map(|client| Candidate {
                client,
                size: 10,
                group: 7,
            })
            .collect();
        pool.extend((100..103).map(|client| Candidate {
            client,
            size: 10,
            group: 8,
        }));
        pool.push(Candidate {
            client: 103,
            size: 10,
            group: 9,
        });
        for round in 0..20 {
            let picked = select(&config, 1, round, 0, &pool, &BTreeSet::new()).unwrap();
            assert_eq!(picked.len(), 6);
            // Ranks 1 and 2 of each group, then one of the crowd's or the
            // second network's third: the crowd holds 97 % of the sessions and
            // gets at most half the round.
            let crowd = picked.iter().filter(|&&c| c < 100).count();
            assert!((2..=3).contains(&crowd), "round {round}: {picked:?}");
            assert!(picked.contains(&103));
        }
    }

    #[test]
    fn retries_avoid_clients_that_failed_while_others_remain() {
        let config = StrategyConfig {
            min_clients: 2,
            quorum: 2,
            ..StrategyConfig::fedavg(2)
        };
        let connected = candidates(&[1, 2, 3, 4]);
        assert_eq!(
            select(&config, 1, 1, 0, &connected[..1], &BTreeSet::new()),
            None
        );
        let failed = BTreeSet::from([1, 2]);
        let mut picked = select(&config, 1, 1, 1, &connected, &failed).unwrap();
        picked.sort();
        assert_eq!(picked, vec![3, 4]);
        // Too few fresh clients: the failed ones are asked again.
        let failed = BTreeSet::from([1, 2, 3]);
        assert_eq!(
            select(&config, 1, 1, 2, &connected, &failed).unwrap().len(),
            2
        );
    }

    #[test]
    fn selection_by_size_never_picks_an_empty_client_nor_one_twice() {
        let config = StrategyConfig {
            selection: Selection::BySize,
            ..StrategyConfig::fedavg(3)
        };
        let pool = [(7, 0), (8, 5), (9, 1), (10, 9)].map(|(client, size)| Candidate {
            client,
            size,
            group: client,
        });
        for round in 0..50 {
            let mut picked = select(&config, 3, round, 0, &pool, &BTreeSet::new()).unwrap();
            picked.sort();
            assert_eq!(picked, vec![8, 9, 10]);
        }
    }

    #[test]
    fn inconsistent_settings_are_refused() {
        let ok = StrategyConfig::fedavg(3);
        assert!(ok.validate().is_ok());
        for bad in [
            StrategyConfig { quorum: 4, ..ok },
            StrategyConfig {
                min_clients: 1,
                ..ok
            },
            StrategyConfig { quorum: 0, ..ok },
            StrategyConfig {
                clipping: Clipping::Fixed { bound: -1.0 },
                ..ok
            },
            StrategyConfig {
                aggregation: Aggregation::TrimmedMean { trim: 0.5 },
                ..ok
            },
            StrategyConfig {
                kind: StrategyKind::Krum,
                byzantine: 1,
                ..ok
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn adaptive_betas_outside_zero_to_one_are_refused() {
        let adam = |beta2| StrategyConfig {
            server_optimizer: ServerOptimizerConfig::FedAdam {
                lr: 1e-3,
                beta1: 0.9,
                beta2,
                tau: 1e-6,
                bias_correction: true,
            },
            ..StrategyConfig::fedavg(2)
        };
        assert!(adam(0.999).validate().is_ok());
        // β2 = 1 would divide by 1 − β2ᵗ = 0 under bias correction.
        assert!(adam(1.0).validate().unwrap_err().contains("β2"));
        assert!(adam(-0.1).validate().is_err());
    }

    #[test]
    fn a_record_says_whose_it_is() {
        let mut record = StateRecord::new("fedavg", 1);
        record.set_value("clip_bound", 0.5f32);
        assert_eq!(record.value::<f32>("clip_bound"), Ok(0.5));
        assert!(record.value::<f32>("steps").is_err());
        assert!(record.check("fedavg", 1).is_ok());
        assert!(record.check("krum", 1).is_err());
        assert!(StateRecord::new("fedavg", 2).check("fedavg", 1).is_err());
    }
}
