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

/// Picks `count` distinct indices into `sizes` (fewer if fewer are non-empty),
/// each draw landing on a not-yet-picked `i` with probability proportional to
/// `sizes[i]`, deterministically for a given `seed` and round. Averaged uniformly,
/// the picked clients' updates approximate the update on everyone's data pooled
/// (Li et al. 2020, "On the Convergence of FedAvg on Non-IID Data", scheme I,
/// there with replacement): large clients are picked more often instead of
/// weighing more, so no one client's many local steps dominate a round. Without
/// replacement, a client trains once a round, in a tab as in a simulation.
pub fn sample_by_size(sizes: &[u64], count: usize, seed: u64, round: u64) -> Vec<usize> {
    let mut rng = SplitMix64::new(seed ^ round.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut left: Vec<u64> = sizes.to_vec();
    let mut total: u64 = left.iter().sum();
    let mut picked = Vec::with_capacity(count.min(sizes.len()));
    while picked.len() < count && total > 0 {
        let mut target = ((u128::from(rng.next_u64()) * u128::from(total)) >> 64) as u64;
        let pick = left
            .iter()
            .position(|&size| {
                if target < size {
                    return true;
                }
                target -= size;
                false
            })
            .expect("target < total");
        total -= left[pick];
        left[pick] = 0;
        picked.push(pick);
    }
    picked
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
    fn sampling_by_size_is_seeded_distinct_and_proportional() {
        let sizes = [0, 1, 3, 0, 6];
        assert_eq!(
            sample_by_size(&sizes, 2, 7, 2),
            sample_by_size(&sizes, 2, 7, 2)
        );
        // Empty clients are never picked, and nobody twice.
        let mut all = sample_by_size(&sizes, 10, 7, 2);
        all.sort();
        assert_eq!(all, vec![1, 2, 4]);
        // One draw a round: each client in proportion to its size.
        let mut counts = [0usize; 5];
        for round in 0..10_000 {
            counts[sample_by_size(&sizes, 1, 7, round)[0]] += 1;
        }
        assert_eq!((counts[0], counts[3]), (0, 0));
        for (i, expected) in [(1, 1_000.0), (2, 3_000.0), (4, 6_000.0)] {
            let found = counts[i] as f64;
            assert!((found - expected).abs() < 250.0, "{counts:?}");
        }
        assert!(sample_by_size(&[0, 0], 3, 0, 0).is_empty());
    }
}
