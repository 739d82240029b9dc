//! Drives the real page in headless Chromium: the end-to-end test of browser tabs
//! as federated devices (`tests/`) and `browser-bench` (training chars/s in a tab
//! against native flex).

mod bidi;
pub mod tap;
pub mod webdriver;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::ensure;
use folio_server::DataSource;

/// The repository root: `folio serve`'s web root (index.html, web/, pkg/, models/).
pub fn repo_root() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    root.canonicalize().unwrap_or(root)
}

/// The page's wasm, built by `scripts/test.sh` or `scripts/run.sh serve` into pkg/.
pub fn check_page_built() -> anyhow::Result<()> {
    let wasm = repo_root().join("pkg/folio_web_bg.wasm");
    ensure!(
        wasm.is_file(),
        "{} is missing: build the page first (`scripts/test.sh` or `scripts/run.sh serve` do)",
        wasm.display()
    );
    Ok(())
}

/// A response as it came over the wire: the body still encoded.
pub struct Encoded {
    /// `Content-Encoding` (`identity` when none).
    pub encoding: String,
    pub body: Vec<u8>,
    pub headers: ureq::http::HeaderMap,
}

/// GETs `url` with `Accept-Encoding: accept`, without decoding the body.
pub fn get_encoded(url: &str, accept: &str) -> anyhow::Result<Encoded> {
    let mut response = ureq::get(url).header("Accept-Encoding", accept).call()?;
    let headers = response.headers().clone();
    let encoding = headers
        .get("content-encoding")
        .and_then(|e| e.to_str().ok())
        .unwrap_or("identity")
        .to_owned();
    let body = response
        .body_mut()
        .with_config()
        .limit(u64::MAX)
        .read_to_vec()?;
    Ok(Encoded {
        encoding,
        body,
        headers,
    })
}

/// The real aggregator (small preset) on a loopback port, serving the page, on
/// its own tokio runtime so that blocking WebDriver calls can drive the browser.
pub struct LocalServer {
    pub server: folio_server::Server,
    config: folio_server::ServerConfig,
    _state: tempfile::TempDir,
    runtime: tokio::runtime::Runtime,
}

fn server_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

impl LocalServer {
    pub fn start(rounds: folio_server::RoundConfig, max_rounds: u64) -> anyhow::Result<Self> {
        check_page_built()?;
        Self::start_serving(rounds, max_rounds, repo_root())
    }

    /// As [`LocalServer::start`], asking new sessions for at most
    /// `join_work_bits` of work when crowded (`folio serve`: 22).
    pub fn start_with_join_work(
        rounds: folio_server::RoundConfig,
        max_rounds: u64,
        join_work_bits: u8,
    ) -> anyhow::Result<Self> {
        check_page_built()?;
        let access = folio_server::AccessConfig {
            join_work_bits,
            ..Default::default()
        };
        Self::start_with(
            rounds,
            max_rounds,
            repo_root(),
            DataSource::Shakespeare,
            None,
            access,
        )
    }

    /// As [`LocalServer::start`], its devices bringing their own text: the
    /// server holds none.
    pub fn start_device_data(
        rounds: folio_server::RoundConfig,
        max_rounds: u64,
    ) -> anyhow::Result<Self> {
        check_page_built()?;
        Self::start_with(
            rounds,
            max_rounds,
            repo_root(),
            DataSource::Device,
            None,
            Default::default(),
        )
    }

    /// As [`LocalServer::start`], serving the page from `web_root` (index.html,
    /// web/, pkg/, models/), which may not hold a built page yet.
    pub fn start_serving(
        rounds: folio_server::RoundConfig,
        max_rounds: u64,
        web_root: PathBuf,
    ) -> anyhow::Result<Self> {
        Self::start_with(
            rounds,
            max_rounds,
            web_root,
            DataSource::Shakespeare,
            None,
            Default::default(),
        )
    }

    /// As [`LocalServer::start`], over HTTPS with `tls`'s certificate.
    pub fn start_tls(
        rounds: folio_server::RoundConfig,
        max_rounds: u64,
        tls: folio_server::TlsConfig,
    ) -> anyhow::Result<Self> {
        check_page_built()?;
        Self::start_with(
            rounds,
            max_rounds,
            repo_root(),
            DataSource::Shakespeare,
            Some(tls),
            Default::default(),
        )
    }

    fn start_with(
        rounds: folio_server::RoundConfig,
        max_rounds: u64,
        web_root: PathBuf,
        data: DataSource,
        tls: Option<folio_server::TlsConfig>,
        access: folio_server::AccessConfig,
    ) -> anyhow::Result<Self> {
        let runtime = server_runtime()?;
        let state = tempfile::tempdir()?;
        let config = folio_server::ServerConfig {
            addr: "127.0.0.1:0".parse()?,
            tls,
            state_dir: state.path().to_owned(),
            data,
            data_dir: folio_data::data_dir(&repo_root()),
            web_root: Some(web_root),
            preset: folio_model::Preset::Small,
            init: None,
            rounds,
            seed: 7,
            access,
            limits: folio_server::Limits::default(),
            max_rounds: Some(max_rounds),
        };
        let server = runtime.block_on(folio_server::Server::start(config.clone()))?;
        Ok(Self {
            config: folio_server::ServerConfig {
                addr: server.addr,
                ..config
            },
            server,
            _state: state,
            runtime,
        })
    }

    /// Kills the aggregator as a crashed process would go (every task and
    /// connection ends at once) and starts it again on the same address from its
    /// last commit, to run until `max_rounds` rounds have completed.
    pub fn restart(&mut self, max_rounds: u64) -> anyhow::Result<()> {
        std::mem::replace(&mut self.runtime, server_runtime()?).shutdown_background();
        self.config.max_rounds = Some(max_rounds);
        self.server = self
            .runtime
            .block_on(folio_server::Server::start(self.config.clone()))?;
        Ok(())
    }

    /// Where the aggregator keeps its state.
    pub fn state_dir(&self) -> &std::path::Path {
        &self.config.state_dir
    }

    /// The page's address.
    pub fn url(&self) -> String {
        self.url_at("127.0.0.1")
    }

    /// The page's address at host name `host` (which the browser must map to
    /// loopback): `https://` where the server speaks TLS.
    pub fn url_at(&self, host: &str) -> String {
        let scheme = if self.config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{host}:{}/", self.server.addr.port())
    }

    /// Waits until `rounds` rounds are committed; after `within`, an error that
    /// says `what` did not happen and how the aggregator stands.
    pub fn wait_for_rounds(&self, rounds: u64, within: Duration, what: &str) -> anyhow::Result<()> {
        let started = std::time::Instant::now();
        while self.server.status()["completed_rounds"].as_u64() < Some(rounds) {
            ensure!(
                started.elapsed() < within,
                "{what}; the aggregator: {}",
                self.server.status()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        Ok(())
    }
}

/// Where a test leaves `name` (a screenshot) for people: $FOLIO_ARTIFACTS, else
/// artifacts/ in the repository.
pub fn artifact(name: &str) -> anyhow::Result<PathBuf> {
    let dir: PathBuf = std::env::var_os("FOLIO_ARTIFACTS")
        .map_or_else(|| repo_root().join("artifacts"), Into::into);
    std::fs::create_dir_all(&dir)?;
    Ok(dir.join(name))
}
