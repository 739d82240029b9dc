//! A run's settings: what `folio serve` and `folio simulate` take as flags,
//! and as a file (`--config`), mapped once onto the engine's [`RoundConfig`].
//! Each run writes its settings beside its state, so that it can be run again
//! as it was.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use folio_engine::{AsyncRounds, FederatedEval, RoundConfig, SecureRounds};
use folio_fed::{
    AdaptiveClip, Aggregation, Clipping, DistributedDp, DpConfig, Encoding, Selection,
    ServerOptimizerConfig, StrategyConfig, StrategyKind, Weighting,
};
use folio_model::Preset;
use folio_proto::{DataSource, Optimizer};
use serde::{Deserialize, Serialize};

/// The file a run's settings are written to, in its state dir.
pub const SETTINGS_FILE: &str = "settings.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Data {
    /// The simulation: each device trains as a Shakespeare character, whose
    /// lines the server hands it.
    Shakespeare,
    /// Devices bring their own text, which never leaves them; the server holds
    /// none.
    Device,
}

impl Data {
    pub fn source(self) -> DataSource {
        match self {
            Data::Shakespeare => DataSource::Shakespeare,
            Data::Device => DataSource::Device,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum ServerOpt {
    Fedavg,
    Fedavgm,
    Fedadagrad,
    Fedadam,
    Fedyogi,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum StrategyRule {
    Fedavg,
    Krum,
    /// User-level differential privacy: Poisson sampling, every delta clipped to
    /// --clip-bound, Gaussian noise of --noise-multiplier × the bound on the sum.
    DpFedavg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum RoundMode {
    Sync,
    Async,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum ClientOpt {
    Sgd,
    Adam,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum ClipRule {
    /// No bound on an update's norm (undefended; for comparison only).
    Off,
    Fixed,
    /// Follows the median norm of the clients' deltas (Andrew et al. 2021).
    Adaptive,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum AggregationRule {
    Mean,
    TrimmedMean,
    Median,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum ModelEncoding {
    F32,
    F16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum DeltaEncoding {
    F32,
    F16,
    Int8,
}

/// A run's settings, as flags (`folio serve`, `folio simulate`) or a file
/// (`--config`; every run writes its own beside its state): the model, where
/// it starts, and how rounds run. Defaults: the better setup found by `folio
/// simulate` (see the README); `tutorial` gives the tutorial's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct RunSettings {
    /// The tutorial's setup: 2 clients, 5 batches, SGD 0.5, FedAvg, eval on 2
    /// batches of King Lear's Lear (overrides the flags below).
    #[cfg_attr(feature = "clap", arg(long))]
    pub tutorial: bool,
    #[cfg_attr(feature = "clap", arg(long, default_value = "seed"))]
    #[serde(with = "preset_name")]
    pub preset: Preset,
    /// Initial global model [default: the preset's shipped Dickens model,
    /// models/dickens-PRESET.safetensors]
    #[cfg_attr(feature = "clap", arg(long, conflicts_with = "fresh"))]
    pub init: Option<PathBuf>,
    /// Start from fresh (seeded random) weights, not a pre-trained model.
    #[cfg_attr(feature = "clap", arg(long))]
    pub fresh: bool,
    /// The round's rules: hardened FedAvg, multi-Krum (drops the updates far
    /// from the others; see --byzantine), or DP-FedAvg (see --noise-multiplier).
    #[cfg_attr(feature = "clap", arg(long, value_enum, default_value = "fedavg"))]
    pub strategy: StrategyRule,
    /// DP-FedAvg: the noise's standard deviation over the clip bound (z).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 1.0))]
    pub noise_multiplier: f64,
    /// DP-FedAvg with --secure: the devices add the noise (Skellam) inside the
    /// secure sum, so the server never sees an un-noised sum (distributed DP).
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default)]
    pub distributed_dp: bool,
    /// Distributed DP: the fewest masked inputs a round's sum is unmasked with;
    /// the devices' noise is planned so that any one fewer carry all of it
    /// [default: 80 % of the clients a round expects, at least 3]
    #[cfg_attr(feature = "clap", arg(long, requires = "distributed_dp"))]
    #[serde(default)]
    pub ddp_min_inputs: Option<u32>,
    /// DP-FedAvg: δ of the (ε, δ) guarantee [default: 1 / N^1.1 for N clients]
    #[cfg_attr(feature = "clap", arg(long))]
    pub dp_delta: Option<f64>,
    /// DP-FedAvg: stop training before a round would spend more than this ε.
    #[cfg_attr(feature = "clap", arg(long))]
    pub epsilon_budget: Option<f64>,
    /// DP-FedAvg: let the clip bound follow this quantile of the update norms
    /// (private adaptive clipping, e.g. 0.5); it starts at --clip-bound.
    #[cfg_attr(feature = "clap", arg(long))]
    pub dp_adaptive_quantile: Option<f64>,
    /// DP-FedAvg, adaptive: the noise on the count of updates under the bound
    /// [default: clients per round / 20]
    #[cfg_attr(feature = "clap", arg(long))]
    pub dp_count_noise: Option<f64>,
    /// DP-FedAvg, adaptive: how fast the bound moves.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 0.2))]
    pub dp_clip_lr: f64,
    /// Updates Krum assumes may be hostile in a round.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 0))]
    pub byzantine: usize,
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 2))]
    pub clients_per_round: usize,
    /// Draw each round's clients in proportion to their training text (without
    /// replacement) and average their deltas uniformly: close to training on
    /// everyone's text pooled, without one large client's many local steps
    /// dominating its round.
    #[cfg_attr(feature = "clap", arg(long))]
    pub sample_by_size: bool,
    /// Connected clients needed to start a round [default: --clients-per-round]
    #[cfg_attr(feature = "clap", arg(long))]
    pub min_clients: Option<usize>,
    /// Updates that close a round at its deadline [default: half the round, at least 1]
    #[cfg_attr(feature = "clap", arg(long))]
    pub quorum: Option<usize>,
    /// How long a round (an asynchronous task) waits for its clients; a
    /// --population run without --devices has none to wait for and ignores it.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 600.0))]
    pub deadline_secs: f64,
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 1))]
    pub local_epochs: u32,
    /// Batches per local epoch (0: all).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 5))]
    pub max_batches: u32,
    /// Sequences per local batch (of 100 characters each): fewer give a client
    /// more local steps over the same text.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 8))]
    pub batch_size: u32,
    #[cfg_attr(feature = "clap", arg(long, value_enum, default_value = "sgd"))]
    pub client_optimizer: ClientOpt,
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 0.1))]
    pub client_lr: f32,
    /// Halve the client learning rate from each of these rounds on (e.g. 250,600).
    #[cfg_attr(feature = "clap", arg(long, value_delimiter = ','))]
    pub client_lr_halve_at: Vec<u64>,
    #[cfg_attr(feature = "clap", arg(long))]
    pub clip_norm: Option<f32>,
    #[cfg_attr(feature = "clap", arg(long, value_enum, default_value = "fedavg"))]
    pub server_optimizer: ServerOpt,
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 1.0))]
    pub server_lr: f32,
    /// FedAvgM momentum, or β1 of the adaptive optimizers.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 0.9))]
    pub server_momentum: f32,
    /// τ of the adaptive optimizers: per-coordinate scales below it are not
    /// normalised (set it under the deltas' typical size for Adam-like steps).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 1e-3))]
    pub server_tau: f32,
    /// β2 of FedAdam and FedYogi: how many rounds (≈ 1 / (1 − β2)) the second
    /// moment averages.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 0.99))]
    pub server_beta2: f32,
    /// Correct FedAdam's moments for their zero start, as Adam does (keeps its
    /// first rounds' steps from being inflated, above all with --server-beta2
    /// near 1).
    #[cfg_attr(feature = "clap", arg(long))]
    pub server_bias_correction: bool,
    #[cfg_attr(feature = "clap", arg(long, value_enum, default_value = "f32"))]
    pub encoding: DeltaEncoding,
    /// How the global model goes down to the clients each round: f16 halves the
    /// bytes (the clients train from, and report against, what they received).
    #[cfg_attr(feature = "clap", arg(long, value_enum, default_value = "f16"))]
    pub model_encoding: ModelEncoding,
    /// How the server bounds each delta's L2 norm.
    #[cfg_attr(feature = "clap", arg(long, value_enum, default_value = "adaptive"))]
    pub clip: ClipRule,
    /// The L2 bound (fixed), or the most the first round's median norm may set
    /// it to (adaptive).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 1.0))]
    pub clip_bound: f32,
    /// The adaptive bound never grows past this multiple of the first round's.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = folio_fed::robust::DEFAULT_CEILING))]
    pub clip_ceiling: f32,
    /// How the round's (clipped) deltas are combined.
    #[cfg_attr(feature = "clap", arg(long, value_enum, default_value = "mean"))]
    pub aggregation: AggregationRule,
    /// The fraction trimmed at each end by --aggregation trimmed-mean.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 0.1))]
    pub trim: f32,
    /// Weight client deltas uniformly rather than by examples.
    #[cfg_attr(feature = "clap", arg(long))]
    pub uniform: bool,
    /// Central evaluation on the test split of this many clients...
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 8))]
    pub eval_clients: usize,
    /// ...this many batches each.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 2))]
    pub eval_batches: usize,
    /// Evaluate on this client's first training batches instead.
    #[cfg_attr(feature = "clap", arg(long))]
    pub eval_client: Option<String>,
    /// Also evaluate on every client's test split after every this many rounds
    /// and the last (0: never; `small` takes seconds, `seed` minutes).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 0))]
    pub population_eval_every: u64,
    /// Where the devices' text comes from: the Shakespeare simulation (the
    /// server hands each device a character's lines), or the devices' own.
    #[cfg_attr(feature = "clap", arg(long, value_enum, default_value = "shakespeare"))]
    pub data: Data,
    /// Federated evaluation: before every this many rounds' model is committed,
    /// devices measure it on the text they hold out (0: never).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 0))]
    pub federated_eval_every: u64,
    /// Federated evaluation: devices asked each time, drawn from those connected.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 16))]
    pub federated_eval_devices: usize,
    /// Federated evaluation: how long the devices have to answer (seconds).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 60.0))]
    pub federated_eval_secs: f64,
    /// Secure aggregation: the server learns only each round's sum. Clients
    /// clip their own deltas to --clip-bound (fixed clipping), the mean is
    /// the aggregation.
    #[cfg_attr(feature = "clap", arg(long))]
    pub secure_aggregation: bool,
    /// Shares that rebuild a client's secrets in a secure round (default: a
    /// majority of the client and its neighbours). More tolerates fewer
    /// dropouts; fewer tolerates fewer colluding clients.
    #[cfg_attr(feature = "clap", arg(long))]
    pub secagg_threshold: Option<u32>,
    /// Neighbours each client masks with in a secure round: 0 for every other
    /// client (SecAgg), k for SecAgg+'s random k-regular graph (cheaper for
    /// large rounds; at most 254).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 0))]
    pub secagg_degree: u32,
    /// How long a secure round's key, share and unmasking steps wait for
    /// stragglers (seconds).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 30.0))]
    pub secagg_step_secs: f64,
    /// The fewest masked inputs a secure sum is revealed of (at least 3): a
    /// round with fewer is abandoned before anything is unmasked (a DP round
    /// closes with its noise alone).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = folio_engine::MIN_COHORT))]
    pub secagg_min_cohort: usize,
    /// Synchronous rounds, or asynchronous ones (FedBuff): clients train
    /// continuously, --clients-per-round at once, each on the latest model it
    /// was given, and the global model steps every --buffer updates.
    #[cfg_attr(feature = "clap", arg(long, value_enum, default_value = "sync"))]
    pub mode: RoundMode,
    /// Asynchronous rounds: updates per step of the global model (K).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 10))]
    pub buffer: usize,
    /// Asynchronous rounds: an update counts 1/√(1 + s) for the s steps the
    /// global model moved since its model, and is refused past this many.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 4))]
    pub max_staleness: u64,
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 0))]
    pub seed: u64,
}

