//! A tap in front of the aggregator: a TCP proxy on loopback that forwards every
//! byte both ways unchanged, and keeps what the aggregator received (HTTP
//! requests, and each WebSocket message a client sent, unmasked as the server
//! reads it) and everything it answered. Tests search it for what must never
//! reach the server.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use anyhow::{Context, ensure};

#[derive(Default)]
struct Recorded {
    /// Request heads and bodies before a connection upgrades.
    requests: Vec<u8>,
    /// Every WebSocket message clients sent, whole (fragments joined).
    messages: Vec<Vec<u8>>,
    /// Every byte the aggregator sent back.
    answers: Vec<u8>,
    /// Why a connection's frames could not be read (a compressed frame, say).
    unreadable: Vec<String>,
}

/// The running tap; it serves until the process ends.
pub struct Tap {
    pub addr: SocketAddr,
    recorded: Arc<Mutex<Recorded>>,
}

impl Tap {
    /// A tap on a free loopback port in front of `upstream`.
    pub fn start(upstream: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let recorded = Arc::new(Mutex::new(Recorded::default()));
        let shared = recorded.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let recorded = shared.clone();
                std::thread::spawn(move || {
                    if let Err(err) = relay(client, upstream, &recorded) {
                        recorded.lock().unwrap().unreadable.push(err.to_string());
                    }
                });
            }
        });
        Ok(Self { addr, recorded })
    }

    /// The WebSocket messages clients sent so far.
    pub fn messages(&self) -> Vec<Vec<u8>> {
        self.recorded.lock().unwrap().messages.clone()
    }

    /// Where `needle` occurs in what the aggregator received or answered, by
    /// name; empty if nowhere. Fails if a connection's frames could not be read.
    pub fn find(&self, needle: &[u8]) -> anyhow::Result<Vec<&'static str>> {
        let recorded = self.recorded.lock().unwrap();
        ensure!(
            recorded.unreadable.is_empty(),
            "the tap could not read every frame: {:?}",
            recorded.unreadable
        );
        let mut found = Vec::new();
        if contains(&recorded.requests, needle) {
            found.push("an HTTP request");
        }
        if recorded.messages.iter().any(|m| contains(m, needle)) {
            found.push("a WebSocket message");
        }
        if contains(&recorded.answers, needle) {
            found.push("an answer of the aggregator");
        }
        Ok(found)
    }
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

fn relay(
    mut client: TcpStream,
    upstream: SocketAddr,
    recorded: &Arc<Mutex<Recorded>>,
) -> anyhow::Result<()> {
    let mut server = TcpStream::connect(upstream).context("the tap cannot reach the aggregator")?;
    let (mut from_server, mut to_client) = (server.try_clone()?, client.try_clone()?);
    let answers = recorded.clone();
    std::thread::spawn(move || {
        let mut buffer = [0u8; 16 * 1024];
        while let Ok(read @ 1..) = from_server.read(&mut buffer) {
            answers
                .lock()
                .unwrap()
                .answers
                .extend_from_slice(&buffer[..read]);
            if to_client.write_all(&buffer[..read]).is_err() {
                break;
            }
        }
        let _ = to_client.shutdown(std::net::Shutdown::Both);
    });
    let mut reader = Requests::default();
    let mut buffer = [0u8; 64 * 1024];
    loop {
        let read = match client.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        server.write_all(&buffer[..read])?;
        reader.feed(&buffer[..read], recorded)?;
    }
    let _ = server.shutdown(std::net::Shutdown::Both);
    Ok(())
}

/// Reads a client's side of one connection: HTTP requests until one upgrades
/// to a WebSocket, then frames (RFC 6455, section 5).
#[derive(Default)]
struct Requests {
    pending: Vec<u8>,
    upgraded: bool,
    message: Vec<u8>,
}

impl Requests {
    fn feed(&mut self, bytes: &[u8], recorded: &Arc<Mutex<Recorded>>) -> anyhow::Result<()> {
        self.pending.extend_from_slice(bytes);
        loop {
            let progressed = if self.upgraded {
                self.frame(recorded)?
            } else {
                self.request(recorded)
            };
            if !progressed {
                return Ok(());
            }
        }
    }

    /// One whole request head (and its body), if it is in.
    fn request(&mut self, recorded: &Arc<Mutex<Recorded>>) -> bool {
        let Some(end) = self.pending.windows(4).position(|w| w == b"\r\n\r\n") else {
            return false;
        };
        let head = String::from_utf8_lossy(&self.pending[..end]).to_ascii_lowercase();
        let body = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length:"))
            .and_then(|len| len.trim().parse::<usize>().ok())
            .unwrap_or(0);
        let whole = end + 4 + body;
        if self.pending.len() < whole {
            return false;
        }
        let request: Vec<u8> = self.pending.drain(..whole).collect();
        recorded.lock().unwrap().requests.extend(request);
        self.upgraded = head.contains("upgrade: websocket");
        true
    }

    /// One whole frame, if it is in: its payload unmasked, a message kept once
    /// its last fragment is in.
    fn frame(&mut self, recorded: &Arc<Mutex<Recorded>>) -> anyhow::Result<bool> {
        let bytes = &self.pending;
        if bytes.len() < 2 {
            return Ok(false);
        }
        let (fin, compressed, opcode) =
            (bytes[0] & 0x80 != 0, bytes[0] & 0x40 != 0, bytes[0] & 0x0f);
        ensure!(
            !compressed,
            "a compressed WebSocket frame: its bytes cannot be searched"
        );
        let masked = bytes[1] & 0x80 != 0;
        let (len, mut at) = match bytes[1] & 0x7f {
            126 if bytes.len() >= 4 => (u64::from(u16::from_be_bytes([bytes[2], bytes[3]])), 4),
            127 if bytes.len() >= 10 => (u64::from_be_bytes(bytes[2..10].try_into()?), 10),
            126 | 127 => return Ok(false),
            len => (u64::from(len), 2),
        };
        let mask = if masked {
            if bytes.len() < at + 4 {
                return Ok(false);
            }
            at += 4;
            Some([bytes[at - 4], bytes[at - 3], bytes[at - 2], bytes[at - 1]])
        } else {
            None
        };
        let len = usize::try_from(len)?;
        if bytes.len() < at + len {
            return Ok(false);
        }
        let mut payload = bytes[at..at + len].to_vec();
        self.pending.drain(..at + len);
        if let Some(mask) = mask {
            payload
                .iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b ^= mask[i % 4]);
        }
        // Data frames (continuation, text, binary); control frames are kept as
        // they are.
        if opcode <= 2 {
            self.message.extend(payload);
            if fin {
                let message = std::mem::take(&mut self.message);
                recorded.lock().unwrap().messages.push(message);
            }
        } else {
            recorded.lock().unwrap().messages.push(payload);
        }
        Ok(true)
    }
}
