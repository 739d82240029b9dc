//! A client's ids → training batches, as the tutorial builds them: chunks of
//! `seq_len + 1` ids, a shuffle buffer, batches with input = chunk[..seq_len] and
//! target = chunk[1..]. The padded variant keeps the last partial chunk and batch
//! (masked), so that short clients still contribute.

use crate::rng::SplitMix64;

/// The tutorial's sequence length.
pub const SEQ_LEN: usize = 100;
/// The tutorial's batch size.
pub const BATCH_SIZE: usize = 8;
/// The tutorial's shuffle buffer.
pub const SHUFFLE_BUFFER: usize = 100;
/// Id written at padded positions; they carry mask 0, so its value never matters.
pub const PAD_ID: u32 = 0;

/// What happens to a last chunk or batch that is not full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Remainder {
    /// Dropped, as the tutorial does: clients under one full batch give nothing.
    Drop,
    /// Padded with [`PAD_ID`] and masked out.
    #[default]
    Pad,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchConfig {
    pub seq_len: usize,
    pub batch_size: usize,
    pub shuffle_buffer: usize,
    pub seed: u64,
    pub remainder: Remainder,
    /// Ids in the first chunk (0 or above `seq_len`: a full one), so that the
    /// chunk boundaries can fall elsewhere than every `seq_len + 1` ids from the
    /// text's start. A first chunk of one id has no target and is dropped.
    pub offset: usize,
}

impl BatchConfig {
    /// The tutorial's pipeline: 8 × 100, buffer 100, drop remainder.
    pub fn tutorial(seed: u64) -> Self {
        Self {
            seq_len: SEQ_LEN,
            batch_size: BATCH_SIZE,
            shuffle_buffer: SHUFFLE_BUFFER,
            seed,
            remainder: Remainder::Drop,
            offset: 0,
        }
    }

    /// The tutorial's shapes with the last partial chunk and batch padded.
    pub fn padded(seed: u64) -> Self {
        Self {
            remainder: Remainder::Pad,
            ..Self::tutorial(seed)
        }
    }

    /// Ids one full batch consumes.
    pub fn ids_per_batch(&self) -> usize {
        self.batch_size * (self.seq_len + 1)
    }
}

/// One batch, row-major `[batch_size, seq_len]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub batch_size: usize,
    pub seq_len: usize,
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
    /// 1.0 where the target is real, 0.0 where it is padding.
    pub mask: Vec<f32>,
}

impl Batch {
    /// Number of real (unmasked) target positions.
    pub fn real_targets(&self) -> usize {
        self.mask.iter().filter(|&&m| m > 0.0).count()
    }
}

/// Number of batches [`batches`] yields for `len` ids, without building them.
pub fn batch_count(len: usize, config: &BatchConfig) -> usize {
    let chunk = config.seq_len + 1;
    let head = config.offset.min(chunk).min(len);
    let rest = len - head;
    match config.remainder {
        Remainder::Drop => (usize::from(head == chunk) + rest / chunk) / config.batch_size,
        Remainder::Pad => {
            let chunks = usize::from(head >= 2) + rest / chunk + usize::from(rest % chunk >= 2);
            chunks.div_ceil(config.batch_size)
        }
    }
}

/// The most batches [`batches`] yields for `len` ids at any offset.
pub fn max_batch_count(len: usize, config: &BatchConfig) -> usize {
    (0..=config.seq_len + 1)
        .map(|offset| {
            batch_count(
                len,
                &BatchConfig {
                    offset,
                    ..config.clone()
                },
            )
        })
        .max()
        .unwrap_or(0)
}

/// Builds the batches of one client's ids.
pub fn batches(ids: &[u32], config: &BatchConfig) -> Vec<Batch> {
    let chunk_len = config.seq_len + 1;
    let (head, rest) = ids.split_at(config.offset.min(chunk_len).min(ids.len()));
    let mut chunks: Vec<&[u32]> = std::iter::once(head)
        .filter(|head| !head.is_empty())
        .chain(rest.chunks(chunk_len))
        .collect();
    match config.remainder {
        // A last chunk of one id has no target: it carries nothing even padded.
        Remainder::Pad => chunks.retain(|c| c.len() >= 2),
        Remainder::Drop => chunks.retain(|c| c.len() == chunk_len),
    }
    let chunks = shuffle_with_buffer(chunks, config.shuffle_buffer, config.seed);
    let groups = chunks.chunks(config.batch_size);
    groups
        .filter(|group| config.remainder == Remainder::Pad || group.len() == config.batch_size)
        .map(|group| assemble(group, config))
        .collect()
}

