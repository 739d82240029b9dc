// Polls the aggregator's status API and renders it; no dependencies.
"use strict";

// A figure; "-" where there is none (a server with no text to evaluate on says NaN).
const fmt = (v, digits = 4) => (v === null || v === undefined || v === "NaN" ? "-" : typeof v === "number" ? v.toFixed(digits) : v);
const bytes = (n) => (n === undefined ? "-" : n < 1e3 ? `${n} B` : n < 1e6 ? `${(n / 1e3).toFixed(1)} kB` : `${(n / 1e6).toFixed(2)} MB`);

// Rows of cells into a table's body; each cell carries its column's name, which
// narrow windows show beside the value (style.css).
function fill(id, rows) {
  const table = document.getElementById(id);
  const names = [...table.querySelectorAll("thead th")].map((th) => th.textContent);
  table.tBodies[0].replaceChildren(
    ...rows.map((cells) => {
      const tr = document.createElement("tr");
      tr.append(...cells.map((c, i) => {
        const td = Object.assign(document.createElement("td"), { textContent: c });
        td.dataset.label = names[i];
        return td;
      }));
      return tr;
    }),
  );
}
globalThis.fillTable = fill;

// Where other devices join: this page's own address, and its QR code for a
// phone's camera. Loopback names reach only this machine: say what to do instead.
(function showJoinAddress() {
  const at = document.getElementById("join-at");
  const address = `${location.origin}/`;
  const loopback = ["localhost", "127.0.0.1", "[::1]"].includes(location.hostname) || location.hostname.startsWith("127.");
  if (loopback) {
    at.textContent = `Other devices cannot open ${address}: it is this machine's own. Open this page by the server's name or network address (the server listening there, e.g. folio serve --addr 0.0.0.0:8443 with a certificate: docs/deploy.md) for the address and QR code they can use.`;
    return;
  }
  const link = Object.assign(document.createElement("a"), { href: address, textContent: address });
  at.replaceChildren("Other devices join by opening ", link, " (or scanning the code).");
  const qr = document.getElementById("join-qr");
  qr.src = `api/qr.svg?url=${encodeURIComponent(address)}`;
  qr.hidden = false;
})();
globalThis.formatBytes = bytes;

// About `count` round numbers spanning [lo, hi]: steps of 1, 2 or 5 × 10^k, at
// least `minStep`.
function ticks(lo, hi, count, minStep = 0) {
  const raw = Math.max((hi - lo) / count || 1, minStep);
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw);
  const out = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) out.push(+t.toFixed(10));
  return { values: out, digits: Math.max(0, -Math.floor(Math.log10(step))) };
}

