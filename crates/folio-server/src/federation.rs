//! The aggregator's state and its round state machine, free of sockets and tasks:
//! a checked join comes in as [`Federation::join`], a decoded update as
//! [`Federation::handle_update`], and the driver (`driver.rs`) calls
//! [`Federation::try_start_round`], [`Federation::round_phase`],
//! [`Federation::aggregate_round`] and [`Federation::commit`]. The decisions
//! (selection, quorum, weights, robust aggregation, server optimizer) belong to
//! the [`Strategy`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use folio_data::{BatchConfig, Corpus, vocab};
use folio_fed::codec::CheckedDelta;
use folio_fed::sampling::sample_clients;
use folio_fed::strategy::{Aggregated, RobustFedAvg};
use folio_fed::{FedError, Strategy, StrategyState, codec};
use folio_model::ModelConfig;
use folio_proto::{
    ErrorCode, ErrorMessage, ModelShape, RoundResult, RoundStart, ServerMessage, Welcome,
};

use crate::config::RoundConfig;
use crate::limits::Limits;
use crate::record::RoundRecord;
use crate::round::{OpenRound, RoundPhase};
use crate::sessions::{ClientRound, Outbox, SessionError, SessionInfo, Sessions};

/// Frames to hand to connections once the lock is released.
pub type Deliveries = Vec<(Outbox, Bytes)>;

/// `start` as a frame, due `deadline_ms` from now, its weights left out when the
/// client holds them.
fn round_frame(start: &RoundStart, deadline_ms: u64, held: bool) -> Bytes {
    let start = RoundStart {
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
    };
    Bytes::from(folio_proto::encode(&ServerMessage::RoundStart(start)))
}

pub fn error(code: ErrorCode, message: impl Into<String>) -> ErrorMessage {
    ErrorMessage {
        code,
        message: message.into(),
    }
}

/// A join that passed the checks that need no lock (sizes, protocol, token, the
/// client id resolved against the corpus).
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
}

/// An update whose delta is checked, against the round it names.
#[derive(Debug, Clone)]
pub struct DecodedUpdate {
    pub round: u64,
    pub examples: u64,
    pub delta: CheckedDelta,
    pub train_loss: f32,
    pub train_accuracy: f32,
    pub train_seconds: f32,
}

/// A round aggregated but not yet evaluated, saved or committed.
pub struct ClosedRound {
    pub round: u64,
    pub clients: usize,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub seconds: f64,
    pub aggregated: Aggregated,
}

pub struct Federation {
    pub model: ModelConfig,
    pub preset: String,
    pub config: RoundConfig,
    pub limits: Limits,
    strategy: RobustFedAvg,
    /// The next round to run (1-based).
    pub round: u64,
    pub weights: Vec<f32>,
    pub state: StrategyState,
    /// Shakespeare clients with training data, in the order they are handed out.
    pool: Vec<String>,
    /// Characters (ids) of each pool client's training text.
    train_ids: BTreeMap<String, usize>,
    corpus: Arc<Corpus>,
    pub sessions: Sessions,
    open: Option<OpenRound>,
    /// Attempts of round `round` abandoned so far, and who failed them.
    attempt: u32,
    failed: BTreeSet<u64>,
    pub errors: BTreeMap<&'static str, u64>,
    pub history: Vec<RoundRecord>,
}

pub struct FederationInit {
    pub model: ModelConfig,
    pub preset: String,
    pub config: RoundConfig,
    pub limits: Limits,
    pub seed: u64,
    pub corpus: Arc<Corpus>,
    pub weights: Vec<f32>,
    pub state: Option<StrategyState>,
    pub history: Vec<RoundRecord>,
}

