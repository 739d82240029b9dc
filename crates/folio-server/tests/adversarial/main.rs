//! The aggregator against a hostile client: every attack found against it, each
//! run against the real server on loopback with raw WebSocket and TCP peers, each
//! asserting the exact outcome (error code, connection closed, model unchanged or
//! bounded, counts in the status).

#[path = "../common/mod.rs"]
mod common;
mod connections;
mod crowds;
mod device_checks;

use std::time::{Duration, Instant};

use common::*;
use folio_fed::{Clipping, Encoding, StrategyConfig, codec};
use folio_proto::{ClientMessage, ErrorCode, Join, ServerMessage, Update, Welcome};
use folio_server::{AccessConfig, Limits, RoundConfig, Server};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const KENT: &str = "THE_TRAGEDY_OF_KING_LEAR_KENT";
const LEAR: &str = "THE_TRAGEDY_OF_KING_LEAR_LEAR";

/// The hardened defaults: adaptive clipping from bound 1, `clients` per round.
fn rounds(clients: usize) -> RoundConfig {
    RoundConfig {
        strategy: StrategyConfig::fedavg(clients),
        max_batches: Some(2),
        eval_clients: 2,
        eval_batches: 1,
        ..RoundConfig::tutorial()
    }
}

async fn start(
    rounds: RoundConfig,
    limits: Limits,
    access: AccessConfig,
) -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), rounds, 100);
    config.limits = limits;
    // These clients speak the protocol frame by frame and answer no device check.
    config.access = AccessConfig {
        check_devices: false,
        ..access
    };
    (dir, Server::start(config).await.unwrap())
}

async fn connect(server: &Server) -> Socket {
    tokio_tungstenite::connect_async(url(server))
        .await
        .unwrap()
        .0
}

async fn join_as(socket: &mut Socket, message: ClientMessage) -> Result<Welcome, ErrorCode> {
    join_paying(socket, message)
        .await
        .map(|(welcome, ..)| welcome)
}

/// Joins with `message`, solving the work the server asks for as a device
/// does; returns the welcome, the bits asked and the seconds spent solving.
async fn join_paying(
    socket: &mut Socket,
    message: ClientMessage,
) -> Result<(Welcome, u8, f64), ErrorCode> {
    socket.send(binary(&message)).await.unwrap();
    let (mut bits, mut seconds) = (0, 0.0);
    loop {
        match next_message(socket).await {
            ServerMessage::Welcome(welcome) => return Ok((welcome, bits, seconds)),
            ServerMessage::Error(error) => return Err(error.code),
            ServerMessage::Challenge(challenge) => {
                let started = Instant::now();
                let nonce = challenge.solve();
                seconds += started.elapsed().as_secs_f64();
                bits = challenge.bits;
                let ClientMessage::Join(join) = &message else {
                    panic!("work is asked of a join")
                };
                let paid = ClientMessage::Join(Join {
                    work: Some(nonce),
                    ..join.clone()
                });
                socket.send(binary(&paid)).await.unwrap();
            }
            _ => {}
        }
    }
}

fn join_with(edit: impl FnOnce(&mut Join)) -> ClientMessage {
    let ClientMessage::Join(mut join) = join(None) else {
        unreachable!()
    };
    edit(&mut join);
    ClientMessage::Join(join)
}

async fn next_round_start(socket: &mut Socket) -> folio_proto::RoundStart {
    loop {
        if let ServerMessage::RoundStart(start) = next_message(socket).await {
            return start;
        }
    }
}

/// Reads until the server ends the connection; returns the error codes it sent.
async fn until_closed(socket: &mut Socket, within: Duration) -> Vec<ErrorCode> {
    let mut codes = Vec::new();
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, socket.next()).await {
            Err(_) => panic!("the connection is still open after {within:?}; codes {codes:?}"),
            Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => return codes,
            Ok(Some(Ok(Message::Binary(frame)))) => {
                if let Ok(ServerMessage::Error(error)) = folio_proto::decode_server(&frame) {
                    codes.push(error.code);
                }
            }
            Ok(Some(Ok(_))) => {}
        }
    }
}

fn update(round: u64, examples: u64, delta: &[f32], encoding: Encoding) -> ClientMessage {
    let segments = common::segments();
    ClientMessage::Update(Update {
        round,
        examples,
        encoding,
        delta: codec::encode(delta, &segments, encoding),
        train_loss: 1.0,
        train_accuracy: 0.5,
        train_seconds: 1.0,
    })
}

fn distance(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
        .sum::<f64>()
        .sqrt()
}

