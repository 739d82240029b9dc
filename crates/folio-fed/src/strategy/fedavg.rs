//! FedAvg hardened for untrusted clients: server-bounded weights, L2 clipping,
//! mean / trimmed mean / median, then any server optimizer.

use std::collections::BTreeMap;

use super::{
    Aggregated, OpenUpdates, Partial, StateRecord, Strategy, StrategyConfig, Weighting,
    check_update, median_norm, server_step,
};
use crate::FedError;
use crate::codec::CheckedDelta;
use crate::robust::{Clipping, FirstBound, RoundUpdates, clip_scale, over};
use crate::server_opt::ServerOptimizer;

const KIND: &str = "fedavg";
/// Version 2 adds the clipping bound's reference (the first round's bound).
const VERSION: u32 = 2;

#[derive(Debug, Clone)]
pub struct RobustFedAvg {
    config: StrategyConfig,
    seed: u64,
}

/// The clipping bound a federation carries between rounds.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Bound {
    /// The last bound (`None`: no round yet, or no clipping).
    current: Option<f32>,
    /// The first round's bound, which the adaptive bound's ceiling is relative to.
    reference: Option<f32>,
}

/// A round's folded updates, the bound they were clipped to and their norms.
struct Round {
    updates: RoundUpdates,
    /// Deltas kept as they came (with their weights and staleness discounts)
    /// while the round measures its own bound: the first round of adaptive
    /// clipping only.
    unclipped: Vec<(CheckedDelta, f64, f64)>,
    norms: Vec<f64>,
    /// `None`: measured from `norms` when the round closes.
    clip_bound: Option<f32>,
    reference: Option<f32>,
    num_params: usize,
}

impl RobustFedAvg {
    pub fn new(config: StrategyConfig, seed: u64) -> Self {
        Self { config, seed }
    }

    fn record(&self, optimizer: &ServerOptimizer, bound: Bound) -> StateRecord {
        let mut record = StateRecord::new(KIND, VERSION);
        // JSON has no infinity: no bound (clipping off) is saved as none.
        let finite = |b: Option<f32>| b.filter(|b| b.is_finite());
        record.set_value("clip_bound", finite(bound.current));
        record.set_value("clip_reference", finite(bound.reference));
        optimizer.save(&mut record);
        record
    }
}

/// The bound a record holds; a version-1 record's reference is its bound.
fn saved_bound(record: &StateRecord) -> Result<Bound, String> {
    let current = record.value::<Option<f32>>("clip_bound")?;
    let reference = if record.values.contains_key("clip_reference") {
        record.value::<Option<f32>>("clip_reference")?
    } else {
        current
    };
    Ok(Bound { current, reference })
}

