//! The commit pipeline's heavy jobs (aggregating, evaluating, saving), run off
//! the engine on the blocking pool, their results handed back as one [`Done`].
//! One server and a cluster's root run them alike; only how a commit is saved
//! differs (a state file, JetStream).

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use folio_engine::{AggregateResult, Commit, CommitJob, Commits, Engine, EvaluateJob, Evaluation};

use crate::eval::Evaluator;

/// Runs `job`: evaluation with `evaluator`, saving with `save`. A job that
/// fails says why; the engine runs the round again after its `retry_after`.
pub async fn run<S, F>(job: CommitJob, evaluator: Arc<Evaluator>, save: S) -> Done
where
    S: FnOnce(Box<Commit>) -> F,
    F: Future<Output = anyhow::Result<()>>,
{
    match job {
        CommitJob::Aggregate(job) => {
            let round = job.round;
            match tokio::task::spawn_blocking(move || job.run()).await {
                Ok(result) => Done::Aggregated(result),
                Err(err) => Done::Failed(round, format!("aggregating: {err}")),
            }
        }
        CommitJob::Evaluate(EvaluateJob {
            round,
            weights,
            population,
        }) => {
            let evaluated =
                tokio::task::spawn_blocking(move || evaluator.evaluate(&weights, population)).await;
            match evaluated {
                Ok(Ok((eval, population))) => Done::Evaluated(round, eval, population),
                Ok(Err(err)) => Done::Failed(round, format!("evaluating: {err:#}")),
                Err(err) => Done::Failed(round, format!("evaluating: {err}")),
            }
        }
        CommitJob::Persist(commit) => {
            let round = commit.record.round;
            match save(commit).await {
                Ok(()) => Done::Persisted(round),
                Err(err) => Done::Failed(round, format!("saving: {err:#}")),
            }
        }
    }
}

/// What a job gave back.
pub enum Done {
    Aggregated(AggregateResult),
    Evaluated(u64, Evaluation, Option<Evaluation>),
    Persisted(u64),
    Failed(u64, String),
}

impl Done {
    /// Hands the result to the engine.
    pub fn apply<R: Commits>(self, engine: &mut Engine<R>, now: Instant) {
        match self {
            Done::Aggregated(result) => engine.aggregated(result, now),
            Done::Evaluated(round, eval, population) => {
                engine.evaluated(round, eval, population, now)
            }
            Done::Persisted(round) => engine.persisted(round, now),
            Done::Failed(round, why) => {
                tracing::error!(round, "{why}; the round runs again");
                engine.job_failed(round, now);
            }
        }
    }
}
