use super::cluster::{Cluster, values_for};
use super::*;

fn secure_config(clients: usize, quorum: usize) -> EngineConfig {
    let mut config = config(
        StrategyConfig {
            clipping: Clipping::Fixed { bound: 1.0 },
            ..strategy_config(clients, quorum)
        },
        None,
    );
    config.rounds.secure = Some(folio_engine::SecureRounds {
        threshold: None,
        degree: 0,
        step_timeout: Duration::from_secs(5),
        min_cohort: 3,
    });
    config
}

/// The secure steps the engine sent `session` and not yet handled.
fn secure_steps<R: Hosted>(
    host: &Host<R>,
    from: usize,
    session: u64,
) -> Vec<folio_secagg::ServerStep> {
    host.sent[from..]
        .iter()
        .filter(|(to, _)| to.contains(&session))
        .filter_map(|(_, message)| match message.as_ref() {
            ServerMessage::Secure(step) => Some(step.clone()),
            _ => None,
        })
        .collect()
}

/// Runs the open secure round with one client per session in `deltas`; those
/// in `leave_after_shares` disconnect instead of sending their masked input.
/// Each client answers every step the engine sends it, until none is left.
pub(super) fn run_secure_round<R: Hosted + HoldsSessions>(
    host: &mut Host<R>,
    deltas: &std::collections::BTreeMap<u64, [f32; PARAMS]>,
    leave_after_shares: &[u64],
) {
    run_secure_round_with(host, deltas, leave_after_shares, &[]);
}

/// [`run_secure_round`], where the clients in `hostile` mask integers of their
/// own choosing (out of the quantiser's range) instead of their update.
pub(super) fn run_secure_round_with<R: Hosted + HoldsSessions>(
    host: &mut Host<R>,
    deltas: &std::collections::BTreeMap<u64, [f32; PARAMS]>,
    leave_after_shares: &[u64],
    hostile: &[(u64, Vec<u32>)],
) {
    use folio_secagg::{ClientStep, SecureClient, ServerStep};
    let start = host.starts().last().unwrap().1.clone();
    let spec = start.secure.expect("a secure round");
    let mut clients = std::collections::BTreeMap::new();
    for (i, &session) in deltas.keys().enumerate() {
        // Fresh for each round, as a device's is: its noise is drawn from it.
        let mut entropy = [i as u8 + 1; 32];
        entropy[..8].copy_from_slice(&spec.id.to_le_bytes());
        let (client, keys) = SecureClient::new(spec, entropy);
        clients.insert(session, client);
        host.engine
            .secure(session, ClientStep::Keys(keys), host.now)
            .unwrap();
        host.run();
    }
    // The steps of this round only: those sent since its start.
    let mut handled = host
        .sent
        .iter()
        .rposition(|(_, m)| matches!(m.as_ref(), ServerMessage::RoundStart(_)))
        .unwrap_or(0);
    loop {
        let from = handled;
        handled = host.sent.len();
        let mut answered = false;
        for (&session, client) in &mut clients {
            for step in secure_steps(host, from, session) {
                let reply = match step {
                    ServerStep::Roster(roster) => {
                        ClientStep::Shares(client.roster(roster).unwrap())
                    }
                    ServerStep::Shares(shares) => ClientStep::Check(client.shares(shares).unwrap()),
                    ServerStep::Proceed(proceed) => {
                        client.proceed(proceed).unwrap();
                        if leave_after_shares.contains(&session) {
                            host.engine.leave(session, host.now);
                            continue;
                        }
                        if let Some((_, values)) = hostile.iter().find(|(s, _)| *s == session) {
                            ClientStep::Masked(client.mask_values(values.clone()).unwrap())
                        } else {
                            // Where the round evaluates on the devices: 100
                            // held-out characters each, 40 right, 2 nats each.
                            let held_out = match spec.quantizer.held_out_chars {
                                0 => folio_secagg::HeldOut::default(),
                                _ => folio_secagg::HeldOut {
                                    loss_sum: 200.0,
                                    correct: 40.0,
                                    chars: 100.0,
                                },
                            };
                            let input = folio_secagg::Input {
                                delta: &deltas[&session],
                                weight: spec.weight(8),
                                loss: 2.0,
                                accuracy: 0.25,
                                held_out,
                            };
                            ClientStep::Masked(client.mask(&input).unwrap())
                        }
                    }
                    ServerStep::Unmask(request) => {
                        ClientStep::Reveal(client.unmask(request).unwrap())
                    }
                };
                host.engine.secure(session, reply, host.now).unwrap();
                answered = true;
            }
        }
        host.run();
        if !answered {
            break;
        }
    }
}

