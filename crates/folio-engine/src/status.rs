//! Where a federation stands, for people and pages: a typed snapshot whose size
//! depends on the sessions held, never on the rounds run (the history is read
//! page by page with [`crate::Engine::history`]).

use std::collections::BTreeMap;
use std::time::Instant;

use folio_fed::PrivacySpent;
use serde::Serialize;

use crate::engine::Phase;
use crate::roles::Role;
use crate::sessions::{DeviceCheck, SessionInfo};
use crate::{Engine, RoundRecord};

/// Sessions a status lists at most: its size stays bounded however many
/// devices the aggregator holds.
pub const STATUS_SESSIONS: usize = 200;

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub preset: String,
    pub parameters: usize,
    pub next_round: u64,
    pub completed_rounds: u64,
    /// What the engine is doing: waiting for clients, training, aggregating,
    /// evaluating, saving, finished.
    pub phase: &'static str,
    pub open_round: Option<OpenRoundStatus>,
    /// The last committed round's record.
    pub latest: Option<RoundRecord>,
    /// Records `/api/history` holds (round 0 included).
    pub history_len: usize,
    pub connected: usize,
    /// Sessions held, connected or waiting to be resumed.
    pub sessions: usize,
    /// At most [`STATUS_SESSIONS`] of them: those in the open round first,
    /// then the newest.
    pub clients: Vec<SessionInfo>,
    pub errors: BTreeMap<&'static str, u64>,
    pub config: ConfigStatus,
    /// What the committed rounds cost in privacy (DP-FedAvg only).
    pub privacy: Option<PrivacySpent>,
    /// Why training stopped before its last round (a privacy budget spent).
    pub stopped: Option<String>,
    /// Asynchronous rounds' buffer and tasks (`None`: synchronous rounds).
    pub asynchronous: Option<AsyncStatus>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AsyncStatus {
    /// Updates in the buffer, of the `buffer` that step the model.
    pub buffered: usize,
    pub buffer: usize,
    pub max_staleness: u64,
    /// Sessions training now, and the round whose model each trains.
    pub training: Vec<(u64, u64)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct OpenRoundStatus {
    pub round: u64,
    pub attempt: u32,
    pub seconds_left: f64,
    pub deadline_seconds: f64,
    pub selected: usize,
    pub reported: usize,
    pub selected_sessions: Vec<u64>,
    pub reported_sessions: Vec<u64>,
    pub dropped_sessions: Vec<u64>,
    /// A secure round's step under way (keys, shares, masked input, unmasking).
    pub secure_step: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConfigStatus {
    pub clients_per_round: usize,
    pub min_clients: usize,
    pub quorum: usize,
    /// The strategy's own description: its name, clipping, aggregation, server
    /// optimizer.
    pub strategy: BTreeMap<&'static str, String>,
    pub deadline_seconds: f64,
    pub local_epochs: u32,
    pub max_batches: Option<u32>,
    pub client_lr: f32,
    pub delta_encoding: String,
    pub max_rounds: Option<u64>,
    /// Secure aggregation's settings, when rounds are secure.
    pub secure: Option<crate::SecureRounds>,
    /// Where devices' text comes from: `shakespeare` (handed out) or `device`
    /// (their own).
    pub data: &'static str,
    /// Federated evaluation's settings, when devices evaluate.
    pub federated_eval: Option<crate::FederatedEval>,
}

/// Sessions held, connected, and by where their device check stands.
#[derive(Debug, Clone, Default)]
pub struct SessionCounts {
    pub held: usize,
    pub connected: usize,
    pub checks: BTreeMap<&'static str, usize>,
}

impl<R: Role> Engine<R> {
    /// Every session counted (the status lists only some).
    /// Connected sessions in all, and of `group`: what a newcomer from that
    /// group competes with.
    pub fn connected_sessions(&self, group: u64) -> (usize, usize) {
        self.sessions
            .connected()
            .fold((0, 0), |(all, of_group), s| {
                (all + 1, of_group + usize::from(s.group == group))
            })
    }

    pub fn session_counts(&self) -> SessionCounts {
        let mut counts = SessionCounts {
            held: self.sessions.len(),
            ..SessionCounts::default()
        };
        for session in self.sessions.iter() {
            counts.connected += usize::from(session.connected);
            let verdict = match session.check {
                DeviceCheck::Unchecked => "unchecked",
                DeviceCheck::Pending => "pending",
                DeviceCheck::Passed => "passed",
                DeviceCheck::Failed(_) => "failed",
            };
            *counts.checks.entry(verdict).or_default() += 1;
        }
        counts
    }

    /// The sessions a status lists: the open round's first, then the newest.
    fn listed_sessions(&self) -> Vec<SessionInfo> {
        let in_round: std::collections::BTreeSet<u64> = match &self.phase {
            Phase::Collecting(open) => open.selected.clone(),
            _ => Default::default(),
        };
        let first = in_round.iter().filter_map(|&s| self.sessions.get(s));
        let rest = self
            .sessions
            .iter()
            .rev()
            .filter(|s| !in_round.contains(&s.session));
        first.chain(rest).take(STATUS_SESSIONS).cloned().collect()
    }

    pub fn status(&self, now: Instant) -> Status {
        let rounds = &self.config.rounds;
        let next_round = self.completed_rounds() + 1;
        let open_round = match &self.phase {
            Phase::Collecting(open) => Some(OpenRoundStatus {
                round: open.round,
                attempt: open.attempt,
                seconds_left: open.seconds_left(now).as_secs_f64(),
                deadline_seconds: rounds.deadline.as_secs_f64(),
                selected: open.selected.len(),
                reported: open.reported.len(),
                selected_sessions: open.selected.iter().copied().collect(),
                reported_sessions: open.reported.iter().copied().collect(),
                dropped_sessions: open.dropped.iter().copied().collect(),
                secure_step: open.secure.as_ref().map(|s| s.server.stage().name()),
            }),
            _ => None,
        };
        Status {
            preset: self.config.preset.clone(),
            parameters: self.config.num_params(),
            next_round,
            completed_rounds: self.completed_rounds(),
            phase: match (&self.phase, &self.buffered) {
                (Phase::Idle, Some(_)) => "training",
                (phase, _) => phase.name(),
            },
            open_round,
            latest: self.history.last().cloned(),
            history_len: self.history.len(),
            connected: self.sessions.connected().count(),
            sessions: self.sessions.len(),
            clients: self.listed_sessions(),
            errors: self.errors.clone(),
            config: ConfigStatus {
                clients_per_round: rounds.strategy.clients_per_round,
                min_clients: self.strategy.min_clients(),
                quorum: self.strategy.quorum(),
                strategy: self.strategy.describe(),
                deadline_seconds: rounds.deadline.as_secs_f64(),
                local_epochs: rounds.local_epochs,
                max_batches: rounds.max_batches,
                client_lr: rounds.client_lr_at(next_round),
                delta_encoding: format!("{:?}", rounds.delta_encoding),
                max_rounds: self.config.max_rounds,
                secure: rounds.secure,
                data: self.config.data.name(),
                federated_eval: rounds.federated_eval,
            },
            privacy: self.strategy.privacy(&self.global.state),
            stopped: self.stopped.clone(),
            asynchronous: self.buffered.as_ref().map(|b| AsyncStatus {
                buffered: b.buffer.count,
                buffer: b.settings.buffer,
                max_staleness: b.settings.max_staleness,
                training: b.tasks.iter().map(|(&s, t)| (s, t.round)).collect(),
            }),
        }
    }
}
