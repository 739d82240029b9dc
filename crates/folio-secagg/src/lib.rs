//! Secure aggregation: the aggregator learns the sum of a round's updates and
//! nothing else about any one of them, and the sum survives clients that drop
//! out mid-protocol. Bonawitz et al. 2017 ("Practical Secure Aggregation"), in
//! its honest-but-curious form, over the sparse graph of SecAgg+ (Bell et al.
//! 2020) when a degree is set.
//!
//! A round runs five steps, each a message from every client still in it and
//! the server's answer once all have come or the step's deadline passed:
//!
//! 1. **keys**: each client makes two key pairs (a Ristretto255 one to seal
//!    shares, an X25519 one to agree masks) and sends the public halves
//!    ([`Keys`]). The server numbers the clients that did, draws the graph and
//!    sends each its neighbours' keys ([`Roster`]).
//! 2. **shares**: each client Shamir-shares (threshold t) its mask key and a
//!    fresh self-mask seed among its neighbours, each share sealed with
//!    ChaCha20-Poly1305 under a key agreed with that neighbour ([`Shares`]);
//!    the server relays them ([`SharesFor`]), so a client learns which of its
//!    neighbours are still in.
//! 3. **check**: each client says which shares did not open, with a proof the
//!    server checks ([`Check`], [`blame`]); the server names the clients out of
//!    the round — a share's spoiler or a false accuser, and those that said
//!    nothing — and no one masks with them ([`Proceed`]). One hostile client
//!    costs the round that client, not the round.
//! 4. **masked input**: each client quantises its clipped, weighted delta to
//!    integers mod 2³² ([`quantize`]) and adds its self mask and, for each
//!    neighbour still in, a pairwise mask that the neighbour subtracts
//!    ([`Masked`]). Summed, the pairwise masks cancel.
//! 5. **unmasking**: the server names the survivors and the dropped ([`Unmask`]);
//!    each survivor reveals its shares of the survivors' self-mask seeds and of
//!    the dropped clients' mask keys, never both for one client ([`Reveal`]).
//!    With t shares of each the server removes what did not cancel.
//!
//! The server keeps only a running sum of masked inputs. If any step leaves a
//! secret with fewer than t live holders, the round is abandoned: no sum is
//! ever released that is not the exact sum of the survivors' inputs.

pub mod blame;
pub mod client;
pub mod graph;
pub mod mask;
pub mod quantize;
pub mod server;
pub mod shamir;
pub mod skellam;

use serde::{Deserialize, Serialize};

pub use client::SecureClient;
pub use quantize::{HeldOut, Input, Quantizer, Sum};
pub use server::{Closed, SecureServer, Stage, Unmasking};

/// How a secure round runs: told to its clients with the round.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SecureSpec {
    /// Names this secure round (one attempt of a federated round): every
    /// message carries it, so a late message of an abandoned attempt is refused.
    pub id: u64,
    /// Shares of a client's secrets that rebuild them (Shamir's t).
    pub threshold: u32,
    /// Neighbours each client masks with (0: every other client).
    pub degree: u32,
    pub quantizer: Quantizer,
    /// A client's weight is its examples over this (the round's most);
    /// `None`: every client weighs 1.
    pub weight_scale: Option<u64>,
}

impl SecureSpec {
    /// The weight, in [0, 1], of a client that trained on `examples`.
    pub fn weight(&self, examples: u64) -> f64 {
        match self.weight_scale {
            Some(scale) => (examples as f64 / scale.max(1) as f64).min(1.0),
            None => 1.0,
        }
    }
}

/// A client's X25519 public keys for one round: one to agree the keys its
/// shares are sealed with, one to agree pairwise masks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Keys {
    pub round: u64,
    pub cipher_key: [u8; 32],
    pub mask_key: [u8; 32],
}

/// A client of the round, as its neighbours know it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Peer {
    pub index: u32,
    pub cipher_key: [u8; 32],
    pub mask_key: [u8; 32],
}

/// Server → client after step 1: the client's number and its neighbours (and
/// itself, so that it can check its own keys arrived as sent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Roster {
    pub round: u64,
    pub you: u32,
    pub peers: Vec<Peer>,
}

/// A share sealed for one client; `peer` is the recipient on the way up and
/// the sender on the way down.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sealed {
    pub peer: u32,
    pub ciphertext: Vec<u8>,
}

