//! `folio`: the command line of the federated char-RNN.

mod data;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Inspect the federated Shakespeare dataset.
    #[command(subcommand)]
    Data(data::DataCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let data_dir = cli.data_dir.unwrap_or_else(data::default_data_dir);
    let result = match cli.command {
        Command::Data(command) => data::run(command, &data_dir),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
