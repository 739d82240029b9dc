//! A GRU in Keras' layout (`reset_after = True`, gate order z, r, h):
//!
//! ```text
//! [xz xr xh] = x · kernel + bias[0]        [hz hr hh] = h · recurrent_kernel + bias[1]
//! z = σ(xz + hz)    r = σ(xr + hr)    ĥ = tanh(xh + r ⊙ hh)    h' = z ⊙ h + (1 − z) ⊙ ĥ
//! ```
//!
//! Unlike `burn::nn::Gru` (three gate modules, six matmuls a step, the output
//! written into a preallocated tensor step by step) it does two matmuls a step and
//! stacks the states once, and it returns the last state for stateful generation.

use burn::module::{Module, Param};
use burn::prelude::*;
use burn::tensor::activation::sigmoid;

#[derive(Module, Debug)]
pub struct Gru {
    /// `[input, 3 × hidden]`.
    pub kernel: Param<Tensor<2>>,
    /// `[hidden, 3 × hidden]`.
    pub recurrent_kernel: Param<Tensor<2>>,
    /// `[2, 3 × hidden]`: input bias, then recurrent bias.
    pub bias: Param<Tensor<2>>,
}

impl Gru {
    pub fn hidden(&self) -> usize {
        self.recurrent_kernel.dims()[0]
    }

    /// Runs over `inputs` (one `[batch, input]` tensor per step) from `state`
    /// (zeros when `None`). Returns every step's state `[batch, steps, hidden]`
    /// and the last one.
    pub fn forward(
        &self,
        inputs: Vec<Tensor<2>>,
        state: Option<Tensor<2>>,
    ) -> (Tensor<3>, Tensor<2>) {
        let h = self.hidden();
        let batch = inputs.first().map_or(0, |x| x.dims()[0]);
        let device = self.kernel.device();
        let kernel = self.kernel.val();
        let recurrent_kernel = self.recurrent_kernel.val();
        let input_bias = self.bias.val().slice([0..1, 0..3 * h]);
        let recurrent_bias = self.bias.val().slice([1..2, 0..3 * h]);

        let mut state = state.unwrap_or_else(|| Tensor::zeros([batch, h], &device));
        let mut states = Vec::with_capacity(inputs.len());
        for x in inputs {
            let x_proj = x.matmul(kernel.clone()) + input_bias.clone();
            let h_proj = state.clone().matmul(recurrent_kernel.clone()) + recurrent_bias.clone();
            let gate =
                |proj: &Tensor<2>, g: usize| proj.clone().slice([0..batch, g * h..(g + 1) * h]);
            let z = sigmoid(gate(&x_proj, 0) + gate(&h_proj, 0));
            let r = sigmoid(gate(&x_proj, 1) + gate(&h_proj, 1));
            let candidate = (gate(&x_proj, 2) + r * gate(&h_proj, 2)).tanh();
            // z ⊙ h + (1 − z) ⊙ ĥ, written with one product fewer.
            state = candidate.clone() + z * (state - candidate);
            states.push(state.clone());
        }
        (Tensor::stack(states, 1), state)
    }
}
