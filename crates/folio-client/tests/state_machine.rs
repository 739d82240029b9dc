//! The client loop against a scripted server: what it does with a round start, a
//! deadline it cannot meet, and error messages. (The real server on loopback is in
//! folio-server's tests; here the server's side is fixed frames, so each path is
//! exercised exactly.) Each test runs natively (`cargo test`) and in headless
//! Chromium (`scripts/test.sh`).

use std::collections::VecDeque;

use burn::prelude::Device;
use folio_client::{ClientError, ClientEvent, ClientOptions, ClientState, Transport};
use folio_fed::{Encoding, codec};
use folio_model::{CharRnn, Preset};
use folio_proto::{
    ClientMessage, DataSource, ErrorCode, ErrorMessage, Evaluate, ModelShape, Optimizer,
    RoundResult, RoundStart, ServerMessage, Welcome, decode_client,
};

#[cfg(target_family = "wasm")]
wasm_bindgen_test::wasm_bindgen_test_configure!(run_in_browser);

/// Declares `$name` as a native test and as a browser test running `$body`'s future.
macro_rules! native_and_browser_test {
    ($name:ident, $body:ident) => {
        #[cfg(not(target_family = "wasm"))]
        #[test]
        fn $name() {
            pollster::block_on($body());
        }

        #[cfg(target_family = "wasm")]
        #[wasm_bindgen_test::wasm_bindgen_test]
        async fn $name() {
            $body().await;
        }
    };
}

/// Plays `script` to the client and keeps what it sends.
struct Scripted {
    script: VecDeque<ServerMessage>,
    sent: Vec<ClientMessage>,
}

impl Transport for Scripted {
    async fn send(&mut self, frame: Vec<u8>) -> Result<(), ClientError> {
        self.sent.push(decode_client(&frame).unwrap());
        Ok(())
    }

    async fn recv(&mut self) -> Result<Option<Vec<u8>>, ClientError> {
        Ok(self.script.pop_front().map(|m| folio_proto::encode(&m)))
    }
}

const KENT: &str = "I thought the King had more affected the Duke of Albany than Cornwall.\n";

/// The simulation's welcome: Kent's lines handed out.
fn welcome() -> ServerMessage {
    ServerMessage::Welcome(Welcome {
        client_id: "THE_TRAGEDY_OF_KING_LEAR_KENT".into(),
        data: DataSource::Shakespeare,
        train_text: Some(KENT.repeat(60)),
        held_out_text: Some(KENT.repeat(3)),
        ..device_welcome()
    })
}

/// A welcome where devices bring their own text: none comes with it.
fn device_welcome() -> Welcome {
    let config = Preset::Small.config();
    Welcome {
        session: "s1".into(),
        client_id: "device-1".into(),
        data: DataSource::Device,
        train_text: None,
        held_out_text: None,
        preset: "small".into(),
        model: ModelShape {
            vocab: config.vocab as u32,
            embed: config.embed as u32,
            hidden: config.hidden as u32,
        },
        batch_size: 8,
        seq_len: 100,
    }
}

async fn round_start(round: u64, deadline_ms: u64) -> ServerMessage {
    let config = Preset::Small.config();
    let weights = CharRnn::init(config, 3, &Device::flex())
        .to_flat()
        .await
        .unwrap();
    let weights = codec::encode(&weights, &[weights.len()], Encoding::F32);
    ServerMessage::RoundStart(RoundStart {
        round,
        model: folio_proto::model_fingerprint(Encoding::F32, &weights),
        weights: Some(weights),
        weights_encoding: Encoding::F32,
        deadline_ms,
        local_epochs: 1,
        max_batches: Some(5),
        optimizer: Optimizer::Sgd,
        learning_rate: 0.1,
        clip_norm: None,
        delta_encoding: Encoding::Int8,
        seed: 1,
        secure: None,
    })
}

type Outcome = (
    Result<usize, ClientError>,
    Vec<ClientEvent>,
    Vec<ClientMessage>,
);

