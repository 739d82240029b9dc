//! The commit pipeline, the one way a model becomes the global one: a closed
//! round is aggregated, the candidate evaluated, the commit saved durably, and
//! only then adopted. One [`RoundRecord`] per round, made in one place. A job
//! that fails runs the round again on the same global model.

use std::sync::Arc;
use std::time::Instant;

use folio_proto::{ErrorCode, RoundResult, ServerMessage};

use crate::cluster::Shares;
use crate::engine::{Candidate, Closing, Global, Phase};
use crate::jobs::{Collected, CommitJob, EvaluateJob};
use crate::roles::{Commits, Output, Role};
use crate::{AggregateResult, Engine, Evaluation, RoundRecord, model_hash};

impl<R: Role> Engine<R> {
    /// Round 0: the starting model is evaluated and committed before any round.
    pub(crate) fn evaluate_start(&mut self, now: Instant) {
        self.evaluate(Closing::initial(now), self.unchanged());
    }

    /// The global model as it is, as a round's outcome.
    fn unchanged(&self) -> Candidate {
        Candidate {
            weights: self.global.weights.clone(),
            encoded: self.global.encoded.clone(),
            state: self.global.state.clone(),
            clip_bound: None,
            clipped: 0,
            median_norm: None,
        }
    }

    pub(crate) fn evaluate(&mut self, closing: Closing, candidate: Candidate) {
        let round = closing.round;
        let last = self.config.max_rounds == Some(round);
        let population = self
            .config
            .rounds
            .population_eval_every
            .is_some_and(|every| round == 0 || last || round.is_multiple_of(every.max(1)));
        self.emit(Output::Job(CommitJob::Evaluate(EvaluateJob {
            round,
            weights: candidate.weights.clone(),
            population,
        })));
        self.phase = Phase::Evaluating(closing, candidate);
    }

    /// Tells every connected session that round `record.round` is committed.
    pub(crate) fn announce(&mut self, record: &RoundRecord) {
        if record.round == 0 {
            return;
        }
        let everyone: Vec<u64> = self.sessions.connected().map(|s| s.session).collect();
        self.send(
            everyone,
            ServerMessage::RoundResult(RoundResult {
                round: record.round,
                clients: record.clients as u32,
                eval_loss: record.eval_loss as f32,
                eval_accuracy: record.eval_accuracy as f32,
            }),
        );
    }
}

impl<R: Commits> Engine<R> {
    /// A closed round's aggregation finished.
    pub fn aggregated(&mut self, result: AggregateResult, now: Instant) {
        if !matches!(&self.phase, Phase::Aggregating(closing) if closing.round == result.round) {
            return;
        }
        let Phase::Aggregating(mut closing) = std::mem::replace(&mut self.phase, Phase::Idle)
        else {
            unreachable!("matched above")
        };
        if let Some(metrics) = result.secure {
            let weight = metrics.weight.max(f64::MIN_POSITIVE);
            // Under distributed DP the devices send no figure of their own.
            let summed = self.device_noise.is_none();
            closing.train_loss = summed.then(|| metrics.loss_sum / weight);
            closing.train_accuracy = summed.then(|| metrics.accuracy_sum / weight);
            closing.examples = metrics.examples;
            let held_out = metrics.held_out;
            closing.federated = (held_out.chars >= 0.5).then(|| crate::FederatedEvaluation {
                model_round: closing.round.saturating_sub(1),
                loss: held_out.loss_sum / held_out.chars,
                accuracy: held_out.correct / held_out.chars,
                chars: held_out.chars.round() as u64,
                devices: closing.clients,
            });
        }
        self.judge_contributors(&closing.contributors, result.result.is_ok(), now);
        match result.result {
            Ok((aggregated, encoded)) => {
                let candidate = Candidate {
                    weights: Arc::new(aggregated.weights),
                    encoded,
                    state: aggregated.state,
                    clip_bound: aggregated.clip_bound,
                    clipped: aggregated.clipped,
                    // A secure round's single deltas, and so their norms, are hidden.
                    median_norm: Some(aggregated.median_norm).filter(|_| !closing.secure),
                };
                self.evaluate(closing, candidate);
            }
            Err(err) => {
                self.count_error(ErrorCode::BadDelta);
                // A secure sum, once unmasked, and a DP round's sample are never
                // drawn again: a retry over the same clients would reveal
                // another sum of nearly the same updates (their difference one
                // client's), or sample them above q.
                let drawn_once = self.config.rounds.secure.is_some() || self.is_dp();
                if drawn_once && closing.clients > 0 {
                    tracing::warn!(
                        round = closing.round,
                        "the round's sum is refused ({err}); it commits without it"
                    );
                    self.commit_without_updates(closing);
                } else {
                    // Every reporter shares the blame: the retry avoids them all.
                    self.attempt += 1;
                    tracing::warn!(round = closing.round, "round dropped: {err}");
                    self.advance(now);
                }
            }
        }
    }

