//! Federated Averaging on flat `f32` parameter buffers: pure math, no IO, no burn.
//!
//! - [`strategy`]: the round's decisions (selection, quorum, weighting, robust
//!   aggregation, server optimizer) and their state behind one trait;
//! - [`robust`]: L2 clipping (fixed or adaptive), trimmed mean, median;
//! - [`server_opt`]: FedAvg, FedAvgM, FedAdagrad, FedAdam, FedYogi (Reddi et al. 2020);
//! - [`codec`]: delta encodings f32 / f16 / int8 (per-tensor scale);
//! - [`sampling`]: seeded client sampling;
//! - [`accountant`]: the privacy of rounds of the sampled Gaussian mechanism (RDP).

pub mod accountant;
pub mod codec;
pub mod robust;
pub mod sampling;
pub mod server_opt;
pub mod strategy;

pub use codec::{Encoding, decode, encode};
pub use robust::{Aggregation, Clipping, FirstBound};
pub use server_opt::{ServerOptimizer, ServerOptimizerConfig};
pub use strategy::{
    AdaptiveClip, Aggregated, Candidate, DeviceNoisePlan, DistributedDp, DpConfig, OpenUpdates,
    Partial, PrivacySpent, Selection, StateRecord, Strategy, StrategyConfig, StrategyContext,
    StrategyKind, Weighting,
};

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
    #[error(
        "the update claims {claimed} examples; this client can train on 1 to {allowed} this round"
    )]
    BadExamples { claimed: u64, allowed: u64 },
    #[error("nothing to aggregate: no updates this round")]
    NoUpdates,
    #[error("the aggregate would make the global model non-finite; the round is dropped")]
    NonFiniteModel,
    #[error("the round was opened by another strategy, or its state is another's")]
    ForeignRound,
    #[error("this strategy needs every update at once: it cannot be split across edges")]
    NotSplittable,
    #[error("this strategy's rounds cannot be asynchronous")]
    NotAsynchronous,
    #[error("secure aggregation: {0}")]
    Secure(String),
}
