//! A root and three edges in this process against a real `nats-server`
//! (JetStream on, file storage in a temp dir), with real native clients spread
//! over the edges, on loopback: the cluster computes what one server computes.
//! (Killing its parts: `crates/folio/tests/cluster.rs`, with real processes.)

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use burn::prelude::Device;
use folio_client::native::WsTransport;
use folio_client::{ClientError, ClientOptions, RoundReport, Transport};
use folio_cluster::nats_server::NatsServer;
use folio_cluster::store::Store;
use folio_cluster::{Edge, EdgeConfig, Root, RootConfig};
use folio_engine::{
    Action, CheckedJoin, CommitJob, DecodedUpdate, EngineConfig, Evaluation, Start,
};
use folio_fed::codec::CheckedDelta;
use folio_fed::{Clipping, StrategyConfig};
use folio_proto::{ClientMessage, decode_client};
use folio_server::{RoundConfig, ServerConfig};
use folio_testkit::{KING_LEAR, server_config};

fn rounds(quorum: usize, deadline: Duration) -> RoundConfig {
    RoundConfig {
        strategy: StrategyConfig {
            clipping: Clipping::Fixed { bound: 0.5 },
            quorum,
            ..StrategyConfig::fedavg(KING_LEAR.len())
        },
        max_batches: Some(2),
        eval_clients: 2,
        eval_batches: 1,
        deadline,
        ..RoundConfig::tutorial()
    }
}

async fn root(nats: &NatsServer, config: ServerConfig, name: &str) -> Root {
    Root::start(RootConfig {
        server: config,
        nats: nats.url(),
        name: name.into(),
    })
    .await
    .unwrap()
}

async fn edge(nats: &NatsServer, config: ServerConfig, name: &str) -> Edge {
    Edge::start(EdgeConfig {
        server: config,
        nats: nats.url(),
        name: name.into(),
        public_url: None,
    })
    .await
    .unwrap()
}

/// The updates one client sent: (round, frame).
type Sent = Arc<Mutex<Vec<folio_proto::Update>>>;

struct Recording {
    inner: WsTransport,
    sent: Sent,
}

impl Transport for Recording {
    async fn send(&mut self, frame: Vec<u8>) -> Result<(), ClientError> {
        if let Ok(ClientMessage::Update(update)) = decode_client(&frame) {
            self.sent.lock().unwrap().push(update);
        }
        self.inner.send(frame).await
    }

    async fn recv(&mut self) -> Result<Option<Vec<u8>>, ClientError> {
        self.inner.recv().await
    }
}

/// A native client as `client`, connecting to `urls` in turn (the next one
/// whenever a connection fails): it returns after `rounds` round results.
fn spawn_client(
    client: &str,
    urls: Vec<String>,
    rounds: u64,
    sent: Sent,
) -> tokio::task::JoinHandle<Vec<RoundReport>> {
    let mut options = ClientOptions::native();
    options.join.client = Some(client.to_owned());
    options.max_rounds = Some(rounds);
    tokio::spawn(async move {
        let next = Arc::new(Mutex::new(0usize));
        let connect = |resume: Option<String>| {
            let (urls, next, sent) = (urls.clone(), next.clone(), sent.clone());
            async move {
                let url = {
                    let mut next = next.lock().unwrap();
                    *next += 1;
                    urls[(*next - 1) % urls.len()].clone()
                };
                let inner = WsTransport::connect_resuming(&url, resume.as_deref()).await?;
                Ok(Recording { inner, sent })
            }
        };
        folio_client::run_reconnecting(
            connect,
            tokio::time::sleep,
            &Device::flex(),
            &options,
            |_| {},
            |_, _| {},
        )
        .await
        .unwrap()
    })
}

