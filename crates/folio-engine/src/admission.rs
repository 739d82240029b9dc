//! Who gets in: a resumed session, or a new one (in the simulation, with the
//! client asked for or the next free one), each network opening new sessions at a bounded rate (a token
//! bucket per group); and what happens when a connection ends.

use std::collections::BTreeMap;
use std::time::Instant;

use folio_proto::{DataSource, ErrorCode, Welcome};

use crate::engine::Phase;
use crate::error::EngineError;
use crate::roles::HoldsSessions;
use crate::rounds::round_message;
use crate::sessions::SessionError;
use crate::{CheckedJoin, Engine, Joined, SessionRate};

/// Groups whose new-session allowance is remembered at most (full ones are
/// forgotten first: they are as good as new).
const MAX_ALLOWANCES: usize = 10_000;

/// A group's allowance of new sessions, as of `at`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Allowance {
    left: f64,
    at: Instant,
}

fn session_error(err: SessionError) -> EngineError {
    match err {
        SessionError::InUse => EngineError::new(
            ErrorCode::SessionInUse,
            "this session is connected in another connection",
        ),
        SessionError::ClientTaken(id) => EngineError::new(
            ErrorCode::NoFreeClient,
            format!("{id} is already training in another connection"),
        ),
        SessionError::NoFreeClient => {
            EngineError::new(ErrorCode::NoFreeClient, "every Shakespeare client is taken")
        }
        SessionError::Full => EngineError::new(
            ErrorCode::ServerFull,
            "every session the server keeps is connected; try again later",
        ),
    }
}

impl<R: HoldsSessions> Engine<R> {
    /// Admits a connection: a resumed session, or a new one with the client asked
    /// for or the next free one. A session selected in the open round that left
    /// before it reported gets the round again.
    pub fn join(&mut self, join: CheckedJoin, now: Instant) -> Result<Joined, EngineError> {
        let joined = self.admit(join, now);
        self.advance(now);
        joined
    }

    /// Admits many connections at once: a round starts, if it can, only once all
    /// are in (an in-process population joins before its first round).
    pub fn join_many(
        &mut self,
        joins: impl IntoIterator<Item = CheckedJoin>,
        now: Instant,
    ) -> Vec<Result<Joined, EngineError>> {
        let joined = joins
            .into_iter()
            .map(|join| self.admit(join, now))
            .collect();
        self.advance(now);
        joined
    }

    /// Whether `token` names a session that can be resumed now (it exists, the
    /// secret is right, it is not connected).
    pub fn can_resume(&self, token: &str) -> bool {
        matches!(self.sessions.find_resumable(token), Ok(Some(_)))
    }

    fn admit(&mut self, join: CheckedJoin, now: Instant) -> Result<Joined, EngineError> {
        let resumed = match &join.resume {
            Some(token) => self.sessions.find_resumable(token).map_err(session_error)?,
            None => None,
        };
        let session = match resumed {
            Some(session) => session,
            None if join.resume_only => {
                return Err(EngineError::new(
                    ErrorCode::ServerFull,
                    "this connection was let in to resume a session, and there is none to \
                     resume: reconnect without offering a session token",
                ));
            }
            None => {
                self.new_session_allowed(join.group, now)?;
                let client = self.client_for(join.client.as_deref())?;
                let secret = u128::from(self.draw_u64()) << 64 | u128::from(self.draw_u64());
                let session = self
                    .sessions
                    .create(
                        client,
                        join.kind,
                        join.group,
                        self.config.max_sessions,
                        now,
                        self.config.session_ttl,
                        secret,
                    )
                    .map_err(session_error)?;
                self.spend_allowance(join.group);
                session
            }
        };
        self.sessions.connect(session);
        let info = self.sessions.get_mut(session).expect("session just made");
        info.backend = join.backend;
        info.adapter = join.adapter;
        info.held_model = join.held_model;
        info.group = join.group;
        let joined = Joined {
            session,
            token: info.token(),
            client_id: info.client_id.clone(),
        };
        self.check_device(session);
        self.rejoin_open_round(session, now);
        Ok(joined)
    }

    /// The Shakespeare client a new session trains as: the one asked for or the
    /// next free one. `None` where devices bring their own text.
    fn client_for(&self, wanted: Option<&str>) -> Result<Option<String>, EngineError> {
        if self.config.data == DataSource::Device {
            return match wanted {
                Some(_) => Err(EngineError::new(
                    ErrorCode::UnknownClient,
                    "this federation's devices train on their own text: there is no Shakespeare character to train as (join without one)",
                )),
                None => Ok(None),
            };
        }
        let client = self
            .sessions
            .pick_client(wanted, &self.pool)
            .map_err(session_error)?;
        if !self.clients.contains_key(&client) {
            return Err(EngineError::new(
                ErrorCode::UnknownClient,
                format!("{client} has no training text to train on"),
            ));
        }
        Ok(Some(client))
    }

