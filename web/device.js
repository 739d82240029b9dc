// Runs this tab as one federated device (the Rust client loop compiled to wasm) and
// its text generator, each in a Web Worker (web/worker.js): the page stays responsive.
// Where the aggregator's devices bring their own text, the text form keeps this
// tab's in its own storage (web/store.js) and hands it to the device code only.
// `?client=ID` asks for a Shakespeare client; `?backend=cpu` skips WebGPU;
// `?backend=faulty-webgpu` makes this tab's WebGPU wrong on purpose (zero
// gradients), to see the aggregator's device check refuse it;
// `?threads=off` keeps the CPU fallback on one thread;
// `?device=off` only shows the aggregator's status and the generator.
import { deleteText, keepText, ownText } from "./store.js";

const params = new URLSearchParams(location.search);
const backend = params.get("backend") ?? "auto";
const threads = params.get("threads") ?? "auto";
const worker = () => new Worker(new URL("worker.js", import.meta.url), { type: "module" });

// Plain HTTP off localhost is no secure context: browsers withhold WebGPU,
// cross-origin isolation (so the threaded CPU build) and Web Crypto. Say so.
if (!window.isSecureContext) {
  const lost = document.getElementById("insecure-context");
  lost.textContent = `This page came over plain HTTP from ${location.host}, which browsers trust only at localhost, ` +
    "so they withhold WebGPU, the threaded CPU build (cross-origin isolation) and Web Crypto: this tab trains on one CPU thread. " +
    "For all of them, open the page over HTTPS: whoever runs the server can serve it with folio serve --acme-domain NAME (or --tls-cert … --tls-key …) " +
    "or behind a proxy that speaks HTTPS (docs/deploy.md).";
  lost.hidden = false;
}

const status = document.getElementById("device-status");
// This tab's rounds, the latest first.
const trained = [];
const training = document.getElementById("device-progress");
const notices = document.getElementById("device-notices");
const device = { backend: "?", client: "?", round: "-", state: "loading the model code" };
const show = () => {
  const adapter = device.adapter ? ` (${device.adapter})` : "";
  status.textContent = `${device.client} on ${device.backend}${adapter} · round ${device.round} · ${device.state}`;
  document.body.dataset.deviceState = device.state;
};

// What the aggregator's refusals mean for this tab, in words.
const explanations = {
  round_closed: "Our update arrived after its round had closed, so it was not counted.",
  wrong_round: "Our update was for a round that is not open.",
  not_selected: "Our update was for a round this tab was not picked for.",
  duplicate_update: "This tab sent the same round's update twice; the second was ignored.",
  bad_delta: "The aggregator refused our update as malformed or too large.",
  bad_examples: "The aggregator refused our update: it claimed more training text than this tab has.",
  wrong_encoding: "The aggregator refused our update: it was not in the round's encoding.",
  protocol_version: "This page is older than the aggregator: reload it.",
  session_in_use: "This session is open in another tab.",
  no_free_client: "Every Shakespeare character is taken (or the one asked for is).",
  server_full: "The aggregator is full.",
  timeout: "The aggregator closed the connection after a silence.",
  bad_secure_step: "The aggregator refused a step of a secure round (late, or from an attempt it abandoned).",
  stale: "The global model moved on too far while this tab trained; it trains the latest model next.",
  device_check_failed: "This tab's answer to the aggregator's known-answer probe was wrong: its arithmetic cannot be trusted, so it is not selected.",
};
// `kind` names notices that a later event makes stale (a lost connection, once
// the tab is back).
function notify(text, kind = "") {
  const item = Object.assign(document.createElement("li"), { textContent: `${new Date().toLocaleTimeString()}: ${text}` });
  item.dataset.kind = kind;
  notices.prepend(item);
  while (notices.children.length > 5) notices.lastChild.remove();
}
// Removes the notices of `kind`; says how many there were.
function forget(kind) {
  const stale = notices.querySelectorAll(`li[data-kind="${kind}"]`);
  stale.forEach((item) => item.remove());
  return stale.length;
}

