use super::*;

fn async_host(concurrency: usize, buffer: usize, max_staleness: u64) -> Host {
    let mut config = config(strategy_config(concurrency, 1), None);
    config.rounds.asynchronous = Some(folio_engine::AsyncRounds {
        buffer,
        max_staleness,
    });
    config.rounds.validate().unwrap();
    Host::new(
        config,
        Start {
            weights: vec![0.0; PARAMS],
            strategy: None,
            history: Vec::new(),
        },
    )
}

impl Host {
    /// The sessions given a task for `round` so far, in order.
    fn tasked(&self, round: u64) -> Vec<u64> {
        self.starts()
            .into_iter()
            .filter(|(_, start)| start.round == round)
            .flat_map(|(to, _)| to)
            .collect()
    }

    fn training(&self) -> BTreeSet<u64> {
        let status = self.engine.status(self.now).asynchronous.unwrap();
        status.training.into_iter().map(|(s, _)| s).collect()
    }
}

#[test]
fn asynchronous_rounds_step_every_k_updates_and_discount_the_stale_ones() {
    let mut host = async_host(2, 2, 1);
    let [a, b, c] = ["A", "B", "C"].map(|id| host.join(id));
    let first = host.tasked(1);
    assert_eq!(first.len(), 2, "two train at once: {first:?}");
    let idle = [a, b, c].into_iter().find(|s| !first.contains(s)).unwrap();
    let (fast, slow) = (first[0], first[1]);
    // A task's examples are bounded by its plan, as a round's are.
    let greedy = host
        .engine
        .update(fast, update(1, [1.0; PARAMS], ALLOWED + 1), host.now)
        .unwrap_err();
    assert_eq!(greedy.code, ErrorCode::BadExamples);
    host.update(fast, 1, [1.0, 0.0, 0.0, 0.0]).unwrap();
    assert_eq!(host.committed.len(), 1, "the buffer holds one of two");
    // The fast one is done with this model; the idle one takes its place.
    assert_eq!(host.training(), BTreeSet::from([slow, idle]));
    assert_eq!(
        host.update(fast, 1, [1.0; PARAMS]),
        Err(ErrorCode::DuplicateUpdate)
    );
    host.update(idle, 1, [0.0, 1.0, 0.0, 0.0]).unwrap();
    assert_eq!(host.committed.len(), 2);
    assert_eq!(host.committed[1].staleness, Some(0.0));
    assert_eq!(host.engine.weights().as_slice(), [0.5, 0.5, 0.0, 0.0]);
    // The slow one trained round 1's model, now one step behind: it counts
    // 1/√2, the mean still over the buffer's examples.
    let tasked = host.tasked(2);
    assert_eq!(tasked.len(), 1, "one free slot: {tasked:?}");
    host.update(slow, 1, [0.0, 0.0, 4.0, 0.0]).unwrap();
    host.update(tasked[0], 2, [0.0, 0.0, 0.0, 2.0]).unwrap();
    assert_eq!(host.committed.len(), 3);
    assert_eq!(host.committed[2].staleness, Some(0.5));
    let weights = host.engine.weights();
    let expected = [0.5, 0.5, 2.0 / 2f32.sqrt(), 1.0];
    for (w, e) in weights.iter().zip(expected) {
        assert!((w - e).abs() < 1e-6, "{weights:?}");
    }
}

#[test]
fn an_update_staler_than_the_bound_is_refused_and_its_task_called_off() {
    let mut host = async_host(2, 1, 0);
    let _ = ["A", "B", "C"].map(|id| host.join(id));
    let first = host.tasked(1);
    let (fast, slow) = (first[0], first[1]);
    host.update(fast, 1, [1.0; PARAMS]).unwrap();
    assert_eq!(host.engine.completed_rounds(), 1);
    // The step left the slow one's model behind: told at once, it gets the
    // new model instead of finishing work that would be refused.
    assert!(
        host.errors_to(slow)
            .iter()
            .any(|e| e.contains("moved more than 0 steps")),
        "{:?}",
        host.errors_to(slow)
    );
    assert!(host.tasked(2).contains(&slow));
    assert_eq!(host.update(slow, 1, [1.0; PARAMS]), Err(ErrorCode::Stale));
    assert_eq!(host.engine.completed_rounds(), 1, "nothing was folded");
    host.update(slow, 2, [1.0; PARAMS]).unwrap();
    assert_eq!(host.engine.completed_rounds(), 2);
}