impl Federation {
    pub fn new(init: FederationInit) -> Self {
        let FederationInit {
            model,
            preset,
            config,
            limits,
            seed,
            corpus,
            weights,
            state,
            history,
        } = init;
        let batch = BatchConfig::padded(0);
        let train_ids: BTreeMap<String, usize> = corpus
            .clients
            .iter()
            .map(|c| (c.id.clone(), vocab::encode(&c.train_text()).0.len()))
            .filter(|(_, len)| folio_data::batch::batch_count(*len, &batch) > 0)
            .collect();
        let eligible: Vec<String> = corpus
            .clients
            .iter()
            .filter(|c| train_ids.contains_key(&c.id))
            .map(|c| c.id.clone())
            .collect();
        let pool = sample_clients(&eligible, eligible.len(), seed, 0);
        let strategy = RobustFedAvg::new(config.strategy, seed);
        let state = state.unwrap_or_else(|| strategy.initial_state(model.num_params()));
        let completed = history.last().map_or(0, |r| r.round);
        Self {
            model,
            preset,
            config,
            limits,
            strategy,
            round: completed + 1,
            weights,
            state,
            pool,
            train_ids,
            corpus,
            sessions: Sessions::new(),
            open: None,
            attempt: 0,
            failed: BTreeSet::new(),
            errors: BTreeMap::new(),
            history,
        }
    }

