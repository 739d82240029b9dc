//! User-level DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private
//! Recurrent Language Models"), as a strategy of the seam:
//!
//! - **sampling**: every connected client takes part in a round independently
//!   with probability `q = clients_per_round / population` (Poisson sampling,
//!   what the accountant assumes; a client not connected is sampled with
//!   probability 0 ≤ q, which the bound covers);
//! - **clipping**: each delta to the fixed L2 bound S, each client weighing 1;
//! - **noise**: N(0, (z·S)²) per coordinate, added once to the round's sum
//!   (a cluster's root adds it to the edges' sums, so it is added once there too);
//! - **fixed denominator**: the noised sum divided by the expected clients `q·N`,
//!   not by how many reported, so that one client changes the result by at most
//!   S / (q·N) whatever the others do; then any server optimizer steps.
//!
//! With `adaptive` set, the bound follows a quantile of the norms (Andrew et al.
//! 2021, "Differentially Private Learning with Adaptive Clipping"): the count of
//! updates under the bound gets noise of its own, and the updates' noise is
//! lowered so that the two together spend what one Gaussian of multiplier z does.
//!
//! With `distributed` set (secure rounds only), the devices add the noise
//! inside the secure sum instead ([`distributed`]): the server adds none and
//! never sees an un-noised sum, and rounds are charged as the Skellam mechanism.
//!
//! The state carries the privacy ledger: the Rényi DP spent at each of the
//! accountant's orders, summed over the committed rounds (each at the `q` and `z`
//! it ran with), so ε survives restarts and changes of settings. Sampling and
//! noise come from ChaCha20 keyed by a secret the host draws from the OS: not
//! from the federation's seed, which is no secret.

pub mod distributed;

pub use distributed::{DeviceNoisePlan, DistributedDp, default_min_inputs};

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};

use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use serde::{Deserialize, Serialize};

use super::{
    Aggregated, Candidate, OpenUpdates, Partial, RobustFedAvg, StateRecord, Strategy,
    StrategyConfig, StrategyContext, Weighting, median_norm, server_step,
};
use crate::FedError;
use crate::accountant::{SampledGaussian, default_orders, epsilon_of};
use crate::codec::CheckedDelta;
use crate::robust::{Aggregation, Clipping, over};
use crate::server_opt::ServerOptimizer;

const KIND: &str = "dp-fedavg";
const VERSION: u32 = 1;

/// The ChaCha20 streams of a strategy's secret: noise draws count up from 0,
/// sampling streams have the top bit set.
const SAMPLING_STREAMS: u64 = 1 << 63;

/// DP-FedAvg's own settings (the clip bound S is the strategy's fixed clipping).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DpConfig {
    /// z: the noise's standard deviation over the clip bound.
    pub noise_multiplier: f64,
    /// δ; `None`: 1 / N^1.1 for a population of N clients.
    pub delta: Option<f64>,
    /// Training stops before a round would take ε past this.
    pub epsilon_budget: Option<f64>,
    /// The bound adapts to a quantile of the norms; `None`: fixed.
    #[serde(default)]
    pub adaptive: Option<AdaptiveClip>,
    /// The devices add the noise inside secure rounds; `None`: the server does.
    #[serde(default)]
    pub distributed: Option<DistributedDp>,
}

/// Private adaptive clipping (Andrew et al. 2021): after each round the bound C
/// becomes C · exp(−η (b̃ − γ)), b̃ the noised fraction of updates under C.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdaptiveClip {
    /// γ: the quantile of the update norms the bound tracks (0.5: the median).
    pub quantile: f64,
    /// σ_b: the noise on the count of updates under the bound (the paper: the
    /// expected clients / 20). Must exceed z / 2.
    pub count_noise: f64,
    /// η: how fast the bound moves (0.2 in the paper).
    pub learning_rate: f64,
}

impl Default for DpConfig {
    fn default() -> Self {
        Self {
            noise_multiplier: 1.0,
            delta: None,
            epsilon_budget: None,
            adaptive: None,
            distributed: None,
        }
    }
}

