//! `folio bench influence` and `folio bench sybils`: what one attacker, or a
//! crowd of sybils, does to the global model under each strategy, every update
//! going through the round engine of `folio serve` ([`folio_sim::influence`]).

use std::path::{Path, PathBuf};
use std::time::Instant;

use folio_fed::{Aggregation, Clipping, FirstBound, StrategyConfig, StrategyKind};
use folio_model::Preset;
use folio_sim::influence::{Attack, Influence, Outcome, Run, Setup};

/// The experiment's clients and local training.
#[derive(clap::Args)]
pub struct ExperimentArgs {
    #[arg(long, default_value = "small")]
    preset: Preset,
    /// The starting model [default: the shipped Dickens model of the preset]
    #[arg(long)]
    init: Option<PathBuf>,
    /// Local batches per round.
    #[arg(long, default_value_t = 5)]
    batches: u32,
    #[arg(long, default_value_t = 0.5)]
    client_lr: f32,
    /// The fixed clipping bound, and the most the adaptive one may start at.
    #[arg(long, default_value_t = 1.0)]
    clip_bound: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl ExperimentArgs {
    fn setup(&self, clients: usize, eval_clients: usize, data_dir: &Path) -> anyhow::Result<Setup> {
        let init = self.init.clone().unwrap_or_else(|| {
            PathBuf::from(format!("models/dickens-{}.safetensors", self.preset.name()))
        });
        Setup::new(Influence {
            preset: self.preset,
            init,
            clients,
            eval_clients,
            batches: self.batches,
            client_lr: self.client_lr,
            seed: self.seed,
            data_dir: data_dir.to_owned(),
        })
    }

    fn describe(&self, setup: &Setup) -> String {
        format!(
            "{} preset from {}, {} local batches of 8 x 100 a round (SGD {}), clip bound {}",
            self.preset.name(),
            setup.params().init.display(),
            self.batches,
            self.client_lr,
            self.clip_bound
        )
    }
}

fn fedavg(clipping: Clipping, aggregation: Aggregation) -> StrategyConfig {
    StrategyConfig {
        clipping,
        aggregation,
        ..StrategyConfig::fedavg(1)
    }
}

fn show(value: f64) -> String {
    if value.is_finite() {
        format!("{value:.4}")
    } else {
        "non-finite".into()
    }
}

#[derive(clap::Args)]
pub struct InfluenceArgs {
    #[command(flatten)]
    experiment: ExperimentArgs,
    /// Honest clients (one attacker joins them).
    #[arg(long, default_value_t = 9)]
    honest: usize,
    #[arg(long, default_value_t = 5)]
    rounds: u64,
}

pub fn run(args: InfluenceArgs, data_dir: &Path) -> anyhow::Result<()> {
    let experiment = &args.experiment;
    let setup = experiment.setup(args.honest + 1, args.honest, data_dir)?;
    let bound = experiment.clip_bound;
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
                kind: StrategyKind::Krum,
                byzantine: 1,
                ..fedavg(Clipping::Off, Aggregation::Mean)
            },
        ),
    ];
    println!(
        "{}; {} honest clients + 1 attacker, {} rounds",
        experiment.describe(&setup),
        args.honest,
        args.rounds
    );
    let started = Instant::now();
    let run = |strategy, attack| {
        setup.run(Run {
            strategy,
            attack,
            honest: args.honest,
            attackers: 1,
            rounds: args.rounds,
        })
    };
    // The honest-only FedAvg reference, unclipped.
    let reference = run(fedavg(Clipping::Off, Aggregation::Mean), Attack::None)?;
    let accuracy = |outcome: &Outcome| show(outcome.history.last().expect("rounds").eval_accuracy);
    let first_step = reference.distance_from_start(1);
    println!(
        "honest-only FedAvg: accuracy {} -> {} after {} rounds; first-round step norm {first_step:.3}",
        show(reference.history[0].eval_accuracy),
        accuracy(&reference),
        args.rounds,
    );
    println!(
        "\nstrategy                 attack                         distance after round 1   accuracy after {}   refused claims",
        args.rounds
    );
    for (name, config) in strategies {
        for attack in [Attack::None, Attack::Boosted, Attack::Stealthy] {
            let outcome = run(config, attack)?;
            println!(
                "{name:<24} {:<30} {:>22.3e}   {:>16}   {:>14}",
                attack.name(),
                outcome.distance(&reference, 1),
                accuracy(&outcome),
                outcome.refused
            );
        }
    }
    println!("\n({:.0} s on flex)", started.elapsed().as_secs_f64());
    Ok(())
}

