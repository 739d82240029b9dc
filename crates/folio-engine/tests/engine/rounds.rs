use super::*;

#[test]
fn the_starting_model_is_committed_as_round_zero_before_any_round() {
    let host = Host::fresh(strategy_config(2, 2), None);
    assert_eq!(host.committed.len(), 1);
    assert_eq!(host.committed[0].round, 0);
    assert_eq!(host.engine.completed_rounds(), 0);
    assert!(host.starts().is_empty(), "no clients yet");
}

#[test]
fn a_round_starts_with_enough_clients_closes_on_every_update_and_is_committed_once() {
    let mut host = Host::fresh(strategy_config(2, 2), None);
    let a = host.join("A");
    assert!(host.starts().is_empty(), "one client is not enough");
    let b = host.join("B");
    let starts = host.starts();
    assert_eq!(starts.len(), 1, "one frame for both: {starts:?}");
    let start = &starts[0].1;
    assert_eq!((start.round, start.deadline_ms), (1, 60_000));
    assert!(start.weights.is_some());
    host.update(a, 1, [1.0, 0.0, 0.0, 0.0]).unwrap();
    assert_eq!(host.committed.len(), 1, "waits for b");
    host.update(b, 1, [0.0, 1.0, 0.0, 0.0]).unwrap();
    let records: Vec<u64> = host.committed.iter().map(|r| r.round).collect();
    assert_eq!(records, [0, 1]);
    let record = &host.committed[1];
    assert_eq!(record.clients, 2);
    assert_eq!(record.train_loss, Some(2.0));
    assert_eq!(host.engine.weights().as_slice(), [0.5, 0.5, 0.0, 0.0]);
    // Everyone hears the result, and round 2 starts at once without the model,
    // which both hold... no: the model changed, so with it.
    assert!(host.sent.iter().any(|(to, m)| matches!(m.as_ref(),
        ServerMessage::RoundResult(r) if r.round == 1 && to.len() == 2)));
    let round2 = host.starts().last().unwrap().1.clone();
    assert_eq!(round2.round, 2);
    assert!(round2.weights.is_some());
}

#[test]
fn updates_are_refused_unless_selected_once_for_the_open_round_within_the_bound() {
    let mut host = Host::fresh(strategy_config(2, 2), None);
    let a = host.join("A");
    let b = host.join("B");
    let c = host.join("C");
    let selected = host.selected();
    assert_eq!(selected, BTreeSet::from([a, b]), "two of three");
    assert_eq!(
        host.update(c, 1, [1.0; PARAMS]),
        Err(ErrorCode::NotSelected)
    );
    assert_eq!(host.update(a, 2, [1.0; PARAMS]), Err(ErrorCode::WrongRound));
    assert_eq!(
        host.update(a, 0, [1.0; PARAMS]),
        Err(ErrorCode::RoundClosed)
    );
    let greedy = host
        .engine
        .update(a, update(1, [1.0; PARAMS], ALLOWED + 1), host.now)
        .unwrap_err();
    assert_eq!(greedy.code, ErrorCode::BadExamples);
    let mut bad_metrics = update(1, [1.0; PARAMS], 1);
    bad_metrics.train_accuracy = 2.0;
    assert_eq!(
        host.engine
            .update(a, bad_metrics, host.now)
            .unwrap_err()
            .code,
        ErrorCode::BadDelta
    );
    let wrong_length = DecodedUpdate {
        delta: CheckedDelta::from_values(&[1.0]).unwrap(),
        ..update(1, [0.0; PARAMS], 1)
    };
    assert_eq!(
        host.engine
            .update(a, wrong_length, host.now)
            .unwrap_err()
            .code,
        ErrorCode::BadDelta
    );
    host.engine
        .update(a, update(1, [1.0; PARAMS], ALLOWED), host.now)
        .unwrap();
    assert_eq!(
        host.update(a, 1, [1.0; PARAMS]),
        Err(ErrorCode::DuplicateUpdate)
    );
    assert_eq!(host.committed.len(), 1, "refusals changed nothing");
}