impl DpConfig {
    pub fn validate(&self) -> Result<(), String> {
        let z = self.noise_multiplier;
        if !(z.is_finite() && z > 0.0) {
            return Err(format!(
                "the noise multiplier must be positive, not {z} (no noise is plain --strategy fedavg)"
            ));
        }
        if let Some(delta) = self.delta
            && !(delta > 0.0 && delta < 1.0)
        {
            return Err(format!("δ must be in (0, 1), not {delta}"));
        }
        if let Some(budget) = self.epsilon_budget
            && (budget.is_nan() || budget <= 0.0)
        {
            return Err(format!("the ε budget must be positive, not {budget}"));
        }
        if self.adaptive.is_some() && self.distributed.is_some() {
            return Err(
                "adaptive clipping counts single updates' norms, which distributed DP's secure sum hides: use a fixed bound"
                    .into(),
            );
        }
        if let Some(DistributedDp {
            min_inputs: Some(m),
        }) = self.distributed
            && m < 2
        {
            return Err(format!(
                "distributed DP needs a sum of at least 2 inputs, not {m}"
            ));
        }
        if let Some(AdaptiveClip {
            quantile,
            count_noise,
            learning_rate,
        }) = self.adaptive
        {
            if !((0.0..=1.0).contains(&quantile)
                && learning_rate.is_finite()
                && learning_rate > 0.0)
            {
                return Err(format!(
                    "adaptive clipping needs a quantile in [0, 1] ({quantile}) and a positive learning rate ({learning_rate})"
                ));
            }
            if !(count_noise.is_finite() && 2.0 * count_noise > z) {
                return Err(format!(
                    "the count's noise ({count_noise}) must exceed half the noise multiplier ({}): the updates would need infinite noise",
                    z / 2.0
                ));
            }
        }
        Ok(())
    }

    /// The updates' own noise multiplier: z, or under adaptive clipping the z_Δ
    /// with 1/z² = 1/z_Δ² + 1/(2σ_b)² (the count's sensitivity is ½).
    pub fn update_noise(&self) -> f64 {
        let z = self.noise_multiplier;
        match self.adaptive {
            None => z,
            Some(a) => (z.powi(-2) - (2.0 * a.count_noise).powi(-2)).powf(-0.5),
        }
    }
}

/// What the rounds so far cost in privacy, and under which settings: what
/// `/api/status`, the metrics and an exported model's metadata say.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PrivacySpent {
    pub epsilon: f64,
    pub delta: f64,
    /// Committed rounds the ε covers.
    pub rounds: u64,
    pub noise_multiplier: f64,
    pub clip_bound: f64,
    /// q: a client's chance of taking part in a round.
    pub sampling_rate: f64,
    /// q·N, the fixed denominator.
    pub expected_clients: f64,
    pub population: usize,
    pub epsilon_budget: Option<f64>,
    /// The devices added the noise (Skellam) rather than the server (Gaussian).
    #[serde(default)]
    pub distributed: bool,
}

pub struct DpFedAvg {
    config: StrategyConfig,
    seed: u64,
    population: usize,
    secret: [u8; 32],
    /// Noise draws so far: each aggregation draws from a ChaCha20 stream of its own.
    draws: AtomicU64,
    /// Checks, clips and sums the updates (uniform weights, fixed bound, mean).
    folding: RobustFedAvg,
}

/// The ledger a DP federation carries between rounds, and its clip bound.
struct Ledger {
    /// Rényi DP spent at each of [`default_orders`].
    rdp: Vec<f64>,
    rounds: u64,
    /// The bound the next round clips to.
    bound: f32,
    /// Values a model has: distributed DP's sensitivities grow with it.
    dims: usize,
}

impl DpFedAvg {
    /// DP-FedAvg over `context.population` clients (0: unknown, then q = 1, the
    /// most conservative account).
    pub fn new(config: StrategyConfig, context: &StrategyContext) -> Self {
        let folding = RobustFedAvg::new(
            StrategyConfig {
                weighting: Weighting::Uniform,
                aggregation: Aggregation::Mean,
                clipping: Clipping::Fixed {
                    bound: clip_bound(&config),
                },
                ..config
            },
            context.seed,
        );
        Self {
            config,
            seed: context.seed,
            population: context.population,
            secret: context.secret,
            draws: AtomicU64::new(0),
            folding,
        }
    }

    /// q: clients per round over the population, at most 1.
    pub fn sampling_rate(&self) -> f64 {
        if self.population == 0 {
            return 1.0;
        }
        (self.config.clients_per_round as f64 / self.population as f64).min(1.0)
    }

    /// q·N: the clients a round expects, which divides its noised sum.
    fn expected_clients(&self) -> f64 {
        if self.population == 0 {
            return self.config.clients_per_round as f64;
        }
        self.sampling_rate() * self.population as f64
    }

    fn delta(&self) -> f64 {
        self.config
            .dp
            .delta
            .unwrap_or_else(|| default_delta(self.population))
    }

