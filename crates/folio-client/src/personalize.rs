//! Personalization: the global model fine-tuned on this device's own text, for
//! this device only. Nothing of it is sent: it is the same local training a
//! round runs, kept instead of reported.

use burn::prelude::Device;
use folio_data::TrainingPlan;
use folio_model::ModelConfig;
use folio_proto::Optimizer;

use crate::{ClientError, LocalTraining};

/// How a device fine-tunes: passes over its text, batches per pass at most,
/// SGD's learning rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Personalization {
    pub epochs: u32,
    pub max_batches: Option<u32>,
    pub learning_rate: f32,
    pub seed: u64,
}

/// `global` fine-tuned on `ids` (batches of 8 × 100) as `settings` say.
pub async fn fine_tune(
    device: &Device,
    config: ModelConfig,
    global: &[f32],
    ids: &[u32],
    settings: Personalization,
) -> Result<Vec<f32>, ClientError> {
    let training = LocalTraining {
        plan: TrainingPlan {
            batch_size: 8,
            seq_len: 100,
            local_epochs: settings.epochs,
            max_batches: settings.max_batches,
            seed: settings.seed,
        },
        optimizer: Optimizer::Sgd,
        learning_rate: settings.learning_rate,
        clip_norm: None,
        time_limit: None,
    };
    let local = crate::train_locally(device, config, ids, global, &training, |_, _| {}).await?;
    Ok(global
        .iter()
        .zip(&local.delta)
        .map(|(g, d)| g + d)
        .collect())
}
