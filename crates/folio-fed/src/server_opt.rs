//! Server optimizers: how the mean client delta moves the global weights.
//!
//! With Δ the round's mean delta (Reddi et al. 2020, "Adaptive Federated
//! Optimization", Algorithm 2; FedAvgM from Hsu et al. 2019):
//!
//! ```text
//! FedAvg      x += η Δ
//! FedAvgM     m = β m + Δ;                          x += η m
//! FedAdagrad  m = β1 m + (1−β1) Δ;  v = v + Δ²;      x += η m / (√v + τ)
//! FedAdam     m = β1 m + (1−β1) Δ;  v = β2 v + (1−β2) Δ²;                    x += η m / (√v + τ)
//! FedYogi     m = β1 m + (1−β1) Δ;  v = v − (1−β2) Δ² sign(v − Δ²);          x += η m / (√v + τ)
//! ```
//!
//! `v` starts at τ², as in the paper.

use serde::{Deserialize, Serialize};

use crate::FedError;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum ServerOptimizerConfig {
    FedAvg {
        lr: f32,
    },
    FedAvgM {
        lr: f32,
        momentum: f32,
    },
    FedAdagrad {
        lr: f32,
        beta1: f32,
        tau: f32,
    },
    FedAdam {
        lr: f32,
        beta1: f32,
        beta2: f32,
        tau: f32,
    },
    FedYogi {
        lr: f32,
        beta1: f32,
        beta2: f32,
        tau: f32,
    },
}

impl ServerOptimizerConfig {
    /// Plain FedAvg: the new global model is the weighted mean of the clients'.
    pub fn fedavg() -> Self {
        Self::FedAvg { lr: 1.0 }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::FedAvg { .. } => "fedavg",
            Self::FedAvgM { .. } => "fedavgm",
            Self::FedAdagrad { .. } => "fedadagrad",
            Self::FedAdam { .. } => "fedadam",
            Self::FedYogi { .. } => "fedyogi",
        }
    }
}

/// Server optimizer with its state (momentum `m`, second moment `v`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerOptimizer {
    pub config: ServerOptimizerConfig,
    /// First moment (momentum); empty for FedAvg.
    pub m: Vec<f32>,
    /// Second moment; empty unless adaptive.
    pub v: Vec<f32>,
}

impl ServerOptimizer {
    pub fn new(config: ServerOptimizerConfig, num_params: usize) -> Self {
        let (m, v) = match config {
            ServerOptimizerConfig::FedAvg { .. } => (0, None),
            ServerOptimizerConfig::FedAvgM { .. } => (num_params, None),
            ServerOptimizerConfig::FedAdagrad { tau, .. }
            | ServerOptimizerConfig::FedAdam { tau, .. }
            | ServerOptimizerConfig::FedYogi { tau, .. } => (num_params, Some(tau * tau)),
        };
        Self {
            config,
            m: vec![0.0; m],
            v: v.map_or_else(Vec::new, |init| vec![init; num_params]),
        }
    }

    /// Applies the round's mean delta to `weights`.
    pub fn step(&mut self, weights: &mut [f32], delta: &[f32]) -> Result<(), FedError> {
        if delta.len() != weights.len() {
            return Err(FedError::WrongLength {
                expected: weights.len(),
                found: delta.len(),
            });
        }
        match self.config {
            ServerOptimizerConfig::FedAvg { lr } => {
                for (w, d) in weights.iter_mut().zip(delta) {
                    *w += lr * d;
                }
            }
            ServerOptimizerConfig::FedAvgM { lr, momentum } => {
                for ((w, m), d) in weights.iter_mut().zip(&mut self.m).zip(delta) {
                    *m = momentum * *m + d;
                    *w += lr * *m;
                }
            }
            ServerOptimizerConfig::FedAdagrad { lr, beta1, tau } => {
                self.adaptive(weights, delta, lr, beta1, tau, |v, d2| v + d2)
            }
            ServerOptimizerConfig::FedAdam {
                lr,
                beta1,
                beta2,
                tau,
            } => self.adaptive(weights, delta, lr, beta1, tau, |v, d2| {
                beta2 * v + (1.0 - beta2) * d2
            }),
            ServerOptimizerConfig::FedYogi {
                lr,
                beta1,
                beta2,
                tau,
            } => self.adaptive(weights, delta, lr, beta1, tau, |v, d2| {
                v - (1.0 - beta2) * d2 * (v - d2).signum()
            }),
        }
        Ok(())
    }

    fn adaptive(
        &mut self,
        weights: &mut [f32],
        delta: &[f32],
        lr: f32,
        beta1: f32,
        tau: f32,
        second_moment: impl Fn(f32, f32) -> f32,
    ) {
        for (((w, m), v), d) in weights
            .iter_mut()
            .zip(&mut self.m)
            .zip(&mut self.v)
            .zip(delta)
        {
            *m = beta1 * *m + (1.0 - beta1) * d;
            *v = second_moment(*v, d * d);
            *w += lr * *m / (v.sqrt() + tau);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fedavg_applies_the_mean_delta() {
        let mut opt = ServerOptimizer::new(ServerOptimizerConfig::fedavg(), 2);
        let mut w = vec![1.0, 2.0];
        opt.step(&mut w, &[0.5, -1.0]).unwrap();
        assert_eq!(w, vec![1.5, 1.0]);
    }

    #[test]
    fn fedavgm_accumulates_momentum() {
        let mut opt = ServerOptimizer::new(
            ServerOptimizerConfig::FedAvgM {
                lr: 1.0,
                momentum: 0.5,
            },
            1,
        );
        let mut w = vec![0.0];
        opt.step(&mut w, &[1.0]).unwrap();
        opt.step(&mut w, &[1.0]).unwrap();
        assert_eq!(w, vec![1.0 + 1.5]);
    }

    #[test]
    fn adaptive_optimizers_follow_reddi_et_al() {
        let (lr, beta1, beta2, tau) = (0.1f32, 0.9f32, 0.99f32, 1e-3f32);
        let d = 0.2f32;
        let m = (1.0 - beta1) * d;
        let v0 = tau * tau;
        let expected = |v: f32| lr * m / (v.sqrt() + tau);
        let cases = [
            (
                ServerOptimizerConfig::FedAdagrad { lr, beta1, tau },
                v0 + d * d,
            ),
            (
                ServerOptimizerConfig::FedAdam {
                    lr,
                    beta1,
                    beta2,
                    tau,
                },
                beta2 * v0 + (1.0 - beta2) * d * d,
            ),
            (
                ServerOptimizerConfig::FedYogi {
                    lr,
                    beta1,
                    beta2,
                    tau,
                },
                v0 + (1.0 - beta2) * d * d,
            ),
        ];
        for (config, v) in cases {
            let mut opt = ServerOptimizer::new(config, 1);
            let mut w = vec![0.0];
            opt.step(&mut w, &[d]).unwrap();
            assert!(
                (w[0] - expected(v)).abs() < 1e-6,
                "{}: {} vs {}",
                config.name(),
                w[0],
                expected(v)
            );
        }
    }
}
