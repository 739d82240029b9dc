//! Delta encodings: what a client sends, chosen by the server per round.
//!
//! - `F32`: exact, 4 bytes a value;
//! - `F16`: 2 bytes a value, ≈3 significant digits;
//! - `Int8`: per tensor, a little-endian f32 scale (max |x| / 127) then one `i8` a
//!   value: ≈1 byte a value, error ≤ scale / 2.
//!
//! Tensor boundaries (`segments`, lengths in parameter order) come from the model,
//! so a scale covers one tensor's range, not the whole model's.

use half::f16;
use serde::{Deserialize, Serialize};

use crate::FedError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Encoding {
    F32,
    F16,
    Int8,
}

impl Encoding {
    pub const ALL: [Encoding; 3] = [Encoding::F32, Encoding::F16, Encoding::Int8];

    /// A one-byte name, stable across versions (its place in [`Encoding::ALL`]).
    pub fn tag(self) -> u8 {
        self as u8
    }

    pub fn from_tag(tag: u8) -> Option<Encoding> {
        Encoding::ALL.get(usize::from(tag)).copied()
    }

    /// Bytes an encoded buffer of these tensors takes.
    pub fn encoded_len(self, segments: &[usize]) -> usize {
        let values: usize = segments.iter().sum();
        match self {
            Encoding::F32 => 4 * values,
            Encoding::F16 => 2 * values,
            Encoding::Int8 => 4 * segments.len() + values,
        }
    }
}

/// Encodes `values` (the tensors of `segments`, back to back).
pub fn encode(values: &[f32], segments: &[usize], encoding: Encoding) -> Vec<u8> {
    assert_eq!(
        values.len(),
        segments.iter().sum::<usize>(),
        "segments do not cover the values"
    );
    let mut out = Vec::with_capacity(encoding.encoded_len(segments));
    match encoding {
        Encoding::F32 => out.extend(values.iter().flat_map(|v| v.to_le_bytes())),
        Encoding::F16 => out.extend(values.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes())),
        Encoding::Int8 => {
            let mut rest = values;
            for &len in segments {
                let (tensor, tail) = rest.split_at(len);
                rest = tail;
                let max = tensor.iter().fold(0f32, |m, v| m.max(v.abs()));
                let scale = if max > 0.0 && max.is_finite() {
                    max / 127.0
                } else {
                    1.0
                };
                out.extend(scale.to_le_bytes());
                out.extend(
                    tensor
                        .iter()
                        .map(|v| (v / scale).round().clamp(-127.0, 127.0) as i8 as u8),
                );
            }
        }
    }
    out
}

/// Decodes what [`encode`] made, checking its length and that every value is finite.
pub fn decode(bytes: &[u8], segments: &[usize], encoding: Encoding) -> Result<Vec<f32>, FedError> {
    check(bytes, segments, encoding)?;
    let mut values = vec![0f32; segments.iter().sum()];
    add_scaled(bytes, segments, encoding, 1.0, &mut values);
    Ok(values)
}

/// A delta as a client sent it, checked (its length, every value finite) and
/// measured (its L2 norm) in one pass over its bytes, but not decoded: the
/// aggregator folds it into the round's sum straight from those bytes.
#[derive(Debug, Clone)]
pub struct CheckedDelta {
    bytes: Vec<u8>,
    segments: Vec<usize>,
    encoding: Encoding,
    norm: f64,
}

impl CheckedDelta {
    pub fn new(bytes: Vec<u8>, segments: &[usize], encoding: Encoding) -> Result<Self, FedError> {
        let norm = check(&bytes, segments, encoding)?;
        Ok(Self {
            bytes,
            segments: segments.to_vec(),
            encoding,
            norm,
        })
    }

    /// A delta computed in this process (a simulation's), exact.
    pub fn from_values(values: &[f32]) -> Result<Self, FedError> {
        let segments = [values.len()];
        Self::new(
            encode(values, &segments, Encoding::F32),
            &segments,
            Encoding::F32,
        )
    }

