// Runs this tab as one federated device (the Rust client loop compiled to wasm) and
// its text generator, each in a Web Worker (web/worker.js): the page stays responsive.
// `?client=ID` asks for a Shakespeare client; `?backend=cpu` skips WebGPU;
// `?device=off` only shows the aggregator's status and the generator.
const params = new URLSearchParams(location.search);
const backend = params.get("backend") ?? "auto";
const worker = () => new Worker(new URL("worker.js", import.meta.url), { type: "module" });

const status = document.getElementById("device-status");
const rounds = document.querySelector("#device-rounds tbody");
const device = { backend: "?", client: "?", round: "-", state: "loading the model code" };
const show = () => {
  const adapter = device.adapter ? ` (${device.adapter})` : "";
  status.textContent = `${device.client} on ${device.backend}${adapter} · round ${device.round} · ${device.state}`;
  document.body.dataset.deviceState = device.state;
};

function onDeviceEvent(event) {
  switch (event.type) {
    case "backend": Object.assign(device, { backend: event.backend, adapter: event.adapter, state: "joining" }); break;
    case "welcome":
      device.client = event.client;
      // A reload of this tab rejoins as the same client.
      sessionStorage.setItem("folio-session", event.session);
      break;
    case "state":
      if (event.round) device.round = event.round;
      device.state = event.state === "training" ? `training batch ${event.batch} of ${event.of}` : event.state;
      break;
    case "trained": {
      const tr = document.createElement("tr");
      for (const v of [event.round, event.loss.toFixed(4), event.accuracy.toFixed(4), event.seconds.toFixed(1), event.bytesDown, event.bytesUp]) {
        tr.append(Object.assign(document.createElement("td"), { textContent: v }));
      }
      rounds.prepend(tr);
      break;
    }
    case "error": console.warn(`server: ${event.message} (${event.code})`); break;
    case "closed": device.state = "done: the aggregator closed"; break;
    case "failed": device.state = `stopped: ${event.message}`; break;
  }
  show();
}

if (params.get("device") !== "off") {
  const trainer = worker();
  trainer.onmessage = ({ data }) => onDeviceEvent(data);
  trainer.onerror = (err) => onDeviceEvent({ type: "failed", message: err.message });
  trainer.postMessage({
    job: "device",
    url: `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`,
    client: params.get("client"),
    resume: sessionStorage.getItem("folio-session"),
    backend,
  });
} else {
  document.getElementById("device").hidden = true;
}

// The generator: one worker, kept for the next click.
const button = document.getElementById("gen-button");
const output = document.getElementById("gen-output");
const source = document.getElementById("gen-source");
let generator = null;
button.disabled = false;
button.addEventListener("click", () => {
  generator ??= worker();
  button.disabled = true;
  const prompt = document.getElementById("gen-prompt").value;
  output.textContent = prompt;
  source.textContent = "loading the model…";
  generator.onmessage = ({ data }) => {
    switch (data.type) {
      case "source": source.textContent = `from ${data.source}`; break;
      case "char": output.textContent += data.c; break;
      case "generated": document.body.dataset.generated = "yes"; button.disabled = false; break;
      case "failed": output.textContent = `generation failed: ${data.message}`; button.disabled = false; break;
    }
  };
  generator.postMessage({
    job: "generate",
    models: [
      { url: new URL("api/model", location.href).href, source: "the current global model" },
      { url: new URL("models/dickens-seed.safetensors", location.href).href, source: "the shipped model" },
    ],
    prompt,
    length: Number(document.getElementById("gen-length").value),
    temperature: Number(document.getElementById("gen-temperature").value),
    seed: BigInt(Date.now()),
    backend,
  });
});

// The longest the main thread went without running a timer, for tests and the curious.
let lastTick = performance.now();
let longestStall = 0;
setInterval(() => {
  const now = performance.now();
  longestStall = Math.max(longestStall, now - lastTick - 100);
  lastTick = now;
  document.body.dataset.longestStallMs = Math.round(longestStall);
}, 100);