impl Default for RunSettings {
    fn default() -> Self {
        Self {
            tutorial: false,
            preset: Preset::Seed,
            init: None,
            fresh: false,
            strategy: StrategyRule::Fedavg,
            noise_multiplier: 1.0,
            distributed_dp: false,
            ddp_min_inputs: None,
            dp_delta: None,
            epsilon_budget: None,
            dp_adaptive_quantile: None,
            dp_count_noise: None,
            dp_clip_lr: 0.2,
            byzantine: 0,
            clients_per_round: 2,
            sample_by_size: false,
            min_clients: None,
            quorum: None,
            deadline_secs: 600.0,
            local_epochs: 1,
            max_batches: 5,
            batch_size: 8,
            client_optimizer: ClientOpt::Sgd,
            client_lr: 0.1,
            client_lr_halve_at: Vec::new(),
            clip_norm: None,
            server_optimizer: ServerOpt::Fedavg,
            server_lr: 1.0,
            server_momentum: 0.9,
            server_tau: 1e-3,
            server_beta2: 0.99,
            server_bias_correction: false,
            encoding: DeltaEncoding::F32,
            model_encoding: ModelEncoding::F16,
            clip: ClipRule::Adaptive,
            clip_bound: 1.0,
            clip_ceiling: folio_fed::robust::DEFAULT_CEILING,
            aggregation: AggregationRule::Mean,
            trim: 0.1,
            uniform: false,
            eval_clients: 8,
            eval_batches: 2,
            eval_client: None,
            population_eval_every: 0,
            data: Data::Shakespeare,
            federated_eval_every: 0,
            federated_eval_devices: 16,
            federated_eval_secs: 60.0,
            secure_aggregation: false,
            secagg_threshold: None,
            secagg_degree: 0,
            secagg_step_secs: 30.0,
            secagg_min_cohort: folio_engine::MIN_COHORT,
            mode: RoundMode::Sync,
            buffer: 10,
            max_staleness: 4,
            seed: 0,
        }
    }
}

