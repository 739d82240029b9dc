//! The browser side of folio: what the page calls through wasm-bindgen.

mod transport;

pub use transport::BrowserTransport;

use std::time::Duration;

use burn::prelude::Device;
use folio_client::{ClientError, ClientEvent, ClientOptions, ClientState, HeldModel};
use folio_fed::Encoding;
use folio_proto::ClientKind;
use js_sys::{Function, Object, Promise, Reflect};
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;

/// A panic in the device code reaches the page in words (through
/// `globalThis.folioPanic(message)`, when the page defines it) and the console,
/// instead of an opaque `unreachable` trap.
#[wasm_bindgen(start)]
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let message = JsValue::from(format!("the device code crashed: {info}"));
        let global = js_sys::global();
        let console = Reflect::get(&global, &"console".into()).unwrap_or(JsValue::NULL);
        for (owner, name) in [(&console, "error"), (&global.into(), "folioPanic")] {
            if let Ok(report) = Reflect::get(owner, &name.into())
                && let Ok(report) = report.dyn_into::<Function>()
            {
                let _ = report.call1(owner, &message);
            }
        }
    }));
}

/// Text → vocabulary ids, under the same out-of-vocabulary policy as the server.
#[wasm_bindgen(js_name = encodeText)]
pub fn encode_text(text: &str) -> Vec<u32> {
    folio_data::vocab::encode(text).0
}

/// Vocabulary ids → text.
#[wasm_bindgen(js_name = decodeIds)]
pub fn decode_ids(ids: &[u32]) -> String {
    folio_data::vocab::decode(ids)
}

#[cfg(feature = "webgpu")]
mod webgpu;
#[cfg(feature = "webgpu")]
pub use webgpu::{webgpu_adapter, webgpu_device};

#[cfg(feature = "threads")]
pub use wasm_bindgen_rayon::init_thread_pool;

/// Which backend a tab may use: `"auto"` (WebGPU when the browser offers it, else
/// the CPU), `"cpu"` (the pure-Rust CPU backend even where WebGPU exists), or
/// `"faulty-webgpu"` (as `"auto"`, with a WebGPU made wrong on purpose: its
/// gradients come out zero, so the aggregator's device check refuses it; for
/// seeing that check at work, and for its end-to-end test).
struct BackendChoice {
    gpu: bool,
    faulty_gpu: bool,
}

fn backend_choice(backend: &str) -> Result<BackendChoice, JsValue> {
    let (gpu, faulty_gpu) = match backend {
        "auto" => (true, false),
        "cpu" => (false, false),
        "faulty-webgpu" => (true, true),
        other => {
            return Err(JsValue::from_str(&format!(
                "unknown backend {other:?}: use \"auto\", \"cpu\" or \"faulty-webgpu\""
            )));
        }
    };
    Ok(BackendChoice { gpu, faulty_gpu })
}

/// The device this tab computes on: WebGPU when allowed and offered, else the
/// pure-Rust CPU backend. Returns the device, its backend name and the adapter.
#[cfg(feature = "webgpu")]
pub async fn pick_device(gpu: bool) -> (Device, &'static str, Option<String>) {
    if gpu && let Ok(device) = webgpu_device().await {
        return (device, "webgpu", webgpu_adapter().await);
    }
    (Device::flex(), "flex", None)
}

/// The device of the threaded build: the CPU backend on the page's rayon pool
/// (started by `initThreadPool`), its size in place of an adapter.
#[cfg(not(feature = "webgpu"))]
pub async fn pick_device(_gpu: bool) -> (Device, &'static str, Option<String>) {
    #[cfg(feature = "threads")]
    let pool = Some(format!("{} threads", rayon::current_num_threads()));
    #[cfg(not(feature = "threads"))]
    let pool = None;
    (Device::flex(), "flex", pool)
}

fn object(fields: &[(&str, JsValue)]) -> JsValue {
    let object = Object::new();
    for (key, value) in fields {
        let _ = Reflect::set(&object, &(*key).into(), value);
    }
    object.into()
}

