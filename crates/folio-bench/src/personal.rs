//! Shakespeare characters as devices that keep their text:
//!
//! - `folio bench personalization`: each device fine-tunes the global model on
//!   its own training text and measures both models on the text it holds out,
//!   as Wang et al. 2019 ("Federated Evaluation of On-device Personalization")
//!   do: the fraction of devices whose accuracy improves, and the mean gain, per
//!   setting (`--split validation` to choose one, `--split test` to report it).
//! - `folio bench device-eval`: federated evaluation against the server's own
//!   population figure: every device's sums on its held-out text, the figure a
//!   sample of k devices gives over many draws (its spread is the sampling
//!   error), and where the population figure falls in it.

use std::path::{Path, PathBuf};

use burn::prelude::Device;
use folio_client::evaluate::held_out_figures;
use folio_client::personalize::{Personalization, fine_tune};
use folio_data::{Corpus, vocab};
use folio_fed::sampling::sample_clients;
use folio_host::eval::parallel_map;
use folio_model::ModelConfig;
use folio_secagg::HeldOut;

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Split {
    /// Train on each character's training speeches but their last eighth, and
    /// measure on that eighth (for choosing settings).
    Validation,
    /// Train on the training speeches, measure on the test speeches (to report).
    Test,
}

#[derive(clap::Args)]
pub struct PersonalizationArgs {
    /// The global model.
    #[arg(long, default_value = "models/shakespeare-medium.safetensors")]
    model: PathBuf,
    #[arg(long, value_enum, default_value = "validation")]
    split: Split,
    /// Devices drawn (seeded) among those with at least 2 batches of training
    /// text and 500 held-out characters.
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Passes over the device's text, one setting each.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    epochs: Vec<u32>,
    /// SGD learning rates, one setting each.
    #[arg(long, value_delimiter = ',', default_value = "0.05,0.2")]
    lr: Vec<f32>,
    /// Batches of 8 × 100 per pass at most.
    #[arg(long, default_value_t = 20)]
    max_batches: u32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(clap::Args)]
pub struct DeviceEvalArgs {
    /// The model measured.
    #[arg(long, default_value = "models/shakespeare-medium.safetensors")]
    model: PathBuf,
    /// Devices a federated evaluation asks.
    #[arg(long, default_value_t = 16)]
    sample: usize,
    /// Draws of that sample.
    #[arg(long, default_value_t = 2_000)]
    draws: u64,
}

/// A device: its training ids and its held-out ids.
struct Held {
    train: Vec<u32>,
    held_out: Vec<u32>,
}

fn devices(data_dir: &Path, split: Split) -> anyhow::Result<Vec<Held>> {
    let corpus = Corpus::load(&data_dir.join("shakespeare"))?;
    let corpus = match split {
        Split::Validation => corpus.validation_view(),
        Split::Test => corpus,
    };
    Ok(corpus
        .clients
        .iter()
        .map(|c| Held {
            train: vocab::encode(&c.train_text()).0,
            held_out: vocab::encode(&c.test_text()).0,
        })
        .collect())
}

/// The model at `path`: its shape and weights.
fn model(path: &Path) -> anyhow::Result<(ModelConfig, Vec<f32>)> {
    let saved = folio_model::checkpoint::load(path, None)?;
    Ok((saved.config, saved.weights))
}

/// What a device measures of `weights` on all of `held_out`.
fn measured(config: ModelConfig, weights: &[f32], held_out: &[u32]) -> anyhow::Result<HeldOut> {
    Ok(pollster::block_on(held_out_figures(
        &Device::flex(),
        config,
        weights,
        held_out,
        u64::MAX,
    ))?)
}

fn accuracy(e: &HeldOut) -> f64 {
    e.correct / e.chars.max(1.0)
}