#[test]
fn the_deadline_closes_a_round_with_a_quorum_and_abandons_one_without() {
    let mut host = Host::fresh(strategy_config(3, 2), None);
    let a = host.join("A");
    let b = host.join("B");
    let c = host.join("C");
    host.update(a, 1, [1.0; PARAMS]).unwrap();
    host.update(b, 1, [1.0; PARAMS]).unwrap();
    host.wait(DEADLINE - Duration::from_secs(1));
    assert_eq!(host.committed.len(), 1, "c may still report");
    host.wait(Duration::from_secs(2));
    assert_eq!(host.committed.last().unwrap().round, 1);
    assert_eq!(host.committed.last().unwrap().clients, 2);
    assert!(host.errors_to(c)[0].contains("closed on quorum"));

    // Round 2: only one reports by the deadline: abandoned, nothing changes.
    let weights = host.engine.weights();
    host.update(a, 2, [1.0; PARAMS]).unwrap();
    host.wait(DEADLINE + Duration::from_secs(1));
    assert_eq!(host.engine.completed_rounds(), 1);
    assert_eq!(host.engine.weights(), weights);
    let status = host.engine.status(host.now);
    let open = status.open_round.expect("retried at once");
    assert_eq!((open.round, open.attempt), (2, 1));
    assert!(
        host.errors_to(b)
            .iter()
            .any(|e| e.contains("without a quorum"))
    );
}

#[test]
fn a_round_that_cannot_reach_its_quorum_is_abandoned_when_clients_leave() {
    let mut host = Host::fresh(strategy_config(2, 2), None);
    let a = host.join("A");
    let b = host.join("B");
    host.update(a, 1, [1.0; PARAMS]).unwrap();
    host.leave(b);
    // No wait for the deadline: the quorum is out of reach now.
    assert_eq!(
        host.engine.status(host.now).open_round.map(|o| o.round),
        None
    );
    assert_eq!(host.engine.completed_rounds(), 0);
    // b comes back: round 1 runs again, a second attempt.
    let b2 = host.join("B");
    assert_ne!(b, b2, "a new session for B");
    let status = host.engine.status(host.now);
    assert_eq!(
        status.open_round.map(|o| (o.round, o.attempt)),
        Some((1, 1))
    );
}

#[test]
fn retries_draw_a_fresh_sample_that_avoids_the_clients_that_failed() {
    let mut host = Host::fresh(strategy_config(2, 2), None);
    let sessions: Vec<u64> = ["A", "B", "C", "D"].iter().map(|c| host.join(c)).collect();
    let first = host.selected();
    assert_eq!(first.len(), 2);
    host.wait(DEADLINE + Duration::from_secs(1));
    let second = host.selected();
    assert_eq!(second.len(), 2);
    assert!(
        first.is_disjoint(&second),
        "{first:?} failed; retry picked {second:?}"
    );
    assert!(second.iter().all(|s| sessions.contains(s)));
}

#[test]
fn a_client_that_rejoins_mid_round_gets_the_round_again_without_the_model_it_holds() {
    // A quorum of one: the round waits for a's return rather than failing.
    let mut host = Host::fresh(strategy_config(2, 1), None);
    let a = host.engine.join(join("A"), host.now).unwrap();
    let b = host.join("B");
    let model = host.starts()[0].1.model;
    // a's tab reloads mid-round: it resumes its session and gets round 1 again,
    // without the weights it kept.
    host.leave(a.session);
    host.wait(Duration::from_secs(5));
    let frames_before = host.sent.len();
    let rejoin = CheckedJoin {
        client: None,
        resume: Some(a.token.clone()),
        held_model: Some(model),
        ..join("A")
    };
    let joined = host.engine.join(rejoin, host.now).unwrap();
    host.run();
    assert_eq!(joined.session, a.session);
    let again = host.starts()[1..].to_vec();
    assert_eq!(again.len(), 1, "{:?}", &host.sent[frames_before..]);
    assert_eq!(again[0].0, vec![a.session]);
    assert_eq!(again[0].1.round, 1);
    assert!(again[0].1.weights.is_none(), "it holds the model");
    assert_eq!(again[0].1.deadline_ms, 55_000, "the time that is left");
    host.update(a.session, 1, [1.0; PARAMS]).unwrap();
    assert_eq!(host.engine.completed_rounds(), 0, "b is still training");
    host.update(b, 1, [1.0; PARAMS]).unwrap();
    assert_eq!(host.engine.completed_rounds(), 1);
    // A forged or reused token resumes nothing.
    let forged = CheckedJoin {
        resume: Some(format!("{}.{}", a.session, "0".repeat(32))),
        client: Some("C".into()),
        ..join("C")
    };
    assert_ne!(
        host.engine.join(forged, host.now).unwrap().session,
        a.session
    );
    let in_use = CheckedJoin {
        resume: Some(a.token),
        ..join("A")
    };
    assert_eq!(
        host.engine.join(in_use, host.now).unwrap_err().code,
        ErrorCode::SessionInUse
    );
}

