//! Exact draws of the Skellam distribution: the difference of two independent
//! Poisson(μ/2) draws, of mean 0 and variance μ. A sum of independent Skellam
//! draws is Skellam again (the variances add), so devices that each add a share
//! give the round's sum the whole noise.

use rand_core::RngCore;

/// One Skellam draw of variance `variance` (≥ 0).
pub fn skellam(variance: f64, rng: &mut impl RngCore) -> i64 {
    let half = variance / 2.0;
    poisson(half, rng) - poisson(half, rng)
}

/// Means above this are drawn as two halves: f64 keeps every integer of the
/// draw exact.
const MOST_MEAN: f64 = (1u64 << 50) as f64;

/// One Poisson draw of mean `mean`: by multiplication under 10, else by
/// Hörmann's transformed rejection with squeeze (PTRS, 1993), whose acceptance
/// test is taken in a form that keeps its precision at means of 10¹⁵; above
/// 2⁵⁰ as the sum of two draws of half the mean (a sum of Poissons is Poisson).
pub fn poisson(mean: f64, rng: &mut impl RngCore) -> i64 {
    if mean <= 0.0 {
        return 0;
    }
    if mean > MOST_MEAN {
        return poisson(mean / 2.0, rng) + poisson(mean / 2.0, rng);
    }
    if mean < 10.0 {
        let limit = (-mean).exp();
        let mut product = uniform(rng);
        let mut count = 0;
        while product > limit {
            product *= uniform(rng);
            count += 1;
        }
        return count;
    }
    let b = 0.931 + 2.53 * mean.sqrt();
    let a = -0.059 + 0.02483 * b;
    let inverse_alpha = 1.1239 + 1.1328 / (b - 3.4);
    let v_r = 0.9277 - 3.6224 / (b - 2.0);
    loop {
        let u = uniform(rng) - 0.5;
        let v = uniform(rng);
        let us = 0.5 - u.abs();
        let k = ((2.0 * a / us + b) * u + mean + 0.43).floor();
        if us >= 0.07 && v <= v_r {
            return k as i64;
        }
        if k < 0.0 || (us < 0.013 && v > us) {
            continue;
        }
        let lhs = v.ln() + inverse_alpha.ln() - (a / (us * us) + b).ln();
        if lhs <= log_poisson_pmf(k, mean) {
            return k as i64;
        }
    }
}

/// log(e^−λ λᵏ / k!) for integer k ≥ 0, as k·log(λ/k) + (k − λ) − log√(2πk)
/// − (Stirling's remainder) beyond small k: no difference of huge terms.
fn log_poisson_pmf(k: f64, mean: f64) -> f64 {
    if k < 10.0 {
        let log_factorial: f64 = (2..=k as u32).map(|i| f64::from(i).ln()).sum();
        return -mean + k * mean.ln() - log_factorial;
    }
    let remainder = 1.0 / (12.0 * k) - 1.0 / (360.0 * k.powi(3)) + 1.0 / (1260.0 * k.powi(5));
    k * ((mean - k) / k).ln_1p() + (k - mean) - 0.5 * (std::f64::consts::TAU * k).ln() - remainder
}

/// A uniform draw from (0, 1): 53 random bits, never 0.
fn uniform(rng: &mut impl RngCore) -> f64 {
    ((rng.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    /// Mean, variance and the fourth central moment over `n` draws.
    fn moments(n: usize, mut draw: impl FnMut() -> i64) -> (f64, f64, f64) {
        let xs: Vec<f64> = (0..n).map(|_| draw() as f64).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let central = |p: i32| xs.iter().map(|x| (x - mean).powi(p)).sum::<f64>() / n as f64;
        (mean, central(2), central(4))
    }

    #[test]
    fn poisson_draws_have_the_right_mean_and_variance_at_every_scale() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        for mean in [0.3, 4.0, 9.99, 10.0, 37.5, 1e4, 1e9, 1e15] {
            let n = 200_000;
            let (m, var, _) = moments(n, || poisson(mean, &mut rng));
            // Five standard errors of each.
            let mean_error = 5.0 * (mean / n as f64).sqrt();
            assert!((m - mean).abs() < mean_error, "λ {mean}: mean {m}");
            assert!(
                (var / mean - 1.0).abs() < 5.0 * (2.0 / n as f64).sqrt() + 1e-3,
                "λ {mean}: variance {var}"
            );
        }
    }

    #[test]
    fn poisson_probabilities_match_the_pmf() {
        // λ = 12 (the rejection sampler): each value's frequency against e^−λ λᵏ/k!.
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let n = 400_000;
        let mut counts = [0usize; 40];
        for _ in 0..n {
            counts[(poisson(12.0, &mut rng) as usize).min(39)] += 1;
        }
        for (k, &count) in counts.iter().enumerate().take(30) {
            let p = log_poisson_pmf(k as f64, 12.0).exp();
            let expected = p * n as f64;
            let tolerance = 5.0 * expected.sqrt() + 5.0;
            assert!(
                (count as f64 - expected).abs() < tolerance,
                "k {k}: {count} vs {expected:.0}"
            );
        }
    }

    #[test]
    fn the_log_pmf_agrees_with_its_direct_form() {
        for (k, mean) in [(10.0, 12.0), (57.0, 50.0), (1000.0, 990.5)] {
            let direct: f64 =
                -mean + k * f64::ln(mean) - (2..=k as u32).map(|i| f64::from(i).ln()).sum::<f64>();
            assert!((log_poisson_pmf(k, mean) - direct).abs() < 1e-9, "k {k}");
        }
    }

    #[test]
    fn skellam_draws_are_centred_with_the_variance_asked_and_a_light_tail() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        for variance in [0.5, 30.0, 1e6, 1e12] {
            let n = 200_000;
            let (m, var, fourth) = moments(n, || skellam(variance, &mut rng));
            assert!(
                m.abs() < 5.0 * (variance / n as f64).sqrt(),
                "μ {variance}: mean {m}"
            );
            assert!(
                (var / variance - 1.0).abs() < 0.02,
                "μ {variance}: variance {var}"
            );
            // Skellam's kurtosis is 3 + 1/μ: Gaussian-like at large variance.
            let kurtosis = fourth / (var * var);
            assert!(
                (kurtosis - (3.0 + 1.0 / variance)).abs() < 0.1,
                "μ {variance}: {kurtosis}"
            );
        }
        assert_eq!(skellam(0.0, &mut rng), 0);
        // Past 2⁵⁰ (drawn in halves): still the variance asked, and odd values
        // as often as even ones (no granularity lost to f64).
        let n = 20_000;
        let draws: Vec<i64> = (0..n).map(|_| skellam(1e17, &mut rng)).collect();
        let var = draws.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / n as f64;
        assert!((var / 1e17 - 1.0).abs() < 0.05, "variance {var}");
        let odd = draws.iter().filter(|&&x| x % 2 != 0).count();
        assert!((9_000..11_000).contains(&odd), "{odd} odd of {n}");
    }
}
