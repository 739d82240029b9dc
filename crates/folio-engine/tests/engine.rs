//! The round engine driven directly, with a clock the test moves: every rule the
//! TCP suites check end to end, deterministically and in microseconds.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use folio_engine::{
    Action, CheckedJoin, DecodedUpdate, Engine, EngineConfig, Evaluation, Role, RoundConfig,
    RoundOrder, RoundRecord, SessionRate, Start,
};
use folio_fed::codec::CheckedDelta;
use folio_fed::{Clipping, StrategyConfig, strategy};
use folio_proto::{ErrorCode, ModelShape, RoundStart, ServerMessage};

const PARAMS: usize = 4;
const DEADLINE: Duration = Duration::from_secs(60);
const TTL: Duration = Duration::from_secs(600);

/// Every client has 1,000 characters: at most 10 chunks of 101, 8 a batch, so
/// with the tutorial's 5 batches an epoch a client may claim 16 examples.
const TEXT: usize = 1_000;
const ALLOWED: u64 = 16;

struct Host {
    engine: Engine,
    now: Instant,
    /// Frames sent, in order: (recipients, message).
    sent: Vec<(Vec<u64>, Arc<ServerMessage>)>,
    committed: Vec<RoundRecord>,
    /// Jobs fail while set (a full disk, say).
    failing_jobs: bool,
    /// An edge's shares, a root's orders.
    parts: Vec<(folio_engine::PartReport, folio_fed::Partial)>,
    orders: Vec<RoundOrder>,
}

fn strategy_config(clients_per_round: usize, quorum: usize) -> StrategyConfig {
    StrategyConfig {
        min_clients: clients_per_round,
        quorum,
        clipping: Clipping::Off,
        ..StrategyConfig::fedavg(clients_per_round)
    }
}

fn config(strategy: StrategyConfig, max_rounds: Option<u64>) -> EngineConfig {
    EngineConfig {
        rounds: RoundConfig {
            strategy,
            deadline: DEADLINE,
            ..RoundConfig::tutorial()
        },
        preset: "test".into(),
        model: ModelShape {
            vocab: 1,
            embed: 1,
            hidden: 1,
        },
        segments: vec![PARAMS],
        seed: 5,
        max_sessions: 8,
        session_ttl: TTL,
        max_rounds,
        new_sessions: SessionRate {
            burst: 4,
            every: Duration::from_secs(10),
        },
        role: Role::Whole,
        check_devices: false,
    }
}

fn clients() -> Vec<(String, usize)> {
    ["A", "B", "C", "D", "E"]
        .iter()
        .map(|id| (id.to_string(), TEXT))
        .chain([("MUTE".to_string(), 1)])
        .collect()
}

fn join(client: &str) -> CheckedJoin {
    CheckedJoin {
        kind: "native",
        backend: "test".into(),
        adapter: None,
        resume: None,
        client: Some(client.into()),
        held_model: None,
        // Each client from a network of its own.
        group: u64::from(client.as_bytes()[0]),
        resume_only: false,
    }
}

fn update(round: u64, values: [f32; PARAMS], examples: u64) -> DecodedUpdate {
    DecodedUpdate {
        round,
        examples,
        delta: CheckedDelta::from_values(&values).unwrap(),
        train_loss: 2.0,
        train_accuracy: 0.25,
        train_seconds: 1.0,
    }
}

impl Host {
    fn new(config: EngineConfig, start: Start) -> Self {
        Self::of_population(config, start, 0)
    }

    /// A host whose strategy knows the population (DP-FedAvg's q depends on it).
    fn of_population(config: EngineConfig, start: Start, population: usize) -> Self {
        let context = strategy::StrategyContext {
            population,
            ..strategy::StrategyContext::seeded(config.seed)
        };
        let strategy = strategy::build(config.rounds.strategy, &context);
        let now = Instant::now();
        let mut host = Self {
            engine: Engine::new(config, strategy, clients(), start, now),
            now,
            sent: Vec::new(),
            committed: Vec::new(),
            parts: Vec::new(),
            orders: Vec::new(),
            failing_jobs: false,
        };
        host.run();
        host
    }

    fn fresh(strategy: StrategyConfig, max_rounds: Option<u64>) -> Self {
        Self::new(
            config(strategy, max_rounds),
            Start {
                weights: vec![0.0; PARAMS],
                strategy: None,
                history: Vec::new(),
            },
        )
    }

