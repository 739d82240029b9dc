//! Why the engine refused an input: one type, with the wire code a client is
//! told and the words a person reads.

use folio_proto::{ErrorCode, ErrorMessage};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct EngineError {
    pub code: ErrorCode,
    pub message: String,
}

impl EngineError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl From<EngineError> for ErrorMessage {
    fn from(err: EngineError) -> Self {
        ErrorMessage {
            code: err.code,
            message: err.message,
        }
    }
}

impl From<EngineError> for folio_proto::ServerMessage {
    fn from(err: EngineError) -> Self {
        folio_proto::ServerMessage::Error(err.into())
    }
}
