//! The round engine: one federation's rounds, with no IO, no clock and no model.
//!
//! Hosts feed it events with the time they happened (a client joins, sends an
//! update, leaves; time passes; a job they ran finished) and carry out the
//! actions it queues ([`Engine::poll_action`]): frames to send, and the heavy
//! jobs that must not run where the engine is held (aggregating, evaluating a
//! model, saving a commit durably). [`Engine::poll_timeout`] says when it next
//! needs [`Engine::handle_timeout`]. `folio serve` is a host over WebSocket,
//! `folio simulate` one over in-process clients; the rules live here once:
//!
//! - a round starts when the strategy finds enough connected clients; each is
//!   sent the round's model (without it when it holds it already), the plan it
//!   trains by, and a deadline;
//! - an update is taken once per selected client, with examples bounded by what
//!   that client's text allows under the round's plan;
//! - a round closes when every selected client reported or left with a quorum,
//!   or at the deadline with a quorum; otherwise it is abandoned and runs again
//!   with a fresh sample that avoids the clients that failed it;
//! - a closed round is aggregated, evaluated, persisted, and only then becomes
//!   the global model: one [`RoundRecord`] per round, built in one place.

mod buffered;
pub mod record;
pub mod round;
mod secure;
pub mod sessions;
mod settings;
pub mod status;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use folio_fed::codec::CheckedDelta;
use folio_fed::sampling::sample_clients;
use folio_fed::{Aggregated, FedError, OpenUpdates, Partial, StateRecord, Strategy, codec};
use folio_proto::{
    ErrorCode, ErrorMessage, ModelShape, RoundResult, RoundStart, ServerMessage, Welcome,
};

pub use record::{Evaluation, RoundRecord, model_hash};
pub use round::RoundPhase;
pub use settings::{AsyncRounds, RoundConfig, SecureRounds};

use buffered::Buffered;
use round::OpenRound;
use secure::{SecureOpen, SecureSum, SumMetrics};
use sessions::{ClientRound, DeviceCheck, SessionError, Sessions};

/// What the engine is set up with.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub rounds: RoundConfig,
    /// The model's preset name and shape, told to clients.
    pub preset: String,
    pub model: ModelShape,
    /// Lengths of the model's tensors in parameter order (the delta codecs' unit).
    pub segments: Vec<usize>,
    pub seed: u64,
    /// Sessions kept (connected or waiting to be resumed).
    pub max_sessions: usize,
    /// A disconnected session can be resumed for this long.
    pub session_ttl: Duration,
    /// Stop after this many rounds (`None`: run forever).
    pub max_rounds: Option<u64>,
    /// How fast one group may open new sessions (resuming one is free).
    pub new_sessions: SessionRate,
    pub role: Role,
    /// Check each device with a known-answer probe when it joins (and when its
    /// backend changes) before it may be selected.
    pub check_devices: bool,
}

/// Where the engine runs: one process, or one part of a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    /// Sessions, rounds and commits in one process.
    #[default]
    Whole,
    /// A cluster's edge: sessions and their updates, folded into one share per
    /// round; the root orders the rounds ([`Engine::order`]) and commits them
    /// ([`Engine::adopt`]).
    Edge,
    /// A cluster's root: selection over the sessions the edges offer
    /// ([`Engine::offer`]), the edges' shares combined ([`Engine::part`]),
    /// evaluation and commits. It holds no session.
    Root,
}

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
pub struct PartReport {
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
pub const PART_GRACE: Duration = Duration::from_secs(5);

/// New sessions one group may open: `burst` at once, then one every `every`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionRate {
    pub burst: u32,
    pub every: Duration,
}

/// Groups whose new-session allowance is remembered at most (full ones are
/// forgotten first: they are as good as new).
const MAX_ALLOWANCES: usize = 10_000;

/// A group's allowance of new sessions, as of `at`.
#[derive(Debug, Clone, Copy)]
struct Allowance {
    left: f64,
    at: Instant,
}

impl EngineConfig {
    pub fn num_params(&self) -> usize {
        self.segments.iter().sum()
    }
}

/// What a host builds its strategy with: the federation's seed, its population,
/// and a secret from the OS for the draws that must stay private.
pub fn strategy_context(seed: u64, population: usize) -> folio_fed::StrategyContext {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).expect("the OS random number generator works");
    folio_fed::StrategyContext {
        seed,
        population,
        secret,
    }
}

/// Where a federation starts: its global model, and what a saved state holds.
#[derive(Debug, Clone)]
pub struct Start {
    pub weights: Vec<f32>,
    /// The strategy's saved state (`None`, or one the strategy refuses: afresh).
    pub strategy: Option<StateRecord>,
    /// Committed rounds, from round 0; empty for a new federation.
    pub history: Vec<RoundRecord>,
}

/// A join that passed the checks that need no engine (sizes, protocol, token,
/// the client id resolved against the corpus).
#[derive(Debug, Clone)]
pub struct CheckedJoin {
    pub kind: &'static str,
    pub backend: String,
    pub adapter: Option<String>,
    pub resume: Option<String>,
    /// A corpus client id.
    pub client: Option<String>,
    /// The fingerprint of the global model the client says it holds.
    pub held_model: Option<u64>,
    /// The group the connection comes from (for a server, its network: an IPv4
    /// /24, an IPv6 /64): rounds take clients evenly across groups, and a full
    /// session table forgets the largest group's sessions first.
    pub group: u64,
    /// The connection was let in only to resume a session (beyond the caps).
    pub resume_only: bool,
}

/// A session the engine admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    pub session: u64,
    /// The resume token: a secret for the client alone.
    pub token: String,
    pub client_id: String,
}

