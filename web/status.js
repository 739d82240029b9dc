// Polls the aggregator's status API and renders it; no dependencies.
"use strict";

const fmt = (v, digits = 4) => (v === null || v === undefined ? "-" : typeof v === "number" ? v.toFixed(digits) : v);

function fill(id, rows) {
  const body = document.querySelector(`#${id} tbody`);
  body.replaceChildren(
    ...rows.map((cells) => {
      const tr = document.createElement("tr");
      tr.append(...cells.map((c) => Object.assign(document.createElement("td"), { textContent: c })));
      return tr;
    }),
  );
}

// Eval loss (left scale) and accuracy (right scale, 0..1) of the global model per
// round. Non-finite metrics arrive as the strings "NaN", "inf", "-inf": not plotted.
function plot(all) {
  const history = all.filter((r) => Number.isFinite(r.eval_loss) && Number.isFinite(r.eval_accuracy));
  const canvas = document.getElementById("plot");
  const ctx = canvas.getContext("2d");
  const { width, height } = canvas;
  const pad = 36;
  ctx.clearRect(0, 0, width, height);
  ctx.font = "12px system-ui, sans-serif";
  ctx.strokeStyle = "#bbb";
  ctx.strokeRect(pad, 8, width - 2 * pad, height - pad);
  if (history.length === 0) return;
  const rounds = Math.max(1, history[history.length - 1].round);
  const losses = history.map((r) => r.eval_loss);
  const [lo, hi] = [Math.min(...losses), Math.max(...losses)];
  const span = hi - lo || 1;
  const x = (round) => pad + (round / rounds) * (width - 2 * pad);
  const y = (fraction) => 8 + (1 - fraction) * (height - pad - 8);
  const line = (color, value) => {
    ctx.strokeStyle = color;
    ctx.beginPath();
    history.forEach((r, i) => (i ? ctx.lineTo : ctx.moveTo).call(ctx, x(r.round), y(value(r))));
    ctx.stroke();
  };
  line("#c0392b", (r) => (r.eval_loss - lo) / span);
  line("#2471a3", (r) => r.eval_accuracy);
  ctx.fillStyle = "#c0392b";
  ctx.fillText(`eval loss ${hi.toFixed(3)}`, 4, 20);
  ctx.fillText(lo.toFixed(3), 4, height - pad);
  ctx.fillStyle = "#2471a3";
  ctx.fillText(`eval acc ${history[history.length - 1].eval_accuracy.toFixed(4)}`, width - 150, 20);
  ctx.fillStyle = "#555";
  ctx.fillText(`round ${rounds}`, width - pad - 50, height - 12);
  ctx.fillText("0", pad, height - 12);
}

async function refresh() {
  try {
    const status = await (await fetch("api/status")).json();
    const open = status.open_round;
    document.getElementById("summary").textContent =
      `preset ${status.preset} (${status.parameters} parameters), ${status.completed_rounds} rounds done, ` +
      `${status.connected} clients connected` +
      (open ? `, round ${open.round}: ${open.reported}/${open.selected} reported` : ", waiting for clients");
    plot(status.history);
    fill("history", [...status.history].reverse().map((r) => [r.round, r.clients, fmt(r.train_loss), fmt(r.train_accuracy),
      fmt(r.eval_loss), fmt(r.eval_accuracy), r.bytes_up, fmt(r.seconds, 1)]));
    fill("clients", status.clients.map((c) => [c.session, c.client_id, c.kind, c.backend, c.connected ? "yes" : "no",
      c.rounds, fmt(c.last && c.last.train_loss), fmt(c.last && c.last.train_accuracy), c.bytes_up, c.bytes_down]));
    document.getElementById("errors").textContent = JSON.stringify(status.errors, null, 1);
  } catch (err) {
    document.getElementById("summary").textContent = `aggregator unreachable: ${err}`;
  }
}

refresh();
setInterval(refresh, 1000);