/// Unmasking requests the engine sent so far.
pub(super) fn unmask_requests<R: Hosted>(host: &Host<R>) -> usize {
    host.sent
        .iter()
        .filter(|(_, m)| {
            matches!(
                m.as_ref(),
                ServerMessage::Secure(folio_secagg::ServerStep::Unmask(_))
            )
        })
        .count()
}

/// A fresh federation of secure rounds of four (with `quorum`), and A–D joined.
fn secure_host(quorum: usize) -> (Host, Vec<u64>) {
    let start = Start {
        weights: vec![0.0; PARAMS],
        strategy: None,
        history: Vec::new(),
    };
    let mut host = Host::new(secure_config(4, quorum), start);
    let sessions = ["A", "B", "C", "D"].iter().map(|c| host.join(c)).collect();
    (host, sessions)
}

#[test]
fn a_secure_round_commits_the_mean_of_the_clipped_deltas_from_their_sum_alone() {
    let (mut host, sessions) = secure_host(3);
    let start = host.starts().last().unwrap().1.clone();
    let spec = start.secure.expect("the round is secure");
    assert_eq!(spec.quantizer.clip_bound, 1.0);
    assert_eq!(spec.threshold, 3, "a majority of 4 holders");
    // A plain update has no place in a secure round.
    let refused = host.update(sessions[0], 1, [0.1; PARAMS]);
    assert_eq!(refused, Err(ErrorCode::BadSecureStep));
    // C's delta is over the bound: its client clips it. D drops after sharing.
    let deltas = std::collections::BTreeMap::from([
        (sessions[0], [0.3, 0.0, 0.0, 0.0]),
        (sessions[1], [0.0, -0.6, 0.0, 0.0]),
        (sessions[2], [0.0, 0.0, 4.0, 0.0]),
        (sessions[3], [0.5, 0.5, 0.5, 0.5]),
    ]);
    run_secure_round(&mut host, &deltas, &[sessions[3]]);
    let record = host.committed.last().unwrap().clone();
    assert_eq!((record.round, record.clients, record.secure), (1, 3, true));
    assert!((record.train_loss.unwrap() - 2.0).abs() < 1e-6);
    assert_eq!(record.delta_norm, None, "single norms are hidden");
    let expected = [0.1, -0.2, 1.0 / 3.0, 0.0];
    for (w, e) in host.engine.weights().iter().zip(expected) {
        assert!((f64::from(*w) - e).abs() < 1e-6, "{w} vs {e}");
    }
}

#[test]
fn a_secure_round_short_of_its_threshold_runs_again_with_new_keys() {
    let (mut host, sessions) = secure_host(1);
    let first = host.starts().last().unwrap().1.secure.unwrap();
    // Only two of four send keys: below the threshold of 3 when the step times out.
    for (i, &session) in sessions[..2].iter().enumerate() {
        let (_, keys) = folio_secagg::SecureClient::new(first, [i as u8 + 1; 32]);
        host.engine
            .secure(session, folio_secagg::ClientStep::Keys(keys), host.now)
            .unwrap();
    }
    host.wait(Duration::from_secs(6));
    assert_eq!(host.committed.len(), 1, "nothing committed");
    let retry = host.starts().last().unwrap().1.clone();
    let second = retry.secure.unwrap();
    assert_eq!(retry.round, 1);
    assert_ne!(second.id, first.id, "the retry is a new secure round");
    // A late step of the abandoned attempt is refused.
    let (_, stale) = folio_secagg::SecureClient::new(first, [9; 32]);
    let late = host
        .engine
        .secure(sessions[0], folio_secagg::ClientStep::Keys(stale), host.now);
    assert_eq!(late.unwrap_err().code, ErrorCode::BadSecureStep);
}