/// An update whose delta is decoded and checked, for the round it names.
#[derive(Debug, Clone)]
pub struct DecodedUpdate {
    pub round: u64,
    pub examples: u64,
    pub delta: CheckedDelta,
    pub train_loss: f32,
    pub train_accuracy: f32,
    pub train_seconds: f32,
}

impl DecodedUpdate {
    /// What the session's status shows of it.
    fn client_round(&self) -> ClientRound {
        ClientRound {
            round: self.round,
            examples: self.examples,
            train_loss: self.train_loss,
            train_accuracy: self.train_accuracy,
            train_seconds: self.train_seconds,
        }
    }
}

/// Why the strategy refused an update, as the client is told.
fn refused_update(err: FedError) -> ErrorMessage {
    match err {
        FedError::BadExamples { .. } => error(ErrorCode::BadExamples, err.to_string()),
        _ => error(ErrorCode::BadDelta, err.to_string()),
    }
}

/// Work for the host. Sends are cheap; the jobs are not, and their results come
/// back as events ([`Engine::aggregated`], [`Engine::evaluated`],
/// [`Engine::persisted`], [`Engine::job_failed`]).
pub enum Action {
    /// `message` to each of `to` (one encoding serves them all).
    Send {
        to: Vec<u64>,
        message: Arc<ServerMessage>,
    },
    Aggregate(AggregateJob),
    /// An edge's share of a round is folded: send it to the root.
    Part(PartJob),
    /// A root's order: start the round on the edges.
    Order(RoundOrder),
    /// Evaluate `weights` centrally, and on every client's test text too when
    /// `population` is set.
    Evaluate {
        round: u64,
        weights: Arc<Vec<f32>>,
        population: bool,
    },
    /// Save the commit durably (weights, strategy state, the record appended to
    /// the history); the round is the global model once that is done.
    Persist(Box<Commit>),
    /// Round `record.round` is now the global model.
    Committed(Box<RoundRecord>),
}

/// A closed round's aggregation, to run off the engine.
pub struct AggregateJob {
    pub round: u64,
    strategy: Arc<dyn Strategy>,
    updates: OpenUpdates,
    weights: Arc<Vec<f32>>,
    state: StateRecord,
    model_encoding: folio_fed::Encoding,
}

/// What [`AggregateJob::run`] gives back.
pub struct AggregateResult {
    round: u64,
    result: Result<(Aggregated, Arc<Vec<u8>>), FedError>,
    /// A secure round's training metrics, known only once its sum is unmasked.
    secure: Option<SumMetrics>,
}

impl AggregateJob {
    /// Aggregates (a root: combines the edges' shares), and encodes the new model
    /// as the next round will send it.
    pub fn run(self) -> AggregateResult {
        let mut secure = None;
        let aggregated = if let Ok(sum) = self.updates.get::<SecureSum>() {
            sum.partial().and_then(|(partial, metrics)| {
                secure = Some(metrics);
                let bound = Some(sum.spec.quantizer.clip_bound);
                self.strategy
                    .combine(&[partial], bound, &self.weights, &self.state)
            })
        } else if let Ok(shares) = self.updates.get::<Shares>() {
            self.strategy
                .combine(&shares.parts, shares.bound, &self.weights, &self.state)
        } else {
            self.strategy
                .aggregate(&self.updates, &self.weights, &self.state)
        };
        let result = aggregated.map(|aggregated| {
            let encoded = encode_model(&aggregated.weights, self.model_encoding);
            (aggregated, encoded)
        });
        AggregateResult {
            round: self.round,
            result,
            secure,
        }
    }
}

/// An edge's share of a round, to fold off the engine.
pub struct PartJob {
    pub report: PartReport,
    strategy: Arc<dyn Strategy>,
    updates: OpenUpdates,
}

impl PartJob {
    pub fn run(mut self) -> Result<(PartReport, Partial), FedError> {
        if let Ok(sum) = self.updates.get::<SecureSum>() {
            let (partial, metrics) = sum.partial()?;
            self.report.loss_sum = metrics.loss_sum;
            self.report.accuracy_sum = metrics.accuracy_sum;
            self.report.examples = metrics.examples;
            return Ok((self.report, partial));
        }
        let partial = self.strategy.part(&self.updates)?;
        Ok((self.report, partial))
    }
}

/// A root's open round: the edges' shares so far, and the bound they clip to.
struct Shares {
    bound: Option<f32>,
    parts: Vec<Partial>,
}

/// A round to save: everything a restart needs to resume after it.
#[derive(Debug, Clone)]
pub struct Commit {
    pub record: RoundRecord,
    pub weights: Arc<Vec<f32>>,
    pub state: StateRecord,
}

fn encode_model(weights: &[f32], encoding: folio_fed::Encoding) -> Arc<Vec<u8>> {
    Arc::new(codec::encode(weights, &[weights.len()], encoding))
}

pub fn error(code: ErrorCode, message: impl Into<String>) -> ErrorMessage {
    ErrorMessage {
        code,
        message: message.into(),
    }
}

/// A model that may become the global one.
struct Candidate {
    weights: Arc<Vec<f32>>,
    encoded: Arc<Vec<u8>>,
    state: StateRecord,
    clip_bound: Option<f64>,
    clipped: usize,
    median_norm: Option<f64>,
}

/// A round past collecting: what its record needs besides the evaluation.
struct Closing {
    round: u64,
    clients: usize,
    train_loss: Option<f64>,
    train_accuracy: Option<f64>,
    /// Sequences the round's updates trained on.
    examples: u64,
    bytes_up: u64,
    bytes_down: u64,
    started: Instant,
    /// The round's updates were securely aggregated.
    secure: bool,
    /// An asynchronous step: its updates' mean staleness.
    staleness: Option<f64>,
}

impl Closing {
    /// Round 0: the starting model, before any round.
    fn initial(now: Instant) -> Self {
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
        }
    }
}

