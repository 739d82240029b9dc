//! Who shares secrets and masks with whom. Full SecAgg: everyone with everyone.
//! SecAgg+ (Bell et al. 2020): a random k-regular graph, here a Harary graph
//! (a ring with each client joined to its k/2 nearest on either side) over a
//! random order of the clients, so that each client's cost grows with k, not n.

use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

/// How many neighbours each of `n` clients has for `degree` (0: everyone;
/// otherwise rounded up to even, at most n − 1).
pub fn neighbours(n: usize, degree: usize) -> usize {
    let everyone = n.saturating_sub(1);
    if degree == 0 {
        return everyone;
    }
    (2 * degree.div_ceil(2)).min(everyone)
}

/// The default threshold: a majority of a client's share holders (its
/// neighbours and itself).
pub fn majority(n: usize, degree: usize) -> u32 {
    let holders = neighbours(n, degree) as u32 + 1;
    holders / 2 + 1
}

/// The neighbours of each of the clients `0..n` (sorted), for `degree`
/// (0, or at least n − 1: everyone), the order drawn from `seed`.
pub fn neighbourhoods(n: usize, degree: usize, seed: [u8; 32]) -> Vec<Vec<usize>> {
    if neighbours(n, degree) == n.saturating_sub(1) {
        return (0..n)
            .map(|i| (0..n).filter(|&j| j != i).collect())
            .collect();
    }
    // An even degree: k/2 each side.
    let half = degree.div_ceil(2);
    let mut rng = ChaCha20Rng::from_seed(seed);
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    let mut neighbours = vec![Vec::with_capacity(2 * half); n];
    for (position, &client) in order.iter().enumerate() {
        for step in 1..=half {
            neighbours[client].push(order[(position + step) % n]);
            neighbours[client].push(order[(position + n - step) % n]);
        }
    }
    for list in &mut neighbours {
        list.sort_unstable();
    }
    neighbours
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_degrees_make_a_symmetric_regular_graph() {
        for (n, degree) in [(64, 12), (10, 4), (7, 3), (100, 2)] {
            let graph = neighbourhoods(n, degree, [9; 32]);
            let k = degree.div_ceil(2) * 2;
            for (i, list) in graph.iter().enumerate() {
                assert_eq!(list.len(), k, "client {i} of {n}");
                assert!(!list.contains(&i));
                for &j in list {
                    assert!(graph[j].contains(&i), "{i}–{j} is not symmetric");
                }
            }
        }
    }

    #[test]
    fn large_or_zero_degrees_join_everyone() {
        for (n, degree) in [(5, 0), (5, 4), (5, 9), (6, 5)] {
            let graph = neighbourhoods(n, degree, [1; 32]);
            assert!(graph.iter().all(|list| list.len() == n - 1));
        }
    }

    #[test]
    fn the_majority_counts_the_client_among_its_holders() {
        assert_eq!(majority(4, 0), 3, "4 holders");
        assert_eq!(majority(3, 0), 2);
        assert_eq!(majority(64, 12), 7, "13 holders");
        assert_eq!(majority(64, 11), 7, "11 rounds up to 12");
        assert_eq!(majority(1, 0), 1);
    }

    #[test]
    fn the_order_depends_on_the_seed() {
        assert_ne!(
            neighbourhoods(64, 6, [1; 32]),
            neighbourhoods(64, 6, [2; 32])
        );
    }
}
