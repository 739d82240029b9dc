//! DP-FedAvg's noise, clipping, sampling and ledger.

use super::*;
use crate::server_opt::ServerOptimizerConfig;
use crate::strategy::{StrategyKind, build};

fn config(clients_per_round: usize, z: f64, bound: f32) -> StrategyConfig {
    StrategyConfig {
        kind: StrategyKind::DpFedAvg,
        clipping: Clipping::Fixed { bound },
        dp: DpConfig {
            noise_multiplier: z,
            delta: Some(1e-5),
            ..DpConfig::default()
        },
        server_optimizer: ServerOptimizerConfig::FedAvg { lr: 1.0 },
        ..StrategyConfig::fedavg(clients_per_round)
    }
}

fn context(population: usize, secret: u8) -> StrategyContext {
    StrategyContext {
        seed: 0,
        population,
        secret: [secret; 32],
    }
}

fn delta(values: &[f32]) -> CheckedDelta {
    CheckedDelta::from_values(values).unwrap()
}

/// One round from zero weights: its released model is the noised mean.
fn release(s: &dyn Strategy, deltas: &[Vec<f32>], state: &StateRecord) -> Aggregated {
    let n = deltas[0].len();
    let mut open = s.open_round(state, n).unwrap();
    for d in deltas {
        s.accept(&mut open, &delta(d), 5, 10).unwrap();
    }
    s.aggregate(&open, &vec![0.0; n], state).unwrap()
}

#[test]
fn the_released_sum_carries_noise_of_z_times_s_and_no_more() {
    // 4 of 100 clients a round: q·N = 4 divides the noised sum. Each client's
    // delta, clipped to S = 0.5, is the same unit direction.
    let (z, bound, params) = (1.3, 0.5f32, 20_000);
    let s = build(config(4, z, bound), &context(100, 7));
    let mut state = s.initial_state(params);
    let direction: Vec<f32> = (0..params)
        .map(|i| if i % 2 == 0 { 1.0 } else { -1.0 })
        .collect();
    let deltas = vec![direction.clone(); 3];
    let clipped = f64::from(bound) / (params as f64).sqrt();
    let mut variances = Vec::new();
    for _ in 0..5 {
        let out = release(s.as_ref(), &deltas, &state);
        // Released sum minus the true clipped sum: the noise alone.
        let noise: Vec<f64> = out
            .weights
            .iter()
            .zip(&direction)
            .map(|(&w, &d)| f64::from(w) * 4.0 - 3.0 * clipped * f64::from(d))
            .collect();
        let mean = noise.iter().sum::<f64>() / params as f64;
        let variance = noise.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / params as f64;
        assert!(mean.abs() < 0.05, "noise mean {mean}");
        variances.push(variance);
        state = out.state;
    }
    let expected = (z * f64::from(bound)).powi(2);
    for v in &variances {
        // 20,000 draws: the sample variance is within 5 % with room to spare.
        assert!((v / expected - 1.0).abs() < 0.05, "{v} vs {expected}");
    }
    // Fresh noise every round.
    assert!(variances.windows(2).all(|w| w[0] != w[1]));
    // Without noise the same rounds would release exactly 3/4 of the clipped
    // direction: a variance of 0.
    let privacy = s.privacy(&state).unwrap();
    assert_eq!(privacy.rounds, 5);
    assert!(privacy.epsilon > 0.0 && privacy.epsilon.is_finite());
}

#[test]
fn one_client_moves_the_release_by_at_most_s_over_the_expected_clients() {
    let s = build(config(4, 1.0, 0.5), &context(100, 3));
    let state = s.initial_state(3);
    // The same noise (same secret, first draw) with and without a huge delta.
    let with = release(
        s.as_ref(),
        &[vec![0.1, 0.0, 0.0], vec![1e9, 1e9, 1e9]],
        &state,
    );
    let s = build(config(4, 1.0, 0.5), &context(100, 3));
    let without = release(s.as_ref(), &[vec![0.1, 0.0, 0.0]], &state);
    let moved: f64 = with
        .weights
        .iter()
        .zip(&without.weights)
        .map(|(a, b)| f64::from(a - b).powi(2))
        .sum::<f64>()
        .sqrt();
    assert!(moved <= 0.5 / 4.0 + 1e-6, "{moved}");
    assert_eq!(with.clipped, 1);
}

