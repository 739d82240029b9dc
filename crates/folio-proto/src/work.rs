//! Proof of work for a new session: when the server is busy, or the network a
//! newcomer comes from already holds many sessions, it asks for a nonce whose
//! SHA-256 with a fresh seed starts with `bits` zero bits (2^bits hashes on
//! average). A genuine device pays it once a session; a crowd pays it per
//! session. Pure: no IO, no clock.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The most bits a server may ask for (about 4 million hashes: a second or two
/// in a tab); a client does no more whatever it is asked.
pub const MAX_BITS: u8 = 22;

/// Server → client: solve this before joining.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Challenge {
    pub seed: [u8; 32],
    pub bits: u8,
}

fn hash(seed: &[u8; 32], nonce: u64) -> [u8; 32] {
    Sha256::new()
        .chain_update(b"folio join work v1")
        .chain_update(seed)
        .chain_update(nonce.to_le_bytes())
        .finalize()
        .into()
}

fn leading_zeros(hash: &[u8; 32]) -> u32 {
    let mut zeros = 0;
    for byte in hash {
        zeros += byte.leading_zeros();
        if *byte != 0 {
            break;
        }
    }
    zeros
}

impl Challenge {
    /// Whether `nonce` solves it.
    pub fn solved_by(&self, nonce: u64) -> bool {
        leading_zeros(&hash(&self.seed, nonce)) >= u32::from(self.bits.min(MAX_BITS))
    }

    /// The first nonce that solves it (2^bits tries on average).
    pub fn solve(&self) -> u64 {
        (0..)
            .find(|&nonce| self.solved_by(nonce))
            .expect("some nonce solves it")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_solution_has_the_asked_zero_bits_and_fits_only_its_seed() {
        let challenge = Challenge {
            seed: [7; 32],
            bits: 12,
        };
        let nonce = challenge.solve();
        assert!(challenge.solved_by(nonce));
        assert!(leading_zeros(&hash(&challenge.seed, nonce)) >= 12);
        let other = Challenge {
            seed: [8; 32],
            ..challenge
        };
        // One chance in 4096 that it solves another seed too.
        assert!(!other.solved_by(nonce) || other.solve() == nonce);
        // No work asked: any nonce does.
        assert!(
            Challenge {
                bits: 0,
                ..challenge
            }
            .solved_by(12345)
        );
        // Solving takes about 2^bits tries: over 64 seeds at 8 bits, the mean
        // first solution is near 256.
        let mean = (0..64u8)
            .map(|s| {
                Challenge {
                    seed: [s; 32],
                    bits: 8,
                }
                .solve() as f64
            })
            .sum::<f64>()
            / 64.0;
        assert!((100.0..600.0).contains(&mean), "{mean}");
    }
}
