//! A synchronous round: opened for a sample of the connected sessions, each
//! sent the model and its plan; its updates taken once per selected session,
//! within what its text allows; closed on every update, or at the deadline with
//! a quorum; otherwise abandoned and drawn again without those who failed it.

use std::collections::BTreeMap;
use std::time::Instant;

use folio_fed::FedError;
use folio_proto::{ErrorCode, RoundStart, ServerMessage};

use crate::engine::{Closing, Phase};
use crate::error::EngineError;
use crate::jobs::{AggregateJob, Collected, CommitJob, ShareJob};
use crate::roles::{HoldsSessions, Output, Role};
use crate::round::OpenRound;
use crate::{DecodedUpdate, Engine, ShareReport};

/// Why the strategy refused an update, as the client is told.
pub(crate) fn refused_update(err: FedError) -> EngineError {
    match err {
        FedError::BadExamples { .. } => EngineError::new(ErrorCode::BadExamples, err.to_string()),
        _ => EngineError::new(ErrorCode::BadDelta, err.to_string()),
    }
}

/// `start` as a message due `deadline_ms` from now, its weights left out when the
/// client holds them.
pub(crate) fn round_message(start: &RoundStart, deadline_ms: u64, held: bool) -> ServerMessage {
    ServerMessage::RoundStart(RoundStart {
        round: start.round,
        model: start.model,
        weights: if held { None } else { start.weights.clone() },
        weights_encoding: start.weights_encoding,
        deadline_ms,
        local_epochs: start.local_epochs,
        max_batches: start.max_batches,
        optimizer: start.optimizer,
        learning_rate: start.learning_rate,
        clip_norm: start.clip_norm,
        delta_encoding: start.delta_encoding,
        seed: start.seed,
        secure: start.secure,
    })
}

impl<R: Role> Engine<R> {
    pub(crate) fn try_start_round(&mut self, now: Instant) {
        let round = self.completed_rounds() + 1;
        let candidates = if R::HOLDS_SESSIONS {
            self.sessions
                .connected()
                .filter(|s| self.drawable(s.session, now))
                .map(|s| self.candidate(s))
                .collect()
        } else {
            self.offered.clone()
        };
        let candidates = self.least_suspected(candidates, round, now);
        let Some(selected) =
            self.strategy
                .configure_round(round, self.attempt, &candidates, &self.failed)
        else {
            return;
        };
        if !R::HOLDS_SESSIONS {
            self.order_round(round, selected, now);
            return;
        }
        let updates = match self
            .strategy
            .open_round(&self.global.state, self.config.num_params())
        {
            Ok(updates) => updates,
            Err(err) => unreachable!("the strategy opens rounds on its own state: {err}"),
        };
        let bound = match self.secure_bound(self.strategy.ordered_bound(&self.global.state)) {
            Ok(bound) => bound,
            Err(why) => {
                tracing::error!("{why}");
                return;
            }
        };
        self.open_round(round, self.attempt, &selected, updates, bound, now);
    }

    /// What round `round`'s clients are sent (with the global model).
    pub(crate) fn round_start(&self, round: u64) -> RoundStart {
        let rounds = &self.config.rounds;
        let seed = self.config.seed ^ round;
        let plan = rounds.plan(seed);
        RoundStart {
            round,
            model: self.global.fingerprint,
            weights: Some(self.global.encoded.as_ref().clone()),
            weights_encoding: rounds.model_encoding,
            deadline_ms: rounds.deadline.as_millis() as u64,
            local_epochs: plan.local_epochs,
            max_batches: plan.max_batches,
            optimizer: rounds.client_optimizer,
            learning_rate: rounds.client_lr_at(round),
            clip_norm: rounds.clip_norm,
            delta_encoding: rounds.delta_encoding,
            seed,
            secure: None,
        }
    }

