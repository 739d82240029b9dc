//! The recurrence on CubeCL devices (WebGPU in the browser): one kernel a time
//! step forward and one backward, each computing its step's recurrent products
//! `h · U` (and `d · Uᵀ`) itself before the gate arithmetic, so that a step is one
//! GPU dispatch each way instead of dozens.

use burn::backend::ops::FloatTensorOps;
use burn::tensor::{Shape, Slice};
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::{empty_device_dtype, zeros_client};
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;
use cubecl::{calculate_cube_count_elemwise, cube};

use super::{GruBackend, GruGradients};

/// One step forward, one thread per (row, unit) of the batch: the unit's three
/// recurrent dot products `h · U[:, j]` (threads of consecutive units read
/// consecutive columns of `U`), then the gate arithmetic. Writes the new state to
/// `next` and, for the backward pass, h', z, r, ĥ and hh to `saved`.
#[cube(launch)]
fn gru_step_forward<F: Float>(
    x_proj: &Tensor<F>,
    recurrent_kernel: &Tensor<F>,
    bias: &Tensor<F>,
    prev: &Tensor<F>,
    saved: &mut Tensor<F>,
    next: &mut Tensor<F>,
    step: u32,
    #[define(F)] _dtype: ElemType,
) {
    let i = ABSOLUTE_POS;
    let batch = next.shape(0);
    let hidden = next.shape(1);
    let len = batch * hidden;
    if i >= len {
        terminate!();
    }
    let row = i / hidden;
    let j = i % hidden;
    let h3 = 3 * hidden;
    let mut hz = bias[j];
    let mut hr = bias[j + hidden];
    let mut hh = bias[j + 2 * hidden];
    for k in 0..hidden {
        let h = prev[row * hidden + k];
        let u = k * h3 + j;
        hz += h * recurrent_kernel[u];
        hr += h * recurrent_kernel[u + hidden];
        hh += h * recurrent_kernel[u + 2 * hidden];
    }
    let t = step as usize;
    let x = (t * batch + row) * h3 + j;
    let one = F::new(1.0);
    let z = one / (one + F::exp(F::new(0.0) - (x_proj[x] + hz)));
    let r = one / (one + F::exp(F::new(0.0) - (x_proj[x + hidden] + hr)));
    let candidate = F::tanh(x_proj[x + 2 * hidden] + r * hh);
    let new = candidate + z * (prev[i] - candidate);
    next[i] = new;
    let plane = saved.shape(1) * len;
    let at = t * len + i;
    saved[at] = new;
    saved[plane + at] = z;
    saved[2 * plane + at] = r;
    saved[3 * plane + at] = candidate;
    saved[4 * plane + at] = hh;
}

/// One step backward, one thread per (row, unit). The gradient reaching h'_t is
/// the loss's own (`d_states`) plus what step t + 1 sent back: `carry` (g ⊙ z) and
/// the recurrent projection's gradient through the kernel, `d_h_proj[t + 1] · Uᵀ`,
/// which this thread sums itself from `kernel_t` (Uᵀ, so that threads of
/// consecutive units read consecutive values). Writes the step's input- and
/// recurrent-projection gradients and its `carry` for step t − 1.
#[cube(launch)]
fn gru_step_backward<F: Float>(
    saved: &Tensor<F>,
    h0: &Tensor<F>,
    kernel_t: &Tensor<F>,
    d_states: &Tensor<F>,
    carry: &Tensor<F>,
    d_x_proj: &mut Tensor<F>,
    d_h_proj: &mut Tensor<F>,
    carry_next: &mut Tensor<F>,
    step: u32,
    #[define(F)] _dtype: ElemType,
) {
    let i = ABSOLUTE_POS;
    let batch = carry_next.shape(0);
    let hidden = carry_next.shape(1);
    let len = batch * hidden;
    if i >= len {
        terminate!();
    }
    let row = i / hidden;
    let j = i % hidden;
    let h3 = 3 * hidden;
    let t = step as usize;
    let steps = saved.shape(1);
    let mut g = d_states[t * len + i] + carry[i];
    if t + 1 < steps {
        let later = ((t + 1) * batch + row) * h3;
        for m in 0..h3 {
            g += d_h_proj[later + m] * kernel_t[m * hidden + j];
        }
    }
    let plane = steps * len;
    let at = t * len + i;
    let z = saved[plane + at];
    let r = saved[2 * plane + at];
    let candidate = saved[3 * plane + at];
    let hh = saved[4 * plane + at];
    let mut prev = h0[i];
    if t > 0 {
        prev = saved[at - len];
    }
    let one = F::new(1.0);
    let d_candidate = g * (one - z) * (one - candidate * candidate);
    let dr = d_candidate * hh * r * (one - r);
    let dz = g * (prev - candidate) * z * (one - z);
    let o = (t * batch + row) * h3 + j;
    d_x_proj[o] = dz;
    d_x_proj[o + hidden] = dr;
    d_x_proj[o + 2 * hidden] = d_candidate;
    d_h_proj[o] = dz;
    d_h_proj[o + hidden] = dr;
    d_h_proj[o + 2 * hidden] = d_candidate * r;
    carry_next[i] = g * z;
}

