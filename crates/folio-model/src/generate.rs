//! Stateful text generation: the prompt once through the model, then one char at a
//! time with the GRU state carried, sampled on the host.

use burn::module::Module;
use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use folio_data::rng::SplitMix64;
use folio_data::vocab;

use crate::model::CharRnn;
use crate::{ModelError, to_f32};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GenerateConfig {
    /// Chars to sample after the prompt.
    pub length: usize,
    /// Softmax temperature; the tutorial uses 1.0.
    pub temperature: f64,
    /// Sample among the `k` likeliest chars only.
    pub top_k: Option<usize>,
    pub seed: u64,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        Self {
            length: 200,
            temperature: 1.0,
            top_k: None,
            seed: 0,
        }
    }
}

/// Generates `config.length` chars after `prompt`, calling `on_char` as each is
/// sampled; returns them. Batch 1, the same weights as training.
pub async fn generate(
    model: &CharRnn,
    prompt: &str,
    config: &GenerateConfig,
    mut on_char: impl FnMut(char),
) -> Result<String, ModelError> {
    let model = model.valid();
    let device = model.embeddings.device();
    let (mut ids, _) = vocab::encode(prompt);
    if ids.is_empty() {
        // Start from a newline, as after a speech.
        ids.push(vocab::char_to_id('\n').expect("newline is in the vocabulary"));
    }
    let mut rng = SplitMix64::new(config.seed);
    let mut input = ids_tensor(&ids, &device);
    let mut state = None;
    let mut text = String::with_capacity(config.length);
    for _ in 0..config.length {
        let (logits, last) = model.forward(input, state);
        state = Some(last);
        let [_, steps, vocab_size] = logits.dims();
        let last_logits = logits
            .slice([0..1, steps - 1..steps, 0..vocab_size])
            .reshape([vocab_size]);
        let log_probs = log_softmax(
            last_logits.div_scalar(config.temperature.max(1e-6) as f32),
            0,
        )
        .into_data_async()
        .await
        .map_err(|err| ModelError::Device(format!("{err:?}")))?;
        let log_probs = to_f32(log_probs)?;
        let id = sample(&log_probs, config.top_k, &mut rng);
        let c = vocab::id_to_char(id).unwrap_or('\u{FFFD}');
        on_char(c);
        text.push(c);
        input = ids_tensor(&[id], &device);
    }
    Ok(text)
}

fn ids_tensor(ids: &[u32], device: &Device) -> Tensor<2, Int> {
    let values: Vec<i64> = ids.iter().map(|&id| i64::from(id)).collect();
    Tensor::from_data(TensorData::new(values, [1, ids.len()]), device)
}

/// Samples an id from log-probabilities, among the `top_k` likeliest if given.
pub fn sample(log_probs: &[f32], top_k: Option<usize>, rng: &mut SplitMix64) -> u32 {
    let mut order: Vec<usize> = (0..log_probs.len()).collect();
    order.sort_by(|&a, &b| log_probs[b].total_cmp(&log_probs[a]));
    order.truncate(top_k.unwrap_or(order.len()).max(1));
    let max = log_probs[order[0]];
    let weights: Vec<f64> = order
        .iter()
        .map(|&i| f64::from(log_probs[i] - max).exp())
        .collect();
    let mut target = rng.next_f64() * weights.iter().sum::<f64>();
    for (&i, w) in order.iter().zip(&weights) {
        if target < *w {
            return i as u32;
        }
        target -= w;
    }
    order[order.len() - 1] as u32
}
