//! Weight deltas on flat parameter buffers (see [`crate::CharRnn::to_flat`]).

/// `new - old`, element by element.
pub fn delta(new: &[f32], old: &[f32]) -> Vec<f32> {
    assert_eq!(new.len(), old.len(), "parameter buffers differ in length");
    new.iter().zip(old).map(|(n, o)| n - o).collect()
}

/// `old + delta`, in place.
pub fn apply_delta(weights: &mut [f32], delta: &[f32]) {
    assert_eq!(
        weights.len(),
        delta.len(),
        "parameter buffers differ in length"
    );
    for (w, d) in weights.iter_mut().zip(delta) {
        *w += d;
    }
}
