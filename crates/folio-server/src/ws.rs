//! One WebSocket connection. Every frame is untrusted: it is checked before any
//! work (sizes, then the lock-free checks, then the federation under its lock),
//! refused frames get an error frame and count against the connection's error
//! budget, and nothing a client sends can grow the server without bound: frames
//! are capped by the WebSocket layer, replies by a bounded outbox, silence by
//! timeouts.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use folio_fed::codec::CheckedDelta;
use folio_proto::work::Challenge;
use folio_proto::{
    ClientKind, ClientMessage, ErrorCode, ErrorMessage, Join, Probe, ServerMessage, Update,
};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{Notify, mpsc};

use folio_engine::{CheckedJoin, DecodedUpdate, EngineError};

use crate::Shared;
use crate::driver::Delivery;
use crate::driver::Served;
use crate::limits::{
    MAX_ADAPTER_BYTES, MAX_BACKEND_BYTES, MAX_CLIENT_ID_BYTES, MAX_RESUME_BYTES, MAX_TOKEN_BYTES,
};
use crate::net::{Admission, PeerInfo};
use crate::outbox::Outbox;

pub async fn upgrade<R: Served>(
    ws: WebSocketUpgrade,
    ConnectInfo(peer): ConnectInfo<PeerInfo>,
    headers: HeaderMap,
    State(shared): State<Arc<Shared<R>>>,
) -> Response {
    if !shared.access.origin_ok(&headers) {
        shared.engine(|e| e.count_error(ErrorCode::BadToken));
        return (
            StatusCode::FORBIDDEN,
            "this origin may not open the aggregator's WebSocket (see --allow-origin)",
        )
            .into_response();
    }
    // A client coming back to its session offers its token as a subprotocol:
    // checked now, before the upgrade, it may use the room kept for sessions
    // coming back, and then only to resume. A connection that cannot prove a
    // session gets no room, however it asks.
    let offered = resume_offer(&headers);
    let resuming = offered
        .as_ref()
        .is_some_and(|(_, token)| shared.read(|e| e.can_resume(token)));
    let Some(admission) = shared
        .connections
        .upgrade(&peer.permit, peer.address.ip(), resuming)
    else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "30")],
            "the aggregator holds as many sessions from your address or network as it \
             allows (or in all); try again later",
        )
            .into_response();
    };
    let resume_only = admission == Admission::ResumeOnly;
    // Larger frames are refused by the WebSocket layer from their header, before
    // they are buffered, and end the connection.
    let max = shared.max_frame_bytes;
    // Small per-connection buffers (tungstenite's defaults are 128 KiB each): an
    // idle connection costs a few KiB, large frames just take more reads.
    // A browser that offered a subprotocol needs it echoed, or it fails the socket.
    let ws = match offered {
        Some((protocol, _)) => ws.protocols([protocol]),
        None => ws,
    };
    ws.max_message_size(max)
        .max_frame_size(max)
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(0)
        .on_upgrade(move |socket| connection(socket, shared, peer, resume_only))
}

const READ_BUFFER_BYTES: usize = 8 * 1024;

/// The resume subprotocol a client offered, and the session token in it.
fn resume_offer(headers: &HeaderMap) -> Option<(String, String)> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|line| line.to_str().ok())
        .flat_map(|line| line.split(','))
        .map(str::trim)
        .find_map(|protocol| {
            let token = protocol.strip_prefix(folio_proto::RESUME_SUBPROTOCOL)?;
            (token.len() <= MAX_RESUME_BYTES).then(|| (protocol.to_owned(), token.to_owned()))
        })
}

/// Why the server ends a connection, told to the client before it closes.
struct Goodbye(ErrorMessage);

/// Counts a WebSocket as open while it lives.
struct Open<R: Served>(Arc<Shared<R>>);

impl<R: Served> Open<R> {
    fn new(shared: &Arc<Shared<R>>) -> Self {
        shared.websockets.send_modify(|open| *open += 1);
        Self(shared.clone())
    }
}

impl<R: Served> Drop for Open<R> {
    fn drop(&mut self) {
        self.0.websockets.send_modify(|open| *open -= 1);
    }
}