fn empty_like(reference: &CubeTensor, shape: Shape) -> CubeTensor {
    empty_device_dtype(
        reference.client.clone(),
        reference.device.clone(),
        shape,
        reference.dtype,
    )
}

/// Threads and blocks for one thread per (row, unit).
fn launch_grid(reference: &CubeTensor, len: usize) -> (CubeCount, CubeDim) {
    let cube_dim = CubeDim::new(&reference.client, len);
    (
        calculate_cube_count_elemwise(&reference.client, len, cube_dim),
        cube_dim,
    )
}

impl GruBackend for CubeBackend {
    fn gru_forward(
        x_proj: CubeTensor,
        h0: CubeTensor,
        recurrent_kernel: CubeTensor,
        recurrent_bias: CubeTensor,
    ) -> CubeTensor {
        let [steps, batch, h3] = x_proj.meta.shape().dims();
        let hidden = h3 / 3;
        let x_proj = into_contiguous(x_proj);
        let bias = into_contiguous(recurrent_bias);
        let saved = empty_like(&x_proj, Shape::new([5, steps, batch, hidden]));
        let (count, dim) = launch_grid(&x_proj, batch * hidden);
        let storage = burn::backend::cubecl::dtype_to_storage_type(x_proj.dtype);
        let recurrent_kernel = into_contiguous(recurrent_kernel);
        let mut state = into_contiguous(h0);
        for t in 0..steps {
            let next = empty_like(&state, Shape::new([batch, hidden]));
            gru_step_forward::launch(
                &x_proj.client,
                count.clone(),
                dim,
                x_proj.clone().into_tensor_arg(),
                recurrent_kernel.clone().into_tensor_arg(),
                bias.clone().into_tensor_arg(),
                state.into_tensor_arg(),
                saved.clone().into_tensor_arg(),
                next.clone().into_tensor_arg(),
                t as u32,
                storage,
            );
            state = next;
        }
        saved
    }

    fn gru_backward(
        saved: CubeTensor,
        h0: CubeTensor,
        recurrent_kernel: CubeTensor,
        d_states: CubeTensor,
    ) -> GruGradients<CubeBackend> {
        let [_, steps, batch, hidden] = saved.meta.shape().dims();
        let saved = into_contiguous(saved);
        let h0 = into_contiguous(h0);
        let d_states = into_contiguous(d_states);
        let kernel_t = into_contiguous(Self::float_transpose(recurrent_kernel));
        let d_x_proj = empty_like(&saved, Shape::new([steps, batch, 3 * hidden]));
        let d_h_proj = empty_like(&saved, Shape::new([steps, batch, 3 * hidden]));
        let mut carry = zeros_client(
            saved.client.clone(),
            saved.device.clone(),
            Shape::new([batch, hidden]),
            saved.dtype,
        );
        let (count, dim) = launch_grid(&saved, batch * hidden);
        let storage = burn::backend::cubecl::dtype_to_storage_type(saved.dtype);
        for t in (0..steps).rev() {
            let carry_next = empty_like(&saved, Shape::new([batch, hidden]));
            gru_step_backward::launch(
                &saved.client,
                count.clone(),
                dim,
                saved.clone().into_tensor_arg(),
                h0.clone().into_tensor_arg(),
                kernel_t.clone().into_tensor_arg(),
                d_states.clone().into_tensor_arg(),
                carry.into_tensor_arg(),
                d_x_proj.clone().into_tensor_arg(),
                d_h_proj.clone().into_tensor_arg(),
                carry_next.clone().into_tensor_arg(),
                t as u32,
                storage,
            );
            carry = carry_next;
        }
        // What reaches h0: step 0's carry and its recurrent projection through Uᵀ.
        let first = Self::float_reshape(
            Self::float_slice(d_h_proj.clone(), &[Slice::from(0..1)]),
            Shape::new([batch, 3 * hidden]),
        );
        let through = Self::float_matmul(first, kernel_t);
        GruGradients {
            x_proj: d_x_proj,
            h_proj: d_h_proj,
            h0: Self::float_add(carry, through),
        }
    }
}