#[derive(clap::Args)]
pub struct SybilArgs {
    #[command(flatten)]
    experiment: ExperimentArgs,
    /// Sessions in every round, honest and sybil together.
    #[arg(long, default_value_t = 55)]
    sessions: usize,
    /// Sybil counts to run.
    #[arg(long, value_delimiter = ',', default_value = "0,5,20,50")]
    sybils: Vec<usize>,
    /// Sybils' delta length, in multiples of the bound.
    #[arg(long, value_delimiter = ',', default_value = "1,100")]
    scales: Vec<f32>,
    /// Rounds reported; the run lasts until the last.
    #[arg(long, value_delimiter = ',', default_value = "5,30")]
    report: Vec<u64>,
    /// Clients whose held-out text is the evaluation set.
    #[arg(long, default_value_t = 20)]
    eval_clients: usize,
}

pub fn sybils(args: SybilArgs, data_dir: &Path) -> anyhow::Result<()> {
    let experiment = &args.experiment;
    anyhow::ensure!(
        !args.report.is_empty() && args.sybils.iter().all(|&k| k <= args.sessions),
        "--report needs a round, and --sybils at most --sessions ({})",
        args.sessions
    );
    let rounds = *args.report.iter().max().expect("checked");
    let setup = experiment.setup(args.sessions, args.eval_clients, data_dir)?;
    let bound = experiment.clip_bound;
    let strategies = [
        (
            "mean, adaptive from 1 (before)",
            fedavg(
                Clipping::Adaptive {
                    first: FirstBound::Given(bound),
                    quantile: 0.5,
                    lr: 0.2,
                    ceiling: f32::INFINITY,
                },
                Aggregation::Mean,
            ),
        ),
        (
            "mean, adaptive (default)",
            fedavg(Clipping::adaptive(bound), Aggregation::Mean),
        ),
        (
            "trimmed mean 0.1, adaptive",
            fedavg(
                Clipping::adaptive(bound),
                Aggregation::TrimmedMean { trim: 0.1 },
            ),
        ),
        (
            "median, adaptive",
            fedavg(Clipping::adaptive(bound), Aggregation::Median),
        ),
    ];
    println!(
        "{}; {} sessions a round, k of them sybils sending one fixed direction at s x the bound",
        experiment.describe(&setup),
        args.sessions
    );
    println!(
        "movement: how far the model moved along the sybils' direction since round 0; loss: eval loss on {} clients' held-out text",
        args.eval_clients
    );
    let started = Instant::now();
    let mut header = format!("\n{:<32} {:>3} {:>5}", "strategy", "k", "s");
    for round in &args.report {
        header += &format!(
            " {:>12} {:>8} {:>9}",
            format!("move@{round}"),
            format!("loss@{round}"),
            format!("bound@{round}")
        );
    }
    println!("{header}");
    for (name, strategy) in strategies {
        for &k in &args.sybils {
            let attacks: Vec<(Attack, String)> = if k == 0 {
                vec![(Attack::None, "-".into())]
            } else {
                args.scales
                    .iter()
                    .map(|&scale| (Attack::Crowd { scale }, scale.to_string()))
                    .collect()
            };
            for (attack, scale) in attacks {
                let outcome = setup.run(Run {
                    strategy,
                    attack,
                    honest: args.sessions - k,
                    attackers: k,
                    rounds,
                })?;
                let mut row = format!("{name:<32} {k:>3} {scale:>5}");
                for &round in &args.report {
                    let record = &outcome.history[round as usize];
                    row += &format!(
                        " {:>12.4} {:>8} {:>9}",
                        outcome.movement_along(setup.direction(), round),
                        show(record.eval_loss),
                        record.clip_bound.map_or("-".into(), |b| format!("{b:.4}"))
                    );
                }
                println!("{row}");
                if k == 0 {
                    let steps: Vec<String> = (args.report.iter())
                        .map(|&round| {
                            format!("{:.4} by round {round}", outcome.distance_from_start(round))
                        })
                        .collect();
                    println!(
                        "    (the honest clients alone moved the model {})",
                        steps.join(", ")
                    );
                }
            }
        }
    }
    println!("\n({:.0} s on flex)", started.elapsed().as_secs_f64());
    Ok(())
}
