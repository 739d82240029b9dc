//! Model sizes. One code path serves every size; presets name the useful ones.

use std::fmt;
use std::str::FromStr;

use folio_data::vocab::VOCAB_SIZE;

/// Embedding(vocab → embed) → GRU(hidden) → Dense(hidden → vocab).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelConfig {
    pub vocab: usize,
    pub embed: usize,
    pub hidden: usize,
}

/// Named model sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// The tutorial's model: E 256, H 1024, ≈4.05 M parameters.
    Seed,
    /// E 64, H 512 (≈0.94 M parameters): the size of the federated Shakespeare
    /// papers' models (McMahan et al.'s LSTM has 0.87 M).
    Medium,
    /// E 32, H 128 (≈70 k parameters): tests, CI and the browser on SwiftShader.
    Small,
}

impl Preset {
    pub const ALL: [Preset; 3] = [Preset::Seed, Preset::Medium, Preset::Small];

    pub fn config(self) -> ModelConfig {
        let (embed, hidden) = match self {
            Preset::Seed => (256, 1024),
            Preset::Medium => (64, 512),
            Preset::Small => (32, 128),
        };
        ModelConfig {
            vocab: VOCAB_SIZE,
            embed,
            hidden,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Preset::Seed => "seed",
            Preset::Medium => "medium",
            Preset::Small => "small",
        }
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Preset {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Preset::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| format!("unknown preset `{s}` (seed, medium, small)"))
    }
}

impl ModelConfig {
    /// Parameter tensors in their fixed order, named and shaped as in Keras.
    pub fn param_shapes(&self) -> [(&'static str, Vec<usize>); 6] {
        let (v, e, h) = (self.vocab, self.embed, self.hidden);
        [
            ("embedding/embeddings", vec![v, e]),
            ("gru/kernel", vec![e, 3 * h]),
            ("gru/recurrent_kernel", vec![h, 3 * h]),
            ("gru/bias", vec![2, 3 * h]),
            ("dense/kernel", vec![h, v]),
            ("dense/bias", vec![v]),
        ]
    }

    pub fn num_params(&self) -> usize {
        self.param_shapes()
            .iter()
            .map(|(_, shape)| shape.iter().product::<usize>())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_preset_has_the_tutorials_parameter_count() {
        assert_eq!(Preset::Seed.config().num_params(), 4_048_470);
        assert_eq!(Preset::Medium.config().num_params(), 937_430);
        assert_eq!("small".parse::<Preset>(), Ok(Preset::Small));
        assert!("huge".parse::<Preset>().is_err());
    }
}
