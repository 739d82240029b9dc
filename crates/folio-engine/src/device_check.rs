//! Device checks: with them on, a session's device answers a known-answer probe
//! when it joins (and when its backend changes), and only a device whose answer
//! checks out may be selected. The host computes the reference and the verdict;
//! the engine keeps who is pending, passed or failed.

use std::time::Instant;

use folio_proto::{ErrorCode, Probe, ServerMessage};

use crate::Engine;
use crate::error::EngineError;
use crate::roles::{HoldsSessions, Role};
use crate::sessions::DeviceCheck;

impl<R: Role> Engine<R> {
    /// Whether `session` may be selected: with device checks on, only once its
    /// device passed.
    pub(crate) fn selectable(&self, session: u64) -> bool {
        self.sessions
            .get(session)
            .is_some_and(|s| !self.config.check_devices || s.check == DeviceCheck::Passed)
    }

    /// Whether `session` may be drawn for a round or a task at `now`:
    /// selectable, and not benched for what it broke before.
    pub(crate) fn drawable(&self, session: u64, now: Instant) -> bool {
        self.selectable(session)
            && self
                .sessions
                .get(session)
                .is_some_and(|s| s.strikes.benched_until(now).is_none())
    }
}

impl<R: HoldsSessions> Engine<R> {
    /// Sends `session` a probe if its device is not checked yet.
    pub(crate) fn check_device(&mut self, session: u64) {
        if !self.config.check_devices {
            return;
        }
        let checked = self
            .sessions
            .get(session)
            .is_none_or(|info| info.checked_device == Some(info.device()));
        if checked {
            return;
        }
        let id = self.draw_u64();
        let info = self.sessions.get_mut(session).expect("checked above");
        info.check = DeviceCheck::Pending;
        info.probe = Some(id);
        info.probe_answered = false;
        info.checked_device = None;
        self.send(vec![session], ServerMessage::Probe(Probe::with_id(id)));
    }

    /// The probe `session` was sent, if `id` names it and it was not answered
    /// yet: its answer is taken for checking, once (a resent answer would start
    /// another reference computation on the host).
    pub fn take_probe_answer(&mut self, session: u64, id: u64) -> Result<Probe, EngineError> {
        match self.sessions.get_mut(session) {
            Some(info) if info.probe == Some(id) && !info.probe_answered => {
                info.probe_answered = true;
                Ok(Probe::with_id(id))
            }
            Some(info) if info.probe == Some(id) => Err(EngineError::new(
                ErrorCode::UnknownMessage,
                format!("device check {id} was answered already; its verdict is coming"),
            )),
            _ => Err(EngineError::new(
                ErrorCode::UnknownMessage,
                format!("no device check {id} is awaited from this client"),
            )),
        }
    }

    /// The verdict on `session`'s answer to probe `id`: a device that passed may
    /// be selected; one that failed is told why.
    pub fn device_checked(
        &mut self,
        session: u64,
        id: u64,
        verdict: Result<(), String>,
        now: Instant,
    ) {
        let Some(info) = self
            .sessions
            .get_mut(session)
            .filter(|i| i.probe == Some(id))
        else {
            return;
        };
        info.probe = None;
        info.probe_answered = false;
        match verdict {
            Ok(()) => {
                info.check = DeviceCheck::Passed;
                info.checked_device = Some(info.device());
            }
            Err(why) => {
                tracing::warn!(
                    session,
                    device = info.device(),
                    "device check failed: {why}"
                );
                info.check = DeviceCheck::Failed(why.clone());
                self.count_error(ErrorCode::DeviceCheckFailed);
                self.send(
                    vec![session],
                    EngineError::new(ErrorCode::DeviceCheckFailed, why),
                );
            }
        }
        self.advance(now);
    }
}
