//! The char-RNN on the browser's WebGPU (SwiftShader in headless Chromium, a CPU
//! emulation: tiny shapes) against the pure-Rust CPU backend in the same tab.
#![cfg(target_arch = "wasm32")]

use burn::prelude::Device;
use folio_data::batch::batches;
use folio_data::dickens::strip_gutenberg;
use folio_data::{Batch, BatchConfig, vocab};
use folio_model::eval::evaluate;
use folio_model::train::loss_and_gradients;
use folio_model::{CharRnn, ModelConfig, TrainConfig, Trainer};
use wasm_bindgen_test::*;

wasm_bindgen_test_configure!(run_in_browser);

const TINY: ModelConfig = ModelConfig {
    vocab: 86,
    embed: 8,
    hidden: 16,
};

/// Two rows of 12 chars of real text (A Christmas Carol).
fn tiny_batch() -> Batch {
    let book = strip_gutenberg(include_str!("../../../data/dickens/a-christmas-carol.txt"));
    let (ids, _) = vocab::encode(&book[5_000..6_000]);
    let config = BatchConfig {
        seq_len: 12,
        batch_size: 2,
        ..BatchConfig::tutorial(3)
    };
    batches(&ids, &config).remove(0)
}

async fn webgpu() -> Device {
    folio_web::webgpu_device()
        .await
        .expect("is Chromium started with the flags in webdriver.json?")
}

#[wasm_bindgen_test]
async fn webgpu_and_flex_give_the_same_loss_and_gradients() {
    let batch = tiny_batch();
    let weights = CharRnn::init(TINY, 9, &Device::flex())
        .to_flat()
        .await
        .unwrap();
    let mut results = Vec::new();
    for device in [Device::flex(), webgpu().await] {
        let model = CharRnn::from_flat(TINY, &weights, &device.autodiff()).unwrap();
        results.push(loss_and_gradients(&model, &batch).await.unwrap());
    }
    let (cpu_loss, cpu_grads) = &results[0];
    let (gpu_loss, gpu_grads) = &results[1];
    assert!(
        (cpu_loss - gpu_loss).abs() <= 1e-4 * cpu_loss.abs(),
        "loss: flex {cpu_loss}, webgpu {gpu_loss}"
    );
    let scale = cpu_grads.iter().fold(0f32, |m, g| m.max(g.abs()));
    let worst = cpu_grads
        .iter()
        .zip(gpu_grads)
        .map(|(c, g)| (c - g).abs())
        .fold(0f32, f32::max);
    assert!(
        worst <= 1e-4 * scale,
        "gradients differ by {worst} (largest gradient {scale})"
    );
}

#[wasm_bindgen_test]
async fn one_training_step_on_webgpu_lowers_the_loss() {
    let batch = tiny_batch();
    let device = webgpu().await.autodiff();
    let mut trainer = Trainer::new(CharRnn::init(TINY, 10, &device), TrainConfig::tutorial());
    let before = trainer.step(&batch).read().await.unwrap();
    let after = evaluate(trainer.model(), std::slice::from_ref(&batch))
        .await
        .unwrap();
    assert!(
        after.loss < before.loss,
        "{} -> {}",
        before.loss,
        after.loss
    );
}

#[wasm_bindgen_test]
async fn the_fused_gru_computes_the_stepwise_gru_and_its_gradients_on_webgpu() {
    use folio_model::gru::parity::{TEST_SHAPES, check_shapes};
    let device = webgpu().await.autodiff();
    check_shapes(&device, &TEST_SHAPES).await.unwrap();
}

/// Device checks on honest WebGPU: the probe's answer on SwiftShader against the
/// CPU backend's in the same tab, for the shapes the tabs train (small, medium)
/// and fresh ids. None may fail; the worst error is printed as the margin under
/// the tolerance.
#[wasm_bindgen_test]
async fn honest_webgpu_passes_its_device_checks_with_a_wide_margin() {
    use folio_model::Preset;
    use folio_model::probe::{ProbeSpec, TOLERANCE};
    let gpu = webgpu().await;
    let mut worst = 0f64;
    let mut probes = 0;
    for (preset, ids) in [(Preset::Small, 0..12u64), (Preset::Medium, 100..103)] {
        let config = preset.config();
        for id in ids {
            let spec = ProbeSpec {
                id: id.wrapping_mul(0x9E37_79B9_7F4A_7C15),
                batch_size: 2,
                seq_len: 20,
                directions: 8,
            };
            let reference = spec.measure(&Device::flex(), config).await.unwrap();
            let answer = spec.measure(&gpu, config).await.unwrap();
            let error = reference.error(answer.loss, &answer.projections).unwrap();
            assert!(
                error <= TOLERANCE,
                "{preset} probe {id}: error {error:e} over the tolerance {TOLERANCE:e}"
            );
            worst = worst.max(error);
            probes += 1;
        }
    }
    console_log!(
        "{probes} probes on WebGPU, none failed; worst error {worst:.2e} (tolerance {TOLERANCE:e})"
    );
}