fn event_object(event: &ClientEvent) -> JsValue {
    match event {
        ClientEvent::Welcomed {
            client_id,
            session,
            data,
            train_chars,
            held_out_chars,
        } => object(&[
            ("type", "welcome".into()),
            ("client", client_id.into()),
            ("session", session.into()),
            ("data", data.name().into()),
            ("trainChars", (*train_chars as f64).into()),
            ("heldOutChars", (*held_out_chars as f64).into()),
        ]),
        ClientEvent::State(state) => {
            let (name, round, batch, of) = match *state {
                ClientState::Waiting => ("waiting", 0, 0, 0),
                ClientState::Downloading { round } => ("downloading", round, 0, 0),
                ClientState::Training { round, batch, of } => ("training", round, batch, of),
                ClientState::Uploading { round } => ("uploading", round, 0, 0),
                ClientState::Securing { round, .. } => ("securing", round, 0, 0),
                ClientState::Checking => ("checking", 0, 0, 0),
                ClientState::Solving { bits } => ("solving", 0, 0, u64::from(bits) as usize),
                ClientState::Evaluating { round } => ("evaluating", round, 0, 0),
            };
            let step = match *state {
                ClientState::Securing { step, .. } => step,
                _ => "",
            };
            object(&[
                ("type", "state".into()),
                ("state", name.into()),
                ("round", (round as f64).into()),
                ("batch", (batch as f64).into()),
                ("of", (of as f64).into()),
                ("step", step.into()),
            ])
        }
        ClientEvent::Trained(report) => object(&[
            ("type", "trained".into()),
            ("round", (report.round as f64).into()),
            ("loss", report.train_loss.into()),
            ("accuracy", report.train_accuracy.into()),
            ("seconds", report.train_seconds.into()),
            ("bytesDown", (report.bytes_down as f64).into()),
            ("bytesUp", (report.bytes_up as f64).into()),
            ("secure", report.secure.into()),
        ]),
        ClientEvent::RoundResult(result) => object(&[
            ("type", "result".into()),
            ("round", (result.round as f64).into()),
            ("evalLoss", result.eval_loss.into()),
            ("evalAccuracy", result.eval_accuracy.into()),
        ]),
        ClientEvent::ServerError(error) => object(&[
            ("type", "error".into()),
            ("code", error.code.name().into()),
            ("message", error.message.as_str().into()),
        ]),
        ClientEvent::SecureRefused { round, why } => object(&[
            ("type", "secureRefused".into()),
            ("round", (*round as f64).into()),
            ("message", why.as_str().into()),
        ]),
        ClientEvent::ModelReceived { round, model } => object(&[
            ("type", "model".into()),
            ("round", (*round as f64).into()),
            ("bytes", (model.weights.len() as f64).into()),
        ]),
        ClientEvent::Evaluated(answer) => {
            let chars = answer.chars.max(1) as f64;
            object(&[
                ("type", "evaluated".into()),
                ("round", (answer.round as f64).into()),
                ("loss", (answer.loss_sum / chars).into()),
                ("accuracy", (answer.correct as f64 / chars).into()),
                ("chars", (answer.chars as f64).into()),
            ])
        }
        ClientEvent::Solved { bits, seconds } => object(&[
            ("type", "solved".into()),
            ("bits", f64::from(*bits).into()),
            ("seconds", f64::from(*seconds).into()),
        ]),
    }
}

/// Resolves after `duration` (a timer of the page or worker).
async fn sleep(duration: Duration) {
    let promise = Promise::new(&mut |resolve, _| {
        let set_timeout = Reflect::get(&js_sys::global(), &"setTimeout".into())
            .ok()
            .and_then(|f| f.dyn_into::<Function>().ok());
        if let Some(set_timeout) = set_timeout {
            let millis = JsValue::from(duration.as_millis() as f64);
            let _ = set_timeout.call2(&JsValue::NULL, &resolve, &millis);
        }
    });
    let _ = JsFuture::from(promise).await;
}

