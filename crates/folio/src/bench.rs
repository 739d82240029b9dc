//! `folio bench ...`: figures measured side by side in one run.

use std::time::Instant;

use burn::prelude::Device;
use clap::Subcommand;
use folio_data::{Batch, BatchConfig, batch::batches, vocab};
use folio_model::{CharRnn, Preset, TrainConfig, Trainer};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Training chars/s on flex (CPU) per preset, B × T as given.
    Train {
        /// Presets to measure.
        #[arg(long, value_delimiter = ',', default_value = "small,seed")]
        presets: Vec<Preset>,
        /// Batch sizes to measure.
        #[arg(long, value_delimiter = ',', default_value = "8")]
        batch: Vec<usize>,
        #[arg(long, default_value_t = 100)]
        seq_len: usize,
        /// Timed steps per configuration (after one warm-up step).
        #[arg(long, default_value_t = 3)]
        steps: usize,
    },
}

pub fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Train {
            presets,
            batch,
            seq_len,
            steps,
        } => {
            println!(
                "preset  batch  seq  steps  s/step   chars/s   (flex, {} threads)",
                rayon_threads()
            );
            for preset in presets {
                for &batch_size in &batch {
                    let rate = train_rate(preset, batch_size, seq_len, steps)?;
                    println!(
                        "{:<6}  {batch_size:>5}  {seq_len:>3}  {steps:>5}  {:>6.3}  {:>8.0}",
                        preset.name(),
                        (batch_size * seq_len) as f64 / rate,
                        rate
                    );
                }
            }
            Ok(())
        }
    }
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Training chars/s of `preset` on flex over real text (Dickens).
fn train_rate(
    preset: Preset,
    batch_size: usize,
    seq_len: usize,
    steps: usize,
) -> anyhow::Result<f64> {
    let device = Device::flex().autodiff();
    let text = "It was the best of times, it was the worst of times, it was the age of wisdom, "
        .repeat(2000);
    let (ids, _) = vocab::encode(&text);
    let config = BatchConfig {
        seq_len,
        batch_size,
        ..BatchConfig::tutorial(0)
    };
    let all: Vec<Batch> = batches(&ids, &config);
    anyhow::ensure!(all.len() > steps, "not enough text for {steps} steps");
    let mut trainer = Trainer::new(
        CharRnn::init(preset.config(), 0, &device),
        TrainConfig::tutorial(),
    );
    // The first step pays for allocations; a read waits for the device.
    pollster::block_on(trainer.step(&all[0]).read())?;
    let start = Instant::now();
    for batch in &all[1..=steps] {
        pollster::block_on(trainer.step(batch).read())?;
    }
    Ok((steps * batch_size * seq_len) as f64 / start.elapsed().as_secs_f64())
}
