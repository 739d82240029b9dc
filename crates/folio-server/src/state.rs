//! What survives a restart: the global weights, the server optimizer's state and
//! the round number (one safetensors file, replaced atomically after every round),
//! and the metrics history (one JSON line per round). Client sampling is a pure
//! function of the seed and the round number, so the round number is its state.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use folio_fed::{ServerOptimizer, ServerOptimizerConfig};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::federation::RoundRecord;

pub struct SavedState {
    pub completed_rounds: u64,
    pub weights: Vec<f32>,
    pub optimizer: ServerOptimizer,
}

pub fn state_path(dir: &Path) -> PathBuf {
    dir.join("state.safetensors")
}

pub fn history_path(dir: &Path) -> PathBuf {
    dir.join("metrics.jsonl")
}

fn bytes_of(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

pub fn save(
    dir: &Path,
    completed_rounds: u64,
    weights: &[f32],
    optimizer: &ServerOptimizer,
    seed: u64,
) -> anyhow::Result<()> {
    let buffers = [
        ("weights", bytes_of(weights)),
        ("server_m", bytes_of(&optimizer.m)),
        ("server_v", bytes_of(&optimizer.v)),
    ];
    let views = buffers
        .iter()
        .map(|(name, bytes)| {
            Ok((
                *name,
                TensorView::new(Dtype::F32, vec![bytes.len() / 4], bytes)?,
            ))
        })
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    let metadata = HashMap::from([
        ("round".to_owned(), completed_rounds.to_string()),
        ("seed".to_owned(), seed.to_string()),
        (
            "server_optimizer".to_owned(),
            serde_json::to_string(&optimizer.config)?,
        ),
    ]);
    let bytes = safetensors::serialize(views, Some(metadata))?;
    let path = state_path(dir);
    let partial = path.with_extension("partial");
    std::fs::write(&partial, bytes)
        .with_context(|| format!("cannot write {}", partial.display()))?;
    std::fs::rename(&partial, &path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// The saved state, if `dir` has one. An optimizer configured differently from the
/// saved one starts afresh (its moments belong to another rule).
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
    let tensors = SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{} is corrupt", path.display()))?;
    let (_, header) = SafeTensors::read_metadata(&bytes)?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let read = |name: &str| -> anyhow::Result<Vec<f32>> {
        let view = tensors
            .tensor(name)
            .with_context(|| format!("{} has no `{name}`", path.display()))?;
        Ok(view
            .data()
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
    let saved_config: Option<ServerOptimizerConfig> = metadata
        .get("server_optimizer")
        .and_then(|json| serde_json::from_str(json).ok());
    let optimizer = if saved_config == Some(optimizer) {
        ServerOptimizer {
            config: optimizer,
            m: read("server_m")?,
            v: read("server_v")?,
        }
    } else {
        ServerOptimizer::new(optimizer, num_params)
    };
    let completed_rounds = metadata
        .get("round")
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    Ok(Some(SavedState {
        completed_rounds,
        weights,
        optimizer,
    }))
}

pub fn append_history(dir: &Path, record: &RoundRecord) -> anyhow::Result<()> {
    let path = history_path(dir);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    writeln!(file, "{}", serde_json::to_string(record)?)?;
    Ok(())
}

/// The history of rounds up to `completed_rounds` (later lines, from a round that
/// was not checkpointed, are dropped).
pub fn load_history(dir: &Path, completed_rounds: u64) -> Vec<RoundRecord> {
    std::fs::read_to_string(history_path(dir))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str::<RoundRecord>(line).ok())
        .filter(|record| record.round <= completed_rounds)
        .collect()
}
