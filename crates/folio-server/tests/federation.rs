//! The real aggregator on loopback with real native clients (small preset).

mod common;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use burn::prelude::Device;
use common::*;
use folio_client::native::WsTransport;
use folio_client::{ClientError, ClientOptions, Transport};
use folio_fed::{Clipping, Encoding, ServerOptimizerConfig, StrategyConfig, codec};
use folio_model::{Preset, checkpoint};
use folio_proto::{ClientMessage, ErrorCode, ServerMessage, Update, decode_client, decode_server};
use folio_server::{RoundConfig, Server};
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

const KENT: &str = "THE_TRAGEDY_OF_KING_LEAR_KENT";

/// FedAvg without the server's clipping: these tests check its exact arithmetic
/// (the adversarial suite checks the defences).
fn rounds(clients: usize) -> RoundConfig {
    RoundConfig {
        strategy: StrategyConfig {
            clipping: Clipping::Off,
            ..StrategyConfig::fedavg(clients)
        },
        max_batches: Some(2),
        eval_clients: 2,
        eval_batches: 1,
        ..RoundConfig::tutorial()
    }
}

/// Every frame a client sent and received, for checking the server's math.
#[derive(Default)]
struct Log {
    sent: Vec<ClientMessage>,
    received: Vec<ServerMessage>,
}

struct Recording {
    inner: WsTransport,
    log: Arc<Mutex<Log>>,
    /// Drop the connection on the first round start (a client killed mid-round).
    die_on_round: bool,
}

impl Transport for Recording {
    async fn send(&mut self, frame: Vec<u8>) -> Result<(), ClientError> {
        self.log
            .lock()
            .unwrap()
            .sent
            .push(decode_client(&frame).unwrap());
        self.inner.send(frame).await
    }

    async fn recv(&mut self) -> Result<Option<Vec<u8>>, ClientError> {
        let frame = self.inner.recv().await?;
        if let Some(frame) = &frame {
            let message = decode_server(frame).unwrap();
            let dies = self.die_on_round && matches!(message, ServerMessage::RoundStart(_));
            self.log.lock().unwrap().received.push(message);
            if dies {
                return Err(ClientError::Closed);
            }
        }
        Ok(frame)
    }
}

/// A native client in its own thread (training is CPU work), as `folio client` runs.
fn spawn_client(url: String, die_on_round: bool) -> (Arc<Mutex<Log>>, std::thread::JoinHandle<()>) {
    spawn_client_with(url, die_on_round, ClientOptions::native())
}

fn spawn_client_with(
    url: String,
    die_on_round: bool,
    options: ClientOptions,
) -> (Arc<Mutex<Log>>, std::thread::JoinHandle<()>) {
    let log = Arc::new(Mutex::new(Log::default()));
    let handle = {
        let log = log.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let inner = WsTransport::connect(&url).await.unwrap();
                let mut transport = Recording {
                    inner,
                    log,
                    die_on_round,
                };
                let _ = folio_client::run(&mut transport, &Device::flex(), &options, |_| {}).await;
            });
        })
    };
    (log, handle)
}

fn round_start_weights(log: &Log, round: u64) -> Option<Vec<f32>> {
    log.received.iter().find_map(|m| match m {
        ServerMessage::RoundStart(start) if start.round == round => {
            let n = segments().iter().sum();
            let weights = start
                .weights
                .as_ref()
                .expect("the model came with the round");
            Some(codec::decode(weights, &[n], start.weights_encoding).unwrap())
        }
        _ => None,
    })
}

fn updates(log: &Log, round: u64) -> Vec<Update> {
    log.sent
        .iter()
        .filter_map(|m| match m {
            ClientMessage::Update(update) if update.round == round => Some(update.clone()),
            _ => None,
        })
        .collect()
}