enum Phase {
    /// Waiting for enough clients.
    Idle,
    Collecting(OpenRound),
    Aggregating(Closing),
    Evaluating(Closing, Candidate),
    Persisting(Candidate, RoundRecord),
    /// `max_rounds` are committed.
    Finished,
}

impl Phase {
    fn name(&self) -> &'static str {
        match self {
            Phase::Idle => "waiting for clients",
            Phase::Collecting(_) => "training",
            Phase::Aggregating(_) => "aggregating",
            Phase::Evaluating(..) => "evaluating",
            Phase::Persisting(..) => "saving",
            Phase::Finished => "finished",
        }
    }
}

/// The global model: the last committed round's.
struct Global {
    weights: Arc<Vec<f32>>,
    encoded: Arc<Vec<u8>>,
    fingerprint: u64,
    state: StateRecord,
}

pub struct Engine {
    config: EngineConfig,
    strategy: Arc<dyn Strategy>,
    global: Global,
    history: Vec<RoundRecord>,
    phase: Phase,
    /// Attempts of the next round abandoned so far, and who failed them.
    attempt: u32,
    failed: BTreeSet<u64>,
    sessions: Sessions,
    /// Characters (ids) of each trainable client's text.
    clients: BTreeMap<String, usize>,
    /// Trainable clients in the order they are handed out.
    pool: Vec<String>,
    errors: BTreeMap<&'static str, u64>,
    /// New sessions each group may still open.
    allowances: BTreeMap<u64, Allowance>,
    actions: VecDeque<Action>,
    /// Sessions the edges offer (a root).
    offered: Vec<folio_fed::Candidate>,
    /// Why the strategy's saved state was not continued, if it was not.
    pub fresh_state: Option<String>,
    /// Why training stopped before `max_rounds` (a privacy budget spent).
    stopped: Option<String>,
    /// Asynchronous rounds' tasks and buffer (`None`: synchronous rounds).
    buffered: Option<Buffered>,
}

impl Engine {
    /// An engine for `clients` (`(id, characters of training text)`; those with
    /// none cannot join), resuming `start`. A federation with no history first
    /// evaluates and commits its starting model as round 0.
    pub fn new(
        config: EngineConfig,
        strategy: Arc<dyn Strategy>,
        clients: impl IntoIterator<Item = (String, usize)>,
        start: Start,
        now: Instant,
    ) -> Self {
        let num_params = config.num_params();
        let clients: BTreeMap<String, usize> = clients
            .into_iter()
            .filter(|(_, chars)| config.rounds.plan(0).max_examples(*chars) > 0)
            .collect();
        let ids: Vec<String> = clients.keys().cloned().collect();
        let pool = sample_clients(&ids, ids.len(), config.seed, 0);
        let (state, fresh_state) = match start.strategy {
            Some(saved) => match strategy.restore(saved, num_params) {
                Ok(state) => (state, None),
                Err(why) => (strategy.initial_state(num_params), Some(why)),
            },
            None => (strategy.initial_state(num_params), None),
        };
        let encoded = encode_model(&start.weights, config.rounds.model_encoding);
        let buffered = config.rounds.asynchronous.map(|settings| {
            let updates = strategy
                .open_round(&state, num_params)
                .expect("the strategy opens rounds on its own state");
            Buffered::new(settings, updates, now)
        });
        let mut engine = Self {
            global: Global {
                fingerprint: folio_proto::model_fingerprint(config.rounds.model_encoding, &encoded),
                weights: Arc::new(start.weights),
                encoded,
                state,
            },
            config,
            strategy,
            history: start.history,
            phase: Phase::Idle,
            attempt: 0,
            failed: BTreeSet::new(),
            sessions: Sessions::new(),
            clients,
            pool,
            errors: BTreeMap::new(),
            allowances: BTreeMap::new(),
            actions: VecDeque::new(),
            offered: Vec::new(),
            fresh_state,
            stopped: None,
            buffered,
        };
        if engine.history.is_empty() && engine.config.role != Role::Edge {
            let initial = Candidate {
                weights: engine.global.weights.clone(),
                encoded: engine.global.encoded.clone(),
                state: engine.global.state.clone(),
                clip_bound: None,
                clipped: 0,
                median_norm: None,
            };
            engine.evaluate(Closing::initial(now), initial);
        } else {
            engine.advance(now);
        }
        engine
    }