// Eval loss (left axis) and accuracy (right axis) of the global model per round,
// with ticks on both and on the rounds. Non-finite metrics arrive as the strings
// "NaN", "inf", "-inf": not plotted.
function plot(all) {
  const history = all.filter((r) => Number.isFinite(r.eval_loss) && Number.isFinite(r.eval_accuracy));
  const canvas = document.getElementById("plot");
  const ctx = canvas.getContext("2d");
  // Drawn at the size it is shown (in CSS pixels, sharp on dense screens), so
  // that its labels stay readable in a narrow window.
  const width = canvas.clientWidth || 720;
  const height = Math.round(Math.min(300, Math.max(200, width * 0.38)));
  const scale = window.devicePixelRatio || 1;
  if (canvas.width !== Math.round(width * scale) || canvas.height !== Math.round(height * scale)) {
    Object.assign(canvas, { width: Math.round(width * scale), height: Math.round(height * scale) });
  }
  ctx.setTransform(scale, 0, 0, scale, 0, 0);
  // Margins for the tick labels, and beyond them the axes' titles.
  const box = { left: 66, right: width - 66, top: 12, bottom: height - 40 };
  ctx.clearRect(0, 0, width, height);
  ctx.font = "12px system-ui, sans-serif";
  ctx.lineWidth = 1;
  ctx.strokeStyle = "#999";
  ctx.strokeRect(box.left, box.top, box.right - box.left, box.bottom - box.top);
  if (history.length === 0) {
    ctx.fillStyle = "#555";
    ctx.fillText("no evaluated rounds yet", box.left + 12, box.top + 24);
    return;
  }
  const lastRound = Math.max(1, history[history.length - 1].round);
  const firstRound = Math.min(history[0].round, lastRound - 1);
  const losses = history.map((r) => r.eval_loss);
  const accuracies = history.map((r) => r.eval_accuracy);
  const range = (values) => {
    const [lo, hi] = [Math.min(...values), Math.max(...values)];
    const pad = (hi - lo) * 0.08 || Math.abs(hi) * 0.05 || 0.05;
    return [lo - pad, hi + pad];
  };
  const [lossLo, lossHi] = range(losses);
  const [accLo, accHi] = range(accuracies);
  const x = (round) => box.left + ((round - firstRound) / (lastRound - firstRound)) * (box.right - box.left);
  const y = (value, lo, hi) => box.bottom - ((value - lo) / (hi - lo)) * (box.bottom - box.top);

  const axis = (tickSet, place, color) => {
    ctx.fillStyle = color;
    for (const t of tickSet.values) place(t, t.toFixed(tickSet.digits));
  };
  ctx.textBaseline = "middle";
  ctx.textAlign = "right";
  axis(ticks(lossLo, lossHi, 5), (t, label) => {
    const at = y(t, lossLo, lossHi);
    ctx.strokeStyle = "#eee";
    ctx.beginPath(); ctx.moveTo(box.left, at); ctx.lineTo(box.right, at); ctx.stroke();
    ctx.fillText(label, box.left - 6, at);
  }, "#c0392b");
  ctx.textAlign = "left";
  axis(ticks(accLo, accHi, 5), (t, label) => ctx.fillText(label, box.right + 6, y(t, accLo, accHi)), "#2471a3");
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  axis(ticks(firstRound, lastRound, Math.max(2, Math.floor(width / 110)), 1), (t, label) => {
    if (!Number.isInteger(t)) return;
    ctx.strokeStyle = "#999";
    ctx.beginPath(); ctx.moveTo(x(t), box.bottom); ctx.lineTo(x(t), box.bottom + 4); ctx.stroke();
    ctx.fillText(label, x(t), box.bottom + 6);
  }, "#333");
  ctx.fillText("round", (box.left + box.right) / 2, box.bottom + 22);

  const line = (color, value, lo, hi) => {
    ctx.strokeStyle = color;
    ctx.fillStyle = color;
    ctx.lineWidth = 2;
    ctx.beginPath();
    history.forEach((r, i) => (i ? ctx.lineTo : ctx.moveTo).call(ctx, x(r.round), y(value(r), lo, hi)));
    ctx.stroke();
    for (const r of history) ctx.fillRect(x(r.round) - 2, y(value(r), lo, hi) - 2, 4, 4);
    ctx.lineWidth = 1;
  };
  line("#c0392b", (r) => r.eval_loss, lossLo, lossHi);
  line("#2471a3", (r) => r.eval_accuracy, accLo, accHi);
  ctx.save();
  ctx.textBaseline = "top";
  ctx.translate(10, (box.top + box.bottom) / 2);
  ctx.rotate(-Math.PI / 2);
  ctx.fillStyle = "#c0392b";
  ctx.fillText("eval loss", 0, -6);
  ctx.restore();
  ctx.save();
  ctx.translate(width - 10, (box.top + box.bottom) / 2);
  ctx.rotate(Math.PI / 2);
  ctx.fillStyle = "#2471a3";
  ctx.fillText("eval accuracy", 0, -6);
  ctx.restore();
}

