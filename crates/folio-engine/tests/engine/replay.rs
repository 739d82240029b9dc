use super::*;

/// Everything a run of secure DP rounds shows the world: each frame sent (resume
/// tokens, masking graphs, round seeds, the models), and each commit (noised
/// weights included).
fn secure_dp_run(entropy: Entropy) -> (Vec<String>, Vec<RoundRecord>, Vec<f32>) {
    let dp = dp_strategy(4, 1.0);
    let mut config = config(dp, Some(3));
    config.entropy = entropy;
    config.check_devices = true;
    config.rounds.secure = Some(folio_engine::SecureRounds {
        threshold: None,
        degree: 0,
        step_timeout: Duration::from_secs(5),
        min_cohort: 3,
    });
    let mut host = Host::of_population(config, fresh_start(), 4);
    let mut shown = Vec::new();
    for client in ["A", "B", "C", "D"] {
        let joined = host.engine.join(join(client), host.now).unwrap();
        shown.push(joined.token);
        host.run();
    }
    // Every device passes its check (the probe ids are drawn too).
    for (session, message) in std::mem::take(&mut host.sent) {
        shown.push(format!("{session:?} {message:?}"));
        if let ServerMessage::Probe(probe) = message.as_ref() {
            host.engine
                .device_checked(session[0], probe.id, Ok(()), host.now);
            host.run();
        }
    }
    for round in 1..=3 {
        let deltas = host
            .selected()
            .into_iter()
            .map(|s| (s, [0.1 * round as f32, -0.2, 0.3, 0.05]))
            .collect();
        super::secure::run_secure_round(&mut host, &deltas, &[]);
        host.wait(DEADLINE);
    }
    shown.extend(host.sent.iter().map(|(to, m)| format!("{to:?} {m:?}")));
    let weights = host.engine.weights().to_vec();
    (shown, host.committed, weights)
}

#[test]
fn a_run_replays_bit_for_bit_from_its_entropy_and_another_draws_anew() {
    let (shown, committed, weights) = secure_dp_run(Entropy::from_seed(7));
    let (again, committed_again, weights_again) = secure_dp_run(Entropy::from_seed(7));
    assert!(
        committed.len() >= 3,
        "rounds committed: {}",
        committed.len()
    );
    assert_eq!(shown, again, "every frame, token and graph the same");
    assert_eq!(
        committed
            .iter()
            .map(|r| r.model_hash.clone())
            .collect::<Vec<_>>(),
        committed_again
            .iter()
            .map(|r| r.model_hash.clone())
            .collect::<Vec<_>>()
    );
    let bits = |w: &[f32]| w.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(&weights),
        bits(&weights_again),
        "the noised model, bit for bit"
    );
    let (other, _, other_weights) = secure_dp_run(Entropy::from_seed(8));
    assert_ne!(shown[0], other[0], "another entropy, another resume token");
    assert_ne!(bits(&weights), bits(&other_weights), "and other noise");
}