#[test]
fn poisson_sampling_takes_each_client_with_probability_q() {
    let s = build(config(10, 1.0, 1.0), &context(200, 9));
    let candidates: Vec<Candidate> = (0..200)
        .map(|client| Candidate {
            client,
            size: 10,
            group: 0,
        })
        .collect();
    let mut counts = vec![0u32; 200];
    let mut sizes = BTreeSet::new();
    for round in 1..=1000 {
        let picked = s
            .configure_round(round, 0, &candidates, &BTreeSet::new())
            .unwrap();
        sizes.insert(picked.len());
        for c in picked {
            counts[c as usize] += 1;
        }
    }
    // q = 0.05 over 1,000 rounds: 50 ± 7 per client; the round size varies.
    let total: u32 = counts.iter().sum();
    assert!(
        (f64::from(total) / 200_000.0 - 0.05).abs() < 0.002,
        "{total}"
    );
    assert!(counts.iter().all(|&c| (20..=90).contains(&c)), "{counts:?}");
    assert!(sizes.len() > 5, "{sizes:?}");
    // Another secret, other draws; too few connected, no round.
    let other = build(config(10, 1.0, 1.0), &context(200, 10));
    assert_ne!(
        s.configure_round(1, 0, &candidates, &BTreeSet::new()),
        other.configure_round(1, 0, &candidates, &BTreeSet::new())
    );
    assert_eq!(
        s.configure_round(1, 0, &candidates[..5], &BTreeSet::new()),
        None
    );
}

#[test]
fn the_ledger_matches_the_accountant_and_the_budget_stops_training() {
    let mut dp = config(10, 1.1, 1.0);
    dp.dp.epsilon_budget = Some(2.0);
    let s = build(dp, &context(1000, 1));
    let mut state = s.initial_state(2);
    let mut rounds = 0;
    while s.admits_next_round(&state).is_ok() {
        state = release(s.as_ref(), &[vec![0.1, 0.1]], &state).state;
        rounds += 1;
        assert!(rounds < 10_000);
    }
    let spent = s.privacy(&state).unwrap();
    assert!(spent.epsilon <= 2.0, "{spent:?}");
    let accountant = SampledGaussian {
        sampling_rate: 0.01,
        noise_multiplier: 1.1,
        rounds,
    };
    let expected = accountant.epsilon(1e-5, &default_orders()).unwrap().epsilon;
    assert!((spent.epsilon - expected).abs() < 1e-9 * expected);
    let one_more = SampledGaussian {
        rounds: rounds + 1,
        ..accountant
    };
    assert!(one_more.epsilon(1e-5, &default_orders()).unwrap().epsilon > 2.0);
    let why = s.admits_next_round(&state).unwrap_err();
    assert!(why.contains("over the budget of 2"), "{why}");
    // The ledger survives a restart.
    assert_eq!(
        s.privacy(&s.restore(state.clone(), 2).unwrap()),
        Some(spent)
    );
}

#[test]
fn edges_shares_are_noised_once_at_the_root() {
    let s = build(config(4, 0.5, 1.0), &context(100, 5));
    let state = s.initial_state(4);
    // A round nobody delivered to releases noise alone, and is charged.
    let empty = s.part(&s.open_part(Some(1.0), 4).unwrap()).unwrap();
    let noise_only = s.combine(&[empty], Some(1.0), &[0.0; 4], &state).unwrap();
    assert!(noise_only.weights.iter().all(|&w| w != 0.0));
    assert_eq!(s.privacy(&noise_only.state).unwrap().rounds, 1);
    let edges: Vec<Partial> = [vec![0.5f32, 0.0, 0.0, 0.0], vec![0.0, 0.5, 0.0, 0.0]]
        .iter()
        .map(|d| {
            let mut open = s.open_part(Some(1.0), 4).unwrap();
            s.accept(&mut open, &delta(d), 1, 1).unwrap();
            s.part(&open).unwrap()
        })
        .collect();
    // The edges' shares are the clipped sums, unnoised.
    assert_eq!(edges[0].sum, vec![0.5, 0.0, 0.0, 0.0]);
    let out = s.combine(&edges, Some(1.0), &[0.0; 4], &state).unwrap();
    assert_ne!(out.weights, vec![0.125, 0.125, 0.0, 0.0]);
    assert_eq!(s.privacy(&out.state).unwrap().rounds, 1);
}

#[test]
fn an_adaptive_bound_follows_the_median_and_the_updates_noise_is_lowered_to_pay_for_it() {
    let mut adaptive = config(20, 1.0, 1.0);
    adaptive.dp.adaptive = Some(AdaptiveClip {
        quantile: 0.5,
        count_noise: 1.0,
        learning_rate: 0.2,
    });
    // 1/z² = 1/z_Δ² + 1/(2σ_b)²: z_Δ = 1/√(1 − 1/4).
    assert!((adaptive.dp.update_noise() - (1.0f64 / 0.75).sqrt()).abs() < 1e-12);
    let s = build(adaptive, &context(20, 2));
    let mut state = s.initial_state(2);
    // Twenty clients a round (q = 1), norms spread from 0.05 to 1.0: the
    // median is about 0.5.
    let deltas: Vec<Vec<f32>> = (1..=20).map(|i| vec![i as f32 * 0.05, 0.0]).collect();
    for _ in 0..100 {
        state = release(s.as_ref(), &deltas, &state).state;
    }
    let bound = s.ordered_bound(&state).unwrap().unwrap();
    assert!((0.35..=0.7).contains(&bound), "{bound}");
    let restored = s.restore(state.clone(), 2).unwrap();
    assert_eq!(s.ordered_bound(&restored).unwrap(), Some(bound));
    // The ledger spends what one Gaussian of multiplier z does.
    let spent = s.privacy(&state).unwrap();
    let account = SampledGaussian {
        sampling_rate: 1.0,
        noise_multiplier: 1.0,
        rounds: 100,
    };
    let expected = account.epsilon(1e-5, &default_orders()).unwrap().epsilon;
    assert!((spent.epsilon - expected).abs() < 1e-9 * expected);
    let mut too_little = adaptive;
    too_little.dp.adaptive = Some(AdaptiveClip {
        count_noise: 0.5,
        ..adaptive.dp.adaptive.unwrap()
    });
    assert!(too_little.validate().unwrap_err().contains("count's noise"));
}

