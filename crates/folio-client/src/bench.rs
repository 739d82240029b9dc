//! Local training throughput, the same code on a native CPU, a tab's WebGPU and a
//! tab's CPU fallback, so that their figures compare.

use burn::prelude::Device;
use folio_data::batch::batches;
use folio_data::{BatchConfig, vocab};
use folio_model::{CharRnn, ModelConfig, TrainConfig, Trainer};
use web_time::Instant;

/// Training chars/s of a `config` model on `device` (an autodiff device) over
/// `steps` timed B × T steps, after one warm-up step that pays for allocations and
/// shader compilation. The text does not change the work done.
pub async fn train_chars_per_second(
    config: ModelConfig,
    device: &Device,
    batch_size: usize,
    seq_len: usize,
    steps: usize,
) -> Result<f64, folio_model::ModelError> {
    const SENTENCE: &str =
        "It was the best of times, it was the worst of times, it was the age of wisdom, ";
    let needed = (steps + 1) * batch_size * (seq_len + 1);
    let text = SENTENCE.repeat(needed / SENTENCE.len() + 1);
    let (ids, _) = vocab::encode(&text);
    let batch_config = BatchConfig {
        seq_len,
        batch_size,
        ..BatchConfig::tutorial(0)
    };
    let all = batches(&ids, &batch_config);
    let mut trainer = Trainer::new(CharRnn::init(config, 0, device), TrainConfig::tutorial());
    // Each read waits for the device, so a step's time is all of its work.
    trainer.step(&all[0]).read().await?;
    let start = Instant::now();
    for batch in &all[1..=steps] {
        trainer.step(batch).read().await?;
    }
    Ok((steps * batch_size * seq_len) as f64 / start.elapsed().as_secs_f64())
}
