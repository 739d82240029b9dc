//! The round engine driven directly, with a clock the test moves: every rule the
//! TCP suites check end to end, deterministically and in microseconds.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use folio_engine::{
    Action, CheckedJoin, CommitJob, Commits, DecodedUpdate, Edge, EdgeAction, Engine, EngineConfig,
    Entropy, Evaluation, HoldsSessions, Role, Root, RootAction, RoundConfig, RoundOrder,
    RoundRecord, SessionRate, Start, Whole,
};
use folio_fed::codec::CheckedDelta;
use folio_fed::{Clipping, StrategyConfig};
use folio_proto::{DataSource, ErrorCode, ModelShape, RoundStart, ServerMessage};

mod admission;
mod buffered;
mod cluster;
mod device_checks;
mod devices_noise;
mod devices_own_text;
mod dp;
mod hostile;
mod replay;
mod rounds;
mod secure;

const PARAMS: usize = 4;
const DEADLINE: Duration = Duration::from_secs(60);
const TTL: Duration = Duration::from_secs(600);
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Every client has 1,000 characters: at most 10 chunks of 101, 8 a batch, so
/// with the tutorial's 5 batches an epoch a client may claim 16 examples.
const TEXT: usize = 1_000;
const ALLOWED: u64 = 16;

struct Host<R: Hosted = Whole> {
    engine: Engine<R>,
    now: Instant,
    /// Frames sent, in order: (recipients, message).
    sent: Vec<(Vec<u64>, Arc<ServerMessage>)>,
    committed: Vec<RoundRecord>,
    /// Jobs fail while set (a full disk, say).
    failing_jobs: bool,
    /// An edge's shares, a root's orders.
    parts: Vec<(folio_engine::ShareReport, folio_fed::Partial)>,
    orders: Vec<RoundOrder>,
}

fn strategy_config(clients_per_round: usize, quorum: usize) -> StrategyConfig {
    StrategyConfig {
        min_clients: clients_per_round,
        quorum,
        clipping: Clipping::Off,
        ..StrategyConfig::fedavg(clients_per_round)
    }
}

/// DP-FedAvg with `clients_per_round` (all needed), deltas clipped to `bound`,
/// noise of the bound's size.
fn dp_strategy(clients_per_round: usize, bound: f32) -> StrategyConfig {
    StrategyConfig {
        kind: folio_fed::StrategyKind::DpFedAvg,
        clipping: Clipping::Fixed { bound },
        dp: folio_fed::DpConfig {
            noise_multiplier: 1.0,
            ..folio_fed::DpConfig::default()
        },
        ..strategy_config(clients_per_round, clients_per_round)
    }
}

fn config(strategy: StrategyConfig, max_rounds: Option<u64>) -> EngineConfig {
    EngineConfig {
        rounds: RoundConfig {
            strategy,
            deadline: DEADLINE,
            ..RoundConfig::tutorial()
        },
        preset: "test".into(),
        model: ModelShape {
            vocab: 1,
            embed: 1,
            hidden: 1,
        },
        segments: vec![PARAMS],
        seed: 5,
        entropy: Entropy::from_seed(5),
        data: DataSource::Shakespeare,
        population: 0,
        max_sessions: 8,
        session_ttl: TTL,
        max_rounds,
        new_sessions: SessionRate {
            burst: 4,
            every: Duration::from_secs(10),
        },
        retry_after: RETRY_AFTER,
        check_devices: false,
    }
}

fn clients() -> Vec<(String, usize)> {
    ["A", "B", "C", "D", "E"]
        .iter()
        .map(|id| (id.to_string(), TEXT))
        .chain([("MUTE".to_string(), 1)])
        .collect()
}

fn join(client: &str) -> CheckedJoin {
    CheckedJoin {
        kind: "native",
        backend: "test".into(),
        adapter: None,
        resume: None,
        client: Some(client.into()),
        held_model: None,
        // Each client from a network of its own.
        group: u64::from(client.as_bytes()[0]),
        resume_only: false,
    }
}

fn update(round: u64, values: [f32; PARAMS], examples: u64) -> DecodedUpdate {
    DecodedUpdate {
        round,
        examples,
        delta: CheckedDelta::from_values(&values).unwrap(),
        train_loss: 2.0,
        train_accuracy: 0.25,
        train_seconds: 1.0,
    }
}

/// What a test host does with its role's actions; `false`: stop running them
/// (a job failed).
trait Hosted: Role + Sized {
    fn carry(host: &mut Host<Self>, action: Self::Action) -> bool;
}

impl Hosted for Whole {
    fn carry(host: &mut Host<Self>, action: Action) -> bool {
        match action {
            Action::Send { to, message } => host.sent.push((to, message)),
            Action::Job(job) => return host.run_job(job),
            Action::Committed(record) => host.committed.push(*record),
        }
        true
    }
}

