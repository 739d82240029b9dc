//! A privacy accountant for DP-FedAvg (McMahan et al. 2018): each round is the
//! sampled Gaussian mechanism — every client in the population takes part
//! independently with probability `q` (Poisson sampling), the clipped updates'
//! sum gets Gaussian noise of standard deviation `z × S` for clip bound `S` — and
//! rounds compose.
//!
//! Rényi DP of one round at order α (Mironov, Talwar and Zhang 2019, "Rényi
//! Differential Privacy of the Sampled Gaussian Mechanism"): integer orders by
//! their binomial sum, fractional ones by their two-sided series; orders add up
//! over rounds; the total converts to (ε, δ) by the tight conversion of Canonne,
//! Kamath and Steinke 2020 (Proposition 12, as Google's `dp-accounting` applies
//! it), minimised over the orders. Distributed DP's rounds: [`skellam`].

mod skellam;

pub use skellam::{SampledSkellam, rounded_l2_bound};

/// The orders the accountant tries: dense where the optimum usually is, sparse
/// beyond (the set Google's `dp-accounting` uses by default).
pub fn default_orders() -> Vec<f64> {
    (1..100)
        .map(|x| 1.0 + f64::from(x) / 10.0)
        .chain((11..64).map(f64::from))
        .chain([128.0, 256.0, 512.0, 1024.0])
        .collect()
}

/// The sampled Gaussian mechanism, run `rounds` times.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampledGaussian {
    /// Probability that a client takes part in a round (Poisson sampling).
    pub sampling_rate: f64,
    /// Noise standard deviation over the clip bound.
    pub noise_multiplier: f64,
    pub rounds: u64,
}

/// (ε, δ) and the Rényi order it was read at.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Epsilon {
    pub epsilon: f64,
    pub order: f64,
}

impl SampledGaussian {
    /// Checks the parameters, saying what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.sampling_rate) {
            return Err(format!(
                "the sampling rate must be in [0, 1], not {}",
                self.sampling_rate
            ));
        }
        if !(self.noise_multiplier.is_finite() && self.noise_multiplier > 0.0) {
            return Err(format!(
                "the noise multiplier must be positive, not {}",
                self.noise_multiplier
            ));
        }
        Ok(())
    }

    /// Rényi DP of all the rounds at `order` (> 1).
    pub fn rdp(&self, order: f64) -> f64 {
        self.rounds as f64 * rdp_one_round(self.sampling_rate, self.noise_multiplier, order)
    }

    /// The smallest ε for `delta` over `orders`.
    pub fn epsilon(&self, delta: f64, orders: &[f64]) -> Result<Epsilon, String> {
        self.validate()?;
        if !(delta > 0.0 && delta < 1.0) {
            return Err(format!("δ must be in (0, 1), not {delta}"));
        }
        if orders.is_empty() {
            return Err("no Rényi orders to try".to_owned());
        }
        let rdp: Vec<f64> = orders.iter().map(|&order| self.rdp(order)).collect();
        Ok(epsilon_of(&rdp, orders, delta))
    }
}

/// The smallest ε for `delta` from Rényi DP `rdp[i]` spent at `orders[i]`
/// (infinite if none is finite).
pub fn epsilon_of(rdp: &[f64], orders: &[f64], delta: f64) -> Epsilon {
    orders
        .iter()
        .zip(rdp)
        .map(|(&order, &rdp)| Epsilon {
            epsilon: epsilon_from_rdp(order, rdp, delta),
            order,
        })
        .min_by(|a, b| a.epsilon.total_cmp(&b.epsilon))
        .unwrap_or(Epsilon {
            epsilon: f64::INFINITY,
            order: f64::NAN,
        })
}

/// ε for `delta` from Rényi DP `rdp` at `order` (Canonne, Kamath and Steinke 2020,
/// Proposition 12, in `dp-accounting`'s form).
pub fn epsilon_from_rdp(order: f64, rdp: f64, delta: f64) -> f64 {
    if delta * delta + (-rdp).exp_m1() > 0.0 {
        // δ ≥ sqrt(1 − exp(−KL)): ε = 0 already holds.
        return 0.0;
    }
    if order <= 1.01 {
        return f64::INFINITY;
    }
    let epsilon = rdp + (-1.0 / order).ln_1p() - (delta * order).ln() / (order - 1.0);
    epsilon.max(0.0)
}

