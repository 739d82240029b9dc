//! The known-answer probe a device answers before it is trusted: the loss and
//! a digest of the gradient of a model and a batch that both sides build from
//! the probe's id, in plain Rust (so neither a GPU's random numbers nor a
//! download is involved). The device computes them on its backend; the
//! aggregator on its own CPU backend, and compares.
//!
//! The digest is the gradient's projections on `directions` random ±1
//! vectors (seeded by the id): each is a sum over every weight, so a wrong
//! gradient anywhere moves it by about the error's norm, while a few numbers
//! travel. Tolerance: f32 on a GPU sums in another order than the CPU; on
//! SwiftShader's WebGPU here the gradient differs from the CPU's by at most 1e-4
//! of its largest entry, and a projection's error is about the error's norm, a
//! small fraction of the gradient's. A projection may differ by [`TOLERANCE`] of
//! the gradient's norm and the loss by [`TOLERANCE`] of itself: hundreds of
//! times the worst seen on honest WebGPU (1.8e-6, `folio-web`'s browser tests),
//! far below what a scaled (× 0.99 moves it by about 1 %) or zeroed gradient moves.

use folio_data::Batch;
use folio_data::rng::SplitMix64;

use crate::config::ModelConfig;
use crate::model::CharRnn;
use crate::train::loss_and_gradients;
use burn::prelude::Device;

use crate::ModelError;

/// How far an honest device's answer may be from the aggregator's, relative to
/// the loss and to the gradient's L2 norm.
pub const TOLERANCE: f64 = 1e-3;

/// The most directions a probe may ask for.
pub const MAX_DIRECTIONS: usize = 64;

/// A probe: everything in it follows from its id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeSpec {
    pub id: u64,
    pub batch_size: usize,
    pub seq_len: usize,
    pub directions: usize,
}

impl ProbeSpec {
    /// The probe's model: every weight uniform in ±0.2, drawn from the id.
    pub fn weights(&self, config: ModelConfig) -> Vec<f32> {
        let mut rng = SplitMix64::new(self.id);
        (0..config.num_params())
            .map(|_| ((rng.next_f64() * 2.0 - 1.0) * 0.2) as f32)
            .collect()
    }

    /// The probe's batch: random characters (never the padding id 0).
    pub fn batch(&self, config: ModelConfig) -> Batch {
        let mut rng = SplitMix64::new(self.id ^ 0xBA7C_4000_0000_0001);
        let n = self.batch_size * self.seq_len;
        let mut id = || 1 + (rng.next_u64() % (config.vocab as u64 - 1)) as u32;
        let inputs: Vec<u32> = (0..n).map(|_| id()).collect();
        let targets: Vec<u32> = (0..n).map(|_| id()).collect();
        Batch {
            batch_size: self.batch_size,
            seq_len: self.seq_len,
            inputs,
            targets,
            mask: vec![1.0; n],
        }
    }

    /// The gradient's projections on the probe's ±1 directions.
    pub fn digest(&self, gradient: &[f32]) -> Vec<f32> {
        (0..self.directions)
            .map(|k| {
                let mut rng =
                    SplitMix64::new(self.id ^ (k as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                let mut sum = 0f64;
                let mut bits = 0u64;
                for (i, &g) in gradient.iter().enumerate() {
                    if i % 64 == 0 {
                        bits = rng.next_u64();
                    }
                    let sign = if bits >> (i % 64) & 1 == 1 { 1.0 } else { -1.0 };
                    sum += sign * f64::from(g);
                }
                sum as f32
            })
            .collect()
    }

    /// The probe's answer on `device`: its loss and gradient digest, and the
    /// gradient's norm (which the aggregator's tolerance is relative to).
    pub async fn measure(
        &self,
        device: &Device,
        config: ModelConfig,
    ) -> Result<Measured, ModelError> {
        let model = CharRnn::from_flat(config, &self.weights(config), &device.clone().autodiff())?;
        let (loss, gradient) = loss_and_gradients(&model, &self.batch(config)).await?;
        let norm = gradient
            .iter()
            .map(|g| f64::from(*g).powi(2))
            .sum::<f64>()
            .sqrt();
        Ok(Measured {
            loss,
            projections: self.digest(&gradient),
            gradient_norm: norm,
        })
    }
}

/// A probe's answer, as measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Measured {
    pub loss: f32,
    pub projections: Vec<f32>,
    pub gradient_norm: f64,
}

impl Measured {
    /// How far `loss` and `projections` are from these: the loss relative to
    /// itself, and the worst projection relative to the gradient's norm.
    fn errors(&self, loss: f32, projections: &[f32]) -> Result<(f64, f64), String> {
        if projections.len() != self.projections.len() {
            return Err(format!(
                "the answer has {} projections; the probe asked for {}",
                projections.len(),
                self.projections.len()
            ));
        }
        if !loss.is_finite() || projections.iter().any(|p| !p.is_finite()) {
            return Err("the answer is not finite".into());
        }
        let loss_error =
            f64::from((loss - self.loss).abs()) / f64::from(self.loss.abs()).max(1e-12);
        let scale = self.gradient_norm.max(1e-12);
        let worst = projections
            .iter()
            .zip(&self.projections)
            .map(|(a, b)| f64::from((a - b).abs()) / scale)
            .fold(0.0, f64::max);
        Ok((loss_error, worst))
    }