// The open round: who was asked, who answered, the deadline counting down.
// Asynchronous rounds have none: the buffer fills as devices finish.
function roundProgress(open, phase, asynchronous) {
  const bar = document.getElementById("round-progress");
  const text = document.getElementById("round-text");
  if (asynchronous && asynchronous.buffered === undefined) {
    text.textContent = `asynchronous rounds: the model steps every ${asynchronous.buffer} updates; who trains is private · ${phase}`;
    return;
  }
  if (asynchronous) {
    const a = asynchronous;
    Object.assign(bar, { max: a.buffer, value: a.buffered });
    text.textContent = `asynchronous rounds: ${a.buffered} of ${a.buffer} updates buffered for the next step; ` +
      `${a.training.length} devices training, each on the latest model it was sent; ` +
      `updates more than ${a.max_staleness} steps behind are refused · ${phase}`;
    return;
  }
  if (!open) {
    bar.value = 0;
    text.textContent = phase === "waiting for clients" ? "no round open: waiting for enough devices" : `no round open: ${phase}`;
    return;
  }
  const secure = open.secure_step ? ` · secure aggregation, step: ${open.secure_step}` : "";
  if (open.selected === undefined) {
    // A private federation says nothing of who or how many are in the round.
    Object.assign(bar, { max: open.deadline_seconds, value: open.deadline_seconds - open.seconds_left });
    text.textContent = `round ${open.round} open; who takes part is private · deadline in ${Math.ceil(open.seconds_left)} s${secure}`;
    return;
  }
  Object.assign(bar, { max: open.selected, value: open.reported });
  const left = open.dropped_sessions.length ? `, ${open.dropped_sessions.length} left` : "";
  const attempt = open.attempt ? ` (attempt ${open.attempt + 1})` : "";
  text.textContent = `round ${open.round}${attempt}: ${open.reported} of ${open.selected} devices reported${left}; ` +
    `deadline in ${Math.ceil(open.seconds_left)} s${secure}`;
}

function thisRound(open, session, asynchronous) {
  if (asynchronous?.training === undefined && open?.selected_sessions === undefined) return "-";
  if (asynchronous) {
    const task = asynchronous.training.find(([s]) => s === session);
    return task ? `training for round ${task[1]}` : "-";
  }
  if (!open) return "-";
  if (open.reported_sessions.includes(session)) return "reported";
  if (open.dropped_sessions.includes(session)) return "left";
  if (open.selected_sessions.includes(session)) return "training";
  return "-";
}

// Where a device's check stands (its answer to the aggregator's known-answer probe).
function checkMark(check) {
  if (check === "passed") return " · checked";
  if (check === "pending") return " · being checked";
  if (check && check.failed) return " · failed its check: not selected";
  return "";
}

// Under DP-FedAvg: the privacy the committed rounds spent, and why training
// stopped if the budget did it.
function showPrivacy(status) {
  const line = document.getElementById("privacy");
  const p = status.privacy;
  line.hidden = !p;
  if (!p) return;
  const budget = p.epsilon_budget === null ? "no budget" : `budget ε ≤ ${p.epsilon_budget}`;
  const who = p.distributed ? "distributed DP: each device adds its share of the noise before masking" : "DP-FedAvg";
  line.textContent = `Differentially private (${who}): ε = ${fmt(p.epsilon, 3)} at δ = ${p.delta.toExponential(2)} ` +
    `after ${p.rounds} rounds · noise multiplier ${p.noise_multiplier}, clip bound ${p.clip_bound}, ` +
    `each of ${p.population.toLocaleString()} clients sampled with q = ${fmt(p.sampling_rate, 5)} · ${budget}` +
    (status.stopped ? ` · stopped: ${status.stopped}` : "");
}

// With secure aggregation: what the aggregator sees, and what the last round was.
function showSecure(status) {
  const line = document.getElementById("secure");
  const s = status.config.secure;
  line.hidden = !s;
  if (!s) return;
  const graph = s.degree ? `SecAgg+, ${s.degree} neighbours per device` : "SecAgg, every device masks with every other";
  const threshold = s.threshold ? `threshold ${s.threshold}` : "threshold: a majority";
  const last = history.length ? history[history.length - 1] : null;
  const latest = last && last.round > 0
    ? ` · round ${last.round} was ${last.secure ? `secure: the aggregator saw only the sum of its${last.clients === undefined ? "" : ` ${last.clients}`} devices' masked updates` : "not secure"}`
    : "";
  line.textContent = `Secure aggregation (${graph}; ${threshold}): the aggregator learns each round's sum and nothing about one device's update${latest}.`;
}

