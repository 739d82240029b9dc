//! The engine's host for in-process clients: carries out its actions at once,
//! in this thread, and hands back each round's start for the clients to train.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use folio_client::LocalTraining;
use folio_engine::{
    Action, Commit, CommitJob, DecodedUpdate, Engine, EngineError, Evaluation, RoundRecord,
};
use folio_fed::codec::{self, CheckedDelta};
use folio_model::ModelConfig;
use folio_proto::{RoundStart, ServerMessage};
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

/// What a host does with the engine's jobs.
pub trait Jobs {
    fn evaluate(
        &mut self,
        weights: &[f32],
        population: bool,
    ) -> anyhow::Result<(Evaluation, Option<Evaluation>)>;

    /// Saves a commit; in memory only by default.
    fn persist(&mut self, _commit: &Commit) -> anyhow::Result<()> {
        Ok(())
    }

    fn committed(&mut self, _record: &RoundRecord) {}
}

/// A round handed to in-process clients.
pub struct Round {
    pub round: u64,
    /// The selected sessions, in order, each with the start it was sent.
    pub clients: Vec<(u64, RoundStart)>,
}

/// The engine and what its clients need: the model they were sent, decoded.
pub struct InProcess {
    pub engine: Engine,
    pub model: ModelConfig,
    segments: Vec<usize>,
    /// The global model as the wire carried it down, by fingerprint, and its
    /// encoded size.
    models: BTreeMap<u64, (Arc<Vec<f32>>, u64)>,
    /// Actions a secure round's steps queued behind their messages.
    deferred: VecDeque<Action>,
    /// The simulated clients' own secrets (their secure rounds' keys): seeded by
    /// the federation's seed, so a run replays bit for bit.
    rng: ChaCha20Rng,
    /// Each session's held-out text (ids), which it measures a model on when
    /// asked to evaluate.
    held_out: BTreeMap<u64, Vec<u32>>,
}

/// One client's trained round, for [`InProcess::send_all`].
pub struct Trained {
    pub session: u64,
    pub delta: Vec<f32>,
    pub examples: u64,
    /// Loss, accuracy, seconds.
    pub metrics: (f64, f64, f32),
}

impl InProcess {
    pub fn new(engine: Engine, model: ModelConfig) -> Self {
        Self {
            rng: ChaCha20Rng::seed_from_u64(engine.config().seed),
            segments: engine.config().segments.clone(),
            engine,
            model,
            models: BTreeMap::new(),
            deferred: VecDeque::new(),
            held_out: BTreeMap::new(),
        }
    }

    /// Gives the sessions their held-out text: they answer federated evaluations.
    pub fn with_held_out(self, held_out: BTreeMap<u64, Vec<u32>>) -> Self {
        Self { held_out, ..self }
    }

    /// Carries out the engine's actions until a round is handed to clients;
    /// `None` once the engine has run its rounds.
    pub fn next_round(&mut self, jobs: &mut impl Jobs) -> anyhow::Result<Option<Round>> {
        let mut clients: Vec<(u64, RoundStart)> = Vec::new();
        loop {
            let Some(action) = self
                .deferred
                .pop_front()
                .or_else(|| self.engine.poll_action())
            else {
                if self.engine.is_finished() {
                    return Ok(None);
                }
                anyhow::ensure!(
                    !clients.is_empty(),
                    "no round could start: too few clients for the round's minimum"
                );
                clients.sort_by_key(|(session, _)| *session);
                let round = clients[0].1.round;
                return Ok(Some(Round { round, clients }));
            };
            if let Some((to, message)) = self.carry_out(action, jobs, Instant::now())?
                && let ServerMessage::RoundStart(start) = message.as_ref()
            {
                clients.extend(to.into_iter().map(|s| (s, start.clone())));
            }
        }
    }

    /// Carries out one action at `now`: the jobs here, at once; a message is
    /// handed back for its clients (a round start's model decoded first).
    pub fn carry_out(
        &mut self,
        action: Action,
        jobs: &mut impl Jobs,
        now: Instant,
    ) -> anyhow::Result<Option<(Vec<u64>, Arc<ServerMessage>)>> {
        match action {
            Action::Send { to, message } => {
                match message.as_ref() {
                    ServerMessage::RoundStart(start) => self.receive(start)?,
                    ServerMessage::Evaluate(ask) => {
                        self.answer_evaluation(&to, ask, now)?;
                        return Ok(None);
                    }
                    _ => {}
                }
                return Ok(Some((to, message)));
            }
            Action::Job(CommitJob::Aggregate(job)) => self.engine.aggregated(job.run(), now),
            Action::Job(CommitJob::Evaluate(job)) => {
                let (eval, population) = jobs.evaluate(&job.weights, job.population)?;
                self.engine.evaluated(job.round, eval, population, now);
            }
            Action::Job(CommitJob::Persist(commit)) => {
                jobs.persist(&commit)?;
                self.engine.persisted(commit.record.round, now);
            }
            Action::Committed(record) => jobs.committed(&record),
        }
        Ok(None)
    }

