//! The recurrence on CubeCL devices (WebGPU in the browser): per time step one
//! matmul `h · U` and one kernel for the gate arithmetic, forward and backward, so
//! a step is a handful of GPU dispatches instead of dozens.

use burn::backend::ops::FloatTensorOps;
use burn::tensor::Shape;
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::{empty_device_dtype, zeros_client};
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;
use cubecl::{calculate_cube_count_elemwise, cube};

use super::{GruBackend, GruGradients};

/// One step forward for every (row, unit) of the batch: reads the step's input
/// projection, the recurrent projection `h · U` and the previous state; writes the
/// new state to `next` and, for the backward pass, h', z, r, ĥ and hh to `saved`.
#[cube(launch)]
fn gru_step_forward<F: Float>(
    x_proj: &Tensor<F>,
    h_times_kernel: &Tensor<F>,
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
    let t = step as usize;
    let x = (t * batch + row) * 3 * hidden + j;
    let p = row * 3 * hidden + j;
    let one = F::new(1.0);
    let z = one / (one + F::exp(F::new(0.0) - (x_proj[x] + h_times_kernel[p] + bias[j])));
    let r = one
        / (one
            + F::exp(
                F::new(0.0) - (x_proj[x + hidden] + h_times_kernel[p + hidden] + bias[j + hidden]),
            ));
    let hh = h_times_kernel[p + 2 * hidden] + bias[j + 2 * hidden];
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

/// One step backward: the gradient reaching h'_t is the loss's own (`d_states`)
/// plus what steps after t sent back (`carry` = g ⊙ z and `through` = d(h·U) · Uᵀ
/// of step t + 1). Writes the step's input- and recurrent-projection gradients (the
/// latter also to `d_h_proj_step`, the next matmul's contiguous input) and this
/// step's `carry` for step t − 1.
#[cube(launch)]
fn gru_step_backward<F: Float>(
    saved: &Tensor<F>,
    h0: &Tensor<F>,
    d_states: &Tensor<F>,
    carry: &Tensor<F>,
    through: &Tensor<F>,
    d_x_proj: &mut Tensor<F>,
    d_h_proj: &mut Tensor<F>,
    d_h_proj_step: &mut Tensor<F>,
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
    let t = step as usize;
    let plane = saved.shape(1) * len;
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
    let g = d_states[at] + carry[i] + through[i];
    let d_candidate = g * (one - z) * (one - candidate * candidate);
    let dr = d_candidate * hh * r * (one - r);
    let dz = g * (prev - candidate) * z * (one - z);
    let o = (t * batch + row) * 3 * hidden + j;
    d_x_proj[o] = dz;
    d_x_proj[o + hidden] = dr;
    d_x_proj[o + 2 * hidden] = d_candidate;
    d_h_proj[o] = dz;
    d_h_proj[o + hidden] = dr;
    d_h_proj[o + 2 * hidden] = d_candidate * r;
    let s = row * 3 * hidden + j;
    d_h_proj_step[s] = dz;
    d_h_proj_step[s + hidden] = dr;
    d_h_proj_step[s + 2 * hidden] = d_candidate * r;
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
        let mut state = into_contiguous(h0);
        for t in 0..steps {
            let projected =
                into_contiguous(Self::float_matmul(state.clone(), recurrent_kernel.clone()));
            let next = empty_like(&state, Shape::new([batch, hidden]));
            gru_step_forward::launch(
                &x_proj.client,
                count.clone(),
                dim,
                x_proj.clone().into_tensor_arg(),
                projected.into_tensor_arg(),
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
        let kernel_t = Self::float_transpose(recurrent_kernel);
        let d_x_proj = empty_like(&saved, Shape::new([steps, batch, 3 * hidden]));
        let d_h_proj = empty_like(&saved, Shape::new([steps, batch, 3 * hidden]));
        let zeros = || {
            zeros_client(
                saved.client.clone(),
                saved.device.clone(),
                Shape::new([batch, hidden]),
                saved.dtype,
            )
        };
        let (mut carry, mut through) = (zeros(), zeros());
        let (count, dim) = launch_grid(&saved, batch * hidden);
        let storage = burn::backend::cubecl::dtype_to_storage_type(saved.dtype);
        for t in (0..steps).rev() {
            let d_h_proj_step = empty_like(&saved, Shape::new([batch, 3 * hidden]));
            let carry_next = empty_like(&saved, Shape::new([batch, hidden]));
            gru_step_backward::launch(
                &saved.client,
                count.clone(),
                dim,
                saved.clone().into_tensor_arg(),
                h0.clone().into_tensor_arg(),
                d_states.clone().into_tensor_arg(),
                carry.into_tensor_arg(),
                through.into_tensor_arg(),
                d_x_proj.clone().into_tensor_arg(),
                d_h_proj.clone().into_tensor_arg(),
                d_h_proj_step.clone().into_tensor_arg(),
                carry_next.clone().into_tensor_arg(),
                t as u32,
                storage,
            );
            carry = carry_next;
            through = into_contiguous(Self::float_matmul(d_h_proj_step, kernel_t.clone()));
        }
        GruGradients {
            x_proj: d_x_proj,
            h_proj: d_h_proj,
            h0: Self::float_add(carry, through),
        }
    }
}
