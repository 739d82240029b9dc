//! The aggregator's state and its round state machine, free of sockets and tasks:
//! connections come in as [`Federation::join`], frames as
//! [`Federation::handle_update`], and the round driver (`lib.rs`) calls
//! [`Federation::try_start_round`], [`Federation::round_phase`] and
//! [`Federation::close_round`].

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use folio_data::Corpus;
use folio_fed::sampling::sample_clients;
use folio_fed::{Aggregator, ServerOptimizer, codec};
use folio_model::ModelConfig;
use folio_proto::{
    ClientKind, ErrorCode, ErrorMessage, Join, ModelShape, PROTOCOL_VERSION, RoundResult,
    RoundStart, ServerMessage, Update, Welcome,
};
use serde::Serialize;
use tokio::sync::mpsc::UnboundedSender;

use crate::config::RoundConfig;

/// Frames queued for one connection.
pub type Outbox = UnboundedSender<Vec<u8>>;

/// Frames to hand to connections once the lock is released.
pub type Deliveries = Vec<(Outbox, Vec<u8>)>;

/// One round's figures, as the status API and the metrics history show them.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct RoundRecord {
    /// 0 is the initial model, before any round.
    pub round: u64,
    pub clients: usize,
    pub train_loss: Option<f64>,
    pub train_accuracy: Option<f64>,
    pub eval_loss: f64,
    pub eval_accuracy: f64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub seconds: f64,
}

/// A client's latest round.
#[derive(Debug, Clone, Serialize)]
pub struct ClientRound {
    pub round: u64,
    pub examples: u64,
    pub train_loss: f32,
    pub train_accuracy: f32,
    pub train_seconds: f32,
}

#[derive(Debug, Clone, Serialize)]
pub struct SessionInfo {
    pub session: u64,
    pub client_id: String,
    pub kind: &'static str,
    pub backend: String,
    pub adapter: Option<String>,
    pub connected: bool,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub rounds: u64,
    pub last: Option<ClientRound>,
    /// Rounds this client reported in.
    pub reported_rounds: Vec<u64>,
    #[serde(skip)]
    resume_token: String,
    #[serde(skip)]
    outbox: Option<Outbox>,
}

/// The round in progress.
struct OpenRound {
    round: u64,
    selected: BTreeSet<u64>,
    reported: BTreeSet<u64>,
    aggregator: Aggregator,
    deadline: Instant,
    started: Instant,
    loss_sum: f64,
    accuracy_sum: f64,
    examples: u64,
    bytes_up: u64,
    bytes_down: u64,
}

/// Where the open round stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoundPhase {
    /// No round open.
    Idle,
    /// Still waiting for updates.
    Collecting,
    /// Every selected client that is still connected has reported.
    Complete,
    /// The deadline passed with at least a quorum of updates.
    DeadlineWithQuorum,
    /// The deadline passed without a quorum (or nobody is left to report).
    Failed,
}

/// What closing a round produced: the new global weights, before evaluation.
pub struct ClosedRound {
    pub round: u64,
    pub clients: usize,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub seconds: f64,
    pub weights: Vec<f32>,
}

pub struct Federation {
    pub model: ModelConfig,
    pub preset: String,
    pub config: RoundConfig,
    pub seed: u64,
    join_token: Option<String>,
    /// The next round to run (1-based).
    pub round: u64,
    pub weights: Vec<f32>,
    pub optimizer: ServerOptimizer,
    /// Shakespeare clients with training data, in the order they are handed out.
    pool: Vec<String>,
    corpus: Corpus,
    sessions: BTreeMap<u64, SessionInfo>,
    next_session: u64,
    open: Option<OpenRound>,
    pub errors: BTreeMap<&'static str, u64>,
    pub history: Vec<RoundRecord>,
}

fn error(code: ErrorCode, message: impl Into<String>) -> ErrorMessage {
    ErrorMessage {
        code,
        message: message.into(),
    }
}

