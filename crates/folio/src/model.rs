//! `folio eval` and `folio generate`: a checkpoint on a client's data, on random
//! text, or generating text.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use burn::prelude::Device;
use clap::{Args, ValueEnum};
use folio_data::batch::batches;
use folio_data::{BatchConfig, vocab};
use folio_model::eval::{evaluate, random_batches};
use folio_model::generate::{GenerateConfig, generate};
use folio_model::{CharRnn, checkpoint};

/// The model `folio` ships: the seed preset pre-trained on Dickens.
pub const SHIPPED_MODEL: &str = "models/dickens-seed.safetensors";

#[derive(Clone, Copy, ValueEnum)]
pub enum Split {
    Train,
    Test,
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
    #[arg(long, default_value = SHIPPED_MODEL)]
    checkpoint: PathBuf,
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
    let saved = checkpoint::load(path, None).with_context(|| {
        format!(
            "no usable model at {}: pass --checkpoint, or run `folio pretrain`",
            path.display()
        )
    })?;
    Ok(CharRnn::from_flat(
        saved.config,
        &saved.weights,
        &Device::flex(),
    )?)
}

/// Held-out loss and accuracy over every client, with a progress bar.
fn eval_population(args: &EvalArgs, model: &CharRnn, data_dir: &Path) -> anyhow::Result<()> {
    let corpus = crate::data::load_corpus(data_dir)?;
    let split = args.split.unwrap_or(Split::Test);
    let clients: Vec<Vec<u32>> = corpus
        .clients
        .iter()
        .map(|c| {
            let text = match split {
                Split::Train => c.train_text(),
                Split::Test => c.test_text(),
            };
            vocab::encode(&text).0
        })
        .collect();
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "evaluating [{bar:30}] {pos}/{len} batches, {elapsed}, ETA {eta}",
        )
        .expect("valid template"),
    );
    let started = std::time::Instant::now();
    let metrics = pollster::block_on(folio_model::eval::evaluate_population(
        model,
        &clients,
        args.batch_size,
        8,
        |done, all| {
            bar.set_length(all as u64);
            bar.set_position(done as u64);
        },
    ))?;
    bar.finish_and_clear();
    println!(
        "population ({} clients, {} split, {} chars, padding excluded): loss {:.4}, accuracy {:.4} in {:.0}s",
        clients.len(),
        match split {
            Split::Train => "train",
            Split::Test => "test",
        },
        metrics.targets,
        metrics.loss,
        metrics.accuracy,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

pub fn eval(args: EvalArgs, data_dir: &Path) -> anyhow::Result<()> {
    let model = load_model(&args.checkpoint)?;
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
        let text = match args.split.unwrap_or(Split::Train) {
            Split::Train => client.train_text(),
            Split::Test => client.test_text(),
        };
        let (ids, _) = vocab::encode(&text);
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
    let model = load_model(&args.checkpoint)?;
    let config = GenerateConfig {
        length: args.length,
        temperature: args.temperature,
        top_k: args.top_k,
        seed: args.seed,
    };
    let mut out = std::io::stdout().lock();
    write!(out, "{}", args.prompt)?;
    pollster::block_on(generate(&model, &args.prompt, &config, |c| {
        // Stream each char as it is sampled.
        let _ = write!(out, "{c}").and_then(|()| out.flush());
    }))?;
    writeln!(out)?;
    Ok(())
}
