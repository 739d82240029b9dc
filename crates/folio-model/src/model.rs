//! The char-RNN: Embedding → GRU → Dense, parameters in Keras' names and layout.

use burn::module::{Module, Param};
use burn::prelude::*;
use burn::tensor::Transaction;
use folio_data::rng::SplitMix64;

use crate::config::ModelConfig;
use crate::gru::Gru;
use crate::{ModelError, to_f32};

#[derive(Module, Debug)]
pub struct CharRnn {
    /// Keras `embedding/embeddings`, `[vocab, embed]`.
    pub embeddings: Param<Tensor<2>>,
    pub gru: Gru,
    /// Keras `dense/kernel`, `[hidden, vocab]`.
    pub dense_kernel: Param<Tensor<2>>,
    /// Keras `dense/bias`, `[vocab]`.
    pub dense_bias: Param<Tensor<1>>,
}

impl CharRnn {
    /// Fresh weights, Keras' defaults: embeddings U(−0.05, 0.05), kernels Glorot
    /// uniform (the recurrent kernel too, where Keras uses orthogonal), zero biases.
    /// Drawn on the host from `seed`, so every backend starts from the same weights.
    pub fn init(config: ModelConfig, seed: u64, device: &Device) -> Self {
        let mut rng = SplitMix64::new(seed);
        let flat: Vec<f32> = config
            .param_shapes()
            .iter()
            .flat_map(|(name, shape)| {
                let n: usize = shape.iter().product();
                let limit = match (*name, shape.as_slice()) {
                    ("embedding/embeddings", _) => 0.05,
                    (_, [fan_in, fan_out]) if name.ends_with("kernel") => {
                        (6.0 / (fan_in + fan_out) as f64).sqrt()
                    }
                    _ => 0.0,
                };
                (0..n)
                    .map(|_| ((rng.next_f64() * 2.0 - 1.0) * limit) as f32)
                    .collect::<Vec<_>>()
            })
            .collect();
        Self::from_flat(config, &flat, device).expect("init builds the right number of weights")
    }

    pub fn config(&self) -> ModelConfig {
        let [vocab, embed] = self.embeddings.dims();
        ModelConfig {
            vocab,
            embed,
            hidden: self.gru.hidden(),
        }
    }

    /// Logits `[batch, steps, vocab]` for `ids` `[batch, steps]`, from `state`
    /// (`[batch, hidden]`, zeros when `None`), and the state after the last step.
    pub fn forward(&self, ids: Tensor<2, Int>, state: Option<Tensor<2>>) -> (Tensor<3>, Tensor<2>) {
        let [batch, steps] = ids.dims();
        // Time-major: the recurrence reads one contiguous [batch, embed] block a step.
        let ids = ids.swap_dims(0, 1).reshape([steps * batch]);
        let inputs =
            self.embeddings
                .val()
                .select(0, ids)
                .reshape([steps, batch, self.config().embed]);
        let (states, last) = self.gru.forward(inputs, state);
        let hidden = self.gru.hidden();
        let logits = states
            .swap_dims(0, 1)
            .reshape([batch * steps, hidden])
            .matmul(self.dense_kernel.val())
            + self.dense_bias.val().unsqueeze::<2>();
        (logits.reshape([batch, steps, self.config().vocab]), last)
    }

    /// Every weight in one buffer, in [`ModelConfig::param_shapes`] order. One
    /// device read (async: WebGPU in wasm allows no other kind).
    pub async fn to_flat(&self) -> Result<Vec<f32>, ModelError> {
        let data = Transaction::default()
            .register(self.embeddings.val())
            .register(self.gru.kernel.val())
            .register(self.gru.recurrent_kernel.val())
            .register(self.gru.bias.val())
            .register(self.dense_kernel.val())
            .register(self.dense_bias.val())
            .execute_async()
            .await
            .map_err(|err| ModelError::Device(format!("{err:?}")))?;
        let mut flat = Vec::with_capacity(self.config().num_params());
        for tensor in data {
            flat.extend(to_f32(tensor)?);
        }
        Ok(flat)
    }

    /// The model whose [`to_flat`](Self::to_flat) is `flat`, on `device`.
    pub fn from_flat(
        config: ModelConfig,
        flat: &[f32],
        device: &Device,
    ) -> Result<Self, ModelError> {
        let expected = config.num_params();
        if flat.len() != expected {
            return Err(ModelError::WrongLength {
                expected,
                found: flat.len(),
            });
        }
        let mut rest = flat;
        let mut take = |shape: &[usize]| {
            let (head, tail) = rest.split_at(shape.iter().product());
            rest = tail;
            TensorData::new(head.to_vec(), shape.to_vec())
        };
        let shapes = config.param_shapes();
        let param2 = |data: TensorData| Param::from_tensor(Tensor::<2>::from_data(data, device));
        let embeddings = param2(take(&shapes[0].1));
        let gru = Gru {
            kernel: param2(take(&shapes[1].1)),
            recurrent_kernel: param2(take(&shapes[2].1)),
            bias: param2(take(&shapes[3].1)),
        };
        let dense_kernel = param2(take(&shapes[4].1));
        let dense_bias = Param::from_tensor(Tensor::<1>::from_data(take(&shapes[5].1), device));
        Ok(Self {
            embeddings,
            gru,
            dense_kernel,
            dense_bias,
        })
    }
}
