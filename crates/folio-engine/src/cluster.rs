//! A cluster's rounds: the root selects among the sessions its edges offer and
//! orders each round; each edge opens it for the sessions it holds and folds
//! their updates into one share; the root combines the shares, evaluates and
//! commits, and every edge adopts the commit.

use std::sync::Arc;
use std::time::{Duration, Instant};

use folio_fed::{OpenUpdates, Partial};
use folio_proto::ErrorCode;

use crate::engine::{Global, Phase};
use crate::error::EngineError;
use crate::jobs::{Collected, ShareJob, encode_model};
use crate::roles::{Edge, Output, Role, Root};
use crate::round::OpenRound;
use crate::{Engine, RoundRecord};

/// A root's order to its edges: who trains round `round` (attempt `attempt`),
/// from which model, clipped to what.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RoundOrder {
    pub round: u64,
    pub attempt: u32,
    /// The fingerprint of the global model the round trains.
    pub model: u64,
    /// `None`: no clipping.
    pub clip_bound: Option<f32>,
    /// Selected sessions, by the ids the root knows them by.
    pub sessions: Vec<u64>,
}

/// What an edge's share of a round says besides the folded deltas.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ShareReport {
    pub round: u64,
    pub attempt: u32,
    /// Selected sessions that reported, and those that left before they did.
    pub reported: Vec<u64>,
    pub dropped: Vec<u64>,
    /// Sums over the reported updates, weighted by their examples.
    pub loss_sum: f64,
    pub accuracy_sum: f64,
    pub examples: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

/// An edge needs no more than this after the deadline for its share to reach
/// the root: the root waits that much longer before it closes a round.
pub const SHARE_GRACE: Duration = Duration::from_secs(5);

/// A root's open round: the edges' shares so far, and the bound they clip to.
pub(crate) struct Shares {
    pub bound: Option<f32>,
    pub parts: Vec<Partial>,
}

impl<R: Role> Engine<R> {
    /// A root opens `round` for the selected sessions, on their edges.
    pub(crate) fn order_round(&mut self, round: u64, selected: Vec<u64>, now: Instant) {
        let bound = match self.strategy.ordered_bound(&self.global.state) {
            Ok(bound) => bound,
            Err(err) => {
                tracing::error!("no round can start: {err}");
                return;
            }
        };
        self.emit(Output::Order(RoundOrder {
            round,
            attempt: self.attempt,
            model: self.global.fingerprint,
            clip_bound: bound,
            sessions: selected.clone(),
        }));
        let mut start = self.round_start(round);
        start.weights = None;
        let shares = Collected::Shares(Shares {
            bound,
            parts: Vec::new(),
        });
        let selected = selected.into_iter().map(|s| (s, 0)).collect();
        let deadline = self.config.rounds.deadline + SHARE_GRACE;
        self.phase = Phase::Collecting(OpenRound::new(
            start,
            self.attempt,
            selected,
            shares,
            now,
            deadline,
        ));
    }
}

impl Engine<Root> {
    /// A root's rounds continue from the attempts a root before it ordered (the
    /// edges take the highest attempt of a round as the one that counts).
    pub fn resume_attempts(&mut self, attempt: u32) {
        self.attempt = self.attempt.max(attempt);
    }

    /// A root learns which sessions the edges hold (ids unique across edges).
    pub fn offer(&mut self, candidates: Vec<folio_fed::Candidate>, now: Instant) {
        self.offered = candidates;
        self.advance(now);
    }

    /// A root learns that the sessions `lost` names are gone (their edge died):
    /// those selected and still awaited count as dropped, so the round closes,
    /// or runs again, without waiting for its deadline.
    pub fn lose(&mut self, lost: impl Fn(u64) -> bool, now: Instant) {
        if let Phase::Collecting(open) = &mut self.phase {
            let gone: Vec<u64> = open
                .selected
                .iter()
                .copied()
                .filter(|&s| open.is_training(s) && lost(s))
                .collect();
            open.dropped.extend(gone);
        }
        self.advance(now);
    }