    /// Rényi DP of one more round of `dims`-value updates, at each order.
    fn round_rdp(&self, dims: usize) -> Vec<f64> {
        let q = self.sampling_rate();
        let z = self.config.dp.noise_multiplier;
        let orders = default_orders();
        match self.device_noise_plan(dims) {
            Some(Ok(plan)) => {
                let round = plan.accountant(q, z, dims);
                orders.iter().map(|&order| round.rdp(order)).collect()
            }
            // No plan fits: no round can run, and none may be charged less.
            Some(Err(_)) => vec![f64::INFINITY; orders.len()],
            None => {
                let round = SampledGaussian {
                    sampling_rate: q,
                    noise_multiplier: z,
                    rounds: 1,
                };
                orders.iter().map(|&order| round.rdp(order)).collect()
            }
        }
    }

    /// M: the fewest inputs a distributed-DP sum is unmasked with.
    fn min_inputs(&self, distributed: DistributedDp) -> usize {
        distributed.min_inputs.map_or_else(
            || distributed::default_min_inputs(self.expected_clients()),
            |m| m as usize,
        )
    }

    /// Distributed DP's plan for `dims`-value updates (`None`: the server adds
    /// the noise). Rounds hold at most the population (or the clients a round
    /// asks for, if more).
    fn device_noise_plan(&self, dims: usize) -> Option<Result<DeviceNoisePlan, String>> {
        let distributed = self.config.dp.distributed?;
        let most = self.population.max(self.config.clients_per_round);
        Some(DeviceNoisePlan::new(
            self.config.dp.noise_multiplier,
            self.min_inputs(distributed),
            most,
            dims,
        ))
    }

    fn spent(&self, ledger: &Ledger) -> PrivacySpent {
        let delta = self.delta();
        PrivacySpent {
            epsilon: epsilon_of(&ledger.rdp, &default_orders(), delta).epsilon,
            delta,
            rounds: ledger.rounds,
            noise_multiplier: self.config.dp.noise_multiplier,
            clip_bound: f64::from(ledger.bound),
            sampling_rate: self.sampling_rate(),
            expected_clients: self.expected_clients(),
            population: self.population,
            epsilon_budget: self.config.dp.epsilon_budget,
            distributed: self.config.dp.distributed.is_some(),
        }
    }

    fn record(&self, optimizer: &ServerOptimizer, ledger: &Ledger) -> StateRecord {
        let mut record = StateRecord::new(KIND, VERSION);
        // JSON has no infinity: an order whose RDP diverged is saved as none.
        let rdp: Vec<Option<f64>> = ledger
            .rdp
            .iter()
            .map(|r| r.is_finite().then_some(*r))
            .collect();
        record.set_value("rdp", rdp);
        record.set_value("rounds", ledger.rounds);
        record.set_value("clip_bound", ledger.bound);
        record.set_value("dims", ledger.dims);
        // For people and exports; recomputed from the ledger when read.
        record.set_value("privacy", self.spent(ledger));
        optimizer.save(&mut record);
        record
    }

    /// A fresh ChaCha20 stream of the secret for one aggregation's noise.
    fn noise_stream(&self) -> ChaCha20Rng {
        let mut rng = ChaCha20Rng::from_seed(self.secret);
        rng.set_stream(self.draws.fetch_add(1, Ordering::Relaxed));
        rng
    }
}

/// Noise N(0, std²) added to each of `values`.
fn add_noise(rng: &mut ChaCha20Rng, values: &mut [f32], std: f64) {
    for pair in values.chunks_mut(2) {
        let (a, b) = gaussian_pair(rng);
        pair[0] = (f64::from(pair[0]) + std * a) as f32;
        if let Some(second) = pair.get_mut(1) {
            *second = (f64::from(*second) + std * b) as f32;
        }
    }
}

fn clip_bound(config: &StrategyConfig) -> f32 {
    match config.clipping {
        Clipping::Fixed { bound } => bound,
        // `validate` refuses anything else; a bound of 1 keeps a stray config safe.
        _ => 1.0,
    }
}

/// δ = 1 / N^1.1: below 1/N, so that no single client's text may leak whole.
pub fn default_delta(population: usize) -> f64 {
    1.0 / (population.max(2) as f64).powf(1.1)
}

