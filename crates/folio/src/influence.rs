//! `folio bench influence`: what one attacker among honest clients does to the
//! global model under each aggregator. Honest clients train for real on their
//! Shakespeare lines (flex); the attacker sees the honest clients' mean delta
//! (the strongest position) and picks the example count, scale and direction.
//! Every update goes through the aggregator's own [`RobustFedAvg`], with the
//! example bound the server derives from each client's data.

use std::path::Path;
use std::time::Instant;

use anyhow::Context;

use burn::prelude::Device;
use folio_data::batch::{batch_count, batches, max_batch_count};
use folio_data::{BatchConfig, Corpus, vocab};
use folio_fed::codec::CheckedDelta;
use folio_fed::robust::l2_norm;
use folio_fed::sampling::sample_clients;
use folio_fed::strategy::RobustFedAvg;
use folio_fed::{Aggregation, Clipping, Strategy, StrategyConfig};
use folio_model::params::delta;
use folio_model::{CharRnn, ModelConfig, Preset};

#[derive(clap::Args)]
pub struct InfluenceArgs {
    #[arg(long, default_value = "small")]
    preset: Preset,
    /// The starting model [default: the shipped Dickens model of the preset]
    #[arg(long)]
    init: Option<std::path::PathBuf>,
    /// Honest clients (one attacker joins them).
    #[arg(long, default_value_t = 9)]
    honest: usize,
    #[arg(long, default_value_t = 5)]
    rounds: u64,
    /// Local batches per round.
    #[arg(long, default_value_t = 5)]
    batches: usize,
    #[arg(long, default_value_t = 0.5)]
    client_lr: f64,
    /// The fixed clipping bound (and the adaptive one's start).
    #[arg(long, default_value_t = 1.0)]
    clip_bound: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Clone, Copy)]
enum Attack {
    /// No attacker: the honest-only reference.
    None,
    /// The reverse of the honest mean, scaled by 1e6, claiming u64::MAX examples.
    Boosted,
    /// The reverse of the honest mean, 3×, claiming the most examples allowed.
    Stealthy,
}

impl Attack {
    fn name(self) -> &'static str {
        match self {
            Attack::None => "none",
            Attack::Boosted => "boosted (-1e6 x, u64::MAX)",
            Attack::Stealthy => "stealthy (-3 x, max allowed)",
        }
    }
}

struct Client {
    ids: Vec<u32>,
    allowed: u64,
}

struct Setup {
    model: ModelConfig,
    honest: Vec<Client>,
    eval: Vec<folio_data::Batch>,
    args: InfluenceArgs,
}

fn local_update(
    setup: &Setup,
    global: &[f32],
    client: &Client,
    round: u64,
) -> anyhow::Result<(Vec<f32>, u64)> {
    let start = folio_proto::RoundStart {
        round,
        model: 0,
        weights: None,
        weights_encoding: folio_fed::Encoding::F32,
        deadline_ms: u64::MAX,
        local_epochs: 1,
        max_batches: Some(setup.args.batches as u32),
        optimizer: folio_proto::Optimizer::Sgd,
        learning_rate: setup.args.client_lr as f32,
        clip_norm: None,
        delta_encoding: folio_fed::Encoding::F32,
        seed: round,
    };
    let local = pollster::block_on(folio_client::train_locally(
        &Device::flex(),
        setup.model,
        &client.ids,
        8,
        100,
        global,
        &start,
        |_, _| {},
    ))?;
    Ok((local.delta, local.examples))
}

/// Runs `rounds` rounds; returns the global model after round 1 and at the end.
fn federate(
    setup: &Setup,
    strategy: &RobustFedAvg,
    bounded: bool,
    attack: Attack,
    start: &[f32],
) -> anyhow::Result<(Vec<f32>, Vec<f32>, usize)> {
    let mut weights = start.to_vec();
    let mut state = strategy.initial_state(weights.len());
    let mut after_one = Vec::new();
    let mut refused = 0;
    for round in 1..=setup.args.rounds {
        let mut open = strategy.open_round(&state, weights.len());
        let mut honest_mean = vec![0f64; weights.len()];
        for client in &setup.honest {
            let (delta, examples) = local_update(setup, &weights, client, round)?;
            for (m, d) in honest_mean.iter_mut().zip(&delta) {
                *m += f64::from(*d) / setup.honest.len() as f64;
            }
            let allowed = if bounded { client.allowed } else { u64::MAX };
            strategy.accept(
                &mut open,
                &CheckedDelta::from_values(&delta)?,
                examples,
                allowed,
            )?;
        }
        let reverse =
            |scale: f64| -> Vec<f32> { honest_mean.iter().map(|m| (-scale * m) as f32).collect() };
        // The attacker poses as the biggest honest client.
        let biggest = setup.honest.iter().map(|c| c.allowed).max().unwrap_or(1);
        // Undefended, the server takes any claimed count.
        let allowed = if bounded { biggest } else { u64::MAX };
        let attempts: Vec<(Vec<f32>, u64)> = match attack {
            Attack::None => vec![],
            // If the huge claim is refused, it claims what the server allows.
            Attack::Boosted => vec![(reverse(1e6), u64::MAX), (reverse(1e6), biggest)],
            Attack::Stealthy => vec![(reverse(3.0), biggest)],
        };
        for (delta, claimed) in attempts {
            let delta = CheckedDelta::from_values(&delta)?;
            match strategy.accept(&mut open, &delta, claimed, allowed) {
                Ok(()) => break,
                Err(_) => refused += 1,
            }
        }
        // A non-finite result is never committed: the round is dropped.
        if let Ok(aggregated) = strategy.aggregate(&open, &weights, &state) {
            weights = aggregated.weights;
            state = aggregated.state;
        }
        if round == 1 {
            after_one = weights.clone();
        }
    }
    Ok((after_one, weights, refused))
}