    /// A root takes an edge's share of the open round: refused (and nothing
    /// counted) unless it is for the open round's attempt and every session it
    /// names is still awaited.
    pub fn take_share(
        &mut self,
        report: ShareReport,
        part: Partial,
        now: Instant,
    ) -> Result<(), EngineError> {
        let Phase::Collecting(open) = &mut self.phase else {
            return Err(EngineError::new(ErrorCode::RoundClosed, "no round is open"));
        };
        if (report.round, report.attempt) != (open.round, open.attempt) {
            return Err(EngineError::new(
                ErrorCode::WrongRound,
                format!(
                    "a share of round {} attempt {}; round {} attempt {} is open",
                    report.round, report.attempt, open.round, open.attempt
                ),
            ));
        }
        if let Some(s) = report
            .reported
            .iter()
            .chain(&report.dropped)
            .find(|&&s| !open.is_training(s))
        {
            return Err(EngineError::new(
                ErrorCode::NotSelected,
                format!("the share names session {s}, which is not awaited"),
            ));
        }
        if part.updates != report.reported.len() {
            return Err(EngineError::new(
                ErrorCode::BadDelta,
                format!(
                    "the share folds {} updates but names {} reporters",
                    part.updates,
                    report.reported.len()
                ),
            ));
        }
        let Collected::Shares(shares) = &mut open.collected else {
            unreachable!("a root's rounds collect shares")
        };
        shares.parts.push(part);
        open.reported.extend(&report.reported);
        open.dropped.extend(&report.dropped);
        open.loss_sum += report.loss_sum;
        open.accuracy_sum += report.accuracy_sum;
        open.examples += report.examples;
        open.bytes_up += report.bytes_up;
        open.bytes_down += report.bytes_down;
        self.advance(now);
        Ok(())
    }
}

impl Engine<Edge> {
    /// An edge starts the round its root ordered, for the sessions it holds (a
    /// repeated order changes nothing; a later attempt replaces the open one).
    pub fn order(&mut self, order: &RoundOrder, now: Instant) -> Result<(), EngineError> {
        if order.model != self.global.fingerprint {
            return Err(EngineError::new(
                ErrorCode::WrongRound,
                format!(
                    "round {} trains model {:016x}; this edge holds {:016x}",
                    order.round, order.model, self.global.fingerprint
                ),
            ));
        }
        if let Phase::Collecting(open) = &self.phase {
            if (open.round, open.attempt) >= (order.round, order.attempt) {
                return Ok(());
            }
            self.abandon_round("was ordered again");
        }
        let updates: OpenUpdates = self
            .strategy
            .open_part(order.clip_bound, self.config.num_params())
            .map_err(|err| EngineError::new(ErrorCode::BadDelta, err.to_string()))?;
        let mine: Vec<u64> = order
            .sessions
            .iter()
            .copied()
            .filter(|&s| self.sessions.get(s).is_some())
            .collect();
        // Clients whose sum this edge revealed for this round are not drawn
        // again (a second sum of nearly the same updates would give one away):
        // the attempt gets an empty share at once.
        if self.revealed_round == Some(order.round) {
            let report = ShareReport {
                round: order.round,
                attempt: order.attempt,
                reported: Vec::new(),
                dropped: mine,
                loss_sum: 0.0,
                accuracy_sum: 0.0,
                examples: 0,
                bytes_up: 0,
                bytes_down: 0,
            };
            self.emit(Output::Share(ShareJob {
                report,
                strategy: self.strategy.clone(),
                collected: Collected::Updates(updates),
            }));
            return Ok(());
        }
        let bound = self.secure_bound(Ok(order.clip_bound))?;
        self.open_round(order.round, order.attempt, &mine, updates, bound, now);
        self.advance(now);
        Ok(())
    }

    /// An edge takes the root's commit of `record.round` as its global model.
    /// Records of rounds committed while this edge was not looking (NATS away,
    /// or rounds quicker than its polling), oldest first: each one that comes
    /// next in the history is appended, so the history stays whole before the
    /// next commit is adopted.
    pub fn fill_history(&mut self, missed: impl IntoIterator<Item = RoundRecord>) {
        for record in missed {
            if !self.history.is_empty() && record.round == self.completed_rounds() + 1 {
                self.history.push(record);
            }
        }
    }

    pub fn adopt(&mut self, record: RoundRecord, weights: Vec<f32>, now: Instant) {
        if record.round <= self.completed_rounds() && !self.history.is_empty() {
            return;
        }
        if matches!(&self.phase, Phase::Collecting(open) if open.round <= record.round) {
            self.abandon_round("was committed without this edge's share");
        }
        let encoded = encode_model(&weights, self.config.rounds.model_encoding);
        let state = self.global.state.clone();
        self.global = Global::new(Arc::new(weights), encoded, state, &self.config);
        self.announce(&record);
        self.history.push(record);
        self.advance(now);
    }
}
