//! `folio simulate --population`: federated training at the papers' scale, in one
//! process. Each round the strategy samples its clients from every Shakespeare
//! client with training text (1,103), each trains with the same local step as a
//! tab or a `folio client` ([`folio_client::train_locally`]), and the round goes
//! through the aggregator's own strategy and commit: the run folder holds the
//! same state file and `metrics.jsonl` as `folio serve`'s. Sampling and local
//! shuffles are functions of the seed and the round, so a run stopped at any
//! point resumes exactly where it stopped.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::Context;
use burn::prelude::Device;
use folio_data::{BatchConfig, Corpus, vocab};
use folio_fed::codec::CheckedDelta;
use folio_fed::strategy::RobustFedAvg;
use folio_fed::{Strategy, Weighting, codec, sampling};
use folio_model::{CharRnn, Metrics};
use folio_proto::RoundStart;
use folio_server::record::model_hash;
use folio_server::{RoundRecord, state};
use indicatif::{ProgressBar, ProgressStyle};

use crate::federate::{RoundArgs, TABLE_HEADER, row};

struct Client {
    ids: Vec<u32>,
    allowed: u64,
}

pub fn run(
    round: &RoundArgs,
    rounds: u64,
    sample_by_size: bool,
    state_dir: &Path,
    data_dir: &Path,
) -> anyhow::Result<()> {
    let mut config = round.round_config();
    if sample_by_size {
        config.strategy.weighting = Weighting::Uniform;
    }
    config
        .validate()
        .map_err(|why| anyhow::anyhow!("inconsistent round settings: {why}"))?;
    let corpus = Corpus::load(&data_dir.join("shakespeare"))?;
    let model = round.preset().config();
    let padded = BatchConfig::padded(0);
    let clients: Vec<Client> = corpus
        .clients
        .iter()
        .map(|c| vocab::encode(&c.train_text()).0)
        .filter(|ids| folio_data::batch::batch_count(ids.len(), &padded) > 0)
        .map(|ids| Client {
            allowed: config.allowed_examples(ids.len()),
            ids,
        })
        .collect();
    let eval_batches = folio_server::eval_batches(&corpus, &config, round.seed())?;
    let population = folio_server::population_ids(&corpus);
    let strategy = RobustFedAvg::new(config.strategy, round.seed());
    let segments: Vec<usize> = model
        .param_shapes()
        .iter()
        .map(|(_, shape)| shape.iter().product())
        .collect();
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("cannot create {}", state_dir.display()))?;

    let evaluate = |weights: &[f32]| -> anyhow::Result<Metrics> {
        let model = CharRnn::from_flat(model, weights, &Device::flex())?;
        Ok(pollster::block_on(folio_model::eval::evaluate(
            &model,
            &eval_batches,
        ))?)
    };
    // The population split into one interleaved share per core, evaluated side by
    // side and merged by targets.
    let shares: Vec<Vec<Vec<u32>>> = (0..workers())
        .map(|share| {
            population
                .iter()
                .skip(share)
                .step_by(workers())
                .cloned()
                .collect()
        })
        .collect();
    let evaluate_population = |weights: &[f32]| -> anyhow::Result<Metrics> {
        let parts = parallel_map(&shares, |share| -> anyhow::Result<Metrics> {
            let model = CharRnn::from_flat(model, weights, &Device::flex())?;
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
        total.context("no population to evaluate")
    };
    let population_due = |r: u64| {
        config
            .population_eval_every
            .is_some_and(|every| r == 0 || r == rounds || r.is_multiple_of(every.max(1)))
    };

    let (mut weights, mut strategy_state, mut history) = match state::load(
        state_dir,
        config.strategy.server_optimizer,
        model.num_params(),
    )? {
        Some(saved) => {
            let strategy_state = saved
                .strategy
                .unwrap_or_else(|| strategy.initial_state(model.num_params()));
            (saved.weights, strategy_state, saved.history)
        }
        None => {
            let weights = match round.init() {
                Some(path) => {
                    folio_model::checkpoint::load(&path, Some(model))
                        .with_context(|| format!("cannot start from {}", path.display()))?
                        .weights
                }
                None => pollster::block_on(
                    CharRnn::init(model, round.seed(), &Device::flex()).to_flat(),
                )?,
            };
            (
                weights,
                strategy.initial_state(model.num_params()),
                Vec::new(),
            )
        }
    };
    if history.is_empty() {
        let metrics = evaluate(&weights)?;
        let population = population_due(0)
            .then(|| evaluate_population(&weights))
            .transpose()?;
        history.push(RoundRecord::initial(
            &metrics,
            population.as_ref(),
            &weights,
        ));
        state::commit(state_dir, &weights, &strategy_state, &history, round.seed())?;
    }
    let done = history.last().map_or(0, |r| r.round);
    let bar = ProgressBar::new(rounds);
    bar.set_style(
        ProgressStyle::with_template("[{bar:30}] round {pos}/{len}, {elapsed}, ETA {eta} {msg}")
            .expect("valid template"),
    );
    bar.set_position(done.min(rounds));
    let print = |line: String| {
        if bar.is_hidden() {
            println!("{line}")
        } else {
            bar.println(line)
        }
    };
    print(format!(
        "{} clients to sample from, {} a round; {} of {rounds} rounds done in {}",
        clients.len(),
        config.strategy.clients_per_round,
        done,
        state_dir.display()
    ));
    print(TABLE_HEADER.to_owned());
    for record in &history {
        print(row(record));
    }
    let everyone: Vec<u64> = (0..clients.len() as u64).collect();
    let sizes: Vec<u64> = clients.iter().map(|c| c.ids.len() as u64).collect();
    for r in done + 1..=rounds {
        let started = Instant::now();
        let selected: Vec<u64> = if sample_by_size {
            let count = config.strategy.clients_per_round;
            sampling::sample_by_size(&sizes, count, round.seed(), r)
                .into_iter()
                .map(|i| i as u64)
                .collect()
        } else {
            strategy
                .configure_round(r, 0, &everyone, &BTreeSet::new())
                .context("fewer clients than a round needs")?
        };
        let start = RoundStart {
            round: r,
            model: 0,
            weights: None,
            weights_encoding: config.model_encoding,
            deadline_ms: u64::MAX,
            local_epochs: config.local_epochs,
            max_batches: config.max_batches,
            optimizer: config.client_optimizer,
            learning_rate: config.client_lr_at(r),
            clip_norm: config.clip_norm,
            delta_encoding: config.delta_encoding,
            seed: round.seed() ^ r,
        };
        // The model as the wire carries it down: clients train from those values.
        let down = codec::encode(&weights, &[weights.len()], config.model_encoding);
        let received = codec::decode(&down, &[weights.len()], config.model_encoding)?;
        let mut open = strategy.open_round(&strategy_state, weights.len());
        let (mut loss, mut accuracy, mut examples, mut bytes_up) = (0.0, 0.0, 0u64, 0u64);
        let trained = AtomicUsize::new(0);
        bar.set_message(format!("0/{} clients trained", selected.len()));
        let draws: Vec<(u64, RoundStart)> = selected
            .iter()
            .zip(draw_seeds(&selected, start.seed))
            .map(|(&client, seed)| {
                (
                    client,
                    RoundStart {
                        seed,
                        ..start.clone()
                    },
                )
            })
            .collect();
        let locals = parallel_map(&draws, |(client, start)| {
            let client = &clients[*client as usize];
            let local = pollster::block_on(folio_client::train_locally(
                &Device::flex(),
                model,
                &client.ids,
                config.batch_size as usize,
                config.seq_len as usize,
                &received,
                start,
                |_, _| {},
            ));
            let done = trained.fetch_add(1, Ordering::Relaxed) + 1;
            bar.set_message(format!("{done}/{} clients trained", selected.len()));
            local
        });
        // Folded in selection order, whichever finished first: the sum is the same
        // bit for bit whatever the number of cores.
        for (local, &client) in locals.into_iter().zip(&selected) {
            let local = local?;
            // The delta as the wire carries it: quantised when the round says so.
            let encoded = codec::encode(&local.delta, &segments, config.delta_encoding);
            bytes_up += encoded.len() as u64;
            let delta = CheckedDelta::new(encoded, &segments, config.delta_encoding)?;
            loss += local.metrics.loss * local.examples as f64;
            accuracy += local.metrics.accuracy * local.examples as f64;
            examples += local.examples;
            strategy.accept(
                &mut open,
                &delta,
                local.examples,
                clients[client as usize].allowed,
            )?;
        }
        let aggregated = strategy.aggregate(&open, &weights, &strategy_state)?;
        let metrics = evaluate(&aggregated.weights)?;
        let population = population_due(r)
            .then(|| evaluate_population(&aggregated.weights))
            .transpose()?;
        let record = RoundRecord {
            round: r,
            clients: selected.len(),
            train_loss: Some(loss / examples.max(1) as f64),
            train_accuracy: Some(accuracy / examples.max(1) as f64),
            eval_loss: metrics.loss,
            eval_accuracy: metrics.accuracy,
            bytes_up,
            bytes_down: (down.len() * selected.len()) as u64,
            seconds: started.elapsed().as_secs_f64(),
            clipped: aggregated.clipped,
            clip_bound: Some(f64::from(strategy_state.clip_bound)).filter(|b| b.is_finite()),
            delta_norm: Some(aggregated.median_norm),
            population_loss: population.map(|m| m.loss),
            population_accuracy: population.map(|m| m.accuracy),
            model_hash: model_hash(&aggregated.weights),
        };
        weights = aggregated.weights;
        strategy_state = aggregated.state;
        history.push(record);
        state::commit(state_dir, &weights, &strategy_state, &history, round.seed())?;
        print(row(history.last().expect("just pushed")));
        bar.set_position(r);
    }
    bar.finish_and_clear();
    let last = history.last().expect("round 0 at least");
    println!(
        "{} rounds in {}: eval accuracy {:.4}{}",
        last.round,
        state_dir.display(),
        last.eval_accuracy,
        last.population_accuracy
            .map_or_else(String::new, |acc| format!(", population accuracy {acc:.4}"))
    );
    Ok(())
}

/// Each draw's shuffle seed: the round's, except that a client drawn again in
/// the same round (sampling with replacement) gets a new one each time, so that
/// it trains other text rather than the same batch twice.
fn draw_seeds(selected: &[u64], round_seed: u64) -> Vec<u64> {
    selected
        .iter()
        .enumerate()
        .map(|(slot, client)| {
            let earlier = selected[..slot].iter().filter(|&c| c == client).count() as u64;
            round_seed ^ (earlier << 32)
        })
        .collect()
}

/// Threads for local training and evaluation: one per core.
fn workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `f` over `items` on [`workers`] threads, each taking the next item when free
/// (clients differ in size by orders of magnitude); results in `items`' order.
fn parallel_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_drawn_again_shuffles_anew_and_first_draws_keep_the_round_seed() {
        let seeds = draw_seeds(&[4, 9, 4, 2, 4], 77);
        assert_eq!(seeds[0], 77);
        assert_eq!(seeds[1], 77);
        assert_eq!(seeds[3], 77);
        let mut fours = vec![seeds[0], seeds[2], seeds[4]];
        fours.sort();
        fours.dedup();
        assert_eq!(fours.len(), 3, "{seeds:?}");
    }
}
