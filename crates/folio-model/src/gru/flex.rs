//! The recurrence on the pure-Rust CPU backend: flex's gemm for `h · U` and
//! `d · Uᵀ`, the gate arithmetic of a step in loops over each row's units that the
//! compiler vectorizes (a branch-free exp, no calls; 4 lanes with SSE2 natively
//! and with simd128 in wasm).

use burn::backend::TensorMetadata;
use burn::backend::flex::{Flex, FlexTensor};
use burn::backend::ops::FloatTensorOps;
use burn::tensor::TensorData;

use super::{GruBackend, GruGradients};

/// e^x in f32 within 2 ulp for |x| < 87 (saturating beyond): 2^n · e^r with
/// n = round(x / ln 2), found by the 1.5 · 2^23 rounding trick so that no call or
/// branch stops vectorization, and e^r, |r| ≤ ln 2 / 2, by Cephes' polynomial.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 87.0);
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let e_r = p * r * r + r + 1.0;
    let two_n =
        f32::from_bits((shifted.to_bits() as i32 - 0x4B40_0000 + 127).wrapping_shl(23) as u32);
    e_r * two_n
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

#[inline(always)]
fn tanh(x: f32) -> f32 {
    1.0 - 2.0 / (1.0 + exp(2.0 * x))
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
        let (bz, br, bh) = (&bias[..h], &bias[h..2 * h], &bias[2 * h..3 * h]);
        let step_len = batch * h;
        // The five planes of `saved`: h', z, r, ĥ, hh, each [steps, batch, h].
        let mut planes: [Vec<f32>; 5] = std::array::from_fn(|_| vec![0f32; steps * step_len]);
        let mut state = h0;
        for t in 0..steps {
            let proj = Flex::float_matmul(state.clone(), recurrent_kernel.clone());
            let proj = values(&proj);
            let prev = values(&state);
            let mut next = vec![0f32; step_len];
            for row in 0..batch {
                let x = &x[(t * batch + row) * h3..][..h3];
                let p = &proj[row * h3..][..h3];
                let (xz, xr, xh) = (&x[..h], &x[h..2 * h], &x[2 * h..]);
                let (pz, pr, ph) = (&p[..h], &p[h..2 * h], &p[2 * h..]);
                let prev = &prev[row * h..][..h];
                let at = t * step_len + row * h;
                let [new, z, r, candidate, hh] = &mut planes;
                let (new, z, r) = (&mut new[at..][..h], &mut z[at..][..h], &mut r[at..][..h]);
                let (candidate, hh) = (&mut candidate[at..][..h], &mut hh[at..][..h]);
                for j in 0..h {
                    z[j] = sigmoid(xz[j] + pz[j] + bz[j]);
                    r[j] = sigmoid(xr[j] + pr[j] + br[j]);
                    hh[j] = ph[j] + bh[j];
                    candidate[j] = tanh(xh[j] + r[j] * hh[j]);
                    new[j] = candidate[j] + z[j] * (prev[j] - candidate[j]);
                }
                next[row * h..][..h].copy_from_slice(new);
            }
            state = tensor(next, [batch, h]);
        }
        tensor(planes.concat(), [5, steps, batch, h])
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
                let span = row * h..(row + 1) * h;
                let (z, r, candidate) =
                    (&z[span.clone()], &r[span.clone()], &candidate[span.clone()]);
                let (hh, prev, d_state) = (
                    &hh[span.clone()],
                    &prev[span.clone()],
                    &d_state[span.clone()],
                );
                let carry = &mut carry[span];
                let (dxz, rest) = dx[row * h3..][..h3].split_at_mut(h);
                let (dxr, dxh) = rest.split_at_mut(h);
                let (dpz, rest) = dp[row * h3..][..h3].split_at_mut(h);
                let (dpr, dph) = rest.split_at_mut(h);
                for j in 0..h {
                    let g = d_state[j] + carry[j];
                    let d_candidate = g * (1.0 - z[j]) * (1.0 - candidate[j] * candidate[j]);
                    let dr = d_candidate * hh[j] * r[j] * (1.0 - r[j]);
                    let dz = g * (prev[j] - candidate[j]) * z[j] * (1.0 - z[j]);
                    (dxz[j], dxr[j], dxh[j]) = (dz, dr, d_candidate);
                    (dpz[j], dpr[j], dph[j]) = (dz, dr, d_candidate * r[j]);
                    carry[j] = g * z[j];
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

#[cfg(test)]
mod tests {
    #[test]
    fn the_branch_free_exp_is_within_two_ulp_of_std() {
        let mut x = -87.0f32;
        while x < 87.0 {
            let (ours, std) = (super::exp(x), x.exp());
            assert!(
                (ours - std).abs() <= 2.0 * f32::EPSILON * std,
                "exp({x}): {ours} vs {std}"
            );
            x += 0.001_3;
        }
        assert_eq!(super::exp(-200.0), super::exp(-87.0));
        assert!(super::tanh(50.0) == 1.0 && super::tanh(-50.0) == -1.0);
    }
}
