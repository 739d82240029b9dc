//! Devices that bring their own text: sessions named by the server, updates
//! weighed by the round's plan (the server cannot see a device's text), and
//! federated evaluation before a commit.

use folio_engine::{BuildError, FederatedEval};
use folio_fed::Selection;
use folio_proto::{Evaluate, Evaluation as Answer};

use super::*;

/// The tutorial's plan: 5 batches of 8, one epoch: 40 examples at most.
const PLAN_CAP: u64 = 40;

fn device_config(strategy: StrategyConfig, federated: Option<FederatedEval>) -> EngineConfig {
    let mut config = config(strategy, Some(3));
    config.data = DataSource::Device;
    config.max_sessions = 64;
    config.rounds.federated_eval = federated;
    config
}

fn device_join(group: u64) -> CheckedJoin {
    CheckedJoin {
        client: None,
        group,
        ..join("A")
    }
}

fn evaluation_every_round(devices: usize) -> FederatedEval {
    FederatedEval {
        devices,
        deadline: Duration::from_secs(30),
        max_chars: 1_000,
        ..FederatedEval::every(1)
    }
}

impl Host {
    fn join_device(&mut self, group: u64) -> u64 {
        let joined = self.engine.join(device_join(group), self.now).unwrap();
        self.run();
        joined.session
    }

    /// The evaluations asked for so far: (recipients, request).
    fn evaluations(&self) -> Vec<(Vec<u64>, Evaluate)> {
        self.sent
            .iter()
            .filter_map(|(to, message)| match message.as_ref() {
                ServerMessage::Evaluate(ask) => Some((to.clone(), ask.clone())),
                _ => None,
            })
            .collect()
    }

    fn answer(&mut self, session: u64, round: u64, chars: u64) -> Result<(), ErrorCode> {
        let answer = Answer {
            round,
            loss_sum: 2.0 * chars as f64,
            correct: chars / 4,
            chars,
        };
        let result = self
            .engine
            .evaluation(session, answer, self.now)
            .map_err(|e| e.code);
        self.run();
        result
    }
}

#[test]
fn devices_are_named_by_the_server_and_no_character_is_handed_out() {
    let mut host = Host::new(device_config(strategy_config(2, 2), None), fresh_start());
    let a = host.engine.join(device_join(1), host.now).unwrap();
    let b = host.engine.join(device_join(2), host.now).unwrap();
    assert_eq!(a.client_id, format!("device-{}", a.session));
    assert_ne!(a.client_id, b.client_id);
    let welcome = host.engine.welcome(&a, None);
    assert_eq!(welcome.data, DataSource::Device);
    assert_eq!((welcome.train_text, welcome.held_out_text), (None, None));
    assert!(host.engine.clients().is_empty(), "no characters to list");
    let asked = host.engine.join(join("A"), host.now).unwrap_err();
    assert_eq!(asked.code, ErrorCode::UnknownClient);
    assert!(
        asked.message.contains("their own text"),
        "{}",
        asked.message
    );
    // Not bounded by a corpus: as many devices as the session table holds.
    for group in 10..72 {
        host.engine.join(device_join(group), host.now).unwrap();
    }
    assert_eq!(host.engine.status(host.now).clients.len(), 64);
}

#[test]
fn an_update_weighs_at_most_what_the_round_plan_allows() {
    let mut host = Host::new(device_config(strategy_config(2, 2), None), fresh_start());
    let (a, b) = (host.join_device(1), host.join_device(2));
    let claim = |examples| DecodedUpdate {
        examples,
        ..update(1, [1.0; PARAMS], 0)
    };
    let refused = host
        .engine
        .update(a, claim(PLAN_CAP + 1), host.now)
        .unwrap_err();
    assert_eq!(refused.code, ErrorCode::BadExamples);
    host.engine.update(a, claim(PLAN_CAP), host.now).unwrap();
    host.engine.update(b, claim(1), host.now).unwrap();
    host.run();
    assert_eq!(host.committed.last().unwrap().examples, PLAN_CAP + 1);
}

#[test]
fn a_federation_of_devices_own_text_refuses_what_needs_the_text() {
    let build = |edit: fn(&mut EngineConfig)| {
        let mut config = device_config(strategy_config(2, 2), None);
        edit(&mut config);
        Engine::<Whole>::new(config, Vec::new(), fresh_start(), Instant::now()).err()
    };
    assert!(matches!(
        build(|c| c.rounds.max_batches = None),
        Some(BuildError::DeviceData(why)) if why.contains("--max-batches")
    ));
    assert!(matches!(
        build(|c| c.rounds.strategy.selection = Selection::BySize),
        Some(BuildError::DeviceData(why)) if why.contains("uniformly")
    ));
    assert!(matches!(
        build(|c| c.rounds.population_eval_every = Some(1)),
        Some(BuildError::DeviceData(why)) if why.contains("--federated-eval-every")
    ));
    assert!(build(|_| ()).is_none());
}

