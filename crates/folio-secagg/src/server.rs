//! The server's side of a secure round: it relays, keeps a running sum of
//! masked inputs, and, once enough shares came back, removes the masks that
//! did not cancel. It never holds an unmasked input.

use std::collections::{BTreeMap, BTreeSet};

use x25519_dalek::{PublicKey, StaticSecret};

use crate::client::{open_share, pairwise_seed};
use crate::quantize::EXTRAS;
use crate::shamir::{self, Secret};
use crate::{
    Check, ClientStep, Keys, MAX_NEIGHBOURS, Masked, Peer, Proceed, Reveal, Roster, SEALED_BYTES,
    Sealed, SecAggError, SecureSpec, ServerStep, Shares, SharesFor, Unmask, blame, graph, mask,
};

/// The step a secure round is at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Keys,
    Shares,
    Check,
    Masked,
    Reveal,
    Closed,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Keys => "keys",
            Stage::Shares => "shares",
            Stage::Check => "check",
            Stage::Masked => "masked input",
            Stage::Reveal => "unmasking",
            Stage::Closed => "closed",
        }
    }
}

/// What closing a step gives: messages to send, or the unmasking to run.
pub enum Closed {
    Send(Vec<(u64, ServerStep)>),
    Unmask(Unmasking),
}

/// One client of the round, once numbered.
struct Member {
    session: u64,
    keys: Keys,
    neighbours: Vec<u32>,
    /// Who holds shares of its secrets: its neighbours and itself, in index
    /// order; the holder at rank r has the shares at point r + 1.
    holders: Vec<u32>,
    /// What it sealed for its neighbours, and its self-mask commitment.
    shares: Option<Shares>,
}

pub struct SecureServer {
    round: u64,
    spec: SecureSpec,
    /// Values in a masked input: the model's parameters and the extras.
    values: usize,
    graph_seed: [u8; 32],
    stage: Stage,
    /// Sessions the current step still waits for.
    awaiting: BTreeSet<u64>,
    /// Step 1's keys, by session.
    keys: BTreeMap<u64, Keys>,
    /// From step 1 on: the round's clients by index.
    members: Vec<Member>,
    index: BTreeMap<u64, u32>,
    /// Clients in after step 2 (U2, less those put out at the check) and
    /// after step 3 (U3).
    shared: BTreeSet<u32>,
    /// Put out at the check: a share's spoiler, or a false accuser.
    culprits: BTreeSet<u32>,
    /// Clients whose check came.
    checked: BTreeSet<u32>,
    /// Messages the step under way waits for, as it began.
    step_size: usize,
    masked: BTreeSet<u32>,
    sum: Vec<u32>,
    reveals: BTreeMap<u32, Reveal>,
}

impl SecureServer {
    /// Secure round `spec.id` for the `selected` sessions, whose inputs have
    /// `params + EXTRAS` values; the graph is drawn from `graph_seed`.
    pub fn new(
        spec: SecureSpec,
        params: usize,
        selected: impl IntoIterator<Item = u64>,
        graph_seed: [u8; 32],
    ) -> Result<Self, SecAggError> {
        spec.quantizer.check()?;
        if spec.threshold == 0 {
            return Err(SecAggError::Settings(
                "the threshold must be at least 1".into(),
            ));
        }
        let awaiting: BTreeSet<u64> = selected.into_iter().collect();
        Ok(Self {
            round: spec.id,
            spec,
            values: params + EXTRAS,
            graph_seed,
            stage: Stage::Keys,
            step_size: awaiting.len(),
            awaiting,
            keys: BTreeMap::new(),
            members: Vec::new(),
            index: BTreeMap::new(),
            shared: BTreeSet::new(),
            culprits: BTreeSet::new(),
            checked: BTreeSet::new(),
            masked: BTreeSet::new(),
            sum: Vec::new(),
            reveals: BTreeMap::new(),
        })
    }

    pub fn round(&self) -> u64 {
        self.round
    }

    /// The step under way.
    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// Whether the step under way was answered by all it waits for.
    pub fn is_complete(&self) -> bool {
        self.awaiting.is_empty()
    }

    /// The step under way's answers so far, of how many it began waiting for.
    pub fn progress(&self) -> (usize, usize) {
        (
            self.step_size.saturating_sub(self.awaiting.len()),
            self.step_size,
        )
    }