async fn run(script: Vec<ServerMessage>) -> Outcome {
    run_with(script, ClientOptions::native()).await
}

async fn run_with(script: Vec<ServerMessage>, options: ClientOptions) -> Outcome {
    let mut transport = Scripted {
        script: script.into(),
        sent: Vec::new(),
    };
    let mut events = Vec::new();
    let result = folio_client::run(&mut transport, &Device::flex(), &options, |e| {
        events.push(e)
    })
    .await;
    (result.map(|reports| reports.len()), events, transport.sent)
}

async fn a_round_start_is_trained_encoded_and_answered_body() {
    let result = ServerMessage::RoundResult(RoundResult {
        round: 1,
        clients: 2,
        eval_loss: 4.0,
        eval_accuracy: 0.1,
    });
    let (outcome, events, sent) = run(vec![welcome(), round_start(1, 600_000).await, result]).await;
    assert_eq!(outcome.unwrap(), 1);
    let [ClientMessage::Join(_), ClientMessage::Update(update)] = sent.as_slice() else {
        panic!("expected a join and one update, got {sent:?}")
    };
    assert_eq!(
        (update.round, update.encoding, update.examples),
        (1, Encoding::Int8, 40)
    );
    let segments: Vec<usize> = Preset::Small
        .config()
        .param_shapes()
        .iter()
        .map(|(_, s)| s.iter().product())
        .collect();
    let delta = codec::decode(&update.delta, &segments, Encoding::Int8).unwrap();
    assert!(delta.iter().any(|&d| d != 0.0));
    let trained = events
        .iter()
        .filter(|e| matches!(e, ClientEvent::State(ClientState::Training { .. })))
        .count();
    assert_eq!(trained, 5, "five batches, each announced");
    assert!(
        events
            .iter()
            .any(|e| matches!(e, ClientEvent::RoundResult(r) if r.round == 1))
    );
}

async fn a_deadline_it_cannot_meet_cuts_the_round_short_after_one_batch_body() {
    let (outcome, _, sent) = run(vec![welcome(), round_start(1, 0).await]).await;
    assert_eq!(outcome.unwrap(), 1);
    let Some(ClientMessage::Update(update)) = sent.last() else {
        panic!("no update")
    };
    assert_eq!(update.examples, 8, "one batch of 8, then the deadline");
}

async fn error_messages_are_reported_and_fatal_ones_end_the_session_body() {
    let late = ServerMessage::Error(ErrorMessage {
        code: ErrorCode::RoundClosed,
        message: "round 1 closed on quorum".into(),
    });
    let (outcome, events, _) = run(vec![welcome(), late.clone()]).await;
    assert_eq!(
        outcome.unwrap(),
        0,
        "the session goes on after a late notice"
    );
    assert!(
        events.iter().any(
            |e| matches!(e, ClientEvent::ServerError(err) if err.code == ErrorCode::RoundClosed)
        )
    );

    let refused = ServerMessage::Error(ErrorMessage {
        code: ErrorCode::ProtocolVersion,
        message: "server speaks 2".into(),
    });
    let (outcome, _, _) = run(vec![refused]).await;
    assert!(
        matches!(outcome, Err(ClientError::Rejected(e)) if e.code == ErrorCode::ProtocolVersion)
    );

    let (outcome, _, _) = run(vec![round_start(1, 1000).await]).await;
    assert!(
        matches!(outcome, Err(ClientError::NotWelcomed(_))),
        "weights before a welcome"
    );
    let (outcome, _, _) = run(vec![]).await;
    assert!(matches!(outcome, Err(ClientError::Closed)));
}

