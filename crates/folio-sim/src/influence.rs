//! What attackers among honest clients do to the global model under each
//! strategy: one attacker who sees the honest clients' mean delta (the strongest
//! position), or a crowd of sybils pulling together in one direction. Honest
//! clients train for real on their Shakespeare lines (flex); every attacker is a
//! session of its own. Every update goes through the round engine of `folio
//! serve`: its examples bound, its strategy, its rules for refused updates.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use burn::prelude::Device;
use folio_data::batch::{batch_count, batches};
use folio_data::rng::SplitMix64;
use folio_data::{Batch, BatchConfig, Corpus, vocab};
use folio_engine::{Engine, EngineConfig, Evaluation, RoundConfig, RoundRecord, Start};
use folio_fed::robust::l2_norm;
use folio_fed::sampling::sample_clients;
use folio_fed::strategy::median_norm;
use folio_fed::{Encoding, StrategyConfig};
use folio_host::eval::parallel_map;
use folio_model::CharRnn;
use folio_model::Preset;
use folio_proto::ErrorCode;

use crate::host::{InProcess, Jobs};
use crate::population::join;

#[derive(Debug, Clone)]
pub struct Influence {
    pub preset: Preset,
    /// The starting model's file.
    pub init: PathBuf,
    /// Clients drawn for the experiment; a run's honest clients and attackers
    /// come from them.
    pub clients: usize,
    /// Clients whose held-out text every model is evaluated on (the first drawn).
    pub eval_clients: usize,
    /// Local batches per round.
    pub batches: u32,
    pub client_lr: f32,
    pub seed: u64,
    pub data_dir: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Attack {
    /// No attacker: the honest-only reference.
    None,
    /// The reverse of the honest mean, scaled by 1e6, claiming u64::MAX examples
    /// (then the most the server allows, if that is refused).
    Boosted,
    /// The reverse of the honest mean, 3×, claiming the most examples allowed.
    Stealthy,
    /// Every attacker sends one fixed direction, `scale` × the bound the last
    /// round clipped to (public in the history; before any, the honest median
    /// norm of the round, which an attacker with one real client can measure),
    /// claiming the most examples allowed.
    Crowd { scale: f32 },
}

impl Attack {
    pub fn name(self) -> String {
        match self {
            Attack::None => "none".into(),
            Attack::Boosted => "boosted (-1e6 x, u64::MAX)".into(),
            Attack::Stealthy => "stealthy (-3 x, max allowed)".into(),
            Attack::Crowd { scale } => format!("{scale} x the bound, one direction"),
        }
    }
}

/// One run: `honest` honest clients and `attackers` attackers, for `rounds`.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    pub strategy: StrategyConfig,
    pub attack: Attack,
    pub honest: usize,
    pub attackers: usize,
    pub rounds: u64,
}

/// One run's outcome.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Every committed round, from round 0 (the starting model, evaluated).
    pub history: Vec<RoundRecord>,
    /// The global model after each round, from round 0.
    pub weights: Vec<Vec<f32>>,
    /// The attackers' updates the engine refused.
    pub refused: usize,
}

impl Outcome {
    /// How far the model moved along `direction` (a unit vector) by `round`.
    pub fn movement_along(&self, direction: &[f32], round: u64) -> f64 {
        let (start, then) = (&self.weights[0], &self.weights[round as usize]);
        then.iter()
            .zip(start)
            .zip(direction)
            .map(|((t, s), d)| (f64::from(*t) - f64::from(*s)) * f64::from(*d))
            .sum()
    }

    /// How far the model moved (L2) by `round`.
    pub fn distance_from_start(&self, round: u64) -> f64 {
        l2_distance(&self.weights[round as usize], &self.weights[0])
    }

    /// The L2 distance between the models two runs had after `round`.
    pub fn distance(&self, other: &Outcome, round: u64) -> f64 {
        l2_distance(
            &self.weights[round as usize],
            &other.weights[round as usize],
        )
    }
}

fn l2_distance(a: &[f32], b: &[f32]) -> f64 {
    let difference: Vec<f32> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    l2_norm(&difference)
}

