//! Distributed DP in the engine: the devices noise their updates inside the
//! secure sum, the server adds none, and a round short of the inputs the noise
//! is planned for unmasks nothing.

use super::secure::{
    dp_secure_host_with, run_secure_round, run_secure_round_with, unmask_requests,
};
use super::*;

fn distributed(min_inputs: u32) -> Option<folio_fed::DistributedDp> {
    Some(folio_fed::DistributedDp {
        min_inputs: Some(min_inputs),
    })
}

/// Thirty rounds of four devices (q = 1, z = 1, S = 1, the noise planned for
/// two inputs, so each device adds all of it): each committed step is the
/// clipped deltas' sum over four plus the four devices' noise, of standard
/// deviation z·S·√4 = 2 over four. The server adds none: with its noise too
/// it would be √5, and with its alone 1.
#[test]
fn the_devices_noise_is_all_a_distributed_dp_round_releases() {
    let (mut host, sessions) = dp_secure_host_with(distributed(2), 4);
    let spec = host.starts().last().unwrap().1.secure.unwrap();
    let noise = spec
        .quantizer
        .noise
        .expect("the devices are told their noise");
    // Any one of the inputs carries z = 1.
    assert!((noise.variance.sqrt() / noise.scaled_bound - 1.0).abs() < 1e-9);
    let deltas = sessions.iter().map(|&s| (s, [0.1; PARAMS])).collect();
    let mut residuals = Vec::new();
    let mut before = host.engine.weights().to_vec();
    for round in 1..=30 {
        run_secure_round(&mut host, &deltas, &[]);
        let record = host.committed.last().unwrap();
        assert_eq!((record.round, record.clients), (round, 4));
        let after = host.engine.weights().to_vec();
        for (a, b) in after.iter().zip(&before) {
            // The released sum, minus the true one (0.4 a coordinate).
            residuals.push(f64::from(a - b) * 4.0 - 0.4);
        }
        before = after;
    }
    let n = residuals.len() as f64;
    let mean = residuals.iter().sum::<f64>() / n;
    let std = (residuals.iter().map(|r| r * r).sum::<f64>() / n).sqrt();
    let expected = 2.0;
    assert!(mean.abs() < 4.0 * expected / n.sqrt(), "mean {mean}");
    assert!(
        (0.85..1.1).contains(&(std / expected)),
        "noise std {std} vs {expected}"
    );
    let privacy = host.engine.status(host.now).privacy.unwrap();
    assert!(privacy.distributed && privacy.rounds == 30);
}

/// With the noise planned for all four, a round where one leaves after the
/// shares has three masked inputs: no unmasking request goes out, the model
/// stays as it was (no server noise to release) and the round is charged,
/// not drawn again.
#[test]
fn a_distributed_dp_round_short_of_its_planned_inputs_unmasks_nothing() {
    let (mut host, sessions) = dp_secure_host_with(distributed(4), 4);
    let deltas = sessions.iter().map(|&s| (s, [0.1; PARAMS])).collect();
    run_secure_round(&mut host, &deltas, &[sessions[3]]);
    host.wait(Duration::from_secs(70));
    assert_eq!(unmask_requests(&host), 0);
    let record = host.committed.last().unwrap();
    assert_eq!((record.round, record.clients), (1, 0));
    assert_eq!(host.engine.weights().as_slice(), [0.0; PARAMS]);
    assert_eq!(host.engine.status(host.now).privacy.unwrap().rounds, 1);
    let round_one_starts = host.starts().iter().filter(|(_, s)| s.round == 1).count();
    assert_eq!(round_one_starts, 1, "not drawn again");
}

/// The noise is no cover for a large value: in a population of 40 (the field
/// sized for 40 inputs at their bound plus their noise), a round of four where
/// one client puts 17 clip bounds into one coordinate stays inside the field (and
/// within the norm the noise allows, 4·S + σ(√d + 8) ≈ 18·S) but
/// is refused: no coordinate of an honest sum of four exceeds 4·S plus eight
/// standard deviations of its noise (≈ 15·S). Honest, the same round commits.
#[test]
fn a_value_hidden_behind_the_devices_noise_is_refused() {
    let (mut host, sessions) = dp_secure_host_with(distributed(3), 40);
    let spec = host.starts().last().unwrap().1.secure.unwrap();
    let noise = spec.quantizer.noise.unwrap();
    let mut rng = <rand_chacha::ChaCha20Rng as rand_core::SeedableRng>::seed_from_u64(1);
    let input = folio_secagg::Input {
        delta: &[0.0; PARAMS],
        weight: 1.0,
        loss: 0.0,
        accuracy: 0.0,
        held_out: folio_secagg::HeldOut::default(),
    };
    let mut hidden = spec.quantizer.encode(&input, &mut rng).unwrap();
    hidden[0] = (17.0 * noise.scaled_bound) as i32 as u32;
    let deltas = sessions.iter().map(|&s| (s, [0.1; PARAMS])).collect();
    run_secure_round_with(&mut host, &deltas, &[], &[(sessions[3], hidden)]);
    let refused = host.committed.last().unwrap();
    assert_eq!((refused.round, refused.clients), (1, 0), "refused");
    run_secure_round(&mut host, &deltas, &[]);
    let honest = host.committed.last().unwrap();
    assert_eq!((honest.round, honest.clients), (2, 4), "committed");
}

/// Distributed DP is refused where it cannot hold: without secure rounds,
/// with federated evaluation's un-noised held-out sums, or in a cluster.
#[test]
fn distributed_dp_is_refused_where_it_cannot_hold() {
    let mut strategy = dp_strategy(4, 1.0);
    strategy.dp.distributed = distributed(3);
    let plain = config(strategy, None);
    assert!(plain.rounds.validate().unwrap_err().contains("--secure"));
    let mut secure = plain.clone();
    secure.rounds.secure = Some(folio_engine::SecureRounds {
        threshold: None,
        degree: 0,
        step_timeout: Duration::from_secs(5),
        min_cohort: 3,
    });
    assert!(secure.rounds.validate().is_ok());
    let mut evaluated = secure.clone();
    evaluated.rounds.federated_eval = Some(folio_engine::FederatedEval {
        every: 1,
        devices: 4,
        max_chars: 100,
        deadline: Duration::from_secs(5),
    });
    assert!(
        evaluated
            .rounds
            .validate()
            .unwrap_err()
            .contains("federated")
    );
    let start = Start {
        weights: vec![0.0; PARAMS],
        strategy: None,
        history: Vec::new(),
    };
    let edge = Engine::<folio_engine::Edge>::new(secure, clients(), start, Instant::now());
    assert!(edge.err().unwrap().to_string().contains("cluster"));
}