impl Strategy for RobustFedAvg {
    fn describe(&self) -> BTreeMap<&'static str, String> {
        BTreeMap::from([
            ("strategy", KIND.to_owned()),
            ("clipping", self.config.clipping.describe()),
            ("aggregation", self.config.aggregation.name()),
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

    fn initial_state(&self, num_params: usize) -> StateRecord {
        let none = Bound {
            current: None,
            reference: None,
        };
        self.record(
            &ServerOptimizer::new(self.config.server_optimizer, num_params),
            none,
        )
    }

    fn restore(&self, mut saved: StateRecord, num_params: usize) -> Result<StateRecord, String> {
        saved.check(KIND, VERSION)?;
        let bound = saved_bound(&saved)?;
        let optimizer =
            ServerOptimizer::restore_or_fresh(&mut saved, self.config.server_optimizer, num_params);
        Ok(self.record(&optimizer, bound))
    }

    fn open_round(&self, state: &StateRecord, num_params: usize) -> Result<OpenUpdates, FedError> {
        let saved = saved_bound(state).map_err(|_| FedError::ForeignRound)?;
        let clip_bound = self.config.clipping.bound(saved.current);
        Ok(OpenUpdates::new(Round {
            updates: RoundUpdates::new(self.config.aggregation, num_params),
            unclipped: Vec::new(),
            norms: Vec::new(),
            clip_bound,
            reference: saved.reference.or(clip_bound),
            num_params,
        }))
    }

    fn accept(
        &self,
        open: &mut OpenUpdates,
        delta: &CheckedDelta,
        claimed: u64,
        allowed: u64,
    ) -> Result<(), FedError> {
        self.accept_stale(open, delta, claimed, allowed, 1.0)
    }

    fn accept_stale(
        &self,
        open: &mut OpenUpdates,
        delta: &CheckedDelta,
        claimed: u64,
        allowed: u64,
        discount: f64,
    ) -> Result<(), FedError> {
        let round: &mut Round = open.get_mut()?;
        check_update(delta, round.num_params, claimed, allowed)?;
        // (An edge's share of a round is a `Round` too.)
        let weight = match self.config.weighting {
            Weighting::Examples => claimed as f64,
            Weighting::Uniform => 1.0,
        };
        round.norms.push(delta.norm());
        match round.clip_bound {
            Some(bound) => {
                round
                    .updates
                    .add(delta, weight, clip_scale(delta.norm(), bound) * discount)
            }
            None => round.unclipped.push((delta.clone(), weight, discount)),
        }
        Ok(())
    }

    fn aggregate(
        &self,
        open: &OpenUpdates,
        weights: &[f32],
        state: &StateRecord,
    ) -> Result<Aggregated, FedError> {
        let round: &Round = open.get()?;
        let clipping = self.config.clipping;
        let (delta, bound) = match round.clip_bound {
            Some(bound) => (round.updates.aggregate()?, bound),
            None => {
                let bound = clipping.measured_bound(&round.norms);
                let mut updates = RoundUpdates::new(self.config.aggregation, round.num_params);
                for (delta, weight, discount) in &round.unclipped {
                    updates.add(delta, *weight, clip_scale(delta.norm(), bound) * discount);
                }
                (updates.aggregate()?, bound)
            }
        };
        let (new_weights, optimizer) =
            server_step(self.config.server_optimizer, state, weights, &delta)?;
        let reference = round.reference.unwrap_or(bound);
        let next = Bound {
            current: Some(clipping.next_bound(bound, reference, &round.norms)),
            reference: Some(reference),
        };
        Ok(Aggregated {
            weights: new_weights,
            state: self.record(&optimizer, next),
            clip_bound: Some(f64::from(bound)).filter(|b| b.is_finite()),
            clipped: round.norms.iter().filter(|&&n| over(n, bound)).count(),
            median_norm: median_norm(&round.norms),
        })
    }

    fn ordered_bound(&self, state: &StateRecord) -> Result<Option<f32>, FedError> {
        let saved = saved_bound(state).map_err(|_| FedError::ForeignRound)?;
        Ok(match self.config.clipping {
            Clipping::Off => None,
            clipping => clipping.bound(saved.current).or(match clipping {
                Clipping::Adaptive {
                    first: FirstBound::Measured { at_most },
                    ..
                } => Some(at_most),
                _ => None,
            }),
        })
    }

    fn open_part(&self, bound: Option<f32>, num_params: usize) -> Result<OpenUpdates, FedError> {
        let bound = bound.unwrap_or(f32::INFINITY);
        Ok(OpenUpdates::new(Round {
            updates: RoundUpdates::new(self.config.aggregation, num_params),
            unclipped: Vec::new(),
            norms: Vec::new(),
            clip_bound: Some(bound),
            reference: Some(bound),
            num_params,
        }))
    }

    fn part(&self, open: &OpenUpdates) -> Result<Partial, FedError> {
        let round: &Round = open.get()?;
        let updates = round.updates.updates();
        let (sum, total_weight) = match &round.updates {
            RoundUpdates::Streaming {
                sum, total_weight, ..
            } => (sum.clone(), *total_weight),
            // Median and trimmed mean need every delta: they run per edge, and
            // the root averages the edges' results by their clients (bucketing).
            RoundUpdates::Buffered { .. } if updates > 0 => {
                let n = updates as f32;
                let result = round.updates.aggregate()?;
                (result.iter().map(|v| v * n).collect(), updates as f64)
            }
            RoundUpdates::Buffered { .. } => (Vec::new(), 0.0),
        };
        Ok(Partial {
            sum: if updates == 0 { Vec::new() } else { sum },
            total_weight,
            updates,
            norms: round.norms.clone(),
        })
    }

    fn combine(
        &self,
        parts: &[Partial],
        bound: Option<f32>,
        weights: &[f32],
        state: &StateRecord,
    ) -> Result<Aggregated, FedError> {
        let mut sum = vec![0f32; weights.len()];
        let mut total_weight = 0.0;
        let mut norms = Vec::new();
        let mut updates = 0;
        for part in parts.iter().filter(|p| p.updates > 0) {
            updates += part.updates;
            if part.sum.len() != weights.len() {
                return Err(FedError::WrongLength {
                    expected: weights.len(),
                    found: part.sum.len(),
                });
            }
            for (s, v) in sum.iter_mut().zip(&part.sum) {
                *s += v;
            }
            total_weight += part.total_weight;
            norms.extend_from_slice(&part.norms);
        }
        // (A secure round's sum comes without its clients' norms.)
        if updates == 0 || total_weight.is_nan() || total_weight <= 0.0 {
            return Err(FedError::NoUpdates);
        }
        let delta: Vec<f32> = sum
            .iter()
            .map(|&s| (f64::from(s) / total_weight) as f32)
            .collect();
        if delta.iter().any(|v| !v.is_finite()) {
            return Err(FedError::NonFiniteModel);
        }
        let (new_weights, optimizer) =
            server_step(self.config.server_optimizer, state, weights, &delta)?;
        let bound = bound.unwrap_or(f32::INFINITY);
        let saved = saved_bound(state).map_err(|_| FedError::ForeignRound)?;
        let reference = saved.reference.unwrap_or(bound);
        let next = Bound {
            current: Some(self.config.clipping.next_bound(bound, reference, &norms)),
            reference: Some(reference),
        };
        Ok(Aggregated {
            weights: new_weights,
            state: self.record(&optimizer, next),
            clip_bound: Some(f64::from(bound)).filter(|b| b.is_finite()),
            clipped: norms.iter().filter(|&&n| over(n, bound)).count(),
            median_norm: median_norm(&norms),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::robust::{Aggregation, Clipping};
    use crate::server_opt::ServerOptimizerConfig;

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
    fn weights_are_bounded_by_the_server_not_the_client() {
        let s = strategy(Clipping::Off, Aggregation::Mean);
        let state = s.initial_state(2);
        let mut open = s.open_round(&state, 2).unwrap();
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
        let out = s.aggregate(&open, &[0.0, 0.0], &state).unwrap();
        assert_eq!(out.weights, vec![0.75, 1.0]);
    }

    #[test]
    fn a_non_finite_model_is_never_produced() {
        let s = strategy(Clipping::Off, Aggregation::Mean);
        let state = s.initial_state(1);
        let mut open = s.open_round(&state, 1).unwrap();
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
        let mut open = s.open_round(&state, 2).unwrap();
        s.accept(&mut open, &delta(&[0.1, 0.0]), 1, 1).unwrap();
        s.accept(&mut open, &delta(&[1e30, -1e30]), 1, 1).unwrap();
        let out = s.aggregate(&open, &[0.0, 0.0], &state).unwrap();
        assert!(
            crate::robust::l2_norm(&out.weights) <= 0.6,
            "{:?}",
            out.weights
        );
        assert_eq!(out.clipped, 1);
        assert_eq!(out.clip_bound, Some(1.0));
    }

    #[test]
    fn the_first_round_measures_the_bound_and_a_crowd_lifts_it_no_higher_than_twice() {
        let s = strategy(Clipping::adaptive(1.0), Aggregation::Mean);
        let mut state = s.initial_state(1);
        let mut weights = vec![0.0f32];
        let mut bounds = Vec::new();
        for round in 0..30 {
            let mut open = s.open_round(&state, 1).unwrap();
            // Round 1: three honest, two huge; then one honest against four.
            let honest = if round == 0 { 3 } else { 1 };
            for i in 0..5 {
                let value = if i < honest { 0.1 } else { 1e6 };
                s.accept(&mut open, &delta(&[value]), 1, 1).unwrap();
            }
            let out = s.aggregate(&open, &weights, &state).unwrap();
            bounds.push(out.clip_bound.unwrap());
            (weights, state) = (out.weights, out.state);
        }
        assert!(
            (bounds[0] - 0.1).abs() < 1e-6,
            "the median of round 1: {bounds:?}"
        );
        assert!(bounds.iter().all(|&b| b <= 0.2 + 1e-6), "{bounds:?}");
        assert!((bounds[29] - 0.2).abs() < 1e-6, "{bounds:?}");
        // Restored, the state keeps the ceiling's reference.
        let restored = s.restore(state.clone(), 1).unwrap();
        assert_eq!(restored, state);
    }

    #[test]
    fn the_state_round_trips_and_moments_survive_a_new_learning_rate_only() {
        let adam = |lr| StrategyConfig {
            server_optimizer: ServerOptimizerConfig::FedAdam {
                lr,
                beta1: 0.9,
                beta2: 0.99,
                tau: 1e-6,
                bias_correction: false,
            },
            ..StrategyConfig::fedavg(1)
        };
        let s = RobustFedAvg::new(adam(1e-2), 0);
        let state = s.initial_state(2);
        let mut open = s.open_round(&state, 2).unwrap();
        s.accept(&mut open, &delta(&[0.5, -0.5]), 1, 1).unwrap();
        let stepped = s.aggregate(&open, &[0.0, 0.0], &state).unwrap().state;
        assert_ne!(stepped, state);
        let lowered = RobustFedAvg::new(adam(1e-3), 0)
            .restore(stepped.clone(), 2)
            .unwrap();
        assert_eq!(lowered.tensors, stepped.tensors, "moments kept");
        let other = RobustFedAvg::new(StrategyConfig::fedavg(1), 0)
            .restore(stepped.clone(), 2)
            .unwrap();
        assert_eq!(
            other.values.get("clip_bound"),
            stepped.values.get("clip_bound"),
            "another optimizer starts its moments afresh and keeps the rest"
        );
        assert!(
            s.restore(stepped, 3).is_ok(),
            "another model size: fresh moments"
        );
    }

    #[test]
    fn edges_shares_combine_to_the_single_servers_round() {
        for (clipping, aggregation) in [
            (Clipping::Fixed { bound: 1.0 }, Aggregation::Mean),
            (Clipping::adaptive_to(1.0, 2.0), Aggregation::Mean),
            (Clipping::Off, Aggregation::Median),
        ] {
            let s = strategy(clipping, aggregation);
            let mut state = s.initial_state(3);
            let mut weights = vec![0.5f32, -0.5, 0.0];
            let deltas: Vec<(Vec<f32>, u64)> = (0..6)
                .map(|i| {
                    let x = i as f32;
                    (vec![0.1 * x, -0.3 + 0.05 * x, 2.0 - x * x * 0.2], 1 + i)
                })
                .collect();
            for _ in 0..3 {
                // One server with every update.
                let bound = s.ordered_bound(&state).unwrap();
                let mut whole = s.open_part(bound, 3).unwrap();
                for (d, examples) in &deltas {
                    s.accept(&mut whole, &delta(d), *examples, 10).unwrap();
                }
                let one = s.combine(&[s.part(&whole).unwrap()], bound, &weights, &state);
                if clipping != Clipping::adaptive_to(1.0, 2.0) {
                    // Where the bound is known beforehand, one share is the
                    // single server's round exactly.
                    let mut open = s.open_round(&state, 3).unwrap();
                    for (d, examples) in &deltas {
                        s.accept(&mut open, &delta(d), *examples, 10).unwrap();
                    }
                    let single = s.aggregate(&open, &weights, &state).unwrap();
                    assert_eq!(one.as_ref().unwrap().weights, single.weights);
                }
                // Three edges, one with none.
                let mut edges: Vec<OpenUpdates> =
                    (0..3).map(|_| s.open_part(bound, 3).unwrap()).collect();
                for (i, (d, examples)) in deltas.iter().enumerate() {
                    s.accept(&mut edges[i % 2], &delta(d), *examples, 10)
                        .unwrap();
                }
                let parts: Vec<Partial> = edges.iter().map(|e| s.part(e).unwrap()).collect();
                let split = s.combine(&parts, bound, &weights, &state).unwrap();
                let one = one.unwrap();
                assert_eq!(split.clip_bound, one.clip_bound);
                assert_eq!(split.clipped, one.clipped);
                if aggregation == Aggregation::Mean {
                    for (a, b) in split.weights.iter().zip(&one.weights) {
                        assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{a} vs {b}");
                    }
                    assert_eq!(split.state.values, one.state.values);
                }
                (weights, state) = (split.weights, split.state);
            }
        }
    }

    #[test]
    fn a_measured_first_bound_is_ordered_at_its_limit_and_nothing_combines_to_no_round() {
        let s = strategy(Clipping::adaptive(0.8), Aggregation::Mean);
        let state = s.initial_state(1);
        assert_eq!(s.ordered_bound(&state), Ok(Some(0.8)));
        let off = strategy(Clipping::Off, Aggregation::Mean);
        assert_eq!(off.ordered_bound(&off.initial_state(1)), Ok(None));
        let empty = s.part(&s.open_part(Some(0.8), 1).unwrap()).unwrap();
        assert_eq!(
            s.combine(&[empty], Some(0.8), &[0.0], &state).unwrap_err(),
            FedError::NoUpdates
        );
    }
}
