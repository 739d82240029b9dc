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
    let expected = encoding.encoded_len(segments);
    if bytes.len() != expected {
        return Err(FedError::WrongByteLength {
            encoding,
            expected,
            found: bytes.len(),
        });
    }
    let values: Vec<f32> = match encoding {
        Encoding::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Encoding::F16 => bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Encoding::Int8 => {
            let mut values = Vec::with_capacity(segments.iter().sum());
            let mut rest = bytes;
            for &len in segments {
                let (scale, tail) = rest.split_at(4);
                let (tensor, tail) = tail.split_at(len);
                rest = tail;
                let scale = f32::from_le_bytes([scale[0], scale[1], scale[2], scale[3]]);
                values.extend(tensor.iter().map(|&q| f32::from(q as i8) * scale));
            }
            values
        }
    };
    match values.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(FedError::NotFinite {
            index,
            value: values[index],
        }),
        None => Ok(values),
    }
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
    }
}