    /// Starts `round` for the `selected` sessions that are still known (those
    /// not connected count as dropped): each is sent the round. A secure
    /// round's clients clip to `secure_bound`.
    pub(crate) fn open_round(
        &mut self,
        round: u64,
        attempt: u32,
        selected: &[u64],
        updates: folio_fed::OpenUpdates,
        secure_bound: Option<f32>,
        now: Instant,
    ) {
        let mut start = self.round_start(round);
        let plan = self.config.rounds.plan(start.seed);
        let allowed_examples: BTreeMap<u64, u64> = selected
            .iter()
            .filter_map(|&s| {
                let client = &self.sessions.get(s)?.client_id;
                Some((s, plan.max_examples(self.text_size(client))))
            })
            .collect();
        let secure = match (self.config.rounds.secure, secure_bound) {
            (Some(settings), Some(bound)) => {
                match self.open_secure(round, &settings, &allowed_examples, bound, now) {
                    Ok(secure) => {
                        start.secure = Some(secure.spec);
                        Some(secure)
                    }
                    Err(err) => {
                        tracing::error!("no secure round can start: {err}");
                        return;
                    }
                }
            }
            _ => None,
        };
        let away = self.hand_out(&start, allowed_examples.keys().copied());
        let deadline = self.config.rounds.deadline;
        let collected = Collected::Updates(updates);
        let mut open = OpenRound::new(start, attempt, allowed_examples, collected, now, deadline);
        if let Some(mut secure) = secure {
            for &session in &away {
                secure.server.leave(session);
                secure.left.insert(session);
            }
            open.secure = Some(secure);
        }
        open.dropped.extend(away);
        self.phase = Phase::Collecting(open);
    }

    /// Sends `start` to each of `sessions` that is connected, without the model
    /// to those that hold it already (a retried round, a reloaded tab); returns
    /// those not connected. Synchronous rounds and asynchronous tasks alike.
    pub(crate) fn hand_out(
        &mut self,
        start: &RoundStart,
        sessions: impl IntoIterator<Item = u64>,
    ) -> Vec<u64> {
        let (mut with, mut without, mut away) = (Vec::new(), Vec::new(), Vec::new());
        for s in sessions {
            let Some(info) = self.sessions.get_mut(s).filter(|info| info.connected) else {
                away.push(s);
                continue;
            };
            if info.held_model == Some(start.model) {
                without.push(s);
            } else {
                with.push(s);
            }
            info.held_model = Some(start.model);
        }
        for (to, held) in [(with, false), (without, true)] {
            self.send(to, round_message(start, start.deadline_ms, held));
        }
        away
    }

    /// Ends a round that cannot close: nothing changes, the selected clients that
    /// did not report are told, and the round runs again with a fresh sample that
    /// avoids them.
    pub(crate) fn abandon_round(&mut self, why: &str) {
        let Phase::Collecting(open) = std::mem::replace(&mut self.phase, Phase::Idle) else {
            return;
        };
        let failed: Vec<u64> = open.failed().collect();
        self.failed.extend(failed.iter().copied());
        self.attempt += 1;
        self.send(
            failed,
            EngineError::new(
                ErrorCode::RoundClosed,
                format!("round {} {why}; it will run again", open.round),
            ),
        );
    }

    /// Closes the open round: its updates go out to be aggregated (an edge's:
    /// folded into its share for the root).
    pub(crate) fn close_round(&mut self) {
        let Phase::Collecting(mut open) = std::mem::replace(&mut self.phase, Phase::Idle) else {
            return;
        };
        // A secure round's updates are its sum, once unmasked.
        if let Some(sum) = open.secure.take().and_then(|secure| secure.into_sum()) {
            open.reported = sum.contributors.iter().copied().collect();
            open.collected = Collected::SecureSum(Box::new(sum.sum));
        }
        let late: Vec<u64> = open
            .failed()
            .filter(|s| !open.dropped.contains(s))
            .collect();
        self.send(
            late,
            EngineError::new(
                ErrorCode::RoundClosed,
                format!(
                    "round {} closed on quorum; your update will be ignored",
                    open.round
                ),
            ),
        );
        if !R::COMMITS {
            if matches!(open.collected, Collected::SecureSum(_)) && !open.reported.is_empty() {
                self.revealed_round = Some(open.round);
            }
            let report = ShareReport {
                round: open.round,
                attempt: open.attempt,
                reported: open.reported.iter().copied().collect(),
                dropped: open.failed().collect(),
                loss_sum: open.loss_sum,
                accuracy_sum: open.accuracy_sum,
                examples: open.examples,
                bytes_up: open.bytes_up,
                bytes_down: open.bytes_down,
            };
            self.emit(Output::Share(ShareJob {
                report,
                strategy: self.strategy.clone(),
                collected: open.collected,
            }));
            return;
        }
        // If the round fails after all, its retry avoids everyone selected: the
        // late, and the reporters who share the blame for a bad aggregate.
        self.failed.extend(open.selected.iter().copied());
        let examples = open.examples.max(1) as f64;
        let closing = Closing {
            round: open.round,
            clients: open.reported.len(),
            train_loss: Some(open.loss_sum / examples),
            train_accuracy: Some(open.accuracy_sum / examples),
            examples: open.examples,
            bytes_up: open.bytes_up,
            bytes_down: open.bytes_down,
            started: open.started,
            secure: matches!(open.collected, Collected::SecureSum(_)),
            staleness: None,
            federated: None,
            contributors: match open.collected {
                Collected::SecureSum(_) => open.reported.iter().copied().collect(),
                _ => Vec::new(),
            },
        };
        self.aggregate(closing, open.collected);
    }

