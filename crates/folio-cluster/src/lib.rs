//! folio past one machine: edges and a root over NATS JetStream, each a host of
//! the round engine ([`folio_engine`]).
//!
//! Federated averaging is a weighted sum, so it splits: each **edge** serves its
//! own tabs as `folio serve` does (sessions, limits, checks, clipping) and folds
//! their deltas into one share per round; the **root** selects across all the
//! edges' sessions, adds the shares, steps the server optimizer, evaluates and
//! commits. The root's input per round is one model per edge, not one per tab.
//! Every piece of state that must outlive a process lives in JetStream
//! ([`store`]), so any edge, the root, or NATS itself may die and come back.

pub mod edge;
pub mod nats_server;
pub mod root;
pub mod store;

pub use edge::{Edge, EdgeConfig};
pub use root::{Root, RootConfig};
