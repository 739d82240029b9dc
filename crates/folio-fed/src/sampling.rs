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
}
