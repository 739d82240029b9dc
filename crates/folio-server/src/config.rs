//! What an aggregator runs with.

use std::net::SocketAddr;
use std::path::PathBuf;

use folio_model::Preset;
pub use folio_proto::DataSource;

pub use folio_engine::RoundConfig;

use crate::access::AccessConfig;
use crate::limits::Limits;
use crate::tls::TlsConfig;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub addr: SocketAddr,
    /// HTTPS and `wss://` with this certificate; `None`: plain HTTP (secure
    /// for browsers on localhost only).
    pub tls: Option<TlsConfig>,
    /// Checkpoints and the metrics history; restarting on it resumes.
    pub state_dir: PathBuf,
    /// Where devices' text comes from: the Shakespeare simulation (the server
    /// hands it out) or the devices themselves (the server holds none).
    pub data: DataSource,
    /// The data cache holding `shakespeare/` (the simulation's).
    pub data_dir: PathBuf,
    /// Served at `/` (index.html, web/, the built wasm under pkg/).
    pub web_root: Option<PathBuf>,
    pub preset: Preset,
    /// Initial global model; `None`: fresh weights from `seed`.
    pub init: Option<PathBuf>,
    pub rounds: RoundConfig,
    pub seed: u64,
    /// Join and admin tokens, allowed origins.
    pub access: AccessConfig,
    pub limits: Limits,
    /// Stop after this many rounds (`None`: serve forever).
    pub max_rounds: Option<u64>,
}