/// Client → server, step 2: one sealed share pair per neighbour, and a
/// commitment to the self-mask seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Shares {
    pub round: u64,
    pub commitment: [u8; 32],
    pub sealed: Vec<Sealed>,
}

/// Server → client after step 2: the shares its neighbours sealed for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SharesFor {
    pub round: u64,
    pub sealed: Vec<Sealed>,
}

/// Client → server, step 3: the masked input, u32s little-endian.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Masked {
    pub round: u64,
    pub input: Vec<u8>,
}

/// A neighbour's share that did not open: the holder's agreement with its
/// owner and the proof that it is the right one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Unopened {
    pub owner: u32,
    pub agreement: [u8; 32],
    pub proof: blame::Proof,
}

/// Client → server after the shares came: those that did not open (none, as
/// a rule).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Check {
    pub round: u64,
    pub unopened: Vec<Unopened>,
}

/// Server → client once the shares are checked: the clients out of the round
/// (mask with none of them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Proceed {
    pub round: u64,
    pub excluded: Vec<u32>,
}

/// Server → client after step 3: which of its neighbours' inputs are in the
/// sum, and which dropped out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Unmask {
    pub round: u64,
    pub survivors: Vec<u32>,
    pub dropped: Vec<u32>,
}

/// A share of client `of`'s secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Revealed {
    pub of: u32,
    pub share: [u8; 32],
}

/// Client → server, step 4.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reveal {
    pub round: u64,
    /// Shares of the survivors' self-mask seeds.
    pub self_masks: Vec<Revealed>,
    /// Shares of the dropped clients' mask keys.
    pub mask_keys: Vec<Revealed>,
}

/// A client's message in a secure round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ClientStep {
    Keys(Keys),
    Shares(Shares),
    Check(Check),
    Masked(Masked),
    Reveal(Reveal),
}

/// The server's message in a secure round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ServerStep {
    Roster(Roster),
    Shares(SharesFor),
    Proceed(Proceed),
    Unmask(Unmask),
}

impl ClientStep {
    pub fn round(&self) -> u64 {
        match self {
            ClientStep::Keys(m) => m.round,
            ClientStep::Shares(m) => m.round,
            ClientStep::Check(m) => m.round,
            ClientStep::Masked(m) => m.round,
            ClientStep::Reveal(m) => m.round,
        }
    }
}

impl ServerStep {
    pub fn round(&self) -> u64 {
        match self {
            ServerStep::Roster(m) => m.round,
            ServerStep::Shares(m) => m.round,
            ServerStep::Proceed(m) => m.round,
            ServerStep::Unmask(m) => m.round,
        }
    }
}

/// The most neighbours a client can have: a share's point is one byte, and
/// the client holds a share of its own secrets too.
pub const MAX_NEIGHBOURS: usize = 254;

/// Bytes of a sealed share: owner, holder, round, two 32-byte shares, the tag.
pub const SEALED_BYTES: usize = 4 + 4 + 8 + 32 + 32 + 16;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SecAggError {
    #[error("secure aggregation settings: {0}")]
    Settings(String),
    #[error("a message of round {found}; round {expected} is under way")]
    WrongRound { expected: u64, found: u64 },
    #[error("{got} is out of order: the round is at its {stage} step")]
    OutOfOrder {
        got: &'static str,
        stage: &'static str,
    },
    #[error(
        "{0} from a client that is not expected to send it (not in this step, or sent it already)"
    )]
    NotExpected(&'static str),
    #[error("a share is damaged, replayed, or not for this client: {0}")]
    BadShare(String),
    #[error("a public key is not a point of its curve: {0}")]
    BadKey(&'static str),
    #[error("{what} has {found} values; the round takes {expected}")]
    WrongLength {
        what: &'static str,
        expected: usize,
        found: usize,
    },
    #[error("the update has non-finite values")]
    NonFinite,
    #[error("the server's request is inconsistent: {0}")]
    BadRequest(String),
    #[error(
        "too few clients left after the {stage} step: {have} where {needed} are needed; the round is abandoned"
    )]
    TooFew {
        stage: &'static str,
        needed: usize,
        have: usize,
    },
    #[error("a rebuilt secret does not match what its client committed to: {0}")]
    BadReconstruction(String),
}

#[cfg(test)]
mod tests;
