//! Multi-Krum (Blanchard et al. 2017, "Machine Learning with Adversaries:
//! Byzantine Tolerant Gradient Descent"; El Mhamdi et al. 2018): of a round's n
//! updates, of which at most f may be hostile, each is scored by the sum of its
//! squared distances to its n − f − 2 nearest others; the n − f best are averaged
//! uniformly and the server optimizer takes the step. An attacker far from the
//! honest crowd scores worst and is dropped whatever its norm or example count.
//! Holds every delta of the round and compares every pair: O(n² × model) work,
//! meant for rounds of tens of clients.
//!
//! This file is the whole strategy: with its [`super::StrategyKind`] and the line
//! in [`super::build`] it is what adding a strategy takes.

use std::collections::BTreeMap;

use super::{
    Aggregated, OpenUpdates, StateRecord, Strategy, StrategyConfig, check_update, median_norm,
    server_step,
};
use crate::FedError;
use crate::codec::CheckedDelta;
use crate::server_opt::ServerOptimizer;

const KIND: &str = "krum";
const VERSION: u32 = 1;

#[derive(Debug, Clone)]
pub struct Krum {
    config: StrategyConfig,
    seed: u64,
}

struct Round {
    deltas: Vec<Vec<f32>>,
    norms: Vec<f64>,
    num_params: usize,
}

impl Krum {
    pub fn new(config: StrategyConfig, seed: u64) -> Self {
        Self { config, seed }
    }

    fn record(optimizer: &ServerOptimizer) -> StateRecord {
        let mut record = StateRecord::new(KIND, VERSION);
        optimizer.save(&mut record);
        record
    }
}

fn squared_distance(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let d = f64::from(*x) - f64::from(*y);
            d * d
        })
        .sum()
}

/// The indices of the `n − f` updates with the best Krum scores.
fn krum_select(deltas: &[Vec<f32>], byzantine: usize) -> Vec<usize> {
    let n = deltas.len();
    let neighbours = n.saturating_sub(byzantine + 2).max(1);
    let mut distances = vec![vec![0f64; n]; n];
    for i in 0..n {
        for j in i + 1..n {
            let d = squared_distance(&deltas[i], &deltas[j]);
            distances[i][j] = d;
            distances[j][i] = d;
        }
    }
    let mut scores: Vec<(f64, usize)> = (0..n)
        .map(|i| {
            let mut row: Vec<f64> = (0..n)
                .filter(|&j| j != i)
                .map(|j| distances[i][j])
                .collect();
            row.sort_by(f64::total_cmp);
            (row.iter().take(neighbours).sum(), i)
        })
        .collect();
    scores.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    scores
        .into_iter()
        .take(n.saturating_sub(byzantine).max(1))
        .map(|(_, i)| i)
        .collect()
}

impl Strategy for Krum {
    fn describe(&self) -> BTreeMap<&'static str, String> {
        BTreeMap::from([
            ("strategy", KIND.to_owned()),
            ("clipping", "off (Krum drops outliers)".to_owned()),
            (
                "aggregation",
                format!("multi-Krum (f = {})", self.config.byzantine),
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

    fn initial_state(&self, num_params: usize) -> StateRecord {
        Self::record(&ServerOptimizer::new(
            self.config.server_optimizer,
            num_params,
        ))
    }

    fn restore(&self, mut saved: StateRecord, num_params: usize) -> Result<StateRecord, String> {
        saved.check(KIND, VERSION)?;
        let optimizer =
            ServerOptimizer::restore(&mut saved, self.config.server_optimizer, num_params)?;
        Ok(Self::record(&optimizer))
    }

    fn open_round(&self, _: &StateRecord, num_params: usize) -> Result<OpenUpdates, FedError> {
        Ok(OpenUpdates::new(Round {
            deltas: Vec::new(),
            norms: Vec::new(),
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
        let round: &mut Round = open.get_mut()?;
        check_update(delta, round.num_params, claimed, allowed)?;
        round.norms.push(delta.norm());
        round.deltas.push(delta.to_vec(1.0));
        Ok(())
    }

    fn aggregate(
        &self,
        open: &OpenUpdates,
        weights: &[f32],
        state: &StateRecord,
    ) -> Result<Aggregated, FedError> {
        let round: &Round = open.get()?;
        if round.deltas.is_empty() {
            return Err(FedError::NoUpdates);
        }
        let kept = krum_select(&round.deltas, self.config.byzantine);
        let mut mean = vec![0f64; weights.len()];
        for &i in &kept {
            for (m, d) in mean.iter_mut().zip(&round.deltas[i]) {
                *m += f64::from(*d) / kept.len() as f64;
            }
        }
        let delta: Vec<f32> = mean.into_iter().map(|m| m as f32).collect();
        let (new_weights, optimizer) =
            server_step(self.config.server_optimizer, state, weights, &delta)?;
        Ok(Aggregated {
            weights: new_weights,
            state: Self::record(&optimizer),
            clip_bound: None,
            clipped: round.deltas.len() - kept.len(),
            median_norm: median_norm(&round.norms),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::StrategyKind;

    #[test]
    fn an_outlier_is_dropped_whatever_its_weight() {
        let krum = Krum::new(
            StrategyConfig {
                kind: StrategyKind::Krum,
                byzantine: 1,
                ..StrategyConfig::fedavg(5)
            },
            0,
        );
        let state = krum.initial_state(2);
        let mut open = krum.open_round(&state, 2).unwrap();
        for (values, examples) in [
            ([1.0, 2.0], 1),
            ([1.2, 2.2], 1),
            ([0.8, 1.8], 1),
            ([1.0, 2.0], 1),
            ([-50.0, 90.0], 1_000),
        ] {
            let delta = CheckedDelta::from_values(&values).unwrap();
            krum.accept(&mut open, &delta, examples, 1_000).unwrap();
        }
        let out = krum.aggregate(&open, &[0.0, 0.0], &state).unwrap();
        assert_eq!(out.clipped, 1);
        assert!(
            (out.weights[0] - 1.0).abs() < 1e-6 && (out.weights[1] - 2.0).abs() < 1e-6,
            "{:?}",
            out.weights
        );
        assert!(krum.restore(out.state, 2).is_ok());
    }
}
