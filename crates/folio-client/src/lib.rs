//! The client loop, written once: join → receive the global weights → train
//! locally on this device's text (its own, or in the simulation the Shakespeare
//! character's lines the server handed it) → send the encoded delta → wait.
//! A [`Transport`] carries the frames: tokio-tungstenite natively ([`native`]),
//! the browser's WebSocket in `folio-web`.

pub mod bench;
pub mod evaluate;
#[cfg(not(target_family = "wasm"))]
pub mod native;
pub mod personalize;
mod secure;

use burn::prelude::Device;
use folio_data::device::DeviceText;
use folio_data::{TrainingPlan, vocab};
use folio_fed::{Encoding, codec};
use folio_model::params::delta;
use folio_model::{CharRnn, ModelConfig, OptimizerKind, TrainConfig, Trainer};
use folio_proto::{
    ClientKind, ClientMessage, ClientStep, DataSource, ErrorCode, ErrorMessage, Join, Optimizer,
    PROTOCOL_VERSION, RoundResult, RoundStart, ServerMessage, Update, Welcome,
};
use folio_secagg::SecureClient;
use secure::{SecureRound, secure_step, send_step};
use web_time::Instant;

/// Carries binary frames to and from the aggregator.
#[allow(async_fn_in_trait)]
pub trait Transport {
    async fn send(&mut self, frame: Vec<u8>) -> Result<(), ClientError>;
    /// The next binary frame; `None` once the connection is closed.
    async fn recv(&mut self) -> Result<Option<Vec<u8>>, ClientError>;
    /// Keeps a round's global model where it outlives the connection (a tab's
    /// IndexedDB), before the round's training starts. By default nowhere.
    async fn keep_model(&mut self, _round: u64, _model: &HeldModel) {}
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connection: {0}")]
    Connection(String),
    #[error("the server closed the connection")]
    Closed,
    #[error("bad frame from the server: {0}")]
    Frame(#[from] folio_proto::FrameError),
    #[error("the server refused us ({}): {}", .0.code.name(), .0.message)]
    Rejected(ErrorMessage),
    #[error("the server sent {0} before a welcome")]
    NotWelcomed(&'static str),
    #[error("round {round}'s model arrived damaged: its bytes do not match its fingerprint")]
    DamagedModel { round: u64 },
    #[error("round {round} started without weights, but this client does not hold its model")]
    ModelNotHeld { round: u64 },
    #[error(transparent)]
    Model(#[from] folio_model::ModelError),
    #[error(transparent)]
    Fed(#[from] folio_fed::FedError),
    #[error("secure aggregation: {0}")]
    Secure(#[from] folio_secagg::SecAggError),
    #[error("{0}")]
    WrongData(&'static str),
    /// The server's TLS certificate is not one this machine trusts: no retry
    /// changes that.
    #[error("{0}")]
    Untrusted(String),
}

/// What the client is doing, for a page or a log.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientState {
    Waiting,
    /// The round's weights arrived and are loading into the model.
    Downloading {
        round: u64,
    },
    Training {
        round: u64,
        batch: usize,
        of: usize,
    },
    Uploading {
        round: u64,
    },
    /// A secure round's step (keys, shares, unmasking) is under way.
    Securing {
        round: u64,
        step: &'static str,
    },
    /// Computing the aggregator's known-answer probe on this device.
    Checking,
    /// Solving the work a new session costs (`bits` zero bits).
    Solving {
        bits: u8,
    },
    /// Measuring a model on the text this device holds out (federated
    /// evaluation).
    Evaluating {
        round: u64,
    },
}

/// Everything worth showing, as it happens.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientEvent {
    Welcomed {
        client_id: String,
        session: String,
        data: DataSource,
        train_chars: usize,
        held_out_chars: usize,
    },
    State(ClientState),
    Trained(RoundReport),
    RoundResult(RoundResult),
    /// An error the server reported that does not end the session.
    ServerError(ErrorMessage),
    /// This client left a secure round: a step it was sent did not check out
    /// (a damaged or replayed share, an inconsistent request). The server goes
    /// on without it.
    SecureRefused {
        round: u64,
        why: String,
    },
    /// A round's global model arrived: worth keeping (a reloaded tab offers it
    /// back in its next join and is not sent it again).
    ModelReceived {
        round: u64,
        model: HeldModel,
    },
    /// This device measured a model on the text it holds out, and answered.
    Evaluated(folio_proto::Evaluation),
    /// The work a new session cost: `bits` zero bits, solved in `seconds`.
    Solved {
        bits: u8,
        seconds: f32,
    },
}

/// A global model as it came down: its encoding and bytes, and their fingerprint.
#[derive(Debug, Clone, PartialEq)]
pub struct HeldModel {
    pub encoding: Encoding,
    pub weights: Vec<u8>,
    pub fingerprint: u64,
}

impl HeldModel {
    pub fn new(encoding: Encoding, weights: Vec<u8>) -> Self {
        let fingerprint = folio_proto::model_fingerprint(encoding, &weights);
        Self {
            encoding,
            weights,
            fingerprint,
        }
    }
}

/// One round as this client saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundReport {
    pub round: u64,
    pub examples: u64,
    pub train_loss: f32,
    pub train_accuracy: f32,
    pub train_seconds: f32,
    pub bytes_down: usize,
    pub bytes_up: usize,
    /// The update went up masked, in a secure round.
    pub secure: bool,
}

#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// What this client says when it joins (kind, backend, token, wanted client...).
    pub join: Join,
    /// Return after this many round results (`None`: until the server closes).
    pub max_rounds: Option<u64>,
    /// A global model kept from an earlier connection, offered in the join.
    pub held: Option<HeldModel>,
    /// A device made wrong on purpose, for tests: the gradients it reports for
    /// its device check are scaled by this (0: a backend whose gradients come
    /// out zero, as one phone's WebGPU was reported to do).
    pub gradient_fault: Option<f32>,
    /// This device's own text, where the federation's devices bring theirs: it
    /// never leaves the device (`None`: the simulation hands out text).
    pub text: Option<String>,
}

impl ClientOptions {
    /// A native process on the CPU backend.
    pub fn native() -> Self {
        Self {
            join: Join {
                protocol: PROTOCOL_VERSION,
                kind: ClientKind::Native,
                backend: "flex".into(),
                adapter: None,
                token: None,
                resume: None,
                client: None,
                held_model: None,
                work: None,
            },
            max_rounds: None,
            held: None,
            gradient_fault: None,
            text: None,
        }
    }
}

/// This client's data and model shape, from the welcome.
struct Session {
    welcome: Welcome,
    ids: Vec<u32>,
    /// The text it holds out, as ids: what it measures a model on when asked.
    held_out: Vec<u32>,
    config: ModelConfig,
}

/// What this device trains on and holds out: in the simulation, the
/// character's lines the server handed it; else its own text.
fn device_text(welcome: &Welcome, own: Option<&str>) -> Result<DeviceText, ClientError> {
    match (welcome.data, own) {
        (DataSource::Shakespeare, None) => Ok(DeviceText {
            train: welcome.train_text.clone().unwrap_or_default(),
            held_out: welcome.held_out_text.clone().unwrap_or_default(),
        }),
        (DataSource::Shakespeare, Some(_)) => Err(ClientError::WrongData(
            "this server runs the Shakespeare simulation and hands each device a character's lines: \
             leave out this device's own text, or serve with --data device",
        )),
        (DataSource::Device, Some(own)) => Ok(DeviceText::split(own)),
        (DataSource::Device, None) => Err(ClientError::WrongData(
            "this server's devices train on their own text, and this one has none: give it some \
             (folio client --text PATH, or the page's text box)",
        )),
    }
}

/// 32 bytes from the OS (`crypto.getRandomValues` in a tab).
fn entropy() -> [u8; 32] {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the OS random number generator works");
    bytes
}

/// Runs the client loop until the server closes the connection or `max_rounds`
/// round results arrived. Returns the rounds this client trained.
pub async fn run<T: Transport>(
    transport: &mut T,
    device: &Device,
    options: &ClientOptions,
    mut on_event: impl FnMut(ClientEvent),
) -> Result<Vec<RoundReport>, ClientError> {
    let mut held = options.held.clone();
    let join = Join {
        held_model: held.as_ref().map(|model| model.fingerprint),
        ..options.join.clone()
    };
    transport
        .send(folio_proto::encode(&ClientMessage::Join(join.clone())))
        .await?;
    let mut session: Option<Session> = None;
    let mut secure: Option<SecureRound> = None;
    let mut reports = Vec::new();
    let mut results = 0;
    loop {
        let Some(frame) = transport.recv().await? else {
            return if session.is_some() {
                Ok(reports)
            } else {
                Err(ClientError::Closed)
            };
        };
        let bytes_down = frame.len();
        match folio_proto::decode_server(&frame)? {
            ServerMessage::Welcome(welcome) => {
                let text = device_text(&welcome, options.text.as_deref())?;
                let (ids, _) = vocab::encode(&text.train);
                let (held_out, _) = vocab::encode(&text.held_out);
                on_event(ClientEvent::Welcomed {
                    client_id: welcome.client_id.clone(),
                    session: welcome.session.clone(),
                    data: welcome.data,
                    train_chars: ids.len(),
                    held_out_chars: held_out.len(),
                });
                let config = ModelConfig {
                    vocab: welcome.model.vocab as usize,
                    embed: welcome.model.embed as usize,
                    hidden: welcome.model.hidden as usize,
                };
                session = Some(Session {
                    welcome,
                    ids,
                    held_out,
                    config,
                });
                on_event(ClientEvent::State(ClientState::Waiting));
            }
            ServerMessage::RoundStart(start) => {
                let session = session
                    .as_ref()
                    .ok_or(ClientError::NotWelcomed("a round start"))?;
                on_event(ClientEvent::State(ClientState::Downloading {
                    round: start.round,
                }));
                let model = receive_model(
                    transport,
                    (start.round, start.model),
                    start.weights.as_ref(),
                    start.weights_encoding,
                    &mut held,
                    &mut on_event,
                )
                .await?;
                if let Some(spec) = start.secure {
                    let (client, keys) = SecureClient::new(spec, entropy());
                    on_event(ClientEvent::State(ClientState::Securing {
                        round: start.round,
                        step: "keys",
                    }));
                    send_step(transport, ClientStep::Keys(keys)).await?;
                    secure = Some(SecureRound {
                        client,
                        start,
                        model,
                        bytes_down,
                        trained: None,
                    });
                    continue;
                }
                let local = train_round(device, session, &start, &model, &mut on_event).await?;
                on_event(ClientEvent::State(ClientState::Uploading {
                    round: start.round,
                }));
                let update = Update {
                    round: start.round,
                    examples: local.examples,
                    encoding: start.delta_encoding,
                    delta: codec::encode(&local.delta, &session.segments(), start.delta_encoding),
                    train_loss: local.metrics.loss as f32,
                    train_accuracy: local.metrics.accuracy as f32,
                    train_seconds: local.seconds,
                };
                let frame = folio_proto::encode(&ClientMessage::Update(update));
                let report = RoundReport::new(&start, &local, bytes_down, frame.len(), false);
                transport.send(frame).await?;
                on_event(ClientEvent::Trained(report.clone()));
                on_event(ClientEvent::State(ClientState::Waiting));
                reports.push(report);
            }
            ServerMessage::Secure(step) => {
                let session = session
                    .as_ref()
                    .ok_or(ClientError::NotWelcomed("a secure step"))?;
                let Some(round) = secure.as_mut().filter(|r| r.client.round() == step.round())
                else {
                    // A step of a round this client already left: nothing to do.
                    continue;
                };
                let round_number = round.start.round;
                match secure_step(transport, device, session, round, step, &mut on_event).await {
                    Ok(Some(report)) => reports.push(report),
                    Ok(None) => {}
                    Err(ClientError::Secure(refused)) => {
                        secure = None;
                        on_event(ClientEvent::SecureRefused {
                            round: round_number,
                            why: refused.to_string(),
                        });
                        on_event(ClientEvent::State(ClientState::Waiting));
                    }
                    Err(err) => return Err(err),
                }
            }
            ServerMessage::Probe(probe) => {
                let session = session
                    .as_ref()
                    .ok_or(ClientError::NotWelcomed("a device check"))?;
                on_event(ClientEvent::State(ClientState::Checking));
                let mut answer = answer_probe(device, session.config, probe).await?;
                if let Some(scale) = options.gradient_fault {
                    // The digest is linear in the gradient.
                    answer.projections.iter_mut().for_each(|p| *p *= scale);
                }
                transport
                    .send(folio_proto::encode(&ClientMessage::ProbeAnswer(answer)))
                    .await?;
                on_event(ClientEvent::State(ClientState::Waiting));
            }
            ServerMessage::Evaluate(ask) => {
                let session = session
                    .as_ref()
                    .ok_or(ClientError::NotWelcomed("an evaluation"))?;
                on_event(ClientEvent::State(ClientState::Evaluating {
                    round: ask.round,
                }));
                let model = receive_model(
                    transport,
                    (ask.round, ask.model),
                    ask.weights.as_ref(),
                    ask.weights_encoding,
                    &mut held,
                    &mut on_event,
                )
                .await?;
                let weights = codec::decode(
                    &model.weights,
                    &[session.config.num_params()],
                    model.encoding,
                )?;
                let answer =
                    evaluate::measure(device, session.config, &weights, &session.held_out, &ask)
                        .await?;
                transport
                    .send(folio_proto::encode(&ClientMessage::Evaluation(answer)))
                    .await?;
                on_event(ClientEvent::Evaluated(answer));
                on_event(ClientEvent::State(ClientState::Waiting));
            }
            ServerMessage::RoundResult(result) => {
                on_event(ClientEvent::RoundResult(result));
                results += 1;
                if options.max_rounds.is_some_and(|max| results >= max) {
                    return Ok(reports);
                }
            }
            ServerMessage::Heartbeat => {
                transport
                    .send(folio_proto::encode(&ClientMessage::Heartbeat))
                    .await?
            }
            // A new session costs work when the aggregator is busy: solved
            // here (in a tab, in its worker), then the same join again.
            ServerMessage::Challenge(challenge) => {
                on_event(ClientEvent::State(ClientState::Solving {
                    bits: challenge.bits,
                }));
                let started = Instant::now();
                let nonce = challenge.solve();
                on_event(ClientEvent::Solved {
                    bits: challenge.bits,
                    seconds: started.elapsed().as_secs_f32(),
                });
                let join = Join {
                    work: Some(nonce),
                    ..join.clone()
                };
                transport
                    .send(folio_proto::encode(&ClientMessage::Join(join)))
                    .await?;
            }
            ServerMessage::Error(error) if is_fatal(error.code) => {
                return Err(ClientError::Rejected(error));
            }
            ServerMessage::Error(error) => on_event(ClientEvent::ServerError(error)),
        }
    }
}

/// The probe's loss and gradient digest, computed on `device` as training is.
pub async fn answer_probe(
    device: &Device,
    config: ModelConfig,
    probe: folio_proto::Probe,
) -> Result<folio_proto::ProbeAnswer, ClientError> {
    let spec = folio_model::probe::ProbeSpec {
        id: probe.id,
        batch_size: (probe.batch_size as usize).clamp(1, 64),
        seq_len: (probe.seq_len as usize).clamp(1, 1_000),
        directions: (probe.directions as usize).min(folio_model::probe::MAX_DIRECTIONS),
    };
    let measured = spec.measure(device, config).await?;
    Ok(folio_proto::ProbeAnswer {
        id: probe.id,
        loss: measured.loss,
        projections: measured.projections,
    })
}

/// How long to wait before reconnecting: doubling from 0.5 s to 30 s.
fn backoff(failures: u32) -> std::time::Duration {
    std::time::Duration::from_millis(500u64.saturating_mul(1 << failures.min(6)).min(30_000))
}

/// The WebSocket subprotocol a client holding session `token` offers, so that
/// a server full of other connections from its network still lets it in to
/// resume (only to resume): [`folio_proto::RESUME_SUBPROTOCOL`].
pub fn resume_protocol(token: &str) -> String {
    format!("{}{token}", folio_proto::RESUME_SUBPROTOCOL)
}

/// The servers a client may use (a cluster's edges): the one in use until
/// connecting to it fails, then the next.
pub struct Failover {
    urls: Vec<String>,
    next: std::cell::Cell<usize>,
}

impl Failover {
    /// `urls` in order of preference; empty ones are dropped.
    pub fn new(urls: impl IntoIterator<Item = String>) -> Self {
        let urls: Vec<String> = urls.into_iter().filter(|u| !u.is_empty()).collect();
        assert!(!urls.is_empty(), "a client needs a server to connect to");
        Self {
            urls,
            next: std::cell::Cell::new(0),
        }
    }

    /// The URL to connect to now.
    pub fn url(&self) -> String {
        self.urls[self.next.get() % self.urls.len()].clone()
    }

    /// Connecting failed: the next server is tried.
    pub fn failed(&self) {
        self.next.set(self.next.get() + 1);
    }
}

/// [`run`] that survives the server going away: it reconnects (`connect`, given
/// the token of the session it holds, to offer as [`resume_protocol`]) with backoff (`sleep`) and resumes its
/// session (or, after a server restart, joins again as the same Shakespeare
/// client), offering the last model it received. Returns when `run` does (a clean
/// close, `max_rounds` results), or when the server refuses us for good.
pub async fn run_reconnecting<T: Transport, C, S>(
    mut connect: impl FnMut(Option<String>) -> C,
    sleep: impl Fn(std::time::Duration) -> S,
    device: &Device,
    options: &ClientOptions,
    mut on_event: impl FnMut(ClientEvent),
    mut on_retry: impl FnMut(&ClientError, std::time::Duration),
) -> Result<Vec<RoundReport>, ClientError>
where
    C: Future<Output = Result<T, ClientError>>,
    S: Future<Output = ()>,
{
    let mut options = options.clone();
    let mut reports = Vec::new();
    let mut failures = 0;
    loop {
        let outcome = match connect(options.join.resume.clone()).await {
            Ok(mut transport) => {
                let (mut welcomed, mut received) = (None, None);
                let outcome = run(&mut transport, device, &options, |event| {
                    match &event {
                        ClientEvent::Welcomed {
                            client_id,
                            session,
                            data,
                            ..
                        } => welcomed = Some((session.clone(), client_id.clone(), *data)),
                        ClientEvent::ModelReceived { model, .. } => received = Some(model.clone()),
                        _ => {}
                    }
                    on_event(event)
                })
                .await;
                if received.is_some() {
                    options.held = received;
                }
                if let Some((session, client_id, data)) = welcomed {
                    options.join.resume = Some(session);
                    // A session that cannot be resumed starts again as the same
                    // character; a device's own name is the server's to give.
                    if data == DataSource::Shakespeare {
                        options.join.client = Some(client_id);
                    }
                    failures = 0;
                }
                outcome
            }
            Err(err) => Err(err),
        };
        let retry = match outcome {
            Ok(mut done) => {
                reports.append(&mut done);
                return Ok(reports);
            }
            Err(ClientError::Connection(_) | ClientError::Closed) => true,
            Err(ClientError::Rejected(ref refusal)) => is_retryable(refusal.code),
            // Whatever was held is of no use: join again without it.
            Err(ClientError::DamagedModel { .. } | ClientError::ModelNotHeld { .. }) => {
                options.held = None;
                true
            }
            Err(_) => false,
        };
        let err = outcome.expect_err("returned above when Ok");
        if !retry {
            return Err(err);
        }
        let wait = backoff(failures);
        on_retry(&err, wait);
        failures += 1;
        sleep(wait).await;
    }
}

/// The model round `round`'s message names by `fingerprint`: the one that came
/// with it (from now on the one held, kept where it outlives the connection,
/// and announced), or the held one when it came without weights.
async fn receive_model<T: Transport>(
    transport: &mut T,
    (round, fingerprint): (u64, u64),
    weights: Option<&Vec<u8>>,
    encoding: Encoding,
    held: &mut Option<HeldModel>,
    on_event: &mut impl FnMut(ClientEvent),
) -> Result<HeldModel, ClientError> {
    match weights {
        Some(weights) => {
            let model = HeldModel::new(encoding, weights.clone());
            if model.fingerprint != fingerprint {
                return Err(ClientError::DamagedModel { round });
            }
            *held = Some(model.clone());
            transport.keep_model(round, &model).await;
            on_event(ClientEvent::ModelReceived {
                round,
                model: model.clone(),
            });
            Ok(model)
        }
        None => held
            .clone()
            .filter(|model| model.fingerprint == fingerprint)
            .ok_or(ClientError::ModelNotHeld { round }),
    }
}

/// Errors after which the server will not work with this connection.
fn is_fatal(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::ProtocolVersion
            | ErrorCode::BadToken
            | ErrorCode::UnknownClient
            | ErrorCode::NoFreeClient
            | ErrorCode::FieldTooLong
            | ErrorCode::SessionInUse
            | ErrorCode::ServerFull
            | ErrorCode::TooManyErrors
            | ErrorCode::Timeout
    )
}

/// Fatal errors that may clear up: a new connection may succeed later.
pub fn is_retryable(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::NoFreeClient
            | ErrorCode::SessionInUse
            | ErrorCode::ServerFull
            | ErrorCode::Timeout
    )
}

