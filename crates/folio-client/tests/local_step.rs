//! The local step: one SGD batch moves a client's weights by exactly −lr × the
//! gradient of that batch's mean loss, so a round of one-batch clients averages to
//! one step of the gradient on their batches pooled; and the batches it takes.
#![cfg(not(target_family = "wasm"))]

use burn::prelude::Device;
use folio_client::LocalTraining;
use folio_data::{TrainingPlan, vocab};
use folio_model::{CharRnn, Preset, train::loss_and_gradients};
use folio_proto::Optimizer;

#[test]
fn one_local_sgd_batch_moves_the_weights_by_minus_lr_times_its_gradient() {
    let config = Preset::Small.config();
    let device = Device::flex();
    let global = pollster::block_on(CharRnn::init(config, 3, &device).to_flat()).unwrap();
    let text = "First Citizen: Before we proceed any further, hear me speak. ".repeat(40);
    let ids = vocab::encode(&text).0;
    let lr = 0.15f32;
    let training = LocalTraining {
        plan: TrainingPlan {
            batch_size: 8,
            max_batches: Some(1),
            ..plan(9)
        },
        optimizer: Optimizer::Sgd,
        learning_rate: lr,
        clip_norm: None,
        time_limit: None,
    };
    let local = pollster::block_on(folio_client::train_locally(
        &device,
        config,
        &ids,
        &global,
        &training,
        |_, _| {},
    ))
    .unwrap();
    // The batch the client trained on: its first of the round.
    let batch = training.plan.batches(&ids).remove(0);
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

fn plan(seed: u64) -> TrainingPlan {
    TrainingPlan::one_epoch(1, 100, seed)
}

/// Each epoch's chunk lengths, sorted: with one chunk a batch they tell where the
/// text was cut. Epoch `e` is what `e + 1` local epochs add to `e`.
fn cuts(ids: &[u32], plan: &TrainingPlan) -> Vec<Vec<usize>> {
    let batches = |epochs: u32| {
        TrainingPlan {
            local_epochs: epochs,
            ..*plan
        }
        .batches(ids)
    };
    (0..plan.local_epochs)
        .map(|epoch| {
            let before = if epoch == 0 { 0 } else { batches(epoch).len() };
            let mut lengths: Vec<usize> = batches(epoch + 1)[before..]
                .iter()
                .map(|b| b.real_targets())
                .collect();
            lengths.sort();
            lengths
        })
        .collect()
}

#[test]
fn each_epoch_and_each_client_cut_the_text_elsewhere_and_every_target_is_trained() {
    let speech =
        |name: &str| vocab::encode(&format!("{name}. Speak the speech, I pray you. ").repeat(20)).0;
    let (hamlet, horatio) = (speech("HAMLET"), speech("HORATIO"));
    let start = TrainingPlan {
        local_epochs: 3,
        ..plan(11)
    };
    let epochs = cuts(&hamlet, &start);
    assert_eq!(epochs, cuts(&hamlet, &start), "seeded");
    assert!(
        epochs[0] != epochs[1] || epochs[1] != epochs[2],
        "{epochs:?}"
    );
    for lengths in &epochs {
        // Every id is in one chunk; each chunk's first id is no target.
        assert_eq!(lengths.iter().map(|l| l + 1).sum::<usize>(), hamlet.len());
    }
    // Another client's text of another length, the same round: cut elsewhere,
    // not at the same place in its text.
    let other = cuts(&horatio[..hamlet.len()], &start);
    assert_ne!(epochs, other);
}
