//! The local step's arithmetic: one SGD batch moves a client's weights by exactly
//! −lr × the gradient of that batch's mean loss, so a round of one-batch clients
//! averages to one step of the gradient on their batches pooled.
#![cfg(not(target_family = "wasm"))]

use burn::prelude::Device;
use folio_data::{BatchConfig, batch::batches, vocab};
use folio_fed::Encoding;
use folio_model::{CharRnn, Preset, train::loss_and_gradients};
use folio_proto::{Optimizer, RoundStart};

#[test]
fn one_local_sgd_batch_moves_the_weights_by_minus_lr_times_its_gradient() {
    let config = Preset::Small.config();
    let device = Device::flex();
    let global = pollster::block_on(CharRnn::init(config, 3, &device).to_flat()).unwrap();
    let text = "First Citizen: Before we proceed any further, hear me speak. ".repeat(40);
    let ids = vocab::encode(&text).0;
    let (lr, seed) = (0.15f32, 9);
    let start = RoundStart {
        round: 1,
        model: 0,
        weights: None,
        weights_encoding: Encoding::F32,
        deadline_ms: u64::MAX,
        local_epochs: 1,
        max_batches: Some(1),
        optimizer: Optimizer::Sgd,
        learning_rate: lr,
        clip_norm: None,
        delta_encoding: Encoding::F32,
        seed,
    };
    let local = pollster::block_on(folio_client::train_locally(
        &device,
        config,
        &ids,
        8,
        100,
        &global,
        &start,
        |_, _| {},
    ))
    .unwrap();
    // The batch the client trained on: its first of the round's shuffle.
    let batch = batches(
        &ids,
        &BatchConfig {
            batch_size: 8,
            seq_len: 100,
            shuffle_buffer: usize::MAX,
            ..BatchConfig::padded(seed)
        },
    )
    .remove(0);
    let model = CharRnn::from_flat(config, &global, &device.clone().autodiff()).unwrap();
    let (_, gradient) = pollster::block_on(loss_and_gradients(&model, &batch)).unwrap();
    assert_eq!(local.delta.len(), gradient.len());
    let scale = gradient.iter().fold(0f32, |m, g| m.max(g.abs())) * lr;
    let worst = local
        .delta
        .iter()
        .zip(&gradient)
        .map(|(d, g)| (d + lr * g).abs())
        .fold(0f32, f32::max);
    assert!(
        worst <= 1e-3 * scale,
        "delta differs from −lr·g by up to {worst} (largest step {scale})"
    );
}
