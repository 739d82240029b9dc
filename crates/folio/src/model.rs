//! `folio eval`, `folio generate` and `folio export`: a checkpoint on a client's
//! data, on random text or on the whole population, generating text, and a run's
//! global model as a model file.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use burn::prelude::Device;
use clap::{Args, ValueEnum};
use folio_data::batch::batches;
use folio_data::{BatchConfig, Corpus, vocab};
use folio_host::provenance;
use folio_model::checkpoint::{self, Precision};
use folio_model::eval::{evaluate, random_batches};
use folio_model::generate::{GenerateConfig, generate};
use folio_model::{CharRnn, Metrics, Preset};

/// The model `folio` ships: the seed preset pre-trained on Dickens.
pub const SHIPPED_MODEL: &str = "models/dickens-seed.safetensors";

#[derive(Clone, Copy, ValueEnum)]
pub enum Split {
    Train,
    /// The end of each client's training speeches, held out for tuning (what
    /// `folio simulate --validation` trains without and evaluates on).
    Validation,
    Test,
}

impl Split {
    fn text(self, client: &folio_data::Client) -> String {
        match self {
            Split::Train => client.train_text(),
            Split::Validation => client.validation_text(),
            Split::Test => client.test_text(),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Validation => "validation",
            Split::Test => "test",
        }
    }
}

#[derive(Args)]
pub struct EvalArgs {
    #[arg(long, default_value = SHIPPED_MODEL)]
    checkpoint: PathBuf,
    /// Client id (e.g. THE_TRAGEDY_OF_KING_LEAR_LEAR); required unless --random
    /// or --population.
    #[arg(long, required_unless_present_any = ["random", "population"])]
    client: Option<String>,
    /// Every client's split instead (padding excluded): the population figure.
    #[arg(long, conflicts_with_all = ["client", "random"])]
    population: bool,
    /// Chunks per evaluation batch with --population.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// [default: train; test with --population]
    #[arg(long, value_enum)]
    split: Option<Split>,
    /// Evaluate on the first this many tutorial batches (8 × 100).
    #[arg(long, default_value_t = 5)]
    batches: usize,
    /// Evaluate on uniformly random text instead (chance is 1/86 ≈ 0.012).
    #[arg(long, conflicts_with = "client")]
    random: bool,
    /// Shuffle seed of the batches.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
pub struct GenerateArgs {
    /// Several: each continues the same prompt with the same random draws, one
    /// after another (e.g. the Dickens start and the federated result).
    #[arg(long, num_args = 1.., default_value = SHIPPED_MODEL)]
    checkpoint: Vec<PathBuf>,
    #[arg(long, default_value = "What of folio, you ask? ")]
    prompt: String,
    #[arg(long, default_value_t = 200)]
    length: usize,
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// Sample among the k likeliest chars only.
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn load_model(path: &Path) -> anyhow::Result<CharRnn> {
    Ok(load_model_and_metadata(path)?.0)
}

fn load_model_and_metadata(path: &Path) -> anyhow::Result<(CharRnn, BTreeMap<String, String>)> {
    let saved = checkpoint::load(path, None).with_context(|| {
        format!(
            "no usable model at {}: pass --checkpoint, or run `folio pretrain`",
            path.display()
        )
    })?;
    let model = CharRnn::from_flat(saved.config, &saved.weights, &Device::flex())?;
    Ok((model, saved.metadata))
}

/// Loss and accuracy over every client's `split`, with a progress bar.
fn population_metrics(
    model: &CharRnn,
    corpus: &Corpus,
    split: Split,
    batch_size: usize,
) -> anyhow::Result<Metrics> {
    let clients: Vec<Vec<u32>> = corpus
        .clients
        .iter()
        .map(|c| vocab::encode(&split.text(c)).0)
        .collect();
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "evaluating [{bar:30}] {pos}/{len} batches, {elapsed}, ETA {eta}",
        )
        .expect("valid template"),
    );
    let metrics = pollster::block_on(folio_model::eval::evaluate_population(
        model,
        &clients,
        batch_size,
        8,
        |done, all| {
            bar.set_length(all as u64);
            bar.set_position(done as u64);
        },
    ))?;
    bar.finish_and_clear();
    Ok(metrics)
}