// The rounds committed so far. The status says how many there are; only the
// ones not yet here are fetched, a page at a time.
let history = [];
async function fetchHistory(status) {
  const last = history.length ? history[history.length - 1].round : -1;
  // Another run (a new state folder) or the aggregator started over.
  if (!status.latest || status.latest.round < last) history = [];
  while (history.length < status.history_len) {
    const from = history.length ? history[history.length - 1].round + 1 : 0;
    const page = await (await fetch(`api/history?from=${from}`, asked())).json();
    if (page.length === 0) break;
    history.push(...page);
  }
}

// This tab's session token (kept by device.js): a private federation's status
// then shows this device's own row, and nobody else's.
function asked() {
  const token = sessionStorage.getItem("folio-session");
  return token ? { headers: { "folio-session": token } } : {};
}

async function refresh() {
  try {
    const status = await (await fetch("api/status", asked())).json();
    await fetchHistory(status);
    const open = status.open_round;
    const evaluated = history.filter((r) => Number.isFinite(r.eval_accuracy));
    const latest = evaluated[evaluated.length - 1];
    const onDevices = history.filter((r) => r.federated).pop();
    const text = status.config.data === "device" ? "devices train on their own text, which the aggregator never sees" : "the Shakespeare simulation";
    document.getElementById("summary").textContent =
      `preset ${status.preset} (${status.parameters.toLocaleString()} parameters) · ${text} · ${status.completed_rounds} rounds done · ` +
      `${status.connected} devices connected` +
      (latest ? ` · global eval accuracy ${fmt(latest.eval_accuracy)} after round ${latest.round}` : "") +
      (onDevices ? ` · measured on ${onDevices.federated.devices} devices' held-out text: accuracy ${fmt(onDevices.federated.accuracy)} after round ${onDevices.round}` : "");
    roundProgress(open, status.phase, status.asynchronous);
    // A server with no text of its own has no eval figures: the devices' are plotted.
    plot(history.map((r) => (Number.isFinite(r.eval_loss) || !r.federated ? r
      : { ...r, eval_loss: r.federated.loss, eval_accuracy: r.federated.accuracy })));
    showPrivacy(status);
    showSecure(status);
    fill("history", history.slice(-30).reverse().map((r) => [r.round, fmt(r.clients), fmt(r.train_loss), fmt(r.train_accuracy),
      fmt(r.eval_loss), fmt(r.eval_accuracy), fmt(r.federated?.loss), fmt(r.federated?.accuracy), bytes(r.bytes_up), bytes(r.bytes_down), fmt(r.seconds, 1),
      fmt(r.epsilon, 3), r.secure ? "sum only" : "", fmt(r.staleness, 2)]));
    const sessions = status.private ? (status.own ? [status.own] : []) : status.clients;
    document.getElementById("private-note").hidden = !status.private;
    fill("clients", sessions.map((c) => [c.session, c.client_id, `${c.kind}, ${c.backend}${checkMark(c.check)}`, c.connected ? "yes" : "no",
      thisRound(open, c.session, status.asynchronous), c.rounds, fmt(c.last && c.last.train_loss), fmt(c.last && c.last.train_accuracy),
      bytes(c.bytes_up), bytes(c.bytes_down)]));
    document.getElementById("errors").textContent = status.errors === undefined
      ? "private: counted for the operator only"
      : Object.keys(status.errors).length
      ? Object.entries(status.errors).map(([code, count]) => `${code}: ${count}`).join("\n")
      : "none";
  } catch (err) {
    document.getElementById("summary").textContent = `the aggregator is not reachable (${err}); trying again every second`;
  }
}

refresh();
setInterval(refresh, 1000);