impl Hosted for Edge {
    fn carry(host: &mut Host<Self>, action: EdgeAction) -> bool {
        match action {
            EdgeAction::Send { to, message } => host.sent.push((to, message)),
            EdgeAction::Share(job) => host.parts.push(job.run().unwrap()),
        }
        true
    }
}

impl Hosted for Root {
    fn carry(host: &mut Host<Self>, action: RootAction) -> bool {
        match action {
            RootAction::Order(order) => host.orders.push(order),
            RootAction::Job(job) => return host.run_job(job),
            RootAction::Committed(record) => host.committed.push(*record),
        }
        true
    }
}

fn fresh_start() -> Start {
    Start {
        weights: vec![0.0; PARAMS],
        strategy: None,
        history: Vec::new(),
    }
}

impl Host {
    fn fresh(strategy: StrategyConfig, max_rounds: Option<u64>) -> Self {
        Self::new(config(strategy, max_rounds), fresh_start())
    }

    fn new(config: EngineConfig, start: Start) -> Self {
        Self::start(config, start)
    }

    /// A host whose strategy knows the population (DP-FedAvg's q depends on it).
    fn of_population(config: EngineConfig, start: Start, population: usize) -> Self {
        Self::new(
            EngineConfig {
                population,
                ..config
            },
            start,
        )
    }
}

impl<R: Hosted> Host<R> {
    /// A host of role `R`.
    fn start(config: EngineConfig, start: Start) -> Self {
        let now = Instant::now();
        // Devices that bring their own text come with no corpus.
        let clients = match config.data {
            DataSource::Shakespeare => clients(),
            DataSource::Device => Vec::new(),
        };
        let mut host = Self {
            engine: Engine::new(config, clients, start, now).unwrap(),
            now,
            sent: Vec::new(),
            committed: Vec::new(),
            parts: Vec::new(),
            orders: Vec::new(),
            failing_jobs: false,
        };
        host.run();
        host
    }

    /// Carries out every queued action, as a host does.
    fn run(&mut self) {
        while let Some(action) = self.engine.poll_action() {
            if !R::carry(self, action) {
                return;
            }
        }
    }

    fn wait(&mut self, time: Duration) {
        self.now += time;
        if self
            .engine
            .poll_timeout()
            .is_some_and(|due| due <= self.now)
        {
            self.engine.handle_timeout(self.now);
        }
        self.run();
    }

    /// The round starts sent so far: (recipients, start).
    fn starts(&self) -> Vec<(Vec<u64>, RoundStart)> {
        self.sent
            .iter()
            .filter_map(|(to, message)| match message.as_ref() {
                ServerMessage::RoundStart(start) => Some((to.clone(), start.clone())),
                _ => None,
            })
            .collect()
    }

    /// The sessions selected in the open round.
    fn selected(&self) -> BTreeSet<u64> {
        let open = self.engine.status(self.now).open_round;
        open.map_or_else(BTreeSet::new, |o| o.selected_sessions.into_iter().collect())
    }

    fn errors_to(&self, session: u64) -> Vec<String> {
        self.sent
            .iter()
            .filter(|(to, _)| to.contains(&session))
            .filter_map(|(_, message)| match message.as_ref() {
                ServerMessage::Error(e) => Some(e.message.clone()),
                _ => None,
            })
            .collect()
    }
}

impl<R: Hosted + Commits> Host<R> {
    /// Runs a commit job in place (a candidate's loss: the sum of its weights);
    /// `false` when jobs fail.
    fn run_job(&mut self, job: CommitJob) -> bool {
        match job {
            CommitJob::Aggregate(job) => self.engine.aggregated(job.run(), self.now),
            CommitJob::Evaluate(job) if self.failing_jobs => {
                self.engine.job_failed(job.round, self.now);
                return false;
            }
            CommitJob::Evaluate(job) => {
                let loss = f64::from(job.weights.iter().sum::<f32>());
                let eval = Evaluation {
                    loss,
                    accuracy: 0.5,
                };
                self.engine.evaluated(job.round, eval, None, self.now);
            }
            CommitJob::Persist(commit) => self.engine.persisted(commit.record.round, self.now),
        }
        true
    }
}

impl<R: Hosted + HoldsSessions> Host<R> {
    fn join(&mut self, client: &str) -> u64 {
        let joined = self.engine.join(join(client), self.now).unwrap();
        self.run();
        joined.session
    }

    fn update(&mut self, session: u64, round: u64, values: [f32; PARAMS]) -> Result<(), ErrorCode> {
        let result = self
            .engine
            .update(session, update(round, values, 8), self.now)
            .map_err(|e| e.code);
        self.run();
        result
    }

    fn leave(&mut self, session: u64) {
        self.engine.leave(session, self.now);
        self.run();
    }
}