/// Each edge runs a secure round over its own clients and sends the root its
/// sum; an edge holding fewer than the minimum cohort (here 2 of 3) reveals
/// nothing and sends an empty share, so its clients' sum of two is never
/// unmasked.
#[test]
fn a_cluster_runs_a_secure_round_per_edge_and_the_root_combines_their_sums() {
    let clipped = |strategy: StrategyConfig| StrategyConfig {
        clipping: Clipping::Fixed { bound: 0.8 },
        ..strategy
    };
    // One server, plain, with the three clients whose sum is revealed: the reference.
    let mut whole = Host::fresh(clipped(strategy_config(3, 3)), Some(3));
    let mut sessions = std::collections::BTreeMap::new();
    for client in ["A", "B", "C"] {
        sessions.insert(whole.join(client), client);
    }
    for (&session, client) in &sessions {
        whole.update(session, 1, values_for(client, 1)).unwrap();
    }
    let (mut cluster, _) = secure_cluster(3);
    assert_eq!(
        unmask_requests(&cluster.edges[0]),
        3,
        "three asked to unmask"
    );
    assert_eq!(
        unmask_requests(&cluster.edges[1]),
        0,
        "a sum of two is never unmasked"
    );
    assert_eq!(cluster.edges[1].parts[0].0.reported.len(), 0);
    cluster.deliver_parts();
    assert_eq!(cluster.root.engine.completed_rounds(), 1);
    let (one, split) = (whole.engine.weights(), cluster.root.engine.weights());
    for (a, b) in split.iter().zip(one.iter()) {
        assert!((a - b).abs() <= 1e-6, "{split:?} vs {one:?}");
    }
    assert_eq!(cluster.root.committed.last().unwrap().clients, 3);
}

/// A root (rounds of five with `quorum`, clipping to 0.8) and two edges whose
/// clients (A–C, and D–E) ran round 1 as secure rounds of their own, their
/// shares not yet delivered: the first edge's sum of three unmasked, the
/// second's of two never.
fn secure_cluster(quorum: usize) -> (Cluster, RoundOrder) {
    let strategy = StrategyConfig {
        min_clients: 5,
        clipping: Clipping::Fixed { bound: 0.8 },
        ..strategy_config(5, quorum)
    };
    let groups: [&[&str]; 2] = [&["A", "B", "C"], &["D", "E"]];
    let mut cluster = Cluster::new(strategy, &groups);
    // The root runs with the edges' settings, as a cluster's nodes do.
    let mut root_config = cluster.root.engine.config().clone();
    root_config.rounds.secure = secure_config(2, 2).rounds.secure;
    cluster.root = Host::<Root>::start(root_config, fresh_start());
    for edge in &mut cluster.edges {
        edge.engine = {
            let mut config = edge.engine.config().clone();
            config.rounds.secure = secure_config(2, 2).rounds.secure;
            let start = Start {
                weights: vec![0.0; PARAMS],
                strategy: None,
                history: cluster.root.committed.clone(),
            };
            Engine::new(config, clients(), start, edge.now).unwrap()
        };
    }
    for (e, names) in groups.iter().enumerate() {
        cluster.clients[e] = names
            .iter()
            .map(|c| (cluster.edges[e].join(c), c.to_string()))
            .collect();
    }
    cluster.offer();
    let order = cluster.root.orders[0].clone();
    cluster.deliver_orders();
    for e in 0..2 {
        let deltas = cluster.clients[e]
            .iter()
            .map(|(s, c)| (*s, values_for(c, 1)))
            .collect();
        run_secure_round(&mut cluster.edges[e], &deltas, &[]);
        assert_eq!(
            cluster.edges[e].parts.len(),
            1,
            "edge {e}'s sum is its share"
        );
    }
    (cluster, order)
}

/// A root that fails over orders its open round again, as a new attempt. An
/// edge that already sent its unmasked sum for that round runs the new
/// attempt with no one: its clients would retrain from the same model and text
/// and give a second sum of nearly the same updates.
#[test]
fn an_edge_never_reveals_a_second_sum_for_a_round() {
    let (mut cluster, order) = secure_cluster(3);
    let edge = &mut cluster.edges[0];
    let starts = edge.starts().len();
    let again = RoundOrder {
        attempt: order.attempt + 1,
        sessions: order
            .sessions
            .iter()
            .filter(|&&s| s >> 32 == 0)
            .map(|&s| s & 0xffff_ffff)
            .collect(),
        ..order
    };
    edge.engine.order(&again, edge.now).unwrap();
    edge.run();
    assert_eq!(
        edge.starts().len(),
        starts,
        "no client is sent the round again"
    );
    let (report, part) = edge.parts.last().unwrap();
    assert_eq!(
        (report.attempt, report.reported.len(), part.updates),
        (1, 0, 0)
    );
}

