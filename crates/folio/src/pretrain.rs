//! `folio pretrain`: central training of the char-RNN on a text corpus (Dickens by
//! default), the starting point of every federation; with `--shakespeare`, on the
//! federation's own training text pooled, the centralized baseline it is measured
//! against.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use burn::prelude::Device;
use clap::Args;
use folio_data::Corpus;
use folio_data::batch::batches;
use folio_data::dickens::{default_dickens_files, load_books};
use folio_data::{Batch, BatchConfig, Remainder, vocab};
use folio_model::checkpoint::{self, Precision};
use folio_model::eval::{evaluate, evaluate_population};
use folio_model::{CharRnn, Metrics, OptimizerKind, Preset, TrainConfig, Trainer};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Args)]
pub struct PretrainArgs {
    /// Text files (Project Gutenberg headers are stripped) [default: data/dickens/*.txt]
    #[arg(long, num_args = 1..)]
    corpus: Vec<PathBuf>,
    /// Train on every Shakespeare client's training text pooled (the centralized
    /// baseline of a federation) and report held-out figures over every client's
    /// test text, instead of a corpus.
    #[arg(long, conflicts_with = "corpus")]
    shakespeare: bool,
    /// Start from this model instead of fresh weights.
    #[arg(long, conflicts_with = "resume")]
    init: Option<PathBuf>,
    #[arg(long, default_value = "seed")]
    preset: Preset,
    /// The final model (f16 safetensors) [default: models/dickens-seed.safetensors;
    /// required with --shakespeare, so that no shipped model is overwritten]
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long, default_value_t = 8)]
    epochs: usize,
    /// Stop once this many characters are trained (the budget of a federated run
    /// it is compared with), cutting the last epoch short.
    #[arg(long)]
    max_chars: Option<usize>,
    /// 64 trains the most chars/s on 2 cores (see `folio bench train`).
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Adam learning rate of the first epoch.
    #[arg(long, default_value_t = 0.002)]
    lr: f64,
    /// Learning rate factor per epoch.
    #[arg(long, default_value_t = 0.8)]
    lr_decay: f64,
    /// Clip the gradient norm to this.
    #[arg(long, default_value_t = 5.0)]
    clip_norm: f32,
    /// Share of each book (its end) held out for the loss printed every epoch.
    #[arg(long, default_value_t = 0.05)]
    held_out: f64,
    /// Write a resumable f32 checkpoint every this many steps.
    #[arg(long, default_value_t = 25)]
    checkpoint_every: usize,
    /// Continue from the resumable checkpoint beside --out.
    #[arg(long)]
    resume: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Where training stands, stored in the resumable checkpoint's metadata.
#[derive(Debug, Clone, Copy, Default)]
struct Position {
    epoch: usize,
    /// Steps done inside `epoch`.
    step: usize,
}

/// The text measured at the end of every epoch.
enum HeldOut {
    /// The end of each book.
    Books(Vec<Batch>),
    /// Every Shakespeare client's test text.
    Population(Vec<Vec<u32>>),
}

impl HeldOut {
    fn evaluate(&self, model: &CharRnn) -> anyhow::Result<Metrics> {
        Ok(match self {
            HeldOut::Books(batches) => pollster::block_on(evaluate(model, batches))?,
            HeldOut::Population(clients) => pollster::block_on(evaluate_population(
                model,
                clients,
                64,
                usize::MAX,
                |_, _| {},
            ))?,
        })
    }
}