/// One client's local training, before encoding.
#[derive(Debug, Clone)]
pub struct LocalResult {
    /// `trained − global`.
    pub delta: Vec<f32>,
    /// Sequences trained on (padded rows not counted).
    pub examples: u64,
    pub metrics: folio_model::Metrics,
    pub seconds: f32,
}

/// How a client trains locally in one round: its batches and its optimizer.
/// A round's [`RoundStart`] gives it; the simulator and the benches build it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LocalTraining {
    pub plan: TrainingPlan,
    pub optimizer: Optimizer,
    pub learning_rate: f32,
    /// The client's own gradient clipping.
    pub clip_norm: Option<f32>,
    /// Stop early, after at least one batch, once this is spent.
    pub time_limit: Option<std::time::Duration>,
}

impl LocalTraining {
    /// What `start` asks of a client whose batches are `batch_size` × `seq_len`
    /// (from its welcome): 90 % of the round's deadline to train in.
    pub fn for_round(start: &RoundStart, batch_size: usize, seq_len: usize) -> Self {
        Self {
            plan: TrainingPlan {
                batch_size,
                seq_len,
                local_epochs: start.local_epochs,
                max_batches: start.max_batches,
                seed: start.seed,
            },
            optimizer: start.optimizer,
            learning_rate: start.learning_rate,
            clip_norm: start.clip_norm,
            time_limit: Some(std::time::Duration::from_millis(start.deadline_ms).mul_f64(0.9)),
        }
    }
}

