//! `folio privacy epsilon`: the (ε, δ) that rounds of DP-FedAvg cost, from the
//! accountant of `folio_fed::accountant` (the server's Gaussian noise, or the
//! devices' Skellam noise under distributed DP).

use clap::Subcommand;
use folio_fed::DeviceNoisePlan;
use folio_fed::accountant::{SampledGaussian, SampledSkellam, default_orders};
use folio_fed::strategy::{ROUNDING_BETA, default_min_inputs};

#[derive(Subcommand)]
pub enum PrivacyCommand {
    /// ε after N rounds of the sampled Gaussian mechanism: each client takes part
    /// in a round with probability Q (Poisson sampling), the round's sum of clipped
    /// updates gets Gaussian noise of Z times the clip bound.
    Epsilon {
        /// Q: a client's chance of taking part in a round (clients per round over
        /// the population).
        #[arg(long)]
        sampling_rate: f64,
        /// Z: the noise's standard deviation over the clip bound.
        #[arg(long)]
        noise_multiplier: f64,
        #[arg(long)]
        rounds: u64,
        #[arg(long, default_value_t = 1e-5)]
        delta: f64,
        /// Distributed DP: the devices add Skellam noise to D-value updates
        /// inside the secure sum, as `folio serve --distributed-dp` plans it for
        /// a population of N (needs --population).
        #[arg(long)]
        distributed_dims: Option<usize>,
        /// Distributed DP as the accountant sees it: C integer steps in one
        /// clip bound (instead of the plan for --population).
        #[arg(long, requires = "distributed_dims", conflicts_with = "population")]
        skellam_scale: Option<f64>,
        /// Distributed DP: N, the clients a round may hold at most.
        #[arg(long, requires = "distributed_dims")]
        population: Option<usize>,
        /// Distributed DP: M, the fewest inputs a sum is unmasked with
        /// [default: 80 % of q·N, at least 3].
        #[arg(long, requires = "distributed_dims")]
        ddp_min_inputs: Option<usize>,
    },
}

pub fn run(command: PrivacyCommand) -> anyhow::Result<()> {
    match command {
        PrivacyCommand::Epsilon {
            sampling_rate,
            noise_multiplier,
            rounds,
            delta,
            distributed_dims,
            skellam_scale,
            population,
            ddp_min_inputs,
        } => {
            let orders = default_orders();
            let (spent, mechanism) = match (distributed_dims, population, skellam_scale) {
                (Some(dims), _, Some(scaled_bound)) => {
                    let accountant = SampledSkellam {
                        sampling_rate,
                        noise_multiplier,
                        scaled_bound,
                        dims,
                        rounding_beta: ROUNDING_BETA,
                        rounds,
                    };
                    (
                        accountant.epsilon(delta, &orders),
                        format!("Skellam, {scaled_bound} steps a clip bound"),
                    )
                }
                (Some(dims), Some(population), None) => {
                    let expected = sampling_rate * population as f64;
                    let min_inputs = ddp_min_inputs.unwrap_or(default_min_inputs(expected));
                    let plan = DeviceNoisePlan::new(noise_multiplier, min_inputs, population, dims)
                        .map_err(anyhow::Error::msg)?;
                    let accountant = SampledSkellam {
                        rounds,
                        ..plan.accountant(sampling_rate, noise_multiplier, dims)
                    };
                    (
                        accountant.epsilon(delta, &orders),
                        format!(
                            "Skellam from the devices: {} steps a clip bound, variance {:.4e} steps² from each, any {} of them carrying z",
                            plan.scaled_bound,
                            plan.variance,
                            min_inputs - 1
                        ),
                    )
                }
                (Some(_), None, None) => anyhow::bail!(
                    "--distributed-dims needs --population N (the plan folio serve makes) or --skellam-scale C"
                ),
                _ => (
                    SampledGaussian {
                        sampling_rate,
                        noise_multiplier,
                        rounds,
                    }
                    .epsilon(delta, &orders),
                    "Gaussian from the server".to_owned(),
                ),
            };
            let spent = spent.map_err(anyhow::Error::msg)?;
            println!(
                "ε = {} for δ = {delta} (Rényi order {}) after {rounds} rounds, q = {sampling_rate}, z = {noise_multiplier} ({mechanism})",
                spent.epsilon, spent.order
            );
            Ok(())
        }
    }
}
