//! What a federation publishes of itself, by whom it is asked.
//!
//! Under DP-FedAvg the privacy spent (ε) assumes the Poisson sample is secret,
//! and secure aggregation promises the server learns only each round's sum: a
//! public page that names who took part, or gives exact counts and norms the
//! mechanism does not noise, undoes both. A federation that is DP or secure is
//! *private*: its public surfaces (status, history, logs) withhold every field
//! listed here; the operator sees everything behind the admin token, and a device
//! sees its own session's row. Every other field is public because it is the
//! mechanism's own output (the model and what is measured of it on the server's
//! text, ε) or configuration; the tests keep each field classified.

use serde_json::Value;

use crate::roles::Role;
use crate::status::Status;
use crate::{Engine, RoundRecord};

/// A round record's fields a private federation withholds, and why.
pub const RECORD_WITHHELD: &[(&str, &str)] = &[
    (
        "clients",
        "how many took part: the sample's size, which DP keeps secret",
    ),
    ("examples", "how much text the participants hold"),
    (
        "train_loss",
        "the participants' own training loss, not noised",
    ),
    (
        "train_accuracy",
        "the participants' own training accuracy, not noised",
    ),
    ("bytes_up", "grows with how many devices reported"),
    (
        "bytes_down",
        "grows with how many devices were sent the model",
    ),
    ("seconds", "when the slowest participant reported"),
    (
        "clipped",
        "the exact count adaptive clipping pays noise to hide",
    ),
    (
        "delta_norm",
        "the participants' median update norm, not noised",
    ),
    (
        "staleness",
        "how long ago the participants were sent their models",
    ),
    (
        "federated",
        "devices' own held-out loss and how many measured it, not noised",
    ),
];

/// The status's fields a private federation withholds (`a.b`: field `b` of `a`),
/// and why. The session list keeps the asking device's own row.
pub const STATUS_WITHHELD: &[(&str, &str)] = &[
    (
        "clients",
        "every session's rounds and metrics: who took part",
    ),
    ("errors", "refusals of participants' messages, counted"),
    (
        "open_round.attempt",
        "a retry says how many answered the last try",
    ),
    ("open_round.selected", "the sample's size"),
    (
        "open_round.reported",
        "how many of the sample reported so far",
    ),
    ("open_round.selected_sessions", "who was sampled"),
    ("open_round.reported_sessions", "who reported"),
    ("open_round.dropped_sessions", "who was sampled and left"),
    (
        "asynchronous.buffered",
        "how many updates are in: who trained when",
    ),
    (
        "asynchronous.training",
        "who is training, and on which model",
    ),
];

/// Whether public surfaces may show everything (`Full`) or withhold what
/// participation gives away (`Private`: DP or secure rounds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    Full,
    Private,
}

impl Release {
    pub fn is_private(self) -> bool {
        self == Release::Private
    }

    /// A round record as a public surface shows it.
    pub fn record(self, record: &RoundRecord) -> Value {
        let mut value = serde_json::to_value(record).expect("a round record serialises");
        if self.is_private() {
            withhold(&mut value, RECORD_WITHHELD);
        }
        value
    }

    /// The status as a public surface shows it to the holder of session `own`
    /// (a device that proved its session token), or to anyone (`None`).
    pub fn status(self, mut status: Status, own: Option<u64>) -> Value {
        if !self.is_private() {
            return serde_json::to_value(&status).expect("a status serialises");
        }
        let mine = status
            .clients
            .iter()
            .position(|c| Some(c.session) == own)
            .map(|i| status.clients.swap_remove(i));
        status.clients.clear();
        let mut value = serde_json::to_value(&status).expect("a status serialises");
        withhold(&mut value, STATUS_WITHHELD);
        if let Some(latest) = value.get_mut("latest").filter(|l| !l.is_null()) {
            withhold(latest, RECORD_WITHHELD);
        }
        value["own"] = serde_json::to_value(mine).expect("a session serialises");
        value["private"] = Value::Bool(true);
        value
    }