fn error_count(server: &Server, code: &str) -> u64 {
    server.status()["errors"][code].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_replace_or_destroy_the_global_model() {
    let (_dir, server) = start(rounds(1), Limits::default(), AccessConfig::default()).await;
    let mut attacker = connect(&server).await;
    join_as(&mut attacker, join(Some(KENT))).await.unwrap();
    let start = next_round_start(&mut attacker).await;
    let initial = server.weights();
    let n = initial.len();
    // Kent trains on at most 2 batches of 8 this round.
    let target = vec![5.0; n];
    for examples in [u64::MAX, 17, 0] {
        expect_error(
            &mut attacker,
            binary(&update(start.round, examples, &target, Encoding::F32)),
            ErrorCode::BadExamples,
        )
        .await;
    }
    expect_error(
        &mut attacker,
        binary(&update(start.round, 8, &target, Encoding::F16)),
        ErrorCode::WrongEncoding,
    )
    .await;
    for (loss, accuracy, seconds) in [
        (f32::NAN, 0.5, 1.0),
        (-1.0, 0.5, 1.0),
        (1.0, 1e30, 1.0),
        (1.0, 0.5, f32::INFINITY),
    ] {
        let ClientMessage::Update(mut lying) = update(start.round, 8, &target, Encoding::F32)
        else {
            unreachable!()
        };
        (lying.train_loss, lying.train_accuracy, lying.train_seconds) = (loss, accuracy, seconds);
        expect_error(
            &mut attacker,
            binary(&ClientMessage::Update(lying)),
            ErrorCode::BadDelta,
        )
        .await;
    }
    assert_eq!(server.weights(), initial, "refused updates touch nothing");

    // Accepted, but clipped to the bound (1.0): the model moves by at most that.
    attacker
        .send(binary(&update(
            start.round,
            16,
            &vec![1e30; n],
            Encoding::F32,
        )))
        .await
        .unwrap();
    within(server.wait_for_round(1)).await;
    let after_one = server.weights();
    assert!(after_one.iter().all(|w| w.is_finite()));
    let moved = distance(&after_one, &initial);
    assert!((0.99..=1.0 + 1e-3).contains(&moved), "moved {moved}");

    // f32::MAX everywhere, twice: still finite, still bounded.
    for round in 2..=3 {
        let start = next_round_start(&mut attacker).await;
        assert_eq!(start.round, round);
        attacker
            .send(binary(&update(
                round,
                16,
                &vec![f32::MAX; n],
                Encoding::F32,
            )))
            .await
            .unwrap();
        within(server.wait_for_round(round)).await;
    }
    let after_three = server.weights();
    assert!(after_three.iter().all(|w| w.is_finite()));
    assert!(
        distance(&after_three, &after_one) <= 2.0 * 1.3,
        "the bound adapts slowly"
    );
    let history = server.history();
    assert!(history.iter().all(|r| r.eval_loss.is_finite()));
    assert_eq!(history[1].clipped, 1);
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rounds_close_only_with_a_quorum_and_retry_with_other_clients() {
    let mut config = RoundConfig {
        deadline: Duration::from_millis(1500),
        ..rounds(2)
    };
    config.strategy = StrategyConfig {
        clipping: Clipping::adaptive(1.0),
        ..StrategyConfig::fedavg(2)
    };
    let (_dir, server) = start(config, Limits::default(), AccessConfig::default()).await;
    // Four clients; each reader logs who got a round start, in order.
    let starts = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(usize, u64)>::new()));
    let mut sinks = Vec::new();
    for i in 0..4 {
        let mut socket = connect(&server).await;
        join_as(&mut socket, join(None)).await.unwrap();
        let (sink, mut stream) = socket.split();
        sinks.push(sink);
        let starts = starts.clone();
        tokio::spawn(async move {
            while let Some(Ok(message)) = stream.next().await {
                if let Message::Binary(frame) = message
                    && let Ok(ServerMessage::RoundStart(start)) = folio_proto::decode_server(&frame)
                {
                    starts.lock().unwrap().push((i, start.round));
                }
            }
        });
    }
    let wait_for_starts = |count: usize| {
        let starts = starts.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            while starts.lock().unwrap().len() < count {
                assert!(Instant::now() < deadline, "{:?}", starts.lock().unwrap());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            starts.lock().unwrap().clone()
        }
    };
    // The two picked first stay silent: the deadline passes without a quorum, the
    // round is abandoned and retried with the other two.
    let log = wait_for_starts(4).await;
    let (first, retried): (Vec<usize>, Vec<usize>) = (
        log[..2].iter().map(|s| s.0).collect(),
        log[2..4].iter().map(|s| s.0).collect(),
    );
    assert!(log.iter().all(|&(_, round)| round == 1), "{log:?}");
    assert!(
        retried.iter().all(|i| !first.contains(i)),
        "{first:?} then {retried:?}"
    );
    assert_eq!(server.status()["open_round"]["attempt"], 1);
    assert_eq!(server.history().len(), 1, "no round closed");
    // One of the two reports, the other leaves: still no round below the quorum.
    let n = server.weights().len();
    sinks[retried[0]]
        .send(binary(&update(1, 8, &vec![0.0; n], Encoding::F32)))
        .await
        .unwrap();
    let _ = sinks[retried[1]].close().await;
    eventually("the round is retried again", || {
        server.status()["open_round"]["attempt"] == 2
    })
    .await;
    assert_eq!(server.history().len(), 1, "a round closed below its quorum");
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inconsistent_round_settings_are_refused_at_startup() {
    let dir = tempfile::tempdir().unwrap();
    let mut bad = rounds(2);
    bad.strategy.quorum = 3;
    let err = Server::start(config(dir.path(), bad, 1))
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("quorum of 3"), "{err}");
    let mut bad = rounds(4);
    bad.strategy.min_clients = 2;
    let err = Server::start(config(dir.path(), bad, 1))
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("--min-clients"), "{err}");
    let mut bad = rounds(2);
    bad.model_encoding = folio_fed::Encoding::Int8;
    let err = Server::start(config(dir.path(), bad, 1))
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("int8 is for deltas only"), "{err}");
}