/// The example-weighted mean of the deltas the clients sent for `round`.
fn mean_delta<L: std::ops::Deref<Target = Log>>(logs: &[L], round: u64) -> Vec<f64> {
    let mut sum: Vec<f64> = Vec::new();
    let mut examples = 0u64;
    for log in logs {
        let [update] = updates(log, round).try_into().unwrap();
        let delta = codec::decode(&update.delta, &segments(), update.encoding).unwrap();
        sum.resize(delta.len(), 0.0);
        for (s, d) in sum.iter_mut().zip(&delta) {
            *s += update.examples as f64 * f64::from(*d);
        }
        examples += update.examples;
    }
    sum.iter().map(|s| s / examples as f64).collect()
}

fn assert_close(actual: &[f32], expected: &[f32], tolerance: f32) {
    assert_eq!(actual.len(), expected.len());
    let worst = actual
        .iter()
        .zip(expected)
        .map(|(a, e)| (a - e).abs())
        .fold(0f32, f32::max);
    assert!(worst <= tolerance, "weights differ by {worst}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_goes_down_as_f16_and_deltas_apply_to_the_f32_model() {
    let dir = tempfile::tempdir().unwrap();
    let mut round_config = rounds(2);
    round_config.model_encoding = Encoding::F16;
    let server = Server::start(checked(config(dir.path(), round_config, 1)))
        .await
        .unwrap();
    let global = server.weights();
    let clients: Vec<_> = (0..2).map(|_| spawn_client(url(&server), false)).collect();
    within(server.wait_for_round(1)).await;

    let logs: Vec<_> = clients.iter().map(|(log, _)| log.lock().unwrap()).collect();
    let start = logs[0]
        .received
        .iter()
        .find_map(|m| match m {
            ServerMessage::RoundStart(start) => Some(start.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(start.weights_encoding, Encoding::F16);
    assert_eq!(
        start.weights.as_ref().map(Vec::len).unwrap_or(0),
        2 * global.len(),
        "half the bytes of f32"
    );
    // The clients trained from the f16 values, within f16's rounding of the model.
    let received = round_start_weights(&logs[0], 1).unwrap();
    assert_close(&received, &global, 1e-3);
    assert_ne!(received, global);
    // Their deltas, against what they received, move the server's f32 model.
    let expected: Vec<f32> = global
        .iter()
        .zip(mean_delta(&logs, 1))
        .map(|(w, d)| w + d as f32)
        .collect();
    assert_close(&server.weights(), &expected, 1e-6);
}

/// A tab reloaded mid-round: its connection ends before it reports, it rejoins
/// its session offering the model it kept, and gets the round again for the time
/// left, without the model; rejoining without it brings the model again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_rejoins_mid_round_gets_the_round_without_the_model_it_holds() {
    let dir = tempfile::tempdir().unwrap();
    // Two clients, quorum 1: the round stays open while one is away.
    let mut config = RoundConfig {
        deadline: Duration::from_secs(60),
        ..rounds(2)
    };
    config.strategy.quorum = 1;
    let server = Server::start(common::config(dir.path(), config, 2))
        .await
        .unwrap();
    let connect = || async {
        tokio_tungstenite::connect_async(url(&server))
            .await
            .unwrap()
            .0
    };
    let round_start = |message| match message {
        ServerMessage::RoundStart(start) => start,
        other => panic!("expected the round, got {other:?}"),
    };
    let mut socket = connect().await;
    socket.send(binary(&join(Some(KENT)))).await.unwrap();
    let ServerMessage::Welcome(welcome) = next_message(&mut socket).await else {
        panic!("no welcome")
    };
    let mut other = connect().await;
    other.send(binary(&join(None))).await.unwrap();
    let first = round_start(next_message(&mut socket).await);
    let weights = first
        .weights
        .clone()
        .expect("the model comes with the round");
    assert_eq!(
        first.model,
        folio_proto::model_fingerprint(first.weights_encoding, &weights)
    );
    let bytes_down = || {
        let status = server.status();
        let clients = status["clients"].as_array().unwrap().clone();
        let kent = clients.iter().find(|c| c["client_id"] == KENT).unwrap();
        kent["bytes_down"].as_u64().unwrap()
    };
    // The server counts a frame's bytes once it is sent, which may be after this
    // client has read it.
    eventually("the model's bytes are counted", || {
        bytes_down() >= weights.len() as u64
    })
    .await;
    let down_before = bytes_down();

    let rejoin = |held_model: Option<u64>| {
        let ClientMessage::Join(mut join) = join(None) else {
            unreachable!()
        };
        join.resume = Some(welcome.session.clone());
        join.held_model = held_model;
        binary(&ClientMessage::Join(join))
    };
    for held in [Some(first.model), None] {
        drop(socket);
        // The server sees the connection end.
        eventually("the server sees the socket end", || {
            server.status()["connected"] == 1
        })
        .await;
        socket = connect().await;
        socket.send(rejoin(held)).await.unwrap();
        let ServerMessage::Welcome(again) = next_message(&mut socket).await else {
            panic!("no welcome on rejoining")
        };
        assert_eq!(again.client_id, welcome.client_id);
        let resent = round_start(next_message(&mut socket).await);
        assert_eq!((resent.round, resent.model), (1, first.model));
        assert!(resent.deadline_ms < first.deadline_ms, "only the time left");
        if held.is_some() {
            assert_eq!(resent.weights, None, "the model it holds is not sent again");
            let down = bytes_down();
            // The welcome (with the client's lines) and the round, not the model.
            assert!(
                down - down_before < weights.len() as u64 / 10,
                "{} bytes down on rejoining with a model of {} bytes",
                down - down_before,
                weights.len()
            );
        } else {
            assert_eq!(resent.weights, Some(weights.clone()));
        }
    }
    // Both report in the round, which closes.
    let n = segments().iter().sum();
    let encoding = first.delta_encoding;
    let delta = codec::encode(&vec![0.001; n], &segments(), encoding);
    let update = binary(&ClientMessage::Update(Update {
        round: 1,
        examples: 8,
        encoding,
        delta,
        train_loss: 1.0,
        train_accuracy: 0.5,
        train_seconds: 1.0,
    }));
    socket.send(update.clone()).await.unwrap();
    other.send(update).await.unwrap();
    let next = within(async {
        loop {
            if let ServerMessage::RoundStart(start) = next_message(&mut socket).await {
                break start;
            }
        }
    })
    .await;
    assert_eq!(next.round, 2);
    assert!(
        next.weights.is_some(),
        "a new model comes with the next round"
    );
    assert_ne!(next.model, first.model);
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_clients_three_rounds_of_example_weighted_fedavg() {
    let dir = tempfile::tempdir().unwrap();
    let mut round_config = rounds(3);
    round_config.delta_encoding = Encoding::Int8;
    let server = Server::start(checked(config(dir.path(), round_config, 3)))
        .await
        .unwrap();
    let clients: Vec<_> = (0..3).map(|_| spawn_client(url(&server), false)).collect();
    within(server.wait_for_round(3)).await;

    let logs: Vec<_> = clients.iter().map(|(log, _)| log.lock().unwrap()).collect();
    for round in 1..=3u64 {
        let old = round_start_weights(&logs[0], round).unwrap();
        let expected: Vec<f32> = old
            .iter()
            .zip(mean_delta(&logs, round))
            .map(|(w, d)| w + d as f32)
            .collect();
        let actual = round_start_weights(&logs[0], round + 1).unwrap_or_else(|| server.weights());
        assert_close(&actual, &expected, 1e-6);
        assert_ne!(actual, old, "round {round} changed nothing");
    }
    let history = server.history();
    assert_eq!(
        history
            .iter()
            .map(|r| (r.round, r.clients))
            .collect::<Vec<_>>(),
        [(0, 0), (1, 3), (2, 3), (3, 3)]
    );
    // The history over HTTP, a page at a time: what a page polling for new rounds asks.
    let page = |query: &'static str| {
        let server = &server;
        async move {
            let response = http_get(server, &format!("/api/history{query}")).await;
            let body = &response[response.find("\r\n\r\n").unwrap() + 4..];
            serde_json::from_str::<Vec<serde_json::Value>>(body)
                .unwrap()
                .iter()
                .map(|r| r["round"].as_u64().unwrap())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(page("").await, [0, 1, 2, 3]);
    assert_eq!(page("?from=2").await, [2, 3]);
    assert_eq!(page("?from=1&limit=1").await, [1]);
    assert_eq!(page("?from=9&limit=100000").await, Vec::<u64>::new());
    let status = server.status();
    assert_eq!(status["connected"], 3);
    assert!(
        status["clients"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["bytes_up"].as_u64().unwrap() > 0)
    );
    drop(logs);
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_killed_mid_round_leaves_the_round_to_the_quorum() {
    let dir = tempfile::tempdir().unwrap();
    let mut round_config = RoundConfig {
        // Far away: the round must close because the dead client left, not on time.
        deadline: Duration::from_secs(3600),
        ..rounds(3)
    };
    round_config.strategy.quorum = 2;
    let server = Server::start(checked(config(dir.path(), round_config, 2)))
        .await
        .unwrap();
    // All three are in round 1 (it needs three); one dies on receiving the weights.
    let (_, doomed) = spawn_client(url(&server), true);
    let _healthy: Vec<_> = (0..2).map(|_| spawn_client(url(&server), false)).collect();
    tokio::time::timeout(Duration::from_secs(300), server.wait_for_round(1))
        .await
        .expect("round 1 stalled");
    doomed.join().unwrap();
    assert_eq!(
        server.history()[1].clients,
        2,
        "round 1 closes with the two that reported"
    );
    // A replacement (a reloaded tab) joins, and the next round runs.
    let _replacement = spawn_client(url(&server), false);
    tokio::time::timeout(Duration::from_secs(300), server.wait_for_round(2))
        .await
        .expect("round 2 stalled");
    assert_eq!(server.history()[2].clients, 3);
    let status = server.status();
    let clients = status["clients"].as_array().unwrap();
    assert_eq!(clients.len(), 4);
    assert_eq!(
        clients.iter().filter(|c| c["connected"] == false).count(),
        1
    );
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_resumes_from_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let momentum = ServerOptimizerConfig::FedAvgM {
        lr: 1.0,
        momentum: 0.9,
    };
    let mut round_config = rounds(2);
    round_config.strategy.server_optimizer = momentum;
    let first = Server::start(checked(config(dir.path(), round_config.clone(), 2)))
        .await
        .unwrap();
    let _clients: Vec<_> = (0..2).map(|_| spawn_client(url(&first), false)).collect();
    within(first.wait_for_round(2)).await;
    let after_two = first.weights();
    first.abort();

    let saved = folio_host::state::load(dir.path(), after_two.len())
        .unwrap()
        .unwrap();
    assert_eq!(saved.completed_rounds(), 2);
    assert_eq!(saved.weights, after_two);
    let second = Server::start(checked(config(dir.path(), round_config, 3)))
        .await
        .unwrap();
    let clients: Vec<_> = (0..2).map(|_| spawn_client(url(&second), false)).collect();
    within(second.wait_for_round(3)).await;
    assert_eq!(
        second.history().iter().map(|r| r.round).collect::<Vec<_>>(),
        [0, 1, 2, 3]
    );

    // Round 3 started from the round-2 weights and applied FedAvgM with the saved momentum.
    let logs: Vec<_> = clients.iter().map(|(log, _)| log.lock().unwrap()).collect();
    assert_eq!(round_start_weights(&logs[0], 3).unwrap(), after_two);
    let expected: Vec<f32> = after_two
        .iter()
        .zip(&saved.strategy.tensors["server_m"])
        .zip(mean_delta(&logs, 3))
        .map(|((w, m), d)| w + (0.9 * m + d as f32))
        .collect();
    assert_close(&second.weights(), &expected, 1e-5);
    drop(logs);
    second.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_counted_and_harmless() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(config(dir.path(), rounds(1), 1))
        .await
        .unwrap();
    let (mut socket, _) = tokio_tungstenite::connect_async(url(&server))
        .await
        .unwrap();
    let initial = server.weights();

    // Before joining.
    expect_error(
        &mut socket,
        Message::Binary(vec![folio_proto::PROTOCOL_VERSION as u8, 0, 0xff, 0xff].into()),
        ErrorCode::MalformedFrame,
    )
    .await;
    let unknown = [folio_proto::PROTOCOL_VERSION as u8, 9];
    expect_error(
        &mut socket,
        Message::Binary(unknown.to_vec().into()),
        ErrorCode::UnknownMessage,
    )
    .await;
    let mut old_version = folio_proto::encode(&ClientMessage::Heartbeat);
    old_version[0] = 0;
    expect_error(
        &mut socket,
        Message::Binary(old_version.into()),
        ErrorCode::ProtocolVersion,
    )
    .await;
    expect_error(
        &mut socket,
        Message::Text("hello".into()),
        ErrorCode::TextFrame,
    )
    .await;
    expect_error(
        &mut socket,
        binary(&ClientMessage::Heartbeat),
        ErrorCode::NotJoined,
    )
    .await;

    // Join; with one client connected the first round starts for it.
    let join = join(Some("THE_TRAGEDY_OF_KING_LEAR_KENT"));
    socket.send(binary(&join)).await.unwrap();
    let ServerMessage::Welcome(welcome) = next_message(&mut socket).await else {
        panic!("no welcome")
    };
    assert_eq!(welcome.client_id, "THE_TRAGEDY_OF_KING_LEAR_KENT");
    let ServerMessage::RoundStart(start) = next_message(&mut socket).await else {
        panic!("no round start")
    };
    expect_error(&mut socket, binary(&join), ErrorCode::AlreadyJoined).await;

    let n = initial.len();
    let update = |delta: &[f32], round: u64| {
        ClientMessage::Update(Update {
            round,
            examples: 8,
            encoding: Encoding::F32,
            delta: codec::encode(delta, &[delta.len()], Encoding::F32),
            train_loss: 1.0,
            train_accuracy: 0.5,
            train_seconds: 1.0,
        })
    };
    expect_error(
        &mut socket,
        binary(&update(&vec![0.0; n - 1], start.round)),
        ErrorCode::BadDelta,
    )
    .await;
    let mut nan = vec![0.0; n];
    nan[7] = f32::NAN;
    expect_error(
        &mut socket,
        binary(&update(&nan, start.round)),
        ErrorCode::BadDelta,
    )
    .await;
    let mut inf = vec![0.0; n];
    inf[n - 1] = f32::INFINITY;
    expect_error(
        &mut socket,
        binary(&update(&inf, start.round)),
        ErrorCode::BadDelta,
    )
    .await;
    expect_error(
        &mut socket,
        binary(&update(&vec![0.0; n], start.round + 1)),
        ErrorCode::WrongRound,
    )
    .await;
    assert_eq!(
        server.weights(),
        initial,
        "no bad update may touch the model"
    );

    // A good update closes the round; a second one is refused.
    let step = vec![0.001; n];
    socket
        .send(binary(&update(&step, start.round)))
        .await
        .unwrap();
    let again = binary(&update(&step, start.round));
    socket.send(again).await.unwrap();
    let mut codes = Vec::new();
    within(async {
        loop {
            match next_message(&mut socket).await {
                ServerMessage::Error(error) => codes.push(error.code),
                ServerMessage::RoundResult(result) => {
                    assert_eq!(result.round, start.round);
                    break;
                }
                _ => {}
            }
        }
    })
    .await;
    assert!(
        codes.contains(&ErrorCode::DuplicateUpdate) || codes.contains(&ErrorCode::RoundClosed),
        "{codes:?}"
    );
    let expected: Vec<f32> = initial.iter().map(|w| w + 0.001).collect();
    assert_close(&server.weights(), &expected, 1e-6);
    // The model it started from is still served (f16) beside the current one.
    let served = &server;
    let model_at = |path| async move {
        let response = http_get_bytes(served, path).await;
        let body = response.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        checkpoint::decode(&response[body..], None).unwrap().weights
    };
    let (start, now) = (
        model_at("/api/model/start").await,
        model_at("/api/model").await,
    );
    for (s, w) in start.iter().zip(&initial) {
        assert!((s - w).abs() <= 1e-3 * w.abs().max(1.0), "{s} vs {w}");
    }
    // f16 rounding averages out over the model: the mean shift is the round's.
    let shift = now.iter().zip(&start).map(|(n, s)| n - s).sum::<f32>() / n as f32;
    assert!((shift - 0.001).abs() < 1e-4, "mean shift {shift}");

    let errors = &server.status()["errors"];
    for code in [
        "malformed_frame",
        "unknown_message",
        "protocol_version",
        "text_frame",
        "not_joined",
        "already_joined",
    ] {
        assert_eq!(errors[code], 1, "{code}: {errors}");
    }
    assert_eq!(errors["bad_delta"], 3, "{errors}");
    assert_eq!(errors["wrong_round"], 1, "{errors}");
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_the_page_the_status_and_the_model_but_not_the_repository() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), rounds(1), 1);
    config.web_root = Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.."));
    let server = Server::start(config).await.unwrap();
    let page = http_get(&server, "/").await;
    assert!(page.contains("<h1>folio</h1>"), "{page}");
    // Revalidated on every load, never stale; cross-origin isolated, so that the
    // CPU fallback may share memory between its worker threads.
    let head = page.to_ascii_lowercase();
    for header in [
        "cache-control: no-cache",
        "cross-origin-opener-policy: same-origin",
        "cross-origin-embedder-policy: require-corp",
    ] {
        assert!(head.contains(header), "{header} missing: {page}");
    }
    assert!(
        http_get(&server, "/web/status.js")
            .await
            .starts_with("HTTP/1.0 200")
    );
    // The character picker's list: every client with training text.
    let characters = http_get(&server, "/api/characters").await;
    let body = &characters[characters.find("\r\n\r\n").unwrap() + 4..];
    let list: Vec<(String, usize)> = serde_json::from_str(body).unwrap();
    assert!(list.len() > 1000, "{} characters", list.len());
    assert!(
        list.iter()
            .any(|(id, chars)| id == "THE_TRAGEDY_OF_KING_LEAR_KENT" && *chars > 0)
    );
    let shipped = http_get(&server, "/models/dickens-seed.safetensors").await;
    assert!(
        shipped.starts_with("HTTP/1.0 200"),
        "the generator's fallback model is served"
    );
    assert!(
        http_get(&server, "/api/status")
            .await
            .contains("\"preset\":\"small\"")
    );
    let model = http_get(&server, "/api/model").await;
    assert!(model.starts_with("HTTP/1.0 200") && model.contains("folio-char-rnn"));
    assert!(
        http_get(&server, "/Cargo.toml")
            .await
            .starts_with("HTTP/1.0 404")
    );
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_closed_out_at_the_deadline_on_quorum() {
    let dir = tempfile::tempdir().unwrap();
    let mut round_config = RoundConfig {
        deadline: Duration::from_secs(4),
        ..rounds(3)
    };
    round_config.strategy.quorum = 2;
    let server = Server::start(config(dir.path(), round_config, 1))
        .await
        .unwrap();
    // Joins, takes the weights, never answers.
    let (mut silent, _) = tokio_tungstenite::connect_async(url(&server))
        .await
        .unwrap();
    silent.send(binary(&join(None))).await.unwrap();
    let _workers: Vec<_> = (0..2).map(|_| spawn_client(url(&server), false)).collect();
    let started = std::time::Instant::now();
    let mut told = false;
    within(async {
        loop {
            match next_message(&mut silent).await {
                ServerMessage::Error(error) if error.code == ErrorCode::RoundClosed => told = true,
                ServerMessage::RoundResult(result) => {
                    assert_eq!((result.round, result.clients), (1, 2));
                    break;
                }
                _ => {}
            }
        }
    })
    .await;
    assert!(told, "the late client is told the round closed");
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "closed before the deadline"
    );
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_population_is_evaluated_on_the_rounds_asked_for_and_the_last() {
    let dir = tempfile::tempdir().unwrap();
    let round_config = RoundConfig {
        population_eval_every: Some(3),
        ..rounds(1)
    };
    let server = Server::start(checked(config(dir.path(), round_config, 2)))
        .await
        .unwrap();
    let _client = spawn_client(url(&server), false);
    within(server.wait_for_round(2)).await;
    let history = server.history();
    let measured: Vec<bool> = history
        .iter()
        .map(|r| r.population_accuracy.is_some())
        .collect();
    // The initial model and round 2, the last (every 3rd round would be later).
    assert_eq!(measured, [true, false, true]);
    let corpus = folio_data::Corpus::load(&data_dir().join("shakespeare")).unwrap();
    let model =
        folio_model::CharRnn::from_flat(Preset::Small.config(), &server.weights(), &Device::flex())
            .unwrap();
    let population = folio_host::eval::population_ids(&corpus);
    let expected = folio_model::eval::evaluate_population(&model, &population, 64, 8, |_, _| {})
        .await
        .unwrap();
    let last = history.last().unwrap();
    assert!((last.population_accuracy.unwrap() - expected.accuracy).abs() < 1e-9);
    assert!((last.population_loss.unwrap() - expected.loss).abs() < 1e-5);
    server.abort();
}

/// A secure round on loopback: four clients selected, one killed as the round
/// starts; the three others run every step and the server commits what their
/// masked inputs sum to, having seen no update on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secure_round_commits_the_sum_of_masked_inputs_despite_a_dropout() {
    let dir = tempfile::tempdir().unwrap();
    let bound = 0.5;
    let mut round_config = rounds(4);
    round_config.strategy.clipping = Clipping::Fixed { bound };
    round_config.strategy.quorum = 2;
    round_config.secure = Some(folio_server::SecureRounds {
        threshold: None,
        degree: 0,
        step_timeout: Duration::from_secs(20),
        min_cohort: 3,
    });
    let server = Server::start(checked(config(dir.path(), round_config, 1)))
        .await
        .unwrap();
    let global = server.weights();
    let clients: Vec<_> = (0..4).map(|i| spawn_client(url(&server), i == 3)).collect();
    within(server.wait_for_round(1)).await;

    // The public history says the round was secure, not how many took part;
    // the operator's does.
    let history = http_get(&server, "/api/history").await;
    assert!(history.contains(r#""secure":true"#), "{history}");
    assert!(!history.contains(r#""clients""#), "{history}");
    assert_eq!(server.history().last().unwrap().clients, 3);
    for (log, _) in &clients[..3] {
        let log = log.lock().unwrap();
        let steps: Vec<&str> = log
            .sent
            .iter()
            .filter_map(|m| match m {
                ClientMessage::Secure(step) => Some(match step {
                    folio_proto::ClientStep::Keys(_) => "keys",
                    folio_proto::ClientStep::Shares(_) => "shares",
                    folio_proto::ClientStep::Check(_) => "check",
                    folio_proto::ClientStep::Masked(_) => "masked",
                    folio_proto::ClientStep::Reveal(_) => "reveal",
                }),
                ClientMessage::Update(_) => Some("a plain update"),
                _ => None,
            })
            .collect();
        assert_eq!(steps, ["keys", "shares", "check", "masked", "reveal"]);
    }
    // The mean of deltas each clipped to the bound moves the model by at most it.
    let moved = server
        .weights()
        .iter()
        .zip(&global)
        .map(|(w, g)| f64::from(w - g).powi(2))
        .sum::<f64>()
        .sqrt();
    assert!(
        moved > 0.0 && moved <= f64::from(bound) * 1.001,
        "moved {moved}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_clients_train_continuously_in_asynchronous_rounds() {
    let dir = tempfile::tempdir().unwrap();
    let mut round_config = rounds(2);
    round_config.asynchronous = Some(folio_server::AsyncRounds {
        buffer: 2,
        max_staleness: 1,
    });
    let server = Server::start(checked(config(dir.path(), round_config, 4)))
        .await
        .unwrap();
    let clients: Vec<_> = (0..3).map(|_| spawn_client(url(&server), false)).collect();
    within(server.wait_for_round(4)).await;
    let history = server.history();
    assert!(
        history[1..]
            .iter()
            .all(|r| r.clients == 2 && r.staleness.is_some_and(|s| s <= 1.0)),
        "{history:?}"
    );
    for (log, _) in &clients {
        let log = log.lock().unwrap();
        let rounds: Vec<u64> = log
            .sent
            .iter()
            .filter_map(|m| match m {
                ClientMessage::Update(update) => Some(update.round),
                _ => None,
            })
            .collect();
        // One update per model, each for a model the client was sent.
        assert!(rounds.windows(2).all(|w| w[0] < w[1]), "{rounds:?}");
        for round in rounds {
            assert!(
                log.received
                    .iter()
                    .any(|m| matches!(m, ServerMessage::RoundStart(s) if s.round == round))
            );
        }
    }
    let status = server.status();
    assert_eq!(status["asynchronous"]["buffer"], 2);
    assert_eq!(status["asynchronous"]["max_staleness"], 1);
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_with_wrong_gradients_is_caught_told_why_and_never_selected() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(checked(config(dir.path(), rounds(2), 2)))
        .await
        .unwrap();
    let faulty = ClientOptions {
        gradient_fault: Some(0.0),
        ..ClientOptions::native()
    };
    let (wrong, _) = spawn_client_with(url(&server), false, faulty);
    let honest: Vec<_> = (0..2).map(|_| spawn_client(url(&server), false)).collect();
    within(server.wait_for_round(2)).await;
    let wrong = wrong.lock().unwrap();
    let told = wrong.received.iter().find_map(|m| match m {
        ServerMessage::Error(e) if e.code == ErrorCode::DeviceCheckFailed => {
            Some(e.message.clone())
        }
        _ => None,
    });
    let told = told.expect("the wrong device is told");
    assert!(
        told.contains("projections differ from the expected ones"),
        "{told}"
    );
    assert!(
        !wrong
            .received
            .iter()
            .any(|m| matches!(m, ServerMessage::RoundStart(_))),
        "never selected"
    );
    for (log, _) in &honest {
        let log = log.lock().unwrap();
        assert!(
            log.sent
                .iter()
                .any(|m| matches!(m, ClientMessage::ProbeAnswer(_)))
        );
        assert!(
            !log.received
                .iter()
                .any(|m| matches!(m, ServerMessage::Error(_)))
        );
    }
    let status = server.status();
    assert_eq!(status["errors"]["device_check_failed"], 1, "{status}");
    let checks: Vec<String> = status["clients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["check"].to_string())
        .collect();
    assert_eq!(
        checks.iter().filter(|c| *c == "\"passed\"").count(),
        2,
        "{checks:?}"
    );
    assert_eq!(
        checks.iter().filter(|c| c.contains("failed")).count(),
        1,
        "{checks:?}"
    );
    server.abort();
}
