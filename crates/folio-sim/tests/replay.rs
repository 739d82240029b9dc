//! A simulation replays bit for bit from its seed: every draw of the engine
//! (the DP sample and noise, secure rounds' graphs) and of its simulated clients
//! (their keys) comes from it.

use std::time::Duration;

use folio_engine::{RoundConfig, RoundRecord, SecureRounds};
use folio_fed::{Clipping, DpConfig, StrategyConfig, StrategyKind, Weighting};
use folio_model::Preset;
use folio_sim::population::{Population, run};

/// Two secure rounds of DP-FedAvg over the small preset, from fresh weights.
fn simulate(seed: u64) -> Vec<RoundRecord> {
    let state = tempfile::tempdir().unwrap();
    let rounds = RoundConfig {
        strategy: StrategyConfig {
            kind: StrategyKind::DpFedAvg,
            clipping: Clipping::Fixed { bound: 0.5 },
            weighting: Weighting::Uniform,
            dp: DpConfig {
                noise_multiplier: 0.5,
                ..DpConfig::default()
            },
            ..StrategyConfig::fedavg(40)
        },
        max_batches: Some(1),
        eval_clients: 1,
        eval_batches: 1,
        secure: Some(SecureRounds {
            threshold: None,
            degree: 0,
            step_timeout: Duration::from_secs(30),
            min_cohort: 3,
        }),
        ..RoundConfig::tutorial()
    };
    let sim = Population {
        rounds,
        preset: Preset::Small,
        init: None,
        seed,
        max_rounds: 2,
        state_dir: state.path().to_owned(),
        data_dir: folio_testkit::data_dir(),
        validation: false,
        devices: false,
    };
    run(&sim, |_| {}).unwrap()
}

#[test]
fn a_simulation_replays_bit_for_bit_from_its_seed() {
    let first = simulate(11);
    let again = simulate(11);
    assert_eq!(first.len(), 3, "round 0 and two rounds");
    assert!(first[1..].iter().all(|r| r.secure && r.clients > 0));
    let models = |h: &[RoundRecord]| h.iter().map(|r| r.model_hash.clone()).collect::<Vec<_>>();
    assert_eq!(
        models(&first),
        models(&again),
        "the same models, bit for bit"
    );
    let other = simulate(12);
    assert_ne!(
        models(&first)[1..],
        models(&other)[1..],
        "another seed, another run"
    );
}
