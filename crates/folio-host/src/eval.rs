//! Central evaluation, for every host: a candidate model's loss and accuracy on
//! the fixed held-out batches, and on every client's test text (the population
//! figure) split across the cores.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Context;
use burn::prelude::Device;
use folio_data::batch::batches;
use folio_data::{Batch, BatchConfig, Corpus, vocab};
use folio_engine::{Evaluation, RoundConfig};
use folio_fed::sampling::sample_clients;
use folio_model::{CharRnn, Metrics, ModelConfig};

pub struct Evaluator {
    model: ModelConfig,
    batches: Vec<Batch>,
    /// Every client's test ids, split into one interleaved share per core.
    population: Vec<Vec<Vec<u32>>>,
}

impl Evaluator {
    /// The held-out batches `rounds` asks for, and the population when it is
    /// evaluated.
    pub fn new(
        model: ModelConfig,
        corpus: &Corpus,
        rounds: &RoundConfig,
        seed: u64,
    ) -> anyhow::Result<Self> {
        let population = match rounds.population_eval_every {
            Some(_) => population_ids(corpus),
            None => Vec::new(),
        };
        let population = (0..workers())
            .map(|share| {
                population
                    .iter()
                    .skip(share)
                    .step_by(workers())
                    .cloned()
                    .collect()
            })
            .collect();
        Ok(Self {
            model,
            batches: eval_batches(corpus, rounds, seed)?,
            population,
        })
    }

    /// A server that holds no text (devices bring their own): its figures are
    /// unknown (NaN), and the devices evaluate instead.
    pub fn without_text(model: ModelConfig) -> Self {
        Self {
            model,
            batches: Vec::new(),
            population: Vec::new(),
        }
    }

    /// Evaluates `weights` on the held-out batches, and on the population too when
    /// `population` is set. Blocks: call it off the async workers.
    pub fn evaluate(
        &self,
        weights: &[f32],
        population: bool,
    ) -> anyhow::Result<(Evaluation, Option<Evaluation>)> {
        if self.batches.is_empty() {
            let unknown = Evaluation {
                loss: f64::NAN,
                accuracy: f64::NAN,
            };
            return Ok((unknown, None));
        }
        let model = CharRnn::from_flat(self.model, weights, &Device::flex())?;
        let held_out = pollster::block_on(folio_model::eval::evaluate(&model, &self.batches))?;
        let population = population
            .then(|| self.evaluate_population(weights))
            .transpose()?;
        Ok((evaluation(held_out), population.map(evaluation)))
    }

    /// Held-out metrics over every client's test split, the shares side by side,
    /// merged by targets.
    fn evaluate_population(&self, weights: &[f32]) -> anyhow::Result<Metrics> {
        let parts = parallel_map(&self.population, |share| -> anyhow::Result<Metrics> {
            let model = CharRnn::from_flat(self.model, weights, &Device::flex())?;
            Ok(pollster::block_on(folio_model::eval::evaluate_population(
                &model,
                share,
                64,
                usize::MAX,
                |_, _| {},
            ))?)
        });
        let mut total: Option<Metrics> = None;
        for part in parts {
            let part = part?;
            total = Some(total.map_or(part, |sum| sum.merge(part)));
        }
        total.context("no population to evaluate: the corpus has no test text")
    }
}

fn evaluation(metrics: Metrics) -> Evaluation {
    Evaluation {
        loss: metrics.loss,
        accuracy: metrics.accuracy,
    }
}

/// Every client's test split, as ids: the population evaluation's data.
pub fn population_ids(corpus: &Corpus) -> Vec<Vec<u32>> {
    corpus
        .clients
        .iter()
        .map(|c| vocab::encode(&c.test_text()).0)
        .collect()
}

/// The fixed held-out set: the tutorial's check (one client's first training
/// batches) when `eval_client` is set, else the test split of a seeded sample of
/// clients.
pub fn eval_batches(
    corpus: &Corpus,
    rounds: &RoundConfig,
    seed: u64,
) -> anyhow::Result<Vec<Batch>> {
    let tutorial = BatchConfig::tutorial(0);
    let take = |text: String| {
        let (ids, _) = vocab::encode(&text);
        let mut all = batches(&ids, &tutorial);
        all.truncate(rounds.eval_batches);
        all
    };
    let batches: Vec<Batch> = match &rounds.eval_client {
        Some(id) => take(corpus.client(id)?.train_text()),
        None => {
            let eligible: Vec<&folio_data::Client> = corpus
                .clients
                .iter()
                .filter(|c| c.test_text().len() >= tutorial.ids_per_batch())
                .collect();
            sample_clients(&eligible, rounds.eval_clients, seed, u64::MAX)
                .into_iter()
                .flat_map(|c| take(c.test_text()))
                .collect()
        }
    };
    anyhow::ensure!(
        !batches.is_empty(),
        "no evaluation batches: check --eval-client / --eval-clients"
    );
    Ok(batches)
}

/// Threads for CPU-bound work (local training, evaluation): one per core.
pub fn workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `f` over `items` on [`workers`] threads, each taking the next item when free
/// (clients differ in size by orders of magnitude); results in `items`' order.
pub fn parallel_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<R>>> = Mutex::new(items.iter().map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..workers().min(items.len()) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = items.get(i) else { break };
                    let result = f(item);
                    results.lock().expect("no worker panics holding it")[i] = Some(result);
                }
            });
        }
    });
    results
        .into_inner()
        .expect("no worker panics holding it")
        .into_iter()
        .map(|r| r.expect("every item taken"))
        .collect()
}
