//! A client's side of a secure round: one state machine, driven by the
//! server's messages, the same natively and in a tab.

use std::collections::BTreeMap;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::blame::CipherSecret;
use crate::shamir::{self, Secret};
use crate::{
    Check, Input, Keys, MAX_NEIGHBOURS, Masked, Peer, Proceed, Reveal, Revealed, Roster,
    SEALED_BYTES, Sealed, SecAggError, SecureSpec, Shares, SharesFor, Unmask, Unopened, mask,
};

/// Labels that keep each derived key to one purpose.
pub(crate) const SHARE_LABEL: &str = "folio-secagg share key v1";
pub(crate) const MASK_LABEL: &str = "folio-secagg pairwise mask v1";

/// A neighbour's public keys.
#[derive(Clone)]
struct Neighbour {
    cipher_key: [u8; 32],
    mask_key: PublicKey,
}

/// This client's shares of one neighbour's secrets.
#[derive(Clone, Copy)]
pub(crate) struct Held {
    mask_key: Secret,
    self_mask: Secret,
}

enum Stage {
    /// Keys sent; waiting for the roster.
    Advertised,
    /// Shares sent; waiting for the neighbours' shares.
    Shared {
        me: u32,
        neighbours: BTreeMap<u32, Neighbour>,
        /// This client's own shares of its secrets.
        own: Held,
    },
    /// Holds the shares that opened; said which did not, and waits for the
    /// server to name who is out.
    Checked {
        me: u32,
        neighbours: BTreeMap<u32, Neighbour>,
        held: BTreeMap<u32, Held>,
        unopened: Vec<u32>,
    },
    /// Holds the shares of the neighbours still in; ready to mask.
    Ready {
        me: u32,
        neighbours: BTreeMap<u32, Neighbour>,
        held: BTreeMap<u32, Held>,
    },
    /// Masked input sent; waiting for the unmasking request.
    Masked { held: BTreeMap<u32, Held> },
    /// Shares revealed: the round is over for this client.
    Done,
}

impl Stage {
    fn name(&self) -> &'static str {
        match self {
            Stage::Advertised => "keys",
            Stage::Shared { .. } => "shares",
            Stage::Checked { .. } => "check",
            Stage::Ready { .. } => "masked input",
            Stage::Masked { .. } => "unmasking",
            Stage::Done => "done",
        }
    }
}

pub struct SecureClient {
    round: u64,
    spec: SecureSpec,
    cipher: CipherSecret,
    mask: StaticSecret,
    self_mask: Secret,
    rng: ChaCha20Rng,
    stage: Stage,
}

/// Sealing and opening a share between two clients: a key per direction,
/// derived from their agreement, used once (so a fixed nonce is safe).
fn share_cipher(round: u64, owner: u32, holder: u32, agreement: &[u8; 32]) -> ChaCha20Poly1305 {
    let key = mask::derive(SHARE_LABEL, round, owner, holder, agreement);
    ChaCha20Poly1305::new(Key::from_slice(&key))
}

fn share_header(round: u64, owner: u32, holder: u32) -> [u8; 16] {
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&owner.to_le_bytes());
    header[4..8].copy_from_slice(&holder.to_le_bytes());
    header[8..].copy_from_slice(&round.to_le_bytes());
    header
}

/// Opens the share `owner` sealed for `holder`; `None` if it does not open or
/// names another sender, holder or round.
pub(crate) fn open_share(
    round: u64,
    owner: u32,
    holder: u32,
    agreement: &[u8; 32],
    ciphertext: &[u8],
) -> Option<Held> {
    let header = share_header(round, owner, holder);
    let plaintext = share_cipher(round, owner, holder, agreement)
        .decrypt(
            Nonce::from_slice(&[0; 12]),
            Payload {
                msg: ciphertext,
                aad: &header,
            },
        )
        .ok()?;
    if plaintext.len() != SEALED_BYTES - 16 || plaintext[..16] != header {
        return None;
    }
    let secret = |at: usize| -> Secret { plaintext[at..at + 32].try_into().expect("32") };
    Some(Held {
        mask_key: secret(16),
        self_mask: secret(48),
    })
}

