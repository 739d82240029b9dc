//! Bounding what one client can do to the global model.
//!
//! - **Norm clipping** (Sun et al. 2019): every delta is scaled down to an L2 norm
//!   of at most `bound`. The bound is fixed, or adapts each round towards a quantile
//!   of the clients' norms (Andrew et al. 2021, Flower's adaptive clipping):
//!   `bound *= exp(−lr · (fraction of norms ≤ bound − quantile))`. A crowd cannot
//!   walk the adaptive bound up: it starts at the first round's own quantile norm
//!   (the honest scale of this model and plan, not a guess), grows by at most
//!   `exp(lr · quantile)` a round, and never past `ceiling` × that start.
//! - **Aggregation**: the weighted mean (streaming, O(model) memory whatever the
//!   number of clients), or the coordinate-wise trimmed mean or median (Yin et al.
//!   2018), which hold every delta of the round: O(clients × model) memory, and they
//!   weigh clients uniformly.

use serde::{Deserialize, Serialize};

use crate::FedError;
use crate::codec::CheckedDelta;

/// How far under the bound a clipped delta is scaled: its f32 coordinates
/// (each rounded by at most 2⁻²⁴ of itself) then measure at most the bound, so
/// the sensitivity is the bound the noise assumes, not a few ulps more.
const CLIP_MARGIN: f64 = 1.0 - 1.0 / (1u64 << 22) as f64;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Clipping {
    /// No bound: the undefended baseline, for comparison only.
    Off,
    Fixed {
        bound: f32,
    },
    Adaptive {
        /// The first round's bound.
        first: FirstBound,
        /// The fraction of clients whose norm should fall under the bound.
        quantile: f32,
        /// How fast the bound follows (geometric step size).
        lr: f32,
        /// The bound never grows past this multiple of the first round's.
        ceiling: f32,
    },
}

/// Where the adaptive bound starts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum FirstBound {
    /// A bound given beforehand.
    Given(f32),
    /// The first round's own `quantile` norm, but at most `at_most`: honest
    /// clients set it while they are the majority of that round.
    Measured { at_most: f32 },
}

/// How far the adaptive bound may grow past its first value, by default.
pub const DEFAULT_CEILING: f32 = 2.0;

impl Clipping {
    /// Adaptive clipping at the median norm, measured on the first round (at
    /// most `at_most`), never more than twice that.
    pub fn adaptive(at_most: f32) -> Self {
        Self::adaptive_to(at_most, DEFAULT_CEILING)
    }

    /// The same, never more than `ceiling` × the first round's bound.
    pub fn adaptive_to(at_most: f32, ceiling: f32) -> Self {
        Clipping::Adaptive {
            first: FirstBound::Measured { at_most },
            quantile: 0.5,
            lr: 0.2,
            ceiling,
        }
    }

    /// The bound a round clips to, given the bound the last round left (`None`
    /// before the first round). `None`: the round measures its own.
    pub fn bound(self, saved: Option<f32>) -> Option<f32> {
        match self {
            Clipping::Off => Some(f32::INFINITY),
            Clipping::Fixed { bound } => Some(bound),
            Clipping::Adaptive { first, .. } => saved.or(match first {
                FirstBound::Given(bound) => Some(bound),
                FirstBound::Measured { .. } => None,
            }),
        }
    }

    /// The bound a round with none measures from its own (unclipped) norms.
    pub fn measured_bound(self, norms: &[f64]) -> f32 {
        let Clipping::Adaptive {
            first: FirstBound::Measured { at_most },
            quantile,
            ..
        } = self
        else {
            unreachable!("only a measured first bound is measured")
        };
        let mut sorted = norms.to_vec();
        sorted.sort_by(f64::total_cmp);
        let index = ((f64::from(quantile) * sorted.len() as f64).ceil() as usize).max(1) - 1;
        let bound = sorted.get(index).copied().unwrap_or(f64::from(at_most));
        (bound.min(f64::from(at_most)) as f32).max(1e-6)
    }