    /// Commits a round without its updates: under DP its noise alone (the
    /// round is charged), otherwise the model unchanged.
    fn commit_without_updates(&mut self, mut closing: Closing) {
        closing.clients = 0;
        closing.train_loss = None;
        closing.train_accuracy = None;
        closing.examples = 0;
        closing.federated = None;
        closing.contributors.clear();
        if !self.is_dp() {
            let unchanged = self.unchanged();
            self.evaluate(closing, unchanged);
            return;
        }
        let nothing = if R::HOLDS_SESSIONS {
            match self
                .strategy
                .open_round(&self.global.state, self.config.num_params())
            {
                Ok(updates) => Collected::Updates(updates),
                Err(err) => unreachable!("the strategy opens rounds on its own state: {err}"),
            }
        } else {
            Collected::Shares(Shares {
                bound: None,
                parts: Vec::new(),
            })
        };
        self.aggregate(closing, nothing);
    }

    /// A candidate model was evaluated: the round's record is made and saved.
    pub fn evaluated(
        &mut self,
        round: u64,
        eval: Evaluation,
        population: Option<Evaluation>,
        now: Instant,
    ) {
        if !matches!(&self.phase, Phase::Evaluating(closing, _) if closing.round == round) {
            return;
        }
        let Phase::Evaluating(closing, candidate) = std::mem::replace(&mut self.phase, Phase::Idle)
        else {
            unreachable!("matched above")
        };
        // The one place a round's record is made.
        let record = RoundRecord {
            round,
            clients: closing.clients,
            train_loss: closing.train_loss,
            train_accuracy: closing.train_accuracy,
            examples: closing.examples,
            eval_loss: eval.loss,
            eval_accuracy: eval.accuracy,
            bytes_up: closing.bytes_up,
            bytes_down: closing.bytes_down,
            seconds: if round == 0 {
                0.0
            } else {
                now.saturating_duration_since(closing.started).as_secs_f64()
            },
            clipped: candidate.clipped,
            clip_bound: candidate.clip_bound,
            delta_norm: candidate.median_norm,
            population_loss: population.map(|m| m.loss),
            population_accuracy: population.map(|m| m.accuracy),
            model_hash: model_hash(&candidate.weights),
            epsilon: self.strategy.privacy(&candidate.state).map(|p| p.epsilon),
            secure: closing.secure,
            staleness: closing.staleness,
            federated: closing.federated,
        };
        self.ask_devices_or_persist(candidate, record, now);
    }

    /// A commit is durable: its round becomes the global model.
    pub fn persisted(&mut self, round: u64, now: Instant) {
        if !matches!(&self.phase, Phase::Persisting(_, record) if record.round == round) {
            return;
        }
        let Phase::Persisting(candidate, record) = std::mem::replace(&mut self.phase, Phase::Idle)
        else {
            unreachable!("matched above")
        };
        self.global = Global::new(
            candidate.weights,
            candidate.encoded,
            candidate.state,
            &self.config,
        );
        self.attempt = 0;
        self.failed.clear();
        self.announce(&record);
        self.history.push(record.clone());
        self.emit(Output::Committed(Box::new(record)));
        self.next_model_for_tasks();
        self.advance(now);
    }

    /// A job for `round` failed (evaluation, saving): after the config's
    /// `retry_after`, the round runs again on the same global model (round 0 is
    /// evaluated again).
    pub fn job_failed(&mut self, round: u64, now: Instant) {
        let current = match &self.phase {
            Phase::Aggregating(closing) | Phase::Evaluating(closing, _) => closing.round,
            Phase::Persisting(_, record) => record.round,
            _ => return,
        };
        if current != round {
            return;
        }
        let phase = std::mem::replace(&mut self.phase, Phase::Idle);
        let redo = if self.history.is_empty() {
            Some(Box::new(match phase {
                Phase::Evaluating(closing, candidate) => (closing, candidate),
                Phase::Persisting(candidate, _) => (Closing::initial(now), candidate),
                _ => unreachable!("round 0 is never aggregated"),
            }))
        } else {
            self.attempt += 1;
            None
        };
        self.phase = Phase::Resting {
            until: now + self.config.retry_after,
            redo,
        };
        self.advance(now);
    }
}
