//! Seeded client sampling: which of the connected clients train this round.

use folio_data::rng::SplitMix64;

/// Picks `count` of `candidates` (fewer if there are fewer), uniformly without
/// replacement, deterministically for a given `seed` and round.
pub fn sample_clients<T: Clone>(candidates: &[T], count: usize, seed: u64, round: u64) -> Vec<T> {
    let mut rng = SplitMix64::new(seed ^ round.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut pool: Vec<T> = candidates.to_vec();
    let count = count.min(pool.len());
    // A partial Fisher–Yates shuffle.
    for i in 0..count {
        let j = i + rng.below(pool.len() - i);
        pool.swap(i, j);
    }
    pool.truncate(count);
    pool
}

/// Picks `count` indices into `sizes` with replacement, each draw landing on `i`
/// with probability `sizes[i] / Σ sizes`, deterministically for a given `seed`
/// and round. Averaged uniformly, the picked clients' updates are an unbiased
/// estimate of the update on everyone's data pooled (Li et al. 2020, "On the
/// Convergence of FedAvg on Non-IID Data", scheme I): large clients are picked
/// more often instead of weighing more, so no one client's many local steps
/// dominate a round.
pub fn sample_by_size(sizes: &[u64], count: usize, seed: u64, round: u64) -> Vec<usize> {
    let mut cumulative = Vec::with_capacity(sizes.len());
    let mut total = 0u64;
    for &size in sizes {
        total += size;
        cumulative.push(total);
    }
    if total == 0 {
        return Vec::new();
    }
    let mut rng = SplitMix64::new(seed ^ round.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    (0..count)
        .map(|_| {
            let target = ((u128::from(rng.next_u64()) * u128::from(total)) >> 64) as u64;
            cumulative.partition_point(|&end| end <= target)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_is_seeded_distinct_and_bounded() {
        let ids: Vec<u32> = (0..50).collect();
        let a = sample_clients(&ids, 10, 1, 3);
        assert_eq!(a, sample_clients(&ids, 10, 1, 3));
        assert_ne!(a, sample_clients(&ids, 10, 1, 4));
        let mut unique = a.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), 10);
        assert_eq!(sample_clients(&ids[..3], 10, 1, 3).len(), 3);
    }

    #[test]
    fn sampling_by_size_is_seeded_and_proportional() {
        let sizes = [0, 1, 3, 0, 6];
        let picks = sample_by_size(&sizes, 10_000, 7, 2);
        assert_eq!(picks, sample_by_size(&sizes, 10_000, 7, 2));
        assert_ne!(picks[..20], sample_by_size(&sizes, 10_000, 7, 3)[..20]);
        let mut counts = [0usize; 5];
        for pick in picks {
            counts[pick] += 1;
        }
        // Empty clients are never picked; the others in proportion to their size.
        assert_eq!((counts[0], counts[3]), (0, 0));
        for (i, expected) in [(1, 1_000.0), (2, 3_000.0), (4, 6_000.0)] {
            let found = counts[i] as f64;
            assert!((found - expected).abs() < 200.0, "{counts:?}");
        }
        assert!(sample_by_size(&[0, 0], 3, 0, 0).is_empty());
    }
}