async fn connection<R: Served>(
    socket: WebSocket,
    shared: Arc<Shared<R>>,
    peer: PeerInfo,
    resume_only: bool,
) {
    let _open = Open::new(&shared);
    let limits = shared.limits.clone();
    let (mut sink, mut stream) = socket.split();
    let (frames, mut queue) = mpsc::channel::<Bytes>(limits.outbox_frames);
    let kill = Arc::new(Notify::new());
    let outbox = Outbox::new(frames, kill.clone());
    let session = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut writer = {
        let (shared, session, kill) = (shared.clone(), session.clone(), kill.clone());
        tokio::spawn(async move {
            while let Some(frame) = queue.recv().await {
                let len = frame.len() as u64;
                let sent = tokio::time::timeout(
                    shared.limits.write_timeout,
                    sink.send(Message::Binary(frame)),
                )
                .await;
                if !matches!(sent, Ok(Ok(()))) {
                    // The client does not take what we send: drop it.
                    kill.notify_one();
                    return;
                }
                let id = session.load(std::sync::atomic::Ordering::Relaxed);
                if id != 0 {
                    shared.count_bytes(id, 0, len);
                }
            }
            let _ =
                tokio::time::timeout(shared.limits.write_timeout, sink.send(Message::Close(None)))
                    .await;
        })
    };
    let mut joined: Option<u64> = None;
    let challenge = std::cell::Cell::new(None);
    let mut errors = 0u32;
    let opened = Instant::now();
    let mut last_heard = opened;
    // Join within the join timeout; a connection asked for work gets three
    // times that from the challenge (a slow phone solving the most bits).
    let mut join_by = opened + limits.join_timeout;
    let mut closing = shared.closing.subscribe();
    let mut tick = tokio::time::interval(limits.heartbeat.min(limits.join_timeout) / 4);
    let mut budget = ReadBudget::new(limits.read_bytes_per_sec, shared.max_frame_bytes);
    let goodbye: Option<Goodbye> = loop {
        let paced = async {
            tokio::time::sleep(budget.wait(Instant::now())).await;
            stream.next().await
        };
        let message = tokio::select! {
            message = paced => match message {
                Some(Ok(message)) => message,
                Some(Err(err)) => {
                    if err.to_string().contains("Space limit exceeded")
                        || err.to_string().contains("too long")
                    {
                        shared.engine(|e| e.count_error(ErrorCode::FrameTooLarge));
                    }
                    break None;
                }
                None => break None,
            },
            // A full outbox, a stuck write, or an operator's revocation.
            _ = kill.notified() => break None,
            _ = closing.wait_for(|&closing| closing) => break None,
            _ = tick.tick() => {
                let now = Instant::now();
                match joined {
                    None if now > join_by => {
                        break Some(Goodbye(error(ErrorCode::Timeout, "join within the join timeout")));
                    }
                    Some(id) => {
                        let silent = now.duration_since(last_heard);
                        let may_be_silent = shared.read(|e| e.silent_until(id)).is_some_and(|deadline| now < deadline + limits.idle_timeout);
                        if silent > limits.idle_timeout && !may_be_silent {
                            break Some(Goodbye(error(ErrorCode::Timeout, "no heartbeat for too long")));
                        }
                        if silent > limits.heartbeat {
                            outbox.send(Bytes::from(folio_proto::encode(&ServerMessage::Heartbeat)));
                        }
                    }
                    None => {}
                }
                continue;
            }
        };
        last_heard = Instant::now();
        let bytes = match &message {
            Message::Binary(frame) => frame.len(),
            Message::Text(text) => text.len(),
            _ => 0,
        };
        budget.spend(bytes, last_heard);
        let reply = match message {
            Message::Binary(frame) => {
                let connection = Connection {
                    peer: &peer,
                    outbox: &outbox,
                    session: &session,
                    resume_only,
                    challenge: &challenge,
                };
                let asked = challenge.get();
                let reply = handle_frame(&shared, &connection, &mut joined, &frame);
                if challenge.get() != asked {
                    join_by = Instant::now() + 3 * limits.join_timeout;
                }
                reply
            }
            Message::Text(_) => Err(error(
                ErrorCode::TextFrame,
                "frames are binary (folio-proto)",
            )),
            Message::Close(_) => break None,
            _ => Ok(()),
        };
        match reply {
            Ok(()) => {}
            Err(refused) => {
                shared.engine(|e| e.count_error(refused.code));
                if refused.code == ErrorCode::BadToken {
                    // The answer waits: guessing is slow, and only for the guesser.
                    let wait = shared.access.wrong_token(peer.address.ip(), Instant::now());
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        _ = closing.wait_for(|&closing| closing) => {}
                    }
                    break Some(Goodbye(refused));
                }
                // A late update is a slow client, not a misbehaving one.
                if refused.code != ErrorCode::RoundClosed {
                    errors += 1;
                }
                if errors > limits.error_budget {
                    break Some(Goodbye(error(
                        ErrorCode::TooManyErrors,
                        format!("more than {} refused frames", limits.error_budget),
                    )));
                }
                outbox.send(Bytes::from(folio_proto::encode(&ServerMessage::Error(
                    refused,
                ))));
            }
        }
    };
    if let Some(id) = joined {
        shared.engine(|e| {
            e.leave(id, Instant::now());
            shared.deliver(Delivery::Disconnect(id));
        });
    }
    if let Some(Goodbye(reason)) = goodbye {
        if reason.code != ErrorCode::BadToken {
            shared.engine(|e| e.count_error(reason.code));
        }
        outbox.send(Bytes::from(folio_proto::encode(&ServerMessage::Error(
            reason,
        ))));
    }
    drop(outbox);
    // The writer sends what is queued and a close frame; a client that does not
    // read gets a second, then the socket is dropped.
    if tokio::time::timeout(std::time::Duration::from_secs(1), &mut writer)
        .await
        .is_err()
    {
        writer.abort();
    }
}