/// The experiment's fixed parts: the clients drawn, held-out batches, the start.
pub struct Setup {
    params: Influence,
    corpus: Corpus,
    clients: Vec<String>,
    eval: Vec<Batch>,
    start: Vec<f32>,
    /// The crowd's direction: a seeded random unit vector.
    direction: Vec<f32>,
}

impl Setup {
    pub fn new(params: Influence) -> anyhow::Result<Self> {
        let corpus = Corpus::load(&params.data_dir.join("shakespeare"))?;
        let full =
            |len: usize| batch_count(len, &BatchConfig::tutorial(0)) >= params.batches as usize;
        let eligible: Vec<&folio_data::Client> = corpus
            .clients
            .iter()
            .filter(|c| full(vocab::encode(&c.train_text()).0.len()) && c.test_text().len() > 808)
            .collect();
        let chosen = sample_clients(&eligible, params.clients, params.seed, 1);
        anyhow::ensure!(
            chosen.len() == params.clients,
            "the corpus has {} clients with enough text; {} needed",
            chosen.len(),
            params.clients
        );
        let eval = chosen
            .iter()
            .take(params.eval_clients)
            .flat_map(|c| {
                batches(&vocab::encode(&c.test_text()).0, &BatchConfig::tutorial(0))
                    .into_iter()
                    .take(2)
            })
            .collect();
        let start = folio_model::checkpoint::load(&params.init, Some(params.preset.config()))
            .with_context(|| format!("cannot start from {}: pass --init", params.init.display()))?
            .weights;
        let mut rng = SplitMix64::new(params.seed ^ 0x5eed_d1ec);
        let raw: Vec<f64> = (0..start.len())
            .map(|_| 2.0 * rng.next_f64() - 1.0)
            .collect();
        let norm = raw.iter().map(|v| v * v).sum::<f64>().sqrt();
        let direction = raw.iter().map(|v| (v / norm) as f32).collect();
        Ok(Self {
            clients: chosen.iter().map(|c| c.id.clone()).collect(),
            corpus,
            eval,
            start,
            direction,
            params,
        })
    }

    pub fn params(&self) -> &Influence {
        &self.params
    }

    /// The crowd's direction (unit length).
    pub fn direction(&self) -> &[f32] {
        &self.direction
    }

    fn rounds(&self, strategy: StrategyConfig) -> RoundConfig {
        RoundConfig {
            strategy,
            deadline: Duration::from_secs(3600),
            max_batches: Some(self.params.batches),
            client_lr: self.params.client_lr,
            // Clients train from, and attackers compute against, exact weights.
            model_encoding: Encoding::F32,
            ..RoundConfig::tutorial()
        }
    }