impl Federation {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        model: ModelConfig,
        preset: String,
        config: RoundConfig,
        seed: u64,
        join_token: Option<String>,
        corpus: Corpus,
        weights: Vec<f32>,
        optimizer: ServerOptimizer,
        completed_rounds: u64,
        history: Vec<RoundRecord>,
    ) -> Self {
        let batch = folio_data::BatchConfig::padded(0);
        let eligible: Vec<String> = corpus
            .clients
            .iter()
            .filter(|c| folio_data::batch::batch_count(c.train_text().len(), &batch) > 0)
            .map(|c| c.id.clone())
            .collect();
        let pool = sample_clients(&eligible, eligible.len(), seed, 0);
        Self {
            model,
            preset,
            config,
            seed,
            join_token,
            round: completed_rounds + 1,
            weights,
            optimizer,
            pool,
            corpus,
            sessions: BTreeMap::new(),
            next_session: 1,
            open: None,
            errors: BTreeMap::new(),
            history,
        }
    }

    pub fn segments(&self) -> Vec<usize> {
        self.model
            .param_shapes()
            .iter()
            .map(|(_, shape)| shape.iter().product())
            .collect()
    }

    /// Counts a rejected input for the status API.
    pub fn count_error(&mut self, code: ErrorCode) {
        *self.errors.entry(code.name()).or_default() += 1;
    }

    pub fn sessions(&self) -> impl Iterator<Item = &SessionInfo> {
        self.sessions.values()
    }

    pub fn connected(&self) -> usize {
        self.sessions.values().filter(|s| s.connected).count()
    }

    /// Admits a connection: a new session (with the next free Shakespeare client,
    /// or the one asked for) or a resumed one.
    pub fn join(&mut self, join: Join, outbox: Outbox) -> Result<(u64, Welcome), ErrorMessage> {
        if join.protocol != PROTOCOL_VERSION {
            return Err(error(
                ErrorCode::ProtocolVersion,
                format!(
                    "client speaks protocol {}, server {PROTOCOL_VERSION}",
                    join.protocol
                ),
            ));
        }
        if self.join_token.is_some() && join.token != self.join_token {
            return Err(error(ErrorCode::BadToken, "missing or wrong join token"));
        }
        let resumed = join.resume.as_ref().and_then(|token| {
            self.sessions
                .values()
                .find(|s| &s.resume_token == token && !s.connected)
                .map(|s| s.session)
        });
        let session = match resumed {
            Some(session) => session,
            None => {
                let client_id = self.pick_client(join.client.as_deref())?;
                let session = self.next_session;
                self.next_session += 1;
                self.sessions.insert(
                    session,
                    SessionInfo {
                        session,
                        client_id,
                        kind: match join.kind {
                            ClientKind::Native => "native",
                            ClientKind::Browser => "browser",
                        },
                        backend: String::new(),
                        adapter: None,
                        connected: false,
                        bytes_up: 0,
                        bytes_down: 0,
                        rounds: 0,
                        last: None,
                        reported_rounds: Vec::new(),
                        resume_token: format!(
                            "{:016x}-{session}",
                            self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ session
                        ),
                        outbox: None,
                    },
                );
                session
            }
        };
        let info = self
            .sessions
            .get_mut(&session)
            .expect("session just found or made");
        info.connected = true;
        info.backend = join.backend;
        info.adapter = join.adapter;
        info.outbox = Some(outbox);
        let client = self
            .corpus
            .client(&info.client_id)
            .expect("pool holds corpus ids");
        let welcome = Welcome {
            session: info.resume_token.clone(),
            client_id: info.client_id.clone(),
            train_text: client.train_text(),
            preset: self.preset.clone(),
            model: ModelShape {
                vocab: self.model.vocab as u32,
                embed: self.model.embed as u32,
                hidden: self.model.hidden as u32,
            },
            batch_size: self.config.batch_size,
            seq_len: self.config.seq_len,
        };
        Ok((session, welcome))
    }

    fn pick_client(&self, wanted: Option<&str>) -> Result<String, ErrorMessage> {
        let taken: BTreeSet<&str> = self
            .sessions
            .values()
            .filter(|s| s.connected)
            .map(|s| s.client_id.as_str())
            .collect();
        match wanted {
            Some(wanted) => {
                let id = self
                    .corpus
                    .client(wanted)
                    .map_err(|err| error(ErrorCode::UnknownClient, err.to_string()))?
                    .id
                    .clone();
                if taken.contains(id.as_str()) {
                    return Err(error(
                        ErrorCode::NoFreeClient,
                        format!("{id} is already training in another connection"),
                    ));
                }
                Ok(id)
            }
            None => {
                // A client no session ever had, else one whose session left.
                let ever: BTreeSet<&str> = self
                    .sessions
                    .values()
                    .map(|s| s.client_id.as_str())
                    .collect();
                self.pool
                    .iter()
                    .find(|id| !ever.contains(id.as_str()))
                    .or_else(|| self.pool.iter().find(|id| !taken.contains(id.as_str())))
                    .cloned()
                    .ok_or_else(|| {
                        error(ErrorCode::NoFreeClient, "every Shakespeare client is taken")
                    })
            }
        }
    }

    /// A connection ended: its session stays (to be resumed) but leaves any round.
    pub fn disconnect(&mut self, session: u64) {
        if let Some(info) = self.sessions.get_mut(&session) {
            info.connected = false;
            info.outbox = None;
        }
        if let Some(open) = &mut self.open
            && !open.reported.contains(&session)
        {
            open.selected.remove(&session);
        }
    }

    pub fn add_bytes(&mut self, session: u64, up: u64, down: u64) {
        if let Some(info) = self.sessions.get_mut(&session) {
            info.bytes_up += up;
            info.bytes_down += down;
        }
        if let Some(open) = &mut self.open {
            open.bytes_up += up;
            open.bytes_down += down;
        }
    }

    /// Opens the next round if enough clients are connected; returns the frames
    /// to send (one per selected client).
    pub fn try_start_round(&mut self, now: Instant) -> Option<Deliveries> {
        if self.open.is_some() {
            return None;
        }
        let connected: Vec<u64> = self
            .sessions
            .values()
            .filter(|s| s.connected)
            .map(|s| s.session)
            .collect();
        if connected.len() < self.config.min_clients.max(1) {
            return None;
        }
        let selected = sample_clients(
            &connected,
            self.config.clients_per_round,
            self.seed,
            self.round,
        );
        let weights = codec::encode(
            &self.weights,
            &[self.weights.len()],
            folio_fed::Encoding::F32,
        );
        let frame = folio_proto::encode(&ServerMessage::RoundStart(RoundStart {
            round: self.round,
            weights,
            deadline_ms: self.config.deadline.as_millis() as u64,
            local_epochs: self.config.local_epochs,
            max_batches: self.config.max_batches,
            optimizer: self.config.client_optimizer,
            learning_rate: self.config.client_lr,
            clip_norm: self.config.clip_norm,
            delta_encoding: self.config.delta_encoding,
            seed: self.seed ^ self.round,
        }));
        let sends: Deliveries = selected
            .iter()
            .filter_map(|s| {
                self.sessions[s]
                    .outbox
                    .clone()
                    .map(|outbox| (outbox, frame.clone()))
            })
            .collect();
        self.open = Some(OpenRound {
            round: self.round,
            selected: selected.into_iter().collect(),
            reported: BTreeSet::new(),
            aggregator: Aggregator::new(self.weights.len(), self.config.weighting),
            deadline: now + self.config.deadline,
            started: now,
            loss_sum: 0.0,
            accuracy_sum: 0.0,
            examples: 0,
            bytes_up: 0,
            bytes_down: 0,
        });
        Some(sends)
    }

    pub fn round_phase(&self, now: Instant) -> RoundPhase {
        let Some(open) = &self.open else {
            return RoundPhase::Idle;
        };
        let reported = open.reported.len();
        let waiting = open.selected.len() - reported;
        if waiting == 0 {
            return if reported == 0 {
                RoundPhase::Failed
            } else {
                RoundPhase::Complete
            };
        }
        if now < open.deadline {
            return RoundPhase::Collecting;
        }
        if reported >= self.config.quorum.max(1) {
            RoundPhase::DeadlineWithQuorum
        } else {
            RoundPhase::Failed
        }
    }

    /// Folds one client's update into the open round, or says why not. A refused
    /// update changes nothing.
    pub fn handle_update(&mut self, session: u64, update: Update) -> Result<(), ErrorMessage> {
        let segments = self.segments();
        let Some(open) = &mut self.open else {
            return Err(error(
                ErrorCode::RoundClosed,
                format!(
                    "no round is open; update for round {} ignored",
                    update.round
                ),
            ));
        };
        if update.round != open.round {
            let code = if update.round < open.round {
                ErrorCode::RoundClosed
            } else {
                ErrorCode::WrongRound
            };
            return Err(error(
                code,
                format!(
                    "update for round {}, the open round is {}",
                    update.round, open.round
                ),
            ));
        }
        if open.reported.contains(&session) {
            return Err(error(
                ErrorCode::DuplicateUpdate,
                format!("a second update for round {}", open.round),
            ));
        }
        if !open.selected.contains(&session) {
            return Err(error(
                ErrorCode::NotSelected,
                format!("this client was not selected for round {}", open.round),
            ));
        }
        let delta = codec::decode(&update.delta, &segments, update.encoding)
            .map_err(|err| error(ErrorCode::BadDelta, err.to_string()))?;
        if !(update.train_loss.is_finite() && update.train_accuracy.is_finite()) {
            return Err(error(ErrorCode::BadDelta, "train metrics are not finite"));
        }
        open.aggregator
            .add(&delta, update.examples)
            .map_err(|err| error(ErrorCode::BadDelta, err.to_string()))?;
        open.reported.insert(session);
        open.loss_sum += f64::from(update.train_loss) * update.examples as f64;
        open.accuracy_sum += f64::from(update.train_accuracy) * update.examples as f64;
        open.examples += update.examples;
        let info = self
            .sessions
            .get_mut(&session)
            .expect("selected sessions exist");
        info.rounds += 1;
        info.reported_rounds.push(update.round);
        info.last = Some(ClientRound {
            round: update.round,
            examples: update.examples,
            train_loss: update.train_loss,
            train_accuracy: update.train_accuracy,
            train_seconds: update.train_seconds,
        });
        Ok(())
    }

    /// Ends a round that failed (no quorum): nothing changes, the selected clients
    /// that did not report are told, and the same round number runs again.
    pub fn abandon_round(&mut self) -> Deliveries {
        let Some(open) = self.open.take() else {
            return Vec::new();
        };
        let frame = folio_proto::encode(&ServerMessage::Error(error(
            ErrorCode::RoundClosed,
            format!(
                "round {} closed without a quorum; it will run again",
                open.round
            ),
        )));
        self.outboxes(open.selected.difference(&open.reported).copied(), &frame)
    }

    /// Aggregates the open round and moves the global weights. Tells clients that
    /// were selected but did not report that the round is closed.
    pub fn close_round(&mut self, now: Instant) -> Option<(ClosedRound, Deliveries)> {
        let open = self.open.take()?;
        let mean = open.aggregator.mean().ok()?;
        self.optimizer
            .step(&mut self.weights, &mean)
            .expect("the aggregator checked the length");
        let late = folio_proto::encode(&ServerMessage::Error(error(
            ErrorCode::RoundClosed,
            format!(
                "round {} closed on quorum; your update will be ignored",
                open.round
            ),
        )));
        let notices = self.outboxes(open.selected.difference(&open.reported).copied(), &late);
        let examples = open.examples.max(1) as f64;
        let closed = ClosedRound {
            round: open.round,
            clients: open.reported.len(),
            train_loss: open.loss_sum / examples,
            train_accuracy: open.accuracy_sum / examples,
            bytes_up: open.bytes_up,
            bytes_down: open.bytes_down,
            seconds: now.duration_since(open.started).as_secs_f64(),
            weights: self.weights.clone(),
        };
        self.round += 1;
        Some((closed, notices))
    }

    /// Records an evaluated round and returns the result frame for every connection.
    pub fn record(&mut self, record: RoundRecord) -> Deliveries {
        let frame = folio_proto::encode(&ServerMessage::RoundResult(RoundResult {
            round: record.round,
            clients: record.clients as u32,
            eval_loss: record.eval_loss as f32,
            eval_accuracy: record.eval_accuracy as f32,
        }));
        self.history.push(record);
        let everyone: Vec<u64> = self.sessions.keys().copied().collect();
        self.outboxes(everyone.into_iter(), &frame)
    }

    fn outboxes(&self, sessions: impl Iterator<Item = u64>, frame: &[u8]) -> Deliveries {
        sessions
            .filter_map(|s| self.sessions.get(&s)?.outbox.clone())
            .map(|outbox| (outbox, frame.to_vec()))
            .collect()
    }

    /// The open round's number and how long until its deadline.
    pub fn open_round(&self, now: Instant) -> Option<(u64, Duration, usize, usize)> {
        self.open.as_ref().map(|open| {
            (
                open.round,
                open.deadline.saturating_duration_since(now),
                open.selected.len(),
                open.reported.len(),
            )
        })
    }
}