    /// Values it holds.
    pub fn len(&self) -> usize {
        self.segments.iter().sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn norm(&self) -> f64 {
        self.norm
    }

    /// `sum += factor × delta`, decoding on the fly.
    pub fn add_to(&self, factor: f32, sum: &mut [f32]) {
        assert_eq!(
            sum.len(),
            self.len(),
            "the sum and the delta differ in length"
        );
        add_scaled(&self.bytes, &self.segments, self.encoding, factor, sum);
    }

    /// `factor × delta`, decoded.
    pub fn to_vec(&self, factor: f32) -> Vec<f32> {
        let mut values = vec![0f32; self.len()];
        self.add_to(factor, &mut values);
        values
    }
}

// The kernels below run over a whole delta at memory speed: no branch per value,
// and reductions kept in `LANES` independent accumulators, which the compiler
// turns into vector registers (it may not reorder one float sum by itself).
const LANES: usize = 8;

/// Checks `bytes` as an encoded delta of `segments` (its length, every value
/// finite); returns its L2 norm.
pub fn check(bytes: &[u8], segments: &[usize], encoding: Encoding) -> Result<f64, FedError> {
    let expected = encoding.encoded_len(segments);
    if bytes.len() != expected {
        return Err(FedError::WrongByteLength {
            encoding,
            expected,
            found: bytes.len(),
        });
    }
    let squares = match encoding {
        Encoding::F32 => sum_squares(bytes, f32::from_le_bytes),
        Encoding::F16 => sum_squares(bytes, |b| f16_to_f32(u16::from_le_bytes(b))),
        Encoding::Int8 => tensors(bytes, segments)
            .map(|(scale, values)| {
                // Every value is q × scale with |q| ≤ 128: all finite iff this is.
                let squares: i64 = values.iter().map(|&q| i64::from(q as i8).pow(2)).sum();
                if (scale.abs() * 128.0).is_finite() {
                    f64::from(scale).powi(2) * squares as f64
                } else {
                    f64::NAN
                }
            })
            .sum(),
    };
    // A square of a non-finite value is not finite, and finite f32 squares cannot
    // overflow an f64 sum: so this one test stands for every value's.
    if squares.is_finite() {
        Ok(squares.sqrt())
    } else {
        let (index, value) = values(bytes, segments, encoding)
            .enumerate()
            .find(|(_, v)| !v.is_finite())
            .unwrap_or((0, f32::NAN));
        Err(FedError::NotFinite { index, value })
    }
}

/// `sum += factor × decoded bytes`, for bytes that passed [`check`].
fn add_scaled(bytes: &[u8], segments: &[usize], encoding: Encoding, factor: f32, sum: &mut [f32]) {
    match encoding {
        Encoding::F32 => add_values(bytes, factor, sum, f32::from_le_bytes),
        // Checked: no infinity or NaN to take care of.
        Encoding::F16 => add_values(bytes, factor, sum, |b| {
            finite_f16_to_f32(u16::from_le_bytes(b))
        }),
        Encoding::Int8 => {
            let mut rest = sum;
            for (scale, values) in tensors(bytes, segments) {
                let (head, tail) = rest.split_at_mut(values.len());
                rest = tail;
                let step = factor * scale;
                for (s, &q) in head.iter_mut().zip(values) {
                    *s += step * f32::from(q as i8);
                }
            }
        }
    }
}

/// Σ v² (in f64) over the values of `W`-byte words.
fn sum_squares<const W: usize>(bytes: &[u8], value: impl Fn([u8; W]) -> f32) -> f64 {
    let word = |b: &[u8]| value(b.try_into().expect("W bytes"));
    let mut lanes = [0f64; LANES];
    let mut blocks = bytes.chunks_exact(W * LANES);
    for block in &mut blocks {
        for (lane, b) in lanes.iter_mut().zip(block.chunks_exact(W)) {
            let v = f64::from(word(b));
            *lane += v * v;
        }
    }
    let tail: f64 = blocks
        .remainder()
        .chunks_exact(W)
        .map(|b| f64::from(word(b)).powi(2))
        .sum();
    lanes.iter().sum::<f64>() + tail
}

fn add_values<const W: usize>(
    bytes: &[u8],
    factor: f32,
    sum: &mut [f32],
    value: impl Fn([u8; W]) -> f32,
) {
    for (s, b) in sum.iter_mut().zip(bytes.chunks_exact(W)) {
        *s += factor * value(b.try_into().expect("W bytes"));
    }
}

/// Each tensor of an int8 buffer: its scale and its quantised values.
fn tensors<'a>(bytes: &'a [u8], segments: &'a [usize]) -> impl Iterator<Item = (f32, &'a [u8])> {
    let mut rest = bytes;
    segments.iter().map(move |&len| {
        let (scale, tail) = rest.split_at(4);
        let (values, tail) = tail.split_at(len);
        rest = tail;
        (
            f32::from_le_bytes(scale.try_into().expect("4 bytes")),
            values,
        )
    })
}