    /// Hands a closed round's (or a full buffer's) updates to the host.
    pub(crate) fn aggregate(&mut self, closing: Closing, collected: Collected) {
        self.emit(Output::Job(CommitJob::Aggregate(AggregateJob {
            round: closing.round,
            strategy: self.strategy.clone(),
            collected,
            weights: self.global.weights.clone(),
            state: self.global.state.clone(),
            model_encoding: self.config.rounds.model_encoding,
        })));
        self.phase = Phase::Aggregating(closing);
    }
}

impl<R: HoldsSessions> Engine<R> {
    /// Until when `session` may stay silent: while it trains in the open round
    /// (or a secure round waits for its step), the round's deadline; while it
    /// holds an asynchronous task, the task's.
    pub fn silent_until(&self, session: u64) -> Option<Instant> {
        if let Some(buffered) = &self.buffered {
            return buffered.tasks.get(&session).map(|t| t.deadline);
        }
        match &self.phase {
            Phase::Collecting(open)
                if open
                    .secure
                    .as_ref()
                    .is_some_and(|s| s.server.awaits(session)) =>
            {
                open.secure
                    .as_ref()
                    .map(|s| s.step_deadline.max(open.deadline))
            }
            Phase::Collecting(open) if open.is_training(session) => Some(open.deadline),
            _ => None,
        }
    }

    /// Whether `session` may send an update for `round` now, and the encoding its
    /// delta must have: checked before the delta is decoded.
    pub fn expected_update(
        &self,
        session: u64,
        round: u64,
    ) -> Result<folio_fed::Encoding, EngineError> {
        if self.buffered.is_some() {
            return self
                .expected_async(session, round)
                .map(|_| self.config.rounds.delta_encoding);
        }
        let Phase::Collecting(open) = &self.phase else {
            return Err(EngineError::new(
                ErrorCode::RoundClosed,
                format!("no round is open; update for round {round} ignored"),
            ));
        };
        if round != open.round {
            let code = if round < open.round {
                ErrorCode::RoundClosed
            } else {
                ErrorCode::WrongRound
            };
            return Err(EngineError::new(
                code,
                format!("update for round {round}, the open round is {}", open.round),
            ));
        }
        if open.reported.contains(&session) {
            return Err(EngineError::new(
                ErrorCode::DuplicateUpdate,
                format!("a second update for round {}", open.round),
            ));
        }
        if !open.is_training(session) {
            return Err(EngineError::new(
                ErrorCode::NotSelected,
                format!("this client was not selected for round {}", open.round),
            ));
        }
        if open.secure.is_some() {
            return Err(EngineError::new(
                ErrorCode::BadSecureStep,
                format!(
                    "round {} is secure: its updates come masked, through its steps",
                    open.round
                ),
            ));
        }
        Ok(open.encoding)
    }

    /// Folds one client's update into the open round (or the asynchronous
    /// buffer), or says why not. A refused update changes nothing.
    pub fn update(
        &mut self,
        session: u64,
        update: DecodedUpdate,
        now: Instant,
    ) -> Result<(), EngineError> {
        self.expected_update(session, update.round)?;
        if !update.metrics_in_range() {
            return Err(EngineError::new(
                ErrorCode::BadDelta,
                "train metrics out of range (loss ≥ 0, accuracy in [0, 1], seconds ≥ 0)",
            ));
        }
        if self.buffered.is_some() {
            return self.buffer_update(session, update, now);
        }
        let Phase::Collecting(open) = &mut self.phase else {
            unreachable!("checked above")
        };
        let Collected::Updates(updates) = &mut open.collected else {
            unreachable!("a plain round collects updates")
        };
        let allowed = open.allowed_examples.get(&session).copied().unwrap_or(0);
        self.strategy
            .accept(updates, &update.delta, update.examples, allowed)
            .map_err(refused_update)?;
        // Bounded by `allowed`, so none of these sums can overflow.
        open.reported.insert(session);
        let examples = update.examples as f64;
        open.loss_sum += f64::from(update.train_loss) * examples;
        open.accuracy_sum += f64::from(update.train_accuracy) * examples;
        open.examples += update.examples;
        if let Some(info) = self.sessions.get_mut(session) {
            info.reported(update.client_round());
        }
        self.advance(now);
        Ok(())
    }
}
