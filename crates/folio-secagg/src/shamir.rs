//! Shamir secret sharing of 32-byte secrets over GF(2⁸), byte by byte (as
//! HashiCorp Vault's and `sharks` do): any `threshold` shares give the secret
//! back, fewer tell nothing about it. The field arithmetic has no tables and
//! no branches on secret data.

use rand_core::RngCore;

/// A secret, and each share of one: 32 bytes.
pub type Secret = [u8; 32];

/// Multiplication in GF(2⁸) modulo x⁸ + x⁴ + x³ + x + 1 (AES's polynomial).
fn mul(mut a: u8, mut b: u8) -> u8 {
    let mut product = 0u8;
    for _ in 0..8 {
        product ^= a & 0u8.wrapping_sub(b & 1);
        let carry = 0u8.wrapping_sub(a >> 7);
        a = (a << 1) ^ (0x1b & carry);
        b >>= 1;
    }
    product
}

/// The inverse of a non-zero element: a²⁵⁴ (a fixed chain of squarings).
fn inv(a: u8) -> u8 {
    let mut result = 1u8;
    let mut power = a;
    // 254 = 2 + 4 + ... + 128: the product of a^(2^k) for k = 1..=7.
    for _ in 1..8 {
        power = mul(power, power);
        result = mul(result, power);
    }
    result
}

/// The shares of `secret` at the points `xs` (distinct and non-zero): a random
/// polynomial of degree `threshold − 1` per byte, whose value at 0 is the byte.
pub fn split(secret: &Secret, threshold: usize, xs: &[u8], rng: &mut impl RngCore) -> Vec<Secret> {
    assert!(threshold >= 1, "a threshold of at least one share");
    debug_assert!(xs.iter().all(|&x| x != 0), "the point 0 is the secret");
    // coefficients[k][j]: the x^k coefficient of byte j's polynomial.
    let mut coefficients = vec![[0u8; 32]; threshold];
    coefficients[0] = *secret;
    for row in &mut coefficients[1..] {
        rng.fill_bytes(row);
    }
    xs.iter()
        .map(|&x| {
            let mut share = [0u8; 32];
            for (j, byte) in share.iter_mut().enumerate() {
                // Horner, from the highest coefficient down.
                *byte = coefficients
                    .iter()
                    .rev()
                    .fold(0u8, |acc, row| mul(acc, x) ^ row[j]);
            }
            share
        })
        .collect()
}

/// The secret from shares at distinct non-zero points (as many as the
/// threshold: more are fine, fewer give a wrong answer): Lagrange at 0.
pub fn combine(shares: &[(u8, Secret)]) -> Secret {
    let mut secret = [0u8; 32];
    for (i, (xi, yi)) in shares.iter().enumerate() {
        // ∏_{j≠i} x_j / (x_j − x_i); subtraction is xor.
        let basis = shares
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != i)
            .fold(1u8, |acc, (_, (xj, _))| mul(acc, mul(*xj, inv(xj ^ xi))));
        for (s, y) in secret.iter_mut().zip(yi) {
            *s ^= mul(*y, basis);
        }
    }
    secret
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    #[test]
    fn the_field_is_a_field() {
        // The AES test vector: {57} · {83} = {c1}.
        assert_eq!(mul(0x57, 0x83), 0xc1);
        for a in 1..=255u8 {
            assert_eq!(mul(a, inv(a)), 1, "{a} times its inverse");
            assert_eq!(mul(a, 1), a);
            assert_eq!(mul(a, 0), 0);
        }
        for (a, b, c) in [(3u8, 7u8, 200u8), (91, 17, 254), (255, 128, 1)] {
            assert_eq!(mul(a, mul(b, c)), mul(mul(a, b), c));
            assert_eq!(mul(a, b ^ c), mul(a, b) ^ mul(a, c));
        }
    }

    #[test]
    fn any_threshold_shares_give_the_secret_back() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let mut secret = [0u8; 32];
        rng.fill_bytes(&mut secret);
        let xs: Vec<u8> = (1..=7).collect();
        let shares = split(&secret, 4, &xs, &mut rng);
        let points: Vec<(u8, Secret)> = xs.iter().copied().zip(shares).collect();
        for subset in [[0, 1, 2, 3], [3, 4, 5, 6], [6, 0, 4, 2]] {
            let chosen: Vec<_> = subset.iter().map(|&i| points[i]).collect();
            assert_eq!(combine(&chosen), secret);
        }
        assert_eq!(combine(&points), secret, "more than the threshold");
        assert_ne!(combine(&points[..3]), secret, "fewer than the threshold");
    }

    #[test]
    fn fewer_than_the_threshold_shares_are_uniform() {
        // With threshold 2, one share is the secret plus a uniform byte times
        // x: over many sharings of the same secret, each value of a share's
        // first byte comes up about equally often.
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let secret = [0x42u8; 32];
        let mut counts = [0u32; 256];
        for _ in 0..25_600 {
            let share = split(&secret, 2, &[5], &mut rng)[0];
            counts[share[0] as usize] += 1;
        }
        let expected = 100.0;
        let chi2: f64 = counts
            .iter()
            .map(|&c| (f64::from(c) - expected).powi(2) / expected)
            .sum();
        // 255 degrees of freedom: the 0.999 quantile is about 330.
        assert!(chi2 < 330.0, "chi-squared {chi2}");
    }
}