function onDeviceEvent(event) {
  switch (event.type) {
    case "backend": Object.assign(device, { backend: event.backend, adapter: event.adapter, state: "joining" }); break;
    case "welcome":
      device.client = event.client;
      if (event.data === "device") {
        document.getElementById("text-note").textContent =
          `Training on ${event.trainChars.toLocaleString()} characters of your text; ${event.heldOutChars.toLocaleString()} held out for measuring models.`;
      }
      // Back with the aggregator: the notices of losing it no longer hold.
      if (forget("lost")) notify("Back with the aggregator after losing it; this tab trains on.");
      // A reload of this tab rejoins as the same client.
      sessionStorage.setItem("folio-session", event.session);
      break;
    case "state":
      if (event.round) device.round = event.round;
      device.state = event.state === "training" ? `training batch ${event.batch} of ${event.of}`
        : event.state === "securing" ? `secure aggregation: ${event.step}`
        : event.state === "checking" ? "answering the aggregator's device check"
        : event.state === "solving" ? `proving work for a new session (${event.of} bits)`
        : event.state === "evaluating" ? "measuring a model on the text this tab holds out" : event.state;
      if (event.state === "training") Object.assign(training, { max: event.of, value: event.batch });
      // Milliseconds from opening the page to its first trained batch (benches read it).
      if (event.state === "training" && !document.body.dataset.firstBatchMs) {
        document.body.dataset.firstBatchMs = Math.round(performance.now());
      }
      else if (event.state === "waiting") training.value = 0;
      break;
    case "held":
      device.held = event;
      notify(`Kept from before: round ${event.round}'s global model (${event.bytes} bytes); offered to the aggregator, so it is not sent again.`);
      break;
    case "model": device.held = event; break;
    case "reconnecting":
      device.state = `the aggregator went away; reconnecting in ${event.seconds.toFixed(1)} s`;
      notify(`Lost the aggregator (${event.message}); trying again in ${event.seconds.toFixed(1)} s.`, "lost");
      break;
    case "trained": {
      // A round run again (its first attempt failed) replaces its earlier row.
      const earlier = trained.findIndex((row) => row[0] === event.round);
      if (earlier >= 0) trained.splice(earlier, 1);
      trained.unshift([event.round, event.loss.toFixed(4), event.accuracy.toFixed(4), event.seconds.toFixed(1),
        formatBytes(event.bytesDown), formatBytes(event.bytesUp), event.secure ? "masked" : "plain"]);
      fillTable("device-rounds", trained.slice(0, 30));
      break;
    }
    case "evaluated":
      trained.unshift([event.round, event.loss.toFixed(4), event.accuracy.toFixed(4), "-", "-", "-",
        `measured on ${event.chars} held-out chars`]);
      fillTable("device-rounds", trained.slice(0, 30));
      notify(`Measured round ${event.round}'s model on this tab's held-out text: loss ${event.loss.toFixed(4)}, accuracy ${event.accuracy.toFixed(4)} over ${event.chars} characters. Only these sums went up.`);
      break;
    case "solved":
      // The cost of joining a busy aggregator (tests read it).
      document.body.dataset.joinWorkSeconds = event.seconds;
      notify(`The aggregator is busy: joining cost this tab ${event.bits} bits of work, ${event.seconds.toFixed(2)} s.`);
      break;
    case "error":
      notify(`${explanations[event.code] ?? "The aggregator refused a message."} (${event.code}: ${event.message})`);
      if (event.code === "device_check_failed") distrusted(event.message);
      break;
    case "notice": notify(event.message); break;
    case "secureRefused": notify(`This tab left secure round ${event.round}: ${event.message}. It joins the next round.`); break;
    case "closed": device.state = "done: the aggregator closed"; break;
    case "failed":
      device.state = `stopped: ${event.message}`;
      notify(`This tab stopped training: ${event.message}. Reload the page to start again.`);
      break;
  }
  show();
}