/// The seed of the pairwise mask between `a` and `b` (the same from both ends).
pub(crate) fn pairwise_seed(round: u64, a: u32, b: u32, agreement: &[u8; 32]) -> [u8; 32] {
    mask::derive(MASK_LABEL, round, a.min(b), a.max(b), agreement)
}

impl SecureClient {
    /// Starts a round: fresh keys and self-mask seed from `entropy` (32 bytes
    /// from the OS: `getrandom`, `crypto.getRandomValues` in a tab). Returns
    /// the keys to send.
    pub fn new(spec: SecureSpec, entropy: [u8; 32]) -> (Self, Keys) {
        let round = spec.id;
        let mut rng = ChaCha20Rng::from_seed(entropy);
        let mut secret = || {
            let mut bytes = [0u8; 32];
            rng.fill_bytes(&mut bytes);
            bytes
        };
        let cipher = CipherSecret::from_wide([secret(), secret()].concat().try_into().expect("64"));
        let mask = StaticSecret::from(secret());
        let self_mask = secret();
        let keys = Keys {
            round,
            cipher_key: cipher.public(),
            mask_key: PublicKey::from(&mask).to_bytes(),
        };
        let client = Self {
            round,
            spec,
            cipher,
            mask,
            self_mask,
            rng,
            stage: Stage::Advertised,
        };
        (client, keys)
    }

    pub fn round(&self) -> u64 {
        self.round
    }

    pub fn spec(&self) -> &SecureSpec {
        &self.spec
    }

    fn check_round(&self, round: u64) -> Result<(), SecAggError> {
        if round != self.round {
            return Err(SecAggError::WrongRound {
                expected: self.round,
                found: round,
            });
        }
        Ok(())
    }

    fn out_of_order(&self, got: &'static str) -> SecAggError {
        SecAggError::OutOfOrder {
            got,
            stage: self.stage.name(),
        }
    }

    /// Step 2: shares of this client's mask key and self-mask seed, sealed
    /// for each neighbour the roster names.
    pub fn roster(&mut self, roster: Roster) -> Result<Shares, SecAggError> {
        self.check_round(roster.round)?;
        if !matches!(self.stage, Stage::Advertised) {
            return Err(self.out_of_order("a roster"));
        }
        let me = roster.you;
        let mut neighbours = BTreeMap::new();
        let mut saw_myself = false;
        for Peer {
            index,
            cipher_key,
            mask_key,
        } in roster.peers
        {
            if index == me {
                let mine = (self.cipher.public(), PublicKey::from(&self.mask).to_bytes());
                if mine != (cipher_key, mask_key) {
                    return Err(SecAggError::BadRequest(
                        "the roster holds other keys for this client than it sent".into(),
                    ));
                }
                saw_myself = true;
                continue;
            }
            if !crate::blame::is_cipher_key(&cipher_key) {
                return Err(SecAggError::BadKey("a neighbour's cipher key"));
            }
            let neighbour = Neighbour {
                cipher_key,
                mask_key: PublicKey::from(mask_key),
            };
            if neighbours.insert(index, neighbour).is_some() {
                return Err(SecAggError::BadRequest(format!(
                    "client {index} is named twice"
                )));
            }
        }
        if !saw_myself {
            return Err(SecAggError::BadRequest(
                "the roster does not name this client".into(),
            ));
        }
        // This client and its neighbours hold its shares: the holder at rank r
        // (in index order) has the shares at point r + 1.
        let threshold = self.spec.threshold as usize;
        let holders = neighbours.len() + 1;
        if neighbours.len() > MAX_NEIGHBOURS || holders < threshold.max(1) {
            return Err(SecAggError::TooFew {
                stage: "keys",
                needed: threshold.max(1),
                have: holders,
            });
        }
        let points: Vec<u8> = (1..=holders as u8).collect();
        let key_shares = shamir::split(&self.mask.to_bytes(), threshold, &points, &mut self.rng);
        let mask_shares = shamir::split(&self.self_mask, threshold, &points, &mut self.rng);
        let my_rank = neighbours.range(..me).count();
        let own = Held {
            mask_key: key_shares[my_rank],
            self_mask: mask_shares[my_rank],
        };
        let ranks = (0..holders).filter(|&rank| rank != my_rank);
        let sealed = neighbours
            .iter()
            .zip(ranks)
            .map(|((&index, neighbour), rank)| {
                let agreement = self.cipher.agree(&neighbour.cipher_key).expect("checked");
                let header = share_header(self.round, me, index);
                let mut plaintext = header.to_vec();
                plaintext.extend_from_slice(&key_shares[rank]);
                plaintext.extend_from_slice(&mask_shares[rank]);
                let ciphertext = share_cipher(self.round, me, index, &agreement)
                    .encrypt(
                        Nonce::from_slice(&[0; 12]),
                        Payload {
                            msg: &plaintext,
                            aad: &header,
                        },
                    )
                    .expect("sealing a short share cannot fail");
                Sealed {
                    peer: index,
                    ciphertext,
                }
            })
            .collect();
        self.stage = Stage::Shared {
            me,
            neighbours,
            own,
        };
        Ok(Shares {
            round: self.round,
            commitment: mask::commit(&self.self_mask),
            sealed,
        })
    }

