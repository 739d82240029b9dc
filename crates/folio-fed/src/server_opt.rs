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
//! `v` starts at τ², as in the paper. FedAdam can also correct its moments' bias
//! toward their zero start as Adam does (Kingma & Ba 2015): m / (1 − β1ᵗ) and
//! v / (1 − β2ᵗ) after t steps, so that its first rounds' steps are not inflated
//! by a second moment still near zero (which matters most with β2 near 1).

use serde::{Deserialize, Serialize};

use crate::FedError;
use crate::strategy::StateRecord;

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
        #[serde(default)]
        bias_correction: bool,
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

    /// The learning rate a round's step is scaled by.
    pub fn lr(&self) -> f32 {
        match *self {
            Self::FedAvg { lr }
            | Self::FedAvgM { lr, .. }
            | Self::FedAdagrad { lr, .. }
            | Self::FedAdam { lr, .. }
            | Self::FedYogi { lr, .. } => lr,
        }
    }

    /// Whether moments accumulated under `saved` remain valid under `self`: the
    /// same optimizer, differing at most in its learning rate (a schedule, say,
    /// lowering it between sittings of a run).
    pub fn keeps_moments_of(&self, saved: &Self) -> bool {
        let mut saved = *saved;
        match &mut saved {
            Self::FedAvg { lr }
            | Self::FedAvgM { lr, .. }
            | Self::FedAdagrad { lr, .. }
            | Self::FedAdam { lr, .. }
            | Self::FedYogi { lr, .. } => *lr = self.lr(),
        }
        saved == *self
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
    /// Steps taken since the moments started (for FedAdam's bias correction).
    #[serde(default)]
    pub steps: u64,
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
            steps: 0,
        }
    }

    /// Writes its settings, step count and moments into a strategy's record.
    pub fn save(&self, record: &mut StateRecord) {
        record.set_value("server_optimizer", self.config);
        record.set_value("server_steps", self.steps);
        record.tensors.insert("server_m".into(), self.m.clone());
        record.tensors.insert("server_v".into(), self.v.clone());
    }

    /// The optimizer a record saved, continued under `config`: its moments
    /// survive a new learning rate (a schedule across sittings), not a new
    /// optimizer or new β / τ, nor another model size.
    pub fn restore(
        record: &mut StateRecord,
        config: ServerOptimizerConfig,
        num_params: usize,
    ) -> Result<Self, String> {
        let saved: ServerOptimizerConfig = record.value("server_optimizer")?;
        if !config.keeps_moments_of(&saved) {
            return Err(format!(
                "the saved moments are {}'s with other settings",
                saved.name()
            ));
        }
        let restored = Self {
            config,
            steps: record.value("server_steps")?,
            m: record.take_tensor("server_m")?,
            v: record.take_tensor("server_v")?,
        };
        let fresh = Self::new(config, num_params);
        if (restored.m.len(), restored.v.len()) != (fresh.m.len(), fresh.v.len()) {
            return Err(format!(
                "the saved moments are for {} parameters, the model has {num_params}",
                restored.m.len().max(restored.v.len())
            ));
        }
        Ok(restored)
    }

    /// The saved moments where they fit `config` and the model; otherwise
    /// fresh ones (another server optimizer, or other settings of its
    /// moments): what else the state holds — a DP ledger, a clip bound —
    /// carries on whatever the optimizer.
    pub fn restore_or_fresh(
        record: &mut StateRecord,
        config: ServerOptimizerConfig,
        num_params: usize,
    ) -> Self {
        Self::restore(record, config, num_params).unwrap_or_else(|_| Self::new(config, num_params))
    }

    /// Whether every moment is finite.
    pub fn is_finite(&self) -> bool {
        self.m.iter().chain(&self.v).all(|v| v.is_finite())
    }

    /// Applies the round's mean delta to `weights`.
    pub fn step(&mut self, weights: &mut [f32], delta: &[f32]) -> Result<(), FedError> {
        if delta.len() != weights.len() {
            return Err(FedError::WrongLength {
                expected: weights.len(),
                found: delta.len(),
            });
        }
        self.steps += 1;
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
                self.adaptive(weights, delta, (lr, 1.0), beta1, tau, |v, d2| v + d2)
            }
            ServerOptimizerConfig::FedAdam {
                lr,
                beta1,
                beta2,
                tau,
                bias_correction,
            } => {
                // Adam's bias correction folded into the step size and τ:
                // η m̂ / (√v̂ + τ) = η √(1−β2ᵗ) / (1−β1ᵗ) · m / (√v + τ √(1−β2ᵗ)).
                let scales = if bias_correction {
                    let t = self.steps.min(i32::MAX as u64) as i32;
                    let root = (1.0 - beta2.powi(t)).sqrt();
                    (lr * root / (1.0 - beta1.powi(t)), root)
                } else {
                    (lr, 1.0)
                };
                self.adaptive(weights, delta, scales, beta1, tau, |v, d2| {
                    beta2 * v + (1.0 - beta2) * d2
                })
            }
            ServerOptimizerConfig::FedYogi {
                lr,
                beta1,
                beta2,
                tau,
            } => self.adaptive(weights, delta, (lr, 1.0), beta1, tau, |v, d2| {
                v - (1.0 - beta2) * d2 * (v - d2).signum()
            }),
        }
        Ok(())
    }

    fn adaptive(
        &mut self,
        weights: &mut [f32],
        delta: &[f32],
        (lr, tau_scale): (f32, f32),
        beta1: f32,
        tau: f32,
        second_moment: impl Fn(f32, f32) -> f32,
    ) {
        let tau = tau * tau_scale;
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
    fn bias_corrected_fedadam_takes_adams_steps() {
        let (lr, beta1, beta2, tau) = (0.01f32, 0.9f32, 0.999f32, 1e-8f32);
        let mut opt = ServerOptimizer::new(
            ServerOptimizerConfig::FedAdam {
                lr,
                beta1,
                beta2,
                tau,
                bias_correction: true,
            },
            1,
        );
        // Adam (Kingma & Ba) on the same deltas, moments from zero.
        let (mut w, mut expected, mut m, mut v) = (vec![0.0f32], 0.0f32, 0.0f32, 0.0f32);
        for (t, d) in [0.5f32, -0.25, 0.125].into_iter().enumerate() {
            opt.step(&mut w, &[d]).unwrap();
            let t = t as i32 + 1;
            if t == 1 {
                // lr in the delta's direction, not inflated by v's zero start.
                assert!((w[0] - lr).abs() < 1e-6, "{}", w[0]);
            }
            m = beta1 * m + (1.0 - beta1) * d;
            v = beta2 * v + (1.0 - beta2) * d * d;
            let (m_hat, v_hat) = (m / (1.0 - beta1.powi(t)), v / (1.0 - beta2.powi(t)));
            expected += lr * m_hat / (v_hat.sqrt() + tau);
            assert!(
                (w[0] - expected).abs() < 1e-6,
                "step {t}: {} vs {expected}",
                w[0]
            );
        }
        assert_eq!(opt.steps, 3);
    }

    #[test]
    fn moments_carry_over_a_new_learning_rate_only() {
        let adam = |lr, tau| ServerOptimizerConfig::FedAdam {
            lr,
            beta1: 0.9,
            beta2: 0.99,
            tau,
            bias_correction: false,
        };
        assert!(adam(3e-5, 1e-6).keeps_moments_of(&adam(1e-4, 1e-6)));
        assert!(!adam(1e-4, 1e-3).keeps_moments_of(&adam(1e-4, 1e-6)));
        let yogi = ServerOptimizerConfig::FedYogi {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-6,
        };
        assert!(!yogi.keeps_moments_of(&adam(1e-4, 1e-6)));
        assert!(!ServerOptimizerConfig::fedavg().keeps_moments_of(&adam(1.0, 1e-6)));
    }

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
                    bias_correction: false,
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