fn saved_ledger(record: &StateRecord) -> Result<Ledger, String> {
    let rdp: Vec<f64> = record
        .value::<Vec<Option<f64>>>("rdp")?
        .into_iter()
        .map(|r| r.unwrap_or(f64::INFINITY))
        .collect();
    if rdp.len() != default_orders().len() {
        return Err(format!(
            "the saved privacy ledger has {} orders, this build {}",
            rdp.len(),
            default_orders().len()
        ));
    }
    Ok(Ledger {
        rdp,
        rounds: record.value("rounds")?,
        bound: record.value("clip_bound")?,
        // Written since distributed DP; a restore fills it in.
        dims: record.value("dims").unwrap_or(0),
    })
}

/// Two independent standard normal draws (Box–Muller on 53-bit uniforms).
fn gaussian_pair(rng: &mut ChaCha20Rng) -> (f64, f64) {
    let unit = |rng: &mut ChaCha20Rng| ((rng.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64;
    let radius = (-2.0 * unit(rng).ln()).sqrt();
    let angle = std::f64::consts::TAU * unit(rng);
    (radius * angle.cos(), radius * angle.sin())
}

impl Strategy for DpFedAvg {
    fn describe(&self) -> BTreeMap<&'static str, String> {
        BTreeMap::from([
            ("strategy", KIND.to_owned()),
            (
                "clipping",
                match self.config.dp.adaptive {
                    None => format!("fixed at {}", clip_bound(&self.config)),
                    Some(a) => format!(
                        "adaptive from {} to the {} quantile (count noise {})",
                        clip_bound(&self.config),
                        a.quantile,
                        a.count_noise
                    ),
                },
            ),
            ("aggregation", "noised sum / expected clients".to_owned()),
            (
                "sampling",
                format!("poisson, q = {:.5}", self.sampling_rate()),
            ),
            (
                "noise_multiplier",
                self.config.dp.noise_multiplier.to_string(),
            ),
            (
                "server_optimizer",
                self.config.server_optimizer.name().to_owned(),
            ),
        ])
    }

    fn config(&self) -> &StrategyConfig {
        &self.config
    }

    fn seed(&self) -> u64 {
        self.seed
    }

    /// Every round closes with whatever its sample delivered, none included (the
    /// sum is then noise alone, and is charged): drawing again after an empty or
    /// silent sample would raise a client's chance of taking part above q. The
    /// fixed denominator keeps a small round unbiased.
    fn quorum(&self) -> usize {
        0
    }

    /// Poisson sampling: each candidate independently with probability q, from a
    /// stream of the secret keyed by round and attempt.
    fn configure_round(
        &self,
        round: u64,
        attempt: u32,
        candidates: &[Candidate],
        _failed: &BTreeSet<u64>,
    ) -> Option<Vec<u64>> {
        if candidates.len() < self.config.min_clients {
            return None;
        }
        let mut rng = ChaCha20Rng::from_seed(self.secret);
        rng.set_stream(SAMPLING_STREAMS | (round << 20) | u64::from(attempt & 0xF_FFFF));
        let q = self.sampling_rate();
        let mut ordered: Vec<u64> = candidates.iter().map(|c| c.client).collect();
        ordered.sort_unstable();
        Some(
            ordered
                .into_iter()
                .filter(|_| ((rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < q)
                .collect(),
        )
    }

    fn initial_state(&self, num_params: usize) -> StateRecord {
        let ledger = Ledger {
            rdp: vec![0.0; default_orders().len()],
            rounds: 0,
            bound: clip_bound(&self.config),
            dims: num_params,
        };
        self.record(
            &ServerOptimizer::new(self.config.server_optimizer, num_params),
            &ledger,
        )
    }

    fn restore(&self, mut saved: StateRecord, num_params: usize) -> Result<StateRecord, String> {
        saved.check(KIND, VERSION)?;
        let mut ledger = saved_ledger(&saved)?;
        ledger.dims = num_params;
        if self.config.dp.adaptive.is_none() {
            ledger.bound = clip_bound(&self.config);
        }
        let optimizer =
            ServerOptimizer::restore_or_fresh(&mut saved, self.config.server_optimizer, num_params);
        Ok(self.record(&optimizer, &ledger))
    }

    fn open_round(&self, state: &StateRecord, num_params: usize) -> Result<OpenUpdates, FedError> {
        let ledger = saved_ledger(state).map_err(|_| FedError::ForeignRound)?;
        self.folding.open_part(Some(ledger.bound), num_params)
    }

    fn accept(
        &self,
        open: &mut OpenUpdates,
        delta: &CheckedDelta,
        claimed: u64,
        allowed: u64,
    ) -> Result<(), FedError> {
        self.folding.accept(open, delta, claimed, allowed)
    }

    fn aggregate(
        &self,
        open: &OpenUpdates,
        weights: &[f32],
        state: &StateRecord,
    ) -> Result<Aggregated, FedError> {
        let part = self.folding.part(open)?;
        self.combine(&[part], None, weights, state)
    }

    fn ordered_bound(&self, state: &StateRecord) -> Result<Option<f32>, FedError> {
        let ledger = saved_ledger(state).map_err(|_| FedError::ForeignRound)?;
        Ok(Some(ledger.bound))
    }

    /// An edge clips to the bound the root ordered.
    fn open_part(&self, bound: Option<f32>, num_params: usize) -> Result<OpenUpdates, FedError> {
        let bound = bound.unwrap_or_else(|| clip_bound(&self.config));
        self.folding.open_part(Some(bound), num_params)
    }

    fn part(&self, open: &OpenUpdates) -> Result<Partial, FedError> {
        self.folding.part(open)
    }

    fn combine(
        &self,
        parts: &[Partial],
        _bound: Option<f32>,
        weights: &[f32],
        state: &StateRecord,
    ) -> Result<Aggregated, FedError> {
        let mut ledger = saved_ledger(state).map_err(|_| FedError::ForeignRound)?;
        let mut sum = vec![0f32; weights.len()];
        let mut norms = Vec::new();
        for part in parts.iter().filter(|p| p.updates > 0) {
            if part.sum.len() != weights.len() {
                return Err(FedError::WrongLength {
                    expected: weights.len(),
                    found: part.sum.len(),
                });
            }
            for (s, v) in sum.iter_mut().zip(&part.sum) {
                *s += v;
            }
            norms.extend_from_slice(&part.norms);
        }
        let bound = ledger.bound;
        let dp = self.config.dp;
        let mut rng = self.noise_stream();
        // Under distributed DP the devices noised the sum already.
        if dp.distributed.is_none() {
            add_noise(&mut rng, &mut sum, dp.update_noise() * f64::from(bound));
        }
        let expected = self.expected_clients();
        if let Some(adaptive) = dp.adaptive {
            // Σ (bᵢ − ½) over the updates, noised: one client moves it by ½.
            let under = norms.iter().filter(|&&n| !over(n, bound)).count() as f64;
            let noised =
                under - norms.len() as f64 / 2.0 + adaptive.count_noise * gaussian_pair(&mut rng).0;
            let fraction = noised / expected + 0.5;
            let next =
                f64::from(bound) * (-adaptive.learning_rate * (fraction - adaptive.quantile)).exp();
            ledger.bound = (next as f32).clamp(f32::MIN_POSITIVE, f32::MAX);
        }
        let delta: Vec<f32> = sum
            .iter()
            .map(|&s| (f64::from(s) / expected) as f32)
            .collect();
        if delta.iter().any(|v| !v.is_finite()) {
            return Err(FedError::NonFiniteModel);
        }
        let (new_weights, optimizer) =
            server_step(self.config.server_optimizer, state, weights, &delta)?;
        for (spent, round) in ledger.rdp.iter_mut().zip(self.round_rdp(weights.len())) {
            *spent += round;
        }
        ledger.rounds += 1;
        ledger.dims = weights.len();
        Ok(Aggregated {
            weights: new_weights,
            state: self.record(&optimizer, &ledger),
            clip_bound: Some(f64::from(bound)),
            clipped: norms.iter().filter(|&&n| over(n, bound)).count(),
            median_norm: median_norm(&norms),
        })
    }

    fn device_noise(&self, dims: usize) -> Result<Option<DeviceNoisePlan>, String> {
        self.device_noise_plan(dims).transpose()
    }

    fn privacy(&self, state: &StateRecord) -> Option<PrivacySpent> {
        saved_ledger(state).ok().map(|ledger| self.spent(&ledger))
    }

    fn admits_next_round(&self, state: &StateRecord) -> Result<(), String> {
        let Some(budget) = self.config.dp.epsilon_budget else {
            return Ok(());
        };
        let mut ledger = saved_ledger(state)?;
        for (spent, round) in ledger.rdp.iter_mut().zip(self.round_rdp(ledger.dims)) {
            *spent += round;
        }
        ledger.rounds += 1;
        let next = self.spent(&ledger);
        if next.epsilon > budget {
            return Err(format!(
                "round {} would spend ε = {:.3} (δ = {:.2e}), over the budget of {budget}: training stopped after {} rounds at ε = {:.3}",
                ledger.rounds,
                next.epsilon,
                next.delta,
                ledger.rounds - 1,
                self.privacy(state).map_or(0.0, |p| p.epsilon),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
