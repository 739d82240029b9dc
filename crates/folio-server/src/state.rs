//! What survives a restart, committed as one unit after every round: the global
//! weights, the strategy's state (server optimizer moments, clipping bound) and
//! the whole round history, in one safetensors file that is written beside the
//! old one, fsync'd and renamed over it (then the folder is fsync'd). A crash
//! loses at most the open round. `metrics.jsonl` is a copy of the history for
//! people and tools, rewritten from the state file after each commit and at start.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use folio_fed::{ServerOptimizer, ServerOptimizerConfig, StrategyState};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::record::RoundRecord;

pub struct SavedState {
    pub weights: Vec<f32>,
    /// `None` when the strategy was configured differently (its moments belong to
    /// another rule): it starts afresh.
    pub strategy: Option<StrategyState>,
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

pub fn history_path(dir: &Path) -> PathBuf {
    dir.join("metrics.jsonl")
}

fn bytes_of(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
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
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("cannot sync {}", dir.display()))?;
    }
    Ok(())
}

/// Commits a round: weights, strategy state and history together.
pub fn commit(
    dir: &Path,
    weights: &[f32],
    strategy: &StrategyState,
    history: &[RoundRecord],
    seed: u64,
) -> anyhow::Result<()> {
    let history_json = serde_json::to_vec(history)?;
    let buffers = [
        ("weights", Dtype::F32, bytes_of(weights)),
        ("server_m", Dtype::F32, bytes_of(&strategy.optimizer.m)),
        ("server_v", Dtype::F32, bytes_of(&strategy.optimizer.v)),
        ("history", Dtype::U8, history_json),
    ];
    let views = buffers
        .iter()
        .map(|(name, dtype, bytes)| {
            let len = bytes.len() * 8 / dtype.bitsize();
            Ok((*name, TensorView::new(*dtype, vec![len], bytes)?))
        })
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    let completed = history.last().map_or(0, |r| r.round);
    let metadata = HashMap::from([
        ("round".to_owned(), completed.to_string()),
        ("seed".to_owned(), seed.to_string()),
        ("clip_bound".to_owned(), strategy.clip_bound.to_string()),
        (
            "server_optimizer".to_owned(),
            serde_json::to_string(&strategy.optimizer.config)?,
        ),
        (
            "server_steps".to_owned(),
            strategy.optimizer.steps.to_string(),
        ),
    ]);
    let bytes = safetensors::serialize(views, Some(metadata))?;
    write_durably(&state_path(dir), &bytes)?;
    write_history(dir, history)
}

/// Rewrites `metrics.jsonl` from the committed history.
pub fn write_history(dir: &Path, history: &[RoundRecord]) -> anyhow::Result<()> {
    let mut text = String::new();
    for record in history {
        text.push_str(&serde_json::to_string(record)?);
        text.push('\n');
    }
    write_durably(&history_path(dir), text.as_bytes())
}

