//! A client's local training plan for one round: which batches it trains on, and
//! the most examples that can give. The client trains on [`TrainingPlan::batches`]
//! and the aggregator bounds an update's claimed examples by
//! [`TrainingPlan::max_examples`]; both cut the text with [`TrainingPlan::epoch`],
//! so the bound cannot drift from what honest clients do.

use crate::batch::{Batch, BatchConfig, batches, max_batch_count};
use crate::rng::SplitMix64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainingPlan {
    /// Sequences per batch.
    pub batch_size: usize,
    /// Characters per sequence (a chunk is one more: the last target).
    pub seq_len: usize,
    /// Passes over the text (at least one).
    pub local_epochs: u32,
    /// Batches per epoch at most (`None`: all of them).
    pub max_batches: Option<u32>,
    /// The round's seed; the client mixes in its own text.
    pub seed: u64,
}

impl TrainingPlan {
    /// One pass over the whole text in batches of `batch_size` × `seq_len`.
    pub fn one_epoch(batch_size: usize, seq_len: usize, seed: u64) -> Self {
        Self {
            batch_size,
            seq_len,
            local_epochs: 1,
            max_batches: None,
            seed,
        }
    }

    fn epochs(&self) -> u32 {
        self.local_epochs.max(1)
    }

    fn per_epoch(&self) -> usize {
        self.max_batches.map_or(usize::MAX, |max| max as usize)
    }

    /// How epoch `epoch` cuts a text whose own seed is `own_seed`: chunks of
    /// `seq_len + 1` ids after a first chunk of random length (so the same windows
    /// do not come back every epoch), shuffled whole (a short epoch samples all
    /// the text, not its beginning).
    fn epoch(&self, own_seed: u64, epoch: u32) -> BatchConfig {
        let mut rng = SplitMix64::new(own_seed.wrapping_add(u64::from(epoch)));
        BatchConfig {
            batch_size: self.batch_size,
            seq_len: self.seq_len,
            shuffle_buffer: usize::MAX,
            offset: rng.below(self.seq_len + 1),
            ..BatchConfig::padded(rng.next_u64())
        }
    }

    /// The batches a client with text `ids` trains on, in order. The randomness is
    /// the round's seed mixed with the text itself, so the clients of a round do
    /// not all take their chunks from the same place.
    pub fn batches(&self, ids: &[u32]) -> Vec<Batch> {
        let own_seed = self.seed ^ text_fingerprint(ids);
        (0..self.epochs())
            .flat_map(|epoch| {
                batches(ids, &self.epoch(own_seed, epoch))
                    .into_iter()
                    .take(self.per_epoch())
            })
            .collect()
    }

    /// The most examples (sequences) a client with `text_len` ids can train on
    /// under this plan, whatever offset its epochs cut the text at.
    pub fn max_examples(&self, text_len: usize) -> u64 {
        let cut = self.epoch(0, 0);
        let per_epoch = max_batch_count(text_len, &cut).min(self.per_epoch()) as u64;
        u64::from(self.epochs()) * per_epoch * self.batch_size as u64
    }
}

/// FNV-1a over a text's ids: tells clients' texts apart for seeding.
fn text_fingerprint(ids: &[u32]) -> u64 {
    ids.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &id| {
        (hash ^ u64::from(id)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(seed: u64) -> TrainingPlan {
        TrainingPlan::one_epoch(1, 100, seed)
    }

    /// The bound holds whatever offset a client cuts its text at (or honest
    /// updates would be refused), and stays tight (≤ chunks + 1).
    #[test]
    fn the_examples_bound_covers_every_cut_and_stays_tight() {
        for len in (2..700).step_by(7) {
            let ids: Vec<u32> = (0..len as u32).map(|i| i % 80).collect();
            let allowed = plan(0).max_examples(len);
            let most = (0..40)
                .map(|seed| plan(seed).batches(&ids).len() as u64)
                .max()
                .unwrap();
            assert!(
                most <= allowed,
                "len {len}: {most} batches, {allowed} allowed"
            );
            assert!(
                allowed <= len.div_ceil(101) as u64 + 1,
                "len {len}: {allowed}"
            );
        }
    }

    #[test]
    fn epochs_and_the_batch_cap_multiply_the_bound() {
        let capped = TrainingPlan {
            batch_size: 8,
            local_epochs: 3,
            max_batches: Some(2),
            ..plan(1)
        };
        let ids: Vec<u32> = (0..10_000).map(|i| i % 80).collect();
        assert_eq!(capped.batches(&ids).len(), 6);
        assert_eq!(capped.max_examples(ids.len()), 3 * 2 * 8);
        assert_eq!(capped.max_examples(0), 0);
    }
}
