//! What survives a restart, committed after every round in O(1) IO whatever the
//! number of rounds before it:
//!
//! 1. the round's record is appended to `metrics.jsonl` (one line) and synced;
//! 2. the global weights and the strategy's state record are written to
//!    `state.safetensors.partial`, synced, renamed over `state.safetensors`, and
//!    the folder synced.
//!
//! The rename is the commit: a crash before it leaves the previous round's state,
//! and the history lines past that round (or a torn last line) are cut away when
//! the state is loaded. A crash loses at most the open round.
//!
//! State files written before this format (the history inside the state file, the
//! optimizer's moments as `server_m` / `server_v`) are read too, and their history
//! is written out to `metrics.jsonl`.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use folio_engine::{Commit, RoundRecord};
use folio_fed::StateRecord;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

/// The format written by [`commit`].
const FORMAT: &str = "2";
/// Prefix of the strategy's tensors in the state file.
const STRATEGY_TENSOR: &str = "strategy.";

pub struct SavedState {
    pub weights: Vec<f32>,
    pub strategy: StateRecord,
    pub history: Vec<RoundRecord>,
}

impl SavedState {
    pub fn completed_rounds(&self) -> u64 {
        self.history.last().map_or(0, |r| r.round)
    }
}

pub fn state_path(dir: &Path) -> PathBuf {
    dir.join("state.safetensors")
}

pub fn history_path(dir: &Path) -> PathBuf {
    dir.join("metrics.jsonl")
}

/// How many weights the state in `dir` holds (which model it is), without
/// checking the rest.
pub fn weight_count(dir: &Path) -> anyhow::Result<usize> {
    let path = state_path(dir);
    let bytes = std::fs::read(&path)
        .with_context(|| format!("cannot read {}: is it a run folder?", path.display()))?;
    let tensors = SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{} is corrupt", path.display()))?;
    let weights = tensors
        .tensor("weights")
        .with_context(|| format!("{} has no `weights`", path.display()))?;
    Ok(weights.shape().iter().product())
}

