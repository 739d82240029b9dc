//! Carries out the engine's actions and keeps its clock, never blocking it:
//!
//! - the **dispatcher** takes actions in the order the engine queued them; it
//!   encodes each message once (off the async workers when it carries a model)
//!   and queues it on the recipients' outboxes, and hands every heavy job
//!   (aggregating, evaluating, saving) to a task of its own on the blocking pool,
//!   whose result goes back to the engine as an event;
//! - the **clock** sleeps until the engine's next timeout, or until an event may
//!   have moved it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use folio_engine::{Action, Commit};
use folio_proto::ServerMessage;
use tokio::sync::mpsc;

use crate::outbox::Outbox;
use crate::{Shared, state};

/// What the dispatcher is told, in the engine's order.
pub enum Delivery {
    /// Frames for `session` go to this connection from now on.
    Connect(u64, Outbox),
    /// `session`'s connection is gone.
    Disconnect(u64),
    /// End `session`'s connection (an operator's revocation).
    Close(u64),
    Action(Action),
}

/// After a failed job, this long before the engine retries it.
const RETRY_AFTER: Duration = Duration::from_secs(1);

pub async fn dispatch(shared: Arc<Shared>, mut deliveries: mpsc::UnboundedReceiver<Delivery>) {
    let mut outboxes: HashMap<u64, Outbox> = HashMap::new();
    while let Some(delivery) = deliveries.recv().await {
        match delivery {
            Delivery::Connect(session, outbox) => {
                outboxes.insert(session, outbox);
            }
            Delivery::Disconnect(session) => {
                outboxes.remove(&session);
            }
            Delivery::Close(session) => {
                if let Some(outbox) = outboxes.remove(&session) {
                    outbox.close();
                }
            }
            Delivery::Action(Action::Send { to, message }) => {
                let frame = encode(message).await;
                for session in to {
                    if let Some(outbox) = outboxes.get(&session) {
                        outbox.send(frame.clone());
                    }
                }
            }
            Delivery::Action(Action::Aggregate(job)) => {
                let shared = shared.clone();
                tokio::spawn(async move {
                    let round = job.round;
                    match tokio::task::spawn_blocking(move || job.run()).await {
                        Ok(result) => shared.engine(|e| e.aggregated(result, Instant::now())),
                        Err(err) => failed(&shared, round, &format!("aggregating: {err}")).await,
                    }
                });
            }
            Delivery::Action(Action::Evaluate {
                round,
                weights,
                population,
            }) => {
                let shared = shared.clone();
                tokio::spawn(async move {
                    let evaluator = shared.evaluator.clone();
                    let evaluated = tokio::task::spawn_blocking(move || {
                        evaluator.evaluate(&weights, population)
                    })
                    .await;
                    match evaluated {
                        Ok(Ok((eval, population))) => {
                            shared.engine(|e| e.evaluated(round, eval, population, Instant::now()))
                        }
                        Ok(Err(err)) => {
                            failed(&shared, round, &format!("evaluating: {err:#}")).await
                        }
                        Err(err) => failed(&shared, round, &format!("evaluating: {err}")).await,
                    }
                });
            }
            Delivery::Action(Action::Part(job)) => {
                let shared = shared.clone();
                tokio::spawn(async move {
                    let round = job.report.round;
                    match tokio::task::spawn_blocking(move || job.run()).await {
                        Ok(Ok(part)) => {
                            if let Some(parts) = &shared.parts {
                                let _ = parts.send(part);
                            }
                        }
                        Ok(Err(err)) => tracing::error!(round, "folding the share: {err}"),
                        Err(err) => tracing::error!(round, "folding the share: {err}"),
                    }
                });
            }
            Delivery::Action(Action::Order(order)) => {
                tracing::error!(
                    round = order.round,
                    "a server orders no rounds: only a root does"
                );
            }
            Delivery::Action(Action::Persist(commit)) => {
                let shared = shared.clone();
                tokio::spawn(async move { persist(shared, commit).await });
            }
            Delivery::Action(Action::Committed(record)) => {
                crate::log_committed(&record);
                shared.completed.send_replace(record.round);
            }
        }
    }
}

/// A message as a frame; one that carries a model is encoded on the blocking pool.
async fn encode(message: Arc<ServerMessage>) -> Bytes {
    let heavy =
        matches!(message.as_ref(), ServerMessage::RoundStart(start) if start.weights.is_some());
    if heavy {
        let encoded =
            tokio::task::spawn_blocking(move || Bytes::from(folio_proto::encode(message.as_ref())))
                .await;
        encoded.expect("encoding a message does not panic")
    } else {
        Bytes::from(folio_proto::encode(message.as_ref()))
    }
}

async fn persist(shared: Arc<Shared>, commit: Box<Commit>) {
    let _saving = shared.saving.read().await;
    let round = commit.record.round;
    let dir = shared.config.state_dir.clone();
    let seed = shared.config.seed;
    let saved = tokio::task::spawn_blocking(move || state::commit(&dir, &commit, seed)).await;
    match saved {
        Ok(Ok(_)) => shared.engine(|e| e.persisted(round, Instant::now())),
        Ok(Err(err)) => failed(&shared, round, &format!("saving: {err:#}")).await,
        Err(err) => failed(&shared, round, &format!("saving: {err}")).await,
    }
}

async fn failed(shared: &Shared, round: u64, why: &str) {
    tracing::error!(round, "{why}; the round runs again");
    tokio::time::sleep(RETRY_AFTER).await;
    shared.engine(|e| e.job_failed(round, Instant::now()));
}

/// Wakes the engine at its timeouts (deadlines, session expiry).
pub async fn clock(shared: Arc<Shared>) {
    loop {
        let due = shared.read(|e| e.poll_timeout());
        let woken = shared.wake.notified();
        match due {
            Some(due) => {
                tokio::select! {
                    () = tokio::time::sleep_until(tokio::time::Instant::from_std(due)) => {
                        shared.engine(|e| e.handle_timeout(Instant::now()));
                    }
                    () = woken => {}
                }
            }
            None => woken.await,
        }
    }
}