/// Runs this tab as one device against the aggregator at `urls[0]`, reconnecting
/// with backoff when it goes away (to the next of `urls`, a cluster's other
/// edges, whenever connecting fails), until it refuses us for good. `client` asks for a
/// Shakespeare client; `resume` is the session of an earlier welcome (a reloaded
/// tab rejoins as the same client); `held_encoding` and `held_weights` are a
/// global model kept by `keep_model` (offered back, so that it is not sent
/// again); `text` is this tab's own text, where the aggregator's devices bring
/// theirs (it never leaves the tab); `backend` is `"auto"`, `"cpu"` or `"faulty-webgpu"`; `keep_model({round, encoding,
/// weights})` stores a round's model and returns a promise, awaited before the
/// round's training. `on_event` gets plain
/// objects (`{type: "backend" | "welcome" | "state" | "trained" | "result" |
/// "error" | "model" | "reconnecting", ...}`).
#[wasm_bindgen(js_name = runDevice)]
#[allow(clippy::too_many_arguments)] // called from the worker's JavaScript, positionally
pub async fn run_device(
    urls: Vec<String>,
    client: Option<String>,
    resume: Option<String>,
    held_encoding: Option<u8>,
    held_weights: Option<Vec<u8>>,
    text: Option<String>,
    backend: String,
    keep_model: Option<Function>,
    on_event: Function,
) -> Result<(), JsValue> {
    let choice = backend_choice(&backend)?;
    let (device, backend, adapter) = pick_device(choice.gpu).await;
    let emit = |value: JsValue| {
        let _ = on_event.call1(&JsValue::NULL, &value);
    };
    emit(object(&[
        ("type", "backend".into()),
        ("backend", backend.into()),
        (
            "adapter",
            adapter.clone().map_or(JsValue::NULL, JsValue::from),
        ),
    ]));
    let mut options = ClientOptions::native();
    options.join.kind = ClientKind::Browser;
    options.join.backend = backend.into();
    options.join.adapter = adapter;
    if choice.faulty_gpu && backend == "webgpu" {
        options.gradient_fault = Some(0.0);
    }
    options.join.client = client;
    options.join.resume = resume;
    options.text = text.filter(|text| !text.trim().is_empty());
    options.held = held_encoding
        .and_then(Encoding::from_tag)
        .zip(held_weights)
        .map(|(encoding, weights)| HeldModel::new(encoding, weights));
    if urls.is_empty() {
        return Err(JsValue::from_str("no aggregator to connect to"));
    }
    let servers = folio_client::Failover::new(urls);
    folio_client::run_reconnecting(
        |resume| {
            let (url, keep, servers) = (servers.url(), keep_model.clone(), &servers);
            async move {
                let connected = BrowserTransport::connect(&url, resume.as_deref(), keep).await;
                if connected.is_err() {
                    servers.failed();
                }
                connected
            }
        },
        sleep,
        &device,
        &options,
        |event| emit(event_object(&event)),
        |err: &ClientError, wait| {
            emit(object(&[
                ("type", "reconnecting".into()),
                ("message", err.to_string().into()),
                ("seconds", wait.as_secs_f64().into()),
            ]))
        },
    )
    .await
    .map(|_| ())
    .map_err(js_error)
}

/// Generates `length` chars after `prompt` from a checkpoint (safetensors bytes, as
/// `GET /api/model` or `models/dickens-seed.safetensors` serve them), on this tab's
/// device (`backend` as in [`run_device`]), calling `on_char` with each char as it is
/// sampled. Returns the text.
#[wasm_bindgen(js_name = generateText)]
pub async fn generate_text(
    checkpoint: Vec<u8>,
    prompt: String,
    length: usize,
    temperature: f64,
    seed: u64,
    backend: String,
    on_char: Function,
) -> Result<String, JsValue> {
    let saved = folio_model::checkpoint::decode(&checkpoint, None).map_err(js_error)?;
    let (device, _, _) = pick_device(backend_choice(&backend)?.gpu).await;
    let model =
        folio_model::CharRnn::from_flat(saved.config, &saved.weights, &device).map_err(js_error)?;
    let config = folio_model::generate::GenerateConfig {
        length,
        temperature,
        top_k: None,
        seed,
    };
    folio_model::generate::generate(&model, &prompt, &config, |c| {
        let _ = on_char.call1(&JsValue::NULL, &JsValue::from_str(&c.to_string()));
    })
    .await
    .map_err(js_error)
}

