//! The roles an engine plays, each a type of its own over one core: one server
//! ([`Whole`]), a cluster's edge ([`Edge`]) and its root ([`Root`]). A role fixes
//! which events the engine takes (the `impl` blocks bounded by
//! [`HoldsSessions`] and [`Commits`], and those for `Engine<Edge>` and
//! `Engine<Root>` alone) and which actions its host carries out.

use std::sync::Arc;

use folio_proto::ServerMessage;

use crate::jobs::{CommitJob, ShareJob};
use crate::{RoundOrder, RoundRecord};

/// Sessions, rounds and commits in one process.
#[derive(Debug)]
pub enum Whole {}

/// A cluster's edge: sessions and their updates, folded into one share per
/// round; the root orders the rounds ([`crate::Engine::order`]) and commits them
/// ([`crate::Engine::adopt`]).
#[derive(Debug)]
pub enum Edge {}

/// A cluster's root: selection over the sessions the edges offer
/// ([`crate::Engine::offer`]), the edges' shares combined
/// ([`crate::Engine::part`]), evaluation and commits. It holds no session.
#[derive(Debug)]
pub enum Root {}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::Whole {}
    impl Sealed for super::Edge {}
    impl Sealed for super::Root {}
}

/// What an engine is to its federation.
pub trait Role: sealed::Sealed + Send + 'static {
    /// What its host carries out.
    type Action: Send;
    /// Sessions connect here (one server, an edge), not on the edges (a root).
    const HOLDS_SESSIONS: bool;
    /// Rounds are numbered, aggregated and committed here (one server, a root),
    /// not adopted from the root (an edge).
    const COMMITS: bool;
    /// The engine's output as this role's action; `None`: not this role's to
    /// carry out (a root's messages to sessions, which its edges send).
    #[doc(hidden)]
    fn action(output: Output) -> Option<Self::Action>;
}

/// A role whose engine holds sessions: joins, updates, secure steps, probes.
pub trait HoldsSessions: Role {}
impl HoldsSessions for Whole {}
impl HoldsSessions for Edge {}

/// A role whose engine aggregates, evaluates and commits rounds.
pub trait Commits: Role {}
impl Commits for Whole {}
impl Commits for Root {}

/// Every output of the core; each role takes its own part of it.
#[doc(hidden)]
pub enum Output {
    Send {
        to: Vec<u64>,
        message: Arc<ServerMessage>,
    },
    Job(CommitJob),
    Committed(Box<RoundRecord>),
    Share(ShareJob),
    Order(RoundOrder),
}

/// Work for one server's host. Sends are cheap; the jobs are not.
pub enum Action {
    /// `message` to each of `to` (one encoding serves them all).
    Send {
        to: Vec<u64>,
        message: Arc<ServerMessage>,
    },
    Job(CommitJob),
    /// Round `record.round` is now the global model.
    Committed(Box<RoundRecord>),
}

/// Work for an edge's host.
pub enum EdgeAction {
    /// `message` to each of `to`.
    Send {
        to: Vec<u64>,
        message: Arc<ServerMessage>,
    },
    /// The edge's share of a round, to fold and send to the root.
    Share(ShareJob),
}

/// Work for a root's host.
pub enum RootAction {
    /// Start the round on the edges.
    Order(RoundOrder),
    /// A job of the commit pipeline (a root's aggregation combines the edges'
    /// shares).
    Job(CommitJob),
    Committed(Box<RoundRecord>),
}

impl Role for Whole {
    type Action = Action;
    const HOLDS_SESSIONS: bool = true;
    const COMMITS: bool = true;

    fn action(output: Output) -> Option<Action> {
        Some(match output {
            Output::Send { to, message } => Action::Send { to, message },
            Output::Job(job) => Action::Job(job),
            Output::Committed(record) => Action::Committed(record),
            Output::Share(_) | Output::Order(_) => {
                unreachable!("one server's engine folds no shares and orders no rounds")
            }
        })
    }
}

impl Role for Edge {
    type Action = EdgeAction;
    const HOLDS_SESSIONS: bool = true;
    const COMMITS: bool = false;

    fn action(output: Output) -> Option<EdgeAction> {
        Some(match output {
            Output::Send { to, message } => EdgeAction::Send { to, message },
            Output::Share(job) => EdgeAction::Share(job),
            _ => unreachable!("an edge's engine folds shares; its root commits"),
        })
    }
}

impl Role for Root {
    type Action = RootAction;
    const HOLDS_SESSIONS: bool = false;
    const COMMITS: bool = true;

    fn action(output: Output) -> Option<RootAction> {
        Some(match output {
            // Its sessions live on its edges, which tell them themselves.
            Output::Send { .. } => return None,
            Output::Order(order) => RootAction::Order(order),
            Output::Job(job) => RootAction::Job(job),
            Output::Committed(record) => RootAction::Committed(record),
            Output::Share(_) => unreachable!("a root combines shares; it folds none"),
        })
    }
}
