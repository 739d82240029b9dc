//! Evaluation: mean loss and flattened accuracy over batches.

use burn::module::Module;
use folio_data::Batch;
use folio_data::rng::SplitMix64;

use crate::ModelError;
use crate::model::CharRnn;
use crate::train::{BatchTensors, Metrics, loss_and_metrics};

/// Loss and accuracy of `model` over `batches`, with one device read at the end.
pub async fn evaluate(model: &CharRnn, batches: &[Batch]) -> Result<Metrics, ModelError> {
    let model = model.valid();
    let device = model.embeddings.device();
    let mut total = None;
    for batch in batches {
        let tensors = BatchTensors::new(batch, &device);
        let (logits, _) = model.forward(tensors.inputs.clone(), None);
        let (_, metrics) = loss_and_metrics(logits, &tensors);
        total = Some(match total {
            None => metrics,
            Some(sum) => metrics.merge(sum),
        });
    }
    match total {
        Some(total) => total.read().await,
        None => Err(ModelError::NoBatches),
    }
}

/// Batches of uniformly random ids: the tutorial's sanity check (a model that
/// learnt anything real scores ≈ 1/86 on them).
pub fn random_batches(
    count: usize,
    batch_size: usize,
    seq_len: usize,
    vocab: usize,
    seed: u64,
) -> Vec<Batch> {
    let mut rng = SplitMix64::new(seed);
    (0..count)
        .map(|_| {
            let n = batch_size * seq_len;
            let chunk: Vec<u32> = (0..n + batch_size)
                .map(|_| rng.below(vocab) as u32)
                .collect();
            let mut inputs = Vec::with_capacity(n);
            let mut targets = Vec::with_capacity(n);
            for row in chunk.chunks(seq_len + 1) {
                inputs.extend_from_slice(&row[..seq_len]);
                targets.extend_from_slice(&row[1..]);
            }
            Batch {
                batch_size,
                seq_len,
                inputs,
                targets,
                mask: vec![1.0; n],
            }
        })
        .collect()
}
