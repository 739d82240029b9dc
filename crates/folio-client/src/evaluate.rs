//! Federated evaluation on the device: the model the server asks about,
//! measured on the text this device holds out, answered as sums (so that the
//! server adds devices up by their characters). Nothing is trained.

use burn::prelude::Device;
use folio_model::{CharRnn, ModelConfig};
use folio_proto::{Evaluate, Evaluation};
pub use folio_secagg::HeldOut;

use crate::ClientError;

/// Sequences per batch when measuring: one pass over the held-out text.
const BATCH_SIZE: usize = 32;

/// The loss, right predictions and characters of the model of `weights` on the
/// first `ask.max_chars` characters of `held_out` (ids), computed on `device`.
pub async fn measure(
    device: &Device,
    config: ModelConfig,
    weights: &[f32],
    held_out: &[u32],
    ask: &Evaluate,
) -> Result<Evaluation, ClientError> {
    let figures = held_out_figures(device, config, weights, held_out, ask.max_chars).await?;
    Ok(Evaluation {
        round: ask.round,
        loss_sum: figures.loss_sum,
        correct: figures.correct as u64,
        chars: figures.chars as u64,
    })
}

/// [`measure`]'s sums on the first `max_chars` characters of `held_out`.
pub async fn held_out_figures(
    device: &Device,
    config: ModelConfig,
    weights: &[f32],
    held_out: &[u32],
    max_chars: u64,
) -> Result<HeldOut, ClientError> {
    let keep = usize::try_from(max_chars).unwrap_or(usize::MAX);
    let ids = &held_out[..held_out.len().min(keep.saturating_add(1))];
    // Fewer than two ids predict nothing.
    if ids.len() < 2 {
        return Ok(HeldOut::default());
    }
    let rnn = CharRnn::from_flat(config, weights, device)?;
    let metrics = folio_model::eval::evaluate_population(
        &rnn,
        &[ids.to_vec()],
        BATCH_SIZE,
        usize::MAX,
        |_, _| {},
    )
    .await?;
    let chars = metrics.targets as f64;
    Ok(HeldOut {
        loss_sum: metrics.loss * chars,
        correct: (metrics.accuracy * chars).round(),
        chars,
    })
}