    /// Carries out every queued action, as a host does.
    fn run(&mut self) {
        while let Some(action) = self.engine.poll_action() {
            match action {
                Action::Send { to, message } => self.sent.push((to, message)),
                Action::Aggregate(job) => {
                    let result = job.run();
                    self.engine.aggregated(result, self.now);
                }
                Action::Evaluate { round, weights, .. } => {
                    if self.failing_jobs {
                        self.engine.job_failed(round, self.now);
                        return;
                    }
                    let loss = f64::from(weights.iter().sum::<f32>());
                    let eval = Evaluation {
                        loss,
                        accuracy: 0.5,
                    };
                    self.engine.evaluated(round, eval, None, self.now);
                }
                Action::Persist(commit) => self.engine.persisted(commit.record.round, self.now),
                Action::Committed(record) => self.committed.push(*record),
                Action::Part(job) => self.parts.push(job.run().unwrap()),
                Action::Order(order) => self.orders.push(order),
            }
        }
    }

    fn join(&mut self, client: &str) -> u64 {
        let joined = self.engine.join(join(client), self.now).unwrap();
        self.run();
        joined.session
    }

    fn update(&mut self, session: u64, round: u64, values: [f32; PARAMS]) -> Result<(), ErrorCode> {
        let result = self
            .engine
            .update(session, update(round, values, 8), self.now)
            .map_err(|e| e.code);
        self.run();
        result
    }

    fn leave(&mut self, session: u64) {
        self.engine.leave(session, self.now);
        self.run();
    }

    fn wait(&mut self, time: Duration) {
        self.now += time;
        if self
            .engine
            .poll_timeout()
            .is_some_and(|due| due <= self.now)
        {
            self.engine.handle_timeout(self.now);
        }
        self.run();
    }

    /// The round starts sent so far: (recipients, start).
    fn starts(&self) -> Vec<(Vec<u64>, RoundStart)> {
        self.sent
            .iter()
            .filter_map(|(to, message)| match message.as_ref() {
                ServerMessage::RoundStart(start) => Some((to.clone(), start.clone())),
                _ => None,
            })
            .collect()
    }

    /// The sessions selected in the open round.
    fn selected(&self) -> BTreeSet<u64> {
        let open = self.engine.status(self.now).open_round;
        open.map_or_else(BTreeSet::new, |o| o.selected_sessions.into_iter().collect())
    }

