// Runs this tab as one federated device (the Rust client loop compiled to wasm).
// `?client=ID` asks for a Shakespeare client; `?device=off` only shows the status.
import init, { generateText, runDevice } from "../pkg/folio_web.js";

const params = new URLSearchParams(location.search);
const status = document.getElementById("device-status");
const rounds = document.querySelector("#device-rounds tbody");
const device = { backend: "?", client: "?", state: "connecting" };
const show = () => {
  status.textContent = `${device.client} on ${device.backend}${device.adapter ? ` (${device.adapter})` : ""}: ${device.state}`;
  document.body.dataset.deviceState = device.state;
};

function onEvent(event) {
  switch (event.type) {
    case "backend": Object.assign(device, { backend: event.backend, adapter: event.adapter }); break;
    case "welcome":
      device.client = event.client;
      // A reload of this tab rejoins as the same client.
      sessionStorage.setItem("folio-session", event.session);
      break;
    case "state":
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
  }
  show();
}

// The generator runs the current global model, or the shipped one when no aggregator runs.
async function loadCheckpoint() {
  for (const [url, source] of [["api/model", "the current global model"], ["models/dickens-seed.safetensors", "the shipped model"]]) {
    try {
      const response = await fetch(url);
      if (response.ok) return [new Uint8Array(await response.arrayBuffer()), source];
    } catch (_) { /* try the next one */ }
  }
  throw new Error("no model to generate from");
}

const button = document.getElementById("gen-button");
const ready = init();
ready.then(() => { button.disabled = false; });
button.addEventListener("click", async () => {
  const output = document.getElementById("gen-output");
  button.disabled = true;
  try {
    await ready;
    const [bytes, source] = await loadCheckpoint();
    document.getElementById("gen-source").textContent = `from ${source}`;
    const prompt = document.getElementById("gen-prompt").value;
    output.textContent = prompt;
    const length = Number(document.getElementById("gen-length").value);
    const temperature = Number(document.getElementById("gen-temperature").value);
    await generateText(bytes, prompt, length, temperature, BigInt(Date.now()), (c) => { output.textContent += c; });
    document.body.dataset.generated = "yes";
  } catch (err) {
    output.textContent = `generation failed: ${err}`;
  } finally {
    button.disabled = false;
  }
});

if (params.get("device") !== "off") {
  const ws = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;
  ready
    .then(() => runDevice(ws, params.get("client"), sessionStorage.getItem("folio-session"), onEvent))
    .then(() => { device.state = "done: the aggregator closed"; show(); })
    .catch((err) => { device.state = `stopped: ${err}`; show(); });
} else {
  document.getElementById("device").hidden = true;
}