/// A root whose round falls short of its quorum after an edge's secure sum
/// came in commits that sum: drawn again, the same clients would reveal
/// another sum of nearly the same updates.
#[test]
fn a_root_holding_an_unmasked_secure_sum_commits_it_rather_than_draw_again() {
    let (mut cluster, _) = secure_cluster(5);
    cluster.deliver_parts();
    let root = &cluster.root;
    assert_eq!(
        root.engine.completed_rounds(),
        1,
        "committed, not ordered again"
    );
    let record = root.committed.last().unwrap();
    assert_eq!((record.round, record.clients), (1, 3));
    assert!(
        root.orders.iter().all(|o| o.round > 1),
        "round 1 ordered again: {:?}",
        root.orders
    );
}

/// A secure round of one or two masked inputs is never unmasked, though its
/// threshold (a majority of one or two holders) and quorum would let it: it is
/// abandoned before any unmasking request goes out (a sum of one is that
/// client's update, of two each one's to the other); a DP round closes with its
/// noise alone.
#[test]
fn a_secure_sum_of_fewer_than_three_is_never_unmasked() {
    for (clients, dp) in [(1, false), (2, false), (2, true)] {
        let mut config = secure_config(clients, 1);
        if dp {
            config.rounds.strategy = StrategyConfig {
                kind: folio_fed::StrategyKind::DpFedAvg,
                clipping: Clipping::Fixed { bound: 1.0 },
                ..config.rounds.strategy
            };
        }
        let mut host = Host::of_population(config, fresh_start(), clients);
        let sessions: Vec<u64> = ["A", "B"][..clients].iter().map(|c| host.join(c)).collect();
        let deltas = sessions.iter().map(|&s| (s, [0.1; PARAMS])).collect();
        run_secure_round(&mut host, &deltas, &[]);
        let unmask_requests = unmask_requests(&host);
        let case = format!("{clients} clients, dp: {dp}");
        assert_eq!(unmask_requests, 0, "{case}");
        if dp {
            // Closed with noise alone (the model moves by the noise): charged,
            // never drawn again.
            assert_eq!(host.engine.completed_rounds(), 1, "{case}");
            assert_eq!(host.committed.last().unwrap().clients, 0, "{case}");
        } else {
            assert_eq!(host.engine.weights().as_slice(), [0.0; PARAMS], "{case}");
            assert_eq!(host.engine.completed_rounds(), 0, "{case}");
        }
    }
}

#[test]
fn a_secure_dp_round_that_cannot_unmask_releases_noise_alone_and_is_never_drawn_again() {
    // DP-FedAvg over secure rounds, q = 1 (4 clients a round of a population of
    // 4). Round 1: only one client sends keys, below the threshold of 3; the
    // round must not be drawn again (that would change q): it closes with
    // nothing, releases noise alone and is charged. Round 2 runs in full.
    let (mut host, sessions) = dp_secure_host();
    let first = host.starts().last().unwrap().1.secure.unwrap();
    let (_, keys) = folio_secagg::SecureClient::new(first, [1; 32]);
    host.engine
        .secure(sessions[0], folio_secagg::ClientStep::Keys(keys), host.now)
        .unwrap();
    host.wait(Duration::from_secs(6));
    let round1 = host.committed.last().unwrap().clone();
    assert_eq!(
        (round1.round, round1.clients),
        (1, 0),
        "closed empty, not redrawn"
    );
    assert_ne!(
        host.engine.weights().as_slice(),
        [0.0; PARAMS],
        "noise released"
    );
    let deltas = sessions.iter().map(|&s| (s, [0.1; PARAMS])).collect();
    run_secure_round(&mut host, &deltas, &[]);
    let round2 = host.committed.last().unwrap().clone();
    assert_eq!((round2.round, round2.clients, round2.secure), (2, 4, true));
    assert_eq!(host.engine.status(host.now).privacy.unwrap().rounds, 2);
}

/// DP-FedAvg over secure rounds of four, q = 1 (a population of four), two
/// rounds at most (thirty under distributed DP), and A–D joined.
pub(super) fn dp_secure_host() -> (Host, Vec<u64>) {
    dp_secure_host_with(None, 4)
}