    /// The next action for the host, in order.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`Engine::handle_timeout`] is next due: the open round's deadline, or
    /// the next disconnected session's expiry.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let deadline = match &self.phase {
            Phase::Collecting(open) => Some(match &open.secure {
                Some(secure) => secure.step_deadline,
                None => open.deadline,
            }),
            _ => None,
        };
        let tasks = self.buffered.as_ref().and_then(Buffered::next_deadline);
        let expiry = self.sessions.next_expiry(self.config.session_ttl);
        deadline.into_iter().chain(tasks).chain(expiry).min()
    }

    /// Time passed: sessions expire, a round may close at its deadline.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.sessions.expire(now, self.config.session_ttl);
        if let Some(buffered) = &mut self.buffered {
            let late = buffered.expire(now);
            self.send(
                late,
                ServerMessage::Error(error(
                    ErrorCode::RoundClosed,
                    "your task passed its deadline; your update will be ignored, and the next model comes to you",
                )),
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

    /// The characters a session can train as, with their training characters.
    pub fn clients(&self) -> &BTreeMap<String, usize> {
        &self.clients
    }

    /// Counts a refused input for the status.
    pub fn count_error(&mut self, code: ErrorCode) {
        *self.errors.entry(code.name()).or_default() += 1;
    }

    /// Admits a connection: a resumed session, or a new one with the client asked
    /// for or the next free one. A session selected in the open round that left
    /// before it reported gets the round again.
    pub fn join(&mut self, join: CheckedJoin, now: Instant) -> Result<Joined, ErrorMessage> {
        let joined = self.admit(join, now);
        self.advance(now);
        joined
    }

    /// Admits many connections at once: a round starts, if it can, only once all
    /// are in (an in-process population joins before its first round).
    pub fn join_many(
        &mut self,
        joins: impl IntoIterator<Item = CheckedJoin>,
        now: Instant,
    ) -> Vec<Result<Joined, ErrorMessage>> {
        let joined = joins
            .into_iter()
            .map(|join| self.admit(join, now))
            .collect();
        self.advance(now);
        joined
    }

    fn admit(&mut self, join: CheckedJoin, now: Instant) -> Result<Joined, ErrorMessage> {
        let session_error = |err: SessionError| match err {
            SessionError::InUse => error(
                ErrorCode::SessionInUse,
                "this session is connected in another connection",
            ),
            SessionError::ClientTaken(id) => error(
                ErrorCode::NoFreeClient,
                format!("{id} is already training in another connection"),
            ),
            SessionError::NoFreeClient => {
                error(ErrorCode::NoFreeClient, "every Shakespeare client is taken")
            }
            SessionError::Full => error(
                ErrorCode::ServerFull,
                "every session the server keeps is connected; try again later",
            ),
        };
        let resumed = match &join.resume {
            Some(token) => self.sessions.find_resumable(token).map_err(session_error)?,
            None => None,
        };
        let session = match resumed {
            Some(session) => session,
            None if join.resume_only => {
                return Err(error(
                    ErrorCode::ServerFull,
                    "this connection was let in to resume a session, and there is none to \
                     resume: reconnect without `?resume`",
                ));
            }
            None => {
                self.new_session_allowed(join.group, now)?;
                let client = self
                    .sessions
                    .pick_client(join.client.as_deref(), &self.pool)
                    .map_err(session_error)?;
                if !self.clients.contains_key(&client) {
                    return Err(error(
                        ErrorCode::UnknownClient,
                        format!("{client} has no training text to train on"),
                    ));
                }
                let session = self
                    .sessions
                    .create(
                        client,
                        join.kind,
                        join.group,
                        self.config.max_sessions,
                        now,
                        self.config.session_ttl,
                    )
                    .map_err(session_error)?;
                self.spend_allowance(join.group);
                session
            }
        };
        self.sessions.connect(session);
        let info = self.sessions.get_mut(session).expect("session just made");
        info.backend = join.backend;
        info.adapter = join.adapter;
        info.held_model = join.held_model;
        info.group = join.group;
        let joined = Joined {
            session,
            token: info.token(),
            client_id: info.client_id.clone(),
        };
        if self.config.check_devices && info.checked_device != Some(info.device()) {
            let mut id = [0u8; 8];
            getrandom::fill(&mut id).expect("the OS random number generator works");
            let id = u64::from_le_bytes(id);
            info.check = DeviceCheck::Pending;
            info.probe = Some(id);
            info.checked_device = None;
            self.send(
                vec![session],
                ServerMessage::Probe(folio_proto::Probe::with_id(id)),
            );
        }
        self.rejoin_open_round(session, now);
        Ok(joined)
    }

    /// Whether `group` may open a new session now (its allowance refilled).
    fn new_session_allowed(&mut self, group: u64, now: Instant) -> Result<(), ErrorMessage> {
        let SessionRate { burst, every } = self.config.new_sessions;
        if self.allowances.len() >= MAX_ALLOWANCES {
            self.allowances.retain(|_, a| {
                now.saturating_duration_since(a.at).as_secs_f64()
                    < every.as_secs_f64() * (f64::from(burst) - a.left)
            });
        }
        let allowance = self.allowances.entry(group).or_insert(Allowance {
            left: f64::from(burst),
            at: now,
        });
        let refill = if every.is_zero() {
            f64::INFINITY
        } else {
            now.saturating_duration_since(allowance.at).as_secs_f64() / every.as_secs_f64()
        };
        allowance.left = (allowance.left + refill).min(f64::from(burst));
        allowance.at = now;
        if allowance.left >= 1.0 {
            return Ok(());
        }
        let wait = every.mul_f64(1.0 - allowance.left).as_secs().max(1);
        Err(error(
            ErrorCode::ServerFull,
            format!(
                "your network opened {burst} sessions in a burst; the next may open in {wait} s (resuming a session is not limited)"
            ),
        ))
    }

    fn spend_allowance(&mut self, group: u64) {
        if let Some(allowance) = self.allowances.get_mut(&group) {
            allowance.left -= 1.0;
        }
    }

    /// The welcome for a session just admitted, with its client's training text.
    pub fn welcome(&self, joined: &Joined, train_text: String) -> Welcome {
        Welcome {
            session: joined.token.clone(),
            client_id: joined.client_id.clone(),
            train_text,
            preset: self.config.preset.clone(),
            model: self.config.model,
            batch_size: self.config.rounds.batch_size,
            seq_len: self.config.rounds.seq_len,
        }
    }

    fn rejoin_open_round(&mut self, session: u64, now: Instant) {
        if !self.selectable(session) {
            return;
        }
        let Phase::Collecting(open) = &mut self.phase else {
            return;
        };
        // A secure round's keys left with the connection: it goes on without it.
        if open.secure.is_some() || !open.dropped.remove(&session) {
            return;
        }
        let deadline_ms = open.seconds_left(now).as_millis() as u64;
        let Some(info) = self.sessions.get_mut(session) else {
            return;
        };
        let held = info.held_model == Some(open.start.model);
        info.held_model = Some(open.start.model);
        let message = round_message(&open.start, deadline_ms, held);
        self.send(vec![session], message);
    }

    /// A connection ended: its session can be resumed until it expires; if it was
    /// training in the open round, the round counts it as dropped.
    pub fn leave(&mut self, session: u64, now: Instant) {
        self.sessions.disconnect(session, now);
        if let Some(buffered) = &mut self.buffered {
            buffered.tasks.remove(&session);
        }
        if let Phase::Collecting(open) = &mut self.phase {
            if open.is_training(session) {
                open.dropped.insert(session);
            }
            // Gone from every later step of a secure round too.
            if let Some(secure) = &mut open.secure {
                secure.left.insert(session);
                secure.server.leave(session);
            }
        }
        self.advance(now);
    }

    /// Takes one step of a secure round from `session`, or says why not; a
    /// refused step changes nothing.
    pub fn secure(
        &mut self,
        session: u64,
        step: folio_secagg::ClientStep,
        now: Instant,
    ) -> Result<(), ErrorMessage> {
        let Phase::Collecting(open) = &mut self.phase else {
            return Err(error(
                ErrorCode::RoundClosed,
                "no round is open; the secure step is ignored",
            ));
        };
        let Some(secure) = &mut open.secure else {
            return Err(error(
                ErrorCode::BadSecureStep,
                format!("round {} is not secure", open.round),
            ));
        };
        let masked = matches!(step, folio_secagg::ClientStep::Masked(_));
        secure
            .server
            .receive(session, step)
            .map_err(|e| error(ErrorCode::BadSecureStep, e.to_string()))?;
        if masked {
            open.reported.insert(session);
            if let Some(info) = self.sessions.get_mut(session) {
                info.contributed(open.round);
            }
        }
        self.advance(now);
        Ok(())
    }

    /// Ends a session for good (an operator's revocation); `false` if unknown.
    pub fn revoke(&mut self, session: u64, now: Instant) -> Option<String> {
        self.leave(session, now);
        self.sessions.revoke(session).map(|info| info.client_id)
    }

    pub fn add_bytes(&mut self, session: u64, up: u64, down: u64) {
        if let Some(info) = self.sessions.get_mut(session) {
            info.bytes_up = info.bytes_up.saturating_add(up);
            info.bytes_down = info.bytes_down.saturating_add(down);
        }
        if let Phase::Collecting(open) = &mut self.phase {
            open.bytes_up = open.bytes_up.saturating_add(up);
            open.bytes_down = open.bytes_down.saturating_add(down);
        }
        if let Some(buffered) = &mut self.buffered {
            let buffer = &mut buffered.buffer;
            buffer.bytes_up = buffer.bytes_up.saturating_add(up);
            buffer.bytes_down = buffer.bytes_down.saturating_add(down);
        }
    }

    /// Until when `session` may stay silent: while it trains in the open round,
    /// the round's deadline.
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
    ) -> Result<folio_fed::Encoding, ErrorMessage> {
        if self.buffered.is_some() {
            return self
                .expected_async(session, round)
                .map(|_| self.config.rounds.delta_encoding);
        }
        let Phase::Collecting(open) = &self.phase else {
            return Err(error(
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
            return Err(error(
                code,
                format!("update for round {round}, the open round is {}", open.round),
            ));
        }
        if open.reported.contains(&session) {
            return Err(error(
                ErrorCode::DuplicateUpdate,
                format!("a second update for round {}", open.round),
            ));
        }
        if !open.is_training(session) {
            return Err(error(
                ErrorCode::NotSelected,
                format!("this client was not selected for round {}", open.round),
            ));
        }
        if open.secure.is_some() {
            return Err(error(
                ErrorCode::BadSecureStep,
                format!(
                    "round {} is secure: its updates come masked, through its steps",
                    open.round
                ),
            ));
        }
        Ok(open.encoding)
    }

    /// Folds one client's update into the open round, or says why not. A refused
    /// update changes nothing.
    pub fn update(
        &mut self,
        session: u64,
        update: DecodedUpdate,
        now: Instant,
    ) -> Result<(), ErrorMessage> {
        self.expected_update(session, update.round)?;
        // They enter the round's averages: a loss is finite and ≥ 0, an accuracy
        // in [0, 1], a time finite and ≥ 0.
        let sane = update.train_loss.is_finite()
            && update.train_loss >= 0.0
            && (0.0..=1.0).contains(&update.train_accuracy)
            && update.train_seconds.is_finite()
            && update.train_seconds >= 0.0;
        if !sane {
            return Err(error(
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
        let allowed = open.allowed_examples.get(&session).copied().unwrap_or(0);
        self.strategy
            .accept(&mut open.updates, &update.delta, update.examples, allowed)
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

    /// A closed round's aggregation finished.
    pub fn aggregated(&mut self, result: AggregateResult, now: Instant) {
        let Phase::Aggregating(closing) = &self.phase else {
            return;
        };
        if closing.round != result.round {
            return;
        }
        let Phase::Aggregating(mut closing) = std::mem::replace(&mut self.phase, Phase::Idle)
        else {
            unreachable!("matched above")
        };
        if let Some(metrics) = result.secure {
            let weight = metrics.weight.max(f64::MIN_POSITIVE);
            closing.train_loss = Some(metrics.loss_sum / weight);
            closing.train_accuracy = Some(metrics.accuracy_sum / weight);
            closing.examples = metrics.examples;
        }
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
                // Every reporter shares the blame: the retry avoids them all.
                self.count_error(ErrorCode::BadDelta);
                self.attempt += 1;
                tracing::warn!(round = closing.round, "round dropped: {err}");
                self.advance(now);
            }
        }
    }

    fn evaluate(&mut self, closing: Closing, candidate: Candidate) {
        let round = closing.round;
        let last = self.config.max_rounds == Some(round);
        let population = self
            .config
            .rounds
            .population_eval_every
            .is_some_and(|every| round == 0 || last || round.is_multiple_of(every.max(1)));
        self.actions.push_back(Action::Evaluate {
            round,
            weights: candidate.weights.clone(),
            population,
        });
        self.phase = Phase::Evaluating(closing, candidate);
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
        };
        self.actions.push_back(Action::Persist(Box::new(Commit {
            record: record.clone(),
            weights: candidate.weights.clone(),
            state: candidate.state.clone(),
        })));
        self.phase = Phase::Persisting(candidate, record);
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
        self.global = Global {
            fingerprint: folio_proto::model_fingerprint(
                self.config.rounds.model_encoding,
                &candidate.encoded,
            ),
            weights: candidate.weights,
            encoded: candidate.encoded,
            state: candidate.state,
        };
        self.attempt = 0;
        self.failed.clear();
        if round > 0 {
            let everyone: Vec<u64> = self.sessions.connected().map(|s| s.session).collect();
            self.send(
                everyone,
                ServerMessage::RoundResult(RoundResult {
                    round,
                    clients: record.clients as u32,
                    eval_loss: record.eval_loss as f32,
                    eval_accuracy: record.eval_accuracy as f32,
                }),
            );
        }
        self.history.push(record.clone());
        self.actions.push_back(Action::Committed(Box::new(record)));
        self.next_model_for_tasks();
        self.advance(now);
    }

    /// A job for `round` failed (evaluation, saving): the round runs again, on
    /// the same global model. Round 0 is evaluated again.
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
        if self.history.is_empty() {
            let (closing, candidate) = match phase {
                Phase::Evaluating(closing, candidate) => (closing, candidate),
                Phase::Persisting(candidate, _) => (Closing::initial(now), candidate),
                _ => unreachable!("round 0 is never aggregated"),
            };
            self.evaluate(closing, candidate);
            return;
        }
        self.attempt += 1;
        self.advance(now);
    }

    /// Moves the round along: start one, close or abandon the open one.
    fn advance(&mut self, now: Instant) {
        if self.buffered.is_some() {
            self.advance_async(now);
            return;
        }
        loop {
            match &self.phase {
                Phase::Idle if self.config.role == Role::Edge => return,
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
                Phase::Collecting(open) => {
                    // An edge's share closes with whatever came: the root counts
                    // the quorum over all edges.
                    let quorum = match self.config.role {
                        Role::Edge => 0,
                        _ => self.strategy.quorum(),
                    };
                    match open.phase(quorum, now) {
                        RoundPhase::Collecting | RoundPhase::Idle => return,
                        RoundPhase::Failed => self.abandon_round("closed without a quorum"),
                        RoundPhase::Complete | RoundPhase::DeadlineWithQuorum => {
                            self.close_round();
                            return;
                        }
                    }
                }
                _ => return,
            }
        }
    }

    /// Moves a secure round along: its step closes once every client it waits
    /// for answered or left, or at the step's deadline. Returns whether the
    /// round changed (and may move again).
    fn step_secure(&mut self, now: Instant) -> bool {
        let quorum = match self.config.role {
            Role::Edge => 0,
            _ => self.strategy.quorum(),
        };
        let step_timeout = self
            .config
            .rounds
            .secure
            .map_or(Duration::ZERO, |s| s.step_timeout);
        let Phase::Collecting(open) = &mut self.phase else {
            return false;
        };
        let Some(secure) = &mut open.secure else {
            return false;
        };
        if !secure.server.is_complete() && now < secure.step_deadline {
            return false;
        }
        match secure.server.close() {
            Ok(folio_secagg::Closed::Send(messages)) => {
                // Training happens before the masked input: that step waits
                // until the round's deadline, the others for the step timeout.
                secure.step_deadline = match secure.server.stage() {
                    folio_secagg::Stage::Masked => open.deadline,
                    _ => now + step_timeout,
                };
                for &session in &secure.left {
                    secure.server.leave(session);
                }
                for (session, step) in messages {
                    self.send(vec![session], ServerMessage::Secure(step));
                }
                true
            }
            Ok(folio_secagg::Closed::Unmask(unmasking)) => {
                if unmasking.contributors() < quorum {
                    self.abandon_round("closed without a quorum");
                    return true;
                }
                secure.unmasking = Some(unmasking);
                self.close_round();
                false
            }
            // Rounds that close with whatever came (DP-FedAvg's, whose sample
            // must never be drawn again; an edge's share) close with nothing.
            Err(why) if quorum == 0 => {
                tracing::warn!(round = open.round, "a secure round closes empty: {why}");
                open.secure = None;
                open.reported.clear();
                self.close_round();
                false
            }
            Err(why) => {
                self.abandon_round(&why.to_string());
                true
            }
        }
    }

    /// The bound a secure round's clients clip to (`None` for plain rounds).
    fn secure_bound(&self, ordered: Result<Option<f32>, FedError>) -> Result<Option<f32>, String> {
        if self.config.rounds.secure.is_none() {
            return Ok(None);
        }
        match ordered {
            Ok(Some(bound)) => Ok(Some(bound)),
            Ok(None) => Err("a secure round needs a fixed clip bound".into()),
            Err(err) => Err(format!("a secure round cannot start: {err}")),
        }
    }

    fn try_start_round(&mut self, now: Instant) {
        let round = self.completed_rounds() + 1;
        let candidates: Vec<folio_fed::Candidate> = match self.config.role {
            Role::Root => self.offered.clone(),
            _ => self.candidates(),
        };
        let Some(selected) =
            self.strategy
                .configure_round(round, self.attempt, &candidates, &self.failed)
        else {
            return;
        };
        if self.config.role == Role::Root {
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

    /// Whether `session` may be selected: with device checks on, only once its
    /// device passed.
    pub(crate) fn selectable(&self, session: u64) -> bool {
        self.sessions
            .get(session)
            .is_some_and(|s| !self.config.check_devices || s.check == DeviceCheck::Passed)
    }

    /// The probe `session` was sent, if `id` names it: the answer may be checked.
    pub fn expected_probe(
        &self,
        session: u64,
        id: u64,
    ) -> Result<folio_proto::Probe, ErrorMessage> {
        match self.sessions.get(session) {
            Some(info) if info.probe == Some(id) => Ok(folio_proto::Probe::with_id(id)),
            _ => Err(error(
                ErrorCode::UnknownMessage,
                format!("no device check {id} is awaited from this client"),
            )),
        }
    }

    /// The verdict on `session`'s answer to probe `id`: a device that passed may
    /// be selected; one that failed is told why.
    pub fn device_checked(
        &mut self,
        session: u64,
        id: u64,
        verdict: Result<(), String>,
        now: Instant,
    ) {
        let Some(info) = self
            .sessions
            .get_mut(session)
            .filter(|i| i.probe == Some(id))
        else {
            return;
        };
        info.probe = None;
        match verdict {
            Ok(()) => {
                info.check = DeviceCheck::Passed;
                info.checked_device = Some(info.device());
            }
            Err(why) => {
                tracing::warn!(
                    session,
                    device = info.device(),
                    "device check failed: {why}"
                );
                info.check = DeviceCheck::Failed(why.clone());
                self.count_error(ErrorCode::DeviceCheckFailed);
                self.send(
                    vec![session],
                    ServerMessage::Error(error(ErrorCode::DeviceCheckFailed, why)),
                );
            }
        }
        self.advance(now);
    }

    /// Connected sessions, as a round's candidates.
    pub fn candidates(&self) -> Vec<folio_fed::Candidate> {
        self.sessions
            .connected()
            .filter(|s| self.selectable(s.session))
            .map(|s| folio_fed::Candidate {
                client: s.session,
                size: self.clients.get(&s.client_id).copied().unwrap_or(0) as u64,
                group: s.group,
            })
            .collect()
    }

    /// The Shakespeare client a session trains as.
    pub fn client_of(&self, session: u64) -> Option<&str> {
        self.sessions.get(session).map(|s| s.client_id.as_str())
    }

    /// What round `round`'s clients are sent (with the global model).
    fn round_start(&self, round: u64) -> RoundStart {
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
    fn open_round(
        &mut self,
        round: u64,
        attempt: u32,
        selected: &[u64],
        updates: OpenUpdates,
        secure_bound: Option<f32>,
        now: Instant,
    ) {
        let mut start = self.round_start(round);
        let plan = self.config.rounds.plan(start.seed);
        let allowed_examples: BTreeMap<u64, u64> = selected
            .iter()
            .filter_map(|&s| {
                let client = &self.sessions.get(s)?.client_id;
                Some((s, plan.max_examples(self.clients[client])))
            })
            .collect();
        let secure = match (self.config.rounds.secure, secure_bound) {
            (Some(settings), Some(bound)) => {
                let strategy = &self.config.rounds.strategy;
                let by_examples = strategy.weighting == folio_fed::Weighting::Examples
                    && strategy.kind != folio_fed::StrategyKind::DpFedAvg;
                let most = allowed_examples.values().copied().max().unwrap_or(1);
                let spec =
                    secure::spec(&settings, allowed_examples.len(), most, bound, by_examples);
                let mut graph_seed = [0u8; 32];
                getrandom::fill(&mut graph_seed).expect("the OS random number generator works");
                let sessions = allowed_examples.keys().copied();
                match folio_secagg::SecureServer::new(
                    spec,
                    self.config.num_params(),
                    sessions,
                    graph_seed,
                ) {
                    Ok(server) => {
                        start.secure = Some(spec);
                        Some(Box::new(SecureOpen {
                            server,
                            spec,
                            step_deadline: now + settings.step_timeout,
                            unmasking: None,
                            left: BTreeSet::new(),
                        }))
                    }
                    Err(err) => {
                        tracing::error!("no secure round can start: {err}");
                        return;
                    }
                }
            }
            _ => None,
        };
        // A client that holds the model (a retried round, a reloaded tab) is sent
        // the round without it.
        let (mut with, mut without, mut away) = (Vec::new(), Vec::new(), Vec::new());
        for &s in allowed_examples.keys() {
            let info = self.sessions.get_mut(s).expect("selected among known");
            if !info.connected {
                away.push(s);
                continue;
            }
            if info.held_model == Some(start.model) {
                without.push(s);
            } else {
                with.push(s);
            }
            info.held_model = Some(start.model);
        }
        for (to, held) in [(with, false), (without, true)] {
            if !to.is_empty() {
                self.send(to, round_message(&start, start.deadline_ms, held));
            }
        }
        let deadline = self.config.rounds.deadline;
        let mut open = OpenRound::new(start, attempt, allowed_examples, updates, now, deadline);
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

    /// A root opens `round` for the selected sessions, on their edges.
    fn order_round(&mut self, round: u64, selected: Vec<u64>, now: Instant) {
        let bound = match self.strategy.ordered_bound(&self.global.state) {
            Ok(bound) => bound,
            Err(err) => {
                tracing::error!("no round can start: {err}");
                return;
            }
        };
        self.actions.push_back(Action::Order(RoundOrder {
            round,
            attempt: self.attempt,
            model: self.global.fingerprint,
            clip_bound: bound,
            sessions: selected.clone(),
        }));
        let mut start = self.round_start(round);
        start.weights = None;
        let shares = OpenUpdates::new(Shares {
            bound,
            parts: Vec::new(),
        });
        let selected = selected.into_iter().map(|s| (s, 0)).collect();
        let deadline = self.config.rounds.deadline + PART_GRACE;
        self.phase = Phase::Collecting(OpenRound::new(
            start,
            self.attempt,
            selected,
            shares,
            now,
            deadline,
        ));
    }

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
    pub fn part(&mut self, report: PartReport, part: Partial, now: Instant) -> Result<(), String> {
        let Phase::Collecting(open) = &mut self.phase else {
            return Err("no round is open".into());
        };
        if (report.round, report.attempt) != (open.round, open.attempt) {
            return Err(format!(
                "a share of round {} attempt {}; round {} attempt {} is open",
                report.round, report.attempt, open.round, open.attempt
            ));
        }
        if let Some(s) = report
            .reported
            .iter()
            .chain(&report.dropped)
            .find(|&&s| !open.is_training(s))
        {
            return Err(format!("the share names session {s}, which is not awaited"));
        }
        if part.updates != report.reported.len() {
            return Err(format!(
                "the share folds {} updates but names {} reporters",
                part.updates,
                report.reported.len()
            ));
        }
        let shares: &mut Shares = open
            .updates
            .get_mut()
            .map_err(|_| "this engine is no root".to_owned())?;
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

    /// An edge starts the round its root ordered, for the sessions it holds (a
    /// repeated order changes nothing; a later attempt replaces the open one).
    pub fn order(&mut self, order: &RoundOrder, now: Instant) -> Result<(), String> {
        if order.model != self.global.fingerprint {
            return Err(format!(
                "round {} trains model {:016x}; this edge holds {:016x}",
                order.round, order.model, self.global.fingerprint
            ));
        }
        if let Phase::Collecting(open) = &self.phase {
            if (open.round, open.attempt) >= (order.round, order.attempt) {
                return Ok(());
            }
            self.abandon_round("was ordered again");
        }
        let updates = self
            .strategy
            .open_part(order.clip_bound, self.config.num_params())
            .map_err(|err| err.to_string())?;
        let mine: Vec<u64> = order
            .sessions
            .iter()
            .copied()
            .filter(|&s| self.sessions.get(s).is_some())
            .collect();
        let bound = self.secure_bound(Ok(order.clip_bound))?;
        self.open_round(order.round, order.attempt, &mine, updates, bound, now);
        self.advance(now);
        Ok(())
    }

    /// An edge takes the root's commit of `record.round` as its global model.
    pub fn adopt(&mut self, record: RoundRecord, weights: Vec<f32>, now: Instant) {
        if record.round <= self.completed_rounds() && !self.history.is_empty() {
            return;
        }
        if matches!(&self.phase, Phase::Collecting(open) if open.round <= record.round) {
            self.abandon_round("was committed without this edge's share");
        }
        self.global = Global {
            encoded: encode_model(&weights, self.config.rounds.model_encoding),
            weights: Arc::new(weights),
            fingerprint: 0,
            state: self.global.state.clone(),
        };
        self.global.fingerprint =
            folio_proto::model_fingerprint(self.config.rounds.model_encoding, &self.global.encoded);
        if record.round > 0 {
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
        self.history.push(record);
        self.advance(now);
    }

    /// The fingerprint of the global model.
    pub fn fingerprint(&self) -> u64 {
        self.global.fingerprint
    }

    /// Ends a round that cannot close: nothing changes, the selected clients that
    /// did not report are told, and the round runs again with a fresh sample that
    /// avoids them.
    fn abandon_round(&mut self, why: &str) {
        let Phase::Collecting(open) = std::mem::replace(&mut self.phase, Phase::Idle) else {
            return;
        };
        let failed: Vec<u64> = open.failed().collect();
        self.failed.extend(failed.iter().copied());
        self.attempt += 1;
        self.send(
            failed,
            ServerMessage::Error(error(
                ErrorCode::RoundClosed,
                format!("round {} {why}; it will run again", open.round),
            )),
        );
    }

    /// Closes the open round: its updates go out to be aggregated.
    fn close_round(&mut self) {
        let Phase::Collecting(mut open) = std::mem::replace(&mut self.phase, Phase::Idle) else {
            return;
        };
        // A secure round's updates are its sum, once unmasked.
        let secure = open.secure.take().map(|secure| *secure);
        if let Some(SecureOpen {
            server,
            spec,
            unmasking: Some(unmasking),
            ..
        }) = secure
        {
            open.reported = server.contributors().into_iter().collect();
            open.updates = OpenUpdates::new(SecureSum { unmasking, spec });
            open.secure_sum = true;
        }
        let late: Vec<u64> = open
            .failed()
            .filter(|s| !open.dropped.contains(s))
            .collect();
        self.send(
            late,
            ServerMessage::Error(error(
                ErrorCode::RoundClosed,
                format!(
                    "round {} closed on quorum; your update will be ignored",
                    open.round
                ),
            )),
        );
        if self.config.role == Role::Edge {
            let report = PartReport {
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
            self.actions.push_back(Action::Part(PartJob {
                report,
                strategy: self.strategy.clone(),
                updates: open.updates,
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
            secure: open.secure_sum,
            staleness: None,
        };
        self.actions.push_back(Action::Aggregate(AggregateJob {
            round: open.round,
            strategy: self.strategy.clone(),
            updates: open.updates,
            weights: self.global.weights.clone(),
            state: self.global.state.clone(),
            model_encoding: self.config.rounds.model_encoding,
        }));
        self.phase = Phase::Aggregating(closing);
    }

    fn send(&mut self, to: Vec<u64>, message: ServerMessage) {
        // A root's sessions live on its edges, which tell them themselves.
        if !to.is_empty() && self.config.role != Role::Root {
            self.actions.push_back(Action::Send {
                to,
                message: Arc::new(message),
            });
        }
    }
}

/// `start` as a message due `deadline_ms` from now, its weights left out when the
/// client holds them.
fn round_message(start: &RoundStart, deadline_ms: u64, held: bool) -> ServerMessage {
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
