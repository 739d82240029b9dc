//! `/metrics`: the aggregator in Prometheus's text format, for an operator's
//! monitoring (behind the admin token, as every operator's view is: counts of
//! a DP or secure run are not for the public).
//!
//! Totals over the rounds are kept as the rounds commit, read from the engine's
//! history at each scrape from where the last one stopped: a scrape costs the
//! rounds since the last one, not the whole history.

use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::time::Instant;

use folio_engine::RoundRecord;

use crate::Shared;
use crate::driver::Served;

/// Upper bounds (seconds) of the round-duration histogram's buckets.
const DURATION_BUCKETS: [f64; 10] = [0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0];

/// Sums over the committed rounds (the whole run's, read back after a restart).
#[derive(Debug, Default)]
pub struct RoundTotals {
    /// The next round to fold in.
    next: u64,
    rounds: u64,
    updates: u64,
    examples: u64,
    bytes_up: u64,
    bytes_down: u64,
    seconds: f64,
    /// Rounds that took at most each [`DURATION_BUCKETS`] bound.
    buckets: [u64; DURATION_BUCKETS.len()],
}

impl RoundTotals {
    fn add(&mut self, record: &RoundRecord) {
        self.next = record.round + 1;
        // Round 0 is the starting model's evaluation, not a round of training.
        if record.round > 0 {
            self.rounds += 1;
            self.updates += record.clients as u64;
            self.examples += record.examples;
            self.bytes_up += record.bytes_up;
            self.bytes_down += record.bytes_down;
            self.seconds += record.seconds;
            for (bucket, &bound) in self.buckets.iter_mut().zip(&DURATION_BUCKETS) {
                *bucket += u64::from(record.seconds <= bound);
            }
        }
    }
}

/// Prometheus's text exposition format, one metric family at a time.
struct Exposition(String);

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(
            self.0,
            "# HELP folio_{name} {help}\n# TYPE folio_{name} {kind}"
        );
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        let _ = write!(self.0, "folio_{name}");
        if !labels.is_empty() {
            let labels: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                .collect();
            let _ = write!(self.0, "{{{}}}", labels.join(","));
        }
        let _ = writeln!(self.0, " {}", number(value));
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, value: f64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn number(value: f64) -> String {
    match value {
        v if v.is_nan() => "NaN".into(),
        v if v == f64::INFINITY => "+Inf".into(),
        v if v == f64::NEG_INFINITY => "-Inf".into(),
        v => v.to_string(),
    }
}

/// The aggregator's metrics now.
pub fn render<R: Served>(shared: &Shared<R>) -> String {
    let (status, counts, new_rounds) = shared.read(|e| {
        let from = shared
            .round_totals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .next;
        (
            e.status(Instant::now()),
            e.session_counts(),
            e.history(from, usize::MAX).to_vec(),
        )
    });
    let mut totals = shared
        .round_totals
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    for record in &new_rounds {
        // Another scrape may have folded it in since this one read the history.
        if record.round >= totals.next {
            totals.add(record);
        }
    }
    let mut out = Exposition(String::new());

    out.one(
        "rounds_completed_total",
        "counter",
        "Rounds committed, counting those before a restart.",
        status.completed_rounds as f64,
    );
    out.family(
        "round_duration_seconds",
        "histogram",
        "Seconds from a round's start to its commit.",
    );
    for (bound, count) in DURATION_BUCKETS.iter().zip(totals.buckets) {
        out.sample(
            "round_duration_seconds_bucket",
            &[("le", &number(*bound))],
            count as f64,
        );
    }
    out.sample(
        "round_duration_seconds_bucket",
        &[("le", "+Inf")],
        totals.rounds as f64,
    );
    out.sample("round_duration_seconds_sum", &[], totals.seconds);
    out.sample("round_duration_seconds_count", &[], totals.rounds as f64);
    out.one(
        "updates_accepted_total",
        "counter",
        "Client updates averaged into committed rounds.",
        totals.updates as f64,
    );
    out.one(
        "examples_total",
        "counter",
        "Training sequences behind the committed rounds' updates.",
        totals.examples as f64,
    );
    out.family(
        "round_bytes_total",
        "counter",
        "Bytes of the committed rounds' models and updates, by direction,.",
    );
    out.sample(
        "round_bytes_total",
        &[("direction", "up")],
        totals.bytes_up as f64,
    );
    out.sample(
        "round_bytes_total",
        &[("direction", "down")],
        totals.bytes_down as f64,
    );
    out.family(
        "refused_total",
        "counter",
        "Client messages and connections refused, by reason.",
    );
    for (reason, count) in &status.errors {
        out.sample("refused_total", &[("reason", reason)], *count as f64);
    }
    let connections = &shared.connections;
    out.family(
        "connections_refused_total",
        "counter",
        "TCP connections refused at a cap, or ended to make room for a newcomer from a less represented network.",
    );
    out.sample(
        "connections_refused_total",
        &[("why", "cap")],
        connections.refused.load(Ordering::Relaxed) as f64,
    );
    out.sample(
        "connections_refused_total",
        &[("why", "evicted")],
        connections.evicted.load(Ordering::Relaxed) as f64,
    );
    out.one(
        "connections_open",
        "gauge",
        "TCP connections open.",
        connections.open() as f64,
    );
    out.one(
        "websockets_open",
        "gauge",
        "WebSocket connections open.",
        *shared.websockets.borrow() as f64,
    );
    out.family(
        "sessions",
        "gauge",
        "Sessions held, by connection and by where their device check stands.",
    );
    out.sample(
        "sessions",
        &[("state", "connected")],
        counts.connected as f64,
    );
    out.sample(
        "sessions",
        &[("state", "disconnected")],
        (counts.held - counts.connected) as f64,
    );
    out.family(
        "device_checks",
        "gauge",
        "Sessions held, by the verdict on their device's arithmetic.",
    );
    for (verdict, count) in &counts.checks {
        out.sample("device_checks", &[("verdict", verdict)], *count as f64);
    }
    out.family(
        "round_in_progress",
        "gauge",
        "Devices selected for and reported in the open round (0 without one).",
    );
    let (selected, reported) = status
        .open_round
        .as_ref()
        .map_or((0, 0), |open| (open.selected, open.reported));
    out.sample(
        "round_in_progress",
        &[("devices", "selected")],
        selected as f64,
    );
    out.sample(
        "round_in_progress",
        &[("devices", "reported")],
        reported as f64,
    );
    if let Some(latest) = &status.latest {
        out.one(
            "eval_loss",
            "gauge",
            "The global model's loss per character on the server's held-out text, after the latest round.",
            latest.eval_loss,
        );
        out.one(
            "eval_accuracy",
            "gauge",
            "The global model's next-character accuracy on the server's held-out text, after the latest round.",
            latest.eval_accuracy,
        );
        if let Some(federated) = &latest.federated {
            out.one(
                "federated_eval_loss",
                "gauge",
                "The latest model's loss per character measured on devices' held-out text.",
                federated.loss,
            );
            out.one(
                "federated_eval_accuracy",
                "gauge",
                "The latest model's accuracy measured on devices' held-out text.",
                federated.accuracy,
            );
        }
    }
    if let Some(privacy) = &status.privacy {
        out.one(
            "dp_epsilon",
            "gauge",
            "ε spent by the committed rounds (at the run's δ).",
            privacy.epsilon,
        );
        out.one("dp_delta", "gauge", "The run's δ.", privacy.delta);
    }
    out.0
}
