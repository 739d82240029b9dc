//! Secure rounds in the engine: the steps of `folio_secagg`'s protocol with
//! their deadlines, and the round's sum, unmasked and decoded off the engine
//! into the share a strategy combines (as a cluster's root combines edges').

use std::collections::BTreeSet;
use std::time::Instant;

use folio_fed::{FedError, Partial};
use folio_secagg::{SecureServer, SecureSpec, Unmasking};

use crate::SecureRounds;

/// The secure side of an open round.
pub(crate) struct SecureOpen {
    pub server: SecureServer,
    pub spec: SecureSpec,
    /// When the step under way stops waiting.
    pub step_deadline: Instant,
    /// Set once the unmasking step closed: the round's sum, still masked.
    pub unmasking: Option<Unmasking>,
    /// Sessions that left during the round: no later step waits for them.
    pub left: BTreeSet<u64>,
}

/// The spec of a secure round of `clients` (each with at most `most_examples`),
/// clipped to `bound`.
pub(crate) fn spec(
    settings: &SecureRounds,
    clients: usize,
    most_examples: u64,
    bound: f32,
    weigh_by_examples: bool,
) -> SecureSpec {
    let mut id = [0u8; 8];
    getrandom::fill(&mut id).expect("the OS random number generator works");
    SecureSpec {
        id: u64::from_le_bytes(id),
        threshold: settings
            .threshold
            .unwrap_or_else(|| folio_secagg::graph::majority(clients, settings.degree as usize)),
        degree: settings.degree,
        quantizer: folio_secagg::Quantizer {
            clients: clients as u32,
            clip_bound: bound,
        },
        weight_scale: weigh_by_examples.then_some(most_examples.max(1)),
    }
}

/// A secure round's sum, to unmask and decode where it holds nothing up.
pub(crate) struct SecureSum {
    pub unmasking: Unmasking,
    pub spec: SecureSpec,
}

/// What the decoded sum says besides the weighted deltas.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SumMetrics {
    pub loss_sum: f64,
    pub accuracy_sum: f64,
    pub weight: f64,
    /// Σ examples, where clients are weighted by them.
    pub examples: u64,
}

impl SecureSum {
    /// The sum as a share: Σ w·clip(Δ) with Σ w; refused if it could not come
    /// from clipped inputs (a client that sent values out of range).
    pub fn partial(&self) -> Result<(Partial, SumMetrics), FedError> {
        let sum = self
            .spec
            .quantizer
            .decode(&self.unmasking.run())
            .map_err(|e| FedError::Secure(e.to_string()))?;
        let contributors = self.unmasking.contributors();
        let bound = f64::from(self.spec.quantizer.clip_bound);
        let norm = folio_fed::robust::l2_norm(&sum.weighted_delta);
        // Each client adds at most w·S (plus rounding): the sum's norm is at
        // most Σw·S, and Σw at most one per client.
        let slack = 1e-3 * bound * contributors as f64 + 1e-6;
        let plausible = sum.weight.is_finite()
            && sum.weight > 0.0
            && sum.weight <= contributors as f64 + 1e-6
            && norm <= sum.weight * bound + slack;
        if !plausible {
            return Err(FedError::Secure(format!(
                "the unmasked sum cannot come from clipped inputs (weight {:.3} of {contributors} clients, norm {norm:.4} over bound {bound}): a client sent values out of range",
                sum.weight
            )));
        }
        let examples = match self.spec.weight_scale {
            Some(scale) => (sum.weight * scale as f64).round() as u64,
            None => 0,
        };
        let metrics = SumMetrics {
            loss_sum: sum.weighted_loss,
            accuracy_sum: sum.weighted_accuracy,
            weight: sum.weight,
            examples,
        };
        let partial = Partial {
            sum: sum.weighted_delta,
            total_weight: sum.weight,
            updates: contributors,
            norms: Vec::new(),
        };
        Ok((partial, metrics))
    }
}
