//! Helpers shared by the server's test files: a server config on loopback, raw
//! WebSocket clients, HTTP by hand.

#![allow(dead_code)]

use std::time::Duration;

use folio_client::ClientOptions;
use folio_model::Preset;
use folio_proto::{ClientMessage, ErrorCode, ServerMessage, decode_server};
use folio_server::{AccessConfig, RoundConfig, Server, ServerConfig};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

// Each test file uses its own few.
#[allow(unused_imports)]
pub use folio_testkit::{data_dir, eventually, within};

/// A server whose devices are selected unchecked: tests that speak the protocol
/// frame by frame ([`checked`] for those whose clients answer device checks).
pub fn config(state_dir: &std::path::Path, rounds: RoundConfig, max_rounds: u64) -> ServerConfig {
    folio_testkit::unchecked(folio_testkit::server_config(state_dir, rounds, max_rounds))
}

/// `config` with device checks on, as `folio serve` runs.
pub fn checked(config: ServerConfig) -> ServerConfig {
    ServerConfig {
        access: AccessConfig {
            check_devices: true,
            ..config.access
        },
        ..config
    }
}

pub fn url(server: &Server) -> String {
    format!("ws://{}/ws", server.addr)
}

pub type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub async fn next_message(socket: &mut Socket) -> ServerMessage {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(60), socket.next())
            .await
            .expect("the server answers")
            .unwrap()
            .unwrap();
        if let Message::Binary(frame) = message {
            return decode_server(&frame).unwrap();
        }
    }
}

pub async fn expect_error(socket: &mut Socket, frame: Message, code: ErrorCode) {
    socket.send(frame).await.unwrap();
    match next_message(socket).await {
        ServerMessage::Error(error) => assert_eq!(error.code, code, "{}", error.message),
        other => panic!("expected {code:?}, got {other:?}"),
    }
}

pub fn join(client: Option<&str>) -> ClientMessage {
    let mut options = ClientOptions::native();
    options.join.backend = "test".into();
    options.join.client = client.map(str::to_owned);
    ClientMessage::Join(options.join)
}

pub fn binary(message: &ClientMessage) -> Message {
    Message::Binary(folio_proto::encode(message).into())
}

pub async fn http_get(server: &Server, path: &str) -> String {
    String::from_utf8_lossy(&http_get_bytes(server, path).await).into_owned()
}

/// The whole response, head and body.
pub async fn http_get_bytes(server: &Server, path: &str) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    response
}

/// The small preset's tensor sizes, in parameter order.
pub fn segments() -> Vec<usize> {
    Preset::Small
        .config()
        .param_shapes()
        .iter()
        .map(|(_, s)| s.iter().product())
        .collect()
}

/// A TCP connection to the server from the loopback address `source` (all of
/// 127.0.0.0/8 is this machine's: other addresses and networks, on one host).
pub async fn tcp_from(server: &Server, source: &str) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(format!("{source}:0").parse().unwrap())?;
    socket.connect(server.addr).await
}

/// A WebSocket to the server from the loopback address `source`.
pub async fn ws_from(
    server: &Server,
    source: &str,
) -> Result<Socket, tokio_tungstenite::tungstenite::Error> {
    ws_from_to(server, source, &url(server)).await
}

/// A WebSocket to `url` on the server from the loopback address `source`.
pub async fn ws_from_to(
    server: &Server,
    source: &str,
    url: &str,
) -> Result<Socket, tokio_tungstenite::tungstenite::Error> {
    let stream = tcp_from(server, source).await?;
    let stream = tokio_tungstenite::MaybeTlsStream::Plain(stream);
    Ok(tokio_tungstenite::client_async(url, stream).await?.0)
}
