//! A GRU in Keras' layout (`reset_after = True`, gate order z, r, h):
//!
//! ```text
//! [xz xr xh] = x · kernel + bias[0]        [hz hr hh] = h · recurrent_kernel + bias[1]
//! z = σ(xz + hz)    r = σ(xr + hr)    ĥ = tanh(xh + r ⊙ hh)    h' = z ⊙ h + (1 − z) ⊙ ĥ
//! ```
//!
//! The input projection of every step is one matmul before the recurrence. The
//! recurrence itself is one backend operation, [`GruBackend::gru_sequence`], with a
//! hand-written backward pass: on a GPU each time step is one kernel forward and
//! one backward (recurrent dot products and gate arithmetic together), where
//! composing tensor ops (and letting autodiff differentiate each) costs dozens of
//! kernel dispatches a step. [`Gru::forward_stepwise`] is that composed version, kept as the reference
//! the fused operation is tested against.

mod autodiff;
#[cfg(feature = "webgpu")]
mod cube;
mod flex;
pub mod parity;

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, ExtensionType, TensorMetadata, backend_extension};
use burn::module::{Module, Param};
use burn::prelude::*;
use burn::tensor::activation::sigmoid;

/// What the recurrence's backward pass returns besides the parameter gradients.
#[derive(ExtensionType)]
pub struct GruGradients<B: Backend> {
    /// `[steps, batch, 3 × hidden]`: the loss's gradient at each step's input
    /// projection (the pre-activations' inputs, bias included).
    pub x_proj: FloatTensor<B>,
    /// `[steps, batch, 3 × hidden]`: at each step's recurrent projection
    /// `h · recurrent_kernel + bias[1]`; the recurrent kernel's gradient is
    /// `Σ h_prevᵀ · h_proj` and the recurrent bias's its sum.
    pub h_proj: FloatTensor<B>,
    /// `[batch, hidden]`: at the initial state.
    pub h0: FloatTensor<B>,
}

/// The GRU recurrence as one operation of the backend.
///
/// Shapes: `x_proj` `[steps, batch, 3H]` (time-major, input bias included), `h0`
/// `[batch, H]`, `recurrent_kernel` `[H, 3H]`, `recurrent_bias` `[1, 3H]`. What the
/// forward pass keeps for the backward one, `saved`, is `[5, steps, batch, H]`: the
/// new state h', z, r, ĥ and hh (the recurrent projection's candidate part).
#[backend_extension(Flex, Cube: cfg(feature = "webgpu"), Autodiff)]
pub trait GruBackend: Backend {
    /// Every step's state, `[steps, batch, H]`. Differentiable on autodiff devices.
    fn gru_sequence(
        x_proj: FloatTensor<Self>,
        h0: FloatTensor<Self>,
        recurrent_kernel: FloatTensor<Self>,
        recurrent_bias: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let saved = Self::gru_forward(x_proj, h0, recurrent_kernel, recurrent_bias);
        let [_, steps, batch, hidden] = saved.shape().dims();
        let states = Self::float_slice(saved, &[(0..1).into()]);
        Self::float_reshape(states, Shape::new([steps, batch, hidden]))
    }

    /// The forward pass: `saved`, `[5, steps, batch, H]`.
    fn gru_forward(
        x_proj: FloatTensor<Self>,
        h0: FloatTensor<Self>,
        recurrent_kernel: FloatTensor<Self>,
        recurrent_bias: FloatTensor<Self>,
    ) -> FloatTensor<Self>;

    /// The backward pass from the gradient at every step's state, `d_states`
    /// `[steps, batch, H]`.
    fn gru_backward(
        saved: FloatTensor<Self>,
        h0: FloatTensor<Self>,
        recurrent_kernel: FloatTensor<Self>,
        d_states: FloatTensor<Self>,
    ) -> GruGradients<Self>;
}

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

    /// Runs over `inputs` `[steps, batch, input]` (time-major) from `state`
    /// (zeros when `None`). Returns every step's state `[steps, batch, hidden]`
    /// and the last one.
    pub fn forward(&self, inputs: Tensor<3>, state: Option<Tensor<2>>) -> (Tensor<3>, Tensor<2>) {
        let [steps, batch, input] = inputs.dims();
        let h = self.hidden();
        let input_bias = self.bias.val().slice([0..1, 0..3 * h]);
        let recurrent_bias = self.bias.val().slice([1..2, 0..3 * h]);
        let x_proj = (inputs
            .reshape([steps * batch, input])
            .matmul(self.kernel.val())
            + input_bias)
            .reshape([steps, batch, 3 * h]);
        let h0 = state.unwrap_or_else(|| Tensor::zeros([batch, h], &self.kernel.device()));
        let states = Tensor::<3>::from_dispatch(Dispatch::gru_sequence(
            x_proj.into_dispatch(),
            h0.into_dispatch(),
            self.recurrent_kernel.val().into_dispatch(),
            recurrent_bias.into_dispatch(),
        ));
        let last = states
            .clone()
            .slice([steps - 1..steps, 0..batch, 0..h])
            .reshape([batch, h]);
        (states, last)
    }

    /// The same function composed of tensor operations, one step at a time, each
    /// differentiated by autodiff: the reference for [`forward`](Self::forward).
    pub fn forward_stepwise(
        &self,
        inputs: Tensor<3>,
        state: Option<Tensor<2>>,
    ) -> (Tensor<3>, Tensor<2>) {
        let [steps, batch, _] = inputs.dims();
        let h = self.hidden();
        let kernel = self.kernel.val();
        let recurrent_kernel = self.recurrent_kernel.val();
        let input_bias = self.bias.val().slice([0..1, 0..3 * h]);
        let recurrent_bias = self.bias.val().slice([1..2, 0..3 * h]);
        let device = self.kernel.device();

        let mut state = state.unwrap_or_else(|| Tensor::zeros([batch, h], &device));
        let mut states = Vec::with_capacity(steps);
        for t in 0..steps {
            let x = inputs
                .clone()
                .slice([t..t + 1, 0..batch])
                .squeeze_dim::<2>(0);
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
        (Tensor::stack(states, 0), state)
    }
}
