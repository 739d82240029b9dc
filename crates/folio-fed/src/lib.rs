//! Federated Averaging on flat `f32` parameter buffers: pure math, no IO, no burn.
//!
//! - [`aggregate`]: streaming weighted averaging of client deltas, O(model) memory;
//! - [`server_opt`]: FedAvg, FedAvgM, FedAdagrad, FedAdam, FedYogi (Reddi et al. 2020);
//! - [`codec`]: delta encodings f32 / f16 / int8 (per-tensor scale);
//! - [`sampling`]: seeded client sampling.

pub mod aggregate;
pub mod codec;
pub mod sampling;
pub mod server_opt;

pub use aggregate::{Aggregator, Weighting};
pub use codec::{Encoding, decode, encode};
pub use server_opt::{ServerOptimizer, ServerOptimizerConfig};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FedError {
    #[error("delta has {found} values, the model has {expected}")]
    WrongLength { expected: usize, found: usize },
    #[error("delta value {index} is not finite ({value})")]
    NotFinite { index: usize, value: f32 },
    #[error("encoded delta is {found} bytes, {expected} expected for {encoding:?}")]
    WrongByteLength {
        encoding: Encoding,
        expected: usize,
        found: usize,
    },
    #[error("an update must carry at least one example")]
    NoExamples,
    #[error("nothing to aggregate: no updates this round")]
    NoUpdates,
}