/// A round's model is offered back by fingerprint, and a round that starts
/// without weights trains from the held copy; damaged or missing ones end the loop.
async fn a_held_model_is_offered_and_used_and_a_missing_or_damaged_one_is_refused_body() {
    let ServerMessage::RoundStart(full) = round_start(1, 600_000).await else {
        unreachable!()
    };
    let (outcome, events, _) = run(vec![welcome(), ServerMessage::RoundStart(full.clone())]).await;
    assert_eq!(outcome.unwrap(), 1);
    let received: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            ClientEvent::ModelReceived { round, model } => Some((*round, model.clone())),
            _ => None,
        })
        .collect();
    let [(1, model)] = received.as_slice() else {
        panic!("one model received in round 1, got {received:?}")
    };
    assert_eq!(model.fingerprint, full.model);

    let light = RoundStart {
        weights: None,
        ..full.clone()
    };
    let options = ClientOptions {
        held: Some(model.clone()),
        ..ClientOptions::native()
    };
    let (outcome, events, sent) = run_with(
        vec![welcome(), ServerMessage::RoundStart(light.clone())],
        options,
    )
    .await;
    assert_eq!(outcome.unwrap(), 1, "trained from the held model");
    let Some(ClientMessage::Join(join)) = sent.first() else {
        panic!("no join")
    };
    assert_eq!(join.held_model, Some(full.model));
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, ClientEvent::ModelReceived { .. })),
        "nothing new to keep"
    );

    let (outcome, _, sent) = run(vec![welcome(), ServerMessage::RoundStart(light)]).await;
    assert!(matches!(
        outcome,
        Err(ClientError::ModelNotHeld { round: 1 })
    ));
    let Some(ClientMessage::Join(join)) = sent.first() else {
        panic!("no join")
    };
    assert_eq!(join.held_model, None);

    let mut damaged = full;
    if let Some(weights) = &mut damaged.weights {
        weights[10] ^= 1;
    }
    let (outcome, _, _) = run(vec![welcome(), ServerMessage::RoundStart(damaged)]).await;
    assert!(matches!(
        outcome,
        Err(ClientError::DamagedModel { round: 1 })
    ));
}

/// Where devices bring their own text, the client trains on its own and holds
/// out its last lines; without text of its own (or with some, in the
/// simulation) it stops and says why.
async fn a_device_trains_on_its_own_text_only_where_devices_bring_theirs_body() {
    let own = ClientOptions {
        text: Some(KENT.repeat(50)),
        ..ClientOptions::native()
    };
    let device = ServerMessage::Welcome(device_welcome());
    let (outcome, events, sent) = run_with(
        vec![device.clone(), round_start(1, 600_000).await],
        own.clone(),
    )
    .await;
    assert_eq!(outcome.unwrap(), 1);
    let Some(ClientMessage::Update(update)) = sent.last() else {
        panic!("no update went up")
    };
    // 40 of Kent's lines are 2,839 characters: 29 sequences of 100.
    assert_eq!(update.examples, 29);
    let Some(ClientEvent::Welcomed {
        train_chars,
        held_out_chars,
        ..
    }) = events.first()
    else {
        panic!("no welcome: {events:?}")
    };
    assert_eq!(
        (*train_chars, *held_out_chars),
        (40 * KENT.len() - 1, 10 * KENT.len())
    );

    let (outcome, _, _) = run(vec![device, round_start(1, 600_000).await]).await;
    assert!(matches!(outcome, Err(ClientError::WrongData(why)) if why.contains("--text")));
    let (outcome, _, sent) = run_with(vec![welcome(), round_start(1, 600_000).await], own).await;
    assert!(matches!(outcome, Err(ClientError::WrongData(why)) if why.contains("--data device")));
    assert_eq!(sent.len(), 1, "nothing but the join went up");
}

