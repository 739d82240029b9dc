//! One round's figures, as the status API, the metrics history and the saved state
//! hold them. Numbers that are not finite are written as the strings `"NaN"`,
//! `"inf"` and `"-inf"` (JSON has no such numbers) and read back as they were.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A model's loss and accuracy on held-out text, as the host measured it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Evaluation {
    pub loss: f64,
    pub accuracy: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    /// 0 is the initial model, before any round.
    pub round: u64,
    pub clients: usize,
    #[serde(with = "opt_float")]
    pub train_loss: Option<f64>,
    #[serde(with = "opt_float")]
    pub train_accuracy: Option<f64>,
    /// Sequences the round's updates trained on (examples of `seq_len`
    /// characters): with `clients`, the round's share of the client budget.
    #[serde(default)]
    pub examples: u64,
    #[serde(with = "float")]
    pub eval_loss: f64,
    #[serde(with = "float")]
    pub eval_accuracy: f64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub seconds: f64,
    /// Deltas clipped this round, and the L2 bound they were clipped to.
    #[serde(default)]
    pub clipped: usize,
    #[serde(default, with = "opt_float")]
    pub clip_bound: Option<f64>,
    /// The median L2 norm of the round's deltas before clipping.
    #[serde(default, with = "opt_float")]
    pub delta_norm: Option<f64>,
    /// Held-out loss and accuracy over every client's test split, on the rounds
    /// that measure it.
    #[serde(default, with = "opt_float")]
    pub population_loss: Option<f64>,
    #[serde(default, with = "opt_float")]
    pub population_accuracy: Option<f64>,
    /// FNV-1a of the global weights after this round (f32 little-endian bytes).
    #[serde(default)]
    pub model_hash: String,
    /// The ε (at the strategy's δ) the rounds so far spent, under DP-FedAvg.
    #[serde(default, with = "opt_float", skip_serializing_if = "Option::is_none")]
    pub epsilon: Option<f64>,
    /// The round was securely aggregated: the server saw only its sum.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub secure: bool,
    /// Asynchronous rounds: the mean staleness of the step's updates (how many
    /// steps the global model had moved since each update's model).
    #[serde(default, with = "opt_float", skip_serializing_if = "Option::is_none")]
    pub staleness: Option<f64>,
    /// The model measured where the data is: devices' loss and accuracy on the
    /// text they hold out, over all their characters (federated evaluation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub federated: Option<FederatedEvaluation>,
}

/// A round's federated evaluation: what the devices asked reported, summed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FederatedEvaluation {
    /// The round whose model was measured: this one's candidate, or under
    /// secure aggregation, the model this round started from (the devices
    /// measured it before training, and their sums came with the round's).
    pub model_round: u64,
    pub loss: f64,
    pub accuracy: f64,
    /// Characters measured, and the devices that measured them.
    pub chars: u64,
    pub devices: usize,
}

impl RoundRecord {
    /// The header of the table of rounds the command line prints.
    pub const TABLE_HEADER: &str = "round  clients  train loss  train acc  eval loss  eval acc    bytes up   seconds  population acc";

    /// The record as a row of that table.
    pub fn table_row(&self) -> String {
        self.row(false)
    }

    /// The row, with what a private federation withholds as `-` when `withheld`.
    pub(crate) fn row(&self, withheld: bool) -> String {
        let opt = |v: Option<f64>| match v {
            Some(v) if !withheld => format!("{v:.4}"),
            _ => "-".to_owned(),
        };
        let shown = |v: String| if withheld { "-".to_owned() } else { v };
        format!(
            "{:>5}  {:>7}  {:>10}  {:>9}  {:>9.4}  {:>8.4}  {:>10}  {:>8}",
            self.round,
            shown(self.clients.to_string()),
            opt(self.train_loss),
            opt(self.train_accuracy),
            self.eval_loss,
            self.eval_accuracy,
            shown(self.bytes_up.to_string()),
            shown(format!("{:.1}", self.seconds)),
        ) + &self
            .population_accuracy
            .map_or_else(String::new, |acc| format!("  {acc:>14.4}"))
            + &self
                .epsilon
                .map_or_else(String::new, |e| format!("  ε {e:.3}"))
    }
}

/// FNV-1a (64 bits) of the weights' bytes, in hex: which model a round produced.
pub fn model_hash(weights: &[f32]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in weights.iter().flat_map(|w| w.to_le_bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum Float {
    Number(f64),
    Text(String),
}

fn to_float(v: f64) -> Float {
    if v.is_finite() {
        Float::Number(v)
    } else if v.is_nan() {
        Float::Text("NaN".into())
    } else if v > 0.0 {
        Float::Text("inf".into())
    } else {
        Float::Text("-inf".into())
    }
}

fn from_float<E: serde::de::Error>(f: Float) -> Result<f64, E> {
    match f {
        Float::Number(v) => Ok(v),
        Float::Text(text) => match text.as_str() {
            "NaN" => Ok(f64::NAN),
            "inf" => Ok(f64::INFINITY),
            "-inf" => Ok(f64::NEG_INFINITY),
            other => Err(E::custom(format!("not a number: {other:?}"))),
        },
    }
}

mod float {
    use super::*;

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        to_float(*v).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        from_float(Float::deserialize(d)?)
    }
}

mod opt_float {
    use super::*;

    pub fn serialize<S: Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
        v.map(to_float).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
        Option::<Float>::deserialize(d)?.map(from_float).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_metrics_survive_a_round_trip() {
        let record = RoundRecord {
            round: 3,
            clients: 2,
            train_loss: Some(f64::INFINITY),
            train_accuracy: None,
            examples: 4,
            eval_loss: f64::NAN,
            eval_accuracy: f64::NEG_INFINITY,
            bytes_up: 1,
            bytes_down: 2,
            seconds: 0.5,
            clipped: 1,
            clip_bound: Some(0.25),
            delta_norm: Some(0.5),
            population_loss: None,
            population_accuracy: Some(0.5),
            model_hash: model_hash(&[1.0]),
            epsilon: Some(f64::INFINITY),
            secure: true,
            staleness: Some(1.5),
            federated: None,
        };
        let json = serde_json::to_string(&record).unwrap();
        assert!(json.contains(r#""eval_loss":"NaN""#), "{json}");
        let back: RoundRecord = serde_json::from_str(&json).unwrap();
        assert!(back.eval_loss.is_nan());
        assert_eq!(back.train_loss, Some(f64::INFINITY));
        assert_eq!(back.eval_accuracy, f64::NEG_INFINITY);
        assert_eq!(back.model_hash, record.model_hash);
        assert!(serde_json::from_str::<RoundRecord>(&json.replace("NaN", "nan?")).is_err());
    }
}
