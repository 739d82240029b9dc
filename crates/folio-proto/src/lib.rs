//! The WebSocket messages, the same types for browser tabs and native clients.
//!
//! A frame is one binary WebSocket message: `postcard((version, message))`. The
//! version comes first so that a peer speaking another version is told so, not
//! handed a decoding error.

pub mod work;

use folio_fed::Encoding;
pub use folio_secagg::{ClientStep, SecureSpec, ServerStep};
use serde::{Deserialize, Serialize};

/// Bumped on any change to the messages below.
pub const PROTOCOL_VERSION: u16 = 8;

/// A client coming back to its session offers the WebSocket subprotocol
/// `folio-resume.TOKEN` (its session token): the server checks the token before
/// the upgrade completes, and only then lets it into the room kept for sessions
/// coming back. (A header, not the URL: proxies log URLs.)
pub const RESUME_SUBPROTOCOL: &str = "folio-resume.";

/// Largest frame either side accepts: the seed model's f32 weights (16.2 MB) with room.
pub const MAX_FRAME_BYTES: usize = 32 * 1024 * 1024;

/// Client → server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ClientMessage {
    Join(Join),
    Update(Update),
    /// The answer to the server's heartbeat: this client is alive.
    Heartbeat,
    /// A step of a secure round (keys, shares, masked input, revealed shares).
    Secure(ClientStep),
    /// The answer to a device check.
    ProbeAnswer(ProbeAnswer),
    /// The answer to an [`Evaluate`]: the global model's figures on the text
    /// this device holds out.
    Evaluation(Evaluation),
}

/// Server → client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ServerMessage {
    Welcome(Welcome),
    RoundStart(RoundStart),
    RoundResult(RoundResult),
    Heartbeat,
    Error(ErrorMessage),
    /// A step of a secure round (roster, relayed shares, unmasking request).
    Secure(ServerStep),
    /// A device check: compute this known-answer probe on the backend you train
    /// on; until the answer checks out, the client is not selected.
    Probe(Probe),
    /// Federated evaluation: measure this model on the text you hold out, and
    /// train nothing.
    Evaluate(Evaluate),
    /// Before a new session: solve this, and join again with the nonce.
    Challenge(work::Challenge),
}

/// A known-answer probe: a model and a batch built from `id` (see
/// `folio_model::probe`), whose loss and gradient digest the device returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    pub id: u64,
    pub batch_size: u32,
    pub seq_len: u32,
    /// Random ±1 directions the gradient is projected on.
    pub directions: u32,
}