pub fn personalization(args: PersonalizationArgs, data_dir: &Path) -> anyhow::Result<()> {
    let (config, global) = model(&args.model)?;
    let all = devices(data_dir, args.split)?;
    let eligible: Vec<&Held> = all
        .iter()
        .filter(|d| d.train.len() >= 2 * 8 * 101 && d.held_out.len() >= 500)
        .collect();
    let drawn = sample_clients(&eligible, args.devices, args.seed, 0);
    eprintln!(
        "{} of {} devices drawn from the {} eligible; measuring the global model on each",
        drawn.len(),
        all.len(),
        eligible.len()
    );
    let before = parallel_map(&drawn, |d| measured(config, &global, &d.held_out))
        .into_iter()
        .collect::<anyhow::Result<Vec<_>>>()?;
    let split = match args.split {
        Split::Validation => "validation",
        Split::Test => "test",
    };
    println!(
        "personalization of {} on {} devices ({split} split): fine-tuned on each device's own training text, measured on what it holds out",
        args.model.display(),
        drawn.len()
    );
    println!(
        "{:>6} {:>6} {:>10} {:>12} {:>12} {:>12} {:>12}",
        "epochs", "lr", "improved", "mean gain", "median gain", "acc before", "acc after"
    );
    for &epochs in &args.epochs {
        for &lr in &args.lr {
            let settings = Personalization {
                epochs,
                max_batches: Some(args.max_batches),
                learning_rate: lr,
                seed: args.seed,
            };
            let after = parallel_map(&drawn, |d| {
                let tuned = pollster::block_on(fine_tune(
                    &Device::flex(),
                    config,
                    &global,
                    &d.train,
                    settings,
                ))?;
                measured(config, &tuned, &d.held_out)
            })
            .into_iter()
            .collect::<anyhow::Result<Vec<_>>>()?;
            let mut gains: Vec<f64> = before
                .iter()
                .zip(&after)
                .map(|(b, a)| accuracy(a) - accuracy(b))
                .collect();
            let improved = gains.iter().filter(|&&g| g > 0.0).count() as f64 / gains.len() as f64;
            let mean = gains.iter().sum::<f64>() / gains.len() as f64;
            gains.sort_by(f64::total_cmp);
            let mean_of = |e: &[HeldOut]| e.iter().map(accuracy).sum::<f64>() / e.len() as f64;
            println!(
                "{epochs:>6} {lr:>6} {:>9.1}% {:>+12.4} {:>+12.4} {:>12.4} {:>12.4}",
                improved * 100.0,
                mean,
                gains[gains.len() / 2],
                mean_of(&before),
                mean_of(&after)
            );
        }
    }
    Ok(())
}

pub fn device_eval(args: DeviceEvalArgs, data_dir: &Path) -> anyhow::Result<()> {
    let (config, weights) = model(&args.model)?;
    let all = devices(data_dir, Split::Test)?;
    let answers = parallel_map(&all, |d| measured(config, &weights, &d.held_out))
        .into_iter()
        .collect::<anyhow::Result<Vec<_>>>()?;
    let answers: Vec<&HeldOut> = answers.iter().filter(|a| a.chars > 0.0).collect();
    let pooled = |sample: &[&HeldOut]| {
        let chars: f64 = sample.iter().map(|a| a.chars).sum();
        let correct: f64 = sample.iter().map(|a| a.correct).sum();
        correct / chars.max(1.0)
    };
    let population = pooled(&answers);
    let mut estimates: Vec<f64> = (0..args.draws)
        .map(|draw| pooled(&sample_clients(&answers, args.sample, 7, draw)))
        .collect();
    estimates.sort_by(f64::total_cmp);
    let mean = estimates.iter().sum::<f64>() / estimates.len() as f64;
    let spread = (estimates.iter().map(|e| (e - mean).powi(2)).sum::<f64>()
        / (estimates.len() - 1) as f64)
        .sqrt();
    let at = |p: f64| estimates[((estimates.len() - 1) as f64 * p).round() as usize];
    println!(
        "{} on the test text of {} devices: population accuracy {population:.4} (every device's held-out characters)",
        args.model.display(),
        answers.len()
    );
    println!(
        "federated evaluation by {} devices, {} draws: mean {mean:.4}, standard deviation {spread:.4}, 95% of draws in [{:.4}, {:.4}]",
        args.sample,
        args.draws,
        at(0.025),
        at(0.975)
    );
    println!(
        "the population figure is {:+.2} standard deviations from the draws' mean",
        (population - mean) / spread.max(f64::MIN_POSITIVE)
    );
    Ok(())
}
