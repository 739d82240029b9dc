//! Distributed DP (Agarwal, Kairouz and Liu 2021, "The Skellam Mechanism for
//! Differentially Private Federated Learning"): the devices of a secure round
//! each add a share of Skellam noise to their rounded, clipped update, so the
//! server only ever unmasks a noised sum. The plan fixes, for the whole
//! federation, the integer scale, the rounding bound and each device's share,
//! and the accountant charges every round the same (no figure of a round moves ε).

use serde::{Deserialize, Serialize};

use crate::accountant::{SampledSkellam, rounded_l2_bound};

/// Distributed DP's settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DistributedDp {
    /// M: the fewest masked inputs a round's sum is unmasked with; each device
    /// adds 1/(M − 1) of the noise, so any M − 1 of them carry all of it (the
    /// accountant counts no more, whoever the neighbour is). `None`: 80 % of
    /// the expected clients, at least 3.
    pub min_inputs: Option<u32>,
}

/// M when not set: 80 % of the `expected` clients a round, at least 3.
pub fn default_min_inputs(expected: f64) -> usize {
    // The expected count is q·N, a product that may fall a hair under an integer.
    ((0.8 * expected + 1e-9).floor() as usize).max(3)
}

/// β: the chance one conditional rounding misses its bound and is drawn again.
pub const ROUNDING_BETA: f64 = 0.135_335_283_236_612_7; // e⁻²

/// Standard deviations of the summed noise the quantiser leaves room for.
const NOISE_TAIL: f64 = 8.0;

/// What every device of a distributed-DP round does to its update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeviceNoisePlan {
    /// The fewest masked inputs a sum is unmasked with.
    pub min_inputs: usize,
    /// c: integer steps in one clip bound.
    pub scaled_bound: f64,
    /// The L2 norm, in steps, conditional rounding keeps an update within.
    pub rounded_bound: f64,
    /// The Skellam variance each device adds per coordinate, in steps².
    pub variance: f64,
}

impl DeviceNoisePlan {
    /// The plan for rounds of at most `most_inputs` devices, `dims` coordinates
    /// each, whose summed noise is `z` clip bounds: the finest scale at which
    /// every update at its bound plus eight standard deviations of the noise
    /// stays inside 32 bits.
    pub fn new(z: f64, min_inputs: usize, most_inputs: usize, dims: usize) -> Result<Self, String> {
        if min_inputs < 2 {
            return Err(format!(
                "distributed DP needs at least 2 inputs a sum, not {min_inputs}"
            ));
        }
        let n = most_inputs.max(min_inputs) as f64;
        let shares = (min_inputs - 1) as f64;
        let room = f64::from(i32::MAX) - n - n * (dims as f64).sqrt();
        let scaled_bound =
            (room / (n + NOISE_TAIL * z * (n / shares).sqrt()) * (1.0 - 1e-6)).floor();
        if scaled_bound.is_nan() || scaled_bound < 1.0 {
            return Err(format!(
                "distributed DP cannot fit {most_inputs} updates of {dims} values in 32 bits"
            ));
        }
        Ok(Self {
            min_inputs,
            scaled_bound,
            rounded_bound: rounded_l2_bound(scaled_bound, dims, ROUNDING_BETA),
            variance: (z * scaled_bound).powi(2) / shares,
        })
    }

    /// The accountant of one round under this plan at sampling rate `q`.
    pub fn accountant(&self, q: f64, z: f64, dims: usize) -> SampledSkellam {
        SampledSkellam {
            sampling_rate: q,
            noise_multiplier: z,
            scaled_bound: self.scaled_bound,
            dims,
            rounding_beta: ROUNDING_BETA,
            rounds: 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_fits_every_update_and_the_noise_in_32_bits() {
        // 1,103 clients, a 200,000-value model, z = 1, M = 40.
        let plan = DeviceNoisePlan::new(1.0, 40, 1103, 200_000).unwrap();
        let n = 1103.0;
        let reach = n * plan.rounded_bound + 8.0 * (n * plan.variance).sqrt();
        assert!(reach < f64::from(i32::MAX) - n, "{reach}");
        assert!(
            reach > 0.99 * f64::from(i32::MAX),
            "{reach}: the scale is not the finest"
        );
        // Any 39 devices carry the summed noise of z = 1.
        let summed = (39.0 * plan.variance).sqrt() / plan.scaled_bound;
        assert!((summed - 1.0).abs() < 1e-9);
        assert!(plan.rounded_bound > plan.scaled_bound);
        assert!(DeviceNoisePlan::new(1.0, 1, 10, 10).is_err());
        assert!(DeviceNoisePlan::new(1.0, 3, 1_000_000, 1 << 30).is_err());
    }
}
