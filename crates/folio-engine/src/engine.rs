//! The engine's state, shared by every role, its reads, and `advance`, which
//! moves the rounds along after every event.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Instant;

use folio_fed::sampling::sample_clients;
use folio_fed::{StateRecord, Strategy};
use folio_proto::{DataSource, ErrorCode, ServerMessage};
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

use crate::admission::Allowance;
use crate::buffered::Buffered;
use crate::config::{self, BuildError, EngineConfig, Start};
use crate::error::EngineError;
use crate::federated_eval::Asking;
use crate::jobs::Collected;
use crate::jobs::encode_model;
use crate::roles::{Output, Role, Whole};
use crate::round::OpenRound;
use crate::sessions::{SessionInfo, Sessions};
use crate::{RoundPhase, RoundRecord};

/// One federation's rounds, as role `R` plays them (one server by default).
pub struct Engine<R: Role = Whole> {
    pub(crate) config: EngineConfig,
    pub(crate) strategy: Arc<dyn Strategy>,
    /// Distributed DP: what each device of a secure round adds (`None`: none).
    pub(crate) device_noise: Option<folio_fed::DeviceNoisePlan>,
    pub(crate) global: Global,
    pub(crate) history: Vec<RoundRecord>,
    pub(crate) phase: Phase,
    /// Attempts of the next round abandoned so far, and who failed them.
    pub(crate) attempt: u32,
    pub(crate) failed: BTreeSet<u64>,
    pub(crate) sessions: Sessions,
    /// Characters (ids) of each trainable client's text.
    pub(crate) clients: BTreeMap<String, usize>,
    /// Trainable clients in the order they are handed out.
    pub(crate) pool: Vec<String>,
    pub(crate) errors: BTreeMap<&'static str, u64>,
    /// New sessions each group may still open.
    pub(crate) allowances: BTreeMap<u64, Allowance>,
    actions: VecDeque<R::Action>,
    /// Sessions the edges offer (a root).
    pub(crate) offered: Vec<folio_fed::Candidate>,
    /// Why training stopped before `max_rounds` (a privacy budget spent).
    pub(crate) stopped: Option<String>,
    /// Asynchronous rounds' tasks and buffer (`None`: synchronous rounds).
    pub(crate) buffered: Option<Buffered>,
    /// The latest time an event brought (for timers that count from it).
    pub(crate) clock: Instant,
    /// The round an edge last sent an unmasked secure sum of: a later attempt
    /// of it (a root that failed over orders it again) runs with no one.
    pub(crate) revealed_round: Option<u64>,
    /// Every secret draw: seeded by the config's entropy.
    rng: ChaCha20Rng,
    role: PhantomData<R>,
}

/// A model that may become the global one.
pub(crate) struct Candidate {
    pub weights: Arc<Vec<f32>>,
    pub encoded: Arc<Vec<u8>>,
    pub state: StateRecord,
    pub clip_bound: Option<f64>,
    pub clipped: usize,
    pub median_norm: Option<f64>,
}

/// A round past collecting: what its record needs besides the evaluation.
pub(crate) struct Closing {
    pub round: u64,
    pub clients: usize,
    pub train_loss: Option<f64>,
    pub train_accuracy: Option<f64>,
    /// Sequences the round's updates trained on.
    pub examples: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub started: Instant,
    /// The round's updates were securely aggregated.
    pub secure: bool,
    /// An asynchronous step: its updates' mean staleness.
    pub staleness: Option<f64>,
    /// A secure round's devices' figures on their held-out text.
    pub federated: Option<crate::FederatedEvaluation>,
    /// The sessions whose inputs a secure round's sum holds.
    pub contributors: Vec<u64>,
}

impl Closing {
    /// Round 0: the starting model, before any round.
    pub fn initial(now: Instant) -> Self {
        Self {
            round: 0,
            clients: 0,
            train_loss: None,
            train_accuracy: None,
            examples: 0,
            bytes_up: 0,
            bytes_down: 0,
            started: now,
            secure: false,
            staleness: None,
            federated: None,
            contributors: Vec::new(),
        }
    }
}

