//! A small W3C WebDriver client for ChromeDriver and geckodriver: just what the
//! tests and the benchmark need (sessions, tabs, scripts, screenshots).

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine;
use serde_json::{Value, json};

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Browser {
    /// Headless Chromium through `chromedriver` (`$CHROMEDRIVER`, else on PATH).
    Chromium,
    /// Headless Firefox through `geckodriver` (`$GECKODRIVER`, else on PATH).
    Firefox,
}

/// A running WebDriver server for one browser, stopped on drop.
pub struct Driver {
    browser: Browser,
    process: Child,
    url: String,
    agent: ureq::Agent,
}

impl Driver {
    pub fn chromium() -> anyhow::Result<Self> {
        Self::start(Browser::Chromium)
    }

    pub fn firefox() -> anyhow::Result<Self> {
        Self::start(Browser::Firefox)
    }

    fn start(browser: Browser) -> anyhow::Result<Self> {
        let (variable, name) = match browser {
            Browser::Chromium => ("CHROMEDRIVER", "chromedriver"),
            Browser::Firefox => ("GECKODRIVER", "geckodriver"),
        };
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
        let driver = Self {
            browser,
            process,
            url: format!("http://127.0.0.1:{port}"),
            agent,
        };
        let started = Instant::now();
        while driver
            .agent
            .get(format!("{}/status", driver.url))
            .call()
            .is_err()
        {
            if started.elapsed() > Duration::from_secs(30) {
                bail!("{name} did not answer on port {port} within 30 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(driver)
    }

    /// A new browser (fresh profile) with one tab of `width` × `height` pixels.
    pub fn session(&self, width: u32, height: u32) -> anyhow::Result<Session> {
        let profile = tempfile::tempdir()?;
        // SwiftShader keeps a busy renderer from answering for long stretches.
        let timeouts = json!({ "script": 600_000, "pageLoad": 600_000 });
        let capabilities = match self.browser {
            Browser::Chromium => {
                let mut args: Vec<String> = CHROMIUM_ARGS.iter().map(|a| a.to_string()).collect();
                args.push(format!("--user-data-dir={}", profile.path().display()));
                args.push(format!("--window-size={width},{height}"));
                let mut options = json!({ "args": args });
                if let Some(binary) = chromium_binary() {
                    options["binary"] = json!(binary);
                }
                json!({ "browserName": "chrome", "goog:chromeOptions": options, "timeouts": timeouts })
            }
            // geckodriver makes a fresh profile of its own.
            Browser::Firefox => json!({
                "browserName": "firefox",
                "moz:firefoxOptions": {
                    "args": ["-headless", format!("--width={width}"), format!("--height={height}")],
                    // Every tab is a device: background tabs keep their timers.
                    "prefs": { "dom.min_background_timeout_value": 4, "dom.timeout.enable_budget_timer_throttling": false },
                },
                "timeouts": timeouts,
            }),
        };
        let value = command(
            &self.agent,
            "POST",
            &format!("{}/session", self.url),
            Some(json!({ "capabilities": { "alwaysMatch": capabilities } })),
        )
        .with_context(|| {
            format!(
                "cannot start headless {:?} through its WebDriver",
                self.browser
            )
        })?;
        let id = value["sessionId"]
            .as_str()
            .context("chromedriver answered without a session id")?;
        Ok(Session {
            agent: self.agent.clone(),
            url: format!("{}/session/{id}", self.url),
            _profile: profile,
        })
    }
}

impl Drop for Driver {
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
    agent: ureq::Agent,
    url: String,
    _profile: tempfile::TempDir,
}

impl Session {
    fn command(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        command(&self.agent, method, &format!("{}{path}", self.url), body)
    }

    pub fn navigate(&self, url: &str) -> anyhow::Result<()> {
        self.command("POST", "/url", Some(json!({ "url": url })))?;
        Ok(())
    }

    /// The current tab's handle.
    pub fn tab(&self) -> anyhow::Result<String> {
        Ok(self
            .command("GET", "/window", None)?
            .as_str()
            .context("no window handle")?
            .to_owned())
    }

    /// Opens `url` in a new tab and makes it current; returns its handle.
    pub fn open_tab(&self, url: &str) -> anyhow::Result<String> {
        let opened = self.command("POST", "/window/new", Some(json!({ "type": "tab" })))?;
        let handle = opened["handle"]
            .as_str()
            .context("no handle for the new tab")?
            .to_owned();
        self.switch_to(&handle)?;
        self.navigate(url)?;
        Ok(handle)
    }

    pub fn switch_to(&self, handle: &str) -> anyhow::Result<()> {
        self.command("POST", "/window", Some(json!({ "handle": handle })))?;
        Ok(())
    }

    /// Closes the current tab, as a user closing it mid-round would.
    pub fn close_tab(&self) -> anyhow::Result<()> {
        self.command("DELETE", "/window", None)?;
        Ok(())
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the current tab.
    pub fn execute(&self, script: &str, args: Value) -> anyhow::Result<Value> {
        self.command(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": args })),
        )
    }

    /// Like [`Session::execute`], for a body that ends by calling
    /// `arguments[arguments.length - 1](result)`.
    pub fn execute_async(&self, script: &str, args: Value) -> anyhow::Result<Value> {
        self.command(
            "POST",
            "/execute/async",
            Some(json!({ "script": script, "args": args })),
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

    /// Resizes the browser window to `width` × `height` pixels.
    pub fn resize(&self, width: u32, height: u32) -> anyhow::Result<()> {
        self.command(
            "POST",
            "/window/rect",
            Some(json!({ "width": width, "height": height })),
        )?;
        Ok(())
    }

    /// A PNG of the current tab.
    pub fn screenshot(&self) -> anyhow::Result<Vec<u8>> {
        let encoded = self.command("GET", "/screenshot", None)?;
        Ok(base64::engine::general_purpose::STANDARD
            .decode(encoded.as_str().context("no screenshot data")?)?)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.command("DELETE", "", None);
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