/// What one `folio serve` (its engine, whole) commits from `updates` (round by
/// round, every client's), starting from `weights`.
fn one_server(
    config: &ServerConfig,
    weights: Vec<f32>,
    updates: &BTreeMap<u64, Vec<(&str, folio_proto::Update)>>,
) -> Vec<f32> {
    let corpus = folio_data::Corpus::load(&config.data_dir.join("shakespeare")).unwrap();
    let engine_config = EngineConfig {
        max_rounds: config.max_rounds,
        ..folio_host::engine_config(
            config.preset,
            config.rounds.clone(),
            config.seed,
            folio_engine::Entropy::from_seed(config.seed),
        )
    };
    let segments = engine_config.segments.clone();
    let start = Start {
        weights,
        strategy: None,
        history: Vec::new(),
    };
    let mut engine: folio_engine::Engine =
        folio_host::build_engine(engine_config, folio_host::corpus_clients(&corpus), start)
            .unwrap();
    let now = Instant::now();
    let run = |engine: &mut folio_engine::Engine| {
        while let Some(action) = engine.poll_action() {
            match action {
                Action::Job(CommitJob::Aggregate(job)) => engine.aggregated(job.run(), now),
                Action::Job(CommitJob::Evaluate(job)) => {
                    let eval = Evaluation {
                        loss: 1.0,
                        accuracy: 0.5,
                    };
                    engine.evaluated(job.round, eval, None, now);
                }
                Action::Job(CommitJob::Persist(commit)) => {
                    engine.persisted(commit.record.round, now)
                }
                _ => {}
            }
        }
    };
    run(&mut engine);
    let mut sessions = BTreeMap::new();
    for client in KING_LEAR {
        let join = CheckedJoin {
            kind: "native",
            backend: "flex".into(),
            adapter: None,
            resume: None,
            client: Some(client.into()),
            held_model: None,
            group: sessions.len() as u64,
            resume_only: false,
        };
        sessions.insert(client, engine.join(join, now).unwrap().session);
    }
    run(&mut engine);
    for (round, sent) in updates {
        for (client, update) in sent {
            let delta =
                CheckedDelta::new(update.delta.clone(), &segments, update.encoding).unwrap();
            let decoded = DecodedUpdate {
                round: *round,
                examples: update.examples,
                delta,
                train_loss: update.train_loss,
                train_accuracy: update.train_accuracy,
                train_seconds: update.train_seconds,
            };
            engine.update(sessions[client], decoded, now).unwrap();
            run(&mut engine);
        }
        assert_eq!(engine.completed_rounds(), *round);
    }
    engine.weights().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_edges_commit_what_one_server_computes_from_the_same_updates() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(&dir.path().join("nats")).unwrap();
    let rounds_total = 2;
    let config = |name: &str| {
        server_config(
            &dir.path().join(name),
            rounds(4, Duration::from_secs(6)),
            rounds_total,
        )
    };
    let root = root(&nats, config("root"), "root-1").await;
    let mut edges = Vec::new();
    for name in ["edge-a", "edge-b", "edge-c"] {
        edges.push(edge(&nats, config(name), name).await);
    }
    let urls: Vec<String> = edges.iter().map(|e| e.url.clone()).collect();
    let mut clients = Vec::new();
    let mut logs = Vec::new();
    for (i, client) in KING_LEAR.iter().enumerate() {
        // Two clients an edge; each fails over to the next edge in turn.
        let mine: Vec<String> = (0..3).map(|k| urls[(i / 2 + k) % 3].clone()).collect();
        let sent = Sent::default();
        clients.push(spawn_client(client, mine, rounds_total, sent.clone()));
        logs.push(sent);
    }
    tokio::time::timeout(Duration::from_secs(120), root.wait_for_round(2))
        .await
        .expect("two rounds over three edges");

    // Rounds 1 and 2 are exactly one server's rounds on the same updates.
    let store = Store::connect(&nats.url()).await.unwrap();
    let history = store.history().await.unwrap();
    assert!(
        history.iter().take(3).map(|r| r.round).eq(0..3),
        "{history:?}"
    );
    assert!(history[1..3].iter().all(|r| r.clients == KING_LEAR.len()));
    let mut updates: BTreeMap<u64, Vec<(&str, folio_proto::Update)>> = BTreeMap::new();
    for (client, log) in KING_LEAR.iter().zip(&logs) {
        for update in log.lock().unwrap().iter().filter(|u| u.round <= 2) {
            updates
                .entry(update.round)
                .or_default()
                .push((client, update.clone()));
        }
    }
    let expected = one_server(&config("one"), store.weights(0).await.unwrap(), &updates);
    let committed = store.weights(2).await.unwrap();
    let worst = committed
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs() / (1.0 + b.abs()))
        .fold(0f32, f32::max);
    assert!(
        worst < 1e-5,
        "the cluster's round 2 differs from one server's by {worst}"
    );

    for client in clients {
        client.abort();
    }
    for edge in edges {
        edge.abort();
    }
    root.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_root_waits_as_a_standby_until_the_lease_lapses() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(&dir.path().join("nats")).unwrap();
    let config =
        |name: &str| server_config(&dir.path().join(name), rounds(1, Duration::from_secs(5)), 3);
    let first = root(&nats, config("first"), "first").await;
    first.wait_for_round(0).await;
    let standby = tokio::spawn({
        let (url, config) = (nats.url(), config("standby"));
        async move {
            Root::start(RootConfig {
                server: config,
                nats: url,
                name: "standby".into(),
            })
            .await
            .unwrap()
        }
    });
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(!standby.is_finished(), "two roots ran at once");
    // The first root dies (its lease is no longer renewed): the standby takes over.
    let died = Instant::now();
    first.abort();
    let second = tokio::time::timeout(Duration::from_secs(15), standby)
        .await
        .expect("the standby takes over")
        .unwrap();
    assert!(
        died.elapsed() >= Duration::from_secs(1),
        "it waited for the lease"
    );
    assert_eq!(
        second.completed_rounds(),
        0,
        "it resumed the committed history"
    );
    second.abort();
}

/// Commits that come quicker than an edge looks (or while NATS was away from
/// it) still reach its history, each one: the edge fills in the rounds between
/// the last it adopted and the one announced, from JetStream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_that_missed_commits_fills_its_history_from_jetstream() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(&dir.path().join("nats")).unwrap();
    let config = |name: &str| {
        server_config(
            &dir.path().join(name),
            rounds(1, Duration::from_secs(5)),
            100,
        )
    };
    let root = root(&nats, config("root"), "root").await;
    root.wait_for_round(0).await;
    let edge = edge(&nats, config("edge"), "edge").await;
    // Five commits at once, as a root writes them, faster than the edge's ticks.
    let store = Store::connect(&nats.url()).await.unwrap();
    let first = store.committed().await.unwrap()[0].clone();
    let (weights, snapshot) = (
        store.weights(0).await.unwrap(),
        store.snapshot(0).await.unwrap(),
    );
    for round in 1..=5 {
        let record = folio_engine::RoundRecord {
            round,
            ..first.clone()
        };
        store.commit(&record, &weights, &snapshot).await.unwrap();
    }
    edge.server.wait_for_round(5).await;
    let seen: Vec<u64> = edge.server.history().iter().map(|r| r.round).collect();
    assert_eq!(seen, (0..=5).collect::<Vec<_>>());
    edge.abort();
    root.abort();
}