/// Held-out loss and accuracy over every client.
fn eval_population(args: &EvalArgs, model: &CharRnn, data_dir: &Path) -> anyhow::Result<()> {
    let corpus = crate::data::load_corpus(data_dir)?;
    let split = args.split.unwrap_or(Split::Test);
    let started = std::time::Instant::now();
    let metrics = population_metrics(model, &corpus, split, args.batch_size)?;
    println!(
        "population ({} clients, {} split, {} chars, padding excluded): loss {:.4}, accuracy {:.4} in {:.0}s",
        corpus.clients.len(),
        split.name(),
        metrics.targets,
        metrics.loss,
        metrics.accuracy,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

pub fn eval(args: EvalArgs, data_dir: &Path) -> anyhow::Result<()> {
    let (model, metadata) = load_model_and_metadata(&args.checkpoint)?;
    if let Some(line) = provenance::privacy_line(&metadata) {
        println!("{line}");
    }
    if args.population {
        return eval_population(&args, &model, data_dir);
    }
    let (what, eval_batches) = if args.random {
        (
            "random text".to_owned(),
            random_batches(args.batches, 8, 100, 86, args.seed),
        )
    } else {
        let corpus = crate::data::load_corpus(data_dir)?;
        let client = corpus.client(args.client.as_deref().unwrap_or_default())?;
        let (ids, _) = vocab::encode(&args.split.unwrap_or(Split::Train).text(client));
        let mut all = batches(&ids, &BatchConfig::tutorial(args.seed));
        anyhow::ensure!(
            !all.is_empty(),
            "{} has less than one full batch (808 chars) in that split",
            client.id
        );
        all.truncate(args.batches);
        (client.id.clone(), all)
    };
    let metrics = pollster::block_on(evaluate(&model, &eval_batches))?;
    println!(
        "{what}: {} batches, {} chars: loss {:.4}, accuracy {:.4}",
        eval_batches.len(),
        metrics.targets,
        metrics.loss,
        metrics.accuracy
    );
    Ok(())
}

pub fn generate_text(args: GenerateArgs) -> anyhow::Result<()> {
    let config = GenerateConfig {
        length: args.length,
        temperature: args.temperature,
        top_k: args.top_k,
        seed: args.seed,
    };
    let mut out = std::io::stdout().lock();
    for path in &args.checkpoint {
        let model = load_model(path)?;
        if args.checkpoint.len() > 1 {
            writeln!(out, "── {} ──", path.display())?;
        }
        write!(out, "{}", args.prompt)?;
        pollster::block_on(generate(&model, &args.prompt, &config, |c| {
            // Stream each char as it is sampled.
            let _ = write!(out, "{c}").and_then(|()| out.flush());
        }))?;
        writeln!(out)?;
    }
    Ok(())
}

#[derive(Args)]
pub struct ExportArgs {
    /// A run folder of `folio simulate --population` or `folio serve`.
    run: PathBuf,
    /// The model file to write (f16 safetensors).
    #[arg(long)]
    out: PathBuf,
}

/// The run's global model as an f16 model file whose metadata says where it comes
/// from and how it scores on the whole population (evaluated now when the run's
/// last round has no population figures).
pub fn export(args: ExportArgs, data_dir: &Path) -> anyhow::Result<()> {
    let weights_len = folio_host::state::weight_count(&args.run)?;
    let preset = Preset::ALL
        .into_iter()
        .find(|p| p.config().num_params() == weights_len)
        .with_context(|| format!("{weights_len} weights fit no preset"))?;
    let saved =
        folio_host::state::load(&args.run, weights_len)?.context("the run has no state yet")?;
    let last = saved.history.last().context("the run has no rounds yet")?;
    let model = CharRnn::from_flat(preset.config(), &saved.weights, &Device::flex())?;
    // A validation run's population figures are not test figures.
    let validation = args
        .run
        .join(folio_sim::population::VALIDATION_MARKER)
        .exists();
    let population = match (last.population_loss, last.population_accuracy) {
        (Some(loss), Some(accuracy)) if !validation => (loss, accuracy),
        _ => {
            let corpus = crate::data::load_corpus(data_dir)?;
            let metrics = population_metrics(&model, &corpus, Split::Test, 64)?;
            (metrics.loss, metrics.accuracy)
        }
    };
    let privacy = match saved.strategy.values.get("privacy") {
        Some(value) => {
            let spent: folio_fed::PrivacySpent = serde_json::from_value(value.clone())
                .context("the run's privacy ledger is unreadable")?;
            provenance::privacy_metadata(&spent)
        }
        None => BTreeMap::new(),
    };
    let mut metadata = BTreeMap::from([
        ("preset".to_owned(), preset.to_string()),
        ("round".to_owned(), last.round.to_string()),
        (
            "source".to_owned(),
            format!("federated run {}", args.run.display()),
        ),
        (
            "population_test_loss".to_owned(),
            format!("{:.4}", population.0),
        ),
        (
            "population_test_accuracy".to_owned(),
            format!("{:.4}", population.1),
        ),
    ]);
    if let Some(line) = provenance::privacy_line(&privacy) {
        println!("{line}");
    }
    metadata.extend(privacy);
    if validation
        && let (Some(loss), Some(accuracy)) = (last.population_loss, last.population_accuracy)
    {
        metadata.insert(
            "population_validation_loss".to_owned(),
            format!("{loss:.4}"),
        );
        metadata.insert(
            "population_validation_accuracy".to_owned(),
            format!("{accuracy:.4}"),
        );
    }
    metadata.extend(provenance::budget_metadata(&saved.history));
    checkpoint::save(
        &args.out,
        preset.config(),
        &saved.weights,
        Precision::F16,
        &metadata,
    )?;
    println!(
        "wrote {} ({preset}, round {}): population test accuracy {:.4}, loss {:.4}",
        args.out.display(),
        last.round,
        population.1,
        population.0
    );
    Ok(())
}
