//! The fused recurrence against [`Gru::forward_stepwise`] on one device: what the
//! parity tests run, natively on flex and on WebGPU in the browser.

use burn::module::Param;
use burn::prelude::*;
use burn::tensor::Transaction;
use folio_data::rng::SplitMix64;

use super::Gru;
use crate::{ModelError, to_f32};

/// Sizes of one comparison.
#[derive(Debug, Clone, Copy)]
pub struct GruShape {
    pub steps: usize,
    pub batch: usize,
    pub input: usize,
    pub hidden: usize,
}

/// The largest difference between the two versions, relative to the largest value
/// of each compared tensor (so 1e-6 means agreement to about six digits).
#[derive(Debug, Clone, Copy)]
pub struct GruDifference {
    pub states: f32,
    /// Over the gradients of the inputs, initial state and all three weights.
    pub gradients: f32,
}

/// Runs both versions on seeded random weights, inputs and initial state, and a
/// loss that weighs every state and the last one differently, on `device` (an
/// autodiff device).
pub async fn compare_with_stepwise(
    device: &Device,
    shape: GruShape,
    seed: u64,
) -> Result<GruDifference, ModelError> {
    let mut rng = SplitMix64::new(seed);
    let mut random = |dims: Vec<usize>| {
        let n = dims.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|_| (rng.next_f64() * 2.0 - 1.0) as f32)
            .collect();
        TensorData::new(values, dims)
    };
    let GruShape {
        steps,
        batch,
        input,
        hidden,
    } = shape;
    let gru = Gru {
        kernel: Param::from_data(random(vec![input, 3 * hidden]), device),
        recurrent_kernel: Param::from_data(random(vec![hidden, 3 * hidden]), device),
        bias: Param::from_data(random(vec![2, 3 * hidden]), device),
    };
    let inputs_data = random(vec![steps, batch, input]);
    let h0_data = random(vec![batch, hidden]);
    let state_weights = Tensor::<3>::from_data(random(vec![steps, batch, hidden]), device);
    let last_weights = Tensor::<2>::from_data(random(vec![batch, hidden]), device);

    let mut runs = Vec::new();
    for fused in [true, false] {
        let inputs = Tensor::<3>::from_data(inputs_data.clone(), device).require_grad();
        let h0 = Tensor::<2>::from_data(h0_data.clone(), device).require_grad();
        let (states, last) = if fused {
            gru.forward(inputs.clone(), Some(h0.clone()))
        } else {
            gru.forward_stepwise(inputs.clone(), Some(h0.clone()))
        };
        let loss =
            (states.clone() * state_weights.clone()).sum() + (last * last_weights.clone()).sum();
        let grads = loss.backward();
        let missing = || ModelError::Device("a GRU input got no gradient".into());
        let data = Transaction::default()
            .register(states.inner())
            .register(inputs.grad(&grads).ok_or_else(missing)?)
            .register(h0.grad(&grads).ok_or_else(missing)?)
            .register(gru.kernel.val().grad(&grads).ok_or_else(missing)?)
            .register(
                gru.recurrent_kernel
                    .val()
                    .grad(&grads)
                    .ok_or_else(missing)?,
            )
            .register(gru.bias.val().grad(&grads).ok_or_else(missing)?)
            .execute_async()
            .await
            .map_err(|err| ModelError::Device(format!("{err:?}")))?;
        runs.push(
            data.into_iter()
                .map(to_f32)
                .collect::<Result<Vec<_>, _>>()?,
        );
    }
    let relative = |a: &[f32], b: &[f32]| {
        let scale = b.iter().fold(f32::MIN_POSITIVE, |m, x| m.max(x.abs()));
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs() / scale)
            .fold(0.0, f32::max)
    };
    let (fused, stepwise) = (&runs[0], &runs[1]);
    Ok(GruDifference {
        states: relative(&fused[0], &stepwise[0]),
        gradients: (1..fused.len())
            .map(|i| relative(&fused[i], &stepwise[i]))
            .fold(0.0, f32::max),
    })
}

/// Shapes every parity test runs: batch 1, odd hidden sizes, a single step.
pub const TEST_SHAPES: [GruShape; 3] = [
    GruShape {
        steps: 12,
        batch: 2,
        input: 8,
        hidden: 16,
    },
    GruShape {
        steps: 5,
        batch: 1,
        input: 3,
        hidden: 7,
    },
    GruShape {
        steps: 1,
        batch: 3,
        input: 4,
        hidden: 5,
    },
];

/// [`compare_with_stepwise`] at each shape (seeded by its place in `shapes`): an
/// error naming the shape where the versions differ by more than f32 rounding
/// allows (1e-5 for the states, 1e-4 for the gradients).
pub async fn check_shapes(device: &Device, shapes: &[GruShape]) -> Result<(), String> {
    for (seed, &shape) in shapes.iter().enumerate() {
        let d = compare_with_stepwise(device, shape, seed as u64)
            .await
            .map_err(|err| format!("{shape:?}: {err}"))?;
        if !(d.states < 1e-5 && d.gradients < 1e-4) {
            return Err(format!("{shape:?}: {d:?}"));
        }
    }
    Ok(())
}
