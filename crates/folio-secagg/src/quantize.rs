//! A client's update as integers mod 2³², so that masks cancel exactly.
//!
//! Each client clips its delta to the round's L2 bound S and scales it by its
//! weight w ∈ [0, 1] (its examples over the round's most), so every coordinate
//! lies in [−S, S]; after it come six extras in [0, 1]: w, w × loss / 16 and
//! w × accuracy, then, where the round also evaluates on the devices (its
//! quantizer's `held_out_chars` H > 0), the device's held-out figures: c =
//! chars / H, c × (loss per char) / 16 and c × accuracy (zeros otherwise).
//! Each value is scaled so that the sum of the round's `clients` values stays
//! inside (−2³¹, 2³¹): the sum never wraps, and a decoded sum is exact up to
//! the stochastic rounding, which is unbiased.
//!
//! Under distributed DP ([`DeviceNoise`]) the delta is scaled to `c` integer
//! steps per clip bound, rounded at random until its L2 norm is within the
//! round's bound (conditional randomized rounding), and each device adds its
//! share of Skellam noise: the server only ever unmasks a noised sum. Values are
//! summed mod 2³² and read back in [−2³¹, 2³¹) (modular clipping); the scale
//! leaves room for every update at the bound and eight standard deviations of
//! the noise. The extras carry the weight alone: a device's loss, accuracy and
//! held-out figures would reach the server un-noised.

use rand_core::RngCore;
use serde::{Deserialize, Serialize};

use crate::SecAggError;
use crate::skellam::skellam;

/// Values after the delta: the weight, the weighted loss, the weighted accuracy,
/// and the held-out characters, loss and right guesses.
pub const EXTRAS: usize = 6;
/// A loss is clamped to [0, LOSS_RANGE] before it is summed.
pub const LOSS_RANGE: f64 = 16.0;

/// One client's contribution, before quantisation.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    /// `trained − global`: clipped to the round's bound here.
    pub delta: &'a [f32],
    /// The client's share of the round's weight, in [0, 1].
    pub weight: f64,
    pub loss: f64,
    pub accuracy: f64,
    /// The model the round started from, measured on the text the device holds
    /// out (where the round asks for it).
    pub held_out: HeldOut,
}

/// A model's figures on one device's held-out text, or their sum over a round.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HeldOut {
    /// Cross-entropy summed over the characters (each at most 16 nats).
    pub loss_sum: f64,
    /// Characters predicted right.
    pub correct: f64,
    /// Characters predicted.
    pub chars: f64,
}

/// The decoded sum of a round's inputs.
#[derive(Debug, Clone, PartialEq)]
pub struct Sum {
    /// Σ w × clip(delta).
    pub weighted_delta: Vec<f32>,
    /// Σ w.
    pub weight: f64,
    /// Σ w × loss and Σ w × accuracy.
    pub weighted_loss: f64,
    pub weighted_accuracy: f64,
    /// Σ of the devices' held-out figures.
    pub held_out: HeldOut,
}

/// How a round's values become integers: one per round, known to all.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Quantizer {
    /// The most inputs that can be summed (the round's selected clients).
    pub clients: u32,
    /// The L2 bound each delta is clipped to.
    pub clip_bound: f32,
    /// Held-out characters one device measures at most; 0: the round does not
    /// evaluate on the devices.
    #[serde(default)]
    pub held_out_chars: u64,
    /// Distributed DP: the noise each device adds; `None`: none.
    #[serde(default)]
    pub noise: Option<DeviceNoise>,
}

/// What each device of a distributed-DP round does to its update.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DeviceNoise {
    /// c: integer steps in one clip bound.
    pub scaled_bound: f64,
    /// Rounding is drawn again until the rounded update's L2 norm is at most
    /// this many steps.
    pub rounded_bound: f64,
    /// The Skellam variance each device adds to each coordinate, in steps².
    pub variance: f64,
}

/// Standard deviations of the summed noise the scale leaves room for.
const NOISE_TAIL: f64 = 8.0;
/// Conditional roundings tried before a device gives up (each fails with
/// probability β ≤ 0.61: 10⁻²¹ after 100).
const MAX_ROUNDINGS: usize = 100;