impl RunSettings {
    /// The engine's round settings; refused when a duration is negative or not
    /// a number (a settings file can say anything).
    pub fn round_config(&self) -> anyhow::Result<RoundConfig> {
        if self.tutorial {
            return Ok(RoundConfig {
                eval_client: Some("THE_TRAGEDY_OF_KING_LEAR_LEAR".into()),
                ..RoundConfig::tutorial()
            });
        }
        let (lr, beta1) = (self.server_lr, self.server_momentum);
        let (beta2, tau) = (self.server_beta2, self.server_tau);
        let server_optimizer = match self.server_optimizer {
            ServerOpt::Fedavg => ServerOptimizerConfig::FedAvg { lr },
            ServerOpt::Fedavgm => ServerOptimizerConfig::FedAvgM {
                lr,
                momentum: beta1,
            },
            ServerOpt::Fedadagrad => ServerOptimizerConfig::FedAdagrad { lr, beta1, tau },
            ServerOpt::Fedadam => ServerOptimizerConfig::FedAdam {
                lr,
                beta1,
                beta2,
                tau,
                bias_correction: self.server_bias_correction,
            },
            ServerOpt::Fedyogi => ServerOptimizerConfig::FedYogi {
                lr,
                beta1,
                beta2,
                tau,
            },
        };
        let strategy = StrategyConfig {
            kind: match self.strategy {
                StrategyRule::Fedavg => StrategyKind::FedAvg,
                StrategyRule::Krum => StrategyKind::Krum,
                StrategyRule::DpFedavg => StrategyKind::DpFedAvg,
            },
            byzantine: self.byzantine,
            clients_per_round: self.clients_per_round,
            min_clients: self.min_clients.unwrap_or(self.clients_per_round),
            quorum: self.quorum.unwrap_or(self.clients_per_round.div_ceil(2)),
            selection: if self.sample_by_size {
                Selection::BySize
            } else {
                Selection::Uniform
            },
            weighting: if self.uniform || self.sample_by_size {
                Weighting::Uniform
            } else {
                Weighting::Examples
            },
            clipping: match self.clip {
                // Both clip every delta to a bound known before the round.
                _ if self.strategy == StrategyRule::DpFedavg || self.secure_aggregation => {
                    Clipping::Fixed {
                        bound: self.clip_bound,
                    }
                }
                ClipRule::Off => Clipping::Off,
                ClipRule::Fixed => Clipping::Fixed {
                    bound: self.clip_bound,
                },
                ClipRule::Adaptive => Clipping::adaptive_to(self.clip_bound, self.clip_ceiling),
            },
            aggregation: match self.aggregation {
                AggregationRule::Mean => Aggregation::Mean,
                AggregationRule::TrimmedMean => Aggregation::TrimmedMean { trim: self.trim },
                AggregationRule::Median => Aggregation::Median,
            },
            server_optimizer,
            dp: DpConfig {
                noise_multiplier: self.noise_multiplier,
                delta: self.dp_delta,
                epsilon_budget: self.epsilon_budget,
                adaptive: self.dp_adaptive_quantile.map(|quantile| AdaptiveClip {
                    quantile,
                    count_noise: self
                        .dp_count_noise
                        .unwrap_or(self.clients_per_round as f64 / 20.0),
                    learning_rate: self.dp_clip_lr,
                }),
                distributed: self.distributed_dp.then_some(DistributedDp {
                    min_inputs: self.ddp_min_inputs,
                }),
            },
        };
        let step_timeout =
            seconds("secagg_step_secs", self.secagg_step_secs)?.max(Duration::from_millis(1));
        Ok(RoundConfig {
            strategy,
            deadline: seconds("deadline_secs", self.deadline_secs)?,
            local_epochs: self.local_epochs,
            max_batches: (self.max_batches > 0).then_some(self.max_batches),
            batch_size: self.batch_size,
            seq_len: 100,
            client_optimizer: match self.client_optimizer {
                ClientOpt::Sgd => Optimizer::Sgd,
                ClientOpt::Adam => Optimizer::Adam,
            },
            client_lr: self.client_lr,
            client_lr_halvings: self.client_lr_halve_at.clone(),
            clip_norm: self.clip_norm,
            delta_encoding: match self.encoding {
                DeltaEncoding::F32 => Encoding::F32,
                DeltaEncoding::F16 => Encoding::F16,
                DeltaEncoding::Int8 => Encoding::Int8,
            },
            model_encoding: match self.model_encoding {
                ModelEncoding::F32 => Encoding::F32,
                ModelEncoding::F16 => Encoding::F16,
            },
            eval_clients: self.eval_clients,
            eval_batches: self.eval_batches,
            eval_client: self.eval_client.clone(),
            population_eval_every: (self.population_eval_every > 0)
                .then_some(self.population_eval_every),
            secure: self.secure_aggregation.then_some(SecureRounds {
                threshold: self.secagg_threshold,
                min_cohort: self.secagg_min_cohort,
                degree: self.secagg_degree,
                step_timeout,
            }),
            asynchronous: (self.mode == RoundMode::Async).then_some(AsyncRounds {
                buffer: self.buffer,
                max_staleness: self.max_staleness,
            }),
            federated_eval: match self.federated_eval_every {
                0 => None,
                every => Some(FederatedEval {
                    devices: self.federated_eval_devices,
                    deadline: seconds("federated_eval_secs", self.federated_eval_secs)?,
                    ..FederatedEval::every(every)
                }),
            },
        })
    }