    /// The next round's bound, from this round's `bound`, the first round's
    /// `reference` bound and this round's (unclipped) norms.
    pub fn next_bound(self, bound: f32, reference: f32, norms: &[f64]) -> f32 {
        match self {
            Clipping::Adaptive {
                quantile,
                lr,
                ceiling,
                ..
            } if !norms.is_empty() => {
                let under = norms.iter().filter(|&&n| !over(n, bound)).count();
                let fraction = under as f64 / norms.len() as f64;
                let next =
                    f64::from(bound) * (-f64::from(lr) * (fraction - f64::from(quantile))).exp();
                let ceiling = f64::from(ceiling) * f64::from(reference);
                // Keep the bound a usable positive number whatever the norms were.
                next.min(ceiling).clamp(1e-6, 1e6) as f32
            }
            _ => bound,
        }
    }

    pub fn describe(self) -> String {
        match self {
            Clipping::Off => "off".into(),
            Clipping::Fixed { bound } => format!("fixed {bound}"),
            Clipping::Adaptive {
                first,
                quantile,
                ceiling,
                ..
            } => {
                let start = match first {
                    FirstBound::Given(bound) => bound.to_string(),
                    FirstBound::Measured { at_most } => {
                        format!("the first round's (at most {at_most})")
                    }
                };
                format!("adaptive (quantile {quantile}, from {start}, at most {ceiling}x that)")
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Aggregation {
    /// The weighted mean: streaming.
    Mean,
    /// Drops the `trim` fraction of largest and of smallest values per coordinate.
    TrimmedMean { trim: f32 },
    /// The coordinate-wise median.
    Median,
}

impl Aggregation {
    pub fn name(self) -> String {
        match self {
            Aggregation::Mean => "mean".into(),
            Aggregation::TrimmedMean { trim } => format!("trimmed mean ({trim})"),
            Aggregation::Median => "median".into(),
        }
    }

    /// Bytes the round holds for `clients` updates of `num_params` values.
    pub fn memory_bytes(self, clients: usize, num_params: usize) -> usize {
        match self {
            Aggregation::Mean => 4 * num_params,
            _ => 4 * clients * num_params,
        }
    }
}

/// L2 norm, in f64 so that no finite f32 delta overflows it.
pub fn l2_norm(values: &[f32]) -> f64 {
    values
        .iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt()
}

/// Whether a delta of L2 norm `norm` is over `bound`: clipped.
pub fn over(norm: f64, bound: f32) -> bool {
    norm > f64::from(bound)
}

/// What a delta of L2 norm `norm` is multiplied by to be at most `bound` long,
/// measured on its f32 coordinates.
pub fn clip_scale(norm: f64, bound: f32) -> f64 {
    if over(norm, bound) {
        f64::from(bound) / norm * CLIP_MARGIN
    } else {
        1.0
    }
}

/// One round's accepted deltas, folded as the aggregation needs.
///
/// The streaming sum is f32: it moves half the bytes of an f64 one, and its
/// rounding (a relative 2^-24 per update, ≈ 1e-6 after a hundred) stays far under
/// the deltas' own precision on the wire (f16: 2^-11, int8: 1/254 of a tensor's
/// range) and their noise as stochastic gradients.
#[derive(Debug, Clone)]
pub enum RoundUpdates {
    Streaming {
        sum: Vec<f32>,
        total_weight: f64,
        updates: usize,
    },
    Buffered {
        aggregation: Aggregation,
        deltas: Vec<Vec<f32>>,
    },
}

impl RoundUpdates {
    pub fn new(aggregation: Aggregation, num_params: usize) -> Self {
        match aggregation {
            Aggregation::Mean => RoundUpdates::Streaming {
                sum: vec![0.0; num_params],
                total_weight: 0.0,
                updates: 0,
            },
            _ => RoundUpdates::Buffered {
                aggregation,
                deltas: Vec::new(),
            },
        }
    }

    pub fn updates(&self) -> usize {
        match self {
            RoundUpdates::Streaming { updates, .. } => *updates,
            RoundUpdates::Buffered { deltas, .. } => deltas.len(),
        }
    }

    /// Folds in `scale ×` a checked delta, with a positive, finite weight.
    pub fn add(&mut self, delta: &CheckedDelta, weight: f64, scale: f64) {
        match self {
            RoundUpdates::Streaming {
                sum,
                total_weight,
                updates,
            } => {
                delta.add_to((weight * scale) as f32, sum);
                *total_weight += weight;
                *updates += 1;
            }
            RoundUpdates::Buffered { deltas, .. } => deltas.push(delta.to_vec(scale as f32)),
        }
    }

    /// The aggregate delta, by the aggregation the round was opened with.
    pub fn aggregate(&self) -> Result<Vec<f32>, FedError> {
        if self.updates() == 0 {
            return Err(FedError::NoUpdates);
        }
        Ok(match self {
            RoundUpdates::Streaming {
                sum, total_weight, ..
            } => sum
                .iter()
                .map(|&s| (f64::from(s) / total_weight) as f32)
                .collect(),
            RoundUpdates::Buffered {
                aggregation,
                deltas,
            } => {
                let aggregation = *aggregation;
                let n = deltas.len();
                let trim = match aggregation {
                    Aggregation::TrimmedMean { trim } => {
                        // Never trim everything: keep at least one value.
                        ((f64::from(trim) * n as f64).floor() as usize).min((n - 1) / 2)
                    }
                    _ => 0,
                };
                let mut column = vec![0f32; n];
                (0..deltas[0].len())
                    .map(|i| {
                        for (c, delta) in column.iter_mut().zip(deltas) {
                            *c = delta[i];
                        }
                        column.sort_unstable_by(f32::total_cmp);
                        match aggregation {
                            Aggregation::Median => {
                                if n % 2 == 1 {
                                    column[n / 2]
                                } else {
                                    ((f64::from(column[n / 2 - 1]) + f64::from(column[n / 2]))
                                        / 2.0) as f32
                                }
                            }
                            _ => {
                                let kept = &column[trim..n - trim];
                                (kept.iter().map(|&v| f64::from(v)).sum::<f64>()
                                    / kept.len() as f64) as f32
                            }
                        }
                    })
                    .collect()
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checked(values: &[f32]) -> CheckedDelta {
        CheckedDelta::from_values(values).unwrap()
    }

    #[test]
    fn clipping_scales_long_deltas_only() {
        assert!((clip_scale(5.0, 1.0) - 0.2).abs() < 1e-6);
        assert_eq!(clip_scale(0.5, 1.0), 1.0);
        let huge = checked(&[f32::MAX, f32::MAX]);
        let mut round = RoundUpdates::new(Aggregation::Mean, 2);
        round.add(&huge, 1.0, clip_scale(huge.norm(), 2.0));
        let clipped = round.aggregate().unwrap();
        assert!(clipped.iter().all(|v| v.is_finite()));
        assert!((l2_norm(&clipped) - 2.0).abs() < 1e-5, "{clipped:?}");
    }

    #[test]
    fn adaptive_bound_moves_towards_the_median_norm() {
        let clipping = Clipping::adaptive(1.0);
        // Every norm above the bound: it grows; every norm below: it shrinks.
        assert!(clipping.next_bound(1.0, 1.0, &[5.0, 6.0, 7.0]) > 1.0);
        assert!(clipping.next_bound(1.0, 1.0, &[0.1, 0.2]) < 1.0);
        let mut bound = 1.0;
        for _ in 0..200 {
            bound = clipping.next_bound(bound, 10.0, &[2.0, 3.0, 4.0, 5.0]);
        }
        assert!((3.0..=4.0).contains(&bound), "{bound}");
        assert_eq!(
            Clipping::Fixed { bound: 2.0 }.next_bound(2.0, 2.0, &[9.0]),
            2.0
        );
    }

    #[test]
    fn a_crowd_over_the_bound_walks_it_up_to_the_ceiling_and_no_further() {
        let clipping = Clipping::adaptive(1.0);
        // 50 of 55 always far over, from a measured start of 0.15.
        let mut norms = vec![0.1; 5];
        norms.extend([1e6; 50]);
        let (start, mut bound) = (0.15, 0.15);
        let mut grown = Vec::new();
        for _ in 0..30 {
            let next = clipping.next_bound(bound, start, &norms);
            grown.push(next / bound);
            bound = next;
        }
        assert!((bound - 0.3).abs() < 1e-6, "{bound}");
        assert!(grown.iter().all(|&g| g <= 1.106), "{grown:?}");
        // A minority cannot hold it up: with 35 honest norms of 0.1 it comes
        // back down to them.
        let mut honest = vec![0.1; 35];
        honest.extend([1e6; 20]);
        for _ in 0..200 {
            bound = clipping.next_bound(bound, start, &honest);
        }
        assert!(bound <= 0.1 * 1.106, "{bound}");
    }

    #[test]
    fn the_first_bound_is_measured_on_the_first_round() {
        let clipping = Clipping::adaptive(1.0);
        assert_eq!(clipping.bound(None), None);
        assert_eq!(clipping.bound(Some(0.2)), Some(0.2));
        // The median of five: a minority of huge norms does not move it far.
        assert_eq!(clipping.measured_bound(&[0.1, 0.2, 0.15, 1e9, 1e9]), 0.2);
        assert_eq!(clipping.measured_bound(&[0.3]), 0.3);
        // A majority of huge norms gets the cap.
        assert_eq!(clipping.measured_bound(&[0.1, 1e9, 1e9]), 1.0);
        assert_eq!(Clipping::Fixed { bound: 2.0 }.bound(None), Some(2.0));
        assert_eq!(Clipping::Off.bound(Some(1.0)), Some(f32::INFINITY));
    }

    #[test]
    fn a_clipped_delta_is_never_over_the_bound_in_f32() {
        let direction: Vec<f32> = (0..10_000)
            .map(|i| ((i * 7919) % 113) as f32 - 56.0)
            .collect();
        let unit = l2_norm(&direction);
        // Just over the bound (by 10⁻⁶ to 10⁻⁵, what a tolerance let through),
        // and far over it: each clipped delta, in f32, measures at most the bound.
        for over_by in [1e-7, 1e-6, 5e-6, 1e-5, 1.0, 1e6] {
            for bound in [0.01f32, 0.7, 1.0, 3.0] {
                let long: Vec<f32> = direction
                    .iter()
                    .map(|&v| (f64::from(v) / unit * f64::from(bound) * (1.0 + over_by)) as f32)
                    .collect();
                let delta = checked(&long);
                assert!(over(delta.norm(), bound), "{over_by} {bound}");
                let clipped = delta.to_vec(clip_scale(delta.norm(), bound) as f32);
                let measured = l2_norm(&clipped);
                assert!(
                    measured <= f64::from(bound),
                    "{over_by} {bound}: {measured}"
                );
                assert!(measured > f64::from(bound) * (1.0 - 1e-6), "{measured}");
            }
        }
        assert!(!over(1.0, 1.0));
        assert!(over(1.0 + 1e-12, 1.0));
    }

    #[test]
    fn trimmed_mean_and_median_ignore_one_outlier() {
        for aggregation in [Aggregation::TrimmedMean { trim: 0.2 }, Aggregation::Median] {
            let mut round = RoundUpdates::new(aggregation, 2);
            for delta in [
                [1.0, 2.0],
                [1.2, 2.2],
                [0.8, 1.8],
                [1.0, 2.0],
                [1e30, -1e30],
            ] {
                round.add(&checked(&delta), 1.0, 1.0);
            }
            let agg = round.aggregate().unwrap();
            assert!(
                (agg[0] - 1.0).abs() < 0.15 && (agg[1] - 2.0).abs() < 0.15,
                "{agg:?}"
            );
        }
        let mut even = RoundUpdates::new(Aggregation::Median, 1);
        for v in [1.0, 2.0, 3.0, 10.0] {
            even.add(&checked(&[v]), 1.0, 1.0);
        }
        assert_eq!(even.aggregate().unwrap(), vec![2.5]);
    }

    #[test]
    fn the_mean_streams_with_weights() {
        let mut round = RoundUpdates::new(Aggregation::Mean, 2);
        round.add(&checked(&[1.0, 0.0]), 3.0, 1.0);
        round.add(&checked(&[0.0, 4.0]), 1.0, 1.0);
        assert_eq!(round.aggregate().unwrap(), vec![0.75, 1.0]);
        assert_eq!(
            RoundUpdates::new(Aggregation::Median, 1).aggregate(),
            Err(FedError::NoUpdates)
        );
    }
}