/// Checks a join's strings, protocol and token, and resolves the client it asks
/// for: all without the federation's lock.
fn check_join<R: Served>(
    shared: &Shared<R>,
    address: IpAddr,
    join: Join,
    resume_only: bool,
) -> Result<CheckedJoin, ErrorMessage> {
    let len = |field: &Option<String>| field.as_ref().map_or(0, String::len);
    let fields = [
        ("backend", join.backend.len(), MAX_BACKEND_BYTES),
        ("adapter", len(&join.adapter), MAX_ADAPTER_BYTES),
        ("token", len(&join.token), MAX_TOKEN_BYTES),
        ("resume", len(&join.resume), MAX_RESUME_BYTES),
        ("client", len(&join.client), MAX_CLIENT_ID_BYTES),
    ];
    for (name, len, max) in fields {
        if len > max {
            return Err(error(
                ErrorCode::FieldTooLong,
                format!("`{name}` is {len} bytes; at most {max}"),
            ));
        }
    }
    if join.protocol != folio_proto::PROTOCOL_VERSION {
        return Err(error(
            ErrorCode::ProtocolVersion,
            format!(
                "client speaks protocol {}, server {}: reload the page or update the client",
                join.protocol,
                folio_proto::PROTOCOL_VERSION
            ),
        ));
    }
    if !shared.access.join_token_ok(join.token.as_deref()) {
        return Err(error(ErrorCode::BadToken, "missing or wrong join token"));
    }
    // Where devices bring their own text, the engine refuses any character.
    let client = match (join.client, &shared.corpus) {
        (Some(wanted), Some(corpus)) => Some(
            corpus
                .client(&wanted)
                .map_err(|err| error(ErrorCode::UnknownClient, err.to_string()))?
                .id
                .clone(),
        ),
        (wanted, _) => wanted,
    };
    Ok(CheckedJoin {
        kind: match join.kind {
            ClientKind::Native => "native",
            ClientKind::Browser => "browser",
        },
        backend: join.backend,
        adapter: join.adapter,
        resume: join.resume,
        client,
        held_model: join.held_model,
        group: network_group(address),
        resume_only,
    })
}

/// The engine's group for a connection from `address` (fair selection, the
/// session table, the session rate): its allocation, so that a host holding
/// many IPv6 /64s of one /48 is one group, as an IPv4 /24 is.
fn network_group(address: IpAddr) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    crate::net::allocation(address).hash(&mut hasher);
    hasher.finish()
}

/// Checks an update's delta: the engine is asked only which round and encoding
/// it may be for, and, once the delta is decoded, to fold it in.
fn handle_update<R: Served>(
    shared: &Shared<R>,
    id: u64,
    update: Update,
) -> Result<(), ErrorMessage> {
    let encoding = shared.read(|e| e.expected_update(id, update.round))?;
    if update.encoding != encoding {
        return Err(error(
            ErrorCode::WrongEncoding,
            format!(
                "the delta is {:?}; this round takes {encoding:?}",
                update.encoding
            ),
        ));
    }
    let delta = CheckedDelta::new(update.delta, &shared.segments, update.encoding)
        .map_err(|err| error(ErrorCode::BadDelta, err.to_string()))?;
    let decoded = DecodedUpdate {
        round: update.round,
        examples: update.examples,
        delta,
        train_loss: update.train_loss,
        train_accuracy: update.train_accuracy,
        train_seconds: update.train_seconds,
    };
    Ok(shared.engine(|e| e.update(id, decoded, Instant::now()))?)
}

