//! The char-RNN on flex, small preset, real text (the Dickens books in the repo).

use std::collections::BTreeMap;
use std::path::Path;

use burn::prelude::*;
use folio_data::batch::batches;
use folio_data::dickens::{default_dickens_files, load_books};
use folio_data::{Batch, BatchConfig, vocab};
use folio_model::checkpoint::{self, Precision};
use folio_model::eval::{evaluate, random_batches};
use folio_model::generate::{GenerateConfig, generate};
use folio_model::params::{apply_delta, delta};
use folio_model::train::{BatchTensors, loss_and_gradients};
use folio_model::{CharRnn, ModelConfig, OptimizerKind, Preset, TrainConfig, Trainer};
use pollster::block_on;

fn small() -> ModelConfig {
    Preset::Small.config()
}

fn dickens_batches(count: usize) -> Vec<Batch> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let books = load_books(&default_dickens_files(&root)).unwrap();
    let (ids, _) = vocab::encode(&books[1][..60_000]);
    let mut all = batches(&ids, &BatchConfig::tutorial(7));
    all.truncate(count);
    assert_eq!(all.len(), count, "not enough text");
    all
}

fn logits(model: &CharRnn, batch: &Batch) -> Vec<f32> {
    let tensors = BatchTensors::new(batch, &model.embeddings.device());
    let (logits, _) = model.forward(tensors.inputs, None);
    logits.into_data().try_to_vec::<f32>().unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn one_sgd_step_lowers_the_loss_on_a_fixed_batch() {
    let batch = &dickens_batches(1)[0];
    let device = Device::flex().autodiff();
    let mut trainer = Trainer::new(CharRnn::init(small(), 1, &device), TrainConfig::tutorial());
    let before = block_on(trainer.step(batch).read()).unwrap();
    let after = block_on(evaluate(trainer.model(), std::slice::from_ref(batch))).unwrap();
    assert!(
        after.loss < before.loss,
        "{} -> {}",
        before.loss,
        after.loss
    );
    assert_eq!(before.targets, 800);
}

#[test]
fn a_few_dozen_steps_overfit_a_tiny_corpus() {
    let batch = &dickens_batches(1)[0];
    let device = Device::flex().autodiff();
    let config = TrainConfig {
        optimizer: OptimizerKind::Adam,
        learning_rate: 0.02,
        clip_norm: Some(5.0),
    };
    let mut trainer = Trainer::new(CharRnn::init(small(), 2, &device), config);
    for _ in 0..60 {
        trainer.step(batch);
    }
    let fitted = block_on(evaluate(trainer.model(), std::slice::from_ref(batch))).unwrap();
    assert!(fitted.accuracy > 0.9, "accuracy {}", fitted.accuracy);
}

#[test]
fn flat_parameters_round_trip_exactly_and_deltas_apply() {
    let device = Device::flex().autodiff();
    let model = CharRnn::init(small(), 3, &device);
    let old = block_on(model.to_flat()).unwrap();
    assert_eq!(old.len(), small().num_params());
    let rebuilt = CharRnn::from_flat(small(), &old, &device).unwrap();
    assert_eq!(block_on(rebuilt.to_flat()).unwrap(), old);

    let mut trainer = Trainer::new(rebuilt, TrainConfig::tutorial());
    trainer.step(&dickens_batches(1)[0]);
    let new = block_on(trainer.model().to_flat()).unwrap();
    let d = delta(&new, &old);
    assert!(d.iter().any(|&x| x != 0.0));
    let mut applied = old.clone();
    apply_delta(&mut applied, &d);
    assert_eq!(applied, new, "old + (new - old) must be new");

    let err = CharRnn::from_flat(small(), &old[1..], &device).unwrap_err();
    assert!(err.to_string().contains("needs"), "{err}");
}

#[test]
fn checkpoints_round_trip_to_the_same_logits() {
    let device = Device::flex();
    let model = CharRnn::init(small(), 4, &device);
    let weights = block_on(model.to_flat()).unwrap();
    let batch = &dickens_batches(1)[0];
    let reference = logits(&model, batch);
    let extra = BTreeMap::from([("note".to_owned(), "test".to_owned())]);

    let bytes = checkpoint::encode(small(), &weights, Precision::F32, &extra).unwrap();
    let loaded = checkpoint::decode(&bytes, Some(small())).unwrap();
    assert_eq!(loaded.weights, weights);
    assert_eq!(loaded.metadata["note"], "test");
    let reloaded = CharRnn::from_flat(loaded.config, &loaded.weights, &device).unwrap();
    assert_eq!(logits(&reloaded, batch), reference);

    let half = checkpoint::encode(small(), &weights, Precision::F16, &extra).unwrap();
    assert!(half.len() < bytes.len() * 6 / 10);
    let loaded = checkpoint::decode(&half, None).unwrap();
    let reloaded = CharRnn::from_flat(loaded.config, &loaded.weights, &device).unwrap();
    assert!(max_abs_diff(&logits(&reloaded, batch), &reference) < 1e-2);

    let seed = checkpoint::decode(&bytes, Some(Preset::Seed.config())).unwrap_err();
    assert!(seed.to_string().contains("expected"), "{seed}");
    let garbage = checkpoint::decode(b"not a checkpoint", None).unwrap_err();
    assert!(garbage.to_string().contains("safetensors"), "{garbage}");
}

#[test]
fn generation_is_reproducible_with_a_seed() {
    let device = Device::flex();
    let model = CharRnn::init(small(), 5, &device);
    let config = GenerateConfig {
        length: 40,
        seed: 11,
        top_k: Some(10),
        ..GenerateConfig::default()
    };
    let mut streamed = String::new();
    let first = block_on(generate(&model, "What of folio, you ask? ", &config, |c| {
        streamed.push(c)
    }))
    .unwrap();
    assert_eq!(first.chars().count(), 40);
    assert_eq!(streamed, first);
    let again = block_on(generate(
        &model,
        "What of folio, you ask? ",
        &config,
        |_| {},
    ))
    .unwrap();
    assert_eq!(first, again);
    let other = GenerateConfig { seed: 12, ..config };
    assert_ne!(
        first,
        block_on(generate(&model, "What of folio, you ask? ", &other, |_| {})).unwrap()
    );
}

#[test]
fn one_char_at_a_time_with_carried_state_equals_the_whole_sequence() {
    let device = Device::flex();
    let model = CharRnn::init(small(), 6, &device);
    let (ids, _) = vocab::encode("Marley was dead: to begin with.");
    let as_tensor = |ids: &[u32]| {
        let values: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
        Tensor::<2, Int>::from_data(TensorData::new(values, [1, ids.len()]), &device)
    };
    let (whole, _) = model.forward(as_tensor(&ids), None);
    let whole = whole.into_data().try_to_vec::<f32>().unwrap();
    let mut state = None;
    let mut stepped = Vec::new();
    for &id in &ids {
        let (logits, last) = model.forward(as_tensor(&[id]), state);
        state = Some(last);
        stepped.extend(logits.into_data().try_to_vec::<f32>().unwrap());
    }
    assert!(max_abs_diff(&whole, &stepped) < 1e-5);
}

#[test]
fn an_untrained_model_scores_chance_on_random_text() {
    let model = CharRnn::init(small(), 7, &Device::flex());
    let metrics = block_on(evaluate(&model, &random_batches(4, 8, 100, 86, 1))).unwrap();
    assert!(
        (metrics.loss - (86f64).ln()).abs() < 0.1,
        "loss {}",
        metrics.loss
    );
    assert!(metrics.accuracy < 0.05, "accuracy {}", metrics.accuracy);
}

#[test]
fn gradients_match_finite_differences() {
    let config = ModelConfig {
        vocab: 86,
        embed: 4,
        hidden: 6,
    };
    let device = Device::flex().autodiff();
    let batch = &dickens_batches(1)[0];
    let mut weights = block_on(CharRnn::init(config, 8, &device).to_flat()).unwrap();
    // Keras' initial embeddings (±0.05) leave the states, and so the recurrent
    // kernel's gradient, too small for an f32 finite difference: scale them up.
    for w in &mut weights[..config.vocab * config.embed] {
        *w *= 20.0;
    }
    let model = CharRnn::from_flat(config, &weights, &device).unwrap();
    let (loss, grads) = block_on(loss_and_gradients(&model, batch)).unwrap();
    assert_eq!(grads.len(), weights.len());
    let loss_at = |w: &[f32]| {
        let m = CharRnn::from_flat(config, w, &device).unwrap();
        f64::from(block_on(loss_and_gradients(&m, batch)).unwrap().0)
    };
    // Check each tensor's gradient against a central difference along it: the
    // derivative in the direction g/|g| is |g|. One direction per tensor sums many
    // small entries, and a step of 0.05 keeps the loss's change (≈ 1e-4) well above
    // its f32 rounding (≈ 1e-6) while the step's own error stays under 1 %.
    let mut start = 0;
    for (name, shape) in config.param_shapes() {
        let len: usize = shape.iter().product();
        let g = &grads[start..start + len];
        let norm = g.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
        let h = 5e-2;
        let (mut plus, mut minus) = (weights.clone(), weights.clone());
        for (i, gi) in g.iter().enumerate() {
            let step = (h * f64::from(*gi) / norm) as f32;
            plus[start + i] += step;
            minus[start + i] -= step;
        }
        let numeric = (loss_at(&plus) - loss_at(&minus)) / (2.0 * h);
        assert!(
            (numeric - norm).abs() < 0.03 * norm.max(1e-3),
            "{name}: {numeric} vs {norm} (loss {loss})"
        );
        start += len;
    }
}

#[test]
fn population_evaluation_is_the_target_weighted_mean_of_per_client_ones() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let books = load_books(&default_dickens_files(&root)).unwrap();
    let (ids, _) = vocab::encode(&books[0][..20_000]);
    // Four "clients" of Dickens lines, from one chunk to many, one partial batch each.
    let clients: Vec<Vec<u32>> = [(0, 57), (57, 390), (390, 1600), (1600, 4000)]
        .iter()
        .map(|&(a, b)| ids[a..b].to_vec())
        .collect();
    let model = CharRnn::init(small(), 3, &Device::flex());
    let population = pollster::block_on(folio_model::eval::evaluate_population(
        &model,
        &clients,
        16,
        2,
        |_, _| {},
    ))
    .unwrap();
    let mut loss = 0.0;
    let mut correct = 0.0;
    let mut targets = 0;
    for client in &clients {
        let own = batches(client, &BatchConfig::padded(0));
        let m = pollster::block_on(folio_model::eval::evaluate(&model, &own)).unwrap();
        loss += m.loss * m.targets as f64;
        correct += m.accuracy * m.targets as f64;
        targets += m.targets;
    }
    assert_eq!(population.targets, targets);
    assert!((population.loss - loss / targets as f64).abs() < 1e-5);
    assert!((population.accuracy - correct / targets as f64).abs() < 1e-9);
}

#[test]
fn the_fused_gru_computes_the_stepwise_gru_and_its_gradients() {
    use folio_model::gru::parity::{GruShape, TEST_SHAPES, check_shapes};
    let longer = GruShape {
        steps: 30,
        batch: 8,
        input: 64,
        hidden: 33,
    };
    // A batch of the size pre-training uses, odd.
    let wide = GruShape {
        steps: 3,
        batch: 65,
        input: 8,
        hidden: 128,
    };
    let shapes = [&TEST_SHAPES[..], &[longer, wide]].concat();
    block_on(check_shapes(&Device::flex().autodiff(), &shapes)).unwrap();
}