    /// The neighbours' shares arrived: those that open are kept; for each that
    /// does not (spoiled by its owner), the check tells the server, with the
    /// proof it needs to see for itself. A share from a client that is not a
    /// neighbour, or a second one, is the server's doing and refuses the whole
    /// message: this client then leaves the round.
    pub fn shares(&mut self, shares: SharesFor) -> Result<Check, SecAggError> {
        self.check_round(shares.round)?;
        let Stage::Shared {
            me,
            neighbours,
            own,
        } = &self.stage
        else {
            return Err(self.out_of_order("shares"));
        };
        let me = *me;
        let mut held = BTreeMap::from([(me, *own)]);
        let mut seen = std::collections::BTreeSet::new();
        let mut unopened = Vec::new();
        for Sealed { peer, ciphertext } in &shares.sealed {
            let Some(neighbour) = neighbours.get(peer) else {
                return Err(SecAggError::BadShare(format!(
                    "client {peer} is not a neighbour"
                )));
            };
            if *peer == me || !seen.insert(*peer) {
                return Err(SecAggError::BadShare(format!(
                    "a second share from client {peer} (a replay?)"
                )));
            }
            let agreement = self.cipher.agree(&neighbour.cipher_key).expect("checked");
            match open_share(self.round, *peer, me, &agreement, ciphertext) {
                Some(share) => {
                    held.insert(*peer, share);
                }
                None => {
                    let mut nonce = [0u8; 64];
                    self.rng.fill_bytes(&mut nonce);
                    let proof = self.cipher.prove(&neighbour.cipher_key, &agreement, nonce);
                    unopened.push(Unopened {
                        owner: *peer,
                        agreement,
                        proof,
                    });
                }
            }
        }
        let Stage::Shared { neighbours, .. } = std::mem::replace(&mut self.stage, Stage::Done)
        else {
            unreachable!("matched above")
        };
        self.stage = Stage::Checked {
            me,
            neighbours,
            held,
            unopened: unopened.iter().map(|u| u.owner).collect(),
        };
        Ok(Check {
            round: self.round,
            unopened,
        })
    }