    fn receive(&mut self, start: &RoundStart) -> anyhow::Result<()> {
        if let Some(weights) = &start.weights
            && !self.models.contains_key(&start.model)
        {
            let num_params = self.segments.iter().sum();
            let decoded = codec::decode(weights, &[num_params], start.weights_encoding)?;
            // Clients that still train an older model hold it themselves.
            self.models.clear();
            self.models
                .insert(start.model, (Arc::new(decoded), weights.len() as u64));
        }
        Ok(())
    }

    /// Each of `to` measures the model `ask` names on its held-out text, side
    /// by side, and answers (one without held-out text does not).
    fn answer_evaluation(
        &mut self,
        to: &[u64],
        ask: &folio_proto::Evaluate,
        now: Instant,
    ) -> anyhow::Result<()> {
        if let Some(weights) = &ask.weights {
            let num_params: usize = self.segments.iter().sum();
            let decoded = codec::decode(weights, &[num_params], ask.weights_encoding)?;
            self.models
                .insert(ask.model, (Arc::new(decoded), weights.len() as u64));
        }
        let Some((weights, _)) = self.models.get(&ask.model) else {
            return Ok(());
        };
        let weights = weights.clone();
        let askers: Vec<(u64, &Vec<u32>)> = to
            .iter()
            .filter_map(|s| Some((*s, self.held_out.get(s)?)))
            .collect();
        let model = self.model;
        let answers = folio_host::eval::parallel_map(&askers, |(_, ids)| {
            pollster::block_on(folio_client::evaluate::measure(
                &burn::prelude::Device::flex(),
                model,
                &weights,
                ids,
                ask,
            ))
        });
        for ((session, _), answer) in askers.iter().zip(answers) {
            self.engine
                .evaluation(*session, answer?, now)
                .map_err(|e| anyhow::anyhow!("an honest evaluation was refused: {}", e.message))?;
        }
        Ok(())
    }

    /// The global model `start` was sent with, as the client decoded it.
    pub fn global(&self, start: &RoundStart) -> Arc<Vec<f32>> {
        self.models[&start.model].0.clone()
    }

    /// The bytes `start`'s model took on the wire.
    pub fn model_bytes(&self, start: &RoundStart) -> u64 {
        self.models.get(&start.model).map_or(0, |(_, bytes)| *bytes)
    }

    /// Trains one client of a round on `text` as its start says, with no time
    /// limit: the local step of every client.
    pub fn train(
        &self,
        start: &RoundStart,
        text: &[u32],
    ) -> anyhow::Result<folio_client::LocalResult> {
        self.train_from(&self.global(start), start, text)
    }

    /// [`InProcess::train`] from `weights`, the model `start` was sent with.
    pub fn train_from(
        &self,
        weights: &[f32],
        start: &RoundStart,
        text: &[u32],
    ) -> anyhow::Result<folio_client::LocalResult> {
        let config = self.engine.config();
        let training = LocalTraining {
            time_limit: None,
            ..LocalTraining::for_round(
                start,
                config.rounds.batch_size as usize,
                config.rounds.seq_len as usize,
            )
        };
        Ok(pollster::block_on(folio_client::train_locally(
            &burn::prelude::Device::flex(),
            self.model,
            text,
            weights,
            &training,
            |_, _| {},
        ))?)
    }

    /// Sends a round's updates, in the order given: plain, or through a secure
    /// round's steps (each client masking its own, the engine seeing the sum).
    pub fn send_all(&mut self, round: &Round, trained: Vec<Trained>) -> anyhow::Result<()> {
        let starts: BTreeMap<u64, &RoundStart> =
            round.clients.iter().map(|(s, r)| (*s, r)).collect();
        let Some(spec) = round.clients.first().and_then(|(_, start)| start.secure) else {
            for t in trained {
                self.send(
                    t.session,
                    starts[&t.session],
                    &t.delta,
                    t.examples,
                    t.metrics,
                    Instant::now(),
                )
                .map_err(|e| anyhow::anyhow!("an honest update was refused: {}", e.message))?;
            }
            return Ok(());
        };
        self.send_secure(spec, &starts, trained)
    }