    fn errors_to(&self, session: u64) -> Vec<String> {
        self.sent
            .iter()
            .filter(|(to, _)| to.contains(&session))
            .filter_map(|(_, message)| match message.as_ref() {
                ServerMessage::Error(e) => Some(e.message.clone()),
                _ => None,
            })
            .collect()
    }
}

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
fn disconnected_sessions_expire_after_their_ttl_and_the_table_is_bounded() {
    let mut host = Host::fresh(strategy_config(5, 5), None);
    let a = host.engine.join(join("A"), host.now).unwrap();
    host.leave(a.session);
    assert_eq!(host.engine.poll_timeout(), Some(host.now + TTL));
    host.wait(TTL - Duration::from_secs(1));
    assert_eq!(host.engine.status(host.now).clients.len(), 1);
    host.wait(Duration::from_secs(2));
    assert!(host.engine.status(host.now).clients.is_empty(), "expired");
    let resume = CheckedJoin {
        resume: Some(a.token),
        client: None,
        ..join("A")
    };
    assert_ne!(
        host.engine.join(resume, host.now).unwrap().session,
        a.session
    );
    // A client with too little text to train on cannot join; a taken one neither.
    assert_eq!(
        host.engine.join(join("MUTE"), host.now).unwrap_err().code,
        ErrorCode::UnknownClient
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
    host.wait(Duration::ZERO);
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

#[test]
fn a_crowd_from_one_network_gets_its_share_of_a_round_not_the_round() {
    // Rounds of 2 start once 5 are connected: four from one network, E alone.
    let mut host = Host::fresh(
        StrategyConfig {
            min_clients: 5,
            ..strategy_config(2, 2)
        },
        Some(6),
    );
    let crowd: Vec<u64> = ["A", "B", "C", "D"]
        .iter()
        .map(|id| {
            let joined = host
                .engine
                .join(
                    CheckedJoin {
                        group: 1,
                        ..join(id)
                    },
                    host.now,
                )
                .unwrap();
            joined.session
        })
        .collect();
    let lone = host.join("E");
    for round in 1..=6 {
        let (picked, _) = host.starts().last().cloned().unwrap();
        assert_eq!(picked.len(), 2);
        assert!(picked.contains(&lone), "round {round}: {picked:?}");
        assert_eq!(picked.iter().filter(|s| crowd.contains(s)).count(), 1);
        for session in picked {
            host.update(session, round, [1.0; PARAMS]).unwrap();
        }
    }
    assert!(host.engine.is_finished());
}

#[test]
fn a_network_opens_a_burst_of_sessions_then_one_at_a_time_and_resumes_freely() {
    let mut host = Host::fresh(strategy_config(5, 5), None);
    let from = |id: &str| CheckedJoin {
        group: 9,
        ..join(id)
    };
    let first: Vec<_> = ["A", "B", "C", "D"]
        .iter()
        .map(|id| host.engine.join(from(id), host.now).unwrap())
        .collect();
    let refused = host.engine.join(from("E"), host.now).unwrap_err();
    assert_eq!(refused.code, ErrorCode::ServerFull);
    assert!(refused.message.contains("10 s"), "{}", refused.message);
    // Another network is not held back.
    assert!(host.engine.join(join("E"), host.now).is_ok());
    // Resuming is free.
    host.leave(first[0].session);
    let resume = CheckedJoin {
        resume: Some(first[0].token.clone()),
        client: None,
        ..from("A")
    };
    assert_eq!(
        host.engine.join(resume, host.now).unwrap().session,
        first[0].session
    );
    // One more after the interval (D's client, D having left), then none.
    host.leave(first[3].session);
    host.wait(Duration::from_secs(10));
    let late = CheckedJoin {
        client: None,
        ..from("A")
    };
    assert!(host.engine.join(late.clone(), host.now).is_ok());
    assert_eq!(
        host.engine.join(late, host.now).unwrap_err().code,
        ErrorCode::ServerFull
    );
}

/// A root and two edges, wired by hand as the cluster's hosts wire them over
/// NATS: ids across edges are `edge << 32 | session`.
struct Cluster {
    root: Host,
    edges: Vec<Host>,
    /// Each edge's sessions: (session, client).
    clients: Vec<Vec<(u64, String)>>,
}

fn values_for(client: &str, round: u64) -> [f32; PARAMS] {
    let c = f32::from(client.as_bytes()[0] - b'A');
    let r = round as f32;
    [
        0.1 * c + 0.01 * r,
        -0.2 * c,
        0.3 - 0.05 * r * c,
        1.0 / (1.0 + c),
    ]
}

impl Cluster {
    fn new(strategy: StrategyConfig, edges: &[&[&str]]) -> Self {
        let start = || Start {
            weights: vec![0.0; PARAMS],
            strategy: None,
            history: Vec::new(),
        };
        let with_role = |role| EngineConfig {
            role,
            ..config(strategy, Some(3))
        };
        let root = Host::new(with_role(Role::Root), start());
        let mut cluster = Self {
            edges: edges
                .iter()
                .map(|_| Host::new(with_role(Role::Edge), start()))
                .collect(),
            clients: vec![Vec::new(); edges.len()],
            root,
        };
        cluster.deliver_commits();
        for (e, clients) in edges.iter().enumerate() {
            for client in *clients {
                let session = cluster.edges[e].join(client);
                cluster.clients[e].push((session, client.to_string()));
            }
        }
        cluster
    }

    fn offer(&mut self) {
        let candidates = self
            .edges
            .iter()
            .enumerate()
            .flat_map(|(e, edge)| {
                edge.engine
                    .candidates()
                    .into_iter()
                    .map(move |c| folio_fed::Candidate {
                        client: (e as u64) << 32 | c.client,
                        ..c
                    })
            })
            .collect();
        self.root.engine.offer(candidates, self.root.now);
        self.root.run();
    }

    /// The root's orders, to every edge with its own sessions.
    fn deliver_orders(&mut self) {
        for order in std::mem::take(&mut self.root.orders) {
            for (e, edge) in self.edges.iter_mut().enumerate() {
                let mine = RoundOrder {
                    sessions: order
                        .sessions
                        .iter()
                        .filter(|&&s| s >> 32 == e as u64)
                        .map(|&s| s & 0xffff_ffff)
                        .collect(),
                    ..order.clone()
                };
                edge.engine.order(&mine, edge.now).unwrap();
                edge.run();
            }
        }
    }

    /// Every selected session of the live edges reports.
    fn train(&mut self, round: u64, live: &[usize]) {
        for &e in live {
            let selected: Vec<(u64, String)> = self.clients[e]
                .iter()
                .filter(|(s, _)| self.edges[e].engine.silent_until(*s).is_some())
                .cloned()
                .collect();
            for (session, client) in selected {
                self.edges[e]
                    .update(session, round, values_for(&client, round))
                    .unwrap();
            }
        }
    }

    fn deliver_parts(&mut self) {
        for (e, edge) in self.edges.iter_mut().enumerate() {
            for (mut report, part) in std::mem::take(&mut edge.parts) {
                for s in report.reported.iter_mut().chain(&mut report.dropped) {
                    *s |= (e as u64) << 32;
                }
                self.root.engine.part(report, part, self.root.now).unwrap();
                self.root.run();
            }
        }
    }

    fn deliver_commits(&mut self) {
        let weights = self.root.engine.weights().to_vec();
        for record in &self.root.committed {
            for edge in &mut self.edges {
                edge.engine.adopt(record.clone(), weights.clone(), edge.now);
                edge.run();
            }
        }
    }
}

#[test]
fn a_root_and_two_edges_commit_what_one_engine_commits() {
    let strategy = StrategyConfig {
        clipping: Clipping::Fixed { bound: 0.8 },
        ..strategy_config(4, 4)
    };
    let mut whole = Host::fresh(strategy, Some(3));
    let mut sessions = std::collections::BTreeMap::new();
    for client in ["A", "B", "C", "D"] {
        sessions.insert(whole.join(client), client);
    }
    for round in 1..=3 {
        for (&session, client) in &sessions {
            whole
                .update(session, round, values_for(client, round))
                .unwrap();
        }
    }
    let mut cluster = Cluster::new(strategy, &[&["A", "B"], &["C", "D"]]);
    for round in 1..=3 {
        cluster.offer();
        assert_eq!(cluster.root.orders.len(), 1, "round {round} ordered");
        cluster.deliver_orders();
        cluster.train(round, &[0, 1]);
        cluster.deliver_parts();
        assert_eq!(cluster.root.engine.completed_rounds(), round);
        cluster.deliver_commits();
        assert!(
            cluster
                .edges
                .iter()
                .all(|e| e.engine.completed_rounds() == round)
        );
    }
    let (one, split) = (whole.engine.weights(), cluster.root.engine.weights());
    for (a, b) in split.iter().zip(one.iter()) {
        assert!(
            (a - b).abs() <= 1e-6 * (1.0 + b.abs()),
            "{split:?} vs {one:?}"
        );
    }
    let clients = |h: &Host| h.committed.iter().map(|r| r.clients).collect::<Vec<_>>();
    assert_eq!(clients(&cluster.root), clients(&whole));
    // The edges serve the committed model.
    assert_eq!(
        cluster.edges[1].engine.fingerprint(),
        cluster.root.engine.fingerprint()
    );
}

#[test]
fn a_dead_edge_costs_the_root_its_clients_not_the_round() {
    let strategy = StrategyConfig {
        clipping: Clipping::Fixed { bound: 0.8 },
        ..strategy_config(4, 2)
    };
    let mut cluster = Cluster::new(strategy, &[&["A", "B"], &["C", "D"]]);
    cluster.offer();
    cluster.deliver_orders();
    // Edge 1 dies with its clients: it never sends its share.
    cluster.train(1, &[0]);
    cluster.edges[1].parts.clear();
    cluster.deliver_parts();
    assert_eq!(
        cluster.root.engine.completed_rounds(),
        0,
        "waits for edge 1"
    );
    cluster.root.now += DEADLINE;
    cluster.root.engine.handle_timeout(cluster.root.now);
    assert_eq!(
        cluster.root.engine.completed_rounds(),
        0,
        "grace for late shares"
    );
    cluster.root.now += folio_engine::PART_GRACE;
    cluster.root.engine.handle_timeout(cluster.root.now);
    cluster.root.run();
    assert_eq!(cluster.root.engine.completed_rounds(), 1);
    assert_eq!(cluster.root.committed.last().unwrap().clients, 2);
    // A share that comes after the round closed is refused, and counts nothing.
    let late = folio_engine::PartReport {
        round: 1,
        reported: vec![1 << 32 | 1],
        ..Default::default()
    };
    let part = folio_fed::Partial {
        sum: vec![1.0; PARAMS],
        total_weight: 1.0,
        updates: 1,
        norms: vec![1.0],
    };
    assert!(
        cluster
            .root
            .engine
            .part(late, part, cluster.root.now)
            .is_err()
    );

    // Round 2: edge 1 dies again, and the root learns it at once (its reports
    // stopped): the round closes on edge 0's share without waiting.
    cluster.deliver_commits();
    cluster.offer();
    cluster.deliver_orders();
    cluster.train(2, &[0]);
    cluster.edges[1].parts.clear();
    cluster.deliver_parts();
    assert_eq!(cluster.root.engine.completed_rounds(), 1);
    cluster.root.engine.lose(|s| s >> 32 == 1, cluster.root.now);
    cluster.root.run();
    assert_eq!(cluster.root.engine.completed_rounds(), 2);
    assert_eq!(cluster.root.committed.last().unwrap().clients, 2);
}

#[test]
fn a_share_counts_once_must_match_its_report_and_a_malformed_one_commits_nothing() {
    let strategy = StrategyConfig {
        clipping: Clipping::Fixed { bound: 0.8 },
        ..strategy_config(4, 4)
    };
    let mut cluster = Cluster::new(strategy, &[&["A", "B"], &["C", "D"]]);
    cluster.offer();
    cluster.deliver_orders();
    cluster.train(1, &[0, 1]);
    let global = |e: usize, mut report: folio_engine::PartReport| {
        for s in report.reported.iter_mut().chain(&mut report.dropped) {
            *s |= (e as u64) << 32;
        }
        report
    };
    let (report, part) = cluster.edges[0].parts.pop().unwrap();
    let report = global(0, report);
    let now = cluster.root.now;
    // A share whose sums disagree with the sessions it names is refused.
    let short = folio_fed::Partial {
        updates: 1,
        ..part.clone()
    };
    assert!(
        cluster
            .root
            .engine
            .part(report.clone(), short, now)
            .is_err()
    );
    // The share counts once: replayed, it names sessions no longer awaited.
    cluster
        .root
        .engine
        .part(report.clone(), part.clone(), now)
        .unwrap();
    assert!(cluster.root.engine.part(report, part, now).is_err());
    // Edge 1's share has a sum of the wrong length: the round is dropped (no
    // commit, no model change) and runs again.
    let (report, mut part) = cluster.edges[1].parts.pop().unwrap();
    part.sum.truncate(1);
    let before = cluster.root.engine.weights();
    cluster
        .root
        .engine
        .part(global(1, report), part, now)
        .unwrap();
    cluster.root.run();
    assert_eq!(cluster.root.engine.completed_rounds(), 0);
    assert_eq!(cluster.root.engine.weights(), before);
    cluster.offer();
    let retry = cluster
        .root
        .orders
        .pop()
        .expect("the round is ordered again");
    assert_eq!((retry.round, retry.attempt), (1, 1));
}

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
    let dp = StrategyConfig {
        kind: folio_fed::StrategyKind::DpFedAvg,
        clipping: Clipping::Fixed { bound: 1.0 },
        dp: folio_fed::DpConfig {
            noise_multiplier: 1.0,
            ..folio_fed::DpConfig::default()
        },
        ..strategy_config(3, 3)
    };
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
    let dp = StrategyConfig {
        kind: folio_fed::StrategyKind::DpFedAvg,
        clipping: Clipping::Fixed { bound: 0.8 },
        dp: folio_fed::DpConfig {
            noise_multiplier: 1.0,
            ..folio_fed::DpConfig::default()
        },
        ..strategy_config(4, 4)
    };
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
    let epsilons = |h: &Host| h.committed.iter().map(|r| r.epsilon).collect::<Vec<_>>();
    assert_eq!(epsilons(&cluster.root), epsilons(&whole));
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
    });
    config
}

