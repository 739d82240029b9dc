//! Central (pre-)training on pooled text: Adam with a per-epoch decay, every
//! epoch's chunks cut from a new offset and shuffled together, a held-out
//! figure after each epoch, and a resumable f32 checkpoint every few steps
//! beside the final f16 model. Native only: it blocks on every step.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use burn::prelude::Device;
use folio_data::batch::{SEQ_LEN, batches};
use folio_data::{Batch, BatchConfig, Remainder};

use crate::checkpoint::{self, Precision};
use crate::eval::{evaluate, evaluate_population};
use crate::{CharRnn, Metrics, OptimizerKind, Preset, TrainConfig, Trainer};

/// A pretraining run.
#[derive(Debug, Clone)]
pub struct Pretraining {
    pub preset: Preset,
    /// The final model (f16); the resumable checkpoint goes beside it.
    pub out: PathBuf,
    /// Start from this model instead of fresh (seeded) weights.
    pub init: Option<PathBuf>,
    /// Continue from the resumable checkpoint beside `out`.
    pub resume: bool,
    pub epochs: usize,
    /// Stop once this many characters are trained, cutting the last epoch short.
    pub max_chars: Option<usize>,
    pub batch_size: usize,
    /// Adam's learning rate in the first epoch, and its factor per epoch.
    pub lr: f64,
    pub lr_decay: f64,
    pub clip_norm: f32,
    /// Steps between resumable checkpoints.
    pub checkpoint_every: usize,
    pub seed: u64,
}

/// The text measured after every epoch.
pub enum HeldOut {
    /// Batches of held-out text (the end of each book).
    Batches(Vec<Batch>),
    /// Every client's test text, each on its own (a population figure).
    Population(Vec<Vec<u32>>),
}

impl HeldOut {
    /// Splits each book: its end (`fraction`) held out, the rest to train on.
    pub fn books_end(
        books: &[Vec<u32>],
        fraction: f64,
        batch_size: usize,
    ) -> (Vec<Vec<u32>>, Self) {
        let (mut train, mut held) = (Vec::new(), Vec::new());
        for ids in books {
            let cut = ((ids.len() as f64) * (1.0 - fraction)) as usize;
            train.push(ids[..cut].to_vec());
            held.extend(batches(
                &ids[cut..],
                &batch_config(batch_size, 0, Remainder::Pad),
            ));
        }
        (train, HeldOut::Batches(held))
    }

