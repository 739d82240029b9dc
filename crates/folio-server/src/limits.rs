//! Every bound the aggregator puts on what a client may cost it. Each is checked
//! before the work it guards; the README lists them.

use std::time::Duration;

use folio_engine::SessionRate;

/// Longest accepted strings in a join, in bytes.
pub const MAX_CLIENT_ID_BYTES: usize = 128;
pub const MAX_BACKEND_BYTES: usize = 64;
pub const MAX_ADAPTER_BYTES: usize = 256;
pub const MAX_TOKEN_BYTES: usize = 256;
pub const MAX_RESUME_BYTES: usize = 64;
/// Frames above an f32 update of the model by more than this are cut off by the
/// WebSocket layer, before they are buffered.
pub const FRAME_SLACK_BYTES: usize = 64 * 1024;
/// Rounds listed per session in the status API.
pub const REPORTED_ROUNDS_KEPT: usize = 32;

#[derive(Debug, Clone)]
pub struct Limits {
    /// WebSockets open at once; TCP connections may be a few more, kept for
    /// plain HTTP (`net::HTTP_ROOM`).
    pub max_connections: usize,
    /// ... from one IP address.
    pub max_connections_per_address: usize,
    /// ... from one network (an IPv4 /24, an IPv6 /64).
    pub max_connections_per_network: usize,
    /// Sessions kept (connected or waiting to be resumed).
    pub max_sessions: usize,
    /// A disconnected session can be resumed for this long.
    pub session_ttl: Duration,
    /// New sessions one network may open: a burst, then one at a time.
    pub new_sessions: SessionRate,
    /// An HTTP connection (or a WebSocket not yet joined) that sends nothing for
    /// this long is closed: half-sent requests, idle keep-alives, silent sockets.
    pub http_idle: Duration,
    /// A request's head must arrive within this time of its first byte.
    pub header_timeout: Duration,
    /// A WebSocket must join within this time.
    pub join_timeout: Duration,
    /// The server sends a heartbeat this often...
    pub heartbeat: Duration,
    /// ...and closes a joined connection silent for this long (a client training
    /// in the open round may stay silent until the round's deadline).
    pub idle_timeout: Duration,
    /// One frame that cannot be written in this time drops the connection.
    pub write_timeout: Duration,
    /// Frames queued for one connection; a client that does not read is dropped.
    pub outbox_frames: usize,
    /// Refused frames a connection may send before it is closed (late updates,
    /// told `round_closed`, do not count).
    pub error_budget: u32,
    /// Bytes a second read from one connection once its burst (two of the
    /// largest frames) is spent; a frame counts at least 4 KiB.
    pub read_bytes_per_sec: usize,
    /// After a wrong join token, the address is refused for this long, doubling
    /// with every further wrong guess up to `max_token_lockout`.
    pub token_lockout: Duration,
    pub max_token_lockout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_connections_per_address: 64,
            max_connections_per_network: 256,
            max_sessions: folio_host::MAX_SESSIONS,
            session_ttl: folio_host::SESSION_TTL,
            new_sessions: folio_host::NEW_SESSIONS,
            http_idle: Duration::from_secs(30),
            header_timeout: Duration::from_secs(10),
            join_timeout: Duration::from_secs(10),
            heartbeat: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(90),
            write_timeout: Duration::from_secs(120),
            outbox_frames: 8,
            error_budget: 32,
            read_bytes_per_sec: folio_proto::MAX_FRAME_BYTES,
            token_lockout: Duration::from_secs(1),
            max_token_lockout: Duration::from_secs(300),
        }
    }
}

/// The largest frame a client may send for a model of `num_params` parameters.
pub fn max_frame_bytes(num_params: usize) -> usize {
    4 * num_params + FRAME_SLACK_BYTES
}
