//! `folio bench ...`: figures measured side by side in one run. The benches
//! that need a server or a client process start the running executable again
//! (`folio serve`, `folio client`), so they run from the `folio` binary.

mod cluster;
mod devices;
mod influence;
mod personal;
mod responsiveness;
mod secagg;
mod server;

use std::time::Instant;

use anyhow::Context;
use burn::prelude::Device;
use clap::Subcommand;
use folio_client::bench::train_chars_per_second;
use folio_fed::codec::CheckedDelta;
use folio_fed::robust::RoundUpdates;
use folio_fed::{Aggregation, Encoding, codec};
use folio_model::Preset;

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
    /// Folding one seed-size delta into a round, per encoding, against a memcpy of
    /// the same bytes; and peak memory of a round with 10 and 100 clients.
    Aggregate {
        /// Folds timed per encoding.
        #[arg(long, default_value_t = 10)]
        repeats: usize,
    },
    /// One attacker among honest clients: distance from the honest-only FedAvg
    /// model and accuracy, per aggregator and attack.
    Influence(crate::influence::InfluenceArgs),
    /// A crowd of sybils among honest clients, sending one fixed direction at or
    /// far over the clipping bound: the model's movement along it and the eval
    /// loss, per strategy and crowd size.
    Sybils(crate::influence::SybilArgs),
    /// The aggregator under load and floods: its RSS and `/api/status` latency.
    Server(crate::server::ServerBenchArgs),
    /// One aggregator holding 10,000 device sessions (devices bring their own
    /// text): join rate, memory, `/api/status` latency, a round of 100.
    Devices(crate::devices::DevicesBenchArgs),
    /// Devices fine-tune the global model on their own text: the fraction whose
    /// held-out accuracy improves and the mean gain, per setting.
    Personalization(crate::personal::PersonalizationArgs),
    /// Federated evaluation by a sample of devices against every device's
    /// held-out text: the sample's spread and where the population figure falls.
    DeviceEval(crate::personal::DeviceEvalArgs),
    /// `/api/status` latency while a median aggregation of 100 medium-preset
    /// updates runs, and how long a request trickling its head stays open.
    Responsiveness(crate::responsiveness::ResponsivenessArgs),
    /// A cluster's fan-in (a root and 1, 2, 4 edges over NATS) against one
    /// `folio serve`, with light synthetic clients: updates folded per second,
    /// the aggregator's bytes in per round, p99 commit latency, memory.
    Cluster(crate::cluster::ClusterBenchArgs),
    /// Secure aggregation against plain rounds: bytes per client and seconds
    /// per round, for SecAgg and SecAgg+, per preset and round size.
    Secagg(crate::secagg::SecaggBenchArgs),
    /// (Internal) one round of `clients` seed-size deltas; prints peak RSS.
    #[command(hide = true)]
    AggregatePeak { clients: usize },
}

pub fn run(command: BenchCommand, data_dir: &std::path::Path) -> anyhow::Result<()> {
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
        BenchCommand::Aggregate { repeats } => aggregate(repeats),
        BenchCommand::Influence(args) => crate::influence::run(args, data_dir),
        BenchCommand::Sybils(args) => crate::influence::sybils(args, data_dir),
        BenchCommand::Server(args) => crate::server::run(args, data_dir),
        BenchCommand::Devices(args) => crate::devices::run(args, data_dir),
        BenchCommand::Personalization(args) => crate::personal::personalization(args, data_dir),
        BenchCommand::DeviceEval(args) => crate::personal::device_eval(args, data_dir),
        BenchCommand::Responsiveness(args) => crate::responsiveness::run(args, data_dir),
        BenchCommand::Cluster(args) => crate::cluster::run(args, data_dir),
        BenchCommand::Secagg(args) => crate::secagg::run(args),
        BenchCommand::AggregatePeak { clients } => {
            fold_round(clients);
            println!("{}", peak_rss_kib()?);
            Ok(())
        }
    }
}

fn seed_segments() -> Vec<usize> {
    Preset::Seed
        .config()
        .param_shapes()
        .iter()
        .map(|(_, shape)| shape.iter().product())
        .collect()
}

/// A delta like a client's: small values of either sign.
fn sample_delta(n: usize, salt: u64) -> Vec<f32> {
    let mut rng = folio_data::rng::SplitMix64::new(salt);
    (0..n)
        .map(|_| ((rng.next_f64() - 0.5) * 1e-2) as f32)
        .collect()
}

