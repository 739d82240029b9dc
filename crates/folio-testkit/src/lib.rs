//! What folio's test crates share: where the repository and its data are, the
//! clients the multi-process tests train as, a server config on loopback, and
//! waiting for what happens on its own time without sleeping a guessed while.

pub mod certificates;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use folio_model::Preset;
use folio_server::{AccessConfig, Limits, RoundConfig, ServerConfig};

/// The repository's root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The data cache (`FOLIO_DATA_DIR`, or the repository's `data/cache`).
pub fn data_dir() -> PathBuf {
    folio_data::data_dir(&repo_root())
}

/// Six of King Lear's characters, each with lines enough to train on.
pub const KING_LEAR: [&str; 6] = [
    "THE_TRAGEDY_OF_KING_LEAR_KENT",
    "THE_TRAGEDY_OF_KING_LEAR_EDG",
    "THE_TRAGEDY_OF_KING_LEAR_GLOU",
    "THE_TRAGEDY_OF_KING_LEAR_GON",
    "THE_TRAGEDY_OF_KING_LEAR_EDM",
    "THE_TRAGEDY_OF_KING_LEAR_COR",
];

/// A small-preset server on a free loopback port, its state in `state_dir`,
/// stopping after `max_rounds`, otherwise as `folio serve` runs (device checks
/// on, the default limits), but asking no work of new sessions: tests speak
/// the protocol frame by frame from one address (the work has tests of its own).
pub fn server_config(state_dir: &Path, rounds: RoundConfig, max_rounds: u64) -> ServerConfig {
    ServerConfig {
        addr: "127.0.0.1:0".parse().expect("a socket address"),
        tls: None,
        state_dir: state_dir.to_owned(),
        data: folio_server::DataSource::Shakespeare,
        data_dir: data_dir(),
        web_root: None,
        preset: Preset::Small,
        init: None,
        rounds,
        seed: 5,
        access: AccessConfig {
            join_work_bits: 0,
            ..AccessConfig::default()
        },
        limits: Limits::default(),
        max_rounds: Some(max_rounds),
    }
}

/// `config` with its devices selected unchecked: for tests that speak the
/// protocol frame by frame and answer no probe.
pub fn unchecked(config: ServerConfig) -> ServerConfig {
    ServerConfig {
        access: AccessConfig {
            check_devices: false,
            ..config.access
        },
        ..config
    }
}

/// Polls `condition` until it holds, failing the test after 30 s: for what a
/// server does on its own time (sees a socket end, forgets a session, retries a
/// round), so no test sleeps a guessed duration and hopes.
pub async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within 30 s: {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits for `wait`, failing the test after two minutes rather than hanging
/// (a loop over messages may never see the one it waits for).
pub async fn within<T>(wait: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(120), wait)
        .await
        .expect("what the test waits for did not come within 2 minutes")
}
