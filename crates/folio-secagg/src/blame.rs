//! Who spoiled a share. Shares are sealed under a key agreed between the
//! owner's and the holder's cipher keys (Ristretto255), so only the holder can
//! tell that one does not open, and the server must not simply believe it: a
//! lying holder could push an honest client out. The holder therefore hands
//! the server its agreement with that one owner and a Chaum–Pedersen proof
//! that the agreement is the right one (the same secret scalar links its
//! public key to the agreement). The server opens the share itself: if it
//! does not open the owner spoiled it, if it does the holder lied. Either way
//! exactly one culprit leaves the round, and the server learns only the share
//! the owner sealed for the holder — one point of the owner's secrets, which
//! the holder could have given it anyway.

use curve25519_dalek::constants::RISTRETTO_BASEPOINT_POINT;
use curve25519_dalek::ristretto::{CompressedRistretto, RistrettoPoint};
use curve25519_dalek::scalar::Scalar;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha512};

const PROOF_LABEL: &[u8] = b"folio-secagg agreement proof v1";

/// A client's secret cipher key for one round.
pub(crate) struct CipherSecret(Scalar);

/// A proof that an agreement was made with the secret behind a public key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Proof {
    pub challenge: [u8; 32],
    pub response: [u8; 32],
}

fn point(bytes: &[u8; 32]) -> Option<RistrettoPoint> {
    CompressedRistretto(*bytes).decompress()
}

/// Whether `bytes` is a public cipher key (a Ristretto255 point).
pub fn is_cipher_key(bytes: &[u8; 32]) -> bool {
    point(bytes).is_some()
}

fn challenge(points: [&RistrettoPoint; 5]) -> Scalar {
    let mut hash = Sha512::new().chain_update(PROOF_LABEL);
    for p in points {
        hash.update(p.compress().as_bytes());
    }
    Scalar::from_bytes_mod_order_wide(&hash.finalize().into())
}

impl CipherSecret {
    /// A secret from 64 random bytes.
    pub fn from_wide(bytes: [u8; 64]) -> Self {
        Self(Scalar::from_bytes_mod_order_wide(&bytes))
    }

    pub fn public(&self) -> [u8; 32] {
        (self.0 * RISTRETTO_BASEPOINT_POINT).compress().to_bytes()
    }

    /// The agreement with `peer`'s public key; `None` if it is not a point.
    pub fn agree(&self, peer: &[u8; 32]) -> Option<[u8; 32]> {
        Some((self.0 * point(peer)?).compress().to_bytes())
    }

    /// Proves that `agreement` is this secret times `peer` (a point: the
    /// caller agreed with it), with a fresh `nonce` of 64 random bytes.
    pub fn prove(&self, peer: &[u8; 32], agreement: &[u8; 32], nonce: [u8; 64]) -> Proof {
        let (peer, agreement) = (
            point(peer).expect("agreed"),
            point(agreement).expect("made"),
        );
        let public = self.0 * RISTRETTO_BASEPOINT_POINT;
        let r = Scalar::from_bytes_mod_order_wide(&nonce);
        let (a1, a2) = (r * RISTRETTO_BASEPOINT_POINT, r * peer);
        let c = challenge([&public, &peer, &agreement, &a1, &a2]);
        Proof {
            challenge: c.to_bytes(),
            response: (r + c * self.0).to_bytes(),
        }
    }
}

/// Whether `proof` shows that `agreement` is the secret behind `holder`'s
/// public key times `owner`'s.
pub fn verify(holder: &[u8; 32], owner: &[u8; 32], agreement: &[u8; 32], proof: &Proof) -> bool {
    let (Some(public), Some(peer), Some(agreement)) =
        (point(holder), point(owner), point(agreement))
    else {
        return false;
    };
    let canonical = |bytes: &[u8; 32]| Option::<Scalar>::from(Scalar::from_canonical_bytes(*bytes));
    let (Some(c), Some(s)) = (canonical(&proof.challenge), canonical(&proof.response)) else {
        return false;
    };
    let a1 = s * RISTRETTO_BASEPOINT_POINT - c * public;
    let a2 = s * peer - c * agreement;
    challenge([&public, &peer, &agreement, &a1, &a2]) == c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(byte: u8) -> CipherSecret {
        CipherSecret::from_wide([byte; 64])
    }

    #[test]
    fn an_agreement_proves_only_with_the_right_secret() {
        let (holder, owner) = (secret(1), secret(2));
        let agreement = holder.agree(&owner.public()).unwrap();
        assert_eq!(agreement, owner.agree(&holder.public()).unwrap());
        let proof = holder.prove(&owner.public(), &agreement, [9; 64]);
        assert!(verify(
            &holder.public(),
            &owner.public(),
            &agreement,
            &proof
        ));
        // A made-up agreement, another holder's key, a changed response.
        let fake = secret(3).agree(&owner.public()).unwrap();
        assert!(!verify(&holder.public(), &owner.public(), &fake, &proof));
        assert!(!verify(
            &secret(3).public(),
            &owner.public(),
            &agreement,
            &proof
        ));
        let mut bent = proof.clone();
        bent.response[0] ^= 1;
        assert!(!verify(
            &holder.public(),
            &owner.public(),
            &agreement,
            &bent
        ));
        // A proof for a fake agreement made with the fake's own secret does not
        // pass as the holder's.
        let liar = secret(3).prove(&owner.public(), &fake, [7; 64]);
        assert!(!verify(&holder.public(), &owner.public(), &fake, &liar));
        assert!(!verify(&holder.public(), &[0xff; 32], &agreement, &proof));
    }
}