impl Probe {
    /// The probe an aggregator sends: 2 sequences of 20 characters (one small
    /// training step on every kernel the model uses), 8 directions.
    pub fn with_id(id: u64) -> Self {
        Self {
            id,
            batch_size: 2,
            seq_len: 20,
            directions: 8,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeAnswer {
    pub id: u64,
    pub loss: f32,
    pub projections: Vec<f32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientKind {
    Native,
    Browser,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Join {
    pub protocol: u16,
    pub kind: ClientKind,
    /// `flex`, `webgpu`, ...
    pub backend: String,
    /// The GPU adapter's name, where there is one.
    pub adapter: Option<String>,
    /// Required when the server was started with a join token.
    pub token: Option<String>,
    /// The token of an earlier [`Welcome`]: rejoin as the same session.
    pub resume: Option<String>,
    /// Ask for this Shakespeare client id rather than the next free one (the
    /// simulation only: see [`DataSource`]).
    pub client: Option<String>,
    /// The [`model_fingerprint`] of a global model this client still holds (a
    /// reloaded tab's stored copy): a round on that model starts without weights.
    pub held_model: Option<u64>,
    /// The nonce solving the [`work::Challenge`] this connection was sent.
    pub work: Option<u64>,
}

/// The model's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelShape {
    pub vocab: u32,
    pub embed: u32,
    pub hidden: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Optimizer {
    Sgd,
    Adam,
}

/// Where a federation's devices get the text they train on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DataSource {
    /// The simulation: a device trains as a Shakespeare character, and the server
    /// hands it that character's lines in its [`Welcome`].
    Shakespeare,
    /// Every device brings its own text, which never leaves it: the server holds
    /// none and sends none.
    Device,
}

impl DataSource {
    pub fn name(self) -> &'static str {
        match self {
            DataSource::Shakespeare => "shakespeare",
            DataSource::Device => "device",
        }
    }
}

impl std::str::FromStr for DataSource {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        match name {
            "shakespeare" => Ok(DataSource::Shakespeare),
            "device" => Ok(DataSource::Device),
            other => Err(format!(
                "unknown data source {other:?}: use \"device\" (devices bring their own text) or \"shakespeare\" (the simulation)"
            )),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// Pass back in [`Join::resume`] to rejoin as the same session: a secret.
    pub session: String,
    /// This device's name in the federation: the Shakespeare character it trains
    /// as, or `device-N` where devices bring their own text.
    pub client_id: String,
    pub data: DataSource,
    /// The character's lines, in the simulation: they reach the device once,
    /// here. `None` where devices bring their own text.
    pub train_text: Option<String>,
    /// The character's held-out lines (its test split), in the simulation: what
    /// the device measures a model on when asked to [`Evaluate`].
    pub held_out_text: Option<String>,
    pub preset: String,
    pub model: ModelShape,
    pub batch_size: u32,
    pub seq_len: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundStart {
    pub round: u64,
    /// The [`model_fingerprint`] of the round's global model.
    pub model: u64,
    /// The global weights in parameter order, encoded as `weights_encoding` says;
    /// `None` when the client holds the model already (see [`Join::held_model`]).
    pub weights: Option<Vec<u8>>,
    /// f16 by default: half the bytes down, and the client trains from exactly the
    /// values it received and reports its delta against them.
    pub weights_encoding: Encoding,
    /// Milliseconds the client has to report.
    pub deadline_ms: u64,
    pub local_epochs: u32,
    /// Stop after this many batches per epoch (the tutorial trains 5).
    pub max_batches: Option<u32>,
    pub optimizer: Optimizer,
    pub learning_rate: f32,
    pub clip_norm: Option<f32>,
    /// How the update's delta must be encoded.
    pub delta_encoding: Encoding,
    /// Seeds the client's batch shuffle this round.
    pub seed: u64,
    /// Set for a secure round: the client sends no update but runs the secure
    /// aggregation steps, clipping and weighting its delta itself.
    pub secure: Option<SecureSpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Update {
    pub round: u64,
    /// Training examples (sequences) the delta was trained on.
    pub examples: u64,
    pub encoding: Encoding,
    /// `new - old`, encoded.
    pub delta: Vec<u8>,
    pub train_loss: f32,
    pub train_accuracy: f32,
    pub train_seconds: f32,
}

/// Federated evaluation of a model about to be committed as `round`'s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluate {
    pub round: u64,
    /// The [`model_fingerprint`] of the model to measure.
    pub model: u64,
    /// Its weights (`None`: the device holds them already).
    pub weights: Option<Vec<u8>>,
    pub weights_encoding: Encoding,
    /// Milliseconds the device has to answer.
    pub deadline_ms: u64,
    /// Characters to measure at most (the first of those held out).
    pub max_chars: u64,
}

/// A model's figures on the text one device holds out: sums, so that the
/// server adds devices up exactly (a mean of means would not weigh them).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub round: u64,
    /// Cross-entropy summed over the predicted characters (nats).
    pub loss_sum: f64,
    /// Characters predicted right.
    pub correct: u64,
    /// Characters predicted.
    pub chars: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundResult {
    pub round: u64,
    pub clients: u32,
    pub eval_loss: f32,
    pub eval_accuracy: f32,
}

/// Names an encoded global model: FNV-1a (64 bits) over its encoding and bytes.
/// Not a defence against anyone: a client that claims a model it lacks only fails
/// its own round.
pub fn model_fingerprint(encoding: Encoding, weights: &[u8]) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    std::iter::once(encoding.tag())
        .chain(weights.iter().copied())
        .fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(PRIME)
        })
}

/// Machine-readable error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorCode {
    MalformedFrame,
    UnknownMessage,
    ProtocolVersion,
    FrameTooLarge,
    NotJoined,
    AlreadyJoined,
    BadToken,
    UnknownClient,
    NoFreeClient,
    WrongRound,
    NotSelected,
    DuplicateUpdate,
    BadDelta,
    RoundClosed,
    TextFrame,
    /// A string in the message is longer than the server's documented limit.
    FieldTooLong,
    /// The update claims more (or fewer) examples than the client could train on.
    BadExamples,
    /// The update's delta is not in the round's encoding.
    WrongEncoding,
    /// The session to resume is connected in another connection.
    SessionInUse,
    /// The server holds as many sessions or connections as it allows.
    ServerFull,
    /// Too many refused frames: the connection is closed.
    TooManyErrors,
    /// The connection did not join, or went silent, in time.
    Timeout,
    /// A secure round's step was refused (out of order, malformed, not asked for).
    BadSecureStep,
    /// An asynchronous update trained from a model too many steps behind the
    /// global one: it is refused, and the client gets the latest model.
    Stale,
    /// The device's answer to its probe is wrong: it is not selected (a tab
    /// retries on its CPU fallback).
    DeviceCheckFailed,
    /// The client's own text does not fit the federation's data source (it
    /// brings none where devices must, or brings its own to the simulation).
    WrongData,
    /// An evaluation was refused (not asked for, out of range, a second one).
    BadEvaluation,
}

impl ErrorCode {
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::MalformedFrame => "malformed_frame",
            ErrorCode::UnknownMessage => "unknown_message",
            ErrorCode::ProtocolVersion => "protocol_version",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::NotJoined => "not_joined",
            ErrorCode::AlreadyJoined => "already_joined",
            ErrorCode::BadToken => "bad_token",
            ErrorCode::UnknownClient => "unknown_client",
            ErrorCode::NoFreeClient => "no_free_client",
            ErrorCode::WrongRound => "wrong_round",
            ErrorCode::NotSelected => "not_selected",
            ErrorCode::DuplicateUpdate => "duplicate_update",
            ErrorCode::BadDelta => "bad_delta",
            ErrorCode::RoundClosed => "round_closed",
            ErrorCode::TextFrame => "text_frame",
            ErrorCode::FieldTooLong => "field_too_long",
            ErrorCode::BadExamples => "bad_examples",
            ErrorCode::WrongEncoding => "wrong_encoding",
            ErrorCode::SessionInUse => "session_in_use",
            ErrorCode::ServerFull => "server_full",
            ErrorCode::TooManyErrors => "too_many_errors",
            ErrorCode::Timeout => "timeout",
            ErrorCode::BadSecureStep => "bad_secure_step",
            ErrorCode::Stale => "stale",
            ErrorCode::DeviceCheckFailed => "device_check_failed",
            ErrorCode::WrongData => "wrong_data",
            ErrorCode::BadEvaluation => "bad_evaluation",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorMessage {
    pub code: ErrorCode,
    pub message: String,
}

/// Why a frame could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes is above the {MAX_FRAME_BYTES}-byte cap")]
    TooLarge(usize),
    #[error("peer speaks protocol version {0}, this side {PROTOCOL_VERSION}")]
    Version(u16),
    #[error("unknown message type {0}")]
    UnknownMessage(u32),
    #[error("malformed frame: {0}")]
    Malformed(String),
}

impl FrameError {
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::TooLarge(_) => ErrorCode::FrameTooLarge,
            FrameError::Version(_) => ErrorCode::ProtocolVersion,
            FrameError::UnknownMessage(_) => ErrorCode::UnknownMessage,
            FrameError::Malformed(_) => ErrorCode::MalformedFrame,
        }
    }
}