/// Fine-tunes a checkpoint (safetensors bytes) on the training part of `text`
/// (this tab's own; the last fifth held out, as in federated rounds) on this
/// tab's device, for this tab only: personalization, nothing sent. Returns
/// `{checkpoint, before, after, chars}`: the fine-tuned model (f16 safetensors)
/// and both models' `{loss, accuracy}` on the held-out fifth.
#[wasm_bindgen(js_name = personalizeModel)]
pub async fn personalize_model(
    checkpoint: Vec<u8>,
    text: String,
    epochs: u32,
    learning_rate: f32,
    backend: String,
) -> Result<JsValue, JsValue> {
    use folio_client::personalize::{Personalization, fine_tune};
    let saved = folio_model::checkpoint::decode(&checkpoint, None).map_err(js_error)?;
    let text = folio_data::device::DeviceText::split(&text);
    let (train, _) = folio_data::vocab::encode(&text.train);
    let (held_out, _) = folio_data::vocab::encode(&text.held_out);
    let (device, _, _) = pick_device(backend_choice(&backend)?.gpu).await;
    let settings = Personalization {
        epochs,
        max_batches: Some(20),
        learning_rate,
        seed: 0,
    };
    let tuned = fine_tune(&device, saved.config, &saved.weights, &train, settings)
        .await
        .map_err(js_error)?;
    let measure = folio_client::evaluate::held_out_figures;
    let before = measure(&device, saved.config, &saved.weights, &held_out, u64::MAX)
        .await
        .map_err(js_error)?;
    let after = measure(&device, saved.config, &tuned, &held_out, u64::MAX)
        .await
        .map_err(js_error)?;
    let figures = |e: &folio_client::evaluate::HeldOut| {
        let chars = e.chars.max(1.0);
        object(&[
            ("loss", (e.loss_sum / chars).into()),
            ("accuracy", (e.correct / chars).into()),
        ])
    };
    let metadata = std::collections::BTreeMap::from([(
        "personalized".to_owned(),
        format!("{epochs} epochs at {learning_rate}"),
    )]);
    let bytes = folio_model::checkpoint::encode(
        saved.config,
        &tuned,
        folio_model::checkpoint::Precision::F16,
        &metadata,
    )
    .map_err(js_error)?;
    Ok(object(&[
        (
            "checkpoint",
            js_sys::Uint8Array::from(bytes.as_slice()).into(),
        ),
        ("before", figures(&before)),
        ("after", figures(&after)),
        ("chars", after.chars.into()),
    ]))
}

/// Training chars/s of a `preset` ("small" or "seed") model on this tab's
/// `backend` ("auto": WebGPU, "cpu"), B × T = `batch_size` × `seq_len`, over `steps`
/// timed steps: the same measurement as `folio bench train`.
#[wasm_bindgen(js_name = benchTrain)]
pub async fn bench_train(
    preset: String,
    backend: String,
    batch_size: usize,
    seq_len: usize,
    steps: usize,
) -> Result<f64, JsValue> {
    let preset: folio_model::Preset = preset.parse().map_err(|e: String| JsValue::from(e))?;
    let gpu = backend_choice(&backend)?.gpu;
    let (device, name, _) = pick_device(gpu).await;
    if gpu && name != "webgpu" {
        return Err(JsValue::from_str("this browser offers no WebGPU adapter"));
    }
    folio_client::bench::train_chars_per_second(
        preset.config(),
        &device.autodiff(),
        batch_size,
        seq_len,
        steps,
    )
    .await
    .map_err(js_error)
}

fn js_error(error: impl std::fmt::Display) -> JsValue {
    JsValue::from_str(&error.to_string())
}