/// Checks a device's answer to its probe against the probe computed here, on
/// the CPU backend, off the engine and off the async workers.
fn handle_probe_answer<R: Served>(
    shared: &Arc<Shared<R>>,
    session: u64,
    answer: folio_proto::ProbeAnswer,
) -> Result<(), ErrorMessage> {
    let expected = Probe::with_id(answer.id).directions as usize;
    if answer.projections.len() != expected {
        return Err(error(
            ErrorCode::MalformedFrame,
            format!(
                "the probe asked for {expected} projections, not {}",
                answer.projections.len()
            ),
        ));
    }
    // Taken once: a resent answer starts no second reference computation.
    let probe = shared.engine(|e| e.take_probe_answer(session, answer.id))?;
    let spec = folio_model::probe::ProbeSpec {
        id: probe.id,
        batch_size: probe.batch_size as usize,
        seq_len: probe.seq_len as usize,
        directions: probe.directions as usize,
    };
    let model = shared.model;
    let shared = shared.clone();
    tokio::spawn(async move {
        let Ok(_slot) = shared.probe_slots.acquire().await else {
            return;
        };
        let reference = tokio::task::spawn_blocking(move || {
            pollster::block_on(spec.measure(&burn::prelude::Device::flex(), model))
        })
        .await;
        let verdict = match reference {
            Ok(Ok(reference)) => reference.check(answer.loss, &answer.projections),
            Ok(Err(err)) => Err(format!("the aggregator could not compute the probe: {err}")),
            Err(err) => Err(format!("the aggregator could not compute the probe: {err}")),
        };
        shared.engine(|e| e.device_checked(session, probe.id, verdict, Instant::now()));
    });
    Ok(())
}

/// How fast one connection's frames are read: `rate` bytes a second (a frame
/// counts at least [`ReadBudget::FLOOR`]), after a burst of two of the largest
/// frames. A client that sends faster is read more slowly: its frames wait in
/// its own socket (TCP pushes back), and it makes the server decode no more
/// than its share.
struct ReadBudget {
    available: f64,
    rate: f64,
    burst: f64,
    at: Instant,
}

impl ReadBudget {
    const FLOOR: usize = 4096;

    fn new(rate: usize, max_frame: usize) -> Self {
        let burst = 2.0 * max_frame as f64;
        Self {
            available: burst,
            rate: rate.max(1) as f64,
            burst,
            at: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.available = (self.available + elapsed * self.rate).min(self.burst);
        self.at = now;
    }

    /// A frame of `bytes` was read at `now`.
    fn spend(&mut self, bytes: usize, now: Instant) {
        self.refill(now);
        self.available -= bytes.max(Self::FLOOR) as f64;
    }

    /// How long to wait at `now` before reading the next frame.
    fn wait(&mut self, now: Instant) -> std::time::Duration {
        self.refill(now);
        std::time::Duration::from_secs_f64((-self.available).max(0.0) / self.rate)
    }
}

/// What a frame's handler needs of its connection.
struct Connection<'a> {
    peer: &'a PeerInfo,
    outbox: &'a Outbox,
    /// The joined session, for the writer's byte counts (0 until joined).
    session: &'a std::sync::atomic::AtomicU64,
    /// Let in to resume a session, and for nothing else.
    resume_only: bool,
    /// The work this connection was asked for before a new session.
    challenge: &'a std::cell::Cell<Option<Challenge>>,
}

/// The work `join` must show first, if any: a new session on a busy server
/// solves the challenge its connection was sent (a fresh one if it was sent
/// none, or the nonce does not solve it); a session coming back shows none.
fn work_due<R: Served>(
    shared: &Shared<R>,
    join: &CheckedJoin,
    sent: Option<Challenge>,
    nonce: Option<u64>,
) -> Option<Challenge> {
    let max_bits = shared.access.join_work_bits();
    if max_bits == 0 {
        return None;
    }
    let bits = shared.read(|e| {
        if join
            .resume
            .as_deref()
            .is_some_and(|token| e.can_resume(token))
        {
            return 0;
        }
        let (connected, of_allocation) = e.connected_sessions(join.group);
        let round_size = e.config().rounds.strategy.clients_per_round;
        crate::work::join_work_bits(connected, round_size, of_allocation, max_bits)
    });
    match (sent, nonce) {
        (Some(sent), Some(nonce)) if sent.solved_by(nonce) => None,
        _ if bits == 0 => None,
        _ => {
            let mut seed = [0u8; 32];
            getrandom::fill(&mut seed).expect("the OS random number generator works");
            Some(Challenge { seed, bits })
        }
    }
}

/// Sends `challenge` and returns it, to check the answer against.
fn challenge_sent(outbox: &Outbox, challenge: Challenge) -> Challenge {
    outbox.send(Bytes::from(folio_proto::encode(&ServerMessage::Challenge(
        challenge,
    ))));
    challenge
}

