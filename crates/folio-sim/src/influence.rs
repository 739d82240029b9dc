//! What one attacker among honest clients does to the global model under each
//! strategy. Honest clients train for real on their Shakespeare lines (flex); the
//! attacker, a session of its own, sees the honest clients' mean delta (the
//! strongest position) and picks the example count, scale and direction. Every
//! update goes through the round engine of `folio serve`: its examples bound, its
//! strategy, its rules for refused updates.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use burn::prelude::Device;
use folio_data::batch::{batch_count, batches};
use folio_data::{Batch, BatchConfig, Corpus, vocab};
use folio_engine::{Engine, EngineConfig, Evaluation, RoundConfig, Start};
use folio_fed::robust::l2_norm;
use folio_fed::sampling::sample_clients;
use folio_fed::{Encoding, StrategyConfig};
use folio_model::params::delta;
use folio_model::{CharRnn, Preset};
use folio_proto::ErrorCode;

use crate::host::{InProcess, Jobs};
use crate::population::join;

#[derive(Debug, Clone)]
pub struct Influence {
    pub preset: Preset,
    /// The starting model's file.
    pub init: PathBuf,
    /// Honest clients (one attacker joins them).
    pub honest: usize,
    pub rounds: u64,
    /// Local batches per round.
    pub batches: u32,
    pub client_lr: f32,
    pub seed: u64,
    pub data_dir: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attack {
    /// No attacker: the honest-only reference.
    None,
    /// The reverse of the honest mean, scaled by 1e6, claiming u64::MAX examples
    /// (then the most the server allows, if that is refused).
    Boosted,
    /// The reverse of the honest mean, 3×, claiming the most examples allowed.
    Stealthy,
}

impl Attack {
    pub const ALL: [Attack; 3] = [Attack::None, Attack::Boosted, Attack::Stealthy];

    pub fn name(self) -> &'static str {
        match self {
            Attack::None => "none",
            Attack::Boosted => "boosted (-1e6 x, u64::MAX)",
            Attack::Stealthy => "stealthy (-3 x, max allowed)",
        }
    }
}

/// One run's outcome.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The global model after round 1 and at the end.
    pub after_one: Vec<f32>,
    pub end: Vec<f32>,
    /// The attacker's updates the engine refused.
    pub refused: usize,
    /// Held-out accuracy at the start and at the end (`None`: non-finite model).
    pub accuracy: (f64, Option<f64>),
}