    /// A committed round as a line of the table the command line prints: the
    /// withheld columns as `-`.
    pub fn table_row(self, record: &RoundRecord) -> String {
        record.row(self.is_private())
    }
}

/// Removes `fields` (`a` or `a.b`) from `value`.
fn withhold(value: &mut Value, fields: &[(&str, &str)]) {
    for (field, _) in fields {
        let mut path = field.split('.');
        let Some(first) = path.next() else { continue };
        match path.next() {
            None => {
                value.as_object_mut().map(|o| o.remove(first));
            }
            Some(second) => {
                if let Some(inner) = value.get_mut(first).and_then(Value::as_object_mut) {
                    inner.remove(second);
                }
            }
        }
    }
}

impl<R: Role> Engine<R> {
    /// What this federation's public surfaces may show.
    pub fn release(&self) -> Release {
        if self.is_dp() || self.config.rounds.secure.is_some() {
            Release::Private
        } else {
            Release::Full
        }
    }

    /// The session `token` proves, connected or not.
    pub fn session_of_token(&self, token: &str) -> Option<u64> {
        self.sessions.owner_of(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{FederatedEvaluation, model_hash};

    /// Round-record fields every surface may show, and why.
    const RECORD_PUBLIC: &[(&str, &str)] = &[
        ("round", "the model's version"),
        (
            "eval_loss",
            "the released model measured on the server's text",
        ),
        (
            "eval_accuracy",
            "the released model measured on the server's text",
        ),
        (
            "population_loss",
            "the released model on the server's per-client splits",
        ),
        (
            "population_accuracy",
            "the released model on the server's per-client splits",
        ),
        ("model_hash", "names the released model"),
        ("epsilon", "the accountant's output"),
        ("secure", "configuration"),
        (
            "clip_bound",
            "configuration, or moved by the noised (charged) count under DP",
        ),
    ];

    fn full_record() -> RoundRecord {
        RoundRecord {
            round: 3,
            clients: 2,
            train_loss: Some(1.0),
            train_accuracy: Some(0.5),
            examples: 4,
            eval_loss: 2.0,
            eval_accuracy: 0.25,
            bytes_up: 1,
            bytes_down: 2,
            seconds: 0.5,
            clipped: 1,
            clip_bound: Some(0.25),
            delta_norm: Some(0.5),
            population_loss: Some(2.0),
            population_accuracy: Some(0.5),
            model_hash: model_hash(&[1.0]),
            epsilon: Some(1.0),
            secure: true,
            staleness: Some(1.5),
            federated: Some(FederatedEvaluation {
                model_round: 3,
                loss: 1.0,
                accuracy: 0.5,
                chars: 10,
                devices: 2,
            }),
        }
    }

    #[test]
    fn every_record_field_is_public_or_withheld_with_a_reason() {
        let value = Release::Full.record(&full_record());
        let mut fields: Vec<&str> = value
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        fields.sort_unstable();
        let mut classified: Vec<&str> = RECORD_PUBLIC
            .iter()
            .chain(RECORD_WITHHELD)
            .map(|(f, _)| *f)
            .collect();
        classified.sort_unstable();
        assert_eq!(
            fields, classified,
            "a field of RoundRecord is not classified"
        );
    }

    #[test]
    fn a_private_record_keeps_only_its_public_fields() {
        let value = Release::Private.record(&full_record());
        let fields: Vec<&str> = value
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(fields.len(), RECORD_PUBLIC.len(), "{fields:?}");
        for (field, _) in RECORD_PUBLIC {
            assert!(fields.contains(field), "{field}");
        }
        // The train loss (1.0) shows only in full.
        assert!(
            !Release::Private
                .table_row(&full_record())
                .contains("1.0000")
        );
        assert!(Release::Full.table_row(&full_record()).contains("1.0000"));
    }
}
