//! Distributed DP's accountant: each round sums the devices' quantised updates
//! with Skellam noise they added themselves (Agarwal, Kairouz and Liu 2021,
//! "The Skellam Mechanism for Differentially Private Federated Learning"), each
//! client taking part with probability `q` (Poisson sampling).
//!
//! In the integers the devices sum in, an update's L2 norm is at most `Δ₂`
//! after rounding (the clip bound's `c` steps, grown by conditional randomized
//! rounding: Kairouz, Liu and Steinke 2021, Theorem 7 of "The Distributed
//! Discrete Gaussian Mechanism") and its L1 norm at most `Δ₁ = Δ₂ · min(√d, Δ₂)`
//! (integers: |x| ≤ x²). The summed noise is Skellam of variance `μ = (z·c)²`
//! per coordinate. One round at integer order α (the paper's Theorem 3.5):
//!
//! ε(α) = α Δ₂² / 2μ + min(((2α − 1) Δ₂² + 6 Δ₁) / 4μ², 3 Δ₁ / 2μ)
//!
//! Poisson sampling amplifies it by the general bound of Zhu and Wang 2019
//! ("Poisson Subsampled Rényi Differential Privacy", Theorem 9), kept where it
//! is under ε(α). A fractional order is charged at the integer above it (Rényi
//! divergence grows with the order), so the ledger keeps the Gaussian
//! accountant's orders.

use super::{Epsilon, epsilon_of, log_add};

/// Rounds of the Poisson-sampled Skellam mechanism on integer updates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampledSkellam {
    /// Probability that a client takes part in a round.
    pub sampling_rate: f64,
    /// z: the summed noise's standard deviation over the clip bound.
    pub noise_multiplier: f64,
    /// c: integer steps in one clip bound (the quantiser's scale).
    pub scaled_bound: f64,
    /// d: coordinates an update has.
    pub dims: usize,
    /// β: the chance one conditional rounding is drawn again.
    pub rounding_beta: f64,
    pub rounds: u64,
}

/// A bound on the L2 norm of a vector of L2 norm `scaled_bound` after each of
/// its `dims` coordinates is rounded at random to an integer, that holds with
/// probability at least 1 − `beta` (conditional rounding draws again until it
/// holds, so it always holds after). `beta = 0`: the sure bound c + √d.
pub fn rounded_l2_bound(scaled_bound: f64, dims: usize, beta: f64) -> f64 {
    let dims = dims as f64;
    let sure = scaled_bound + dims.sqrt();
    if beta <= 0.0 {
        return sure;
    }
    let likely = scaled_bound * scaled_bound
        + dims / 4.0
        + (2.0 * (1.0 / beta).ln()).sqrt() * (scaled_bound + dims.sqrt() / 2.0);
    likely.sqrt().min(sure)
}

impl SampledSkellam {
    pub fn validate(&self) -> Result<(), String> {
        let ok = (0.0..=1.0).contains(&self.sampling_rate)
            && self.noise_multiplier.is_finite()
            && self.noise_multiplier > 0.0
            && self.scaled_bound.is_finite()
            && self.scaled_bound >= 1.0
            && self.dims > 0
            && (0.0..1.0).contains(&self.rounding_beta);
        if ok {
            Ok(())
        } else {
            Err(format!(
                "the Skellam accountant needs q in [0, 1], z > 0, a scale of at least one step per bound, d > 0 and β in [0, 1) (got {self:?})"
            ))
        }
    }

    /// (Δ₁, Δ₂): the L1 and L2 sensitivities in integer steps.
    pub fn sensitivities(&self) -> (f64, f64) {
        let l2 = rounded_l2_bound(self.scaled_bound, self.dims, self.rounding_beta);
        (l2 * (self.dims as f64).sqrt().min(l2), l2)
    }

