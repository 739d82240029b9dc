//! One WebSocket connection: frames in, replies and round messages out. Any bad
//! input gets an error frame and a count in the status API; none closes the
//! connection or touches the model.

use std::sync::Arc;

use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use folio_proto::{ClientMessage, ErrorCode, ErrorMessage, MAX_FRAME_BYTES, ServerMessage};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;

use crate::Shared;

pub async fn upgrade(ws: WebSocketUpgrade, State(shared): State<Arc<Shared>>) -> Response {
    // Frames up to 4× the cap are read and refused with an error; larger ones end
    // the connection (the client is not speaking our protocol).
    ws.max_message_size(4 * MAX_FRAME_BYTES)
        .max_frame_size(4 * MAX_FRAME_BYTES)
        .on_upgrade(move |socket| connection(socket, shared))
}

async fn connection(socket: WebSocket, shared: Arc<Shared>) {
    let (mut sink, mut stream) = socket.split();
    let (outbox, mut queue) = mpsc::unbounded_channel::<Vec<u8>>();
    let session = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let writer = {
        let (shared, session) = (shared.clone(), session.clone());
        tokio::spawn(async move {
            while let Some(frame) = queue.recv().await {
                let len = frame.len() as u64;
                if sink.send(Message::Binary(frame.into())).await.is_err() {
                    return;
                }
                let id = session.load(std::sync::atomic::Ordering::Relaxed);
                if id != 0 {
                    shared.fed().add_bytes(id, 0, len);
                }
            }
            // The server let go of this connection (it is finishing): say goodbye.
            let _ = sink.send(Message::Close(None)).await;
        })
    };
    let mut joined: Option<u64> = None;
    let mut closing = shared.closing.subscribe();
    loop {
        let message = tokio::select! {
            message = stream.next() => match message {
                Some(message) => message,
                None => break,
            },
            // The server is finishing: stop reading, let the writer say goodbye.
            _ = closing.wait_for(|&closing| closing) => break,
        };
        let reply = match message {
            Ok(Message::Binary(frame)) => handle_frame(&shared, &mut joined, &frame, &outbox),
            Ok(Message::Text(_)) => Some(refuse(
                &shared,
                ErrorCode::TextFrame,
                "frames are binary (folio-proto)".into(),
            )),
            Ok(Message::Close(_)) => break,
            Ok(_) => None,
            Err(err) => {
                // Frames beyond 4× the cap end the connection; count those.
                if err.to_string().contains("Space limit exceeded") {
                    shared.fed().count_error(ErrorCode::FrameTooLarge);
                }
                eprintln!("connection dropped: {err}");
                break;
            }
        };
        if let Some(id) = joined {
            session.store(id, std::sync::atomic::Ordering::Relaxed);
        }
        if let Some(reply) = reply {
            let _ = outbox.send(folio_proto::encode(&reply));
        }
    }
    if let Some(id) = joined {
        shared.fed().disconnect(id);
    }
    drop(outbox);
    let _ = writer.await;
}

fn refuse(shared: &Shared, code: ErrorCode, message: String) -> ServerMessage {
    shared.fed().count_error(code);
    ServerMessage::Error(ErrorMessage { code, message })
}

/// Handles one binary frame; returns the reply, if any.
fn handle_frame(
    shared: &Shared,
    joined: &mut Option<u64>,
    frame: &[u8],
    outbox: &mpsc::UnboundedSender<Vec<u8>>,
) -> Option<ServerMessage> {
    if let Some(id) = *joined {
        shared.fed().add_bytes(id, frame.len() as u64, 0);
    }
    let message = match folio_proto::decode_client(frame) {
        Ok(message) => message,
        Err(err) => return Some(refuse(shared, err.code(), err.to_string())),
    };
    let mut fed = shared.fed();
    let result = match (message, *joined) {
        (ClientMessage::Join(_), Some(_)) => Err(ErrorMessage {
            code: ErrorCode::AlreadyJoined,
            message: "this connection has joined already".into(),
        }),
        (ClientMessage::Join(join), None) => fed.join(join, outbox.clone()).map(|(id, welcome)| {
            *joined = Some(id);
            Some(ServerMessage::Welcome(welcome))
        }),
        (ClientMessage::Update(_), None) | (ClientMessage::Heartbeat, None) => Err(ErrorMessage {
            code: ErrorCode::NotJoined,
            message: "join first".into(),
        }),
        (ClientMessage::Update(update), Some(id)) => fed.handle_update(id, update).map(|()| None),
        (ClientMessage::Heartbeat, Some(_)) => Ok(Some(ServerMessage::Heartbeat)),
    };
    match result {
        Ok(reply) => reply,
        Err(error) => {
            fed.count_error(error.code);
            Some(ServerMessage::Error(error))
        }
    }
}