/// Encodes a message as one frame.
pub fn encode<M: Serialize>(message: &M) -> Vec<u8> {
    postcard::to_allocvec(&(PROTOCOL_VERSION, message)).expect("messages always serialise")
}

/// Decodes a frame, telling a wrong version and an unknown message type apart from
/// plain garbage.
pub fn decode<M: for<'de> Deserialize<'de>>(frame: &[u8], variants: u32) -> Result<M, FrameError> {
    if frame.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(frame.len()));
    }
    let malformed = |err: postcard::Error| FrameError::Malformed(err.to_string());
    let (version, rest): (u16, _) = postcard::take_from_bytes(frame).map_err(malformed)?;
    if version != PROTOCOL_VERSION {
        return Err(FrameError::Version(version));
    }
    let (tag, _): (u32, _) = postcard::take_from_bytes(rest).map_err(malformed)?;
    if tag >= variants {
        return Err(FrameError::UnknownMessage(tag));
    }
    let (_, message): (u16, M) = postcard::from_bytes(frame).map_err(malformed)?;
    Ok(message)
}

/// Number of [`ClientMessage`] variants (for [`decode`]).
pub const CLIENT_MESSAGES: u32 = 6;
/// Number of [`ServerMessage`] variants (for [`decode`]).
pub const SERVER_MESSAGES: u32 = 9;