    /// Where a secure round also evaluates on the devices: each session's
    /// figures for the model it was sent, on its held-out text.
    fn held_out_figures(
        &self,
        spec: &folio_proto::SecureSpec,
        starts: &BTreeMap<u64, &RoundStart>,
        sessions: impl Iterator<Item = u64>,
    ) -> anyhow::Result<BTreeMap<u64, folio_secagg::HeldOut>> {
        let most = spec.quantizer.held_out_chars;
        if most == 0 {
            return Ok(BTreeMap::new());
        }
        // Each session with its held-out text and the model it was sent.
        let askers: Vec<_> = sessions
            .filter_map(|s| Some((s, self.held_out.get(&s)?, self.global(starts[&s]))))
            .collect();
        let figures = folio_host::eval::parallel_map(&askers, |(_, ids, weights)| {
            pollster::block_on(folio_client::evaluate::held_out_figures(
                &burn::prelude::Device::flex(),
                self.model,
                weights,
                ids,
                most,
            ))
        });
        askers
            .iter()
            .zip(figures)
            .map(|((session, ..), figures)| Ok((*session, figures?)))
            .collect()
    }

    fn send_secure(
        &mut self,
        spec: folio_proto::SecureSpec,
        starts: &BTreeMap<u64, &RoundStart>,
        trained: Vec<Trained>,
    ) -> anyhow::Result<()> {
        use folio_proto::{ClientStep, ServerStep};
        let refused = |e: folio_engine::EngineError| {
            anyhow::anyhow!("an honest step was refused: {}", e.message)
        };
        let mut clients = BTreeMap::new();
        let trained: BTreeMap<u64, Trained> = trained.into_iter().map(|t| (t.session, t)).collect();
        let held_out = self.held_out_figures(&spec, starts, trained.keys().copied())?;
        for &session in trained.keys() {
            let mut entropy = [0u8; 32];
            self.rng.fill_bytes(&mut entropy);
            let (client, keys) = folio_secagg::SecureClient::new(spec, entropy);
            clients.insert(session, client);
            self.engine
                .secure(session, ClientStep::Keys(keys), Instant::now())
                .map_err(refused)?;
        }
        loop {
            let mut steps = Vec::new();
            while let Some(action) = self.engine.poll_action() {
                match action {
                    Action::Send { to, message } => match message.as_ref() {
                        ServerMessage::Secure(step) => {
                            steps.extend(to.into_iter().map(|s| (s, step.clone())))
                        }
                        _ => self.deferred.push_back(Action::Send { to, message }),
                    },
                    other => self.deferred.push_back(other),
                }
            }
            if steps.is_empty() {
                return Ok(());
            }
            for (session, step) in steps {
                let client = clients.get_mut(&session).expect("a client of the round");
                let reply = match step {
                    ServerStep::Roster(roster) => ClientStep::Shares(client.roster(roster)?),
                    ServerStep::Shares(shares) => ClientStep::Check(client.shares(shares)?),
                    ServerStep::Proceed(proceed) => {
                        client.proceed(proceed)?;
                        let t = &trained[&session];
                        let masked = client.mask(&folio_secagg::Input {
                            delta: &t.delta,
                            weight: spec.weight(t.examples),
                            loss: t.metrics.0,
                            accuracy: t.metrics.1,
                            held_out: held_out.get(&session).copied().unwrap_or_default(),
                        })?;
                        // Counted as the wire would carry them: the masked input
                        // up, the model down.
                        let down = self.model_bytes(starts[&session]);
                        self.engine
                            .add_bytes(session, masked.input.len() as u64, down);
                        ClientStep::Masked(masked)
                    }
                    ServerStep::Unmask(request) => ClientStep::Reveal(client.unmask(request)?),
                };
                self.engine
                    .secure(session, reply, Instant::now())
                    .map_err(refused)?;
            }
        }
    }

    /// Sends `session`'s update for `start`'s round at `now`, its delta encoded
    /// as the round asks (the bytes counted as the wire would carry them).
    pub fn send(
        &mut self,
        session: u64,
        start: &RoundStart,
        delta: &[f32],
        examples: u64,
        metrics: (f64, f64, f32),
        now: Instant,
    ) -> Result<(), EngineError> {
        let encoded = codec::encode(delta, &self.segments, start.delta_encoding);
        let down = self.model_bytes(start);
        self.engine.add_bytes(session, encoded.len() as u64, down);
        let delta = CheckedDelta::new(encoded, &self.segments, start.delta_encoding)
            .map_err(|e| EngineError::new(folio_proto::ErrorCode::BadDelta, e.to_string()))?;
        let (loss, accuracy, seconds) = metrics;
        let update = DecodedUpdate {
            round: start.round,
            examples,
            delta,
            train_loss: loss as f32,
            train_accuracy: accuracy as f32,
            train_seconds: seconds,
        };
        self.engine.update(session, update, now)
    }
}