/// Rényi DP of one round of the sampled Gaussian mechanism at `order`; infinite
/// (the order is left out) where its series does not converge in
/// [`MAX_SERIES_TERMS`] terms, as `dp-accounting` does: never a guess.
fn rdp_one_round(q: f64, sigma: f64, order: f64) -> f64 {
    if q == 0.0 {
        return 0.0;
    }
    if q == 1.0 {
        return order / (2.0 * sigma * sigma);
    }
    let log_a = if order.fract() == 0.0 {
        Some(log_a_integer(q, sigma, order as u64))
    } else {
        log_a_fractional(q, sigma, order)
    };
    log_a.map_or(f64::INFINITY, |log_a| log_a / (order - 1.0))
}

/// Terms of the fractional series tried before an order is given up.
const MAX_SERIES_TERMS: u32 = 1000;

/// log A_α for integer α: log Σₖ C(α, k) (1 − q)^(α−k) qᵏ exp((k² − k) / 2σ²).
fn log_a_integer(q: f64, sigma: f64, alpha: u64) -> f64 {
    let mut log_a = f64::NEG_INFINITY;
    let mut log_binomial = 0.0;
    for k in 0..=alpha {
        if k > 0 {
            log_binomial += ((alpha - k + 1) as f64).ln() - (k as f64).ln();
        }
        let k_f = k as f64;
        let term = log_binomial
            + k_f * q.ln()
            + (alpha - k) as f64 * (-q).ln_1p()
            + (k_f * k_f - k_f) / (2.0 * sigma * sigma);
        log_a = log_add(log_a, term);
    }
    log_a
}

