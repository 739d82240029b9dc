//! Loss, metrics and the local training step.

use burn::optim::grad_clipping::GradientClippingConfig;
use burn::optim::{AdamConfig, GradientsParams, ModuleOptimizer, SgdConfig};
use burn::prelude::*;
use burn::tensor::Transaction;
use burn::tensor::activation::log_softmax;
use folio_data::Batch;

use crate::model::CharRnn;
use crate::{ModelError, to_f32};

/// A batch on a device: inputs `[batch, steps]`, targets and mask flattened.
pub struct BatchTensors {
    pub inputs: Tensor<2, Int>,
    pub targets: Tensor<1, Int>,
    pub mask: Tensor<1>,
    /// Unmasked targets, known on the host.
    pub real_targets: usize,
}

impl BatchTensors {
    pub fn new(batch: &Batch, device: &Device) -> Self {
        let ids = |values: &[u32]| values.iter().map(|&v| i64::from(v)).collect::<Vec<_>>();
        let n = batch.batch_size * batch.seq_len;
        Self {
            inputs: Tensor::from_data(
                TensorData::new(ids(&batch.inputs), [batch.batch_size, batch.seq_len]),
                device,
            ),
            targets: Tensor::from_data(TensorData::new(ids(&batch.targets), [n]), device),
            mask: Tensor::from_data(TensorData::new(batch.mask.clone(), [n]), device),
            real_targets: batch.real_targets(),
        }
    }
}

/// Loss and accuracy of one or more batches, still on the device.
pub struct DeviceMetrics {
    /// Summed cross-entropy over unmasked targets, `[1]`.
    loss_sum: Tensor<1>,
    /// Unmasked targets whose argmax is right, `[1]`.
    correct: Tensor<1>,
    targets: usize,
}

impl DeviceMetrics {
    /// Sums two measurements on the device (no read).
    pub fn merge(self, other: DeviceMetrics) -> DeviceMetrics {
        DeviceMetrics {
            loss_sum: self.loss_sum + other.loss_sum,
            correct: self.correct + other.correct,
            targets: self.targets + other.targets,
        }
    }

    /// Reads both figures in one transaction (async, as WebGPU in wasm requires).
    pub async fn read(self) -> Result<Metrics, ModelError> {
        let data = Transaction::default()
            .register(self.loss_sum)
            .register(self.correct)
            .execute_async()
            .await
            .map_err(|err| ModelError::Device(format!("{err:?}")))?;
        let scalar =
            |d: &TensorData| -> Result<f64, ModelError> { Ok(f64::from(to_f32(d.clone())?[0])) };
        let targets = self.targets.max(1) as f64;
        Ok(Metrics {
            loss: scalar(&data[0])? / targets,
            accuracy: scalar(&data[1])? / targets,
            targets: self.targets,
        })
    }
}

/// Mean cross-entropy per target and flattened char accuracy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Metrics {
    pub loss: f64,
    pub accuracy: f64,
    pub targets: usize,
}

impl Metrics {
    /// The metrics of both measurements together (weighted by their targets).
    pub fn merge(self, other: Metrics) -> Metrics {
        let targets = self.targets + other.targets;
        let total = targets.max(1) as f64;
        let weigh = |a: f64, b: f64| (a * self.targets as f64 + b * other.targets as f64) / total;
        Metrics {
            loss: weigh(self.loss, other.loss),
            accuracy: weigh(self.accuracy, other.accuracy),
            targets,
        }
    }
}

/// Masked cross-entropy from logits: `(mean loss [1], metrics)`.
pub fn loss_and_metrics(logits: Tensor<3>, batch: &BatchTensors) -> (Tensor<1>, DeviceMetrics) {
    let [b, t, v] = logits.dims();
    let logits = logits.reshape([b * t, v]);
    let targets = batch.targets.clone();
    let log_probs = log_softmax(logits.clone(), 1);
    let nll = log_probs
        .gather(1, targets.clone().reshape([b * t, 1]))
        .reshape([b * t])
        .neg();
    let loss_sum = (nll * batch.mask.clone()).sum();
    let mean = loss_sum
        .clone()
        .div_scalar(batch.real_targets.max(1) as f32);
    let hits = logits.argmax(1).reshape([b * t]).equal(targets).float() * batch.mask.clone();
    let metrics = DeviceMetrics {
        loss_sum: loss_sum.detach(),
        correct: hits.sum(),
        targets: batch.real_targets,
    };
    (mean, metrics)
}

