//! The recurrence on the pure-Rust CPU backend: flex's matmul for `h · U`, the gate
//! arithmetic of a step in one loop over the batch's rows.

use burn::backend::TensorMetadata;
use burn::backend::flex::{Flex, FlexTensor};
use burn::backend::ops::FloatTensorOps;
use burn::tensor::TensorData;

use super::{GruBackend, GruGradients};

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// The f32 values of a tensor, in row-major order.
fn values(tensor: &FlexTensor) -> std::borrow::Cow<'_, [f32]> {
    match tensor.as_slice::<f32>() {
        Some(slice) => slice.into(),
        None => tensor
            .to_contiguous()
            .as_slice::<f32>()
            .expect("the GRU runs in f32")
            .to_vec()
            .into(),
    }
}

fn tensor(values: Vec<f32>, shape: impl Into<Vec<usize>>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape.into()))
}

impl GruBackend for Flex {
    fn gru_forward(
        x_proj: FlexTensor,
        h0: FlexTensor,
        recurrent_kernel: FlexTensor,
        recurrent_bias: FlexTensor,
    ) -> FlexTensor {
        let [steps, batch, h3] = x_proj.shape().dims();
        let h = h3 / 3;
        let x = values(&x_proj);
        let bias = values(&recurrent_bias);
        let step_len = batch * h;
        // [5, steps, batch, h]: h', z, r, ĥ, hh.
        let mut saved = vec![0f32; 5 * steps * step_len];
        let mut state = h0;
        for t in 0..steps {
            let proj = Flex::float_matmul(state.clone(), recurrent_kernel.clone());
            let proj = values(&proj);
            let prev = values(&state);
            let mut next = vec![0f32; step_len];
            for row in 0..batch {
                let x = &x[(t * batch + row) * h3..][..h3];
                let p = &proj[row * h3..][..h3];
                for j in 0..h {
                    let z = sigmoid(x[j] + p[j] + bias[j]);
                    let r = sigmoid(x[h + j] + p[h + j] + bias[h + j]);
                    let hh = p[2 * h + j] + bias[2 * h + j];
                    let candidate = (x[2 * h + j] + r * hh).tanh();
                    let i = row * h + j;
                    let new = candidate + z * (prev[i] - candidate);
                    next[i] = new;
                    for (k, value) in [new, z, r, candidate, hh].into_iter().enumerate() {
                        saved[(k * steps + t) * step_len + i] = value;
                    }
                }
            }
            state = tensor(next, [batch, h]);
        }
        tensor(saved, [5, steps, batch, h])
    }

    fn gru_backward(
        saved: FlexTensor,
        h0: FlexTensor,
        recurrent_kernel: FlexTensor,
        d_states: FlexTensor,
    ) -> GruGradients<Flex> {
        let [_, steps, batch, h] = saved.shape().dims();
        let h3 = 3 * h;
        let step_len = batch * h;
        let saved = values(&saved);
        let h0 = values(&h0);
        let d_states = values(&d_states);
        let kernel_t = Flex::float_transpose(recurrent_kernel);
        let at = |k: usize, t: usize| &saved[(k * steps + t) * step_len..][..step_len];

        let mut d_x_proj = vec![0f32; steps * batch * h3];
        let mut d_h_proj = vec![0f32; steps * batch * h3];
        // The gradient reaching h_t from the steps after t.
        let mut carry = vec![0f32; step_len];
        for t in (0..steps).rev() {
            let (z, r, candidate, hh) = (at(1, t), at(2, t), at(3, t), at(4, t));
            let prev = if t == 0 { &h0[..] } else { at(0, t - 1) };
            let d_state = &d_states[t * step_len..][..step_len];
            let dx = &mut d_x_proj[t * batch * h3..][..batch * h3];
            let dp = &mut d_h_proj[t * batch * h3..][..batch * h3];
            for row in 0..batch {
                for j in 0..h {
                    let i = row * h + j;
                    let g = d_state[i] + carry[i];
                    let d_candidate = g * (1.0 - z[i]) * (1.0 - candidate[i] * candidate[i]);
                    let dr = d_candidate * hh[i] * r[i] * (1.0 - r[i]);
                    let dz = g * (prev[i] - candidate[i]) * z[i] * (1.0 - z[i]);
                    let o = row * h3;
                    (dx[o + j], dx[o + h + j], dx[o + 2 * h + j]) = (dz, dr, d_candidate);
                    (dp[o + j], dp[o + h + j], dp[o + 2 * h + j]) = (dz, dr, d_candidate * r[i]);
                    carry[i] = g * z[i];
                }
            }
            let through_kernel =
                Flex::float_matmul(tensor(dp.to_vec(), [batch, h3]), kernel_t.clone());
            for (c, m) in carry.iter_mut().zip(values(&through_kernel).iter()) {
                *c += m;
            }
        }
        GruGradients {
            x_proj: tensor(d_x_proj, [steps, batch, h3]),
            h_proj: tensor(d_h_proj, [steps, batch, h3]),
            h0: tensor(carry, [batch, h]),
        }
    }
}
