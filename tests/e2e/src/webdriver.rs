//! A small W3C WebDriver client for Chromium (through ChromeDriver) and Firefox
//! (WebDriver BiDi, which Firefox serves itself): just what the tests and the
//! benchmark need (sessions, tabs, scripts, screenshots).

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine;
use serde_json::{Value, json};

use crate::bidi::Bidi;

/// Headless Chromium with WebGPU on SwiftShader (its CPU Vulkan): without the Vulkan
/// and WebGPU-adapter flags `navigator.gpu` gives no adapter. Background tabs are
/// not throttled, since every tab is a device.
const CHROMIUM_ARGS: &[&str] = &[
    "--headless=new",
    "--no-sandbox",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--disable-background-timer-throttling",
    "--disable-backgrounding-occluded-windows",
    "--disable-renderer-backgrounding",
    "--enable-unsafe-webgpu",
    "--enable-features=Vulkan",
    "--use-vulkan=swiftshader",
    "--use-webgpu-adapter=swiftshader",
];

/// What starts a browser: a running ChromeDriver (stopped on drop), or Firefox,
/// which each session starts itself.
pub struct Driver {
    server: Option<Server>,
}

struct Server {
    process: Child,
    url: String,
    agent: ureq::Agent,
}

impl Driver {
    pub fn chromium() -> anyhow::Result<Self> {
        let (variable, name) = ("CHROMEDRIVER", "chromedriver");
        let binary = std::env::var_os(variable).map_or_else(|| name.into(), PathBuf::from);
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let process = Command::new(&binary)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| {
                format!(
                    "cannot run {}: install the browsers and their drivers with `scripts/setup.sh browser`",
                    binary.display()
                )
            })?;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(900)))
            .build()
            .into();
        let server = Server {
            process,
            url: format!("http://127.0.0.1:{port}"),
            agent,
        };
        let started = Instant::now();
        while server
            .agent
            .get(format!("{}/status", server.url))
            .call()
            .is_err()
        {
            if started.elapsed() > Duration::from_secs(30) {
                bail!("{name} did not answer on port {port} within 30 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(Self {
            server: Some(server),
        })
    }

    pub fn firefox() -> anyhow::Result<Self> {
        Ok(Self { server: None })
    }

    /// A new browser (fresh profile) with one tab of `width` × `height` pixels.
    pub fn session(&self, width: u32, height: u32) -> anyhow::Result<Session> {
        self.session_with(width, height, &[])
    }

    /// As [`Driver::session`], Chromium started with `extra` arguments too
    /// (Firefox takes none).
    pub fn session_with(
        &self,
        width: u32,
        height: u32,
        extra: &[String],
    ) -> anyhow::Result<Session> {
        let profile = tempfile::tempdir()?;
        let Some(server) = &self.server else {
            let firefox = Bidi::launch(profile.path(), width, height)
                .context("cannot start headless Firefox")?;
            return Ok(Session {
                link: Link::Bidi(Box::new(Mutex::new(firefox))),
                _profile: profile,
            });
        };
        // SwiftShader keeps a busy renderer from answering for long stretches.
        let timeouts = json!({ "script": 600_000, "pageLoad": 600_000 });
        let mut args: Vec<String> = CHROMIUM_ARGS.iter().map(|a| a.to_string()).collect();
        args.push(format!("--user-data-dir={}", profile.path().display()));
        args.push(format!("--window-size={width},{height}"));
        args.extend(extra.iter().cloned());
        let mut options = json!({ "args": args });
        if let Some(binary) = chromium_binary() {
            options["binary"] = json!(binary);
        }
        let capabilities =
            json!({ "browserName": "chrome", "goog:chromeOptions": options, "timeouts": timeouts });
        let value = command(
            &server.agent,
            "POST",
            &format!("{}/session", server.url),
            Some(json!({ "capabilities": { "alwaysMatch": capabilities } })),
        )
        .context("cannot start headless Chromium through ChromeDriver")?;
        let id = value["sessionId"]
            .as_str()
            .context("chromedriver answered without a session id")?;
        Ok(Session {
            link: Link::Classic(Classic {
                agent: server.agent.clone(),
                url: format!("{}/session/{id}", server.url),
            }),
            _profile: profile,
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

fn chromium_binary() -> Option<String> {
    let path = std::env::var_os("PATH")?;
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|name| std::env::split_paths(&path).map(move |dir| dir.join(name)))
        .find(|candidate| candidate.is_file())
        .map(|found| found.display().to_string())
}

/// Sends one WebDriver command and returns its `value`, or the driver's error.
fn command(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    body: Option<Value>,
) -> anyhow::Result<Value> {
    let mut response = match (method, body) {
        ("GET", _) => agent.get(url).call()?,
        ("DELETE", _) => agent.delete(url).call()?,
        (_, body) => agent
            .post(url)
            .send_json(body.unwrap_or_else(|| json!({})))?,
    };
    let status = response.status();
    let mut answer: Value = response
        .body_mut()
        .read_json()
        .with_context(|| format!("{method} {url}: the answer ({status}) is not JSON"))?;
    let value = answer["value"].take();
    if !status.is_success() {
        bail!(
            "{method} {url}: {} ({})",
            value["message"].as_str().unwrap_or("no message"),
            value["error"].as_str().unwrap_or("unknown error")
        );
    }
    Ok(value)
}

/// One browser; commands go to its current tab. Closed on drop.
pub struct Session {
    link: Link,
    _profile: tempfile::TempDir,
}

enum Link {
    /// WebDriver over HTTP, through ChromeDriver.
    Classic(Classic),
    /// WebDriver BiDi, straight to Firefox.
    Bidi(Box<Mutex<Bidi>>),
}

/// A ChromeDriver session.
struct Classic {
    agent: ureq::Agent,
    url: String,
}

impl Classic {
    fn command(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        command(&self.agent, method, &format!("{}{path}", self.url), body)
    }
}

impl Session {
    /// Runs `use_firefox` on a Firefox session, `use_chromium` on a ChromeDriver one.
    fn either<T>(
        &self,
        use_firefox: impl FnOnce(&mut Bidi) -> anyhow::Result<T>,
        use_chromium: impl FnOnce(&Classic) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        match &self.link {
            Link::Bidi(firefox) => use_firefox(
                &mut firefox
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()),
            ),
            Link::Classic(chromium) => use_chromium(chromium),
        }
    }

    pub fn navigate(&self, url: &str) -> anyhow::Result<()> {
        self.either(
            |firefox| firefox.navigate(url),
            |chromium| {
                chromium.command("POST", "/url", Some(json!({ "url": url })))?;
                Ok(())
            },
        )
    }

    /// The current tab's handle.
    pub fn tab(&self) -> anyhow::Result<String> {
        self.either(
            |firefox| Ok(firefox.tab()),
            |chromium| {
                Ok(chromium
                    .command("GET", "/window", None)?
                    .as_str()
                    .context("no window handle")?
                    .to_owned())
            },
        )
    }

    /// Opens `url` in a new tab and makes it current; returns its handle.
    pub fn open_tab(&self, url: &str) -> anyhow::Result<String> {
        self.either(
            |firefox| firefox.open_tab(url),
            |chromium| {
                let opened =
                    chromium.command("POST", "/window/new", Some(json!({ "type": "tab" })))?;
                let handle = opened["handle"]
                    .as_str()
                    .context("no handle for the new tab")?
                    .to_owned();
                chromium.command("POST", "/window", Some(json!({ "handle": handle })))?;
                chromium.command("POST", "/url", Some(json!({ "url": url })))?;
                Ok(handle)
            },
        )
    }

    pub fn switch_to(&self, handle: &str) -> anyhow::Result<()> {
        self.either(
            |firefox| firefox.switch_to(handle),
            |chromium| {
                chromium.command("POST", "/window", Some(json!({ "handle": handle })))?;
                Ok(())
            },
        )
    }

    /// Closes the current tab, as a user closing it mid-round would.
    pub fn close_tab(&self) -> anyhow::Result<()> {
        self.either(
            |firefox| firefox.close_tab(),
            |chromium| {
                chromium.command("DELETE", "/window", None)?;
                Ok(())
            },
        )
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the current tab.
    pub fn execute(&self, script: &str, args: Value) -> anyhow::Result<Value> {
        self.either(
            |firefox| firefox.execute(script, args.clone(), false),
            |chromium| {
                chromium.command(
                    "POST",
                    "/execute/sync",
                    Some(json!({ "script": script, "args": args })),
                )
            },
        )
    }

    /// Like [`Session::execute`], for a body that ends by calling
    /// `arguments[arguments.length - 1](result)`.
    pub fn execute_async(&self, script: &str, args: Value) -> anyhow::Result<Value> {
        self.either(
            |firefox| firefox.execute(script, args.clone(), true),
            |chromium| {
                chromium.command(
                    "POST",
                    "/execute/async",
                    Some(json!({ "script": script, "args": args })),
                )
            },
        )
    }

    /// Polls `script` in the current tab until it returns something truthy.
    pub fn wait_for(&self, what: &str, script: &str, timeout: Duration) -> anyhow::Result<Value> {
        let started = Instant::now();
        loop {
            let value = self.execute(script, json!([]))?;
            if !matches!(value, Value::Null | Value::Bool(false)) && value != json!("") {
                return Ok(value);
            }
            if started.elapsed() > timeout {
                bail!("gave up after {timeout:?} waiting for {what}");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Resizes the browser window (Firefox: the page's viewport) to `width` ×
    /// `height` pixels.
    pub fn resize(&self, width: u32, height: u32) -> anyhow::Result<()> {
        self.either(
            |firefox| firefox.resize(width, height),
            |chromium| {
                chromium.command(
                    "POST",
                    "/window/rect",
                    Some(json!({ "width": width, "height": height })),
                )?;
                Ok(())
            },
        )
    }

    /// A PNG of the current tab.
    pub fn screenshot(&self) -> anyhow::Result<Vec<u8>> {
        let encoded = self.either(
            |firefox| firefox.screenshot(),
            |chromium| {
                Ok(chromium
                    .command("GET", "/screenshot", None)?
                    .as_str()
                    .context("no screenshot data")?
                    .to_owned())
            },
        )?;
        Ok(base64::engine::general_purpose::STANDARD.decode(encoded)?)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Link::Classic(chromium) = &self.link {
            let _ = chromium.command("DELETE", "", None);
            // The driver does not wait for the browser to exit, and a browser that
            // outlives it is left to run: end any process started with this
            // session's profile, which is its alone.
            let _ = Command::new("pkill")
                .arg("-KILL")
                .arg("-f")
                .arg(self._profile.path())
                .status();
        }
    }
}
