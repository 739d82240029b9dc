// One job for the page, off its main thread (so a tab on the CPU fallback never
// freezes): {job: "device"} runs the tab as a federated device until the aggregator
// closes; {job: "generate"} samples text. Posts plain event objects back.
import init, { generateText, runDevice } from "../pkg/folio_web.js";

const ready = init();

async function device({ url, client, resume, backend }) {
  await runDevice(url, client, resume, backend, (event) => postMessage(event));
  postMessage({ type: "closed" });
}

// The first of `models` that answers (the aggregator's, then a shipped file).
async function checkpoint(models) {
  for (const { url, source } of models) {
    try {
      const response = await fetch(url);
      if (response.ok) return { bytes: new Uint8Array(await response.arrayBuffer()), source };
    } catch (_) { /* try the next one */ }
  }
  throw new Error(`no model to generate from: none of ${models.map((m) => m.url).join(", ")} answered`);
}

async function generate({ models, prompt, length, temperature, seed, backend }) {
  const { bytes, source } = await checkpoint(models);
  postMessage({ type: "source", source });
  const text = await generateText(bytes, prompt, length, temperature, seed, backend, (c) => postMessage({ type: "char", c }));
  postMessage({ type: "generated", text });
}

const jobs = { device, generate };
onmessage = async ({ data }) => {
  try {
    await ready;
    await jobs[data.job](data);
  } catch (err) {
    postMessage({ type: "failed", message: String(err) });
  }
};