pub(crate) enum Phase {
    /// Waiting for enough clients.
    Idle,
    Collecting(OpenRound),
    Aggregating(Closing),
    Evaluating(Closing, Candidate),
    Persisting(Candidate, RoundRecord),
    /// A job failed: nothing starts before `until`; then round 0's evaluation
    /// runs again (`redo`), or the round is drawn again.
    Resting {
        until: Instant,
        redo: Option<Box<(Closing, Candidate)>>,
    },
    /// Devices measure the candidate model (federated evaluation).
    Asking(Box<Asking>),
    /// `max_rounds` are committed.
    Finished,
}

impl Phase {
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Idle => "waiting for clients",
            Phase::Collecting(_) => "training",
            Phase::Aggregating(_) => "aggregating",
            Phase::Evaluating(..) => "evaluating",
            Phase::Persisting(..) => "saving",
            Phase::Resting { .. } => "waiting to retry a failed job",
            Phase::Asking(_) => "evaluating on the devices",
            Phase::Finished => "finished",
        }
    }
}

/// The global model: the last committed round's.
pub(crate) struct Global {
    pub weights: Arc<Vec<f32>>,
    pub encoded: Arc<Vec<u8>>,
    pub fingerprint: u64,
    pub state: StateRecord,
}

impl Global {
    pub fn new(
        weights: Arc<Vec<f32>>,
        encoded: Arc<Vec<u8>>,
        state: StateRecord,
        config: &EngineConfig,
    ) -> Self {
        Self {
            fingerprint: folio_proto::model_fingerprint(config.rounds.model_encoding, &encoded),
            weights,
            encoded,
            state,
        }
    }
}

impl<R: Role> Engine<R> {
    /// An engine for `clients` (`(id, characters of training text)`; those with
    /// none cannot join), resuming `start`. Its strategy is built from the
    /// config. A federation with no history first evaluates and commits its
    /// starting model as round 0 (an edge takes round 0 from its root).
    pub fn new(
        config: EngineConfig,
        clients: impl IntoIterator<Item = (String, usize)>,
        start: Start,
        now: Instant,
    ) -> Result<Self, BuildError> {
        config::check::<R>(&config, &start)?;
        let mut rng = ChaCha20Rng::from_seed(config.entropy.0);
        let mut secret = [0u8; 32];
        rng.fill_bytes(&mut secret);
        let strategy = folio_fed::strategy::build(
            config.rounds.strategy,
            &folio_fed::StrategyContext {
                seed: config.seed,
                population: config.population,
                secret,
            },
        );
        let num_params = config.num_params();
        let device_noise = strategy
            .device_noise(num_params)
            .map_err(BuildError::Rounds)?;
        if device_noise.is_some() && !(R::HOLDS_SESSIONS && R::COMMITS) {
            return Err(BuildError::Rounds(
                "distributed DP plans each round's noise for one server's sum: run it without a cluster".into(),
            ));
        }
        let clients: BTreeMap<String, usize> = clients
            .into_iter()
            .filter(|(_, chars)| config.rounds.plan(0).max_examples(*chars) > 0)
            .collect();
        let ids: Vec<String> = clients.keys().cloned().collect();
        let pool = sample_clients(&ids, ids.len(), config.seed, 0);
        // A saved state is continued or refused, never replaced: replacing a
        // DP ledger would reset the privacy spent.
        let state = match start.strategy {
            Some(saved) => strategy
                .restore(saved, num_params)
                .map_err(BuildError::StrategyState)?,
            None if strategy
                .privacy(&strategy.initial_state(num_params))
                .is_some()
                && !start.history.iter().all(|r| r.round == 0) =>
            {
                return Err(BuildError::StrategyState(
                    "its rounds were trained without a privacy ledger, so DP-FedAvg cannot account for them".into(),
                ));
            }
            None => strategy.initial_state(num_params),
        };
        let encoded = encode_model(&start.weights, config.rounds.model_encoding);
        let buffered = config.rounds.asynchronous.map(|settings| {
            let updates = strategy
                .open_round(&state, num_params)
                .expect("the strategy opens rounds on its own state");
            Buffered::new(settings, updates, now)
        });
        let mut engine = Self {
            global: Global::new(Arc::new(start.weights), encoded, state, &config),
            config,
            strategy,
            device_noise,
            history: start.history,
            phase: Phase::Idle,
            attempt: 0,
            failed: BTreeSet::new(),
            revealed_round: None,
            sessions: Sessions::new(),
            clients,
            pool,
            errors: BTreeMap::new(),
            allowances: BTreeMap::new(),
            actions: VecDeque::new(),
            offered: Vec::new(),
            stopped: None,
            buffered,
            clock: now,
            rng,
            role: PhantomData,
        };
        if engine.history.is_empty() && R::COMMITS {
            engine.evaluate_start(now);
        } else {
            engine.advance(now);
        }
        Ok(engine)
    }