    /// The model to start from; `None`: fresh weights.
    pub fn init(&self) -> Option<PathBuf> {
        if self.fresh {
            return None;
        }
        Some(self.init.clone().unwrap_or_else(|| {
            PathBuf::from(format!("models/dickens-{}.safetensors", self.preset.name()))
        }))
    }

    /// Reads settings written by [`RunSettings::save`] (or by hand: fields left
    /// out take their defaults).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the settings file {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a run's settings (JSON, the fields of `folio serve --help`)",
                path.display()
            )
        })
    }

    /// Writes the settings to `dir/settings.json`.
    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        let path = dir.join(SETTINGS_FILE);
        let text = serde_json::to_string_pretty(self).expect("settings serialise");
        std::fs::write(&path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))
    }
}

/// `value` seconds as a duration, or why not.
fn seconds(name: &str, value: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value)
        .map_err(|_| anyhow::anyhow!("{name} is {value}: give a number of seconds, 0 or more"))
}

/// A preset by its name.
mod preset_name {
    use folio_model::Preset;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(preset: &Preset, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(preset.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Preset, D::Error> {
        let name = String::deserialize(d)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "clap")]
    #[test]
    fn the_flags_default_to_what_a_settings_file_leaves_out() {
        use clap::Parser;
        #[derive(Parser)]
        struct Flags {
            #[command(flatten)]
            settings: RunSettings,
        }
        assert_eq!(
            Flags::parse_from(["folio"]).settings,
            RunSettings::default()
        );
    }

    #[test]
    fn a_settings_file_is_read_back_as_written_and_a_typo_named() {
        let dir = tempfile::tempdir().unwrap();
        let written = RunSettings {
            preset: Preset::Small,
            mode: RoundMode::Async,
            client_lr_halve_at: vec![250, 600],
            ..RunSettings::default()
        };
        written.save(dir.path()).unwrap();
        let path = dir.path().join(SETTINGS_FILE);
        assert_eq!(RunSettings::load(&path).unwrap(), written);
        std::fs::write(&path, r#"{"seed": 3}"#).unwrap();
        let partial = RunSettings::load(&path).unwrap();
        assert_eq!(
            partial,
            RunSettings {
                seed: 3,
                ..RunSettings::default()
            }
        );
        std::fs::write(&path, r#"{"deadline_secs": -5}"#).unwrap();
        let negative = RunSettings::load(&path)
            .unwrap()
            .round_config()
            .unwrap_err();
        assert!(
            negative.to_string().contains("deadline_secs is -5"),
            "{negative}"
        );
        std::fs::write(&path, r#"{"sead": 1}"#).unwrap();
        let typo = RunSettings::load(&path).unwrap_err();
        assert!(
            format!("{typo:#}").contains("unknown field `sead`"),
            "{typo:#}"
        );
    }
}
