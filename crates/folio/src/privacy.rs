//! `folio privacy epsilon`: the (ε, δ) that rounds of DP-FedAvg cost, from the
//! accountant of `folio_fed::accountant` (the server's Gaussian noise, or the
//! devices' Skellam noise under distributed DP).

use clap::Subcommand;
use folio_fed::accountant::{SampledGaussian, SampledSkellam, default_orders};
use folio_fed::strategy::ROUNDING_BETA;

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
        /// Distributed DP: integer steps in one clip bound (the devices' scale);
        /// the rounds are then the Skellam mechanism on D-value updates.
        #[arg(long, requires = "dims")]
        skellam_scale: Option<f64>,
        /// Distributed DP: values an update has.
        #[arg(long, requires = "skellam_scale")]
        dims: Option<usize>,
    },
}

pub fn run(command: PrivacyCommand) -> anyhow::Result<()> {
    match command {
        PrivacyCommand::Epsilon {
            sampling_rate,
            noise_multiplier,
            rounds,
            delta,
            skellam_scale,
            dims,
        } => {
            let orders = default_orders();
            let (spent, mechanism) = match (skellam_scale, dims) {
                (Some(scaled_bound), Some(dims)) => (
                    SampledSkellam {
                        sampling_rate,
                        noise_multiplier,
                        scaled_bound,
                        dims,
                        rounding_beta: ROUNDING_BETA,
                        rounds,
                    }
                    .epsilon(delta, &orders),
                    "Skellam",
                ),
                _ => (
                    SampledGaussian {
                        sampling_rate,
                        noise_multiplier,
                        rounds,
                    }
                    .epsilon(delta, &orders),
                    "Gaussian",
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