/// The secure steps the engine sent `session` and not yet handled.
fn secure_steps(host: &Host, from: usize, session: u64) -> Vec<folio_secagg::ServerStep> {
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
fn run_secure_round(
    host: &mut Host,
    deltas: &std::collections::BTreeMap<u64, [f32; PARAMS]>,
    leave_after_shares: &[u64],
) {
    run_secure_round_with(host, deltas, leave_after_shares, &[]);
}

/// [`run_secure_round`], where the clients in `hostile` mask integers of their
/// own choosing (far out of the quantiser's range) instead of their update.
fn run_secure_round_with(
    host: &mut Host,
    deltas: &std::collections::BTreeMap<u64, [f32; PARAMS]>,
    leave_after_shares: &[u64],
    hostile: &[u64],
) {
    use folio_secagg::{ClientStep, SecureClient, ServerStep};
    let start = host.starts().last().unwrap().1.clone();
    let spec = start.secure.expect("a secure round");
    let mut clients = std::collections::BTreeMap::new();
    for (i, &session) in deltas.keys().enumerate() {
        let (client, keys) = SecureClient::new(spec, [i as u8 + 1; 32]);
        clients.insert(session, client);
        host.engine
            .secure(session, ClientStep::Keys(keys), host.now)
            .unwrap();
        host.run();
    }
    let mut handled = 0;
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
                    ServerStep::Shares(shares) => {
                        client.shares(shares).unwrap();
                        if leave_after_shares.contains(&session) {
                            host.engine.leave(session, host.now);
                            continue;
                        }
                        if hostile.contains(&session) {
                            let mut values = vec![500_000_000u32; PARAMS];
                            values.extend([0; folio_secagg::quantize::EXTRAS]);
                            ClientStep::Masked(client.mask_values(values).unwrap())
                        } else {
                            let input = folio_secagg::Input {
                                delta: &deltas[&session],
                                weight: spec.weight(8),
                                loss: 2.0,
                                accuracy: 0.25,
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

#[test]
fn a_cluster_runs_a_secure_round_per_edge_and_the_root_combines_their_sums() {
    let strategy = StrategyConfig {
        clipping: Clipping::Fixed { bound: 0.8 },
        ..strategy_config(4, 4)
    };
    // One server, plain: the reference.
    let mut whole = Host::fresh(strategy, Some(3));
    let mut sessions = std::collections::BTreeMap::new();
    for client in ["A", "B", "C", "D"] {
        sessions.insert(whole.join(client), client);
    }
    for (&session, client) in &sessions {
        whole.update(session, 1, values_for(client, 1)).unwrap();
    }
    // A root and two edges, each edge's clients in a secure round of their own.
    let mut cluster = Cluster::new(strategy, &[&["A", "B"], &["C", "D"]]);
    for edge in &mut cluster.edges {
        edge.engine = {
            let mut config = edge.engine.config().clone();
            config.rounds.secure = secure_config(2, 2).rounds.secure;
            let start = Start {
                weights: vec![0.0; PARAMS],
                strategy: None,
                history: cluster.root.committed.clone(),
            };
            let strategy = strategy::build(
                config.rounds.strategy,
                &strategy::StrategyContext::seeded(5),
            );
            Engine::new(config, strategy, clients(), start, edge.now)
        };
    }
    for (e, names) in [["A", "B"], ["C", "D"]].iter().enumerate() {
        cluster.clients[e] = names
            .iter()
            .map(|c| (cluster.edges[e].join(c), c.to_string()))
            .collect();
    }
    cluster.offer();
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
    cluster.deliver_parts();
    assert_eq!(cluster.root.engine.completed_rounds(), 1);
    let (one, split) = (whole.engine.weights(), cluster.root.engine.weights());
    for (a, b) in split.iter().zip(one.iter()) {
        assert!((a - b).abs() <= 1e-6, "{split:?} vs {one:?}");
    }
    assert_eq!(cluster.root.committed.last().unwrap().clients, 4);
}

#[test]
fn a_secure_dp_round_that_cannot_unmask_releases_noise_alone_and_is_never_drawn_again() {
    // DP-FedAvg over secure rounds, q = 1 (4 clients a round of a population of
    // 4). Round 1: only one client sends keys, below the threshold of 3; the
    // round must not be drawn again (that would change q): it closes with
    // nothing, releases noise alone and is charged. Round 2 runs in full.
    let mut config = secure_config(4, 4);
    config.rounds.strategy = StrategyConfig {
        kind: folio_fed::StrategyKind::DpFedAvg,
        dp: folio_fed::DpConfig {
            noise_multiplier: 1.0,
            ..folio_fed::DpConfig::default()
        },
        ..config.rounds.strategy
    };
    config.max_rounds = Some(2);
    let start = Start {
        weights: vec![0.0; PARAMS],
        strategy: None,
        history: Vec::new(),
    };
    let mut host = Host::of_population(config, start, 4);
    let sessions: Vec<u64> = ["A", "B", "C", "D"].iter().map(|c| host.join(c)).collect();
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

#[test]
fn a_secure_sum_no_clipped_inputs_could_make_is_refused_and_the_round_runs_again() {
    // D masks values far past the clip bound (it can: the server never sees
    // them alone). The unmasked sum's norm is over what the weights allow, so
    // the round commits nothing and runs again.
    let (mut host, sessions) = secure_host(4);
    let first = host.starts().last().unwrap().1.secure.unwrap();
    let deltas = sessions.iter().map(|&s| (s, [0.01; PARAMS])).collect();
    run_secure_round_with(&mut host, &deltas, &[], &[sessions[3]]);
    assert_eq!(host.committed.len(), 1, "nothing committed");
    assert_eq!(host.engine.weights().as_slice(), [0.0; PARAMS]);
    assert_eq!(
        host.engine.status(host.now).errors.get("bad_delta"),
        Some(&1)
    );
    let retry = host.starts().last().unwrap().1.clone();
    assert_eq!(retry.round, 1);
    assert_ne!(retry.secure.unwrap().id, first.id, "the round runs again");
}

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
        });
        rounds.asynchronous = Some(folio_engine::AsyncRounds {
            buffer: 2,
            max_staleness: 2,
        });
        let why = rounds.validate().unwrap_err();
        assert!(why.contains("asynchronous"), "{why}");
    }
}

impl Host {
    /// The probe last sent to `session`.
    fn probe_of(&self, session: u64) -> Option<u64> {
        self.sent
            .iter()
            .rev()
            .find_map(|(to, message)| match message.as_ref() {
                ServerMessage::Probe(probe) if to.contains(&session) => Some(probe.id),
                _ => None,
            })
    }
}

#[test]
fn with_device_checks_only_devices_whose_probe_checks_out_are_selected() {
    let mut config = config(strategy_config(2, 2), None);
    config.check_devices = true;
    let mut host = Host::new(
        config,
        Start {
            weights: vec![0.0; PARAMS],
            strategy: None,
            history: Vec::new(),
        },
    );
    let a = host.join("A");
    let b = host.engine.join(join("B"), host.now).unwrap();
    host.run();
    assert!(host.starts().is_empty(), "nobody is checked yet");
    let (probe_a, probe_b) = (host.probe_of(a).unwrap(), host.probe_of(b.session).unwrap());
    assert_ne!(probe_a, probe_b, "each probe is drawn afresh");
    assert!(host.engine.expected_probe(a, probe_b).is_err());
    assert!(host.engine.expected_probe(a, probe_a).is_ok());
    host.engine.device_checked(a, probe_a, Ok(()), host.now);
    host.engine.device_checked(
        b.session,
        probe_b,
        Err("its gradient is off".into()),
        host.now,
    );
    host.run();
    assert!(host.starts().is_empty(), "the wrong device is not selected");
    assert!(
        host.errors_to(b.session)
            .iter()
            .any(|e| e.contains("gradient is off"))
    );
    assert!(
        host.engine.expected_probe(a, probe_a).is_err(),
        "answered once"
    );
    // The failed device comes back on another backend: checked again, it passes.
    host.leave(b.session);
    let again = CheckedJoin {
        resume: Some(b.token),
        backend: "flex".into(),
        ..join("B")
    };
    host.engine.join(again, host.now).unwrap();
    host.run();
    let probe = host.probe_of(b.session).unwrap();
    assert_ne!(probe, probe_b);
    host.engine
        .device_checked(b.session, probe, Ok(()), host.now);
    host.run();
    assert_eq!(host.selected(), BTreeSet::from([a, b.session]));
    let status = host.engine.status(host.now);
    assert_eq!(status.errors.get("device_check_failed"), Some(&1));
}