// The device code (pkg/: the Rust client compiled to wasm) may still be building
// while the aggregator already serves (scripts/run.sh builds it behind the server
// and keeps pkg/build.json current). Resolves once pkg/ holds a built page.
async function deviceCodeBuilt() {
  const build = document.getElementById("build");
  const bar = document.getElementById("build-progress");
  const said = document.getElementById("build-status");
  const fetched = (url, init) => fetch(url, { cache: "no-store", ...init }).catch(() => null);
  for (;;) {
    const response = await fetched("pkg/build.json");
    const state = response?.ok ? await response.json().catch(() => null) : null;
    if (state?.state !== "building" && state?.state !== "failed" && (await fetched("pkg/folio_web.js", { method: "HEAD" }))?.ok) {
      build.hidden = true;
      return;
    }
    device.state = "waiting for the device code";
    show();
    build.hidden = false;
    if (state?.state === "building") {
      const crates = state.total > 0 ? `: ${state.done} of ${state.total} crates${state.crates ? ` (now ${state.crates})` : ""}` : "";
      said.textContent = `The device code (Rust compiled to wasm) is being built on the server, step “${state.step}”${crates}, ${Math.round(state.seconds / 60)} min since scripts/run.sh started. This tab joins by itself when it is ready.`;
      if (state.total > 0) Object.assign(bar, { max: state.total, value: state.done });
      else bar.removeAttribute("value");
    } else {
      said.textContent = state?.state === "failed"
        ? `The device code could not be built: ${state.message}`
        : "The device code is not built: run scripts/run.sh (or scripts/setup.sh page) on the server. This tab joins by itself when it is ready.";
      bar.removeAttribute("value");
    }
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
}

// This aggregator first; in a cluster, the other edges it knows of, for the
// device to fail over to.
async function aggregators() {
  const own = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;
  const answer = await fetch("api/status").then((r) => r.json()).catch(() => ({}));
  return [own, ...(answer.edges ?? []).filter((url) => url !== own)];
}

let trainer;
let backendInUse = backend;
// Set once the device code is built and the device first started.
let deviceReady = false;
async function startDevice(on = backend) {
  backendInUse = on;
  const urls = await aggregators();
  const text = dataSource === "device" ? await ownText() : null;
  if (dataSource === "device" && !text.trim()) {
    device.state = "waiting for your text: add some below to train on it";
    show();
    return;
  }
  trainer = worker();
  trainer.onmessage = ({ data }) => onDeviceEvent(data);
  trainer.onerror = (err) => onDeviceEvent({ type: "failed", message: err.message });
  trainer.postMessage({
    job: "device",
    urls,
    client: params.get("client"),
    resume: sessionStorage.getItem("folio-session"),
    text,
    backend: on,
    threads,
  });
}

// Where devices bring their own text: what this tab trains on, typed, pasted or
// from files, kept in this browser only; deleting it stops the device.
function stopDevice() {
  trainer?.terminate();
  trainer = null;
  sessionStorage.removeItem("folio-session");
}
async function textForm() {
  const form = document.getElementById("text-form");
  const area = document.getElementById("own-text");
  const note = document.getElementById("text-note");
  area.value = await ownText().catch(() => "");
  const append = async (files) => {
    const parts = await Promise.all([...files].map((file) => file.text()));
    area.value = [area.value, ...parts].filter((part) => part.length).join("\n");
    note.textContent = `Added ${files.length} file(s); keep the text to train on it.`;
  };
  document.getElementById("text-files").addEventListener("change", (event) => append(event.target.files));
  area.addEventListener("dragover", (event) => event.preventDefault());
  area.addEventListener("drop", (event) => {
    event.preventDefault();
    append(event.dataTransfer.files);
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!area.value.trim()) {
      note.textContent = "There is no text to keep: type, paste or add some first.";
      return;
    }
    await keepText(area.value);
    note.textContent = `Kept ${area.value.length.toLocaleString()} characters in this browser; training on them.`;
    stopDevice();
    // Before the device code is loaded, the device starts with it, on the text kept.
    if (deviceReady) startDevice(backendInUse);
  });
  document.getElementById("text-personalize").addEventListener("click", () => {
    note.textContent = "Fine-tuning the current global model on your text, in this tab…";
    const tuner = worker();
    tuner.onmessage = ({ data }) => {
      if (data.type === "personalized") {
        const { before, after } = data;
        note.textContent = `My model, on your held-out text (${data.chars.toLocaleString()} characters): loss ${before.loss.toFixed(4)} ` +
          `with the global model, ${after.loss.toFixed(4)} fine-tuned; accuracy ${before.accuracy.toFixed(4)}, ${after.accuracy.toFixed(4)}. ` +
          "It stays in this browser: pick “my model” in the generator.";
        document.body.dataset.personalizedLoss = `${before.loss} ${after.loss}`;
        document.body.dataset.personalized = "yes";
      } else if (data.type === "failed") note.textContent = `Fine-tuning failed: ${data.message}`;
      if (data.type === "personalized" || data.type === "failed") tuner.terminate();
    };
    tuner.postMessage({ job: "personalize", url: new URL("api/model", location.href).href, backend: backendInUse, threads, ...PERSONALIZATION });
  });
  document.getElementById("text-delete").addEventListener("click", async () => {
    await deleteText();
    stopDevice();
    area.value = "";
    note.textContent = "Your text is deleted from this browser; this tab no longer trains.";
    device.state = "stopped: no text to train on";
    show();
  });
  // Shown once it works: a text kept before then would be lost.
  form.hidden = false;
}