#[test]
fn asynchronous_tasks_lapse_at_their_deadline_and_leaving_frees_the_slot() {
    let mut host = async_host(2, 2, 4);
    let [a, b, c] = ["A", "B", "C"].map(|id| host.join(id));
    let first = host.tasked(1);
    let idle = [a, b, c].into_iter().find(|s| !first.contains(s)).unwrap();
    host.leave(first[0]);
    assert_eq!(host.training(), BTreeSet::from([first[1], idle]));
    host.wait(DEADLINE + Duration::from_secs(1));
    assert!(host.training().is_empty(), "both lapsed, none re-tasked");
    assert!(!host.errors_to(idle).is_empty());
    assert_eq!(
        host.update(idle, 1, [1.0; PARAMS]),
        Err(ErrorCode::NotSelected)
    );
    // The one that left comes back: it never reported for this model.
    let again = host.engine.join(join("A"), host.now);
    host.run();
    assert!(again.is_ok());
    assert_eq!(host.training().len(), 1);
    let status = host.engine.status(host.now);
    assert_eq!(status.phase, "training");
    assert_eq!(status.completed_rounds, 0);
}

#[test]
fn asynchronous_rounds_refuse_strategies_that_need_a_sampled_round() {
    for (kind, secure) in [
        (folio_fed::StrategyKind::Krum, false),
        (folio_fed::StrategyKind::DpFedAvg, false),
        (folio_fed::StrategyKind::FedAvg, true),
    ] {
        let mut rounds = config(strategy_config(3, 3), None).rounds;
        rounds.strategy.kind = kind;
        rounds.strategy.clipping = Clipping::Fixed { bound: 1.0 };
        rounds.secure = secure.then_some(folio_engine::SecureRounds {
            threshold: None,
            degree: 0,
            step_timeout: DEADLINE,
            min_cohort: 3,
        });
        rounds.asynchronous = Some(folio_engine::AsyncRounds {
            buffer: 2,
            max_staleness: 2,
        });
        let why = rounds.validate().unwrap_err();
        assert!(why.contains("asynchronous"), "{why}");
    }
}

/// Steps of the global model in `minutes` of asynchronous rounds, 3 slots and
/// a buffer of 2, with 6 honest devices (each answering its task after a
/// second) and `silent` devices that take tasks and never answer.
fn steps_beside_silent_devices(silent: usize, minutes: u64) -> usize {
    let mut config = config(strategy_config(3, 1), None);
    config.data = DataSource::Device;
    config.max_sessions = 64;
    config.rounds.asynchronous = Some(folio_engine::AsyncRounds {
        buffer: 2,
        max_staleness: 4,
    });
    let mut host = Host::new(config, fresh_start());
    let device = |group: u64| CheckedJoin {
        client: None,
        group,
        ..join("A")
    };
    // The silent ones come first: they are there when the first tasks go out.
    let silent: BTreeSet<u64> = (0..silent as u64)
        .map(|g| host.engine.join(device(100 + g), host.now).unwrap().session)
        .collect();
    for group in 0..6 {
        host.engine.join(device(group), host.now).unwrap();
    }
    host.run();
    let tick = Duration::from_millis(100);
    let end = host.now + Duration::from_secs(60 * minutes);
    let mut seen = 0;
    let mut answers: Vec<(Instant, u64, u64)> = Vec::new();
    while host.now < end {
        let starts = host.starts();
        for (to, start) in &starts[seen..] {
            for &session in to.iter().filter(|s| !silent.contains(s)) {
                answers.push((host.now + Duration::from_secs(1), session, start.round));
            }
        }
        seen = starts.len();
        let (due, later) = answers.into_iter().partition(|(at, ..)| *at <= host.now);
        answers = later;
        for (_, session, round) in due {
            let _ = host.update(session, round, [0.01; PARAMS]);
        }
        host.wait(tick);
    }
    host.committed.len()
}

#[test]
fn devices_that_take_tasks_and_never_answer_hold_no_slot_for_long() {
    let honest = steps_beside_silent_devices(0, 10);
    let three = steps_beside_silent_devices(3, 10);
    let twelve = steps_beside_silent_devices(12, 10);
    println!(
        "steps in 10 simulated minutes: honest {honest}, 3 silent {three}, 12 silent {twelve}"
    );
    assert!(honest > 500, "{honest}");
    assert!(three * 10 >= honest * 9, "3 silent: {three} of {honest}");
    assert!(twelve * 10 >= honest * 8, "12 silent: {twelve} of {honest}");
}