/// The saved state, if `dir` has one.
pub fn load(
    dir: &Path,
    optimizer: ServerOptimizerConfig,
    num_params: usize,
) -> anyhow::Result<Option<SavedState>> {
    let path = state_path(dir);
    if !path.exists() {
        return Ok(None);
    }
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let tensors = SafeTensors::deserialize(&bytes).with_context(|| {
        format!(
            "{} is corrupt: move it away to start afresh",
            path.display()
        )
    })?;
    let (_, header) = SafeTensors::read_metadata(&bytes)?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let raw = |name: &str| -> anyhow::Result<&[u8]> {
        Ok(tensors
            .tensor(name)
            .with_context(|| format!("{} has no `{name}`", path.display()))?
            .data())
    };
    let read = |name: &str| -> anyhow::Result<Vec<f32>> {
        Ok(raw(name)?
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    };
    let weights = read("weights")?;
    anyhow::ensure!(
        weights.len() == num_params,
        "{} holds {} weights, the model has {num_params}: another preset? Use another --state-dir",
        path.display(),
        weights.len()
    );
    anyhow::ensure!(
        weights.iter().all(|w| w.is_finite()),
        "{} holds non-finite weights: move it away to start afresh",
        path.display()
    );
    let history: Vec<RoundRecord> = match tensors.tensor("history") {
        Ok(view) => serde_json::from_slice(view.data())
            .with_context(|| format!("{}: the history is corrupt", path.display()))?,
        // A state from before histories were committed with it: the history file's
        // lines up to its round.
        Err(_) => {
            let round: u64 = metadata
                .get("round")
                .and_then(|r| r.parse().ok())
                .unwrap_or(0);
            std::fs::read_to_string(history_path(dir))
                .unwrap_or_default()
                .lines()
                .filter_map(|line| serde_json::from_str::<RoundRecord>(line).ok())
                .filter(|record| record.round <= round)
                .collect()
        }
    };
    let saved_config: Option<ServerOptimizerConfig> = metadata
        .get("server_optimizer")
        .and_then(|json| serde_json::from_str(json).ok());
    let clip_bound = metadata.get("clip_bound").and_then(|b| b.parse().ok());
    // Moments survive a new learning rate (a schedule across sittings), not a new
    // optimizer or new β / τ.
    let keeps_moments = saved_config.is_some_and(|saved| optimizer.keeps_moments_of(&saved));
    let strategy = match (keeps_moments, clip_bound) {
        (true, Some(clip_bound)) => Some(StrategyState {
            optimizer: ServerOptimizer {
                config: optimizer,
                m: read("server_m")?,
                v: read("server_v")?,
                // A state from before steps were counted: at least its rounds,
                // which leaves bias correction (≈ 1 by then) out.
                steps: metadata
                    .get("server_steps")
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| history.last().map_or(0, |r| r.round)),
            },
            clip_bound,
        }),
        _ => None,
    };
    Ok(Some(SavedState {
        weights,
        strategy,
        history,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use folio_fed::StrategyConfig;

    fn record(round: u64, eval_loss: f64) -> RoundRecord {
        let metrics = folio_model::Metrics {
            loss: eval_loss,
            accuracy: 0.5,
            targets: 10,
        };
        RoundRecord {
            round,
            ..RoundRecord::initial(&metrics, None, &[round as f32])
        }
    }

    #[test]
    fn a_commit_round_trips_weights_state_and_non_finite_history() {
        let dir = tempfile::tempdir().unwrap();
        let config = StrategyConfig::fedavg(2);
        let strategy = folio_fed::strategy::RobustFedAvg::new(config, 0);
        let mut state = strategy.initial_state(3);
        state.clip_bound = 0.75;
        let history = vec![record(0, 2.0), record(1, f64::NAN)];
        commit(dir.path(), &[1.0, 2.0, 3.0], &state, &history, 9).unwrap();
        let saved = load(dir.path(), config.server_optimizer, 3)
            .unwrap()
            .unwrap();
        assert_eq!(saved.weights, vec![1.0, 2.0, 3.0]);
        assert_eq!(saved.strategy, Some(state));
        assert_eq!(saved.completed_rounds(), 1);
        assert!(saved.history[1].eval_loss.is_nan());
        let file = std::fs::read_to_string(history_path(dir.path())).unwrap();
        assert_eq!(file.lines().count(), 2);
        assert!(
            load(dir.path(), config.server_optimizer, 4).is_err(),
            "another model size"
        );
    }

    #[test]
    fn server_moments_survive_a_new_learning_rate_but_not_a_new_optimizer() {
        let dir = tempfile::tempdir().unwrap();
        let adam = |lr| folio_fed::ServerOptimizerConfig::FedAdam {
            lr,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-6,
            bias_correction: false,
        };
        let config = StrategyConfig {
            server_optimizer: adam(1e-4),
            ..StrategyConfig::fedavg(2)
        };
        let strategy = folio_fed::strategy::RobustFedAvg::new(config, 0);
        let mut state = strategy.initial_state(2);
        state.optimizer.m = vec![0.5, -0.5];
        state.optimizer.v = vec![0.25, 0.125];
        commit(dir.path(), &[1.0, 2.0], &state, &[record(0, 2.0)], 0).unwrap();
        let lowered = load(dir.path(), adam(3e-5), 2).unwrap().unwrap();
        let moments = lowered.strategy.expect("moments kept").optimizer;
        assert_eq!(
            (moments.m, moments.v),
            (state.optimizer.m, state.optimizer.v)
        );
        assert_eq!(moments.config, adam(3e-5));
        let fedavg = load(dir.path(), folio_fed::ServerOptimizerConfig::fedavg(), 2);
        assert!(fedavg.unwrap().unwrap().strategy.is_none(), "fresh state");
    }

    #[test]
    fn a_state_from_before_committed_histories_reads_its_history_file() {
        let dir = tempfile::tempdir().unwrap();
        let weights = bytes_of(&[1.0, 2.0]);
        let views = vec![
            (
                "weights",
                TensorView::new(Dtype::F32, vec![2], &weights).unwrap(),
            ),
            (
                "server_m",
                TensorView::new(Dtype::F32, vec![0], &[]).unwrap(),
            ),
            (
                "server_v",
                TensorView::new(Dtype::F32, vec![0], &[]).unwrap(),
            ),
        ];
        let metadata = HashMap::from([("round".to_owned(), "1".to_owned())]);
        let bytes = safetensors::serialize(views, Some(metadata)).unwrap();
        std::fs::write(state_path(dir.path()), bytes).unwrap();
        // Round 2 was written to the history but never committed.
        let lines: String = (0..3)
            .map(|r| serde_json::to_string(&record(r, 1.0)).unwrap() + "\n")
            .collect();
        std::fs::write(history_path(dir.path()), lines).unwrap();
        let saved = load(dir.path(), folio_fed::ServerOptimizerConfig::fedavg(), 2)
            .unwrap()
            .unwrap();
        assert_eq!(
            saved.history.iter().map(|r| r.round).collect::<Vec<_>>(),
            [0, 1]
        );
        assert_eq!(
            saved.strategy, None,
            "no clipping bound saved: start afresh"
        );
    }
}