// Where this federation's devices get their text, as the aggregator says.
let dataSource = "shakespeare";
async function showDataSource() {
  const status = await fetch("api/status").then((r) => r.json()).catch(() => null);
  dataSource = status?.config?.data ?? "shakespeare";
  document.body.dataset.dataSource = dataSource;
  document.getElementById("data-mode").textContent = dataSource === "device"
    ? "This federation trains on text each device keeps: this tab trains on yours, and the aggregator never sees a character of it."
    : "The Shakespeare simulation: this tab trains as a Shakespeare character, whose lines the aggregator hands it.";
  if (dataSource === "device") {
    document.getElementById("character-form").hidden = true;
    await textForm();
  }
}

// The aggregator found this tab's arithmetic wrong. On WebGPU, the CPU fallback
// may be right: the device starts again on it, as the same session (checked again
// on its new backend). On the CPU there is nothing left to try.
function distrusted(why) {
  if (device.backend !== "webgpu") {
    device.state = "not trusted: its answer to the device check was wrong";
    return;
  }
  notify(`This tab's WebGPU failed the aggregator's device check (${why}); it trains on the CPU fallback instead.`);
  device.state = "retrying on the CPU fallback";
  trainer.terminate();
  startDevice("cpu");
}

const deviceOn = params.get("device") !== "off";
if (!deviceOn) document.getElementById("device").hidden = true;

