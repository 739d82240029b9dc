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

/// Held-out loss and flattened accuracy over many clients' ids (padding
/// excluded), `batch_size` chunks of 100 to a batch whoever they belong to: the
/// same figures as per-client evaluations averaged by their targets. Reads back
/// every `slice` batches and reports `(batches done, batches)`.
pub async fn evaluate_population(
    model: &CharRnn,
    clients: &[Vec<u32>],
    batch_size: usize,
    slice: usize,
    mut on_progress: impl FnMut(usize, usize),
) -> Result<Metrics, ModelError> {
    let all = folio_data::batch::pack_chunks(
        clients.iter().map(Vec::as_slice),
        folio_data::batch::SEQ_LEN,
        batch_size,
    );
    let mut total: Option<Metrics> = None;
    for (i, part) in all.chunks(slice.max(1)).enumerate() {
        let metrics = evaluate(model, part).await?;
        total = Some(match total {
            None => metrics,
            Some(sum) => sum.merge(metrics),
        });
        on_progress((i * slice.max(1) + part.len()).min(all.len()), all.len());
    }
    total.ok_or(ModelError::NoBatches)
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
