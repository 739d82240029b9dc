//! The round engine: one federation's rounds, with no IO, no clock, no model and
//! no randomness of its own.
//!
//! Hosts feed it events with the time they happened (a client joins, sends an
//! update, leaves; time passes; a job they ran finished) and carry out the
//! actions it queues ([`Engine::poll_action`]): frames to send, and the heavy
//! jobs that must not run where the engine is held (aggregating, evaluating a
//! model, saving a commit durably). [`Engine::poll_timeout`] says when it next
//! needs [`Engine::handle_timeout`]. Every random draw comes from one generator
//! seeded through [`EngineConfig::entropy`], so a run replays bit for bit from
//! its seed. The rules live here once:
//!
//! - a round starts when the strategy finds enough connected clients; each is
//!   sent the round's model (without it when it holds it already), the plan it
//!   trains by, and a deadline;
//! - an update is taken once per selected client, with examples bounded by what
//!   that client's text allows under the round's plan;
//! - a round closes when every selected client reported or left with a quorum,
//!   or at the deadline with a quorum; otherwise it is abandoned and runs again
//!   with a fresh sample that avoids the clients that failed it;
//! - a closed round is aggregated, evaluated, persisted, and only then becomes
//!   the global model: one [`RoundRecord`] per round, built in one place.
//!
//! One engine plays one [`Role`], a type of its own, so a host handles exactly
//! the actions its role has and calls exactly the events it may:
//!
//! | role | type | holds sessions | commits rounds | its actions |
//! | --- | --- | --- | --- | --- |
//! | one server | [`Engine`] (`Engine<Whole>`) | yes | yes | [`Action`] |
//! | a cluster's edge | `Engine<Edge>` | yes | adopts the root's | [`EdgeAction`] |
//! | a cluster's root | `Engine<Root>` | on its edges | yes | [`RootAction`] |
//!
//! The code follows the concerns, each a file:
//!
//! | file | what it holds |
//! | --- | --- |
//! | `config` | what an engine is built with, and the combinations it refuses |
//! | `roles` | the three roles and their actions |
//! | `engine` | the engine's state, its reads, and `advance`, which moves rounds along |
//! | `admission` | joining, resuming and leaving; the per-network session rate |
//! | `device_check` | known-answer probes before a device may be selected |
//! | `rounds` | a synchronous round: open, collect, close or abandon |
//! | `jobs` | what a closed round hands the host to run: aggregation, folding |
//! | `commits` | aggregated → evaluated → persisted → the global model |
//! | `secure` | secure aggregation's steps inside a round |
//! | `buffered` | asynchronous rounds (FedBuff) |
//! | `release` | what public surfaces show of a DP or secure federation |
//! | `cluster` | a root's orders and an edge's shares |
//! | `sessions`, `round`, `record`, `settings`, `status`, `error` | their types |

mod admission;
mod buffered;
mod cluster;
mod commits;
mod config;
mod device_check;
mod engine;
mod error;
mod federated_eval;
mod jobs;
pub mod record;
mod release;
mod roles;
mod round;
mod rounds;
mod secure;
pub mod sessions;
mod settings;
pub mod status;

pub use cluster::{RoundOrder, SHARE_GRACE, ShareReport};
pub use config::{BuildError, EngineConfig, Entropy, SessionRate, Start};
pub use engine::Engine;
pub use error::EngineError;
pub use jobs::{AggregateJob, AggregateResult, Commit, CommitJob, EvaluateJob, ShareJob};
pub use record::{Evaluation, FederatedEvaluation, RoundRecord, model_hash};
pub use release::{RECORD_WITHHELD, Release, STATUS_WITHHELD};
pub use roles::{Action, Commits, Edge, EdgeAction, HoldsSessions, Role, Root, RootAction, Whole};
pub use round::RoundPhase;
pub use secure::device_noise;
pub use settings::{AsyncRounds, FederatedEval, MIN_COHORT, RoundConfig, SecureRounds};

use folio_fed::codec::CheckedDelta;

/// A join that passed the checks that need no engine (sizes, protocol, token,
/// the client id resolved against the corpus).
#[derive(Debug, Clone)]
pub struct CheckedJoin {
    pub kind: &'static str,
    pub backend: String,
    pub adapter: Option<String>,
    pub resume: Option<String>,
    /// A corpus client id.
    pub client: Option<String>,
    /// The fingerprint of the global model the client says it holds.
    pub held_model: Option<u64>,
    /// The group the connection comes from (for a server, its network: an IPv4
    /// /24, an IPv6 /64): rounds take clients evenly across groups, and a full
    /// session table forgets the largest group's sessions first.
    pub group: u64,
    /// The connection was let in only to resume a session (beyond the caps).
    pub resume_only: bool,
}

/// A session the engine admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    pub session: u64,
    /// The resume token: a secret for the client alone.
    pub token: String,
    pub client_id: String,
}

/// An update whose delta is decoded and checked, for the round it names.
#[derive(Debug, Clone)]
pub struct DecodedUpdate {
    pub round: u64,
    pub examples: u64,
    pub delta: CheckedDelta,
    pub train_loss: f32,
    pub train_accuracy: f32,
    pub train_seconds: f32,
}

impl DecodedUpdate {
    /// What the session's status shows of it.
    fn client_round(&self) -> sessions::ClientRound {
        sessions::ClientRound {
            round: self.round,
            examples: self.examples,
            train_loss: self.train_loss,
            train_accuracy: self.train_accuracy,
            train_seconds: self.train_seconds,
        }
    }

    /// Whether the metrics that enter the round's averages are in range: a loss
    /// finite and ≥ 0, an accuracy in [0, 1], a time finite and ≥ 0.
    fn metrics_in_range(&self) -> bool {
        self.train_loss.is_finite()
            && self.train_loss >= 0.0
            && (0.0..=1.0).contains(&self.train_accuracy)
            && self.train_seconds.is_finite()
            && self.train_seconds >= 0.0
    }
}
