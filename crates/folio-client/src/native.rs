//! The native transport: tokio-tungstenite.

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message, http};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

use crate::{ClientError, Transport};

pub struct WsTransport {
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl WsTransport {
    /// Connects to the aggregator's WebSocket (`ws://127.0.0.1:8080/ws`).
    pub async fn connect(url: &str) -> Result<Self, ClientError> {
        Self::connect_resuming(url, None).await
    }

    /// Connects as the holder of session `resume` (its token), which the server
    /// checks before the upgrade completes ([`crate::resume_protocol`]).
    pub async fn connect_resuming(url: &str, resume: Option<&str>) -> Result<Self, ClientError> {
        let mut request = url
            .into_client_request()
            .map_err(|err| ClientError::Connection(format!("{url}: {err}")))?;
        if let Some(token) = resume {
            let protocol = crate::resume_protocol(token).parse().map_err(|_| {
                ClientError::Connection("the session token is not a header value".into())
            })?;
            request
                .headers_mut()
                .insert(http::header::SEC_WEBSOCKET_PROTOCOL, protocol);
        }
        let (socket, _) = connect_async(request)
            .await
            .map_err(|err| match untrusted(&err) {
                Some(why) => ClientError::Untrusted(format!(
                    "{url}: the server's TLS certificate is not trusted ({why}): if your own \
                 CA signed it, point SSL_CERT_FILE at that CA's certificate (PEM)"
                )),
                None => ClientError::Connection(format!("{url}: {err}; is `folio serve` running?")),
            })?;
        Ok(Self { socket })
    }
}

/// The certificate error a failed connection ended on, if it did: no retry
/// mends that.
fn untrusted(err: &tungstenite::Error) -> Option<&rustls::Error> {
    let why = match err {
        tungstenite::Error::Tls(tungstenite::error::TlsError::Rustls(why)) => why.as_ref(),
        // The handshake's own errors come as IO errors around rustls's.
        tungstenite::Error::Io(io) => io.get_ref()?.downcast_ref::<rustls::Error>()?,
        _ => return None,
    };
    matches!(why, rustls::Error::InvalidCertificate(_)).then_some(why)
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

/// [`crate::run_reconnecting`] over tokio-tungstenite: survives the server going
/// away (with several `urls`, a cluster's edges, it moves to the next whenever
/// connecting fails). Returns when the server closes the connection cleanly, `max_rounds`
/// results arrived, or the server refuses us for good.
pub async fn run_reconnecting(
    urls: &[String],
    device: &burn::prelude::Device,
    options: &crate::ClientOptions,
    on_event: impl FnMut(crate::ClientEvent),
    on_retry: impl FnMut(&ClientError, std::time::Duration),
) -> Result<Vec<crate::RoundReport>, ClientError> {
    let servers = crate::Failover::new(urls.iter().cloned());
    crate::run_reconnecting(
        |resume| {
            let (url, servers) = (servers.url(), &servers);
            async move {
                let connected = WsTransport::connect_resuming(&url, resume.as_deref()).await;
                if connected.is_err() {
                    servers.failed();
                }
                connected
            }
        },
        tokio::time::sleep,
        device,
        options,
        on_event,
        on_retry,
    )
    .await
}
