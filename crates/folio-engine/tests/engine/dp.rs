use super::cluster::{Cluster, values_for};
use super::*;

#[test]
fn dp_training_stops_before_a_round_would_exceed_the_budget_and_says_why() {
    let dp = StrategyConfig {
        kind: folio_fed::StrategyKind::DpFedAvg,
        clipping: Clipping::Fixed { bound: 1.0 },
        dp: folio_fed::DpConfig {
            noise_multiplier: 2.0,
            delta: Some(1e-5),
            epsilon_budget: Some(4.0),
            adaptive: None,
            distributed: None,
        },
        ..strategy_config(3, 3)
    };
    let mut host = Host::fresh(dp, None);
    let sessions: Vec<u64> = ["A", "B", "C"].iter().map(|c| host.join(c)).collect();
    let mut rounds = 0;
    while let Some(open) = host.engine.status(host.now).open_round {
        // No population given: q = 1, every connected client in every round.
        assert_eq!(open.selected_sessions, sessions);
        for &session in &sessions {
            host.update(session, open.round, [0.5; PARAMS]).unwrap();
        }
        rounds += 1;
        assert!(rounds < 100, "the budget never stopped training");
    }
    let status = host.engine.status(host.now);
    assert_eq!(status.phase, "finished");
    let why = status.stopped.expect("says why it stopped");
    assert!(why.contains("over the budget of 4"), "{why}");
    let privacy = status.privacy.expect("a DP federation reports its ε");
    assert_eq!(privacy.rounds, rounds);
    assert!(privacy.epsilon <= 4.0);
    // The accountant's own figures: one more round would have exceeded it.
    let account = |rounds| {
        folio_fed::accountant::SampledGaussian {
            sampling_rate: 1.0,
            noise_multiplier: 2.0,
            rounds,
        }
        .epsilon(1e-5, &folio_fed::accountant::default_orders())
        .unwrap()
        .epsilon
    };
    assert!((privacy.epsilon - account(rounds)).abs() < 1e-9);
    assert!(account(rounds + 1) > 4.0);
    // Every committed record carries its ε, rising round by round.
    let epsilons: Vec<f64> = host.committed.iter().filter_map(|r| r.epsilon).collect();
    assert_eq!(epsilons.len() as u64, rounds + 1);
    assert!(epsilons.windows(2).all(|w| w[0] < w[1]), "{epsilons:?}");
}

#[test]
fn a_dp_round_whose_sample_is_empty_still_releases_its_noise_and_is_charged() {
    // 3 clients a round of a population of 1,000: q = 0.003, so with the five
    // clients here connected most draws are empty. Drawing again until someone
    // is picked would take a connected client in nearly every round (far above
    // q); each such round instead commits noise alone, and is charged.
    let dp = dp_strategy(3, 1.0);
    let start = Start {
        weights: vec![0.0; PARAMS],
        strategy: None,
        history: Vec::new(),
    };
    let mut host = Host::of_population(config(dp, Some(40)), start, 1_000);
    for client in ["A", "B", "C", "D", "E"] {
        host.join(client);
    }
    while let Some(open) = host.engine.status(host.now).open_round {
        for session in open.selected_sessions {
            host.update(session, open.round, [0.5; PARAMS]).unwrap();
        }
    }
    assert!(host.engine.is_finished());
    let rounds: Vec<(u64, usize)> = host
        .committed
        .iter()
        .map(|r| (r.round, r.clients))
        .collect();
    assert_eq!(rounds.len(), 41, "every round committed: {rounds:?}");
    let empty = rounds
        .iter()
        .filter(|(round, clients)| *round > 0 && *clients == 0)
        .count();
    assert!(empty >= 30, "most samples are empty: {rounds:?}");
    assert_eq!(host.engine.status(host.now).privacy.unwrap().rounds, 40);
    assert_ne!(
        host.engine.weights().as_slice(),
        [0.0; PARAMS],
        "noise was released"
    );
}