/// The client optimizer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OptimizerKind {
    Sgd,
    Adam,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainConfig {
    pub optimizer: OptimizerKind,
    pub learning_rate: f64,
    /// Clip the gradient's global L2 norm to this.
    pub clip_norm: Option<f32>,
}

impl TrainConfig {
    /// The tutorial's client optimizer: SGD, learning rate 0.5.
    pub fn tutorial() -> Self {
        Self {
            optimizer: OptimizerKind::Sgd,
            learning_rate: 0.5,
            clip_norm: None,
        }
    }
}

/// Trains a model in place, one batch a step.
pub struct Trainer {
    model: Option<CharRnn>,
    optimizer: ModuleOptimizer,
    config: TrainConfig,
}

impl Trainer {
    /// `model` must live on an autodiff device.
    pub fn new(model: CharRnn, config: TrainConfig) -> Self {
        let clipping = config.clip_norm.map(GradientClippingConfig::Norm);
        let optimizer = match config.optimizer {
            OptimizerKind::Sgd => SgdConfig::new().with_gradient_clipping(clipping).init(),
            OptimizerKind::Adam => AdamConfig::new().with_grad_clipping(clipping).init(),
        };
        Self {
            model: Some(model),
            optimizer,
            config,
        }
    }

    /// Changes the learning rate from the next step on (schedules).
    pub fn set_learning_rate(&mut self, learning_rate: f64) {
        self.config.learning_rate = learning_rate;
    }

    pub fn model(&self) -> &CharRnn {
        self.model
            .as_ref()
            .expect("the model is only out during a step")
    }

    pub fn into_model(mut self) -> CharRnn {
        self.model
            .take()
            .expect("the model is only out during a step")
    }

    /// One optimizer step on `batch`. Returns the batch's metrics before the step,
    /// unread: reading them is the caller's choice (and async).
    pub fn step(&mut self, batch: &Batch) -> DeviceMetrics {
        let model = self
            .model
            .take()
            .expect("the model is only out during a step");
        let device = model.embeddings.device();
        let tensors = BatchTensors::new(batch, &device);
        let (logits, _) = model.forward(tensors.inputs.clone(), None);
        let (loss, metrics) = loss_and_metrics(logits, &tensors);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        self.model = Some(self.optimizer.step(self.config.learning_rate, model, grads));
        metrics
    }
}

/// Mean loss on `batch` and the gradient of every weight, flat in parameter order:
/// what the GPU/CPU parity checks compare. `model` must live on an autodiff device.
pub async fn loss_and_gradients(
    model: &CharRnn,
    batch: &Batch,
) -> Result<(f32, Vec<f32>), ModelError> {
    let device = model.embeddings.device();
    let tensors = BatchTensors::new(batch, &device);
    let (logits, _) = model.forward(tensors.inputs.clone(), None);
    let (loss, _) = loss_and_metrics(logits, &tensors);
    let grads = loss.backward();
    let missing = || ModelError::Device("a weight got no gradient".into());
    let data = Transaction::default()
        .register(loss.inner())
        .register(model.embeddings.val().grad(&grads).ok_or_else(missing)?)
        .register(model.gru.kernel.val().grad(&grads).ok_or_else(missing)?)
        .register(
            model
                .gru
                .recurrent_kernel
                .val()
                .grad(&grads)
                .ok_or_else(missing)?,
        )
        .register(model.gru.bias.val().grad(&grads).ok_or_else(missing)?)
        .register(model.dense_kernel.val().grad(&grads).ok_or_else(missing)?)
        .register(model.dense_bias.val().grad(&grads).ok_or_else(missing)?)
        .execute_async()
        .await
        .map_err(|err| ModelError::Device(format!("{err:?}")))?;
    let mut data = data.into_iter();
    let loss = to_f32(data.next().ok_or_else(missing)?)?[0];
    let mut flat = Vec::with_capacity(model.config().num_params());
    for grad in data {
        flat.extend(to_f32(grad)?);
    }
    Ok((loss, flat))
}
