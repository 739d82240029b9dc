use super::*;

/// A root and two edges, wired by hand as the cluster's hosts wire them over
/// NATS: ids across edges are `edge << 32 | session`.
pub(super) struct Cluster {
    pub root: Host<Root>,
    pub edges: Vec<Host<Edge>>,
    /// Each edge's sessions: (session, client).
    pub clients: Vec<Vec<(u64, String)>>,
}

pub(super) fn values_for(client: &str, round: u64) -> [f32; PARAMS] {
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
    pub(super) fn new(strategy: StrategyConfig, edges: &[&[&str]]) -> Self {
        let root = Host::start(config(strategy, Some(3)), fresh_start());
        let mut cluster = Self {
            edges: edges
                .iter()
                .map(|_| Host::start(config(strategy, Some(3)), fresh_start()))
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

    pub(super) fn offer(&mut self) {
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
    pub(super) fn deliver_orders(&mut self) {
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
    pub(super) fn train(&mut self, round: u64, live: &[usize]) {
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

    pub(super) fn deliver_parts(&mut self) {
        for (e, edge) in self.edges.iter_mut().enumerate() {
            for (mut report, part) in std::mem::take(&mut edge.parts) {
                for s in report.reported.iter_mut().chain(&mut report.dropped) {
                    *s |= (e as u64) << 32;
                }
                self.root
                    .engine
                    .take_share(report, part, self.root.now)
                    .unwrap();
                self.root.run();
            }
        }
    }

    pub(super) fn deliver_commits(&mut self) {
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
    let clients = |c: &[RoundRecord]| c.iter().map(|r| r.clients).collect::<Vec<_>>();
    assert_eq!(clients(&cluster.root.committed), clients(&whole.committed));
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
    cluster.root.now += folio_engine::SHARE_GRACE;
    cluster.root.engine.handle_timeout(cluster.root.now);
    cluster.root.run();
    assert_eq!(cluster.root.engine.completed_rounds(), 1);
    assert_eq!(cluster.root.committed.last().unwrap().clients, 2);
    // A share that comes after the round closed is refused, and counts nothing.
    let late = folio_engine::ShareReport {
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
            .take_share(late, part, cluster.root.now)
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
    let global = |e: usize, mut report: folio_engine::ShareReport| {
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
            .take_share(report.clone(), short, now)
            .is_err()
    );
    // The share counts once: replayed, it names sessions no longer awaited.
    cluster
        .root
        .engine
        .take_share(report.clone(), part.clone(), now)
        .unwrap();
    assert!(cluster.root.engine.take_share(report, part, now).is_err());
    // Edge 1's share has a sum of the wrong length: the round is dropped (no
    // commit, no model change) and runs again.
    let (report, mut part) = cluster.edges[1].parts.pop().unwrap();
    part.sum.truncate(1);
    let before = cluster.root.engine.weights();
    cluster
        .root
        .engine
        .take_share(global(1, report), part, now)
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
fn a_cluster_refuses_asynchronous_rounds_where_its_engine_is_built() {
    let mut asynchronous = config(strategy_config(4, 1), None);
    asynchronous.rounds.asynchronous = Some(folio_engine::AsyncRounds {
        buffer: 2,
        max_staleness: 4,
    });
    let refused = |result: Result<(), folio_engine::BuildError>| result.unwrap_err();
    let now = Instant::now();
    let edge = Engine::<Edge>::new(asynchronous.clone(), clients(), fresh_start(), now);
    let root = Engine::<Root>::new(asynchronous.clone(), clients(), fresh_start(), now);
    assert_eq!(
        refused(edge.map(drop)),
        folio_engine::BuildError::AsynchronousCluster
    );
    assert_eq!(
        refused(root.map(drop)),
        folio_engine::BuildError::AsynchronousCluster
    );
    // One server runs them.
    assert!(Engine::<Whole>::new(asynchronous, clients(), fresh_start(), now).is_ok());
}
