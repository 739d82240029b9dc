//! The strategy seam (Flower's `Strategy`): everything about a round that is a
//! decision rather than plumbing: which clients train, how many updates make a
//! round, how much one update may weigh, how updates are bounded and combined, and
//! how the combination moves the global model. The aggregator drives it; central
//! evaluation needs the model and stays with the aggregator.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::FedError;
use crate::codec::CheckedDelta;
use crate::robust::{Aggregation, Clipping, RoundUpdates, clip_scale};
use crate::sampling::sample_clients;
use crate::server_opt::{ServerOptimizer, ServerOptimizerConfig};

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

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StrategyConfig {
    /// Clients picked per round (among those connected).
    pub clients_per_round: usize,
    /// Connected clients needed before a round starts.
    pub min_clients: usize,
    /// Updates needed to close a round; fewer and it is abandoned.
    pub quorum: usize,
    pub weighting: Weighting,
    pub clipping: Clipping,
    pub aggregation: Aggregation,
    pub server_optimizer: ServerOptimizerConfig,
}

impl StrategyConfig {
    /// Plain FedAvg with every delta clipped to an L2 norm adapting to the median.
    pub fn fedavg(clients_per_round: usize) -> Self {
        Self {
            clients_per_round,
            min_clients: clients_per_round,
            quorum: clients_per_round,
            weighting: Weighting::Examples,
            clipping: Clipping::adaptive(1.0),
            aggregation: Aggregation::Mean,
            server_optimizer: ServerOptimizerConfig::fedavg(),
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
                initial, quantile, ..
            } if bad_bound(initial) || !(0.0..=1.0).contains(&quantile) => {
                return Err(format!(
                    "adaptive clipping needs a positive initial bound ({initial}) and a quantile in [0, 1] ({quantile})"
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
        Ok(())
    }
}

/// What the strategy carries from round to round (persisted with the model).
#[derive(Debug, Clone, PartialEq)]
pub struct StrategyState {
    pub optimizer: ServerOptimizer,
    /// This round's clipping bound.
    pub clip_bound: f32,
}

/// One round's accepted updates, and the norms they had before clipping.
#[derive(Debug, Clone)]
pub struct OpenUpdates {
    updates: RoundUpdates,
    norms: Vec<f64>,
    clip_bound: f32,
    num_params: usize,
}

impl OpenUpdates {
    pub fn len(&self) -> usize {
        self.updates.updates()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A round's result, not yet the global model: the aggregator commits it (weights,
/// optimizer state and history together) only once it is evaluated and saved.
#[derive(Debug, Clone)]
pub struct Aggregated {
    pub weights: Vec<f32>,
    pub state: StrategyState,
    /// Deltas whose norm was above the bound.
    pub clipped: usize,
    pub updates: usize,
    /// The median L2 norm of the round's deltas, before clipping.
    pub median_norm: f64,
}

pub trait Strategy: Send + Sync {
    fn config(&self) -> &StrategyConfig;

    /// The clients to train in attempt `attempt` of `round`, from those connected;
    /// `None` while too few are. Clients that failed an earlier attempt of the
    /// round are avoided while enough others are connected.
    fn configure_round(
        &self,
        round: u64,
        attempt: u32,
        connected: &[u64],
        failed: &BTreeSet<u64>,
    ) -> Option<Vec<u64>>;

    /// Updates needed to close a round.
    fn quorum(&self) -> usize {
        self.config().quorum
    }

    fn open_round(&self, state: &StrategyState, num_params: usize) -> OpenUpdates;

    /// Checks, bounds and folds in one update: `claimed` examples, of at most
    /// `allowed` for that client this round. A refused update changes nothing.
    fn accept(
        &self,
        open: &mut OpenUpdates,
        delta: &CheckedDelta,
        claimed: u64,
        allowed: u64,
    ) -> Result<(), FedError>;

    /// The round's new weights and state; refuses to produce a non-finite model.
    fn aggregate(
        &self,
        open: &OpenUpdates,
        weights: &[f32],
        state: &StrategyState,
    ) -> Result<Aggregated, FedError>;
}

/// FedAvg hardened for untrusted clients: server-bounded weights, L2 clipping,
/// mean / trimmed mean / median, then any server optimizer.
#[derive(Debug, Clone)]
pub struct RobustFedAvg {
    pub config: StrategyConfig,
    pub seed: u64,
}

impl RobustFedAvg {
    pub fn new(config: StrategyConfig, seed: u64) -> Self {
        Self { config, seed }
    }

    /// The state of a fresh federation.
    pub fn initial_state(&self, num_params: usize) -> StrategyState {
        StrategyState {
            optimizer: ServerOptimizer::new(self.config.server_optimizer, num_params),
            clip_bound: self.config.clipping.initial_bound(),
        }
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

impl Strategy for RobustFedAvg {
    fn config(&self) -> &StrategyConfig {
        &self.config
    }

    fn configure_round(
        &self,
        round: u64,
        attempt: u32,
        connected: &[u64],
        failed: &BTreeSet<u64>,
    ) -> Option<Vec<u64>> {
        let min = self.config.min_clients;
        if connected.len() < min {
            return None;
        }
        let fresh: Vec<u64> = connected
            .iter()
            .copied()
            .filter(|c| !failed.contains(c))
            .collect();
        let candidates = if fresh.len() >= min {
            &fresh
        } else {
            connected
        };
        let seed = self.seed ^ u64::from(attempt).wrapping_mul(0xD1B5_4A32_D192_ED03);
        Some(sample_clients(
            candidates,
            self.config.clients_per_round,
            seed,
            round,
        ))
    }

    fn open_round(&self, state: &StrategyState, num_params: usize) -> OpenUpdates {
        OpenUpdates {
            updates: RoundUpdates::new(self.config.aggregation, num_params),
            norms: Vec::new(),
            clip_bound: state.clip_bound,
            num_params,
        }
    }

    fn accept(
        &self,
        open: &mut OpenUpdates,
        delta: &CheckedDelta,
        claimed: u64,
        allowed: u64,
    ) -> Result<(), FedError> {
        if delta.len() != open.num_params {
            return Err(FedError::WrongLength {
                expected: open.num_params,
                found: delta.len(),
            });
        }
        if claimed == 0 || claimed > allowed {
            return Err(FedError::BadExamples { claimed, allowed });
        }
        let weight = match self.config.weighting {
            Weighting::Examples => claimed as f64,
            Weighting::Uniform => 1.0,
        };
        open.norms.push(delta.norm());
        open.updates
            .add(delta, weight, clip_scale(delta.norm(), open.clip_bound));
        Ok(())
    }

    fn aggregate(
        &self,
        open: &OpenUpdates,
        weights: &[f32],
        state: &StrategyState,
    ) -> Result<Aggregated, FedError> {
        let delta = open.updates.aggregate(self.config.aggregation)?;
        let mut next = StrategyState {
            optimizer: state.optimizer.clone(),
            clip_bound: self
                .config
                .clipping
                .next_bound(open.clip_bound, &open.norms),
        };
        let mut new_weights = weights.to_vec();
        next.optimizer.step(&mut new_weights, &delta)?;
        validate_delta(&new_weights, weights.len()).map_err(|_| FedError::NonFiniteModel)?;
        if next
            .optimizer
            .m
            .iter()
            .chain(&next.optimizer.v)
            .any(|v| !v.is_finite())
        {
            return Err(FedError::NonFiniteModel);
        }
        Ok(Aggregated {
            weights: new_weights,
            state: next,
            clipped: open
                .norms
                .iter()
                .filter(|&&n| n > f64::from(open.clip_bound))
                .count(),
            updates: open.len(),
            median_norm: {
                let mut norms = open.norms.clone();
                norms.sort_by(f64::total_cmp);
                norms.get(norms.len() / 2).copied().unwrap_or(0.0)
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(values: &[f32]) -> CheckedDelta {
        CheckedDelta::from_values(values).unwrap()
    }

    fn strategy(clipping: Clipping, aggregation: Aggregation) -> RobustFedAvg {
        RobustFedAvg::new(
            StrategyConfig {
                clipping,
                aggregation,
                ..StrategyConfig::fedavg(3)
            },
            7,
        )
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
    fn weights_are_bounded_by_the_server_not_the_client() {
        let s = strategy(Clipping::Off, Aggregation::Mean);
        let state = s.initial_state(2);
        let mut open = s.open_round(&state, 2);
        assert_eq!(
            s.accept(&mut open, &delta(&[1.0, 1.0]), u64::MAX, 40),
            Err(FedError::BadExamples {
                claimed: u64::MAX,
                allowed: 40
            })
        );
        assert!(s.accept(&mut open, &delta(&[1.0, 1.0]), 0, 40).is_err());
        s.accept(&mut open, &delta(&[1.0, 0.0]), 30, 40).unwrap();
        s.accept(&mut open, &delta(&[0.0, 4.0]), 10, 40).unwrap();
        assert_eq!(open.len(), 2);
        let out = s.aggregate(&open, &[0.0, 0.0], &state).unwrap();
        assert_eq!(out.weights, vec![0.75, 1.0]);
    }

    #[test]
    fn a_non_finite_model_is_never_produced() {
        let s = strategy(Clipping::Off, Aggregation::Mean);
        let state = s.initial_state(1);
        let mut open = s.open_round(&state, 1);
        s.accept(&mut open, &delta(&[f32::MAX]), 1, 1).unwrap();
        assert_eq!(
            s.aggregate(&open, &[f32::MAX], &state).unwrap_err(),
            FedError::NonFiniteModel
        );
        assert!(CheckedDelta::from_values(&[f32::NAN]).is_err());
        assert_eq!(
            s.accept(&mut open, &delta(&[1.0, 2.0]), 1, 1),
            Err(FedError::WrongLength {
                expected: 1,
                found: 2
            })
        );
    }

    #[test]
    fn clipping_bounds_one_attackers_pull() {
        let s = strategy(Clipping::Fixed { bound: 1.0 }, Aggregation::Mean);
        let state = s.initial_state(2);
        let mut open = s.open_round(&state, 2);
        s.accept(&mut open, &delta(&[0.1, 0.0]), 1, 1).unwrap();
        s.accept(&mut open, &delta(&[1e30, -1e30]), 1, 1).unwrap();
        let out = s.aggregate(&open, &[0.0, 0.0], &state).unwrap();
        assert!(
            crate::robust::l2_norm(&out.weights) <= 0.6,
            "{:?}",
            out.weights
        );
        assert_eq!(out.clipped, 1);
    }

    #[test]
    fn retries_avoid_clients_that_failed_while_others_remain() {
        let s = RobustFedAvg::new(
            StrategyConfig {
                min_clients: 2,
                quorum: 2,
                ..StrategyConfig::fedavg(2)
            },
            1,
        );
        let connected = [1, 2, 3, 4];
        assert_eq!(
            s.configure_round(1, 0, &connected[..1], &BTreeSet::new()),
            None
        );
        let failed = BTreeSet::from([1, 2]);
        let mut picked = s.configure_round(1, 1, &connected, &failed).unwrap();
        picked.sort();
        assert_eq!(picked, vec![3, 4]);
        // Too few fresh clients: the failed ones are asked again.
        let failed = BTreeSet::from([1, 2, 3]);
        assert_eq!(
            s.configure_round(1, 2, &connected, &failed).unwrap().len(),
            2
        );
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
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
