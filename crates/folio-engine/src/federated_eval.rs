//! Federated evaluation: a candidate model, evaluated by the server (where it
//! has text), is measured by a sample of devices on the text they hold out
//! before it is committed. Devices train nothing; each answers sums (loss,
//! right predictions, characters), which the round's record adds up. A device
//! that does not answer by the deadline is left out, and a round with no
//! device to ask commits without the figure.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use folio_fed::sampling::sample_clients;
use folio_proto::{ErrorCode, Evaluate, Evaluation, ServerMessage};

use crate::engine::{Candidate, Phase};
use crate::error::EngineError;
use crate::jobs::{Commit, CommitJob};
use crate::record::FederatedEvaluation;
use crate::roles::{HoldsSessions, Output, Role};
use crate::{Engine, RoundRecord};

/// The most nats a device may say one character cost it: far above any model
/// worth measuring (a uniform guess over 86 characters costs 4.45).
const MAX_LOSS_PER_CHAR: f64 = 100.0;

/// A candidate model out with devices for measuring.
pub(crate) struct Asking {
    pub candidate: Candidate,
    pub record: RoundRecord,
    /// Asked and not answered (nor gone).
    pub waiting: BTreeSet<u64>,
    pub answers: BTreeMap<u64, Evaluation>,
    pub deadline: Instant,
}

impl<R: Role> Engine<R> {
    /// Commits `record` with `candidate` once it is saved (the persist job).
    pub(crate) fn persist(&mut self, candidate: Candidate, record: RoundRecord) {
        self.emit(Output::Job(CommitJob::Persist(Box::new(Commit {
            record: record.clone(),
            weights: candidate.weights.clone(),
            state: candidate.state.clone(),
        }))));
        self.phase = Phase::Persisting(candidate, record);
    }

    /// Asks a sample of the selectable devices to measure `candidate` when the
    /// round is due for it; else (or with nobody to ask) saves the commit.
    pub(crate) fn ask_devices_or_persist(
        &mut self,
        candidate: Candidate,
        record: RoundRecord,
        now: Instant,
    ) {
        let settings = self.config.rounds.federated_eval;
        // A secure round's devices measured its starting model already.
        let secure = self.config.rounds.secure.is_some();
        let due = |s: &crate::FederatedEval| R::HOLDS_SESSIONS && !secure && s.due(record.round);
        let Some(settings) = settings.filter(due) else {
            return self.persist(candidate, record);
        };
        let candidates: Vec<u64> = self
            .sessions
            .connected()
            .filter(|s| self.selectable(s.session))
            .map(|s| s.session)
            .collect();
        let seed = self.config.seed ^ 0xE7A1_0A7E;
        let asked = sample_clients(&candidates, settings.devices, seed, record.round);
        if asked.is_empty() {
            return self.persist(candidate, record);
        }
        let fingerprint =
            folio_proto::model_fingerprint(self.config.rounds.model_encoding, &candidate.encoded);
        let deadline_ms = settings.deadline.as_millis() as u64;
        let (mut holding, mut not_holding) = (Vec::new(), Vec::new());
        for &session in &asked {
            let Some(info) = self.sessions.get_mut(session) else {
                continue;
            };
            if info.held_model == Some(fingerprint) {
                holding.push(session);
            } else {
                not_holding.push(session);
            }
            info.held_model = Some(fingerprint);
        }
        let evaluate = |weights: Option<Vec<u8>>| {
            ServerMessage::Evaluate(Evaluate {
                round: record.round,
                model: fingerprint,
                weights,
                weights_encoding: self.config.rounds.model_encoding,
                deadline_ms,
                max_chars: settings.max_chars,
            })
        };
        let (with_weights, without) = (evaluate(Some(candidate.encoded.to_vec())), evaluate(None));
        self.send(not_holding, with_weights);
        self.send(holding, without);
        self.phase = Phase::Asking(Box::new(Asking {
            candidate,
            record,
            waiting: asked.into_iter().collect(),
            answers: BTreeMap::new(),
            deadline: now + settings.deadline,
        }));
    }

    /// Commits the model out with devices once every device asked answered (or
    /// left), or at the deadline, with what they answered.
    pub(crate) fn advance_asking(&mut self, now: Instant) {
        let done = matches!(&self.phase, Phase::Asking(asking)
            if asking.waiting.is_empty() || now >= asking.deadline);
        if !done {
            return;
        }
        let Phase::Asking(asking) = std::mem::replace(&mut self.phase, Phase::Idle) else {
            unreachable!("matched above")
        };
        let Asking {
            candidate,
            mut record,
            answers,
            ..
        } = *asking;
        record.federated = summed(record.round, answers.values());
        self.persist(candidate, record);
    }
}

/// The devices' answers added up; `None` when none measured a character.
fn summed<'a>(
    model_round: u64,
    answers: impl Iterator<Item = &'a Evaluation>,
) -> Option<FederatedEvaluation> {
    let (mut loss, mut correct, mut chars, mut devices) = (0.0, 0u64, 0u64, 0usize);
    for answer in answers {
        loss += answer.loss_sum;
        correct += answer.correct;
        chars += answer.chars;
        devices += 1;
    }
    (chars > 0).then(|| FederatedEvaluation {
        model_round,
        loss: loss / chars as f64,
        accuracy: correct as f64 / chars as f64,
        chars,
        devices,
    })
}

impl<R: HoldsSessions> Engine<R> {
    /// `session`'s answer to the evaluation it was asked for.
    pub fn evaluation(
        &mut self,
        session: u64,
        answer: Evaluation,
        now: Instant,
    ) -> Result<(), EngineError> {
        let max_chars = self
            .config
            .rounds
            .federated_eval
            .map_or(0, |settings| settings.max_chars);
        let Phase::Asking(asking) = &mut self.phase else {
            return Err(refused("no evaluation is under way"));
        };
        if asking.record.round != answer.round {
            return Err(refused(format!(
                "the evaluation under way is round {}'s, not round {}'s",
                asking.record.round, answer.round
            )));
        }
        if !asking.waiting.contains(&session) {
            return Err(refused(if asking.answers.contains_key(&session) {
                "this device answered already"
            } else {
                "this device was not asked to evaluate"
            }));
        }
        let loss_ok = answer.loss_sum.is_finite()
            && answer.loss_sum >= 0.0
            && answer.loss_sum <= answer.chars as f64 * MAX_LOSS_PER_CHAR;
        if answer.chars > max_chars || answer.correct > answer.chars || !loss_ok {
            asking.waiting.remove(&session);
            return Err(refused(format!(
                "an evaluation measures at most {max_chars} characters, gets at most as many right, \
                 and costs a finite loss of at most {MAX_LOSS_PER_CHAR} nats each"
            )));
        }
        asking.waiting.remove(&session);
        asking.answers.insert(session, answer);
        self.advance(now);
        Ok(())
    }
}

fn refused(why: impl Into<String>) -> EngineError {
    EngineError::new(ErrorCode::BadEvaluation, why)
}