impl Quantizer {
    /// The largest sum of `clients` values each at most 1 in magnitude.
    fn headroom(&self) -> f64 {
        let n = f64::from(self.clients.max(1));
        // Stochastic rounding adds less than 1 per value.
        (f64::from(i32::MAX) - n) / n
    }

    fn delta_scale(&self) -> f64 {
        match self.noise {
            Some(noise) => noise.scaled_bound / f64::from(self.clip_bound),
            None => self.headroom() / f64::from(self.clip_bound),
        }
    }

    /// The standard deviation of the noise in a sum of `inputs`, in the delta's
    /// units (0 without distributed DP).
    pub fn noise_std(&self, inputs: usize) -> f64 {
        self.noise.map_or(0.0, |noise| {
            (noise.variance * inputs as f64).sqrt() / self.delta_scale()
        })
    }

    pub fn check(&self) -> Result<(), SecAggError> {
        if self.clients == 0 || !(self.clip_bound.is_finite() && self.clip_bound > 0.0) {
            return Err(SecAggError::Settings(format!(
                "quantising needs clients ≥ 1 and a finite clip bound > 0 (got {} clients, bound {})",
                self.clients, self.clip_bound
            )));
        }
        if let Some(noise) = self.noise {
            let n = f64::from(self.clients);
            let reach = n * noise.rounded_bound + NOISE_TAIL * (n * noise.variance).sqrt();
            let sound = noise.scaled_bound >= 1.0
                && noise.rounded_bound >= noise.scaled_bound
                && noise.variance.is_finite()
                && noise.variance >= 0.0;
            if !sound || reach >= f64::from(i32::MAX) - n {
                return Err(SecAggError::Settings(format!(
                    "distributed DP's scale does not fit {} clients in 32 bits (scale {}, rounded bound {}, variance {})",
                    self.clients, noise.scaled_bound, noise.rounded_bound, noise.variance
                )));
            }
        }
        Ok(())
    }

    /// `input` as integers: `delta.len() + EXTRAS` of them.
    pub fn encode(&self, input: &Input, rng: &mut impl RngCore) -> Result<Vec<u32>, SecAggError> {
        self.check()?;
        let norm = l2_norm(input.delta);
        let held_out = input.held_out;
        let finite = norm.is_finite()
            && input.weight.is_finite()
            && input.loss.is_finite()
            && input.accuracy.is_finite()
            && held_out.loss_sum.is_finite()
            && held_out.correct.is_finite()
            && held_out.chars.is_finite();
        if !finite {
            return Err(SecAggError::NonFinite);
        }
        let bound = f64::from(self.clip_bound);
        let weight = input.weight.clamp(0.0, 1.0);
        let clip = if norm > bound { bound / norm } else { 1.0 };
        if let Some(noise) = self.noise {
            return self.encode_noised(input.delta, clip, weight, noise, rng);
        }
        let delta_scale = self.delta_scale() * clip * weight;
        let extra_scale = self.headroom();
        let (chars, per_char) = match self.held_out_chars {
            0 => (0.0, 1.0),
            most => (
                (held_out.chars / most as f64).clamp(0.0, 1.0),
                held_out.chars.max(1.0),
            ),
        };
        let extras = [
            weight,
            weight * input.loss.clamp(0.0, LOSS_RANGE) / LOSS_RANGE,
            weight * input.accuracy.clamp(0.0, 1.0),
            chars,
            chars * (held_out.loss_sum / per_char).clamp(0.0, LOSS_RANGE) / LOSS_RANGE,
            chars * (held_out.correct / per_char).clamp(0.0, 1.0),
        ];
        let mut out = Vec::with_capacity(input.delta.len() + EXTRAS);
        let limit = self.headroom();
        let values = input
            .delta
            .iter()
            .map(|&v| f64::from(v) * delta_scale)
            .chain(extras.iter().map(|&v| v * extra_scale));
        for scaled in values {
            out.push(round_stochastically(scaled.clamp(-limit, limit), rng) as i32 as u32);
        }
        Ok(out)
    }

