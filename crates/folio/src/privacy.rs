//! `folio privacy epsilon`: the (ε, δ) that rounds of DP-FedAvg cost, from the
//! accountant of `folio_fed::accountant`.

use clap::Subcommand;
use folio_fed::accountant::{SampledGaussian, default_orders};

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
    },
}

pub fn run(command: PrivacyCommand) -> anyhow::Result<()> {
    match command {
        PrivacyCommand::Epsilon {
            sampling_rate,
            noise_multiplier,
            rounds,
            delta,
        } => {
            let mechanism = SampledGaussian {
                sampling_rate,
                noise_multiplier,
                rounds,
            };
            let spent = mechanism
                .epsilon(delta, &default_orders())
                .map_err(anyhow::Error::msg)?;
            println!(
                "ε = {} for δ = {delta} (Rényi order {}) after {rounds} rounds, q = {sampling_rate}, z = {noise_multiplier}",
                spent.epsilon, spent.order
            );
            Ok(())
        }
    }
}