#[test]
fn a_round_commits_once_the_devices_asked_measured_its_model() {
    let mut host = Host::new(
        device_config(strategy_config(2, 2), Some(evaluation_every_round(3))),
        fresh_start(),
    );
    let devices: Vec<u64> = (1..=4).map(|group| host.join_device(group)).collect();
    let (picked, _) = host.starts().last().cloned().unwrap();
    for &session in &picked {
        host.update(session, 1, [1.0; PARAMS]).unwrap();
    }
    assert!(
        host.committed.len() == 1,
        "round 1 waits for its evaluation"
    );
    let evaluations = host.evaluations();
    let [(asked, ask)] = evaluations.as_slice() else {
        panic!("one evaluation asked for: {evaluations:?}")
    };
    let (asked, ask) = (asked.clone(), ask.clone());
    assert_eq!((ask.round, ask.max_chars, asked.len()), (1, 1_000, 3));
    assert!(ask.weights.is_some(), "nobody holds the candidate yet");
    assert_eq!(
        host.engine.status(host.now).phase,
        "evaluating on the devices"
    );
    let unasked = *devices.iter().find(|d| !asked.contains(d)).unwrap();
    assert_eq!(host.answer(unasked, 1, 10), Err(ErrorCode::BadEvaluation));
    assert_eq!(host.answer(asked[0], 2, 10), Err(ErrorCode::BadEvaluation));
    assert_eq!(
        host.answer(asked[0], 1, 1_001),
        Err(ErrorCode::BadEvaluation)
    );
    // The refused answer took that device out; the others answer; round 1 commits.
    host.answer(asked[1], 1, 300).unwrap();
    assert_eq!(host.answer(asked[1], 1, 300), Err(ErrorCode::BadEvaluation));
    host.answer(asked[2], 1, 100).unwrap();
    let record = host.committed.last().unwrap();
    let federated = record.federated.unwrap();
    assert_eq!(
        (record.round, federated.chars, federated.devices),
        (1, 400, 2)
    );
    assert!((federated.loss - 2.0).abs() < 1e-12);
    assert!((federated.accuracy - 100.0 / 400.0).abs() < 1e-12);
    // Round 2 goes to devices that were sent round 1's model without it.
    let (picked, start) = host.starts().last().cloned().unwrap();
    assert_eq!(start.round, 2);
    if picked.iter().all(|s| asked.contains(s)) {
        assert!(start.weights.is_none(), "the devices asked hold it");
    }
}

#[test]
fn an_evaluation_ends_at_its_deadline_and_does_not_wait_for_devices_that_left() {
    let mut host = Host::new(
        device_config(strategy_config(2, 2), Some(evaluation_every_round(3))),
        fresh_start(),
    );
    (1..=3).for_each(|group| {
        host.join_device(group);
    });
    let (picked, _) = host.starts().last().cloned().unwrap();
    for &session in &picked {
        host.update(session, 1, [1.0; PARAMS]).unwrap();
    }
    let (asked, _) = host.evaluations().pop().unwrap();
    host.leave(asked[0]);
    host.answer(asked[1], 1, 50).unwrap();
    assert_eq!(host.committed.len(), 1, "one device has not answered");
    host.wait(Duration::from_secs(31));
    let record = host.committed.last().unwrap();
    assert_eq!(record.round, 1);
    assert_eq!(record.federated.unwrap().devices, 1);

    // Round 2: no answer counts (two answer what no measurement gives: more
    // right than measured, a loss that is not a number); it commits at the
    // deadline without the figure.
    let (picked, _) = host.starts().last().cloned().unwrap();
    for &session in &picked {
        host.update(session, 2, [1.0; PARAMS]).unwrap();
    }
    let (asked, _) = host.evaluations().pop().unwrap();
    let impossible = [(11, 20.0), (5, f64::NAN)].map(|(correct, loss_sum)| Answer {
        round: 2,
        loss_sum,
        correct,
        chars: 10,
    });
    for (&session, answer) in asked.iter().zip(impossible) {
        let refused = host
            .engine
            .evaluation(session, answer, host.now)
            .unwrap_err();
        assert_eq!(refused.code, ErrorCode::BadEvaluation);
    }
    host.wait(Duration::from_secs(31));
    let record = host.committed.last().unwrap();
    assert_eq!((record.round, record.federated), (2, None));
}
