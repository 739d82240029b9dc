//! Streaming aggregation: each delta is folded into a running weighted sum as it
//! arrives, so memory is one model's worth whatever the number of clients.

use serde::{Deserialize, Serialize};

use crate::FedError;

/// How client deltas are weighted (the tutorial's `client_weight_fn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Weighting {
    /// By the number of training examples the client used (FedAvg's default).
    #[default]
    Examples,
    /// Every client counts the same.
    Uniform,
}

/// The running weighted sum of one round's deltas.
#[derive(Debug, Clone)]
pub struct Aggregator {
    weighting: Weighting,
    sum: Vec<f64>,
    total_weight: f64,
    updates: usize,
}

impl Aggregator {
    pub fn new(num_params: usize, weighting: Weighting) -> Self {
        Self {
            weighting,
            sum: vec![0.0; num_params],
            total_weight: 0.0,
            updates: 0,
        }
    }

    /// Checks a delta without folding it in: right length, every value finite.
    pub fn validate(&self, delta: &[f32]) -> Result<(), FedError> {
        if delta.len() != self.sum.len() {
            return Err(FedError::WrongLength {
                expected: self.sum.len(),
                found: delta.len(),
            });
        }
        match delta.iter().position(|v| !v.is_finite()) {
            Some(index) => Err(FedError::NotFinite {
                index,
                value: delta[index],
            }),
            None => Ok(()),
        }
    }

    /// Folds in one client's delta, trained on `examples` examples. A rejected
    /// delta leaves the sum untouched.
    pub fn add(&mut self, delta: &[f32], examples: u64) -> Result<(), FedError> {
        self.validate(delta)?;
        if examples == 0 {
            return Err(FedError::NoExamples);
        }
        let weight = match self.weighting {
            Weighting::Examples => examples as f64,
            Weighting::Uniform => 1.0,
        };
        for (s, &d) in self.sum.iter_mut().zip(delta) {
            *s += weight * f64::from(d);
        }
        self.total_weight += weight;
        self.updates += 1;
        Ok(())
    }

    pub fn updates(&self) -> usize {
        self.updates
    }

    /// The weighted mean delta.
    pub fn mean(&self) -> Result<Vec<f32>, FedError> {
        if self.updates == 0 {
            return Err(FedError::NoUpdates);
        }
        Ok(self
            .sum
            .iter()
            .map(|s| (s / self.total_weight) as f32)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_by_examples_or_uniformly() {
        let mut by_examples = Aggregator::new(2, Weighting::Examples);
        by_examples.add(&[1.0, 0.0], 3).unwrap();
        by_examples.add(&[0.0, 4.0], 1).unwrap();
        assert_eq!(by_examples.mean().unwrap(), vec![0.75, 1.0]);
        let mut uniform = Aggregator::new(2, Weighting::Uniform);
        uniform.add(&[1.0, 0.0], 3).unwrap();
        uniform.add(&[0.0, 4.0], 1).unwrap();
        assert_eq!(uniform.mean().unwrap(), vec![0.5, 2.0]);
    }

    #[test]
    fn rejects_bad_deltas_without_changing_the_sum() {
        let mut agg = Aggregator::new(2, Weighting::Examples);
        agg.add(&[1.0, 1.0], 1).unwrap();
        assert!(matches!(
            agg.add(&[1.0], 1),
            Err(FedError::WrongLength { .. })
        ));
        assert!(matches!(
            agg.add(&[f32::NAN, 1.0], 1),
            Err(FedError::NotFinite { index: 0, .. })
        ));
        assert!(matches!(
            agg.add(&[1.0, f32::INFINITY], 1),
            Err(FedError::NotFinite { index: 1, .. })
        ));
        assert_eq!(agg.add(&[1.0, 1.0], 0), Err(FedError::NoExamples));
        assert_eq!(agg.updates(), 1);
        assert_eq!(agg.mean().unwrap(), vec![1.0, 1.0]);
        assert_eq!(
            Aggregator::new(1, Weighting::Uniform).mean(),
            Err(FedError::NoUpdates)
        );
    }
}