    /// Sessions put out of the round at the check, for spoiling a share or
    /// accusing a neighbour falsely.
    pub fn culprits(&self) -> Vec<u64> {
        self.culprits
            .iter()
            .map(|&i| self.members[i as usize].session)
            .collect()
    }

    /// The sessions the step under way still waits for.
    pub fn awaiting(&self) -> impl Iterator<Item = u64> + '_ {
        self.awaiting.iter().copied()
    }

    /// Whether the step under way waits for `session`.
    pub fn awaits(&self, session: u64) -> bool {
        self.awaiting.contains(&session)
    }

    /// Clients whose masked input is in the sum (after step 3).
    pub fn contributors(&self) -> Vec<u64> {
        self.masked
            .iter()
            .map(|&i| self.members[i as usize].session)
            .collect()
    }

    /// `session` left: the step under way stops waiting for it.
    pub fn leave(&mut self, session: u64) {
        self.awaiting.remove(&session);
    }

    /// Takes `session`'s message for the step under way, or says why not; a
    /// refused message changes nothing.
    pub fn receive(&mut self, session: u64, step: ClientStep) -> Result<(), SecAggError> {
        if step.round() != self.round {
            return Err(SecAggError::WrongRound {
                expected: self.round,
                found: step.round(),
            });
        }
        let (name, stage) = match &step {
            ClientStep::Keys(_) => ("keys", Stage::Keys),
            ClientStep::Shares(_) => ("shares", Stage::Shares),
            ClientStep::Check(_) => ("a check", Stage::Check),
            ClientStep::Masked(_) => ("a masked input", Stage::Masked),
            ClientStep::Reveal(_) => ("revealed shares", Stage::Reveal),
        };
        if stage != self.stage {
            return Err(SecAggError::OutOfOrder {
                got: name,
                stage: self.stage.name(),
            });
        }
        if !self.awaiting.contains(&session) {
            return Err(SecAggError::NotExpected(name));
        }
        match step {
            ClientStep::Keys(keys) => {
                if !blame::is_cipher_key(&keys.cipher_key) {
                    return Err(SecAggError::BadKey("the cipher key"));
                }
                self.keys.insert(session, keys);
            }
            ClientStep::Shares(shares) => self.take_shares(session, shares)?,
            ClientStep::Check(check) => self.take_check(session, check)?,
            ClientStep::Masked(masked) => self.take_masked(session, masked)?,
            ClientStep::Reveal(reveal) => self.take_reveal(session, reveal)?,
        }
        self.awaiting.remove(&session);
        Ok(())
    }

    fn take_shares(&mut self, session: u64, shares: Shares) -> Result<(), SecAggError> {
        let member = &self.members[self.index[&session] as usize];
        let recipients: Vec<u32> = shares.sealed.iter().map(|s| s.peer).collect();
        if recipients != member.neighbours {
            return Err(SecAggError::BadShare(
                "shares must go to each neighbour once, in index order".into(),
            ));
        }
        if let Some(bad) = shares
            .sealed
            .iter()
            .find(|s| s.ciphertext.len() != SEALED_BYTES)
        {
            return Err(SecAggError::WrongLength {
                what: "a sealed share",
                expected: SEALED_BYTES,
                found: bad.ciphertext.len(),
            });
        }
        let index = self.index[&session];
        self.members[index as usize].shares = Some(shares);
        self.shared.insert(index);
        Ok(())
    }

    /// A client's word on the shares it was relayed: for each that did not
    /// open, the server checks the proof and opens the share itself; the
    /// owner is out if it does not open, the accuser if it does.
    fn take_check(&mut self, session: u64, check: Check) -> Result<(), SecAggError> {
        let holder = self.index[&session];
        let relayed: BTreeSet<u32> = self.members[holder as usize]
            .neighbours
            .iter()
            .copied()
            .filter(|n| self.shared.contains(n))
            .collect();
        let mut named = BTreeSet::new();
        for claim in &check.unopened {
            if !relayed.contains(&claim.owner) || !named.insert(claim.owner) {
                return Err(SecAggError::BadShare(format!(
                    "client {} sent this client no share, or is named twice",
                    claim.owner
                )));
            }
        }
        let mut culprits = Vec::new();
        for claim in &check.unopened {
            let owner = &self.members[claim.owner as usize];
            let holder_key = &self.members[holder as usize].keys.cipher_key;
            let proven = blame::verify(
                holder_key,
                &owner.keys.cipher_key,
                &claim.agreement,
                &claim.proof,
            );
            let sealed = owner
                .shares
                .as_ref()
                .and_then(|s| s.sealed.iter().find(|s| s.peer == holder))
                .expect("relayed");
            let opens = proven
                && open_share(
                    self.round,
                    claim.owner,
                    holder,
                    &claim.agreement,
                    &sealed.ciphertext,
                )
                .is_some();
            culprits.push(if proven && !opens {
                claim.owner
            } else {
                holder
            });
        }
        self.culprits.extend(culprits);
        self.checked.insert(holder);
        Ok(())
    }

    fn take_masked(&mut self, session: u64, masked: Masked) -> Result<(), SecAggError> {
        let values = mask::from_bytes(&masked.input)
            .filter(|v| v.len() == self.values)
            .ok_or(SecAggError::WrongLength {
                what: "the masked input",
                expected: self.values,
                found: masked.input.len() / 4,
            })?;
        if self.sum.is_empty() {
            self.sum = vec![0; self.values];
        }
        for (s, v) in self.sum.iter_mut().zip(values) {
            *s = s.wrapping_add(v);
        }
        self.masked.insert(self.index[&session]);
        Ok(())
    }

    fn take_reveal(&mut self, session: u64, reveal: Reveal) -> Result<(), SecAggError> {
        let index = self.index[&session];
        let (survivors, dropped) = self.unmask_request(index);
        let of = |shares: &[crate::Revealed]| shares.iter().map(|r| r.of).collect::<Vec<_>>();
        if of(&reveal.self_masks) != survivors || of(&reveal.mask_keys) != dropped {
            return Err(SecAggError::BadShare(
                "the revealed shares are not the ones asked for".into(),
            ));
        }
        self.reveals.insert(index, reveal);
        Ok(())
    }

    /// What `index` is asked to reveal: its neighbours in the sum, and those
    /// that shared but sent no input.
    fn unmask_request(&self, index: u32) -> (Vec<u32>, Vec<u32>) {
        self.members[index as usize]
            .holders
            .iter()
            .filter(|n| self.shared.contains(n))
            .partition(|n| self.masked.contains(n))
    }

    /// Holders of `owner`'s shares among `alive`.
    fn live_holders(&self, owner: u32, alive: &BTreeSet<u32>) -> usize {
        self.members[owner as usize]
            .holders
            .iter()
            .filter(|n| alive.contains(n))
            .count()
    }

    fn too_few(&self, stage: Stage, have: usize) -> SecAggError {
        SecAggError::TooFew {
            stage: stage.name(),
            needed: self.spec.threshold as usize,
            have,
        }
    }

    /// Ends the step under way with whoever answered: the next step's
    /// messages, the unmasking, or why the round must be abandoned.
    pub fn close(&mut self) -> Result<Closed, SecAggError> {
        let stage = self.stage;
        self.awaiting.clear();
        let result = match stage {
            Stage::Keys => self.close_keys(),
            Stage::Shares => self.close_shares(),
            Stage::Check => self.close_check(),
            Stage::Masked => self.close_masked(),
            Stage::Reveal => self.close_reveal(),
            Stage::Closed => Err(SecAggError::OutOfOrder {
                got: "closing a step",
                stage: stage.name(),
            }),
        };
        if result.is_err() {
            self.stage = Stage::Closed;
        }
        self.step_size = self.awaiting.len();
        result
    }

    fn close_keys(&mut self) -> Result<Closed, SecAggError> {
        let threshold = self.spec.threshold as usize;
        let keys = std::mem::take(&mut self.keys);
        let n = keys.len();
        let graph = graph::neighbourhoods(n, self.spec.degree as usize, self.graph_seed);
        // Each client and its neighbours hold its shares.
        let smallest = graph.iter().map(|g| g.len() + 1).min().unwrap_or(0);
        if n == 0 || smallest < threshold {
            return Err(self.too_few(Stage::Keys, smallest));
        }
        if graph.iter().any(|g| g.len() > MAX_NEIGHBOURS) {
            return Err(SecAggError::Settings(format!(
                "{n} clients, each with {} neighbours: at most {MAX_NEIGHBOURS} (set a degree)",
                n - 1
            )));
        }
        for (i, ((session, keys), neighbours)) in keys.into_iter().zip(graph).enumerate() {
            self.index.insert(session, i as u32);
            let neighbours: Vec<u32> = neighbours.into_iter().map(|n| n as u32).collect();
            let mut holders = neighbours.clone();
            holders.push(i as u32);
            holders.sort_unstable();
            self.members.push(Member {
                session,
                keys,
                neighbours,
                holders,
                shares: None,
            });
        }
        let peer = |i: u32| Peer {
            index: i,
            cipher_key: self.members[i as usize].keys.cipher_key,
            mask_key: self.members[i as usize].keys.mask_key,
        };
        let messages = self
            .members
            .iter()
            .enumerate()
            .map(|(i, member)| {
                let me = i as u32;
                let mut peers: Vec<Peer> = member.neighbours.iter().map(|&n| peer(n)).collect();
                peers.push(peer(me));
                let roster = Roster {
                    round: self.round,
                    you: me,
                    peers,
                };
                (member.session, ServerStep::Roster(roster))
            })
            .collect();
        self.awaiting = self.index.keys().copied().collect();
        self.stage = Stage::Shares;
        Ok(Closed::Send(messages))
    }

    fn close_shares(&mut self) -> Result<Closed, SecAggError> {
        self.check_holders(Stage::Shares)?;
        let messages = self
            .shared
            .iter()
            .map(|&v| {
                let member = &self.members[v as usize];
                let sealed = member
                    .neighbours
                    .iter()
                    .filter(|u| self.shared.contains(u))
                    .map(|&u| {
                        let owner = &self.members[u as usize];
                        let shares = owner.shares.as_ref().expect("shared");
                        let to_v = shares
                            .sealed
                            .iter()
                            .find(|s| s.peer == v)
                            .expect("checked: one share per neighbour");
                        Sealed {
                            peer: u,
                            ciphertext: to_v.ciphertext.clone(),
                        }
                    })
                    .collect();
                let message = SharesFor {
                    round: self.round,
                    sealed,
                };
                (member.session, ServerStep::Shares(message))
            })
            .collect();
        self.await_shared();
        self.stage = Stage::Check;
        Ok(Closed::Send(messages))
    }

    /// Every secret shared must keep t live holders among those still in.
    fn check_holders(&self, stage: Stage) -> Result<(), SecAggError> {
        let fewest = self
            .shared
            .iter()
            .map(|&u| self.live_holders(u, &self.shared))
            .min();
        match fewest {
            Some(fewest) if fewest >= self.spec.threshold as usize => Ok(()),
            fewest => Err(self.too_few(stage, fewest.unwrap_or(0))),
        }
    }

    /// The next step waits for every client still in.
    fn await_shared(&mut self) {
        self.awaiting = self
            .shared
            .iter()
            .map(|&i| self.members[i as usize].session)
            .collect();
    }

    /// Puts out the culprits and those whose check did not come; every
    /// secret left must still have t holders in.
    fn close_check(&mut self) -> Result<Closed, SecAggError> {
        let out: BTreeSet<u32> = self
            .shared
            .iter()
            .copied()
            .filter(|u| self.culprits.contains(u) || !self.checked.contains(u))
            .collect();
        self.shared.retain(|u| !out.contains(u));
        self.check_holders(Stage::Check)?;
        let excluded: Vec<u32> = out.into_iter().collect();
        let messages = self
            .shared
            .iter()
            .map(|&v| {
                let proceed = Proceed {
                    round: self.round,
                    excluded: excluded.clone(),
                };
                (
                    self.members[v as usize].session,
                    ServerStep::Proceed(proceed),
                )
            })
            .collect();
        self.await_shared();
        self.stage = Stage::Masked;
        Ok(Closed::Send(messages))
    }

    fn close_masked(&mut self) -> Result<Closed, SecAggError> {
        let threshold = self.spec.threshold as usize;
        // The secrets to rebuild: each contributor's self-mask seed, and the
        // mask key of each dropped client some contributor masked with.
        let needed: Vec<u32> = self
            .shared
            .iter()
            .copied()
            .filter(|&u| {
                self.masked.contains(&u)
                    || self.members[u as usize]
                        .neighbours
                        .iter()
                        .any(|n| self.masked.contains(n))
            })
            .collect();
        let fewest = needed
            .iter()
            .map(|&u| self.live_holders(u, &self.masked))
            .min();
        match fewest {
            Some(fewest) if fewest >= threshold && !self.masked.is_empty() => {}
            fewest => return Err(self.too_few(Stage::Masked, fewest.unwrap_or(0))),
        }
        let messages = self
            .masked
            .iter()
            .map(|&v| {
                let (survivors, dropped) = self.unmask_request(v);
                let request = Unmask {
                    round: self.round,
                    survivors,
                    dropped,
                };
                (
                    self.members[v as usize].session,
                    ServerStep::Unmask(request),
                )
            })
            .collect();
        self.awaiting = self.contributors().into_iter().collect();
        self.stage = Stage::Reveal;
        Ok(Closed::Send(messages))
    }

    /// `owner`'s secret from the shares its neighbours revealed (`pick` says
    /// which secret), or `None` with fewer than t.
    fn rebuild(&self, owner: u32, pick: impl Fn(&Reveal) -> &[crate::Revealed]) -> Option<Secret> {
        let threshold = self.spec.threshold as usize;
        let holders = &self.members[owner as usize].holders;
        let points: Vec<(u8, Secret)> = holders
            .iter()
            .enumerate()
            .filter_map(|(rank, holder)| {
                let revealed = pick(self.reveals.get(holder)?);
                let share = revealed.iter().find(|r| r.of == owner)?;
                Some((rank as u8 + 1, share.share))
            })
            .take(threshold)
            .collect();
        (points.len() == threshold).then(|| shamir::combine(&points))
    }

    fn revealed_holders(&self, owner: u32) -> usize {
        self.members[owner as usize]
            .holders
            .iter()
            .filter(|h| self.reveals.contains_key(h))
            .count()
    }

    fn close_reveal(&mut self) -> Result<Closed, SecAggError> {
        let mut self_masks = Vec::new();
        for &u in &self.masked {
            let seed = self
                .rebuild(u, |r| &r.self_masks)
                .ok_or_else(|| self.too_few(Stage::Reveal, self.revealed_holders(u)))?;
            let committed = self.members[u as usize]
                .shares
                .as_ref()
                .expect("contributors shared")
                .commitment;
            if mask::commit(&seed) != committed {
                return Err(SecAggError::BadReconstruction(format!(
                    "client {u}'s self-mask seed"
                )));
            }
            self_masks.push(seed);
        }
        let mut pairwise = Vec::new();
        for &d in self.shared.difference(&self.masked) {
            let member = &self.members[d as usize];
            let contributors: Vec<u32> = member
                .neighbours
                .iter()
                .copied()
                .filter(|n| self.masked.contains(n))
                .collect();
            if contributors.is_empty() {
                continue;
            }
            let key = self
                .rebuild(d, |r| &r.mask_keys)
                .ok_or_else(|| self.too_few(Stage::Reveal, self.revealed_holders(d)))?;
            let secret = StaticSecret::from(key);
            if PublicKey::from(&secret).to_bytes() != member.keys.mask_key {
                return Err(SecAggError::BadReconstruction(format!(
                    "client {d}'s mask key"
                )));
            }
            for u in contributors {
                let public = PublicKey::from(self.members[u as usize].keys.mask_key);
                let agreement = secret.diffie_hellman(&public);
                let seed = pairwise_seed(self.round, d, u, agreement.as_bytes());
                // `u` added the mask if u < d: take it away again.
                pairwise.push((seed, u > d));
            }
        }
        self.stage = Stage::Closed;
        Ok(Closed::Unmask(Unmasking {
            sum: std::mem::take(&mut self.sum),
            self_masks,
            pairwise,
            contributors: self.masked.len(),
        }))
    }
}

/// The heavy end of a round: expanding and removing masks, to run where it
/// holds nothing else up.
pub struct Unmasking {
    sum: Vec<u32>,
    self_masks: Vec<Secret>,
    /// Pairwise masks left uncancelled by dropped clients, and whether to add
    /// (or subtract) each to remove it.
    pairwise: Vec<([u8; 32], bool)>,
    contributors: usize,
}

impl Unmasking {
    /// Clients whose inputs the sum holds.
    pub fn contributors(&self) -> usize {
        self.contributors
    }

    /// The exact sum (mod 2³²) of the contributors' quantised inputs.
    pub fn run(&self) -> Vec<u32> {
        let mut sum = self.sum.clone();
        for seed in &self.self_masks {
            mask::apply(&mut sum, seed, false);
        }
        for (seed, add) in &self.pairwise {
            mask::apply(&mut sum, seed, *add);
        }
        sum
    }
}