pub fn run(args: InfluenceArgs, data_dir: &Path) -> anyhow::Result<()> {
    let corpus = Corpus::load(&data_dir.join("shakespeare"))?;
    let model = args.preset.config();
    let full = |len: usize| batch_count(len, &BatchConfig::tutorial(0)) >= args.batches;
    let eligible: Vec<&folio_data::Client> = corpus
        .clients
        .iter()
        .filter(|c| full(vocab::encode(&c.train_text()).0.len()) && c.test_text().len() > 808)
        .collect();
    let chosen = sample_clients(&eligible, args.honest, args.seed, 1);
    let honest: Vec<Client> = chosen
        .iter()
        .map(|c| {
            let ids = vocab::encode(&c.train_text()).0;
            let allowed =
                (max_batch_count(ids.len(), &BatchConfig::padded(0)).min(args.batches) * 8) as u64;
            Client { ids, allowed }
        })
        .collect();
    let eval: Vec<folio_data::Batch> = chosen
        .iter()
        .flat_map(|c| {
            batches(&vocab::encode(&c.test_text()).0, &BatchConfig::tutorial(0))
                .into_iter()
                .take(2)
        })
        .collect();
    let setup = Setup {
        model,
        honest,
        eval,
        args,
    };
    let init = setup.args.init.clone().unwrap_or_else(|| {
        std::path::PathBuf::from(format!(
            "models/dickens-{}.safetensors",
            setup.args.preset.name()
        ))
    });
    let start = folio_model::checkpoint::load(&init, Some(model))
        .with_context(|| format!("cannot start from {}: pass --init", init.display()))?
        .weights;
    let accuracy = |weights: &[f32]| -> anyhow::Result<f64> {
        let model = CharRnn::from_flat(setup.model, weights, &Device::flex())?;
        Ok(pollster::block_on(folio_model::eval::evaluate(&model, &setup.eval))?.accuracy)
    };
    let bound = setup.args.clip_bound;
    let fedavg = |clipping, aggregation| StrategyConfig {
        clipping,
        aggregation,
        ..StrategyConfig::fedavg(setup.honest.len() + 1)
    };
    // (name, strategy, whether the server bounds the claimed example count)
    let aggregators = [
        (
            "undefended mean",
            fedavg(Clipping::Off, Aggregation::Mean),
            false,
        ),
        (
            "clipped mean, fixed",
            fedavg(Clipping::Fixed { bound }, Aggregation::Mean),
            true,
        ),
        (
            "clipped mean, adaptive",
            fedavg(Clipping::adaptive(bound), Aggregation::Mean),
            true,
        ),
        (
            "trimmed mean 0.1",
            fedavg(Clipping::Off, Aggregation::TrimmedMean { trim: 0.1 }),
            true,
        ),
        ("median", fedavg(Clipping::Off, Aggregation::Median), true),
    ];
    println!(
        "{} preset from {}, {} honest clients + 1 attacker, {} rounds of {} local batches (SGD {}), clip bound {bound}",
        setup.args.preset.name(),
        init.display(),
        setup.honest.len(),
        setup.args.rounds,
        setup.args.batches,
        setup.args.client_lr
    );
    let started = Instant::now();
    // The honest-only FedAvg reference, unclipped.
    let reference = RobustFedAvg::new(fedavg(Clipping::Off, Aggregation::Mean), setup.args.seed);
    let (reference_one, reference_end, _) =
        federate(&setup, &reference, true, Attack::None, &start)?;
    println!(
        "honest-only FedAvg: accuracy {:.4} -> {:.4} after {} rounds; first-round step norm {:.3}",
        accuracy(&start)?,
        accuracy(&reference_end)?,
        setup.args.rounds,
        l2_norm(&delta(&reference_one, &start))
    );
    println!(
        "\naggregator               attack                         distance after round 1   accuracy after {}   refused claims",
        setup.args.rounds
    );
    for (name, config, bounded) in aggregators {
        let strategy = RobustFedAvg::new(config, setup.args.seed);
        for attack in [Attack::None, Attack::Boosted, Attack::Stealthy] {
            let (one, end, refused) = federate(&setup, &strategy, bounded, attack, &start)?;
            let distance = l2_norm(&delta(&one, &reference_one));
            let finite = end.iter().all(|w| w.is_finite());
            let acc = if finite {
                format!("{:.4}", accuracy(&end)?)
            } else {
                "non-finite".into()
            };
            println!(
                "{name:<24} {:<30} {distance:>22.3e}   {acc:>16}   {refused:>14}",
                attack.name()
            );
        }
    }
    println!("\n({:.0} s on flex)", started.elapsed().as_secs_f64());
    Ok(())
}