    /// The next action for the host, in order.
    pub fn poll_action(&mut self) -> Option<R::Action> {
        self.actions.pop_front()
    }

    /// When [`Engine::handle_timeout`] is next due: the open round's deadline (or
    /// its secure step's), a task's, or the next disconnected session's expiry.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let deadline = match &self.phase {
            Phase::Collecting(open) => Some(match &open.secure {
                Some(secure) => secure.step_deadline,
                None => open.deadline,
            }),
            Phase::Resting { until, .. } => Some(*until),
            Phase::Asking(asking) => Some(asking.deadline),
            _ => None,
        };
        let now = self.clock;
        let tasks = self.buffered.as_ref().and_then(|b| b.next_deadline(now));
        let expiry = self.sessions.next_expiry(self.config.session_ttl);
        // A bench that ends may let a round or a task start.
        let bench = self.sessions.next_bench_end(now);
        deadline
            .into_iter()
            .chain(tasks)
            .chain(expiry)
            .chain(bench)
            .min()
    }

    /// Time passed: sessions expire, tasks lapse, a round may close at its
    /// deadline.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.sessions.expire(now, self.config.session_ttl);
        if let Some(buffered) = &mut self.buffered {
            let late = buffered.expire(now);
            self.strike(&late, now, "let its asynchronous task lapse");
            // Back on probation: its past speed no longer vouches for it.
            for &session in &late {
                if let Some(info) = self.sessions.get_mut(session) {
                    info.turnaround = None;
                }
            }
            self.send(
                late,
                EngineError::new(
                    ErrorCode::RoundClosed,
                    "your task passed its deadline; your update will be ignored, and the next model comes to you",
                ),
            );
        }
        self.advance(now);
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Rounds committed (round 0, the starting model, counts as none).
    pub fn completed_rounds(&self) -> u64 {
        self.history.last().map_or(0, |r| r.round)
    }

    /// Why training stopped before its last round, if it did.
    pub fn stopped(&self) -> Option<&str> {
        self.stopped.as_deref()
    }

    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Finished)
    }

    /// The committed rounds from `from` on, at most `limit`.
    pub fn history(&self, from: u64, limit: usize) -> &[RoundRecord] {
        let start = self.history.partition_point(|r| r.round < from);
        let end = start.saturating_add(limit).min(self.history.len());
        &self.history[start..end]
    }

    /// The global model's weights.
    pub fn weights(&self) -> Arc<Vec<f32>> {
        self.global.weights.clone()
    }

    /// The fingerprint of the global model.
    pub fn fingerprint(&self) -> u64 {
        self.global.fingerprint
    }

    /// `session` as a round's candidate: its text's size, its group.
    pub(crate) fn candidate(&self, session: &SessionInfo) -> folio_fed::Candidate {
        folio_fed::Candidate {
            client: session.session,
            size: self.text_size(&session.client_id) as u64,
            group: session.group,
        }
    }

    /// The training characters of a session's text, as far as the engine knows:
    /// its character's in the simulation; unknown (unbounded) for a device's own.
    pub(crate) fn text_size(&self, client_id: &str) -> usize {
        match self.config.data {
            DataSource::Shakespeare => self.clients.get(client_id).copied().unwrap_or(0),
            DataSource::Device => usize::MAX,
        }
    }

    /// `sessions` broke something (`what`): each sits out for a growing time.
    pub(crate) fn strike(&mut self, sessions: &[u64], now: Instant, what: &str) {
        let private = self.release().is_private();
        for &session in sessions {
            if let Some(info) = self.sessions.get_mut(session) {
                let bench = info.strikes.add(now);
                // A private federation's logs name no session that took part.
                let who = if private {
                    "a session".to_owned()
                } else {
                    format!("session {session}")
                };
                tracing::info!(
                    strikes = info.strikes.count(),
                    "{who} {what}: not drawn for {}s",
                    bench.as_secs()
                );
            }
        }
    }

    /// Rounds are DP-FedAvg's: each samples its clients once, with q.
    pub(crate) fn is_dp(&self) -> bool {
        self.strategy.config().kind == folio_fed::StrategyKind::DpFedAvg
    }

    /// A root's open secure round already holds an edge's unmasked sum.
    fn holds_a_secure_share(&self, open: &crate::round::OpenRound) -> bool {
        self.config.rounds.secure.is_some()
            && matches!(&open.collected, Collected::Shares(s) if s.parts.iter().any(|p| p.updates > 0))
    }

    /// Counts a refused input for the status.
    pub fn count_error(&mut self, code: ErrorCode) {
        *self.errors.entry(code.name()).or_default() += 1;
    }

    /// Moves the round along: start one, close or abandon the open one.
    pub(crate) fn advance(&mut self, now: Instant) {
        self.clock = self.clock.max(now);
        if matches!(self.phase, Phase::Asking(_)) {
            self.advance_asking(now);
        }
        if matches!(&self.phase, Phase::Resting { until, .. } if now >= *until) {
            let Phase::Resting { redo, .. } = std::mem::replace(&mut self.phase, Phase::Idle)
            else {
                unreachable!("matched above")
            };
            if let Some(redo) = redo {
                let (closing, candidate) = *redo;
                self.evaluate(closing, candidate);
                return;
            }
        }
        if self.buffered.is_some() {
            self.advance_async(now);
            return;
        }
        loop {
            match &self.phase {
                Phase::Idle if !R::COMMITS => return,
                Phase::Idle => {
                    if self
                        .config
                        .max_rounds
                        .is_some_and(|max| self.completed_rounds() >= max)
                    {
                        self.phase = Phase::Finished;
                    } else if let Err(why) = self.strategy.admits_next_round(&self.global.state) {
                        tracing::warn!("{why}");
                        self.stopped = Some(why);
                        self.phase = Phase::Finished;
                    } else {
                        self.try_start_round(now);
                        // A round with nobody to wait for (a DP round whose
                        // sample is empty) closes at once.
                        if matches!(self.phase, Phase::Collecting(_)) {
                            continue;
                        }
                    }
                    return;
                }
                Phase::Collecting(open) if open.secure.is_some() => {
                    if !self.step_secure(now) {
                        return;
                    }
                }
                Phase::Collecting(open) => match open.phase(self.quorum(), now) {
                    RoundPhase::Collecting | RoundPhase::Idle => return,
                    // A root holding an edge's unmasked secure sum commits
                    // it: drawn again, its clients would reveal another.
                    RoundPhase::Failed if self.holds_a_secure_share(open) => {
                        self.close_round();
                        return;
                    }
                    RoundPhase::Failed => self.abandon_round("closed without a quorum"),
                    RoundPhase::Complete | RoundPhase::DeadlineWithQuorum => {
                        self.close_round();
                        return;
                    }
                },
                _ => return,
            }
        }
    }

    /// The updates a round needs to close: an edge's share closes with whatever
    /// came, since the root counts the quorum over all edges.
    pub(crate) fn quorum(&self) -> usize {
        if R::COMMITS {
            self.strategy.quorum()
        } else {
            0
        }
    }

    /// Queues `output` for the host, if it is the role's to carry out.
    pub(crate) fn emit(&mut self, output: Output) {
        if let Some(action) = R::action(output) {
            self.actions.push_back(action);
        }
    }

    /// `message` to each of `to`.
    pub(crate) fn send(&mut self, to: Vec<u64>, message: impl Into<ServerMessage>) {
        if !to.is_empty() && R::HOLDS_SESSIONS {
            self.emit(Output::Send {
                to,
                message: Arc::new(message.into()),
            });
        }
    }

    /// 8 secret bytes, as a number.
    pub(crate) fn draw_u64(&mut self) -> u64 {
        self.rng.next_u64()
    }

    /// 32 secret bytes.
    pub(crate) fn draw_seed(&mut self) -> [u8; 32] {
        let mut seed = [0u8; 32];
        self.rng.fill_bytes(&mut seed);
        seed
    }
}
