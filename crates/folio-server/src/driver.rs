//! The round driver: open a round when the strategy finds clients, wait until it
//! may close, aggregate, evaluate, commit (weights, strategy state and history
//! together, on disk first), then tell everyone. Also expires old sessions.

use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::prelude::Device;
use folio_model::eval::evaluate;
use folio_model::{CharRnn, Metrics};

use crate::Shared;
use crate::federation::Deliveries;
use crate::record::{RoundRecord, model_hash};
use crate::round::RoundPhase;
use crate::state;

/// How often the driver looks at the open round.
const POLL: Duration = Duration::from_millis(20);

pub fn deliver(frames: Deliveries) {
    for (outbox, frame) in frames {
        outbox.send(frame);
    }
}

async fn evaluate_weights(shared: &Arc<Shared>, weights: Vec<f32>) -> anyhow::Result<Metrics> {
    let shared = shared.clone();
    tokio::task::spawn_blocking(move || {
        let model = CharRnn::from_flat(shared.config.preset.config(), &weights, &Device::flex())?;
        Ok(pollster::block_on(evaluate(&model, &shared.eval_batches))?)
    })
    .await?
}

/// Held-out metrics over every client's test split.
async fn evaluate_population(shared: &Arc<Shared>, weights: Vec<f32>) -> anyhow::Result<Metrics> {
    let shared = shared.clone();
    tokio::task::spawn_blocking(move || {
        let model = CharRnn::from_flat(shared.config.preset.config(), &weights, &Device::flex())?;
        Ok(pollster::block_on(folio_model::eval::evaluate_population(
            &model,
            &shared.population,
            64,
            usize::MAX,
            |_, _| {},
        ))?)
    })
    .await?
}

/// Evaluates the initial model and commits it as round 0 (a fresh state dir).
async fn commit_initial(shared: &Arc<Shared>) -> anyhow::Result<()> {
    let weights = shared.fed().weights.clone();
    let metrics = evaluate_weights(shared, weights.clone()).await?;
    let population = match shared.config.rounds.population_eval_every {
        Some(_) => Some(evaluate_population(shared, weights.clone()).await?),
        None => None,
    };
    let mut fed = shared.fed();
    let record = RoundRecord::initial(&metrics, population.as_ref(), &weights);
    let mut history = fed.history.clone();
    history.push(record);
    state::commit(
        &shared.config.state_dir,
        &weights,
        &fed.state,
        &history,
        shared.config.seed,
    )?;
    fed.history = history;
    Ok(())
}

/// Runs rounds until `max_rounds`; errors are printed, and the round retried.
pub async fn drive(shared: Arc<Shared>) {
    while shared.fed().history.is_empty() {
        if let Err(err) = commit_initial(&shared).await {
            eprintln!("error: committing the initial model: {err:#}; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    let mut last_sweep = Instant::now();
    loop {
        let completed = shared.fed().round - 1;
        if shared.config.max_rounds.is_some_and(|max| completed >= max) {
            return;
        }
        let sends = loop {
            let now = Instant::now();
            if now.duration_since(last_sweep) > Duration::from_secs(1) {
                shared.fed().expire_sessions(now);
                last_sweep = now;
            }
            if let Some(sends) = shared.fed().try_start_round(now) {
                break sends;
            }
            tokio::time::sleep(POLL).await;
        };
        deliver(sends);
        let phase = loop {
            let phase = shared.fed().round_phase(Instant::now());
            if phase != RoundPhase::Collecting {
                break phase;
            }
            tokio::time::sleep(POLL).await;
        };
        if phase == RoundPhase::Failed {
            deliver(shared.fed().abandon_round("closed without a quorum"));
            continue;
        }
        if let Err(err) = close_round(&shared).await {
            eprintln!("error: closing a round: {err:#}");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

async fn close_round(shared: &Arc<Shared>) -> anyhow::Result<()> {
    let closed = {
        let mut fed = shared.fed();
        match fed.aggregate_round(Instant::now()) {
            Ok((closed, notices)) => {
                deliver(notices);
                closed
            }
            Err(notices) => {
                deliver(notices);
                return Ok(());
            }
        }
    };
    let eval_started = Instant::now();
    let metrics = evaluate_weights(shared, closed.aggregated.weights.clone()).await?;
    let last = shared.config.max_rounds == Some(closed.round);
    let population = match shared.config.rounds.population_eval_every {
        Some(every) if last || closed.round.is_multiple_of(every.max(1)) => {
            Some(evaluate_population(shared, closed.aggregated.weights.clone()).await?)
        }
        _ => None,
    };
    let record = RoundRecord {
        round: closed.round,
        clients: closed.clients,
        train_loss: Some(closed.train_loss),
        train_accuracy: Some(closed.train_accuracy),
        eval_loss: metrics.loss,
        eval_accuracy: metrics.accuracy,
        bytes_up: closed.bytes_up,
        bytes_down: closed.bytes_down,
        seconds: closed.seconds + eval_started.elapsed().as_secs_f64(),
        clipped: closed.aggregated.clipped,
        // The bound this round clipped to (infinite, so not recorded, when off).
        clip_bound: Some(f64::from(shared.fed().state.clip_bound)).filter(|b| b.is_finite()),
        delta_norm: Some(closed.aggregated.median_norm),
        population_loss: population.map(|m| m.loss),
        population_accuracy: population.map(|m| m.accuracy),
        model_hash: model_hash(&closed.aggregated.weights),
    };
    let mut history = shared.fed().history.clone();
    history.push(record.clone());
    state::commit(
        &shared.config.state_dir,
        &closed.aggregated.weights,
        &closed.aggregated.state,
        &history,
        shared.config.seed,
    )?;
    deliver(shared.fed().commit(closed.aggregated, record));
    shared.completed.send_replace(closed.round);
    Ok(())
}