    /// Whether `group` may open a new session now (its allowance refilled).
    fn new_session_allowed(&mut self, group: u64, now: Instant) -> Result<(), EngineError> {
        let SessionRate { burst, every } = self.config.new_sessions;
        if self.allowances.len() >= MAX_ALLOWANCES {
            self.allowances.retain(|_, a| {
                now.saturating_duration_since(a.at).as_secs_f64()
                    < every.as_secs_f64() * (f64::from(burst) - a.left)
            });
        }
        let allowance = self.allowances.entry(group).or_insert(Allowance {
            left: f64::from(burst),
            at: now,
        });
        let refill = if every.is_zero() {
            f64::INFINITY
        } else {
            now.saturating_duration_since(allowance.at).as_secs_f64() / every.as_secs_f64()
        };
        allowance.left = (allowance.left + refill).min(f64::from(burst));
        allowance.at = now;
        if allowance.left >= 1.0 {
            return Ok(());
        }
        let wait = every.mul_f64(1.0 - allowance.left).as_secs().max(1);
        Err(EngineError::new(
            ErrorCode::ServerFull,
            format!(
                "your network opened {burst} sessions in a burst; the next may open in {wait} s (resuming a session is not limited)"
            ),
        ))
    }

    fn spend_allowance(&mut self, group: u64) {
        if let Some(allowance) = self.allowances.get_mut(&group) {
            allowance.left -= 1.0;
        }
    }

    /// The welcome for a session just admitted: with its character's training
    /// and held-out text in the simulation (`texts`), with none where devices
    /// bring their own.
    pub fn welcome(&self, joined: &Joined, texts: Option<(String, String)>) -> Welcome {
        let (train_text, held_out_text) = texts.unzip();
        Welcome {
            session: joined.token.clone(),
            client_id: joined.client_id.clone(),
            data: self.config.data,
            train_text,
            held_out_text,
            preset: self.config.preset.clone(),
            model: self.config.model,
            batch_size: self.config.rounds.batch_size,
            seq_len: self.config.rounds.seq_len,
        }
    }

    /// A selected session that left before it reported gets its round again.
    fn rejoin_open_round(&mut self, session: u64, now: Instant) {
        if !self.selectable(session) {
            return;
        }
        let Phase::Collecting(open) = &mut self.phase else {
            return;
        };
        // A secure round's keys left with the connection: it goes on without it.
        if open.secure.is_some() || !open.dropped.remove(&session) {
            return;
        }
        let deadline_ms = open.seconds_left(now).as_millis() as u64;
        let Some(info) = self.sessions.get_mut(session) else {
            return;
        };
        let held = info.held_model == Some(open.start.model);
        info.held_model = Some(open.start.model);
        let message = round_message(&open.start, deadline_ms, held);
        self.send(vec![session], message);
    }

    /// A connection ended: its session can be resumed until it expires; if it was
    /// training in the open round, the round counts it as dropped.
    pub fn leave(&mut self, session: u64, now: Instant) {
        self.sessions.disconnect(session, now);
        let held_task = self.buffered.as_mut().is_some_and(|b| {
            b.owing.remove(&session);
            b.tasks.remove(&session).is_some()
        });
        if held_task {
            self.strike(&[session], now, "left with an asynchronous task");
        }
        if let Phase::Collecting(open) = &mut self.phase {
            if open.is_training(session) {
                open.dropped.insert(session);
            }
            // Gone from every later step of a secure round too.
            if let Some(secure) = &mut open.secure {
                secure.left.insert(session);
                secure.server.leave(session);
            }
        }
        if let Phase::Asking(asking) = &mut self.phase {
            asking.waiting.remove(&session);
        }
        self.advance(now);
    }

    /// Ends a session for good (an operator's revocation); `None` if unknown,
    /// else the client it trained as.
    pub fn revoke(&mut self, session: u64, now: Instant) -> Option<String> {
        self.leave(session, now);
        self.sessions.revoke(session).map(|info| info.client_id)
    }

    /// Counts a frame's bytes for its session and the round.
    pub fn add_bytes(&mut self, session: u64, up: u64, down: u64) {
        if let Some(info) = self.sessions.get_mut(session) {
            info.bytes_up = info.bytes_up.saturating_add(up);
            info.bytes_down = info.bytes_down.saturating_add(down);
        }
        if let Phase::Collecting(open) = &mut self.phase {
            open.bytes_up = open.bytes_up.saturating_add(up);
            open.bytes_down = open.bytes_down.saturating_add(down);
        }
        if let Some(buffered) = &mut self.buffered {
            let buffer = &mut buffered.buffer;
            buffer.bytes_up = buffer.bytes_up.saturating_add(up);
            buffer.bytes_down = buffer.bytes_down.saturating_add(down);
        }
    }

    /// The characters a session can train as, with their training characters.
    pub fn clients(&self) -> &BTreeMap<String, usize> {
        &self.clients
    }

    /// The Shakespeare client a session trains as.
    pub fn client_of(&self, session: u64) -> Option<&str> {
        self.sessions.get(session).map(|s| s.client_id.as_str())
    }

    /// Connected sessions that may be selected, as a round's candidates.
    pub fn candidates(&self) -> Vec<folio_fed::Candidate> {
        self.sessions
            .connected()
            .filter(|s| self.selectable(s.session))
            .map(|s| self.candidate(s))
            .collect()
    }
}
