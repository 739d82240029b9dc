//! Checkpoints in safetensors, with Keras' tensor names (see [`ModelConfig::param_shapes`])
//! and the model's shape and vocabulary in the metadata.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use folio_data::vocab::VOCAB;
use half::f16;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::ModelError;
use crate::config::ModelConfig;

/// Number format of the stored weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    F32,
    /// Half the size; weights round to 11 significant bits.
    F16,
}

/// A loaded checkpoint: the weights as a flat buffer plus metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub config: ModelConfig,
    pub weights: Vec<f32>,
    /// Everything in the file's metadata (shape keys included).
    pub metadata: BTreeMap<String, String>,
}

const FORMAT: &str = "folio-char-rnn/1";

/// Serialises weights (flat, in parameter order) with `extra` metadata.
pub fn encode(
    config: ModelConfig,
    weights: &[f32],
    precision: Precision,
    extra: &BTreeMap<String, String>,
) -> Result<Vec<u8>, ModelError> {
    if weights.len() != config.num_params() {
        return Err(ModelError::WrongLength {
            expected: config.num_params(),
            found: weights.len(),
        });
    }
    let mut rest = weights;
    let mut buffers = Vec::new();
    for (name, shape) in config.param_shapes() {
        let (head, tail) = rest.split_at(shape.iter().product());
        rest = tail;
        let bytes: Vec<u8> = match precision {
            Precision::F32 => head.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Precision::F16 => head
                .iter()
                .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                .collect(),
        };
        buffers.push((name, shape, bytes));
    }
    let dtype = match precision {
        Precision::F32 => Dtype::F32,
        Precision::F16 => Dtype::F16,
    };
    let views = buffers
        .iter()
        .map(|(name, shape, bytes)| Ok((*name, TensorView::new(dtype, shape.clone(), bytes)?)))
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    let mut metadata: HashMap<String, String> = extra.clone().into_iter().collect();
    metadata.insert("format".into(), FORMAT.into());
    metadata.insert("vocab".into(), VOCAB.into());
    metadata.insert("vocab_size".into(), config.vocab.to_string());
    metadata.insert("embed".into(), config.embed.to_string());
    metadata.insert("hidden".into(), config.hidden.to_string());
    Ok(safetensors::serialize(views, Some(metadata))?)
}

/// Parses a checkpoint and checks every tensor against the shapes its metadata
/// declares (and against `expected`, when given).
pub fn decode(bytes: &[u8], expected: Option<ModelConfig>) -> Result<Checkpoint, ModelError> {
    let tensors = SafeTensors::deserialize(bytes)?;
    let (_, header) = SafeTensors::read_metadata(bytes)?;
    let metadata: BTreeMap<String, String> = header
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let field = |key: &str| -> Result<usize, ModelError> {
        metadata
            .get(key)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| {
                ModelError::Checkpoint(format!(
                    "metadata has no valid `{key}`: not a folio checkpoint?"
                ))
            })
    };
    let config = ModelConfig {
        vocab: field("vocab_size")?,
        embed: field("embed")?,
        hidden: field("hidden")?,
    };
    if let Some(expected) = expected
        && expected != config
    {
        return Err(ModelError::Checkpoint(format!(
            "checkpoint holds a model of {config:?}, expected {expected:?}"
        )));
    }
    if metadata.get("vocab").is_some_and(|v| v != VOCAB) {
        return Err(ModelError::Checkpoint(
            "checkpoint was trained with another vocabulary".into(),
        ));
    }
    let mut weights = Vec::with_capacity(config.num_params());
    for (name, shape) in config.param_shapes() {
        let view = tensors
            .tensor(name)
            .map_err(|_| ModelError::Checkpoint(format!("tensor `{name}` is missing")))?;
        if view.shape() != shape.as_slice() {
            return Err(ModelError::Checkpoint(format!(
                "tensor `{name}` has shape {:?}, expected {shape:?}",
                view.shape()
            )));
        }
        match view.dtype() {
            Dtype::F32 => weights.extend(
                view.data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            ),
            Dtype::F16 => weights.extend(
                view.data()
                    .chunks_exact(2)
                    .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()),
            ),
            other => {
                return Err(ModelError::Checkpoint(format!(
                    "tensor `{name}` is {other:?}; f32 and f16 are supported"
                )));
            }
        }
    }
    if let Some(bad) = weights.iter().position(|w| !w.is_finite()) {
        return Err(ModelError::Checkpoint(format!(
            "weight {bad} is not finite"
        )));
    }
    Ok(Checkpoint {
        config,
        weights,
        metadata,
    })
}

/// [`encode`] to a file (written beside it, then renamed: a crash never leaves half a file).
pub fn save(
    path: &Path,
    config: ModelConfig,
    weights: &[f32],
    precision: Precision,
    extra: &BTreeMap<String, String>,
) -> Result<(), ModelError> {
    let bytes = encode(config, weights, precision, extra)?;
    let partial = path.with_extension("partial");
    let io = |source| ModelError::Io {
        path: path.to_owned(),
        source,
    };
    std::fs::write(&partial, bytes).map_err(io)?;
    std::fs::rename(&partial, path).map_err(io)
}

/// [`decode`] from a file.
pub fn load(path: &Path, expected: Option<ModelConfig>) -> Result<Checkpoint, ModelError> {
    let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
        path: path.to_owned(),
        source,
    })?;
    decode(&bytes, expected)
        .map_err(|err| ModelError::Checkpoint(format!("{}: {err}", path.display())))
}