fn bytes_of(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn floats(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn sync_dir(path: &Path) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("cannot sync {}", dir.display()))?;
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically and durably.
fn write_durably(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let partial = path.with_extension("partial");
    let mut file = std::fs::File::create(&partial)
        .with_context(|| format!("cannot write {}", partial.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", partial.display()))?;
    std::fs::rename(&partial, path).with_context(|| format!("cannot write {}", path.display()))?;
    sync_dir(path)
}

/// Appends one line to `path` durably.
fn append_durably(path: &Path, line: &str) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot append to {}", path.display()))?;
    file.write_all(line.as_bytes())
        .and_then(|()| file.sync_data())
        .with_context(|| format!("cannot append to {}", path.display()))?;
    sync_dir(path)
}

/// Commits a round: its record appended to the history, then the weights and the
/// strategy's state written and renamed into place. Returns the bytes written.
pub fn commit(dir: &Path, commit: &Commit, seed: u64) -> anyhow::Result<u64> {
    let Commit {
        record,
        weights,
        state: strategy,
    } = commit;
    let line = serde_json::to_string(record)? + "\n";
    append_durably(&history_path(dir), &line)?;
    let bytes = snapshot(record.round, weights, strategy, seed)?;
    write_durably(&state_path(dir), &bytes)?;
    Ok((line.len() + bytes.len()) as u64)
}

/// A commit's weights and strategy state as one safetensors file (its history
/// record apart): the state file, and a cluster root's snapshot.
pub fn snapshot(
    round: u64,
    weights: &[f32],
    strategy: &StateRecord,
    seed: u64,
) -> anyhow::Result<Vec<u8>> {
    let mut buffers = vec![("weights".to_owned(), bytes_of(weights))];
    for (name, values) in &strategy.tensors {
        buffers.push((format!("{STRATEGY_TENSOR}{name}"), bytes_of(values)));
    }
    let views = buffers
        .iter()
        .map(|(name, bytes)| {
            Ok((
                name.as_str(),
                TensorView::new(Dtype::F32, vec![bytes.len() / 4], bytes)?,
            ))
        })
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    let described = serde_json::json!({
        "kind": strategy.kind,
        "version": strategy.version,
        "values": strategy.values,
    });
    let metadata = HashMap::from([
        ("format".to_owned(), FORMAT.to_owned()),
        ("round".to_owned(), round.to_string()),
        ("seed".to_owned(), seed.to_string()),
        ("strategy".to_owned(), described.to_string()),
    ]);
    Ok(safetensors::serialize(views, Some(metadata))?)
}

/// A snapshot's round, weights and strategy state; `origin` names it in errors.
pub fn read_snapshot(
    bytes: &[u8],
    num_params: usize,
    origin: &str,
) -> anyhow::Result<(u64, Vec<f32>, StateRecord)> {
    let corrupt = || format!("{origin} is corrupt");
    let tensors = SafeTensors::deserialize(bytes).with_context(corrupt)?;
    let (_, header) = SafeTensors::read_metadata(bytes).with_context(corrupt)?;
    let metadata = header.metadata().clone().unwrap_or_default();
    anyhow::ensure!(
        metadata.get("format").map(String::as_str) == Some(FORMAT),
        "{origin} is not a folio state"
    );
    let weights = floats(tensors.tensor("weights").with_context(corrupt)?.data());
    anyhow::ensure!(
        weights.len() == num_params && weights.iter().all(|w| w.is_finite()),
        "{origin} holds {} weights (finite: {}), the model has {num_params}",
        weights.len(),
        weights.iter().all(|w| w.is_finite())
    );
    let round: u64 = metadata
        .get("round")
        .and_then(|r| r.parse().ok())
        .with_context(corrupt)?;
    let described: serde_json::Value = metadata
        .get("strategy")
        .and_then(|json| serde_json::from_str(json).ok())
        .with_context(corrupt)?;
    let mut strategy = StateRecord {
        kind: described["kind"].as_str().unwrap_or_default().to_owned(),
        version: described["version"].as_u64().unwrap_or(0) as u32,
        values: serde_json::from_value(described["values"].clone()).with_context(corrupt)?,
        tensors: BTreeMap::new(),
    };
    for name in tensors.names() {
        if let Some(short) = name.strip_prefix(STRATEGY_TENSOR) {
            let view = tensors.tensor(name)?;
            strategy
                .tensors
                .insert(short.to_owned(), floats(view.data()));
        }
    }
    Ok((round, weights, strategy))
}

/// The saved state, if `dir` has one, to resume from: the history file is cut back
/// to the committed round (a crash between the two writes of a commit leaves a
/// line more), so that the next commit appends in the right place.
pub fn open(dir: &Path, num_params: usize) -> anyhow::Result<Option<SavedState>> {
    read(dir, num_params, true)
}

/// The saved state, if `dir` has one, read only: history lines past the committed
/// round are left alone (a running host may be between the two writes).
pub fn load(dir: &Path, num_params: usize) -> anyhow::Result<Option<SavedState>> {
    read(dir, num_params, false)
}

fn read(dir: &Path, num_params: usize, repair: bool) -> anyhow::Result<Option<SavedState>> {
    let path = state_path(dir);
    if !path.exists() {
        return Ok(None);
    }
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let corrupt = || {
        format!(
            "{} is corrupt: move it away to start afresh",
            path.display()
        )
    };
    let tensors = SafeTensors::deserialize(&bytes).with_context(corrupt)?;
    let (_, header) = SafeTensors::read_metadata(&bytes).with_context(corrupt)?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let weights = floats(
        tensors
            .tensor("weights")
            .with_context(|| format!("{} has no `weights`", path.display()))?
            .data(),
    );
    if weights.len() != num_params {
        let written_for = folio_model::Preset::ALL
            .into_iter()
            .find(|preset| preset.config().num_params() == weights.len())
            .map_or("another model".to_owned(), |preset| {
                format!("the preset `{}` (run with --preset {0})", preset.name())
            });
        anyhow::bail!(
            "{} holds {} weights, the model has {num_params}: it was written for {written_for}; \
             or give this run another --state-dir",
            path.display(),
            weights.len()
        );
    }
    anyhow::ensure!(
        weights.iter().all(|w| w.is_finite()),
        "{} holds non-finite weights: move it away to start afresh",
        path.display()
    );
    let round: u64 = metadata
        .get("round")
        .and_then(|r| r.parse().ok())
        .with_context(corrupt)?;
    let (strategy, history) = if metadata.get("format").map(String::as_str) == Some(FORMAT) {
        let origin = format!("{} (move it away to start afresh)", path.display());
        let (_, _, strategy) = read_snapshot(&bytes, num_params, &origin)?;
        (strategy, read_history(dir, round, repair)?)
    } else {
        legacy(dir, &tensors, &metadata, round, repair)?
    };
    anyhow::ensure!(
        history.last().map(|r| r.round) == Some(round),
        "{} is committed at round {round} but {} ends at round {}: the history was cut or \
         removed; restore it, or move the folder away to start afresh",
        path.display(),
        history_path(dir).display(),
        history.last().map_or(-1, |r| r.round as i64)
    );
    Ok(Some(SavedState {
        weights,
        strategy,
        history,
    }))
}

/// Every record of a run's history, refused at the first line that is not one
/// (for reading a run, not resuming it).
pub fn run_history(dir: &Path) -> anyhow::Result<Vec<RoundRecord>> {
    let path = history_path(dir);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}: is it a run folder?", path.display()))?;
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_str(line)
                .with_context(|| format!("{} line {} is not a round record", path.display(), i + 1))
        })
        .collect()
}

