//! `folio pretrain`: central training of the char-RNN on a text corpus (Dickens by
//! default), the starting point of every federation; with `--shakespeare`, on the
//! federation's own training text pooled, the centralized baseline it is measured
//! against.

use std::path::{Path, PathBuf};

use clap::Args;
use folio_data::Corpus;
use folio_data::dickens::{default_dickens_files, load_books};
use folio_data::vocab;
use folio_model::Preset;
use folio_model::pretrain::{HeldOut, Pretraining, Progress};
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

pub fn run(args: PretrainArgs, repo_root: &Path, data_dir: &Path) -> anyhow::Result<()> {
    let out = match (&args.out, args.shakespeare) {
        (Some(out), _) => out.clone(),
        (None, false) => PathBuf::from("models/dickens-seed.safetensors"),
        (None, true) => anyhow::bail!("say where the centralized model goes with --out"),
    };
    let (train, held_out, source) = if args.shakespeare {
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
        let books: Vec<Vec<u32>> = load_books(&files)?
            .iter()
            .map(|book| vocab::encode(book).0)
            .collect();
        let (train, held_out) = HeldOut::books_end(&books, args.held_out, args.batch_size);
        (train, held_out, format!("{} files", files.len()))
    };
    let train_chars: usize = train.iter().map(Vec::len).sum();
    eprintln!(
        "pretraining `{}` ({} parameters) on {source}: {train_chars} train chars",
        args.preset,
        args.preset.config().num_params(),
    );
    let run = Pretraining {
        preset: args.preset,
        out: out.clone(),
        init: args.init,
        resume: args.resume,
        epochs: args.epochs,
        max_chars: args.max_chars,
        batch_size: args.batch_size,
        lr: args.lr,
        lr_decay: args.lr_decay,
        clip_norm: args.clip_norm,
        checkpoint_every: args.checkpoint_every,
        seed: args.seed,
    };
    let epochs = args.epochs;
    let mut bar = ProgressBar::hidden();
    let mut seconds = 0.0;
    run.run(&train, &held_out, |progress| match progress {
        Progress::Resumed { epoch, step } => eprintln!(
            "resuming at epoch {} step {step} (Adam moments restart)",
            epoch + 1
        ),
        Progress::Epoch { epoch, steps, done } => {
            bar = progress_bar(steps, epoch, epochs);
            bar.set_position(done as u64);
        }
        Progress::Step {
            loss,
            accuracy,
            chars_per_second,
            checkpoint,
        } => {
            let message = format!("loss {loss:.3}  acc {accuracy:.3}  {chars_per_second:.0} chars/s");
            bar.inc(1);
            if checkpoint && bar.is_hidden() {
                // No terminal (a log file, CI): a plain line now and then.
                eprintln!(
                    "{} step {}/{}: {message}",
                    bar.prefix(),
                    bar.position(),
                    bar.length().unwrap_or(0)
                );
            }
            bar.set_message(message);
        }
        Progress::EpochDone {
            epoch,
            held_out,
            trained_chars,
            seconds: so_far,
        } => {
            bar.finish();
            seconds = so_far;
            eprintln!(
                "epoch {}/{epochs}: held-out loss {:.4}, accuracy {:.4} ({trained_chars} chars trained, {so_far:.0}s in all)",
                epoch + 1,
                held_out.loss,
                held_out.accuracy,
            );
        }
    })?;
    eprintln!("wrote {} ({seconds:.0}s)", out.display());
    Ok(())
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