/// Handles one binary frame; replies go out through the outbox.
fn handle_frame<R: Served>(
    shared: &Arc<Shared<R>>,
    connection: &Connection,
    joined: &mut Option<u64>,
    frame: &[u8],
) -> Result<(), ErrorMessage> {
    let Connection {
        peer,
        outbox,
        session,
        resume_only,
        challenge,
    } = connection;
    if let Some(id) = *joined {
        shared.count_bytes(id, frame.len() as u64, 0);
    }
    let message =
        folio_proto::decode_client(frame).map_err(|err| error(err.code(), err.to_string()))?;
    match (message, *joined) {
        (ClientMessage::Join(_), Some(_)) => Err(error(
            ErrorCode::AlreadyJoined,
            "this connection has joined already",
        )),
        (ClientMessage::Join(join), None) => {
            let work = join.work;
            let checked = check_join(shared, peer.address.ip(), join, *resume_only)?;
            if let Some(due) = work_due(shared, &checked, challenge.get(), work) {
                challenge.set(Some(challenge_sent(outbox, due)));
                return Ok(());
            }
            // The welcome goes out before anything the engine queues for the
            // session (a round it rejoins): both under the engine's lock.
            let id = shared.engine(|e| -> Result<u64, ErrorMessage> {
                let joined = e.join(checked, Instant::now())?;
                let texts = shared.corpus.as_ref().map(|corpus| {
                    let client = corpus
                        .client(&joined.client_id)
                        .expect("the engine hands out corpus clients");
                    (client.train_text(), client.test_text())
                });
                let welcome = ServerMessage::Welcome(e.welcome(&joined, texts));
                // Counted from the welcome on: the writer reads it per frame.
                session.store(joined.session, std::sync::atomic::Ordering::Relaxed);
                outbox.send(Bytes::from(folio_proto::encode(&welcome)));
                shared.deliver(Delivery::Connect(joined.session, (*outbox).clone()));
                Ok(joined.session)
            })?;
            *joined = Some(id);
            // From now on the connection's liveness is the heartbeat's business.
            peer.idle.disable();
            Ok(())
        }
        (
            ClientMessage::Update(_)
            | ClientMessage::Heartbeat
            | ClientMessage::Secure(_)
            | ClientMessage::ProbeAnswer(_)
            | ClientMessage::Evaluation(_),
            None,
        ) => Err(error(ErrorCode::NotJoined, "join first")),
        (ClientMessage::Evaluation(answer), Some(id)) => {
            Ok(shared.engine(|e| e.evaluation(id, answer, Instant::now()))?)
        }
        (ClientMessage::ProbeAnswer(answer), Some(id)) => handle_probe_answer(shared, id, answer),
        (ClientMessage::Update(update), Some(id)) => handle_update(shared, id, update),
        (ClientMessage::Secure(step), Some(id)) => {
            Ok(shared.engine(|e| e.secure(id, step, Instant::now()))?)
        }
        // A heartbeat only says the client is alive.
        (ClientMessage::Heartbeat, Some(_)) => Ok(()),
    }
}

/// A refusal as the client is told it.
fn error(code: ErrorCode, message: impl Into<String>) -> ErrorMessage {
    EngineError::new(code, message).into()
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    #[test]
    fn a_connection_is_read_at_its_rate_once_its_burst_is_spent() {
        // 1 MB a second, frames of at most 1 MB: a burst of 2 MB.
        let mut budget = super::ReadBudget::new(1_000_000, 1_000_000);
        let now = Instant::now();
        budget.spend(1_000_000, now);
        budget.spend(1_000_000, now);
        assert_eq!(budget.wait(now), Duration::ZERO, "the burst");
        budget.spend(500_000, now);
        let wait = budget.wait(now).as_secs_f64();
        assert!((wait - 0.5).abs() < 1e-6, "{wait}");
        // Tiny frames count 4 KiB each: 1,000 of them cost 4 s of reading.
        let later = now + Duration::from_secs(10);
        for _ in 0..1000 {
            budget.spend(1, later);
        }
        let wait = budget.wait(later).as_secs_f64();
        assert!((wait - 2.096).abs() < 1e-3, "{wait}");
    }

    #[test]
    fn the_prefixes_of_one_ipv6_allocation_are_one_group() {
        let group = |text: &str| super::network_group(text.parse().unwrap());
        assert_eq!(group("2001:db8:1:2::1"), group("2001:db8:1:ffff::9"));
        assert_ne!(group("2001:db8:1::1"), group("2001:db8:2::1"));
        assert_eq!(group("203.0.113.7"), group("203.0.113.200"));
        assert_ne!(group("203.0.113.7"), group("203.0.114.7"));
    }
}
