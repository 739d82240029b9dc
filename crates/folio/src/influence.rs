//! `folio bench influence`: what one attacker among honest clients does to the
//! global model under each strategy, every update going through the round engine
//! of `folio serve` ([`folio_sim::influence`]).

use std::path::Path;
use std::time::Instant;

use folio_fed::{Aggregation, Clipping, StrategyConfig};
use folio_model::Preset;
use folio_sim::influence::{Attack, Influence, Setup};

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

pub fn run(args: InfluenceArgs, data_dir: &Path) -> anyhow::Result<()> {
    let init = args.init.clone().unwrap_or_else(|| {
        std::path::PathBuf::from(format!("models/dickens-{}.safetensors", args.preset.name()))
    });
    let setup = Setup::new(Influence {
        preset: args.preset,
        init: init.clone(),
        honest: args.honest,
        rounds: args.rounds,
        batches: args.batches as u32,
        client_lr: args.client_lr as f32,
        seed: args.seed,
        data_dir: data_dir.to_owned(),
    })?;
    let bound = args.clip_bound;
    let fedavg = |clipping, aggregation| StrategyConfig {
        clipping,
        aggregation,
        ..StrategyConfig::fedavg(1)
    };
    let strategies = [
        ("unclipped mean", fedavg(Clipping::Off, Aggregation::Mean)),
        (
            "clipped mean, fixed",
            fedavg(Clipping::Fixed { bound }, Aggregation::Mean),
        ),
        (
            "clipped mean, adaptive",
            fedavg(Clipping::adaptive(bound), Aggregation::Mean),
        ),
        (
            "trimmed mean 0.1",
            fedavg(Clipping::Off, Aggregation::TrimmedMean { trim: 0.1 }),
        ),
        ("median", fedavg(Clipping::Off, Aggregation::Median)),
        (
            "multi-Krum (f = 1)",
            StrategyConfig {
                kind: folio_fed::StrategyKind::Krum,
                byzantine: 1,
                ..fedavg(Clipping::Off, Aggregation::Mean)
            },
        ),
    ];
    println!(
        "{} preset from {}, {} honest clients + 1 attacker, {} rounds of {} local batches (SGD {}), clip bound {bound}",
        args.preset.name(),
        init.display(),
        args.honest,
        args.rounds,
        args.batches,
        args.client_lr
    );
    let started = Instant::now();
    // The honest-only FedAvg reference, unclipped.
    let reference = setup.run(fedavg(Clipping::Off, Aggregation::Mean), Attack::None)?;
    let show = |accuracy: Option<f64>| accuracy.map_or("non-finite".into(), |a| format!("{a:.4}"));
    println!(
        "honest-only FedAvg: accuracy {:.4} -> {} after {} rounds; first-round step norm {:.3}",
        reference.accuracy.0,
        show(reference.accuracy.1),
        args.rounds,
        setup.first_step(&reference)
    );
    println!(
        "\nstrategy                 attack                         distance after round 1   accuracy after {}   refused claims",
        args.rounds
    );
    for (name, config) in strategies {
        for attack in Attack::ALL {
            let outcome = setup.run(config, attack)?;
            let distance = Setup::distance(&outcome, &reference);
            println!(
                "{name:<24} {:<30} {distance:>22.3e}   {:>16}   {:>14}",
                attack.name(),
                show(outcome.accuracy.1),
                outcome.refused
            );
        }
    }
    println!("\n({:.0} s on flex)", started.elapsed().as_secs_f64());
    Ok(())
}
