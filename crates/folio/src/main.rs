//! `folio`: the command line of the federated char-RNN.

mod data;
mod federate;
mod model;
mod plot;
mod pretrain;
mod privacy;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// Training allocates and frees tensors of hundreds of kilobytes every step;
/// glibc's malloc hands each back to the OS and gets it again as fresh zeroed
/// pages (a fifth of `folio bench train`'s time in page faults), mimalloc keeps them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "folio",
    version,
    about = "Federated learning of a char-RNN, every browser tab a device"
)]
struct Cli {
    /// Data cache holding `shakespeare/` [env: FOLIO_DATA_DIR] [default: data/cache]
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// How log lines (stderr) are written: for people, or one JSON object a
    /// line for a log collector.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Inspect the federated Shakespeare dataset.
    #[command(subcommand)]
    Data(data::DataCommand),
    /// The aggregator: serves the page and runs FedAvg rounds over WebSocket.
    Serve(Box<federate::ServeArgs>),
    /// One native client (a device) training against an aggregator.
    Client(federate::ClientArgs),
    /// An aggregator and N native clients in one process, or (--population) rounds
    /// sampled from every client; prints a table per round.
    Simulate(Box<federate::SimulateArgs>),
    /// Learning curves of run folders, as SVG.
    Plot(plot::PlotArgs),
    /// Central training on a text corpus (Dickens by default).
    Pretrain(pretrain::PretrainArgs),
    /// Loss and accuracy of a checkpoint on a client's data or on random text.
    Eval(model::EvalArgs),
    /// Text from a checkpoint, streamed as it is sampled.
    Generate(model::GenerateArgs),
    /// A run's global model as a model file, its population accuracy in the metadata.
    Export(model::ExportArgs),
    /// Benchmarks that print figures measured side by side.
    #[command(subcommand)]
    Bench(folio_bench::BenchCommand),
    /// Differential privacy: what rounds of DP-FedAvg cost in (ε, δ).
    #[command(subcommand)]
    Privacy(privacy::PrivacyCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Logs (the aggregator's rounds, warnings, errors) to stderr; RUST_LOG picks
    // the levels, e.g. `RUST_LOG=folio_server=debug`.
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,async_nats=warn")),
        )
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    let data_dir = cli.data_dir.unwrap_or_else(data::default_data_dir);
    let result = match cli.command {
        Command::Data(command) => data::run(command, &data_dir),
        Command::Bench(command) => folio_bench::run(command, &data_dir),
        Command::Privacy(command) => privacy::run(command),
        Command::Eval(args) => model::eval(args, &data_dir),
        Command::Generate(args) => model::generate_text(args),
        Command::Export(args) => model::export(args, &data_dir),
        Command::Serve(args) => federate::serve(*args, &data_dir),
        Command::Client(args) => federate::client(args),
        Command::Simulate(args) => federate::simulate(*args, &data_dir),
        Command::Plot(args) => plot::run(args),
        Command::Pretrain(args) => pretrain::run(args, Path::new("."), &data_dir),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