#[test]
fn a_failed_job_runs_the_round_again_and_a_restart_resumes_from_the_commits() {
    let mut host = Host::fresh(strategy_config(2, 2), Some(2));
    let a = host.join("A");
    let b = host.join("B");
    host.failing_jobs = true;
    host.update(a, 1, [1.0; PARAMS]).unwrap();
    host.update(b, 1, [1.0; PARAMS]).unwrap();
    assert_eq!(host.engine.completed_rounds(), 0, "not committed");
    assert_eq!(host.engine.weights().as_slice(), [0.0; PARAMS]);
    host.failing_jobs = false;
    // The engine rests after a failed job before it draws the round again.
    host.wait(RETRY_AFTER / 2);
    assert!(host.engine.status(host.now).open_round.is_none(), "resting");
    assert_eq!(
        host.engine.status(host.now).phase,
        "waiting to retry a failed job"
    );
    host.wait(RETRY_AFTER / 2);
    let status = host.engine.status(host.now);
    assert_eq!(
        status.open_round.map(|o| (o.round, o.attempt)),
        Some((1, 1))
    );
    for round in 1..=2 {
        host.update(a, round, [1.0; PARAMS]).unwrap();
        host.update(b, round, [3.0; PARAMS]).unwrap();
    }
    assert!(host.engine.is_finished());
    assert_eq!(host.engine.weights().as_slice(), [4.0; PARAMS]);
    let records: Vec<u64> = host.committed.iter().map(|r| r.round).collect();
    assert_eq!(records, [0, 1, 2], "each round committed once");

    // A restart on what was persisted carries on at round 3.
    let history = host.committed.clone();
    let mut resumed = Host::new(
        config(strategy_config(2, 2), Some(3)),
        Start {
            weights: host.engine.weights().to_vec(),
            strategy: None,
            history,
        },
    );
    assert!(resumed.committed.is_empty(), "nothing evaluated again");
    let a = resumed.join("A");
    let b = resumed.join("B");
    assert_eq!(resumed.starts()[0].1.round, 3);
    resumed.update(a, 3, [1.0; PARAMS]).unwrap();
    resumed.update(b, 3, [1.0; PARAMS]).unwrap();
    assert_eq!(resumed.committed[0].round, 3);
    assert_eq!(resumed.engine.history(2, 10).len(), 2);
    assert_eq!(resumed.engine.history(0, 2).len(), 2);
}

#[test]
fn a_bad_aggregate_is_dropped_and_the_retry_avoids_its_reporters() {
    let mut host = Host::fresh(strategy_config(2, 2), None);
    let sessions: Vec<u64> = ["A", "B", "C", "D"].iter().map(|c| host.join(c)).collect();
    let first = host.selected();
    // f32::MAX twice overflows the mean: no non-finite model is ever made.
    for &s in &first {
        host.update(s, 1, [f32::MAX; PARAMS]).unwrap();
    }
    assert_eq!(host.engine.completed_rounds(), 0);
    let retry = host.selected();
    assert!(first.is_disjoint(&retry), "{first:?} then {retry:?}");
    assert!(retry.iter().all(|s| sessions.contains(s)));
    assert_eq!(
        host.engine.status(host.now).errors.get("bad_delta"),
        Some(&1)
    );
}

#[test]
fn the_status_does_not_grow_with_the_rounds() {
    let mut host = Host::fresh(strategy_config(2, 2), None);
    let a = host.join("A");
    let b = host.join("B");
    let size = |host: &Host| {
        serde_json::to_vec(&host.engine.status(host.now))
            .unwrap()
            .len()
    };
    host.update(a, 1, [1.0; PARAMS]).unwrap();
    host.update(b, 1, [1.0; PARAMS]).unwrap();
    let early = size(&host);
    for round in 2..=200 {
        host.update(a, round, [0.5; PARAMS]).unwrap();
        host.update(b, round, [0.5; PARAMS]).unwrap();
    }
    assert_eq!(host.engine.completed_rounds(), 200);
    let late = size(&host);
    // Session lists keep their last 32 rounds; numbers grow a digit or two.
    assert!(late < early + 400, "{early} → {late} bytes");
    assert_eq!(host.engine.history(150, 1000).len(), 51);
}