#[test]
fn a_dp_cluster_noises_once_at_the_root_and_spends_what_one_server_does() {
    let dp = dp_strategy(4, 0.8);
    let mut whole = Host::fresh(dp, Some(3));
    let sessions: Vec<u64> = ["A", "B", "C", "D"].iter().map(|c| whole.join(c)).collect();
    for round in 1..=3 {
        for (&session, client) in sessions.iter().zip(["A", "B", "C", "D"]) {
            whole
                .update(session, round, values_for(client, round))
                .unwrap();
        }
    }
    let mut cluster = Cluster::new(dp, &[&["A", "B"], &["C", "D"]]);
    for round in 1..=3 {
        cluster.offer();
        cluster.deliver_orders();
        cluster.train(round, &[0, 1]);
        // The edges' shares are clipped sums, with no noise of their own.
        for (e, edge) in cluster.edges.iter().enumerate() {
            let (_, part) = &edge.parts[0];
            let mut clipped = [0f32; PARAMS];
            for (_, client) in &cluster.clients[e] {
                let values = values_for(client, round);
                let norm = values.iter().map(|v| v * v).sum::<f32>().sqrt();
                let scale = (0.8 / norm).min(1.0);
                for (c, v) in clipped.iter_mut().zip(values) {
                    *c += v * scale;
                }
            }
            for (a, b) in part.sum.iter().zip(clipped) {
                assert!((a - b).abs() < 1e-6, "{:?} vs {clipped:?}", part.sum);
            }
        }
        cluster.deliver_parts();
        assert_eq!(cluster.root.engine.completed_rounds(), round);
        cluster.deliver_commits();
    }
    // The same ε, round by round, as one server.
    let epsilons = |c: &[RoundRecord]| c.iter().map(|r| r.epsilon).collect::<Vec<_>>();
    assert_eq!(
        epsilons(&cluster.root.committed),
        epsilons(&whole.committed)
    );
    let privacy = cluster.root.engine.status(cluster.root.now).privacy;
    assert_eq!(privacy.unwrap().rounds, 3);
    // Both draw their noise from the same (seeded) secret, in the same order:
    // the split adds it once, exactly where one server does, so the models agree.
    let (root, one) = (cluster.root.engine.weights(), whole.engine.weights());
    for (a, b) in root.iter().zip(one.iter()) {
        assert!(
            (a - b).abs() <= 1e-6 * (1.0 + b.abs()),
            "{root:?} vs {one:?}"
        );
    }
    // And that is not the noise-free model: Σ of the clipped deltas / 4 a round.
    let mut plain = [0f32; PARAMS];
    for round in 1..=3 {
        for client in ["A", "B", "C", "D"] {
            let values = values_for(client, round);
            let norm = values.iter().map(|v| v * v).sum::<f32>().sqrt();
            for (p, v) in plain.iter_mut().zip(values) {
                *p += v * (0.8 / norm).min(1.0) / 4.0;
            }
        }
    }
    let off: f32 = root.iter().zip(plain).map(|(a, b)| (a - b).abs()).sum();
    assert!(off > 0.1, "no noise: {root:?} vs {plain:?}");
}

/// Status fields every surface may show, and why (the withheld ones are
/// `folio_engine::STATUS_WITHHELD`).
const STATUS_PUBLIC: &[&str] = &[
    "preset",
    "parameters",
    "next_round",
    "completed_rounds",
    "phase",
    "open_round",
    "open_round.round",
    "open_round.seconds_left",
    "open_round.deadline_seconds",
    "open_round.secure_step",
    "latest",
    "history_len",
    "connected",
    "sessions",
    "config",
    "privacy",
    "stopped",
    "asynchronous",
    "asynchronous.buffer",
    "asynchronous.max_staleness",
];

/// Every field of the status, `a.b` for those of its open round and
/// asynchronous parts.
fn status_fields(status: &serde_json::Value) -> Vec<String> {
    let mut fields = Vec::new();
    for (name, value) in status.as_object().unwrap() {
        fields.push(name.clone());
        if ["open_round", "asynchronous"].contains(&name.as_str()) {
            for inner in value.as_object().into_iter().flat_map(|o| o.keys()) {
                fields.push(format!("{name}.{inner}"));
            }
        }
    }
    fields.sort();
    fields
}

#[test]
fn a_dp_status_names_no_participant_and_a_device_sees_its_own_row() {
    let mut host = Host::fresh(dp_strategy(3, 1.0), None);
    let tokens: Vec<String> = ["A", "B", "C"]
        .iter()
        .map(|c| {
            let joined = host.engine.join(join(c), host.now).unwrap();
            host.run();
            joined.token
        })
        .collect();
    let open = host.engine.status(host.now).open_round.unwrap();
    for &session in &open.selected_sessions[..2] {
        host.update(session, open.round, [0.5; PARAMS]).unwrap();
    }
    let status = host.engine.status(host.now);
    let release = host.engine.release();
    assert_eq!(release, folio_engine::Release::Private);
    // In full (the operator's view) every field is either public or withheld.
    let full = folio_engine::Release::Full.status(status.clone(), None);
    let mut classified: Vec<String> = STATUS_PUBLIC
        .iter()
        .chain(folio_engine::STATUS_WITHHELD.iter().map(|(f, _)| f))
        .map(|f| f.to_string())
        .collect();
    classified.sort();
    let mut shown = status_fields(&full);
    shown.retain(|f| !f.starts_with("asynchronous")); // synchronous rounds here
    classified.retain(|f| !f.starts_with("asynchronous"));
    assert_eq!(shown, classified, "a status field is not classified");
    assert_eq!(full["clients"].as_array().unwrap().len(), 3);
    assert!(full.to_string().contains("\"A\"") && full["latest"]["clients"] == 0);
    // Anyone: no session, no count of the sample, no participant's figure.
    let public = release.status(status.clone(), None);
    let text = public.to_string();
    for (field, _) in folio_engine::STATUS_WITHHELD {
        assert!(
            !status_fields(&public).contains(&field.to_string()),
            "{field}: {text}"
        );
    }
    for client in ["A", "B", "C"] {
        assert!(!text.contains(&format!("\"{client}\"")), "{client}: {text}");
    }
    assert!(public["own"].is_null() && public["private"] == true);
    for (field, _) in folio_engine::RECORD_WITHHELD {
        assert!(public["latest"].get(field).is_none(), "latest.{field}");
    }
    // A device that proves its session: its own row, nobody else's.
    let own = host.engine.session_of_token(&tokens[1]).unwrap();
    let mine = release.status(status.clone(), Some(own));
    assert_eq!(mine["own"]["session"], own);
    assert!(!mine.to_string().contains("\"A\"") && !mine.to_string().contains("\"C\""));
    assert_eq!(host.engine.session_of_token("1.forged"), None);
}