    /// Rényi DP of one round without sampling, at each integer order ≥ 2.
    fn unsampled(&self) -> impl Fn(u64) -> f64 {
        let (l1, l2) = self.sensitivities();
        let mu = (self.noise_multiplier * self.scaled_bound).powi(2);
        move |order| {
            let order = order as f64;
            order * l2 * l2 / (2.0 * mu)
                + (((2.0 * order - 1.0) * l2 * l2 + 6.0 * l1) / (4.0 * mu * mu))
                    .min(3.0 * l1 / (2.0 * mu))
        }
    }

    /// Rényi DP of all the rounds at `order` (> 1).
    pub fn rdp(&self, order: f64) -> f64 {
        self.rounds as f64 * self.one_round(order.ceil().max(2.0) as u64)
    }

    fn one_round(&self, alpha: u64) -> f64 {
        let q = self.sampling_rate;
        if q == 0.0 {
            return 0.0;
        }
        let unsampled = self.unsampled();
        let plain = unsampled(alpha);
        if q == 1.0 {
            return plain;
        }
        plain.min(amplified(q, alpha, unsampled))
    }

    /// The smallest ε for `delta` over `orders`.
    pub fn epsilon(&self, delta: f64, orders: &[f64]) -> Result<Epsilon, String> {
        self.validate()?;
        if !(delta > 0.0 && delta < 1.0) {
            return Err(format!("δ must be in (0, 1), not {delta}"));
        }
        let rdp: Vec<f64> = orders.iter().map(|&order| self.rdp(order)).collect();
        Ok(epsilon_of(&rdp, orders, delta))
    }
}