/// Trains `config` from `global` on a client's `ids` as `training` says: the
/// local step of every client, in a tab, a process or a simulation.
/// `on_batch(k, of)` before each batch.
pub async fn train_locally(
    device: &Device,
    config: ModelConfig,
    ids: &[u32],
    global: &[f32],
    training: &LocalTraining,
    mut on_batch: impl FnMut(usize, usize),
) -> Result<LocalResult, ClientError> {
    let started = Instant::now();
    let model = CharRnn::from_flat(config, global, &device.clone().autodiff())?;
    let mut trainer = Trainer::new(
        model,
        TrainConfig {
            optimizer: match training.optimizer {
                Optimizer::Sgd => OptimizerKind::Sgd,
                Optimizer::Adam => OptimizerKind::Adam,
            },
            learning_rate: f64::from(training.learning_rate),
            clip_norm: training.clip_norm,
        },
    );
    let plan = training.plan.batches(ids);
    let mut metrics = None;
    let mut examples = 0u64;
    for (i, batch) in plan.iter().enumerate() {
        if i > 0
            && training
                .time_limit
                .is_some_and(|limit| started.elapsed() > limit)
        {
            break;
        }
        on_batch(i + 1, plan.len());
        let step = trainer.step(batch);
        metrics = Some(match metrics {
            None => step,
            Some(sum) => step.merge(sum),
        });
        examples += (0..batch.batch_size)
            .filter(|row| batch.mask[row * batch.seq_len] > 0.0)
            .count() as u64;
    }
    let metrics = match metrics {
        Some(metrics) => metrics.read().await?,
        None => return Err(ClientError::Model(folio_model::ModelError::NoBatches)),
    };
    let trained = trainer.model().to_flat().await?;
    Ok(LocalResult {
        delta: delta(&trained, global),
        examples,
        metrics,
        seconds: started.elapsed().as_secs_f32(),
    })
}