    /// Distributed DP's encoding: the delta clipped (by `clip`) and weighted,
    /// rounded within the bound, noised; then the weight.
    fn encode_noised(
        &self,
        delta: &[f32],
        clip: f64,
        weight: f64,
        noise: DeviceNoise,
        rng: &mut impl RngCore,
    ) -> Result<Vec<u32>, SecAggError> {
        let scale = self.delta_scale() * clip * weight;
        let bound_squared = noise.rounded_bound * noise.rounded_bound;
        let mut rounded = vec![0i64; delta.len()];
        let mut tries = 0;
        loop {
            let mut norm_squared = 0.0;
            for (r, &v) in rounded.iter_mut().zip(delta) {
                *r = round_stochastically(f64::from(v) * scale, rng);
                norm_squared += (*r as f64) * (*r as f64);
            }
            if norm_squared <= bound_squared {
                break;
            }
            tries += 1;
            if tries == MAX_ROUNDINGS {
                return Err(SecAggError::Settings(format!(
                    "no rounding of the update fell within the bound of {} steps in {MAX_ROUNDINGS} tries: the bound is too tight for the scale",
                    noise.rounded_bound
                )));
            }
        }
        let mut out: Vec<u32> = rounded
            .into_iter()
            .map(|r| (r + skellam(noise.variance, rng)) as u32)
            .collect();
        let extras = [weight, 0.0, 0.0, 0.0, 0.0, 0.0];
        let extra_scale = self.headroom();
        out.extend(
            extras
                .iter()
                .map(|&v| round_stochastically(v * extra_scale, rng) as u32),
        );
        Ok(out)
    }

    /// A sum of encoded inputs (mod 2³²) as values again.
    pub fn decode(&self, sum: &[u32]) -> Result<Sum, SecAggError> {
        self.check()?;
        let Some(dims) = sum.len().checked_sub(EXTRAS) else {
            return Err(SecAggError::WrongLength {
                what: "a sum",
                expected: EXTRAS,
                found: sum.len(),
            });
        };
        let signed = |v: u32| f64::from(v as i32);
        let delta_scale = self.delta_scale();
        let extra_scale = self.headroom();
        let extra = |i: usize| signed(sum[dims + i]) / extra_scale;
        Ok(Sum {
            weighted_delta: sum[..dims]
                .iter()
                .map(|&v| (signed(v) / delta_scale) as f32)
                .collect(),
            weight: extra(0),
            weighted_loss: extra(1) * LOSS_RANGE,
            weighted_accuracy: extra(2),
            held_out: HeldOut {
                chars: extra(3) * self.held_out_chars as f64,
                loss_sum: extra(4) * LOSS_RANGE * self.held_out_chars as f64,
                correct: extra(5) * self.held_out_chars as f64,
            },
        })
    }
}

/// The L2 norm of `values`, summed in f64.
fn l2_norm(values: &[f32]) -> f64 {
    values
        .iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt()
}