/// [`dp_secure_host`] with a population of `population` (each client still
/// sampled with q = 1), the devices adding the noise where `distributed` is set.
pub(super) fn dp_secure_host_with(
    distributed: Option<folio_fed::DistributedDp>,
    population: usize,
) -> (Host, Vec<u64>) {
    let mut config = secure_config(4, 4);
    config.rounds.strategy = StrategyConfig {
        kind: folio_fed::StrategyKind::DpFedAvg,
        clients_per_round: population,
        dp: folio_fed::DpConfig {
            noise_multiplier: 1.0,
            distributed,
            ..folio_fed::DpConfig::default()
        },
        ..config.rounds.strategy
    };
    config.max_rounds = Some(if distributed.is_some() { 30 } else { 2 });
    let start = Start {
        weights: vec![0.0; PARAMS],
        strategy: None,
        history: Vec::new(),
    };
    let mut host = Host::of_population(config, start, population);
    let sessions = ["A", "B", "C", "D"].iter().map(|c| host.join(c)).collect();
    (host, sessions)
}

/// Runs round 1 with the last of `sessions` masking `garbage` in every
/// coordinate of its delta: the unmasked sum is refused, and the round is
/// committed without it.
fn refused_round(host: &mut Host, sessions: &[u64], garbage: u32) {
    let deltas = sessions.iter().map(|&s| (s, [0.01; PARAMS])).collect();
    let mut far_over_the_bound = vec![garbage; PARAMS];
    far_over_the_bound.extend([0; folio_secagg::quantize::EXTRAS]);
    let hostile = [(*sessions.last().unwrap(), far_over_the_bound)];
    run_secure_round_with(host, &deltas, &[], &hostile);
    let record = host.committed.last().unwrap();
    assert_eq!(
        (record.round, record.clients),
        (1, 0),
        "committed without it"
    );
}

/// DP over secure rounds (q = 1): a refused sum is not drawn again either (that
/// would also sample its clients above q); the round releases its noise alone
/// and is charged.
#[test]
fn a_dp_round_whose_secure_sum_is_refused_releases_noise_alone() {
    let (mut host, sessions) = dp_secure_host();
    refused_round(&mut host, &sessions, 2_000_000_000);
    assert_ne!(
        host.engine.weights().as_slice(),
        [0.0; PARAMS],
        "noise released"
    );
    assert_eq!(host.engine.status(host.now).privacy.unwrap().rounds, 1);
    assert_eq!(host.starts().last().unwrap().1.round, 2, "not drawn again");
}

#[test]
fn a_secure_sum_no_clipped_inputs_could_make_is_refused_and_never_drawn_again() {
    // D masks values far past the clip bound (it can: the server never sees
    // them alone). The unmasked sum's norm is over what the weights allow: it
    // is refused, and the round commits the model unchanged. Drawn again, the
    // same clients would reveal a second sum of nearly the same updates.
    let (mut host, sessions) = secure_host(4);
    refused_round(&mut host, &sessions, 500_000_000);
    assert_eq!(host.engine.weights().as_slice(), [0.0; PARAMS]);
    assert_eq!(
        host.engine.status(host.now).errors.get("bad_delta"),
        Some(&1)
    );
    let next = host.starts().last().unwrap().1.clone();
    assert_eq!(next.round, 2, "round 1 is not drawn again");
}

/// Under secure aggregation, federated evaluation rides on the round: its
/// devices measure the model they were sent, and the server learns the sum of
/// their figures with the round's, never one device's; no `Evaluate` goes out.
#[test]
fn a_secure_round_brings_its_devices_held_out_figures_summed() {
    let start = Start {
        weights: vec![0.0; PARAMS],
        strategy: None,
        history: Vec::new(),
    };
    let mut config = secure_config(4, 3);
    config.rounds.federated_eval = Some(folio_engine::FederatedEval {
        max_chars: 1_000,
        ..folio_engine::FederatedEval::every(1)
    });
    let mut host = Host::new(config, start);
    let sessions: Vec<u64> = ["A", "B", "C", "D"].iter().map(|c| host.join(c)).collect();
    let spec = host.starts().last().unwrap().1.secure.unwrap();
    assert_eq!(spec.quantizer.held_out_chars, 1_000);
    let deltas = sessions.iter().map(|&s| (s, [0.1; PARAMS])).collect();
    run_secure_round(&mut host, &deltas, &[]);
    let record = host.committed.last().unwrap();
    let federated = record
        .federated
        .expect("the round's sum carried the figures");
    assert_eq!(
        (
            record.round,
            federated.model_round,
            federated.chars,
            federated.devices
        ),
        (1, 0, 400, 4)
    );
    assert!((federated.loss - 2.0).abs() < 1e-3, "{federated:?}");
    assert!((federated.accuracy - 0.4).abs() < 1e-3, "{federated:?}");
    assert!(
        !host
            .sent
            .iter()
            .any(|(_, m)| matches!(m.as_ref(), ServerMessage::Evaluate(_))),
        "no device is asked for its figures on its own"
    );
}