    /// The larger of the two errors [`TOLERANCE`] bounds.
    pub fn error(&self, loss: f32, projections: &[f32]) -> Result<f64, String> {
        let (loss_error, worst) = self.errors(loss, projections)?;
        Ok(loss_error.max(worst))
    }

    /// Whether the answer matches within [`TOLERANCE`]; `Err` says how it does not.
    pub fn check(&self, loss: f32, projections: &[f32]) -> Result<(), String> {
        let (loss_error, worst) = self.errors(loss, projections)?;
        if loss_error.max(worst) <= TOLERANCE {
            return Ok(());
        }
        Err(format!(
            "this device's arithmetic is off: on the probe its loss is {loss:.6} (expected {:.6}) and its gradient's projections differ from the expected ones by up to {:.1} % of the gradient's norm (at most {} % allowed)",
            self.loss,
            worst * 100.0,
            TOLERANCE * 100.0
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Preset;

    fn spec(id: u64) -> ProbeSpec {
        ProbeSpec {
            id,
            batch_size: 2,
            seq_len: 20,
            directions: 8,
        }
    }

    fn answer(spec: &ProbeSpec, config: ModelConfig) -> Measured {
        pollster::block_on(spec.measure(&Device::flex(), config)).unwrap()
    }

    #[test]
    fn an_honest_answer_passes_and_a_scaled_or_zeroed_gradient_fails() {
        let config = Preset::Small.config();
        let spec = spec(42);
        let reference = answer(&spec, config);
        assert!(reference.loss > 3.0 && reference.gradient_norm > 0.0);
        reference
            .check(reference.loss, &reference.projections)
            .unwrap();
        assert_eq!(answer(&spec, config), reference, "the same on one backend");
        let model =
            CharRnn::from_flat(config, &spec.weights(config), &Device::flex().autodiff()).unwrap();
        let (loss, gradient) =
            pollster::block_on(loss_and_gradients(&model, &spec.batch(config))).unwrap();
        for scale in [0.5f32, 0.0, 0.99] {
            let wrong: Vec<f32> = gradient.iter().map(|g| g * scale).collect();
            let why = reference.check(loss, &spec.digest(&wrong)).unwrap_err();
            assert!(why.contains("arithmetic is off"), "{why}");
        }
        assert!(
            reference
                .check(loss * 1.01, &reference.projections)
                .is_err()
        );
        assert!(reference.check(f32::NAN, &reference.projections).is_err());
        assert!(reference.check(loss, &reference.projections[1..]).is_err());
    }

    #[test]
    fn the_probe_follows_from_its_id_alone() {
        let config = Preset::Small.config();
        let (a, b) = (spec(1), spec(2));
        assert_eq!(a.weights(config), spec(1).weights(config));
        assert_ne!(a.weights(config), b.weights(config));
        assert_ne!(a.batch(config).inputs, b.batch(config).inputs);
        assert!(
            a.batch(config)
                .inputs
                .iter()
                .all(|&c| c > 0 && (c as usize) < config.vocab)
        );
        // ±1 directions: a gradient along one coordinate projects to ±its value.
        let mut unit = vec![0f32; 100];
        unit[7] = 3.0;
        assert!(a.digest(&unit).iter().all(|p| p.abs() == 3.0));
    }
}
