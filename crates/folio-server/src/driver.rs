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
use std::time::Instant;

use bytes::Bytes;
use folio_engine::{Action, Commit, Edge, EdgeAction, HoldsSessions, Whole};
use folio_proto::ServerMessage;
use tokio::sync::mpsc;

use crate::outbox::Outbox;
use folio_host::jobs;
use folio_host::state;

use crate::Shared;

/// What the dispatcher is told, in the engine's order.
pub enum Delivery<R: Served> {
    /// Frames for `session` go to this connection from now on.
    Connect(u64, Outbox),
    /// `session`'s connection is gone.
    Disconnect(u64),
    /// End `session`'s connection (an operator's revocation).
    Close(u64),
    Action(R::Action),
}

/// A role a server plays: one server, or a cluster's edge. Each carries out
/// exactly its own engine's actions.
pub trait Served: HoldsSessions + Sized {
    /// Starts `action`'s job; a message to send comes back to the dispatcher,
    /// which holds the connections' outboxes.
    fn carry(shared: &Arc<Shared<Self>>, action: Self::Action) -> Option<Frames>;
}

/// A message for some sessions.
pub struct Frames {
    to: Vec<u64>,
    message: Arc<ServerMessage>,
}

impl Served for Whole {
    fn carry(shared: &Arc<Shared<Self>>, action: Action) -> Option<Frames> {
        let job = match action {
            Action::Send { to, message } => return Some(Frames { to, message }),
            Action::Committed(record) => {
                folio_host::log_committed(&record, shared.release);
                shared.completed.send_replace(record.round);
                return None;
            }
            Action::Job(job) => job,
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let saver = shared.clone();
            let save = move |commit: Box<Commit>| async move {
                // Shutting down waits for a commit being saved.
                let _saving = saver.saving.read().await;
                let (dir, seed) = (saver.config.state_dir.clone(), saver.config.seed);
                tokio::task::spawn_blocking(move || state::commit(&dir, &commit, seed)).await??;
                Ok(())
            };
            let done = jobs::run(job, shared.evaluator.clone(), save).await;
            shared.engine(|e| done.apply(e, Instant::now()));
        });
        None
    }
}

impl Served for Edge {
    fn carry(shared: &Arc<Shared<Self>>, action: EdgeAction) -> Option<Frames> {
        match action {
            EdgeAction::Send { to, message } => return Some(Frames { to, message }),
            EdgeAction::Share(job) => {
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
        }
        None
    }
}

pub async fn dispatch<R: Served>(
    shared: Arc<Shared<R>>,
    mut deliveries: mpsc::UnboundedReceiver<Delivery<R>>,
) {
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
            Delivery::Action(action) => {
                let Some(Frames { to, message }) = R::carry(&shared, action) else {
                    continue;
                };
                let frame = encode(message).await;
                for session in to {
                    if let Some(outbox) = outboxes.get(&session) {
                        outbox.send(frame.clone());
                    }
                }
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

/// Wakes the engine at its timeouts (deadlines, session expiry).
pub async fn clock<R: Served>(shared: Arc<Shared<R>>) {
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