/// A device that masks held-out figures no measurement gives (more right
/// guesses than characters) makes the round's sum implausible: it is refused
/// and the round commits without it, as for a delta past the bound.
#[test]
fn held_out_figures_no_device_could_measure_are_refused_with_the_round() {
    let start = Start {
        weights: vec![0.0; PARAMS],
        strategy: None,
        history: Vec::new(),
    };
    let mut config = secure_config(4, 4);
    config.rounds.federated_eval = Some(folio_engine::FederatedEval {
        max_chars: 1_000,
        ..folio_engine::FederatedEval::every(1)
    });
    let mut host = Host::new(config, start);
    let sessions: Vec<u64> = ["A", "B", "C", "D"].iter().map(|c| host.join(c)).collect();
    let deltas = sessions.iter().map(|&s| (s, [0.01; PARAMS])).collect();
    // Nothing but a right-guess count, a fifth of the headroom: no characters.
    let mut no_chars_all_right = vec![0u32; PARAMS + folio_secagg::quantize::EXTRAS];
    no_chars_all_right[PARAMS + 5] = 100_000_000;
    run_secure_round_with(
        &mut host,
        &deltas,
        &[],
        &[(sessions[3], no_chars_all_right)],
    );
    let record = host.committed.last().unwrap();
    assert_eq!(
        (record.round, record.clients),
        (1, 0),
        "committed without it"
    );
    assert_eq!(host.engine.weights().as_slice(), [0.0; PARAMS]);
    assert_eq!(
        host.engine.status(host.now).errors.get("bad_delta"),
        Some(&1)
    );
}

/// The server checks a secure sum only as a whole (its norm at most Σw·S), so
/// one client can move the round by far more than an honest one: measured
/// here, not prevented (that needs a per-client range proof). Four clients of
/// weight 1 and bound S: an honest client at the bound moves the mean by S/4;
/// one that scales its encoded delta k times moves it k·S/4, accepted while the
/// sum's norm stays within 4·S.
#[test]
fn one_client_can_move_a_secure_round_by_up_to_every_clients_share() {
    use rand_core::SeedableRng;
    let moved = |scale: f64| {
        let (mut host, sessions) = secure_host(4);
        let spec = host.starts().last().unwrap().1.secure.unwrap();
        let bound = f64::from(spec.quantizer.clip_bound);
        let deltas = sessions.iter().map(|&s| (s, [0.0; PARAMS])).collect();
        let mut at_bound = [0.0; PARAMS];
        at_bound[0] = spec.quantizer.clip_bound;
        let input = folio_secagg::Input {
            delta: &at_bound,
            weight: spec.weight(8),
            loss: 2.0,
            accuracy: 0.25,
            held_out: folio_secagg::HeldOut::default(),
        };
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        let mut values = spec.quantizer.encode(&input, &mut rng).unwrap();
        for v in &mut values[..PARAMS] {
            *v = (f64::from(*v as i32) * scale).round() as i32 as u32;
        }
        run_secure_round_with(&mut host, &deltas, &[], &[(sessions[3], values)]);
        let record = host.committed.last().unwrap().clone();
        let moved = folio_fed::robust::l2_norm(&host.engine.weights());
        (record.clients, moved / (bound / 4.0))
    };
    // As an honest client at the bound: its fair share.
    let (clients, honest) = moved(1.0);
    assert_eq!(clients, 4);
    assert!((honest - 1.0).abs() < 1e-3, "{honest}");
    // 3.9 times its share, accepted: the sum is within what four could send.
    let (clients, hostile) = moved(3.9);
    eprintln!("one client moved the mean {hostile:.3}× an honest client's most");
    assert_eq!(clients, 4, "accepted");
    assert!((hostile - 3.9).abs() < 1e-2, "{hostile}");
}