    pub fn strategy(&self) -> &RobustFedAvg {
        &self.strategy
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

    pub fn connected(&self) -> usize {
        self.sessions.connected().count()
    }

    /// The most examples `client_id` can train on in one round: what its data and
    /// the round's epochs and batches allow.
    pub fn allowed_examples(&self, client_id: &str) -> u64 {
        let ids = self.train_ids.get(client_id).copied().unwrap_or(0);
        self.config.allowed_examples(ids)
    }

    /// Admits a connection: a resumed session, or a new one with the client asked
    /// for or the next free one.
    pub fn join(
        &mut self,
        join: CheckedJoin,
        outbox: Outbox,
        now: Instant,
    ) -> Result<(u64, Welcome), ErrorMessage> {
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
                "the server holds as many sessions as it allows; try again later",
            ),
        };
        let resumed = match &join.resume {
            Some(token) => self.sessions.find_resumable(token).map_err(session_error)?,
            None => None,
        };
        let session = match resumed {
            Some(session) => session,
            None => {
                let client = self
                    .sessions
                    .pick_client(join.client.as_deref(), &self.pool)
                    .map_err(session_error)?;
                if !self.train_ids.contains_key(&client) {
                    return Err(error(
                        ErrorCode::UnknownClient,
                        format!("{client} has no training text to train on"),
                    ));
                }
                self.sessions
                    .create(
                        client,
                        join.kind,
                        self.limits.max_sessions,
                        now,
                        self.limits.session_ttl,
                    )
                    .map_err(session_error)?
            }
        };
        self.sessions.connect(session, outbox);
        let info = self.sessions.get_mut(session).expect("session just made");
        info.backend = join.backend;
        info.adapter = join.adapter;
        info.held_model = join.held_model;
        let client = self
            .corpus
            .client(&info.client_id)
            .expect("pool holds corpus ids");
        let welcome = Welcome {
            session: info.token(),
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

    /// A connection ended: its session can be resumed until it expires; if it was
    /// training in the open round, the round counts it as dropped.
    pub fn disconnect(&mut self, session: u64, now: Instant) {
        self.sessions.disconnect(session, now);
        if let Some(open) = &mut self.open
            && open.is_training(session)
        {
            open.dropped.insert(session);
        }
    }

    /// Forgets sessions disconnected for longer than the TTL.
    pub fn expire_sessions(&mut self, now: Instant) -> usize {
        self.sessions.expire(now, self.limits.session_ttl)
    }

    pub fn add_bytes(&mut self, session: u64, up: u64, down: u64) {
        if let Some(info) = self.sessions.get_mut(session) {
            info.bytes_up = info.bytes_up.saturating_add(up);
            info.bytes_down = info.bytes_down.saturating_add(down);
        }
        if let Some(open) = &mut self.open {
            open.bytes_up = open.bytes_up.saturating_add(up);
            open.bytes_down = open.bytes_down.saturating_add(down);
        }
    }

    /// May `session` stay silent now? Yes while it trains in the open round,
    /// until the round's deadline.
    pub fn silent_until(&self, session: u64) -> Option<Instant> {
        self.open
            .as_ref()
            .filter(|open| open.is_training(session))
            .map(|open| open.deadline)
    }

    /// A session selected in the open round that left before it reported and has
    /// rejoined (a reloaded tab) gets the round again, for the time that is left,
    /// without the weights if it kept them.
    pub fn rejoin_open_round(&mut self, session: u64, now: Instant) -> Option<Bytes> {
        let open = self.open.as_mut()?;
        if !open.dropped.remove(&session) {
            return None;
        }
        let deadline_ms = open.seconds_left(now).as_millis() as u64;
        let info = self.sessions.get_mut(session)?;
        let held = info.held_model == Some(open.start.model);
        info.held_model = Some(open.start.model);
        Some(round_frame(&open.start, deadline_ms, held))
    }

    /// Opens the next round if the strategy finds enough clients; returns the
    /// frames to send (one per selected client).
    pub fn try_start_round(&mut self, now: Instant) -> Option<Deliveries> {
        if self.open.is_some() {
            return None;
        }
        let connected: Vec<u64> = self.sessions.connected().map(|s| s.session).collect();
        let selected =
            self.strategy
                .configure_round(self.round, self.attempt, &connected, &self.failed)?;
        let weights = codec::encode(
            &self.weights,
            &[self.weights.len()],
            self.config.model_encoding,
        );
        let start = RoundStart {
            round: self.round,
            model: folio_proto::model_fingerprint(self.config.model_encoding, &weights),
            weights: Some(weights),
            weights_encoding: self.config.model_encoding,
            deadline_ms: self.config.deadline.as_millis() as u64,
            local_epochs: self.config.local_epochs,
            max_batches: self.config.max_batches,
            optimizer: self.config.client_optimizer,
            learning_rate: self.config.client_lr_at(self.round),
            clip_norm: self.config.clip_norm,
            delta_encoding: self.config.delta_encoding,
            seed: self.strategy.seed ^ self.round,
        };
        let allowed_examples = selected
            .iter()
            .map(|&s| {
                let client = &self.sessions.get(s).expect("connected").client_id;
                (s, self.allowed_examples(client))
            })
            .collect();
        // A client that holds the model (a retried round, a reloaded tab) is sent
        // the round without it.
        let mut frames: [Option<Bytes>; 2] = [None, None];
        let sends: Deliveries = selected
            .iter()
            .filter_map(|&s| {
                let info = self.sessions.get_mut(s)?;
                let outbox = info.outbox.clone()?;
                let held = info.held_model == Some(start.model);
                info.held_model = Some(start.model);
                let frame = frames[usize::from(held)]
                    .get_or_insert_with(|| round_frame(&start, start.deadline_ms, held));
                Some((outbox, frame.clone()))
            })
            .collect();
        let updates = self
            .strategy
            .open_round(&self.state, self.model.num_params());
        self.open = Some(OpenRound::new(
            start,
            self.attempt,
            allowed_examples,
            updates,
            now,
            self.config.deadline,
        ));
        Some(sends)
    }

    pub fn round_phase(&self, now: Instant) -> RoundPhase {
        match &self.open {
            None => RoundPhase::Idle,
            Some(open) => open.phase(self.strategy.quorum(), now),
        }
    }

    /// The round an update may be for and how its delta must be encoded: checked
    /// before the delta is decoded (outside the lock).
    pub fn expected_update(&self, session: u64, round: u64) -> Result<(), ErrorMessage> {
        let Some(open) = &self.open else {
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
        Ok(())
    }

    /// The open round's delta encoding.
    pub fn round_encoding(&self) -> Option<folio_fed::Encoding> {
        self.open.as_ref().map(|open| open.encoding)
    }

    /// Folds one client's update into the open round, or says why not. A refused
    /// update changes nothing.
    pub fn handle_update(
        &mut self,
        session: u64,
        update: DecodedUpdate,
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
        let open = self.open.as_mut().expect("checked above");
        let allowed = open.allowed_examples.get(&session).copied().unwrap_or(0);
        self.strategy
            .accept(&mut open.updates, &update.delta, update.examples, allowed)
            .map_err(|err| match err {
                FedError::BadExamples { .. } => error(ErrorCode::BadExamples, err.to_string()),
                _ => error(ErrorCode::BadDelta, err.to_string()),
            })?;
        // Bounded by `allowed`, so none of these sums can overflow.
        open.reported.insert(session);
        let examples = update.examples as f64;
        open.loss_sum += f64::from(update.train_loss) * examples;
        open.accuracy_sum += f64::from(update.train_accuracy) * examples;
        open.examples += update.examples;
        if let Some(info) = self.sessions.get_mut(session) {
            info.reported(ClientRound {
                round: update.round,
                examples: update.examples,
                train_loss: update.train_loss,
                train_accuracy: update.train_accuracy,
                train_seconds: update.train_seconds,
            });
        }
        Ok(())
    }

    /// Ends a round that cannot close: nothing changes, the selected clients that
    /// did not report are told, and the round runs again with a fresh sample that
    /// avoids them.
    pub fn abandon_round(&mut self, why: &str) -> Deliveries {
        let Some(open) = self.open.take() else {
            return Vec::new();
        };
        let failed: Vec<u64> = open.failed().collect();
        self.failed.extend(failed.iter().copied());
        self.attempt += 1;
        let frame = Bytes::from(folio_proto::encode(&ServerMessage::Error(error(
            ErrorCode::RoundClosed,
            format!("round {} {why}; it will run again", open.round),
        ))));
        self.outboxes(failed.into_iter(), &frame)
    }

    /// Aggregates the open round into a candidate model; nothing is committed. A
    /// non-finite result abandons the round.
    pub fn aggregate_round(
        &mut self,
        now: Instant,
    ) -> Result<(ClosedRound, Deliveries), Deliveries> {
        let Some(open) = &self.open else {
            return Err(Vec::new());
        };
        let result = self
            .strategy
            .aggregate(&open.updates, &self.weights, &self.state);
        let reporters: Vec<u64> = open.reported.iter().copied().collect();
        let aggregated = match result {
            Ok(aggregated) => aggregated,
            Err(err) => {
                self.count_error(ErrorCode::BadDelta);
                // Every reporter shares the blame: the retry avoids them all.
                self.failed.extend(reporters);
                return Err(self.abandon_round(&format!("was dropped ({err})")));
            }
        };
        let open = self.open.take().expect("checked above");
        let late = Bytes::from(folio_proto::encode(&ServerMessage::Error(error(
            ErrorCode::RoundClosed,
            format!(
                "round {} closed on quorum; your update will be ignored",
                open.round
            ),
        ))));
        let notices = self.outboxes(open.failed(), &late);
        let examples = open.examples.max(1) as f64;
        let closed = ClosedRound {
            round: open.round,
            clients: open.reported.len(),
            train_loss: open.loss_sum / examples,
            train_accuracy: open.accuracy_sum / examples,
            bytes_up: open.bytes_up,
            bytes_down: open.bytes_down,
            seconds: now.duration_since(open.started).as_secs_f64(),
            aggregated,
        };
        Ok((closed, notices))
    }

    /// Makes an evaluated, saved round the global model; returns the result frame
    /// for every connection.
    pub fn commit(&mut self, aggregated: Aggregated, record: RoundRecord) -> Deliveries {
        self.weights = aggregated.weights;
        self.state = aggregated.state;
        self.round = record.round + 1;
        self.attempt = 0;
        self.failed.clear();
        let frame = Bytes::from(folio_proto::encode(&ServerMessage::RoundResult(
            RoundResult {
                round: record.round,
                clients: record.clients as u32,
                eval_loss: record.eval_loss as f32,
                eval_accuracy: record.eval_accuracy as f32,
            },
        )));
        self.history.push(record);
        let everyone: Vec<u64> = self.sessions.iter().map(|s| s.session).collect();
        self.outboxes(everyone.into_iter(), &frame)
    }

    fn outboxes(&self, sessions: impl Iterator<Item = u64>, frame: &Bytes) -> Deliveries {
        sessions
            .filter_map(|s| self.sessions.get(s)?.outbox.clone())
            .map(|outbox| (outbox, frame.clone()))
            .collect()
    }

    /// The open round for the status page: who was asked, who answered, who left.
    pub fn open_round(&self, now: Instant) -> Option<serde_json::Value> {
        self.open.as_ref().map(|open| {
            serde_json::json!({
                "round": open.round,
                "attempt": open.attempt,
                "seconds_left": open.seconds_left(now).as_secs_f64(),
                "deadline_seconds": self.config.deadline.as_secs_f64(),
                "selected": open.selected.len(),
                "reported": open.reported.len(),
                "selected_sessions": open.selected,
                "reported_sessions": open.reported,
                "dropped_sessions": open.dropped,
            })
        })
    }

    /// The Shakespeare clients a session can train as, with their training chars.
    pub fn characters(&self) -> &BTreeMap<String, usize> {
        &self.train_ids
    }

    pub fn session_list(&self) -> Vec<&SessionInfo> {
        self.sessions.iter().collect()
    }
}