/// ⌊x⌋ or ⌈x⌉, the latter with probability x − ⌊x⌋: unbiased.
fn round_stochastically(x: f64, rng: &mut impl RngCore) -> i64 {
    let floor = x.floor();
    // 53 random bits: a uniform draw from [0, 1).
    let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    floor as i64 + i64::from(u < x - floor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    fn input(delta: &[f32], weight: f64) -> Input<'_> {
        Input {
            delta,
            weight,
            loss: 2.0,
            accuracy: 0.25,
            held_out: HeldOut::default(),
        }
    }

    /// Where a round evaluates on the devices, their held-out sums come out of
    /// the round's sum: characters, loss and right guesses, to rounding.
    #[test]
    fn held_out_figures_are_summed_with_the_round() {
        let quantizer = Quantizer {
            clients: 16,
            clip_bound: 1.0,
            held_out_chars: 65_536,
            noise: None,
        };
        let mut rng = ChaCha20Rng::seed_from_u64(9);
        let mut sum = vec![0u32; 1 + EXTRAS];
        let mut expected = HeldOut::default();
        for device in 0..16u32 {
            let chars = f64::from(100 + device * 997);
            let held_out = HeldOut {
                loss_sum: chars * (1.5 + f64::from(device) / 10.0),
                correct: (chars * 0.4).round(),
                chars,
            };
            expected.loss_sum += held_out.loss_sum;
            expected.correct += held_out.correct;
            expected.chars += held_out.chars;
            let input = Input {
                held_out,
                ..input(&[0.1], 1.0)
            };
            for (total, v) in sum
                .iter_mut()
                .zip(quantizer.encode(&input, &mut rng).unwrap())
            {
                *total = total.wrapping_add(v);
            }
        }
        let decoded = quantizer.decode(&sum).unwrap().held_out;
        assert!((decoded.chars - expected.chars).abs() < 0.1, "{decoded:?}");
        assert!(
            (decoded.correct - expected.correct).abs() < 0.1,
            "{decoded:?}"
        );
        assert!(
            (decoded.loss_sum - expected.loss_sum).abs() < 1.0,
            "{decoded:?}"
        );
    }

    #[test]
    fn the_sum_of_encodings_decodes_to_the_sum_of_inputs() {
        let quantizer = Quantizer {
            clients: 64,
            clip_bound: 1.0,
            held_out_chars: 0,
            noise: None,
        };
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let deltas: Vec<Vec<f32>> = (0..64)
            .map(|c| (0..50).map(|i| ((c * 7 + i) as f32).sin() * 0.1).collect())
            .collect();
        let mut sum = vec![0u32; 50 + EXTRAS];
        let mut expected = vec![0f64; 50];
        for delta in &deltas {
            let norm = delta.iter().map(|v| v * v).sum::<f32>().sqrt();
            let clip = (1.0 / norm).min(1.0);
            for (e, v) in expected.iter_mut().zip(delta) {
                *e += f64::from(v * clip) * 0.5;
            }
            let encoded = quantizer.encode(&input(delta, 0.5), &mut rng).unwrap();
            for (s, v) in sum.iter_mut().zip(encoded) {
                *s = s.wrapping_add(v);
            }
        }
        let decoded = quantizer.decode(&sum).unwrap();
        // One rounding step is 2⁻²⁵ of the bound; 64 of them at most.
        let step = 64.0 / quantizer.delta_scale();
        for (d, e) in decoded.weighted_delta.iter().zip(&expected) {
            assert!((f64::from(*d) - e).abs() <= step, "{d} vs {e}");
        }
        assert!((decoded.weight - 32.0).abs() < 1e-6);
        assert!((decoded.weighted_loss - 64.0).abs() < 1e-5);
        assert!((decoded.weighted_accuracy - 8.0).abs() < 1e-6);
    }

    #[test]
    fn a_full_round_at_the_bound_does_not_wrap() {
        let quantizer = Quantizer {
            clients: 10,
            clip_bound: 0.5,
            held_out_chars: 0,
            noise: None,
        };
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        // Every client's delta is one coordinate, far over the bound, weight 1.
        let delta = [-100.0f32, 0.0];
        let mut sum = vec![0u32; 2 + EXTRAS];
        for _ in 0..10 {
            let encoded = quantizer.encode(&input(&delta, 1.0), &mut rng).unwrap();
            for (s, v) in sum.iter_mut().zip(encoded) {
                *s = s.wrapping_add(v);
            }
        }
        let decoded = quantizer.decode(&sum).unwrap();
        assert!((decoded.weighted_delta[0] + 5.0).abs() < 1e-6);
        assert!((decoded.weight - 10.0).abs() < 1e-6);
    }

    #[test]
    fn rounding_is_unbiased() {
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let mean = (0..100_000)
            .map(|_| round_stochastically(0.3, &mut rng) as f64)
            .sum::<f64>()
            / 100_000.0;
        assert!((mean - 0.3).abs() < 0.005, "{mean}");
        assert_eq!(round_stochastically(-2.0, &mut rng), -2);
    }

    #[test]
    fn bad_inputs_are_refused() {
        let quantizer = Quantizer {
            clients: 3,
            clip_bound: 1.0,
            held_out_chars: 0,
            noise: None,
        };
        let mut rng = ChaCha20Rng::seed_from_u64(6);
        assert_eq!(
            quantizer.encode(&input(&[f32::NAN], 1.0), &mut rng),
            Err(SecAggError::NonFinite)
        );
        let no_bound = Quantizer {
            clients: 3,
            clip_bound: 0.0,
            held_out_chars: 0,
            noise: None,
        };
        assert!(no_bound.encode(&input(&[1.0], 1.0), &mut rng).is_err());
        assert!(quantizer.decode(&[1, 2]).is_err());
    }

    fn noised(clients: u32, variance: f64) -> Quantizer {
        Quantizer {
            clients,
            clip_bound: 0.5,
            held_out_chars: 0,
            noise: Some(DeviceNoise {
                scaled_bound: 1e6,
                rounded_bound: 1e6 + 40.0,
                variance,
            }),
        }
    }

    /// Under distributed DP the decoded sum is the clipped deltas' sum plus
    /// noise of the variance all devices added, centred; the weight is exact and
    /// no device metric is summed.
    #[test]
    fn a_noised_sum_decodes_to_the_sum_plus_the_devices_noise() {
        let clients = 20;
        // 10⁸ steps² a device: the sum's noise is √(20·10⁸) steps, at 2·10⁶
        // steps per unit.
        let quantizer = noised(clients, 1e8);
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let dims = 4000;
        let mut sum = vec![0u32; dims + EXTRAS];
        let mut expected = vec![0f64; dims];
        for c in 0..clients {
            let delta: Vec<f32> = (0..dims)
                .map(|i| ((c as usize * 31 + i) as f32).cos() * 0.02)
                .collect();
            let norm = l2_norm(&delta);
            let clip = (0.5 / norm).min(1.0);
            for (e, v) in expected.iter_mut().zip(&delta) {
                *e += f64::from(*v) * clip;
            }
            for (s, v) in sum
                .iter_mut()
                .zip(quantizer.encode(&input(&delta, 1.0), &mut rng).unwrap())
            {
                *s = s.wrapping_add(v);
            }
        }
        let decoded = quantizer.decode(&sum).unwrap();
        let errors: Vec<f64> = decoded
            .weighted_delta
            .iter()
            .zip(&expected)
            .map(|(d, e)| f64::from(*d) - e)
            .collect();
        let mean = errors.iter().sum::<f64>() / dims as f64;
        let std = (errors.iter().map(|e| e * e).sum::<f64>() / dims as f64).sqrt();
        let want = quantizer.noise_std(clients as usize);
        assert!((want - (20e8f64).sqrt() / 2e6).abs() < 1e-12);
        assert!((std / want - 1.0).abs() < 0.05, "noise std {std} vs {want}");
        assert!(
            mean.abs() < 5.0 * want / (dims as f64).sqrt(),
            "mean {mean}"
        );
        assert!((decoded.weight - 20.0).abs() < 1e-6);
        assert_eq!(decoded.weighted_loss, 0.0);
        assert_eq!(decoded.weighted_accuracy, 0.0);
    }

    /// Conditional rounding keeps every device's integer update within the
    /// bound the accountant charges for, far over the clip bound or at it.
    #[test]
    fn a_rounded_update_is_never_over_its_bound() {
        let mut quantizer = noised(4, 0.0);
        let dims = 10_000;
        // √d/2 = 50 over the scale is the likely growth; allow a quarter of it.
        quantizer.noise.as_mut().unwrap().rounded_bound = 1e6 + 0.5;
        let mut rng = ChaCha20Rng::seed_from_u64(8);
        let delta: Vec<f32> = (0..dims).map(|i| (i as f32).sin()).collect();
        for _ in 0..5 {
            let encoded = quantizer.encode(&input(&delta, 1.0), &mut rng).unwrap();
            let norm = encoded[..dims]
                .iter()
                .map(|&v| f64::from(v as i32).powi(2))
                .sum::<f64>()
                .sqrt();
            assert!(norm <= 1e6 + 0.5, "{norm}");
        }
        // A bound under what any rounding reaches is refused, not looped on: at
        // 150 steps over 10⁴ equal coordinates, each is 1.5 and rounds to 1 or
        // 2, so the rounded norm is over 150 always.
        quantizer.noise = Some(DeviceNoise {
            scaled_bound: 150.0,
            rounded_bound: 150.0,
            variance: 0.0,
        });
        let equal = vec![1.0f32; dims];
        assert!(matches!(
            quantizer.encode(&input(&equal, 1.0), &mut rng),
            Err(SecAggError::Settings(_))
        ));
    }

    #[test]
    fn a_scale_that_could_wrap_is_refused() {
        assert!(noised(2000, 1e8).check().is_ok());
        assert!(noised(2200, 1e8).check().is_err());
        assert!(noised(20, 1e16).check().is_err());
        // What a hostile server could send instead of a plan.
        for variance in [f64::NAN, f64::INFINITY, -1.0] {
            assert!(noised(20, variance).check().is_err(), "{variance}");
        }
        let mut no_scale = noised(20, 1e8);
        no_scale.noise.as_mut().unwrap().scaled_bound = f64::NAN;
        assert!(no_scale.check().is_err());
    }
}
