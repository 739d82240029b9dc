//! Firefox driven over WebDriver BiDi, which Firefox serves itself
//! (`--remote-debugging-port`): no geckodriver to build or install. Just what
//! [`crate::webdriver::Session`] offers: tabs (browsing contexts), navigation,
//! scripts, the viewport, screenshots.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Map, Value, json};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

/// Every tab is a device: background tabs keep their timers, and each tab acts
/// as if focused (as under geckodriver). Firefox's remote agent sets its own
/// automation preferences beside these.
const PREFS: &str = r#"user_pref("dom.min_background_timeout_value", 4);
user_pref("dom.timeout.enable_budget_timer_throttling", false);
user_pref("focusmanager.testmode", true);
user_pref("browser.shell.checkDefaultBrowser", false);
user_pref("datareporting.policy.dataSubmissionEnabled", false);
user_pref("app.update.disabledForTesting", true);
"#;

/// SwiftShader-free Firefox still trains for long stretches on one core.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(900);

/// One headless Firefox with a fresh profile and a BiDi session; ended on drop.
pub(crate) struct Bidi {
    socket: WebSocket<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    /// The current tab's browsing context.
    context: String,
    process: Child,
}

impl Bidi {
    pub(crate) fn launch(profile: &Path, width: u32, height: u32) -> anyhow::Result<Self> {
        std::fs::write(profile.join("user.js"), PREFS)?;
        let binary = firefox_binary().context(
            "no Firefox on PATH (firefox-esr or firefox): install it with `scripts/setup.sh browser`",
        )?;
        let mut process = Command::new(&binary)
            .args(["--headless", "--no-remote", "--remote-debugging-port", "0"])
            .arg("--profile")
            .arg(profile)
            .args([format!("--width={width}"), format!("--height={height}")])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot run {}", binary.display()))?;
        let endpoint = match listening_on(&mut process) {
            Ok(endpoint) => endpoint,
            Err(error) => {
                let _ = process.kill();
                return Err(error);
            }
        };
        let (socket, _) = tungstenite::connect(format!("{endpoint}/session"))
            .with_context(|| format!("cannot open Firefox's BiDi session at {endpoint}"))?;
        if let MaybeTlsStream::Plain(stream) = socket.get_ref() {
            stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        }
        let mut bidi = Self {
            socket,
            next_id: 0,
            context: String::new(),
            process,
        };
        bidi.command("session.new", json!({ "capabilities": {} }))?;
        let tree = bidi.command("browsingContext.getTree", json!({ "maxDepth": 0 }))?;
        bidi.context = tree["contexts"][0]["context"]
            .as_str()
            .context("Firefox has no tab")?
            .to_owned();
        Ok(bidi)
    }

    /// Sends one command and returns its result, or the browser's error.
    fn command(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let request = json!({ "id": id, "method": method, "params": params });
        self.socket
            .send(Message::text(request.to_string()))
            .with_context(|| format!("{method}: Firefox's BiDi socket is gone"))?;
        loop {
            let message = self
                .socket
                .read()
                .with_context(|| format!("{method}: no answer from Firefox"))?;
            let Message::Text(text) = message else {
                continue;
            };
            let mut answer: Value = serde_json::from_str(text.as_str())
                .with_context(|| format!("{method}: an answer that is not JSON: {text}"))?;
            if answer["id"] != id {
                continue; // an event, or an answer to an earlier command
            }
            if answer["type"] == "success" {
                return Ok(answer["result"].take());
            }
            bail!(
                "{method}: {} ({})",
                answer["message"].as_str().unwrap_or("no message"),
                answer["error"].as_str().unwrap_or("unknown error")
            );
        }
    }

    pub(crate) fn navigate(&mut self, url: &str) -> anyhow::Result<()> {
        let context = self.context.clone();
        self.command(
            "browsingContext.navigate",
            json!({ "context": context, "url": url, "wait": "complete" }),
        )?;
        Ok(())
    }

    pub(crate) fn tab(&self) -> String {
        self.context.clone()
    }

    pub(crate) fn open_tab(&mut self, url: &str) -> anyhow::Result<String> {
        let created = self.command(
            "browsingContext.create",
            json!({ "type": "tab", "background": true }),
        )?;
        self.context = created["context"]
            .as_str()
            .context("no context for the new tab")?
            .to_owned();
        self.navigate(url)?;
        Ok(self.context.clone())
    }

    pub(crate) fn switch_to(&mut self, context: &str) -> anyhow::Result<()> {
        self.command("browsingContext.activate", json!({ "context": context }))?;
        self.context = context.to_owned();
        Ok(())
    }

    pub(crate) fn close_tab(&mut self) -> anyhow::Result<()> {
        let context = self.context.clone();
        self.command("browsingContext.close", json!({ "context": context }))?;
        Ok(())
    }