/// The experiment's fixed parts: honest clients, an attacker, held-out batches.
pub struct Setup {
    params: Influence,
    corpus: Corpus,
    honest: Vec<String>,
    attacker: String,
    eval: Vec<Batch>,
    start: Vec<f32>,
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
        let chosen = sample_clients(&eligible, params.honest + 1, params.seed, 1);
        anyhow::ensure!(
            chosen.len() == params.honest + 1,
            "the corpus has {} clients with enough text; {} needed",
            chosen.len(),
            params.honest + 1
        );
        // The attacker poses as a client with as much text as any honest one.
        let (attacker, honest) = chosen.split_last().expect("at least one");
        let eval = honest
            .iter()
            .flat_map(|c| {
                batches(&vocab::encode(&c.test_text()).0, &BatchConfig::tutorial(0))
                    .into_iter()
                    .take(2)
            })
            .collect();
        let start = folio_model::checkpoint::load(&params.init, Some(params.preset.config()))
            .with_context(|| format!("cannot start from {}: pass --init", params.init.display()))?
            .weights;
        Ok(Self {
            honest: honest.iter().map(|c| c.id.clone()).collect(),
            attacker: attacker.id.clone(),
            corpus,
            eval,
            start,
            params,
        })
    }

    pub fn params(&self) -> &Influence {
        &self.params
    }

    pub fn start(&self) -> &[f32] {
        &self.start
    }

    /// Held-out accuracy of `weights`.
    pub fn accuracy(&self, weights: &[f32]) -> anyhow::Result<f64> {
        let model = CharRnn::from_flat(self.params.preset.config(), weights, &Device::flex())?;
        Ok(pollster::block_on(folio_model::eval::evaluate(&model, &self.eval))?.accuracy)
    }

    fn rounds(&self, strategy: StrategyConfig) -> RoundConfig {
        RoundConfig {
            strategy,
            deadline: Duration::from_secs(3600),
            max_batches: Some(self.params.batches),
            client_lr: self.params.client_lr,
            // Clients train from, and the attacker computes against, exact weights.
            model_encoding: Encoding::F32,
            ..RoundConfig::tutorial()
        }
    }

    /// Runs the rounds with `strategy` (its client counts set here) under `attack`.
    pub fn run(&self, strategy: StrategyConfig, attack: Attack) -> anyhow::Result<Outcome> {
        let clients = self.honest.len() + usize::from(attack != Attack::None);
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
            max_rounds: Some(self.params.rounds),
            ..folio_server::engine_config(
                self.params.preset,
                self.rounds(strategy),
                self.params.seed,
            )
        };
        let texts: Vec<(String, usize)> = self
            .honest
            .iter()
            .chain([&self.attacker])
            .map(|id| {
                let chars = vocab::encode(&self.corpus.client(id)?.train_text()).0.len();
                Ok((id.clone(), chars))
            })
            .collect::<anyhow::Result<_>>()?;
        let built = folio_fed::strategy::build(strategy, self.params.seed);
        let start = Start {
            weights: self.start.clone(),
            strategy: None,
            history: Vec::new(),
        };
        let mut engine = Engine::new(config, built, texts, start, std::time::Instant::now());
        let mut ids = self.honest.clone();
        if attack != Attack::None {
            ids.push(self.attacker.clone());
        }
        let sessions = join(&mut engine, &ids)?;
        let mut honest = BTreeMap::new();
        for (id, &session) in self.honest.iter().zip(&sessions) {
            honest.insert(
                session,
                vocab::encode(&self.corpus.client(id)?.train_text()).0,
            );
        }
        let attacker = (attack != Attack::None).then(|| sessions[self.honest.len()]);
        let mut host = InProcess::new(engine, model);
        let mut jobs = Unsaved { setup: self };
        let mut after_one = None;
        let mut refused = 0;
        while let Some(round) = host.next_round(&mut jobs)? {
            if round.round == 2 {
                after_one = Some(host.engine.weights().to_vec());
            }
            let mut honest_mean = vec![0f64; model.num_params()];
            let mut attacker_start = None;
            for (session, start) in &round.clients {
                let Some(text) = honest.get(session) else {
                    attacker_start = Some(start.clone());
                    continue;
                };
                let local = host.train(start, text)?;
                for (m, d) in honest_mean.iter_mut().zip(&local.delta) {
                    *m += f64::from(*d) / self.honest.len() as f64;
                }
                let metrics = (local.metrics.loss, local.metrics.accuracy, local.seconds);
                host.send(*session, start, &local.delta, local.examples, metrics)
                    .map_err(|e| anyhow::anyhow!("an honest update was refused: {}", e.message))?;
            }
            let (Some(session), Some(start)) = (attacker, attacker_start) else {
                continue;
            };
            let reverse = |scale: f64| -> Vec<f32> {
                honest_mean.iter().map(|m| (-scale * m) as f32).collect()
            };
            // The most examples its text allows, as an honest client could know.
            let allowed = host
                .engine
                .config()
                .rounds
                .plan(start.seed)
                .max_examples(host.engine.clients()[&self.attacker]);
            let attempts = match attack {
                Attack::None => vec![],
                Attack::Boosted => vec![(reverse(1e6), u64::MAX), (reverse(1e6), allowed)],
                Attack::Stealthy => vec![(reverse(3.0), allowed)],
            };
            for (delta, claimed) in attempts {
                match host.send(session, &start, &delta, claimed, (2.0, 0.0, 1.0)) {
                    Ok(()) => break,
                    Err(e) if e.code == ErrorCode::BadExamples => refused += 1,
                    Err(e) => anyhow::bail!("the attacker's update: {}", e.message),
                }
            }
        }
        let end = host.engine.weights().to_vec();
        let accuracy = end
            .iter()
            .all(|w| w.is_finite())
            .then(|| self.accuracy(&end))
            .transpose()?;
        Ok(Outcome {
            after_one: after_one.unwrap_or_else(|| end.clone()),
            end,
            refused,
            accuracy: (self.accuracy(&self.start)?, accuracy),
        })
    }

    /// How far `outcome`'s first round moved from `reference`'s.
    pub fn distance(outcome: &Outcome, reference: &Outcome) -> f64 {
        l2_norm(&delta(&outcome.after_one, &reference.after_one))
    }

    /// The length of `outcome`'s first-round step.
    pub fn first_step(&self, outcome: &Outcome) -> f64 {
        l2_norm(&delta(&outcome.after_one, &self.start))
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
