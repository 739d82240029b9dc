//! A local `nats-server` with JetStream, for the tests and `folio bench cluster`:
//! `$FOLIO_NATS_SERVER`, or `nats-server` on the PATH (`scripts/setup.sh nats`
//! installs it), on loopback, storing in a folder of its own.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

/// Killed (SIGKILL) when dropped.
pub struct NatsServer {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl NatsServer {
    /// Starts one on a free loopback port, storing in `dir`.
    pub fn start(dir: &Path) -> anyhow::Result<NatsServer> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        Self::start_on(dir, port)
    }

    fn start_on(dir: &Path, port: u16) -> anyhow::Result<NatsServer> {
        let binary = std::env::var("FOLIO_NATS_SERVER").unwrap_or_else(|_| "nats-server".into());
        let child = Command::new(&binary)
            .args(["-js", "-sd"])
            .arg(dir)
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| {
                format!("cannot run {binary}: install it with `scripts/setup.sh nats`")
            })?;
        let mut server = NatsServer {
            child,
            port,
            dir: dir.to_owned(),
        };
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = server.child.try_wait()? {
                anyhow::bail!("{binary} exited ({status}) before it served");
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(10),
                "{binary} did not start within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // Port open is not JetStream ready: give it its first moment.
        std::thread::sleep(Duration::from_millis(100));
        server.dir = dir.to_owned();
        Ok(server)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills it (SIGKILL) and starts it again on the same port and storage.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        *self = Self::start_on(&self.dir.clone(), self.port)?;
        Ok(())
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