/// Every value, one at a time: for error messages, not for speed.
fn values<'a>(
    bytes: &'a [u8],
    segments: &'a [usize],
    encoding: Encoding,
) -> Box<dyn Iterator<Item = f32> + 'a> {
    match encoding {
        Encoding::F32 => Box::new(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))),
        ),
        Encoding::F16 => Box::new(
            bytes
                .chunks_exact(2)
                .map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]]))),
        ),
        Encoding::Int8 => {
            Box::new(tensors(bytes, segments).flat_map(|(scale, values)| {
                values.iter().map(move |&q| f32::from(q as i8) * scale)
            }))
        }
    }
}

/// IEEE half to single precision without a branch (so that it vectorises):
/// the half's exponent and mantissa, shifted into a single's, read 2^-112 times
/// the value (the biases differ by 112), exactly, subnormals included; infinities
/// and NaNs get the single's all-ones exponent.
fn f16_to_f32(half: u16) -> f32 {
    let half = u32::from(half);
    let magnitude = (half & 0x7fff) << 13;
    let special = f32::from_bits(magnitude | 0x7f80_0000);
    let value = if half & 0x7c00 == 0x7c00 {
        special
    } else {
        f32::from_bits(magnitude) * TWO_TO_112
    };
    f32::from_bits(value.to_bits() | ((half & 0x8000) << 16))
}

const TWO_TO_112: f32 = f32::from_bits(0x7780_0000);

/// [`f16_to_f32`] for a half known to be finite.
fn finite_f16_to_f32(half: u16) -> f32 {
    let half = u32::from(half);
    let magnitude = f32::from_bits((half & 0x7fff) << 13) * TWO_TO_112;
    f32::from_bits(magnitude.to_bits() | ((half & 0x8000) << 16))
}

#[cfg(test)]
mod tests {
    //! Also run in headless Chromium by `scripts/test.sh`.
    use super::*;

    #[cfg(target_family = "wasm")]
    wasm_bindgen_test::wasm_bindgen_test_configure!(run_in_browser);