    /// Runs `script` as a function body with `arguments` = `args` (as WebDriver's
    /// execute does); with `callback`, `arguments` ends with a function that the
    /// script calls with its result.
    pub(crate) fn execute(
        &mut self,
        script: &str,
        args: Value,
        callback: bool,
    ) -> anyhow::Result<Value> {
        let body = if callback {
            format!(
                "function(...args) {{ return new Promise((resolve) => \
                 (function() {{ {script} }}).apply(this, [...args, resolve])); }}"
            )
        } else {
            format!("function() {{ {script} }}")
        };
        let arguments: Vec<Value> = args
            .as_array()
            .map(|values| values.iter().map(local_value).collect())
            .unwrap_or_default();
        let context = self.context.clone();
        let result = self.command(
            "script.callFunction",
            json!({
                "functionDeclaration": body,
                "arguments": arguments,
                "awaitPromise": callback,
                "target": { "context": context },
                "resultOwnership": "none",
            }),
        )?;
        if result["type"] == "exception" {
            bail!(
                "the script threw: {}",
                result["exceptionDetails"]["text"]
                    .as_str()
                    .unwrap_or("no message")
            );
        }
        Ok(json_value(&result["result"]))
    }

    pub(crate) fn resize(&mut self, width: u32, height: u32) -> anyhow::Result<()> {
        let context = self.context.clone();
        self.command(
            "browsingContext.setViewport",
            json!({ "context": context, "viewport": { "width": width, "height": height } }),
        )?;
        Ok(())
    }

    /// The current tab as a base64 PNG.
    pub(crate) fn screenshot(&mut self) -> anyhow::Result<String> {
        let context = self.context.clone();
        let shot = self.command(
            "browsingContext.captureScreenshot",
            json!({ "context": context }),
        )?;
        Ok(shot["data"]
            .as_str()
            .context("no screenshot data")?
            .to_owned())
    }
}

impl Drop for Bidi {
    fn drop(&mut self) {
        let _ = self.command("browser.close", json!({}));
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

fn firefox_binary() -> Option<PathBuf> {
    if let Some(binary) = std::env::var_os("FIREFOX") {
        return Some(binary.into());
    }
    let path = std::env::var_os("PATH")?;
    ["firefox-esr", "firefox"]
        .iter()
        .flat_map(|name| std::env::split_paths(&path).map(move |dir| dir.join(name)))
        .find(|candidate| candidate.is_file())
}

/// The WebSocket address Firefox prints once its remote agent listens; its
/// standard error is drained from then on (a full pipe would stall it).
fn listening_on(process: &mut Child) -> anyhow::Result<String> {
    let stderr = process.stderr.take().context("no standard error")?;
    let (found, endpoint) = mpsc::channel();
    std::thread::spawn(move || {
        let mut found = Some(found);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(at) = line.find("ws://")
                && line.contains("WebDriver BiDi listening")
                && let Some(found) = found.take()
            {
                let _ = found.send(line[at..].trim().to_owned());
            }
        }
    });
    endpoint
        .recv_timeout(Duration::from_secs(60))
        .context("Firefox did not start its WebDriver BiDi server within 60 s")
}

/// A JSON value as a BiDi `LocalValue` (a script's argument).
fn local_value(value: &Value) -> Value {
    match value {
        Value::Null => json!({ "type": "null" }),
        Value::Bool(b) => json!({ "type": "boolean", "value": b }),
        Value::Number(n) => json!({ "type": "number", "value": n }),
        Value::String(s) => json!({ "type": "string", "value": s }),
        Value::Array(items) => {
            json!({ "type": "array", "value": items.iter().map(local_value).collect::<Vec<_>>() })
        }
        Value::Object(fields) => json!({
            "type": "object",
            "value": fields.iter().map(|(k, v)| json!([k, local_value(v)])).collect::<Vec<_>>(),
        }),
    }
}

/// A BiDi `RemoteValue` (a script's result) as JSON, as WebDriver's execute
/// returns it: what JSON cannot hold (functions, nodes, NaN) becomes null.
fn json_value(remote: &Value) -> Value {
    let value = &remote["value"];
    match remote["type"].as_str().unwrap_or_default() {
        "string" | "boolean" => value.clone(),
        "number" => {
            if value.is_number() {
                value.clone()
            } else if value == "-0" {
                json!(0)
            } else {
                Value::Null
            }
        }
        "array" => Value::Array(
            value
                .as_array()
                .map(|items| items.iter().map(json_value).collect())
                .unwrap_or_default(),
        ),
        "object" => Value::Object(
            value
                .as_array()
                .map(|pairs| {
                    pairs
                        .iter()
                        .filter_map(|pair| {
                            Some((pair[0].as_str()?.to_owned(), json_value(&pair[1])))
                        })
                        .collect::<Map<_, _>>()
                })
                .unwrap_or_default(),
        ),
        _ => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_and_arguments_convert_like_webdriver_execute() {
        let remote = json!({ "type": "object", "value": [
            ["round", { "type": "number", "value": 3 }],
            ["tabs", { "type": "array", "value": [{ "type": "string", "value": "flex" }, { "type": "null" }] }],
            ["bad", { "type": "number", "value": "NaN" }],
            ["node", { "type": "node", "sharedId": "x" }],
        ]});
        assert_eq!(
            json_value(&remote),
            json!({ "round": 3, "tabs": ["flex", null], "bad": null, "node": null })
        );
        assert_eq!(
            local_value(&json!({ "a": [1, "x", true] })),
            json!({ "type": "object", "value": [["a", { "type": "array", "value": [
                { "type": "number", "value": 1 },
                { "type": "string", "value": "x" },
                { "type": "boolean", "value": true },
            ]}]]})
        );
    }
}