/// The history's records up to `round`; with `repair`, lines past it, or a torn
/// last line, are cut from the file.
fn read_history(dir: &Path, round: u64, repair: bool) -> anyhow::Result<Vec<RoundRecord>> {
    let path = history_path(dir);
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let mut history = Vec::new();
    let mut kept_bytes = 0;
    for line in text.split_inclusive('\n') {
        let Ok(record) = serde_json::from_str::<RoundRecord>(line.trim_end()) else {
            break;
        };
        if record.round > round || !line.ends_with('\n') {
            break;
        }
        history.push(record);
        kept_bytes += line.len();
    }
    if repair && kept_bytes != text.len() {
        tracing::warn!(
            "{}: cutting {} bytes past the committed round {round}",
            path.display(),
            text.len() - kept_bytes
        );
        write_durably(&path, &text.as_bytes()[..kept_bytes])?;
    }
    Ok(history)
}

/// A state from before format 2: the history inside the file (or, older still,
/// in the history file), the moments as `server_m` / `server_v`.
fn legacy(
    dir: &Path,
    tensors: &SafeTensors,
    metadata: &HashMap<String, String>,
    round: u64,
    repair: bool,
) -> anyhow::Result<(StateRecord, Vec<RoundRecord>)> {
    let history = match tensors.tensor("history") {
        Ok(view) => {
            let history: Vec<RoundRecord> =
                serde_json::from_slice(view.data()).context("the saved history is corrupt")?;
            if repair {
                let mut text = String::new();
                for record in &history {
                    text.push_str(&serde_json::to_string(record)?);
                    text.push('\n');
                }
                write_durably(&history_path(dir), text.as_bytes())?;
            }
            history
        }
        Err(_) => read_history(dir, round, repair)?,
    };
    let mut strategy = StateRecord::new("fedavg", 1);
    let clip_bound: Option<f32> = metadata.get("clip_bound").and_then(|b| b.parse().ok());
    strategy.set_value("clip_bound", clip_bound.filter(|b| b.is_finite()));
    if let Some(optimizer) = metadata.get("server_optimizer") {
        let optimizer: serde_json::Value = serde_json::from_str(optimizer)?;
        strategy.set_value("server_optimizer", optimizer);
    }
    // A state from before steps were counted: at least its rounds, which leaves
    // bias correction (≈ 1 by then) out.
    let steps: u64 = metadata
        .get("server_steps")
        .and_then(|s| s.parse().ok())
        .unwrap_or(round);
    strategy.set_value("server_steps", steps);
    for (name, tensor) in [("server_m", "server_m"), ("server_v", "server_v")] {
        if let Ok(view) = tensors.tensor(tensor) {
            strategy
                .tensors
                .insert(name.to_owned(), floats(view.data()));
        }
    }
    Ok((strategy, history))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(round: u64, eval_loss: f64) -> RoundRecord {
        RoundRecord {
            round,
            clients: 2,
            train_loss: None,
            train_accuracy: None,
            examples: 0,
            eval_loss,
            eval_accuracy: 0.5,
            bytes_up: 0,
            bytes_down: 0,
            seconds: 0.0,
            clipped: 0,
            clip_bound: None,
            delta_norm: None,
            population_loss: None,
            population_accuracy: None,
            model_hash: folio_engine::model_hash(&[round as f32]),
            epsilon: None,
            secure: false,
            staleness: None,
            federated: None,
        }
    }

    fn commit_round(dir: &Path, round: u64, eval_loss: f64, weights: &[f32]) -> u64 {
        let saved = Commit {
            record: record(round, eval_loss),
            weights: std::sync::Arc::new(weights.to_vec()),
            state: strategy(),
        };
        commit(dir, &saved, 9).unwrap()
    }

    fn strategy() -> StateRecord {
        let mut record = StateRecord::new("fedavg", 1);
        record.set_value("clip_bound", 0.75f32);
        record
            .tensors
            .insert("server_m".into(), vec![0.5, -0.5, 1.0]);
        record
    }

    #[test]
    fn a_commit_round_trips_weights_state_and_non_finite_history() {
        let dir = tempfile::tempdir().unwrap();
        commit_round(dir.path(), 0, 2.0, &[0.0; 3]);
        commit_round(dir.path(), 1, f64::NAN, &[1.0, 2.0, 3.0]);
        let saved = load(dir.path(), 3).unwrap().unwrap();
        assert_eq!(saved.weights, vec![1.0, 2.0, 3.0]);
        assert_eq!(saved.strategy, strategy());
        assert_eq!(saved.completed_rounds(), 1);
        assert!(saved.history[1].eval_loss.is_nan());
        assert!(load(dir.path(), 4).is_err(), "another model size");
    }

    #[test]
    fn a_state_of_another_preset_is_refused_with_the_preset_that_wrote_it() {
        let dir = tempfile::tempdir().unwrap();
        let small = folio_model::Preset::Small.config().num_params();
        commit_round(dir.path(), 0, 1.0, &vec![0.0; small]);
        let medium = folio_model::Preset::Medium.config().num_params();
        let Err(refusal) = load(dir.path(), medium) else {
            panic!("a small model's state loaded as a medium one");
        };
        let refusal = refusal.to_string();
        assert!(
            refusal.contains("written for the preset `small` (run with --preset small)")
                && refusal.contains("--state-dir"),
            "{refusal}"
        );
    }

    #[test]
    fn a_commit_writes_the_same_bytes_at_round_500_as_at_round_5() {
        let dir = tempfile::tempdir().unwrap();
        let sizes: Vec<u64> = (0..=500)
            .map(|round| commit_round(dir.path(), round, 1.0, &[0.0; 3]))
            .collect();
        assert!(sizes[500] <= sizes[5] + 8, "{} vs {}", sizes[5], sizes[500]);
        assert_eq!(load(dir.path(), 3).unwrap().unwrap().history.len(), 501);
    }

    #[test]
    fn history_past_the_committed_round_and_a_torn_line_are_cut_on_load() {
        let dir = tempfile::tempdir().unwrap();
        for round in 0..3 {
            commit_round(dir.path(), round, 1.0, &[0.0; 3]);
        }
        // A crash after round 3's line was appended but before its state was
        // renamed in, with half of a round-4 line after it.
        let line = serde_json::to_string(&record(3, 1.0)).unwrap();
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(history_path(dir.path()))
            .unwrap();
        write!(file, "{line}\n{}", &line[..10]).unwrap();
        let saved = load(dir.path(), 3).unwrap().unwrap();
        assert_eq!(saved.completed_rounds(), 2);
        let text = std::fs::read_to_string(history_path(dir.path())).unwrap();
        assert_eq!(text.lines().count(), 5, "a reader changes nothing");
        let saved = open(dir.path(), 3).unwrap().unwrap();
        assert_eq!(saved.completed_rounds(), 2);
        let text = std::fs::read_to_string(history_path(dir.path())).unwrap();
        assert_eq!(text.lines().count(), 3, "cut for the next commit");
        // A history cut shorter than the state is refused, not silently restarted.
        std::fs::write(history_path(dir.path()), "").unwrap();
        assert!(load(dir.path(), 3).is_err());
    }

    #[test]
    fn a_state_from_before_format_2_is_read_and_its_history_written_out() {
        let dir = tempfile::tempdir().unwrap();
        let weights = bytes_of(&[1.0, 2.0]);
        let m = bytes_of(&[0.25, 0.5]);
        let history = serde_json::to_vec(&[record(0, 1.0), record(1, 0.5)]).unwrap();
        let views = vec![
            (
                "weights",
                TensorView::new(Dtype::F32, vec![2], &weights).unwrap(),
            ),
            (
                "server_m",
                TensorView::new(Dtype::F32, vec![2], &m).unwrap(),
            ),
            (
                "server_v",
                TensorView::new(Dtype::F32, vec![0], &[]).unwrap(),
            ),
            (
                "history",
                TensorView::new(Dtype::U8, vec![history.len()], &history).unwrap(),
            ),
        ];
        let metadata = HashMap::from([
            ("round".to_owned(), "1".to_owned()),
            ("clip_bound".to_owned(), "0.5".to_owned()),
            (
                "server_optimizer".to_owned(),
                r#"{"FedAvgM":{"lr":1.0,"momentum":0.9}}"#.to_owned(),
            ),
        ]);
        let bytes = safetensors::serialize(views, Some(metadata)).unwrap();
        std::fs::write(state_path(dir.path()), bytes).unwrap();
        let saved = open(dir.path(), 2).unwrap().unwrap();
        assert_eq!(saved.completed_rounds(), 1);
        assert_eq!(saved.strategy.tensors["server_m"], vec![0.25, 0.5]);
        assert_eq!(
            saved.strategy.value::<Option<f32>>("clip_bound"),
            Ok(Some(0.5))
        );
        assert_eq!(saved.strategy.value::<u64>("server_steps"), Ok(1));
        let strategy = folio_fed::strategy::build(
            folio_fed::StrategyConfig {
                server_optimizer: folio_fed::ServerOptimizerConfig::FedAvgM {
                    lr: 0.5,
                    momentum: 0.9,
                },
                ..folio_fed::StrategyConfig::fedavg(2)
            },
            &folio_fed::StrategyContext::seeded(0),
        );
        assert!(
            strategy.restore(saved.strategy, 2).is_ok(),
            "moments continue"
        );
        let text = std::fs::read_to_string(history_path(dir.path())).unwrap();
        assert_eq!(text.lines().count(), 2);
    }
}