impl RoundReport {
    fn new(
        start: &RoundStart,
        local: &LocalResult,
        bytes_down: usize,
        bytes_up: usize,
        secure: bool,
    ) -> Self {
        Self {
            round: start.round,
            examples: local.examples,
            train_loss: local.metrics.loss as f32,
            train_accuracy: local.metrics.accuracy as f32,
            train_seconds: local.seconds,
            bytes_down,
            bytes_up,
            secure,
        }
    }
}

impl Session {
    /// Lengths of the model's tensors in parameter order (the codecs' unit).
    fn segments(&self) -> Vec<usize> {
        self.config
            .param_shapes()
            .iter()
            .map(|(_, shape)| shape.iter().product())
            .collect()
    }
}

/// Trains one round from the global weights in `model` as `start` says.
async fn train_round(
    device: &Device,
    session: &Session,
    start: &RoundStart,
    model: &HeldModel,
    on_event: &mut impl FnMut(ClientEvent),
) -> Result<LocalResult, ClientError> {
    let global = codec::decode(
        &model.weights,
        &[session.config.num_params()],
        model.encoding,
    )?;
    let training = LocalTraining::for_round(
        start,
        session.welcome.batch_size as usize,
        session.welcome.seq_len as usize,
    );
    train_locally(
        device,
        session.config,
        &session.ids,
        &global,
        &training,
        |batch, of| {
            on_event(ClientEvent::State(ClientState::Training {
                round: start.round,
                batch,
                of,
            }))
        },
    )
    .await
}
