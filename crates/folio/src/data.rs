//! `folio data ...`: the federated Shakespeare dataset at a glance.

use std::path::{Path, PathBuf};

use clap::Subcommand;
use folio_data::batch::batch_count;
use folio_data::stats::CorpusStats;
use folio_data::{BatchConfig, Corpus, vocab};

#[derive(Subcommand)]
pub enum DataCommand {
    /// Plays, clients, speeches, chars, batching losses, out-of-vocabulary rate.
    Stats,
    /// Every client id, with its train/test speeches and chars.
    Clients,
    /// A client's first training lines and its batch counts.
    Show {
        /// Client id, e.g. THE_TRAGEDY_OF_KING_LEAR_KENT (case and punctuation are forgiven).
        client: String,
        /// Lines of text to print.
        #[arg(long, default_value_t = 12)]
        lines: usize,
    },
}

pub fn default_data_dir() -> PathBuf {
    folio_data::data_dir(Path::new(""))
}

pub fn load_corpus(data_dir: &Path) -> anyhow::Result<Corpus> {
    Ok(Corpus::load(&data_dir.join("shakespeare"))?)
}

pub fn run(command: DataCommand, data_dir: &Path) -> anyhow::Result<()> {
    let corpus = load_corpus(data_dir)?;
    match command {
        DataCommand::Stats => println!("{}", CorpusStats::of(&corpus)),
        DataCommand::Clients => {
            for client in &corpus.clients {
                let chars = client.train_text().len() + client.test_text().len();
                println!(
                    "{}\t{} train\t{} test speeches\t{chars} chars",
                    client.id,
                    client.train.len(),
                    client.test.len()
                );
            }
        }
        DataCommand::Show { client, lines } => {
            let client = corpus.client(&client)?;
            let (ids, _) = vocab::encode(&client.train_text());
            println!("{} ({} in {})", client.id, client.speaker, client.play);
            println!(
                "{} train / {} test speeches, {} train chars, {} tutorial batches, {} padded batches",
                client.train.len(),
                client.test.len(),
                ids.len(),
                batch_count(ids.len(), &BatchConfig::tutorial(0)),
                batch_count(ids.len(), &BatchConfig::padded(0)),
            );
            println!("---");
            for line in client.train_text().lines().take(lines) {
                println!("{line}");
            }
        }
    }
    Ok(())
}