/// The best of `repeats` timings of `f`, in ms (the least disturbed by other
/// work on a shared machine).
fn best_ms(repeats: usize, mut f: impl FnMut()) -> f64 {
    (0..repeats.max(1))
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64() * 1e3
        })
        .fold(f64::INFINITY, f64::min)
}

fn aggregate(repeats: usize) -> anyhow::Result<()> {
    use std::hint::black_box;
    let segments = seed_segments();
    let n: usize = segments.iter().sum();
    let values = sample_delta(n, 1);
    println!("one seed-size delta ({n} parameters), best of {repeats} runs each, in ms");
    println!(
        "check: length, every value finite, L2 norm (outside the round's lock); fold: sum += w × delta,\n\
         decoded on the fly into the round's f32 sum; floor: memcpy of the bytes a fold moves (the\n\
         encoded delta, and the sum in and out); before: decode into a new Vec, then an f64 sum"
    );
    println!("encoding     bytes   check    fold   floor  fold/floor  (check+fold)/floor  before");
    for encoding in Encoding::ALL {
        let bytes = codec::encode(&values, &segments, encoding);
        let check = best_ms(repeats, || {
            black_box(codec::check(black_box(&bytes), &segments, encoding).expect("valid"));
        });
        let delta = CheckedDelta::new(bytes.clone(), &segments, encoding)?;
        let mut sum = vec![0f32; n];
        let fold = best_ms(repeats, || delta.add_to(8.0, black_box(&mut sum)));
        // Written before timing (not fresh zeroed pages), like the sum.
        let (mut bytes_copy, mut sum_copy) = (vec![1u8; bytes.len()], vec![1f32; n]);
        let floor = best_ms(repeats, || {
            bytes_copy.copy_from_slice(black_box(&bytes));
            sum_copy.copy_from_slice(black_box(&sum));
            black_box((&mut bytes_copy, &mut sum_copy));
        });
        let mut wide_sum = vec![0f64; n];
        let before = best_ms(repeats, || {
            let decoded = codec::decode(&bytes, &segments, encoding).expect("valid");
            for (s, &d) in wide_sum.iter_mut().zip(&decoded) {
                *s += 8.0 * f64::from(d);
            }
            black_box(&mut wide_sum);
        });
        println!(
            "{:<8} {:>9}  {check:>6.2}  {fold:>6.2}  {floor:>6.2}  {:>9.2}x  {:>17.2}x  {before:>6.2}",
            format!("{encoding:?}"),
            bytes.len(),
            fold / floor,
            (check + fold) / floor,
        );
    }
    println!(
        "\npeak memory of one round (a fresh process each; each delta arrives, is folded, dropped)"
    );
    let exe = std::env::current_exe()?;
    for clients in [10, 100] {
        let output = std::process::Command::new(&exe)
            .args(["bench", "aggregate-peak", &clients.to_string()])
            .output()?;
        anyhow::ensure!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let kib: u64 = String::from_utf8_lossy(&output.stdout).trim().parse()?;
        println!(
            "{clients:>4} clients: peak RSS {:.1} MiB",
            kib as f64 / 1024.0
        );
    }
    Ok(())
}

/// One round as the server folds it: int8 deltas arrive one at a time.
fn fold_round(clients: usize) {
    let segments = seed_segments();
    let n: usize = segments.iter().sum();
    let mut round = RoundUpdates::new(Aggregation::Mean, n);
    for client in 0..clients {
        let frame = codec::encode(&sample_delta(n, client as u64), &segments, Encoding::Int8);
        let delta = CheckedDelta::new(frame, &segments, Encoding::Int8).expect("valid frame");
        round.add(&delta, 8.0, 1.0);
    }
    std::hint::black_box(round.aggregate().expect("updates were added"));
}

/// The process's peak resident set (Linux `VmHWM`), in KiB.
fn peak_rss_kib() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("no VmHWM in /proc/self/status (not Linux?)")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("malformed VmHWM")?
        .parse()?)
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Training chars/s of `preset` on flex.
fn train_rate(
    preset: Preset,
    batch_size: usize,
    seq_len: usize,
    steps: usize,
) -> anyhow::Result<f64> {
    let device = Device::flex().autodiff();
    Ok(pollster::block_on(train_chars_per_second(
        preset.config(),
        &device,
        batch_size,
        seq_len,
        steps,
    ))?)
}