/// An upper bound on log A_α for fractional α: the series over both tails of the
/// Gaussian mixture with every binomial coefficient taken by its absolute value
/// (as `dp-accounting` 0.6 does: never an underestimate from cancellation),
/// until both terms fall and are e³⁰ under the sum (`None` if not in time).
fn log_a_fractional(q: f64, sigma: f64, alpha: f64) -> Option<f64> {
    let (mut log_a0, mut log_a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let (mut last_s0, mut last_s1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let tail = std::f64::consts::SQRT_2 * sigma;
    // log |C(α, i)|, built term by term.
    let mut log_coef = 0.0f64;
    for i in 0..MAX_SERIES_TERMS {
        let i_f = f64::from(i);
        if i > 0 {
            log_coef += ((alpha - i_f + 1.0) / i_f).abs().ln();
        }
        let j = alpha - i_f;
        let log_t0 = log_coef + i_f * q.ln() + j * (-q).ln_1p();
        let log_t1 = log_coef + j * q.ln() + i_f * (-q).ln_1p();
        let log_e0 = 0.5f64.ln() + log_erfc((i_f - z0) / tail);
        let log_e1 = 0.5f64.ln() + log_erfc((z0 - j) / tail);
        let log_s0 = log_t0 + (i_f * i_f - i_f) / (2.0 * sigma * sigma) + log_e0;
        let log_s1 = log_t1 + (j * j - j) / (2.0 * sigma * sigma) + log_e1;
        log_a0 = log_add(log_a0, log_s0);
        log_a1 = log_add(log_a1, log_s1);
        let total = log_add(log_a0, log_a1);
        if log_s0 < last_s0 && log_s1 < last_s1 && log_s0.max(log_s1) < total - 30.0 {
            return Some(total);
        }
        (last_s0, last_s1) = (log_s0, log_s1);
    }
    None
}

/// log(eᵃ + eᵇ).
fn log_add(a: f64, b: f64) -> f64 {
    let (high, low) = if a > b { (a, b) } else { (b, a) };
    if low == f64::NEG_INFINITY {
        return high;
    }
    high + (low - high).exp().ln_1p()
}

/// log erfc(x), finite far into the tail (Numerical Recipes' `erfcc`, relative
/// error under 1.2e-7 everywhere, taken in log form so that it never underflows).
fn log_erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let log_tail = t.ln() - z * z + poly;
    if x >= 0.0 {
        log_tail
    } else {
        // erfc(−z) = 2 − erfc(z).
        (2.0 - log_tail.exp()).ln()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epsilon(q: f64, z: f64, rounds: u64, delta: f64) -> f64 {
        SampledGaussian {
            sampling_rate: q,
            noise_multiplier: z,
            rounds,
        }
        .epsilon(delta, &default_orders())
        .unwrap()
        .epsilon
    }

    #[test]
    fn without_sampling_it_is_the_gaussian_mechanism() {
        // q = 1: RDP α / 2σ² exactly.
        let all = SampledGaussian {
            sampling_rate: 1.0,
            noise_multiplier: 2.0,
            rounds: 3,
        };
        assert!((all.rdp(4.0) - 3.0 * 4.0 / 8.0).abs() < 1e-12);
        assert_eq!(rdp_one_round(0.0, 1.0, 8.0), 0.0);
    }

    #[test]
    fn integer_and_fractional_series_agree_near_each_other() {
        // The fractional series at 3.0000001 must continue the integer sum at 3.
        for (q, sigma) in [(0.01, 1.0), (0.1, 0.8), (0.001, 4.0), (0.5, 2.0)] {
            let integer = log_a_integer(q, sigma, 3);
            let fractional = log_a_fractional(q, sigma, 3.000_000_1).unwrap();
            assert!(
                (integer - fractional).abs() < 1e-5 * integer.abs().max(1e-6),
                "q {q} σ {sigma}: {integer} vs {fractional}"
            );
        }
    }

    #[test]
    fn known_values_of_dp_accounting() {
        // From Google's dp-accounting 0.6.0 (RdpAccountant, a PoissonSampledDpEvent
        // of a GaussianDpEvent composed `rounds` times, its default orders).
        let pinned = [
            // (q, z, rounds, δ, ε)
            (0.01, 1.1, 10_000, 1e-5, 5.632_010_670_081_592),
        ];
        for (q, z, rounds, delta, expected) in pinned {
            let got = epsilon(q, z, rounds, delta);
            assert!(
                (got - expected).abs() < 1e-3 * expected,
                "q {q} z {z} T {rounds} δ {delta}: {got} vs {expected}"
            );
        }
    }

    #[test]
    fn epsilon_grows_with_rounds_and_sampling_and_falls_with_noise() {
        let base = epsilon(0.01, 1.0, 1000, 1e-5);
        assert!(epsilon(0.01, 1.0, 2000, 1e-5) > base);
        assert!(epsilon(0.02, 1.0, 1000, 1e-5) > base);
        assert!(epsilon(0.01, 2.0, 1000, 1e-5) < base);
        assert!(epsilon(0.01, 1.0, 1000, 1e-7) > base);
    }

    #[test]
    fn log_erfc_is_finite_in_the_far_tail_and_right_near_zero() {
        assert!((log_erfc(0.0) - 0.0).abs() < 1e-6);
        // erfc(1) = 0.157299207050285.
        assert!((log_erfc(1.0) - 0.157_299_207_050_285f64.ln()).abs() < 1e-6);
        // erfc(−1) = 1.842700792949715.
        assert!((log_erfc(-1.0) - 1.842_700_792_949_715f64.ln()).abs() < 1e-6);
        // erfc(30) ≈ 2.5646e-393, far below f64: still a finite log, ≈ −904.
        let far = log_erfc(30.0);
        assert!(far.is_finite() && (far + 904.0).abs() < 1.0, "{far}");
    }

    #[test]
    fn bad_parameters_are_refused_with_a_reason() {
        let bad = SampledGaussian {
            sampling_rate: 1.5,
            noise_multiplier: 1.0,
            rounds: 1,
        };
        assert!(
            bad.epsilon(1e-5, &default_orders())
                .unwrap_err()
                .contains("sampling rate")
        );
        let ok = SampledGaussian {
            sampling_rate: 0.1,
            noise_multiplier: 1.0,
            rounds: 1,
        };
        assert!(ok.epsilon(0.0, &default_orders()).is_err());
    }
}