    fn sample() -> (Vec<f32>, Vec<usize>) {
        let values: Vec<f32> = (0..1000)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 1e-3)
            .collect();
        (values, vec![600, 300, 100])
    }

    #[cfg_attr(not(target_family = "wasm"), test)]
    #[cfg_attr(target_family = "wasm", wasm_bindgen_test::wasm_bindgen_test)]
    fn encodings_round_trip_within_their_precision() {
        let (values, segments) = sample();
        for encoding in Encoding::ALL {
            let bytes = encode(&values, &segments, encoding);
            assert_eq!(bytes.len(), encoding.encoded_len(&segments));
            let back = decode(&bytes, &segments, encoding).unwrap();
            let worst = values
                .iter()
                .zip(&back)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let tolerance = match encoding {
                Encoding::F32 => 0.0,
                Encoding::F16 => 0.05 * 1e-3,
                Encoding::Int8 => 0.05 / 127.0 / 2.0 + 1e-7,
            };
            assert!(worst <= tolerance, "{encoding:?}: {worst}");
        }
    }

    #[cfg_attr(not(target_family = "wasm"), test)]
    #[cfg_attr(target_family = "wasm", wasm_bindgen_test::wasm_bindgen_test)]
    fn branchless_half_conversion_matches_ieee_for_every_half() {
        for bits in 0..=u16::MAX {
            let (ours, ieee) = (f16_to_f32(bits), f16::from_bits(bits).to_f32());
            assert!(
                ours.to_bits() == ieee.to_bits() || (ours.is_nan() && ieee.is_nan()),
                "{bits:#06x}: {ours} vs {ieee}"
            );
        }
    }

    #[cfg_attr(not(target_family = "wasm"), test)]
    #[cfg_attr(target_family = "wasm", wasm_bindgen_test::wasm_bindgen_test)]
    fn a_checked_delta_folds_what_decode_gives() {
        // Odd lengths: the vector loops' tails too.
        let values: Vec<f32> = (0..1037)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) * 1e-3)
            .collect();
        let segments = [700, 3, 334];
        for encoding in Encoding::ALL {
            let bytes = encode(&values, &segments, encoding);
            let decoded = decode(&bytes, &segments, encoding).unwrap();
            let delta = CheckedDelta::new(bytes, &segments, encoding).unwrap();
            let norm = crate::robust::l2_norm(&decoded);
            assert!((delta.norm() - norm).abs() <= 1e-6 * norm, "{encoding:?}");
            let mut sum: Vec<f32> = (0..values.len()).map(|i| i as f32 * 0.5).collect();
            let expected: Vec<f32> = sum.iter().zip(&decoded).map(|(s, v)| s + 3.5 * v).collect();
            delta.add_to(3.5, &mut sum);
            // int8 multiplies by factor × scale once per tensor: a rounding apart.
            for (got, want) in sum.iter().zip(&expected) {
                assert!(
                    (got - want).abs() <= 1e-6 * want.abs().max(1.0),
                    "{encoding:?}"
                );
            }
            assert_eq!(delta.to_vec(1.0), decoded, "{encoding:?}");
        }
    }

    #[cfg_attr(not(target_family = "wasm"), test)]
    #[cfg_attr(target_family = "wasm", wasm_bindgen_test::wasm_bindgen_test)]
    fn int8_scales_per_tensor_and_handles_zeros() {
        let values = [1000.0, -1000.0, 0.001, -0.002, 0.0, 0.0];
        let back = decode(
            &encode(&values, &[2, 2, 2], Encoding::Int8),
            &[2, 2, 2],
            Encoding::Int8,
        )
        .unwrap();
        assert!(
            (back[2] - 0.001).abs() < 1e-5 && (back[3] + 0.002).abs() < 1e-5,
            "{back:?}"
        );
        assert_eq!(&back[4..], &[0.0, 0.0]);
    }

    #[cfg_attr(not(target_family = "wasm"), test)]
    #[cfg_attr(target_family = "wasm", wasm_bindgen_test::wasm_bindgen_test)]
    fn rejects_wrong_lengths_and_non_finite_values() {
        let (values, segments) = sample();
        let bytes = encode(&values, &segments, Encoding::F32);
        assert!(matches!(
            decode(&bytes[1..], &segments, Encoding::F32),
            Err(FedError::WrongByteLength { .. })
        ));
        let mut nan = bytes.clone();
        nan[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(matches!(
            decode(&nan, &segments, Encoding::F32),
            Err(FedError::NotFinite { index: 2, .. })
        ));
        let mut bad_scale = encode(&values, &segments, Encoding::Int8);
        bad_scale[..4].copy_from_slice(&f32::INFINITY.to_le_bytes());
        assert!(decode(&bad_scale, &segments, Encoding::Int8).is_err());
        // A finite scale whose values overflow.
        bad_scale[..4].copy_from_slice(&(f32::MAX / 2.0).to_le_bytes());
        assert!(CheckedDelta::new(bad_scale, &segments, Encoding::Int8).is_err());
        let mut infinite_half = encode(&values, &segments, Encoding::F16);
        infinite_half[6..8].copy_from_slice(&f16::INFINITY.to_le_bytes());
        assert!(matches!(
            CheckedDelta::new(infinite_half, &segments, Encoding::F16),
            Err(FedError::NotFinite { index: 3, .. })
        ));
    }
}