/// Zhu and Wang's bound on the Rényi DP at integer order α ≥ 2 of a mechanism
/// of Rényi DP `base(ℓ)` at each order ℓ, run on a Poisson sample of rate `q`:
///
/// 1/(α−1) · log[(1−q)^(α−1)(αq − q + 1) + C(α,2) q² (1−q)^(α−2) e^ε(2)
///             + 3 Σ_{ℓ=3..α} C(α,ℓ) q^ℓ (1−q)^(α−ℓ) e^((ℓ−1)ε(ℓ))]
fn amplified(q: f64, alpha: u64, base: impl Fn(u64) -> f64) -> f64 {
    let a = alpha as f64;
    let log_q = q.ln();
    let log_keep = (-q).ln_1p();
    let mut total = (a - 1.0) * log_keep + (a * q - q + 1.0).ln();
    let mut log_binomial = a.ln() + (a - 1.0).ln() - 2f64.ln();
    total = log_add(
        total,
        log_binomial + 2.0 * log_q + (a - 2.0) * log_keep + base(2),
    );
    for l in 3..=alpha {
        let l_f = l as f64;
        log_binomial += (a - l_f + 1.0).ln() - l_f.ln();
        let term =
            3f64.ln() + log_binomial + l_f * log_q + (a - l_f) * log_keep + (l_f - 1.0) * base(l);
        total = log_add(total, term);
    }
    total / (a - 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accountant::{SampledGaussian, default_orders};

    fn skellam(q: f64, z: f64, scaled_bound: f64, dims: usize, rounds: u64) -> SampledSkellam {
        SampledSkellam {
            sampling_rate: q,
            noise_multiplier: z,
            scaled_bound,
            dims,
            rounding_beta: (-0.5f64).exp(),
            rounds,
        }
    }

    #[test]
    fn without_sampling_it_is_the_papers_closed_form() {
        let m = skellam(1.0, 2.0, 1000.0, 100, 3);
        let (l1, l2) = m.sensitivities();
        // √(c² + d/4 + √(2·½)(c + √d/2)) = √(10⁶ + 25 + 1005).
        assert!((l2 - 1_001_030f64.sqrt()).abs() < 1e-9);
        assert!((l1 - l2 * 10.0).abs() < 1e-9);
        let mu = 4.0e6;
        let expected = 4.0 * l2 * l2 / (2.0 * mu)
            + ((7.0 * l2 * l2 + 6.0 * l1) / (4.0 * mu * mu)).min(3.0 * l1 / (2.0 * mu));
        assert!((m.rdp(4.0) - 3.0 * expected).abs() < 1e-12);
        // A fractional order is charged at the integer above it.
        assert_eq!(m.rdp(3.2), m.rdp(4.0));
    }

    #[test]
    fn a_fine_scale_approaches_the_gaussian_from_above() {
        let orders = default_orders();
        for (q, z) in [(0.05, 1.0), (0.01, 0.5), (1.0, 2.0), (1.0, 10.0)] {
            let gaussian = SampledGaussian {
                sampling_rate: q,
                noise_multiplier: z,
                rounds: 100,
            }
            .epsilon(1e-5, &orders)
            .unwrap()
            .epsilon;
            let coarse = skellam(q, z, 1e3, 100_000, 100)
                .epsilon(1e-5, &orders)
                .unwrap()
                .epsilon;
            let fine = skellam(q, z, 1e7, 100_000, 100)
                .epsilon(1e-5, &orders)
                .unwrap()
                .epsilon;
            assert!(
                gaussian <= fine && fine < coarse,
                "q {q} z {z}: {gaussian} {fine} {coarse}"
            );
            // Zhu and Wang's bound is general, so looser than the Gaussian's own
            // analysis under sampling; without sampling only rounding separates them.
            let most = if q == 1.0 { 1.01 } else { 1.5 };
            assert!(fine < gaussian * most, "q {q} z {z}: {fine} vs {gaussian}");
        }
    }

    #[test]
    fn sampling_amplifies_and_never_costs() {
        let plain = skellam(1.0, 1.0, 1e5, 1000, 1);
        for q in [1e-3, 0.01, 0.1, 0.5, 0.99] {
            let sampled = SampledSkellam {
                sampling_rate: q,
                ..plain
            };
            for order in [2.0, 3.0, 8.0, 32.0, 256.0] {
                assert!(sampled.rdp(order) <= plain.rdp(order), "q {q} α {order}");
            }
        }
        // At order 2 the amplification bound is exact: the Gaussian's value.
        let gaussian = SampledGaussian {
            sampling_rate: 0.01,
            noise_multiplier: 1.0,
            rounds: 1,
        };
        let fine = skellam(0.01, 1.0, 1e7, 1000, 1).rdp(2.0);
        assert!((fine / gaussian.rdp(2.0) - 1.0).abs() < 1e-5, "{fine}");
        assert_eq!(skellam(0.0, 1.0, 1e5, 1000, 1).rdp(8.0), 0.0);
    }

    /// Pinned from bench/ddp-accounting.sh: the papers' bound written again in
    /// SciPy (agrees to 10⁻¹³), and the exact divergence of the sampled Skellam
    /// mechanism summed over its support (d = 1), which ε must never be under.
    #[test]
    fn known_values_of_the_references() {
        let pinned = [
            // (q, z, c, rounds, closed form, exact)
            (0.01, 1.0, 100.0, 100, 1.370_338_692_709_52, 1.293_69),
            (0.1, 2.0, 10.0, 100, 4.327_921_127_311_042, 2.947_29),
            (1.0, 0.5, 10_000.0, 1, 10.802_891_740_106_9, 10.802_8),
        ];
        for (q, z, c, rounds, closed, exact) in pinned {
            let got = SampledSkellam {
                rounding_beta: (-2f64).exp(),
                ..skellam(q, z, c, 1, rounds)
            }
            .epsilon(1e-5, &default_orders())
            .unwrap()
            .epsilon;
            assert!(
                (got / closed - 1.0).abs() < 1e-9,
                "q {q} z {z} c {c}: {got} vs {closed}"
            );
            assert!(
                got >= exact,
                "q {q} z {z} c {c}: {got} under the exact {exact}"
            );
        }
    }

    #[test]
    fn bad_parameters_are_refused() {
        assert!(skellam(0.1, 0.0, 1e5, 10, 1).epsilon(1e-5, &[2.0]).is_err());
        assert!(skellam(0.1, 1.0, 0.5, 10, 1).epsilon(1e-5, &[2.0]).is_err());
        assert!(skellam(0.1, 1.0, 1e5, 0, 1).epsilon(1e-5, &[2.0]).is_err());
    }
}