    fn evaluate(&self, model: &CharRnn) -> anyhow::Result<Metrics> {
        Ok(match self {
            HeldOut::Batches(batches) => pollster::block_on(evaluate(model, batches))?,
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

/// What a run reports as it goes.
pub enum Progress {
    /// Continuing a saved run at `epoch` (from 0), after `step` of its steps.
    Resumed { epoch: usize, step: usize },
    /// Epoch `epoch` (from 0) begins: `steps` in all, `done` of them already.
    Epoch {
        epoch: usize,
        steps: usize,
        done: usize,
    },
    /// A step's figures; `checkpoint`: the resumable checkpoint was just saved.
    Step {
        loss: f64,
        accuracy: f64,
        chars_per_second: f64,
        checkpoint: bool,
    },
    /// An epoch ended and its model was written: the held-out figures, the
    /// characters trained so far, seconds since the start.
    EpochDone {
        epoch: usize,
        held_out: Metrics,
        trained_chars: usize,
        seconds: f64,
    },
}

/// Where training stands, stored in the resumable checkpoint's metadata.
#[derive(Debug, Clone, Copy, Default)]
struct Position {
    epoch: usize,
    /// Steps done inside `epoch`.
    step: usize,
}

impl Pretraining {
    /// Trains on `train` (each a text's ids), measuring `held_out` after every
    /// epoch and writing the model to `out` after each.
    pub fn run(
        &self,
        train: &[Vec<u32>],
        held_out: &HeldOut,
        mut progress: impl FnMut(Progress),
    ) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.epochs > 0 && self.max_chars != Some(0),
            "nothing to train: --epochs and --max-chars must be above zero"
        );
        let device = Device::flex().autodiff();
        let resume_path = self.out.with_extension("resume.safetensors");
        let (model, mut position) = self.start(&resume_path, &device)?;
        if self.resume {
            progress(Progress::Resumed {
                epoch: position.epoch,
                step: position.step,
            });
        }
        if let Some(dir) = self.out.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let mut trainer = Trainer::new(
            model,
            TrainConfig {
                optimizer: OptimizerKind::Adam,
                learning_rate: self.lr,
                clip_norm: Some(self.clip_norm),
            },
        );
        let started = Instant::now();
        let budget = self
            .max_chars
            .map(|chars| chars.div_ceil(self.batch_size * SEQ_LEN));
        // Steps of the epochs before this one (a resumed run recounts them).
        let mut steps_before: usize = (0..position.epoch)
            .map(|epoch| epoch_batches(train, self.batch_size, self.seed, epoch).len())
            .sum();
        while position.epoch < self.epochs && budget.is_none_or(|budget| steps_before < budget) {
            let epoch = position.epoch;
            trainer.set_learning_rate(self.lr * self.lr_decay.powi(epoch as i32));
            let mut batches = epoch_batches(train, self.batch_size, self.seed, epoch);
            if let Some(budget) = budget {
                batches.truncate(budget - steps_before);
            }
            steps_before += batches.len();
            progress(Progress::Epoch {
                epoch,
                steps: batches.len(),
                done: position.step,
            });
            let epoch_start = Instant::now();
            let mut chars = 0usize;
            for batch in &batches[position.step..] {
                let metrics = pollster::block_on(trainer.step(batch).read())?;
                anyhow::ensure!(
                    metrics.loss.is_finite(),
                    "training diverged (loss {}); lower --lr",
                    metrics.loss
                );
                chars += metrics.targets;
                position.step += 1;
                let checkpoint = position.step % self.checkpoint_every.max(1) == 0;
                if checkpoint {
                    self.save_resumable(&trainer, &resume_path, position)?;
                }
                progress(Progress::Step {
                    loss: metrics.loss,
                    accuracy: metrics.accuracy,
                    chars_per_second: chars as f64 / epoch_start.elapsed().as_secs_f64(),
                    checkpoint,
                });
            }
            let held = held_out.evaluate(trainer.model())?;
            position = Position {
                epoch: epoch + 1,
                step: 0,
            };
            self.save_resumable(&trainer, &resume_path, position)?;
            let trained_chars = steps_before * self.batch_size * SEQ_LEN;
            let mut metadata = self.metadata(position);
            metadata.insert("held_out_loss".into(), format!("{:.4}", held.loss));
            metadata.insert("held_out_accuracy".into(), format!("{:.4}", held.accuracy));
            metadata.insert("trained_chars".into(), trained_chars.to_string());
            self.save(&trainer, &self.out, Precision::F16, metadata)?;
            progress(Progress::EpochDone {
                epoch,
                held_out: held,
                trained_chars,
                seconds: started.elapsed().as_secs_f64(),
            });
        }
        Ok(())
    }

    /// The model to train and where in the run it stands.
    fn start(&self, resume_path: &Path, device: &Device) -> anyhow::Result<(CharRnn, Position)> {
        let config = self.preset.config();
        if self.resume {
            let saved = checkpoint::load(resume_path, Some(config))
                .context("cannot resume: run without --resume to start afresh")?;
            let read = |key: &str| saved.metadata.get(key).and_then(|v| v.parse().ok());
            let position = Position {
                epoch: read("epoch").unwrap_or(0),
                step: read("step").unwrap_or(0),
            };
            return Ok((
                CharRnn::from_flat(config, &saved.weights, device)?,
                position,
            ));
        }
        let model = match &self.init {
            Some(init) => {
                let start = checkpoint::load(init, Some(config))
                    .with_context(|| format!("cannot start from {}", init.display()))?;
                CharRnn::from_flat(config, &start.weights, device)?
            }
            None => CharRnn::init(config, self.seed, device),
        };
        Ok((model, Position::default()))
    }

    fn metadata(&self, position: Position) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("preset".into(), self.preset.to_string()),
            ("epoch".into(), position.epoch.to_string()),
            ("step".into(), position.step.to_string()),
            ("batch_size".into(), self.batch_size.to_string()),
            ("lr".into(), self.lr.to_string()),
            ("seed".into(), self.seed.to_string()),
        ])
    }

    /// The f32 checkpoint a run resumes from, at `position`.
    fn save_resumable(
        &self,
        trainer: &Trainer,
        path: &Path,
        position: Position,
    ) -> anyhow::Result<()> {
        self.save(trainer, path, Precision::F32, self.metadata(position))
    }

    fn save(
        &self,
        trainer: &Trainer,
        path: &Path,
        precision: Precision,
        metadata: BTreeMap<String, String>,
    ) -> anyhow::Result<()> {
        let weights = pollster::block_on(trainer.model().to_flat())?;
        checkpoint::save(path, self.preset.config(), &weights, precision, &metadata)?;
        Ok(())
    }
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

/// One epoch's batches: each text cut into 101-char chunks from an offset that
/// moves every epoch (so chunks differ between epochs), all shuffled together.
fn epoch_batches(texts: &[Vec<u32>], batch_size: usize, seed: u64, epoch: usize) -> Vec<Batch> {
    let offset = (epoch * 37) % 101;
    let ids: Vec<u32> = texts
        .iter()
        .flat_map(|text| text.get(offset..).unwrap_or_default().iter().copied())
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
