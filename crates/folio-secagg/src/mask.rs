//! Masks: a 32-byte seed expanded by ChaCha20 into one u32 per coordinate.

use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};

/// Adds (or subtracts) the mask `seed` expands to, mod 2³².
pub fn apply(values: &mut [u32], seed: &[u8; 32], add: bool) {
    let mut rng = ChaCha20Rng::from_seed(*seed);
    let mut bytes = [0u8; 256];
    for chunk in values.chunks_mut(bytes.len() / 4) {
        let bytes = &mut bytes[..chunk.len() * 4];
        rng.fill_bytes(bytes);
        let words = bytes
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        if add {
            chunk
                .iter_mut()
                .zip(words)
                .for_each(|(v, m)| *v = v.wrapping_add(m));
        } else {
            chunk
                .iter_mut()
                .zip(words)
                .for_each(|(v, m)| *v = v.wrapping_sub(m));
        }
    }
}

/// A 32-byte key for one purpose (`label`) of one round, between clients `a`
/// and `b` (ordered as given), from their X25519 agreement.
pub fn derive(label: &str, round: u64, a: u32, b: u32, agreement: &[u8; 32]) -> [u8; 32] {
    Sha256::new()
        .chain_update(label.as_bytes())
        .chain_update(round.to_le_bytes())
        .chain_update(a.to_le_bytes())
        .chain_update(b.to_le_bytes())
        .chain_update(agreement)
        .finalize()
        .into()
}

/// The commitment to a self-mask seed: lets the server tell a reconstructed
/// seed from a wrong one.
pub fn commit(seed: &[u8; 32]) -> [u8; 32] {
    Sha256::new()
        .chain_update(b"folio-secagg self-mask commitment v1")
        .chain_update(seed)
        .finalize()
        .into()
}

/// Encodes u32s as little-endian bytes (the wire form of a masked input).
pub fn to_bytes(values: &[u32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Decodes [`to_bytes`]; `None` if the length is not a multiple of 4.
pub fn from_bytes(bytes: &[u8]) -> Option<Vec<u32>> {
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    Some(
        bytes
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mask_added_then_subtracted_leaves_nothing() {
        let original: Vec<u32> = (0..1000).collect();
        let mut values = original.clone();
        apply(&mut values, &[7; 32], true);
        assert_ne!(values, original);
        apply(&mut values, &[7; 32], false);
        assert_eq!(values, original);
    }

    #[test]
    fn masks_of_different_seeds_and_lengths_agree_where_they_overlap() {
        let (mut short, mut long) = (vec![0u32; 70], vec![0u32; 300]);
        apply(&mut short, &[1; 32], true);
        apply(&mut long, &[1; 32], true);
        assert_eq!(short, long[..70]);
        let mut other = vec![0u32; 70];
        apply(&mut other, &[2; 32], true);
        assert_ne!(short, other);
    }

    #[test]
    fn bytes_round_trip() {
        let values = vec![0, 1, u32::MAX, 0xdead_beef];
        assert_eq!(from_bytes(&to_bytes(&values)), Some(values));
        assert_eq!(from_bytes(&[1, 2, 3]), None);
    }
}
