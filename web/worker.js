import { ownText, store } from "./store.js";

// One job for the page, off its main thread (so a tab on the CPU fallback never
// freezes): {job: "device"} runs the tab as a federated device until the aggregator
// closes; {job: "generate"} samples text. Posts plain event objects back.

// The device code: the main build (WebGPU, and the CPU fallback on this one
// thread), or where this tab trains on the CPU and the page is cross-origin
// isolated (so workers may share memory), the threaded build in pkg/threads/,
// its rayon pool one worker per core. `threads: "off"` keeps the main build.
let deviceCode;
async function loadDeviceCode({ backend, threads }) {
  const gpu = backend !== "cpu" && (await navigator.gpu?.requestAdapter().catch(() => null));
  if (!gpu && threads !== "off" && self.crossOriginIsolated) {
    try {
      const code = await import("../pkg/threads/folio_web.js");
      await code.default();
      await code.initThreadPool(navigator.hardwareConcurrency || 1);
      return code;
    } catch (err) {
      postMessage({ type: "notice", message: `no threaded CPU build (${err}); training on one thread` });
    }
  }
  const code = await import("../pkg/folio_web.js");
  await code.default();
  return code;
}
// A panic in the device code, in words (the wasm calls this before it traps).
globalThis.folioPanic = (message) => postMessage({ type: "failed", message });

// The last global model this origin's tabs received, kept in IndexedDB: a
// reloaded tab offers it when it rejoins and is not sent it again.
const heldModel = () => store("models", "readonly", (models) => models.get("global")).catch(() => undefined);
const keepModel = ({ round, encoding, weights }) =>
  store("models", "readwrite", (models) => models.put({ round, encoding, weights }, "global")).catch(() => undefined);

// `text`: this device's own text, where the aggregator's devices bring theirs.
async function device({ urls, client, resume, text, backend }) {
  const held = await heldModel();
  if (held) postMessage({ type: "held", round: held.round, bytes: held.weights.length });
  await deviceCode.runDevice(urls, client, resume, held?.encoding, held?.weights, text, backend, keepModel, postMessage);
  postMessage({ type: "closed" });
}

// The first of `models` that answers (the aggregator's, then a shipped file; or
// a model kept in this browser, `idb`).
async function checkpoint(models) {
  for (const { url, idb, source } of models) {
    try {
      if (idb) {
        const kept = await store("models", "readonly", (m) => m.get(idb));
        if (kept) return { bytes: kept, source };
        continue;
      }
      const response = await fetch(url);
      if (response.ok) return { bytes: new Uint8Array(await response.arrayBuffer()), source };
    } catch (_) { /* try the next one */ }
  }
  throw new Error(`no model to generate from: none of ${models.map((m) => m.url ?? `this browser's ${m.idb} model`).join(", ")} answered`);
}

async function generate({ models, prompt, length, temperature, seed, backend }) {
  const { bytes, source } = await checkpoint(models);
  postMessage({ type: "source", source });
  const text = await deviceCode.generateText(bytes, prompt, length, temperature, seed, backend, (c) => postMessage({ type: "char", c }));
  postMessage({ type: "generated", text });
}

// Personalization: the current global model fine-tuned on this device's own
// text, here, and kept in this browser ("mine"); nothing is sent.
async function personalize({ url, backend, epochs, lr }) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`no global model to fine-tune (${url}: ${response.status})`);
  const global = new Uint8Array(await response.arrayBuffer());
  const text = await ownText();
  if (!text.trim()) throw new Error("there is no text of yours to fine-tune on");
  const tuned = await deviceCode.personalizeModel(global, text, epochs, lr, backend);
  await store("models", "readwrite", (models) => models.put(tuned.checkpoint, "mine"));
  postMessage({ type: "personalized", before: tuned.before, after: tuned.after, chars: tuned.chars });
}

const jobs = { device, generate, personalize };
onmessage = async ({ data }) => {
  try {
    deviceCode ??= await loadDeviceCode(data);
    await jobs[data.job](data);
  } catch (err) {
    postMessage({ type: "failed", message: String(err) });
  }
};
