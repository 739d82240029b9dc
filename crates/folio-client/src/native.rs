//! The native transport: tokio-tungstenite.

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

use crate::{ClientError, Transport};

pub struct WsTransport {
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl WsTransport {
    /// Connects to the aggregator's WebSocket (`ws://127.0.0.1:8080/ws`).
    pub async fn connect(url: &str) -> Result<Self, ClientError> {
        let (socket, _) = connect_async(url).await.map_err(|err| {
            ClientError::Connection(format!("{url}: {err}; is `folio serve` running?"))
        })?;
        Ok(Self { socket })
    }
}

impl Transport for WsTransport {
    async fn send(&mut self, frame: Vec<u8>) -> Result<(), ClientError> {
        self.socket
            .send(Message::Binary(frame.into()))
            .await
            .map_err(|err| ClientError::Connection(err.to_string()))
    }

    async fn recv(&mut self) -> Result<Option<Vec<u8>>, ClientError> {
        while let Some(message) = self.socket.next().await {
            match message.map_err(|err| ClientError::Connection(err.to_string()))? {
                Message::Binary(frame) => return Ok(Some(frame.to_vec())),
                Message::Close(_) => return Ok(None),
                _ => {}
            }
        }
        Ok(None)
    }
}

/// How long to wait before reconnecting: doubling from 0.5 s to 30 s.
fn backoff(failures: u32) -> std::time::Duration {
    std::time::Duration::from_millis(500u64.saturating_mul(1 << failures.min(6)).min(30_000))
}

/// [`crate::run`] that survives the server going away: it reconnects with
/// backoff and resumes its session (or, after a server restart, joins again as
/// the same Shakespeare client). Returns when the server closes the connection
/// cleanly, `max_rounds` results arrived, or the server refuses us for good.
pub async fn run_reconnecting(
    url: &str,
    device: &burn::prelude::Device,
    options: &crate::ClientOptions,
    mut on_event: impl FnMut(crate::ClientEvent),
    mut on_retry: impl FnMut(&ClientError, std::time::Duration),
) -> Result<Vec<crate::RoundReport>, ClientError> {
    let mut options = options.clone();
    let mut reports = Vec::new();
    let mut failures = 0;
    loop {
        let outcome = match WsTransport::connect(url).await {
            Ok(mut transport) => {
                let mut welcomed = None;
                let outcome = crate::run(&mut transport, device, &options, |event| {
                    if let crate::ClientEvent::Welcomed {
                        client_id, session, ..
                    } = &event
                    {
                        welcomed = Some((session.clone(), client_id.clone()));
                    }
                    on_event(event)
                })
                .await;
                if let Some((session, client_id)) = welcomed {
                    options.join.resume = Some(session);
                    options.join.client = Some(client_id);
                    failures = 0;
                }
                outcome
            }
            Err(err) => Err(err),
        };
        match outcome {
            Ok(mut done) => {
                reports.append(&mut done);
                return Ok(reports);
            }
            Err(err @ (ClientError::Connection(_) | ClientError::Closed)) => {
                let wait = backoff(failures);
                on_retry(&err, wait);
                failures += 1;
                tokio::time::sleep(wait).await;
            }
            Err(ClientError::Rejected(refusal)) if crate::is_retryable(refusal.code) => {
                let wait = backoff(failures);
                on_retry(&ClientError::Rejected(refusal), wait);
                failures += 1;
                tokio::time::sleep(wait).await;
            }
            Err(err) => return Err(err),
        }
    }
}