// The generator: two models continue the same prompt with the same random draws,
// side by side, one after the other in one worker (kept for the next click). Each
// choice lists where to get it: an aggregator's model first, else (a static copy
// of the page) the shipped file.
const dickens = { url: "models/dickens-medium.safetensors", source: "the shipped Dickens model" };
const federated = { url: "models/shakespeare-medium.safetensors", source: "the shipped federated model" };
const choices = {
  start: { label: "where the federation started", models: [{ url: "api/model/start", source: "the federation's starting model" }, dickens] },
  current: { label: "the current global model", models: [{ url: "api/model", source: "the current global model" }, federated] },
  dickens: { label: "the shipped Dickens model", models: [dickens] },
  federated: { label: "the shipped federated Shakespeare model", models: [federated] },
  mine: { label: "my model (fine-tuned on this device's text)", models: [{ idb: "mine", source: "my model, fine-tuned in this browser" }] },
};
// How a device fine-tunes its model (chosen on the validation split: docs/own-text.md).
const PERSONALIZATION = { epochs: 1, lr: 0.02 };
const button = document.getElementById("gen-button");
const panes = [
  { choice: "start", select: "gen-start-model", output: "gen-start-output", source: "gen-start-source" },
  { choice: "current", select: "gen-model", output: "gen-output", source: "gen-source" },
].map(({ choice, select, output, source }) => {
  const picker = document.getElementById(select);
  picker.append(...Object.entries(choices).map(([value, { label }]) => new Option(label, value, false, value === choice)));
  return { picker, output: document.getElementById(output), source: document.getElementById(source) };
});
let generator = null;

// Streams one pane's text; resolves to whether it finished.
function generateInto(pane, job) {
  pane.output.textContent = job.prompt;
  pane.source.textContent = "(loading the model…)";
  return new Promise((resolve) => {
    generator.onmessage = ({ data }) => {
      switch (data.type) {
        case "source": pane.source.textContent = `(from ${data.source})`; break;
        case "char": pane.output.textContent += data.c; break;
        case "generated": resolve(true); break;
        case "failed": pane.output.textContent = `generation failed: ${data.message}`; resolve(false); break;
      }
    };
    const models = choices[pane.picker.value].models.map(({ url, idb, source }) => ({ url: url && new URL(url, location.href).href, idb, source }));
    generator.postMessage({ ...job, models });
  });
}

document.getElementById("gen-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  generator ??= worker();
  button.disabled = true;
  delete document.body.dataset.generated;
  const job = {
    job: "generate",
    prompt: document.getElementById("gen-prompt").value,
    length: Number(document.getElementById("gen-length").value),
    temperature: Number(document.getElementById("gen-temperature").value),
    seed: BigInt(Date.now()),
    backend,
    threads,
  };
  let finished = true;
  for (const pane of panes) finished = (await generateInto(pane, job)) && finished;
  document.body.dataset.generated = finished ? "yes" : "failed";
  button.disabled = false;
});

// The character picker: the aggregator's Shakespeare clients, searchable as you
// type. Switching starts a new session as that character.
async function characterPicker() {
  const form = document.getElementById("character-form");
  const input = document.getElementById("character");
  const note = document.getElementById("character-note");
  const response = await fetch("api/characters").catch(() => null);
  const characters = new Map(response?.ok ? await response.json() : []);
  if (characters.size === 0) {
    form.hidden = true;
    return;
  }
  document.getElementById("characters").append(
    ...[...characters].map(([id, chars]) => new Option(`${chars.toLocaleString()} chars of lines`, id)),
  );
  input.placeholder = `search ${characters.size.toLocaleString()} Shakespeare characters`;
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const wanted = input.value.trim().toUpperCase().replaceAll(" ", "_");
    if (!characters.has(wanted)) {
      note.textContent = `“${input.value}” is not one of the characters: pick one from the list.`;
      return;
    }
    sessionStorage.removeItem("folio-session");
    params.set("client", wanted);
    location.search = params.toString();
  });
}
if (deviceOn) characterPicker();

// The longest the main thread went without running a timer, for tests and the curious.
let lastTick = performance.now();
let longestStall = 0;
setInterval(() => {
  const now = performance.now();
  longestStall = Math.max(longestStall, now - lastTick - 100);
  lastTick = now;
  document.body.dataset.longestStallMs = Math.round(longestStall);
}, 100);

const dataSourceShown = deviceOn ? showDataSource() : Promise.resolve();
deviceCodeBuilt().then(async () => {
  device.state = "loading the device code";
  show();
  await dataSourceShown;
  deviceReady = true;
  if (deviceOn) startDevice();
  button.disabled = false;
});