#[test]
fn bad_settings_are_refused() {
    let ok = config(4, 1.0, 1.0);
    assert!(ok.validate().is_ok());
    let mut no_noise = ok;
    no_noise.dp.noise_multiplier = 0.0;
    assert!(
        no_noise
            .validate()
            .unwrap_err()
            .contains("noise multiplier")
    );
    let adaptive = StrategyConfig {
        clipping: Clipping::adaptive(1.0),
        ..ok
    };
    assert!(adaptive.validate().unwrap_err().contains("fixed"));
    let median = StrategyConfig {
        aggregation: Aggregation::Median,
        ..ok
    };
    assert!(median.validate().is_err());
    assert!((default_delta(1103) - 1.0 / 1103f64.powf(1.1)).abs() < 1e-15);
}

fn distributed(clients_per_round: usize, z: f64, min_inputs: Option<u32>) -> StrategyConfig {
    let mut config = config(clients_per_round, z, 0.5);
    config.dp.distributed = Some(DistributedDp { min_inputs });
    config
}

/// Under distributed DP the server adds nothing to the devices' (already
/// noised) sum, plans each device's share for the round's fewest inputs, and
/// charges the Skellam mechanism: never less than the Gaussian of the same z.
#[test]
fn distributed_dp_adds_no_server_noise_and_charges_the_skellam_mechanism() {
    let (z, params) = (1.0, 5_000);
    let s = build(distributed(50, z, None), &context(1103, 4));
    let plan = s.device_noise(params).unwrap().unwrap();
    // 80 % of the 50 expected clients.
    assert_eq!(plan.min_inputs, 40);
    assert!((39.0 * plan.variance).sqrt() / plan.scaled_bound - z < 1e-9);
    let mut state = s.initial_state(params);
    let summed = vec![0.25f32; params];
    let part = Partial {
        sum: summed.clone(),
        total_weight: 45.0,
        updates: 45,
        norms: Vec::new(),
    };
    for _ in 0..3 {
        let out = s
            .combine(
                std::slice::from_ref(&part),
                Some(0.5),
                &vec![0.0; params],
                &state,
            )
            .unwrap();
        // FedAvg at lr 1 from zero: the sum over the 50 expected, nothing added.
        assert!(
            out.weights.iter().all(|&w| w == 0.25 / 50.0),
            "{:?}",
            &out.weights[..3]
        );
        state = out.state;
    }
    let spent = s.privacy(&state).unwrap();
    assert!(spent.distributed && spent.rounds == 3);
    let gaussian = SampledGaussian {
        sampling_rate: 50.0 / 1103.0,
        noise_multiplier: z,
        rounds: 3,
    }
    .epsilon(1e-5, &default_orders())
    .unwrap()
    .epsilon;
    let skellam = crate::accountant::SampledSkellam {
        rounds: 3,
        ..plan.accountant(50.0 / 1103.0, z, params)
    }
    .epsilon(1e-5, &default_orders())
    .unwrap()
    .epsilon;
    assert!(spent.epsilon >= gaussian, "{} vs {gaussian}", spent.epsilon);
    assert!(
        (spent.epsilon / skellam - 1.0).abs() < 1e-9,
        "{} vs {skellam}",
        spent.epsilon
    );
    // A round of nothing (a sum refused) is charged the same and moves nothing.
    let empty = s
        .combine(&[], Some(0.5), &vec![0.0; params], &state)
        .unwrap();
    assert!(empty.weights.iter().all(|&w| w == 0.0));
    assert_eq!(s.privacy(&empty.state).unwrap().rounds, 4);
    // The central strategy plans no device noise.
    let central = build(config(50, z, 0.5), &context(1103, 4));
    assert_eq!(central.device_noise(params), Ok(None));
    // Adaptive clipping cannot see single norms under distributed DP.
    let mut adaptive = distributed(50, z, Some(10));
    adaptive.dp.adaptive = Some(AdaptiveClip {
        quantile: 0.5,
        count_noise: 2.5,
        learning_rate: 0.2,
    });
    assert!(adaptive.validate().unwrap_err().contains("adaptive"));
}