/// Evaluation batches over many clients' ids: every client's chunks (the last
/// one padded and masked), in order, packed `batch_size` to a batch whoever they
/// belong to. Loss and accuracy over them weigh each client by its real targets,
/// as per-client evaluations averaged by targets would, with far fewer batches.
pub fn pack_chunks<'a>(
    clients: impl IntoIterator<Item = &'a [u32]>,
    seq_len: usize,
    batch_size: usize,
) -> Vec<Batch> {
    let chunks: Vec<&[u32]> = clients
        .into_iter()
        .flat_map(|ids| ids.chunks(seq_len + 1))
        .filter(|chunk| chunk.len() >= 2)
        .collect();
    let config = BatchConfig {
        seq_len,
        batch_size,
        ..BatchConfig::padded(0)
    };
    chunks
        .chunks(batch_size)
        .map(|group| assemble(group, &config))
        .collect()
}

fn assemble(rows: &[&[u32]], config: &BatchConfig) -> Batch {
    let (b, t) = (config.batch_size, config.seq_len);
    let mut batch = Batch {
        batch_size: b,
        seq_len: t,
        inputs: vec![PAD_ID; b * t],
        targets: vec![PAD_ID; b * t],
        mask: vec![0.0; b * t],
    };
    for (row, chunk) in rows.iter().enumerate() {
        let real = chunk.len() - 1;
        let at = row * t;
        batch.inputs[at..at + real].copy_from_slice(&chunk[..real]);
        batch.targets[at..at + real].copy_from_slice(&chunk[1..]);
        batch.mask[at..at + real].fill(1.0);
    }
    batch
}

/// `tf.data.Dataset.shuffle(buffer)`: keep a buffer of `buffer` items, emit a
/// random one and refill its slot from the input.
fn shuffle_with_buffer<T>(items: Vec<T>, buffer: usize, seed: u64) -> Vec<T> {
    let mut rng = SplitMix64::new(seed);
    let mut input = items.into_iter();
    let mut pool: Vec<T> = input.by_ref().take(buffer.max(1)).collect();
    let mut out = Vec::with_capacity(pool.len() + input.len());
    for next in input {
        let pick = rng.below(pool.len());
        out.push(std::mem::replace(&mut pool[pick], next));
    }
    while !pool.is_empty() {
        let pick = rng.below(pool.len());
        out.push(pool.swap_remove(pick));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(n: usize) -> Vec<u32> {
        (0..n as u32).map(|i| i % 86).collect()
    }

    #[test]
    fn shuffle_is_a_seeded_permutation() {
        let items: Vec<u32> = (0..1000).collect();
        let a = shuffle_with_buffer(items.clone(), 100, 3);
        assert_eq!(a, shuffle_with_buffer(items.clone(), 100, 3));
        assert_ne!(a, shuffle_with_buffer(items.clone(), 100, 4));
        assert_ne!(a, items);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, items);
    }

    #[test]
    fn counts_match_built_batches() {
        for len in [0, 1, 2, 100, 101, 102, 807, 808, 809, 5000, 8080] {
            for offset in [0, 1, 2, 57, 100, 101, 102, 900] {
                for config in [BatchConfig::tutorial(1), BatchConfig::padded(1)] {
                    let config = BatchConfig { offset, ..config };
                    let count = batch_count(len, &config);
                    assert_eq!(
                        batches(&ramp(len), &config).len(),
                        count,
                        "len {len}, offset {offset}"
                    );
                    assert!(count <= max_batch_count(len, &config));
                }
            }
        }
    }

    #[test]
    fn an_offset_moves_the_chunk_boundaries_and_loses_no_text() {
        let ids = ramp(333);
        for offset in [0, 2, 40, 101, 400] {
            let in_order = BatchConfig {
                batch_size: 1,
                shuffle_buffer: 1,
                offset,
                ..BatchConfig::padded(0)
            };
            let chunks: Vec<Vec<u32>> = batches(&ids, &in_order)
                .iter()
                .map(|b| {
                    let real = b.real_targets();
                    let mut chunk = b.inputs[..real].to_vec();
                    chunk.push(b.targets[real - 1]);
                    chunk
                })
                .collect();
            assert_eq!(chunks.concat(), ids, "offset {offset}");
            let first = if offset == 0 { 101 } else { offset.min(101) };
            assert_eq!(chunks[0].len(), first, "offset {offset}");
        }
    }

    #[test]
    fn packed_chunks_keep_every_real_target_once() {
        let clients = [ramp(1), ramp(57), ramp(333), ramp(1210)];
        let packed = pack_chunks(clients.iter().map(Vec::as_slice), 100, 4);
        let per_client: usize = clients
            .iter()
            .flat_map(|ids| batches(ids, &BatchConfig::padded(0)))
            .map(|b| b.real_targets())
            .sum();
        assert_eq!(
            packed.iter().map(Batch::real_targets).sum::<usize>(),
            per_client
        );
        // 0 + 1 + 4 + 12 chunks, 4 to a batch.
        assert_eq!(packed.len(), 17usize.div_ceil(4));
    }

    #[test]
    fn padded_batches_mask_exactly_the_missing_targets() {
        let ids = ramp(3 * 101 + 50);
        let all = batches(&ids, &BatchConfig::padded(9));
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].real_targets(), 3 * 100 + 49);
        assert!(batches(&ids, &BatchConfig::tutorial(9)).is_empty());
    }
}