    /// Runs `run`: every client joins and trains every round. Honest clients are
    /// the first drawn, attackers the last.
    pub fn run(&self, run: Run) -> anyhow::Result<Outcome> {
        let Run {
            strategy,
            attack,
            honest,
            attackers,
            rounds,
        } = run;
        anyhow::ensure!(
            honest + attackers <= self.clients.len(),
            "{honest} honest clients and {attackers} attackers, from {} drawn",
            self.clients.len()
        );
        let attackers = if attack == Attack::None { 0 } else { attackers };
        let clients = honest + attackers;
        let strategy = StrategyConfig {
            clients_per_round: clients,
            min_clients: clients,
            quorum: clients,
            ..strategy
        };
        let model = self.params.preset.config();
        let config = EngineConfig {
            max_sessions: clients,
            session_ttl: Duration::MAX,
            max_rounds: Some(rounds),
            ..folio_host::engine_config(
                self.params.preset,
                self.rounds(strategy),
                self.params.seed,
                folio_engine::Entropy::from_seed(self.params.seed),
            )
        };
        let ids: Vec<String> = self.clients[..honest]
            .iter()
            .chain(&self.clients[self.clients.len() - attackers..])
            .cloned()
            .collect();
        let texts: Vec<(String, Vec<u32>)> = ids
            .iter()
            .map(|id| {
                Ok((
                    id.clone(),
                    vocab::encode(&self.corpus.client(id)?.train_text()).0,
                ))
            })
            .collect::<anyhow::Result<_>>()?;
        let sizes = texts.iter().map(|(id, text)| (id.clone(), text.len()));
        let start = Start {
            weights: self.start.clone(),
            strategy: None,
            history: Vec::new(),
        };
        let mut engine: Engine = Engine::new(config, sizes, start, std::time::Instant::now())?;
        let sessions = join(&mut engine, &ids)?;
        // Each session's text, and whether it is honest.
        let roles: BTreeMap<u64, (&[u32], bool)> = sessions
            .iter()
            .zip(&texts)
            .enumerate()
            .map(|(i, (&session, (_, text)))| (session, (text.as_slice(), i < honest)))
            .collect();
        let mut host = InProcess::new(engine, model);
        let mut jobs = Unsaved { setup: self };
        let mut weights = vec![self.start.clone()];
        let mut refused = 0;
        while let Some(round) = host.next_round(&mut jobs)? {
            // The model this round starts from is the last round's (a retried
            // round starts from the same).
            if weights.len() < round.round as usize {
                weights.push(host.engine.weights().to_vec());
            }
            let (honest_round, attacking): (Vec<_>, Vec<_>) = round
                .clients
                .iter()
                .partition(|(session, _)| roles[session].1);
            let trained = parallel_map(&honest_round, |(session, start)| {
                host.train(start, roles[session].0)
            });
            let mut honest_mean = vec![0f64; model.num_params()];
            let mut norms = Vec::new();
            for ((session, start), local) in honest_round.iter().zip(trained) {
                let local = local?;
                for (m, d) in honest_mean.iter_mut().zip(&local.delta) {
                    *m += f64::from(*d) / honest_round.len() as f64;
                }
                norms.push(l2_norm(&local.delta));
                let metrics = (local.metrics.loss, local.metrics.accuracy, local.seconds);
                host.send(
                    *session,
                    start,
                    &local.delta,
                    local.examples,
                    metrics,
                    Instant::now(),
                )
                .map_err(|e| anyhow::anyhow!("an honest update was refused: {}", e.message))?;
            }
            let public_bound = host
                .engine
                .history(0, usize::MAX)
                .last()
                .and_then(|r| r.clip_bound);
            let reference_norm = public_bound.unwrap_or_else(|| median_norm(&norms));
            for (session, start) in attacking {
                // The most examples its text allows, as an honest client could know.
                let allowed = host
                    .engine
                    .config()
                    .rounds
                    .plan(start.seed)
                    .max_examples(roles[session].0.len());
                let reverse = |scale: f64| -> Vec<f32> {
                    honest_mean.iter().map(|m| (-scale * m) as f32).collect()
                };
                let attempts = match attack {
                    Attack::None => vec![],
                    Attack::Boosted => vec![(reverse(1e6), u64::MAX), (reverse(1e6), allowed)],
                    Attack::Stealthy => vec![(reverse(3.0), allowed)],
                    Attack::Crowd { scale } => {
                        let length = f64::from(scale) * reference_norm;
                        let delta = self
                            .direction
                            .iter()
                            .map(|&d| (f64::from(d) * length) as f32)
                            .collect();
                        vec![(delta, allowed)]
                    }
                };
                for (delta, claimed) in attempts {
                    match host.send(
                        *session,
                        start,
                        &delta,
                        claimed,
                        (2.0, 0.0, 1.0),
                        Instant::now(),
                    ) {
                        Ok(()) => break,
                        Err(e) if e.code == ErrorCode::BadExamples => refused += 1,
                        Err(e) => anyhow::bail!("an attacker's update: {}", e.message),
                    }
                }
            }
        }
        weights.push(host.engine.weights().to_vec());
        Ok(Outcome {
            history: host.engine.history(0, usize::MAX).to_vec(),
            weights,
            refused,
        })
    }
}

/// The experiment's jobs: evaluated on its held-out batches, kept in memory.
struct Unsaved<'a> {
    setup: &'a Setup,
}

impl Jobs for Unsaved<'_> {
    fn evaluate(
        &mut self,
        weights: &[f32],
        _population: bool,
    ) -> anyhow::Result<(Evaluation, Option<Evaluation>)> {
        let model =
            CharRnn::from_flat(self.setup.params.preset.config(), weights, &Device::flex())?;
        let metrics = pollster::block_on(folio_model::eval::evaluate(&model, &self.setup.eval))?;
        Ok((
            Evaluation {
                loss: metrics.loss,
                accuracy: metrics.accuracy,
            },
            None,
        ))
    }
}