pub fn decode_client(frame: &[u8]) -> Result<ClientMessage, FrameError> {
    decode(frame, CLIENT_MESSAGES)
}

pub fn decode_server(frame: &[u8]) -> Result<ServerMessage, FrameError> {
    decode(frame, SERVER_MESSAGES)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn join() -> ClientMessage {
        ClientMessage::Join(Join {
            protocol: PROTOCOL_VERSION,
            kind: ClientKind::Browser,
            backend: "webgpu".into(),
            adapter: Some("google swiftshader".into()),
            token: None,
            resume: None,
            client: Some("THE_TRAGEDY_OF_KING_LEAR_KENT".into()),
            held_model: Some(42),
            work: Some(7),
        })
    }

    #[test]
    fn fingerprints_tell_encodings_and_bytes_apart() {
        let bytes = [1u8, 2, 3, 4];
        let f32 = model_fingerprint(Encoding::F32, &bytes);
        assert_eq!(f32, model_fingerprint(Encoding::F32, &bytes));
        assert_ne!(f32, model_fingerprint(Encoding::F16, &bytes));
        assert_ne!(f32, model_fingerprint(Encoding::F32, &[1, 2, 3, 5]));
        assert_ne!(f32, model_fingerprint(Encoding::F32, &[1, 2, 3]));
    }

    #[test]
    fn messages_round_trip() {
        let update = ClientMessage::Update(Update {
            round: 3,
            examples: 40,
            encoding: Encoding::Int8,
            delta: vec![1, 2, 3],
            train_loss: 2.5,
            train_accuracy: 0.3,
            train_seconds: 1.5,
        });
        for message in [join(), update, ClientMessage::Heartbeat] {
            assert_eq!(decode_client(&encode(&message)).unwrap(), message);
        }
        let error = ServerMessage::Error(ErrorMessage {
            code: ErrorCode::WrongRound,
            message: "round 2 is over".into(),
        });
        assert_eq!(decode_server(&encode(&error)).unwrap(), error);
    }

    #[test]
    fn tells_version_unknown_type_garbage_and_size_apart() {
        let mut other_version = encode(&join());
        other_version[0] = 9;
        assert_eq!(decode_client(&other_version), Err(FrameError::Version(9)));
        let unknown = postcard::to_allocvec(&(PROTOCOL_VERSION, 7u32)).unwrap();
        assert_eq!(decode_client(&unknown), Err(FrameError::UnknownMessage(7)));
        assert!(matches!(
            decode_client(&[PROTOCOL_VERSION as u8, 0, 0xff]),
            Err(FrameError::Malformed(_))
        ));
        assert!(matches!(decode_client(&[]), Err(FrameError::Malformed(_))));
        let huge = vec![0u8; MAX_FRAME_BYTES + 1];
        assert_eq!(
            decode_client(&huge).unwrap_err().code(),
            ErrorCode::FrameTooLarge
        );
    }
}