    /// The server named the clients out of the round: no mask with them. It
    /// must name every one whose share did not open here.
    pub fn proceed(&mut self, proceed: Proceed) -> Result<(), SecAggError> {
        self.check_round(proceed.round)?;
        let Stage::Checked { unopened, .. } = &self.stage else {
            return Err(self.out_of_order("the list of clients out"));
        };
        if let Some(kept) = unopened.iter().find(|u| !proceed.excluded.contains(u)) {
            return Err(SecAggError::BadRequest(format!(
                "client {kept}'s share did not open, yet it stays in the round"
            )));
        }
        let Stage::Checked {
            me,
            neighbours,
            mut held,
            ..
        } = std::mem::replace(&mut self.stage, Stage::Done)
        else {
            unreachable!("matched above")
        };
        held.retain(|index, _| *index == me || !proceed.excluded.contains(index));
        let threshold = self.spec.threshold as usize;
        if held.len() < threshold {
            return Err(SecAggError::TooFew {
                stage: "check",
                needed: threshold,
                have: held.len(),
            });
        }
        // Masks are agreed with the neighbours whose shares came and opened,
        // and that are still in; no others.
        let neighbours = neighbours
            .into_iter()
            .filter(|(index, _)| held.contains_key(index))
            .collect();
        self.stage = Stage::Ready {
            me,
            neighbours,
            held,
        };
        Ok(())
    }

    /// Step 3: the input, quantised and masked.
    pub fn mask(&mut self, input: &Input) -> Result<Masked, SecAggError> {
        if !matches!(self.stage, Stage::Ready { .. }) {
            return Err(self.out_of_order("an input"));
        }
        let values = self.spec.quantizer.encode(input, &mut self.rng)?;
        self.mask_values(values)
    }

    /// Step 3 for an input quantised already (`Quantizer::encode`).
    pub fn mask_values(&mut self, mut values: Vec<u32>) -> Result<Masked, SecAggError> {
        let Stage::Ready { me, neighbours, .. } = &self.stage else {
            return Err(self.out_of_order("an input"));
        };
        mask::apply(&mut values, &self.self_mask, true);
        for (&index, neighbour) in neighbours {
            let agreement = self.mask.diffie_hellman(&neighbour.mask_key);
            let seed = pairwise_seed(self.round, *me, index, agreement.as_bytes());
            // The lower index adds, the higher subtracts: they cancel.
            mask::apply(&mut values, &seed, *me < index);
        }
        let Stage::Ready { held, .. } = std::mem::replace(&mut self.stage, Stage::Done) else {
            unreachable!("matched above")
        };
        self.stage = Stage::Masked { held };
        Ok(Masked {
            round: self.round,
            input: mask::to_bytes(&values),
        })
    }

    /// Step 4: for each neighbour, the share the server needs: of its
    /// self-mask seed if its input is in the sum, of its mask key if it
    /// dropped. Never both for one neighbour: that would unmask its input.
    pub fn unmask(&mut self, request: Unmask) -> Result<Reveal, SecAggError> {
        self.check_round(request.round)?;
        let Stage::Masked { held } = &self.stage else {
            return Err(self.out_of_order("an unmasking request"));
        };
        let mut seen = std::collections::BTreeSet::new();
        for index in request.survivors.iter().chain(&request.dropped) {
            if !held.contains_key(index) {
                return Err(SecAggError::BadRequest(format!(
                    "client {index} shared nothing with this client"
                )));
            }
            if !seen.insert(*index) {
                return Err(SecAggError::BadRequest(format!(
                    "client {index} is named twice (as survivor and dropped?)"
                )));
            }
        }
        // With fewer than t survivors (this client among them) the sum would
        // say too much about each.
        let threshold = self.spec.threshold as usize;
        if request.survivors.len() < threshold {
            return Err(SecAggError::TooFew {
                stage: "masked input",
                needed: threshold,
                have: request.survivors.len(),
            });
        }
        let reveal = |of: &u32, pick: fn(&Held) -> Secret| Revealed {
            of: *of,
            share: pick(&held[of]),
        };
        let result = Reveal {
            round: self.round,
            self_masks: request
                .survivors
                .iter()
                .map(|of| reveal(of, |h| h.self_mask))
                .collect(),
            mask_keys: request
                .dropped
                .iter()
                .map(|of| reveal(of, |h| h.mask_key))
                .collect(),
        };
        self.stage = Stage::Done;
        Ok(result)
    }
}
