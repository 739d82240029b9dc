//! What a closed round hands its host to run off the engine: aggregation (a
//! root's: combining the edges' shares) and an edge's folding of its share. Each
//! knows what it collected by type, never by a downcast.

use std::sync::Arc;

use folio_fed::{Aggregated, FedError, OpenUpdates, Partial, StateRecord, Strategy, codec};

use crate::cluster::Shares;
use crate::secure::{SecureSum, SumMetrics};
use crate::{RoundRecord, ShareReport};

/// What a round collected.
pub(crate) enum Collected {
    /// Updates, each seen on its own, folded as the strategy folds them.
    Updates(OpenUpdates),
    /// A secure round's sum, still masked.
    SecureSum(Box<SecureSum>),
    /// A root's round: the edges' shares so far.
    Shares(Shares),
}

/// A closed round's aggregation, to run off the engine.
pub struct AggregateJob {
    pub round: u64,
    pub(crate) strategy: Arc<dyn Strategy>,
    pub(crate) collected: Collected,
    pub(crate) weights: Arc<Vec<f32>>,
    pub(crate) state: StateRecord,
    pub(crate) model_encoding: folio_fed::Encoding,
}

/// What [`AggregateJob::run`] gives back.
pub struct AggregateResult {
    pub(crate) round: u64,
    pub(crate) result: Result<(Aggregated, Arc<Vec<u8>>), FedError>,
    /// A secure round's training metrics, known only once its sum is unmasked.
    pub(crate) secure: Option<SumMetrics>,
}

impl AggregateJob {
    /// Aggregates, and encodes the new model as the next round will send it.
    pub fn run(self) -> AggregateResult {
        let mut secure = None;
        let aggregated = match &self.collected {
            Collected::Updates(updates) => {
                self.strategy.aggregate(updates, &self.weights, &self.state)
            }
            Collected::SecureSum(sum) => sum.partial().and_then(|(partial, metrics)| {
                secure = Some(metrics);
                let bound = Some(sum.spec.quantizer.clip_bound);
                self.strategy
                    .combine(&[partial], bound, &self.weights, &self.state)
            }),
            Collected::Shares(shares) => {
                self.strategy
                    .combine(&shares.parts, shares.bound, &self.weights, &self.state)
            }
        };
        let result = aggregated.map(|aggregated| {
            let encoded = encode_model(&aggregated.weights, self.model_encoding);
            (aggregated, encoded)
        });
        AggregateResult {
            round: self.round,
            result,
            secure,
        }
    }
}

/// An edge's share of a round, to fold off the engine.
pub struct ShareJob {
    pub report: ShareReport,
    pub(crate) strategy: Arc<dyn Strategy>,
    pub(crate) collected: Collected,
}

impl ShareJob {
    pub fn run(mut self) -> Result<(ShareReport, Partial), FedError> {
        match &self.collected {
            Collected::Updates(updates) => {
                let partial = self.strategy.part(updates)?;
                Ok((self.report, partial))
            }
            Collected::SecureSum(sum) => {
                let (partial, metrics) = sum.partial()?;
                self.report.loss_sum = metrics.loss_sum;
                self.report.accuracy_sum = metrics.accuracy_sum;
                self.report.examples = metrics.examples;
                Ok((self.report, partial))
            }
            Collected::Shares(_) => unreachable!("an edge's rounds collect updates"),
        }
    }
}

/// A model to evaluate: a round's candidate, or round 0's starting model.
pub struct EvaluateJob {
    pub round: u64,
    pub weights: Arc<Vec<f32>>,
    /// Also on every client's test text (the population figure).
    pub population: bool,
}

/// A job of the commit pipeline, for the host to run off the engine; its
/// result comes back as an event ([`crate::Engine::aggregated`],
/// [`crate::Engine::evaluated`], [`crate::Engine::persisted`], or
/// [`crate::Engine::job_failed`]).
pub enum CommitJob {
    Aggregate(AggregateJob),
    Evaluate(EvaluateJob),
    /// Save the commit durably (weights, strategy state, the record appended to
    /// the history); the round is the global model once that is done.
    Persist(Box<Commit>),
}

/// A round to save: everything a restart needs to resume after it.
#[derive(Debug, Clone)]
pub struct Commit {
    pub record: RoundRecord,
    pub weights: Arc<Vec<f32>>,
    pub state: StateRecord,
}

/// The model as rounds send it.
pub(crate) fn encode_model(weights: &[f32], encoding: folio_fed::Encoding) -> Arc<Vec<u8>> {
    Arc::new(codec::encode(weights, &[weights.len()], encoding))
}