/// Asked to evaluate, a device measures the model on its held-out lines and
/// answers sums; it trains nothing, and keeps the model it was sent.
async fn an_evaluation_is_measured_on_the_held_out_text_and_answered_as_sums_body() {
    let Some(ServerMessage::RoundStart(start)) = Some(round_start(3, 600_000).await) else {
        unreachable!()
    };
    let evaluate = ServerMessage::Evaluate(Evaluate {
        round: 3,
        model: start.model,
        weights: start.weights.clone(),
        weights_encoding: start.weights_encoding,
        deadline_ms: 60_000,
        max_chars: 100_000,
    });
    let capped = ServerMessage::Evaluate(Evaluate {
        weights: None,
        max_chars: 50,
        ..match &evaluate {
            ServerMessage::Evaluate(e) => e.clone(),
            _ => unreachable!(),
        }
    });
    let (outcome, events, sent) = run(vec![welcome(), evaluate, capped]).await;
    assert_eq!(outcome.unwrap(), 0, "nothing trained");
    let answers: Vec<_> = sent
        .iter()
        .filter_map(|m| match m {
            ClientMessage::Evaluation(answer) => Some(*answer),
            _ => None,
        })
        .collect();
    let [whole, capped] = answers.as_slice() else {
        panic!("two answers expected: {sent:?}")
    };
    // Three of Kent's lines (215 characters), less the first of each sequence,
    // which predicts nothing.
    assert!((205..215).contains(&whole.chars), "{whole:?}");
    assert_eq!(capped.chars, 50, "at most the characters asked for");
    for answer in [whole, capped] {
        let loss = answer.loss_sum / answer.chars as f64;
        assert!(
            answer.round == 3 && (3.0..6.0).contains(&loss),
            "{answer:?}"
        );
        assert!(answer.correct <= answer.chars);
    }
    assert!(
        events
            .iter()
            .any(|e| matches!(e, ClientEvent::ModelReceived { round: 3, .. }))
    );
}

native_and_browser_test!(
    a_device_trains_on_its_own_text_only_where_devices_bring_theirs,
    a_device_trains_on_its_own_text_only_where_devices_bring_theirs_body
);
native_and_browser_test!(
    an_evaluation_is_measured_on_the_held_out_text_and_answered_as_sums,
    an_evaluation_is_measured_on_the_held_out_text_and_answered_as_sums_body
);
native_and_browser_test!(
    a_held_model_is_offered_and_used_and_a_missing_or_damaged_one_is_refused,
    a_held_model_is_offered_and_used_and_a_missing_or_damaged_one_is_refused_body
);
native_and_browser_test!(
    a_round_start_is_trained_encoded_and_answered,
    a_round_start_is_trained_encoded_and_answered_body
);
native_and_browser_test!(
    a_deadline_it_cannot_meet_cuts_the_round_short_after_one_batch,
    a_deadline_it_cannot_meet_cuts_the_round_short_after_one_batch_body
);
native_and_browser_test!(
    error_messages_are_reported_and_fatal_ones_end_the_session,
    error_messages_are_reported_and_fatal_ones_end_the_session_body
);

native_and_browser_test!(
    a_client_asked_for_work_solves_it_and_joins_again,
    client_asked_for_work
);
/// A busy aggregator asks for work before a new session: the client solves it
/// and sends the same join with the nonce. At 20 bits (about a million
/// hashes): the time is what a device pays, natively or in this browser.
async fn client_asked_for_work() {
    let challenge = folio_proto::work::Challenge {
        seed: [3; 32],
        bits: 20,
    };
    let (result, events, sent) = run(vec![ServerMessage::Challenge(challenge), welcome()]).await;
    assert!(result.is_ok(), "{result:?}");
    let joins: Vec<&folio_proto::Join> = sent
        .iter()
        .filter_map(|m| match m {
            ClientMessage::Join(join) => Some(join),
            _ => None,
        })
        .collect();
    assert_eq!(joins.len(), 2, "the join, then the join with its work");
    assert_eq!(joins[0].work, None);
    let nonce = joins[1].work.expect("the nonce");
    assert!(challenge.solved_by(nonce));
    assert_eq!(joins[1].backend, joins[0].backend, "the same join");
    let seconds = events
        .iter()
        .find_map(|e| match e {
            ClientEvent::Solved { bits: 20, seconds } => Some(*seconds),
            _ => None,
        })
        .expect("the work is reported");
    let message = format!("20 bits of join work: {seconds:.2} s");
    #[cfg(target_family = "wasm")]
    wasm_bindgen_test::console_log!("{message}");
    #[cfg(not(target_family = "wasm"))]
    println!("{message}");
}
