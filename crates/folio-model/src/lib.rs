//! The char-RNN on burn: Embedding → GRU → Dense, one code path for every size and
//! every device (flex on the CPU natively and in wasm, WebGPU in the browser).
//!
//! - [`CharRnn`]: the model, its flat parameter buffer ([`CharRnn::to_flat`]);
//! - [`train`]: masked cross-entropy, accuracy, the local training step;
//! - [`eval`]: loss and accuracy over batches, the random-text baseline;
//! - [`generate`]: stateful sampling;
//! - [`checkpoint`]: safetensors files;
//! - [`params`]: weight deltas;
//! - [`probe`]: the known-answer probe a device passes before it is trusted;
//! - `pretrain`: central training on pooled text, resumable (native only).
//!
//! Nothing here reads a tensor synchronously, so all of it runs on WebGPU in wasm.

pub mod checkpoint;
pub mod config;
pub mod eval;
pub mod generate;
pub mod gru;
pub mod model;
pub mod params;
#[cfg(not(target_arch = "wasm32"))]
pub mod pretrain;
pub mod probe;
pub mod train;

use std::path::PathBuf;

pub use config::{ModelConfig, Preset};
pub use model::CharRnn;
pub use train::{Metrics, OptimizerKind, TrainConfig, Trainer};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("parameter buffer has {found} values, the model needs {expected}")]
    WrongLength { expected: usize, found: usize },
    #[error("device error: {0}")]
    Device(String),
    #[error("nothing to evaluate: no batches")]
    NoBatches,
    #[error("bad checkpoint: {0}")]
    Checkpoint(String),
    #[error("bad safetensors file: {0}")]
    Safetensors(#[from] safetensors::SafeTensorError),
    #[error("cannot access {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A tensor's values as f32, whatever the backend's float type.
fn to_f32(data: burn::tensor::TensorData) -> Result<Vec<f32>, ModelError> {
    data.try_into_vec_as::<f32>()
        .map_err(|err| ModelError::Device(format!("{err:?}")))
}