pub fn run(args: PretrainArgs, repo_root: &Path, data_dir: &Path) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.epochs > 0 && args.max_chars != Some(0),
        "nothing to train: --epochs and --max-chars must be above zero"
    );
    let out = match (&args.out, args.shakespeare) {
        (Some(out), _) => out.clone(),
        (None, false) => PathBuf::from("models/dickens-seed.safetensors"),
        (None, true) => anyhow::bail!("say where the centralized model goes with --out"),
    };
    let (train_ids, held_out, source) = if args.shakespeare {
        let corpus = Corpus::load(&data_dir.join("shakespeare"))?;
        let train: Vec<Vec<u32>> = corpus
            .clients
            .iter()
            .map(|c| vocab::encode(&c.train_text()).0)
            .collect();
        let population = folio_host::eval::population_ids(&corpus);
        (
            train,
            HeldOut::Population(population),
            format!("{} Shakespeare clients pooled", corpus.clients.len()),
        )
    } else {
        let files = if args.corpus.is_empty() {
            default_dickens_files(repo_root)
        } else {
            args.corpus.clone()
        };
        let books = load_books(&files)?;
        let (mut train_ids, mut held_batches) = (Vec::new(), Vec::new());
        for book in &books {
            let (ids, _) = vocab::encode(book);
            let cut = ((ids.len() as f64) * (1.0 - args.held_out)) as usize;
            train_ids.push(ids[..cut].to_vec());
            held_batches.extend(batches(
                &ids[cut..],
                &batch_config(args.batch_size, 0, Remainder::Pad),
            ));
        }
        (
            train_ids,
            HeldOut::Books(held_batches),
            format!("{} files", files.len()),
        )
    };
    let train_chars: usize = train_ids.iter().map(Vec::len).sum();
    eprintln!(
        "pretraining `{}` ({} parameters) on {source}: {train_chars} train chars",
        args.preset,
        args.preset.config().num_params(),
    );

    let device = Device::flex().autodiff();
    let resume_path = out.with_extension("resume.safetensors");
    let (model, mut position) = if args.resume {
        let saved = checkpoint::load(&resume_path, Some(args.preset.config()))
            .context("cannot resume: run without --resume to start afresh")?;
        let position = Position {
            epoch: saved
                .metadata
                .get("epoch")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            step: saved
                .metadata
                .get("step")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        };
        eprintln!(
            "resuming at epoch {} step {} (Adam moments restart)",
            position.epoch + 1,
            position.step
        );
        (
            CharRnn::from_flat(args.preset.config(), &saved.weights, &device)?,
            position,
        )
    } else if let Some(init) = &args.init {
        let start = checkpoint::load(init, Some(args.preset.config()))
            .with_context(|| format!("cannot start from {}", init.display()))?;
        (
            CharRnn::from_flat(args.preset.config(), &start.weights, &device)?,
            Position::default(),
        )
    } else {
        (
            CharRnn::init(args.preset.config(), args.seed, &device),
            Position::default(),
        )
    };
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut trainer = Trainer::new(
        model,
        TrainConfig {
            optimizer: OptimizerKind::Adam,
            learning_rate: args.lr,
            clip_norm: Some(args.clip_norm),
        },
    );

    let started = Instant::now();
    let budget = args
        .max_chars
        .map(|chars| chars.div_ceil(args.batch_size * folio_data::batch::SEQ_LEN));
    // Steps of the epochs before this one (a resumed run recounts them).
    let mut steps_before: usize = (0..position.epoch)
        .map(|epoch| epoch_batches(&train_ids, args.batch_size, args.seed, epoch).len())
        .sum();
    while position.epoch < args.epochs && budget.is_none_or(|budget| steps_before < budget) {
        let epoch = position.epoch;
        trainer.set_learning_rate(args.lr * args.lr_decay.powi(epoch as i32));
        let mut epoch_batches = epoch_batches(&train_ids, args.batch_size, args.seed, epoch);
        if let Some(budget) = budget {
            epoch_batches.truncate(budget - steps_before);
        }
        steps_before += epoch_batches.len();
        let bar = progress_bar(epoch_batches.len(), epoch, args.epochs);
        bar.set_position(position.step as u64);
        let epoch_start = Instant::now();
        let mut chars = 0usize;
        for batch in &epoch_batches[position.step..] {
            let metrics = pollster::block_on(trainer.step(batch).read())?;
            anyhow::ensure!(
                metrics.loss.is_finite(),
                "training diverged (loss {}); lower --lr",
                metrics.loss
            );
            chars += metrics.targets;
            position.step += 1;
            let rate = chars as f64 / epoch_start.elapsed().as_secs_f64();
            let message = format!(
                "loss {:.3}  acc {:.3}  {rate:.0} chars/s",
                metrics.loss, metrics.accuracy
            );
            bar.inc(1);
            if position.step % args.checkpoint_every == 0 {
                save_resumable(&trainer, &args, &resume_path, position)?;
                if bar.is_hidden() {
                    // No terminal (a log file, CI): a plain line now and then.
                    eprintln!(
                        "epoch {}/{} step {}/{}: {message}",
                        epoch + 1,
                        args.epochs,
                        position.step,
                        epoch_batches.len()
                    );
                }
            }
            bar.set_message(message);
        }
        bar.finish();
        let held = held_out.evaluate(trainer.model())?;
        eprintln!(
            "epoch {}/{}: held-out loss {:.4}, accuracy {:.4} ({} chars trained, {:.0}s in all)",
            epoch + 1,
            args.epochs,
            held.loss,
            held.accuracy,
            steps_before * args.batch_size * folio_data::batch::SEQ_LEN,
            started.elapsed().as_secs_f64()
        );
        position = Position {
            epoch: epoch + 1,
            step: 0,
        };
        save_resumable(&trainer, &args, &resume_path, position)?;
        let mut metadata = run_metadata(&args, position);
        metadata.insert("held_out_loss".into(), format!("{:.4}", held.loss));
        metadata.insert("held_out_accuracy".into(), format!("{:.4}", held.accuracy));
        metadata.insert(
            "trained_chars".into(),
            (steps_before * args.batch_size * folio_data::batch::SEQ_LEN).to_string(),
        );
        let weights = pollster::block_on(trainer.model().to_flat())?;
        checkpoint::save(
            &out,
            args.preset.config(),
            &weights,
            Precision::F16,
            &metadata,
        )?;
    }
    eprintln!(
        "wrote {} ({:.0}s)",
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn batch_config(batch_size: usize, seed: u64, remainder: Remainder) -> BatchConfig {
    BatchConfig {
        batch_size,
        // A full shuffle: pretraining has the whole corpus at hand.
        shuffle_buffer: usize::MAX,
        seed,
        remainder,
        ..BatchConfig::tutorial(seed)
    }
}

/// One epoch's batches: each book cut into 101-char chunks from an offset that
/// moves every epoch (so chunks differ between epochs), all shuffled together.
fn epoch_batches(books: &[Vec<u32>], batch_size: usize, seed: u64, epoch: usize) -> Vec<Batch> {
    let offset = (epoch * 37) % 101;
    let ids: Vec<u32> = books
        .iter()
        .flat_map(|book| book.get(offset..).unwrap_or_default().iter().copied())
        .collect();
    batches(
        &ids,
        &batch_config(
            batch_size,
            seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9),
            Remainder::Drop,
        ),
    )
}

fn progress_bar(len: usize, epoch: usize, epochs: usize) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} steps, ETA {eta}  {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(format!("epoch {}/{epochs}", epoch + 1));
    bar
}

fn run_metadata(args: &PretrainArgs, position: Position) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("preset".into(), args.preset.to_string()),
        ("epoch".into(), position.epoch.to_string()),
        ("step".into(), position.step.to_string()),
        ("batch_size".into(), args.batch_size.to_string()),
        ("lr".into(), args.lr.to_string()),
        ("seed".into(), args.seed.to_string()),
    ])
}

fn save_resumable(
    trainer: &Trainer,
    args: &PretrainArgs,
    path: &Path,
    position: Position,
) -> anyhow::Result<()> {
    let weights = pollster::block_on(trainer.model().to_flat())?;
    checkpoint::save(
        path,
        args.preset.config(),
        &weights,
        Precision::F32,
        &run_metadata(args, position),
    )?;
    Ok(())
}
