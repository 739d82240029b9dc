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

async function refresh() {
  try {
    const status = await (await fetch("api/status")).json();
    const open = status.open_round;
    document.getElementById("summary").textContent =
      `preset ${status.preset} (${status.parameters} parameters), ${status.completed_rounds} rounds done, ` +
      `${status.connected} clients connected` +
      (open ? `, round ${open.round}: ${open.reported}/${open.selected} reported` : ", waiting for clients");
    fill("history", status.history.map((r) => [r.round, r.clients, fmt(r.train_loss), fmt(r.train_accuracy),
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
