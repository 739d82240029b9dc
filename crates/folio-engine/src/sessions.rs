//! Sessions: the devices, each named (the Shakespeare client it trains as in
//! the simulation, `device-N` where devices bring their own text), and how a
//! dropped connection gets its session back.
//!
//! Rules: a resume token is `<session>.<128 random bits from the OS, hex>`,
//! compared in constant time and good for that one session; a Shakespeare client
//! held by a connected session is never handed to another; a session that has been
//! disconnected for the TTL is forgotten; the table never holds more than
//! `max_sessions` sessions: when it is full, a new session takes the place of the
//! oldest disconnected session of the group holding the most, so a flood of
//! sessions that come and go cannot shut out the rest.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use serde::Serialize;

/// Rounds listed per session in the status.
pub const REPORTED_ROUNDS_KEPT: usize = 32;

/// A client's latest round.
#[derive(Debug, Clone, Serialize)]
pub struct ClientRound {
    pub round: u64,
    pub examples: u64,
    pub train_loss: f32,
    pub train_accuracy: f32,
    pub train_seconds: f32,
}

#[derive(Debug, Clone, Serialize)]
pub struct SessionInfo {
    pub session: u64,
    pub client_id: String,
    pub kind: &'static str,
    pub backend: String,
    pub adapter: Option<String>,
    pub connected: bool,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub rounds: u64,
    pub last: Option<ClientRound>,
    /// The latest rounds this client reported in (at most 32).
    pub reported_rounds: VecDeque<u64>,
    /// Where the check of its device's arithmetic stands (device checks on).
    pub check: DeviceCheck,
    /// The probe it was sent, until its verdict is in.
    #[serde(skip)]
    pub probe: Option<u64>,
    /// Its answer to that probe is being checked: another is refused.
    #[serde(skip)]
    pub probe_answered: bool,
    /// The backend and adapter its check passed on: another one is checked again.
    #[serde(skip)]
    pub checked_device: Option<String>,
    /// The fingerprint of the global model this client holds: the last one sent
    /// to it, or the one it said it kept when it joined.
    #[serde(skip)]
    pub held_model: Option<u64>,
    /// The group it last connected from (its network, for a server).
    #[serde(skip)]
    pub group: u64,
    /// What it broke (tasks let lapse, secure rounds spoiled): it sits out.
    #[serde(skip)]
    pub strikes: Strikes,
    /// How long its asynchronous tasks take, smoothed over the recent ones.
    #[serde(skip)]
    pub turnaround: Option<Duration>,
    /// Secure sums refused in a row that held its input, and until when that
    /// keeps it from being drawn while others can be.
    #[serde(skip)]
    pub suspicion: Strikes,
    #[serde(skip)]
    secret: String,
    #[serde(skip)]
    disconnected_at: Option<Instant>,
}

/// The first strike benches a session for this long; each next one for twice
/// as long as the one before, up to 2¹⁰ times as long (about 3 hours).
pub const BENCH: Duration = Duration::from_secs(10);

/// Strikes against a session, and until when it is not selected.
#[derive(Debug, Clone, Copy, Default)]
pub struct Strikes {
    count: u32,
    until: Option<Instant>,
}

impl Strikes {
    /// One more strike at `now`: benched for twice as long as the last time.
    /// Returns how long.
    pub fn add(&mut self, now: Instant) -> Duration {
        self.count = self.count.saturating_add(1);
        let bench = BENCH * 2u32.pow((self.count - 1).min(10));
        self.until = Some(now + bench);
        bench
    }

    /// It did its part: the slate is clean.
    pub fn clear(&mut self) {
        *self = Self::default();
    }

    pub fn count(&self) -> u32 {
        self.count
    }

    /// When its bench ends, if it is on one at `now`.
    pub fn benched_until(&self, now: Instant) -> Option<Instant> {
        self.until.filter(|&until| now < until)
    }
}

/// A device's check: a known-answer probe it must get right before it is
/// selected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceCheck {
    /// Device checks are off, or it has not been probed.
    Unchecked,
    /// Probed, the answer not in (or not checked) yet.
    Pending,
    Passed,
    /// Its answer was wrong, and why.
    Failed(String),
}

impl SessionInfo {
    /// Its device as a check names it: the backend and the adapter.
    pub fn device(&self) -> String {
        match &self.adapter {
            Some(adapter) => format!("{} ({adapter})", self.backend),
            None => self.backend.clone(),
        }
    }

    pub fn reported(&mut self, round: ClientRound) {
        self.contributed(round.round);
        self.last = Some(round);
    }

    /// It took part in `round` with what the server does not see on its own
    /// (a secure round's masked input): counted, its metrics unknown.
    pub fn contributed(&mut self, round: u64) {
        self.rounds += 1;
        if self.reported_rounds.len() == REPORTED_ROUNDS_KEPT {
            self.reported_rounds.pop_front();
        }
        self.reported_rounds.push_back(round);
        self.last = None;
    }

    pub fn token(&self) -> String {
        format!("{}.{}", self.session, self.secret)
    }
}

/// Why a session could not be had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionError {
    /// The token names a session that is connected right now.
    InUse,
    /// The Shakespeare client is held by a connected session.
    ClientTaken(String),
    NoFreeClient,
    Full,
}

#[derive(Debug, Default)]
pub struct Sessions {
    by_id: BTreeMap<u64, SessionInfo>,
    next: u64,
}

/// Equal strings, in time that depends on their length only.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Sessions {
    pub fn new() -> Self {
        Self {
            by_id: BTreeMap::new(),
            next: 1,
        }
    }

    pub fn get(&self, session: u64) -> Option<&SessionInfo> {
        self.by_id.get(&session)
    }

    pub fn get_mut(&mut self, session: u64) -> Option<&mut SessionInfo> {
        self.by_id.get_mut(&session)
    }

    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &SessionInfo> {
        self.by_id.values()
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn connected(&self) -> impl Iterator<Item = &SessionInfo> {
        self.by_id.values().filter(|s| s.connected)
    }

    fn holder(&self, client_id: &str) -> Option<&SessionInfo> {
        self.by_id.values().find(|s| s.client_id == client_id)
    }

    /// The session `token` names, if the token is right.
    pub fn owner_of(&self, token: &str) -> Option<u64> {
        let (id, secret) = token.split_once('.')?;
        let info = id.parse().ok().and_then(|id: u64| self.by_id.get(&id))?;
        constant_time_eq(secret.as_bytes(), info.secret.as_bytes()).then_some(info.session)
    }

    /// The disconnected session `token` names, if the token is right.
    pub fn find_resumable(&self, token: &str) -> Result<Option<u64>, SessionError> {
        match self.owner_of(token).and_then(|id| self.by_id.get(&id)) {
            Some(info) if info.connected => Err(SessionError::InUse),
            Some(info) => Ok(Some(info.session)),
            None => Ok(None),
        }
    }

    /// A Shakespeare client for a new session: the one wanted (unless a connected
    /// session holds it), else one no session holds, else one whose session left.
    pub fn pick_client(
        &self,
        wanted: Option<&str>,
        pool: &[String],
    ) -> Result<String, SessionError> {
        if let Some(wanted) = wanted {
            return match self.holder(wanted) {
                Some(holder) if holder.connected => Err(SessionError::ClientTaken(wanted.into())),
                _ => Ok(wanted.to_owned()),
            };
        }
        let held: BTreeSet<&str> = self.by_id.values().map(|s| s.client_id.as_str()).collect();
        let connected: BTreeSet<&str> = self.connected().map(|s| s.client_id.as_str()).collect();
        pool.iter()
            .find(|id| !held.contains(id.as_str()))
            .or_else(|| pool.iter().find(|id| !connected.contains(id.as_str())))
            .cloned()
            .ok_or(SessionError::NoFreeClient)
    }

    /// A new session for the Shakespeare client `client_id` (`None`: a device
    /// with text of its own, named `device-N` after its session), resumed with
    /// `secret` (drawn by the engine). A disconnected session holding that client
    /// is revoked: its token stops working.
    #[allow(clippy::too_many_arguments)]
    pub fn create(
        &mut self,
        client_id: Option<String>,
        kind: &'static str,
        group: u64,
        max_sessions: usize,
        now: Instant,
        ttl: Duration,
        secret: u128,
    ) -> Result<u64, SessionError> {
        if let Some(old) = client_id.as_deref().and_then(|id| self.holder(id)) {
            debug_assert!(!old.connected, "pick_client checked");
            let old = old.session;
            self.by_id.remove(&old);
        }
        if self.by_id.len() >= max_sessions {
            self.expire(now, ttl);
        }
        if self.by_id.len() >= max_sessions {
            let oldest = self.oldest_of_largest_group().ok_or(SessionError::Full)?;
            self.by_id.remove(&oldest);
        }
        let session = self.next;
        self.next += 1;
        self.by_id.insert(
            session,
            SessionInfo {
                session,
                client_id: client_id.unwrap_or_else(|| format!("device-{session}")),
                kind,
                backend: String::new(),
                adapter: None,
                connected: false,
                bytes_up: 0,
                bytes_down: 0,
                rounds: 0,
                last: None,
                reported_rounds: VecDeque::new(),
                check: DeviceCheck::Unchecked,
                probe: None,
                probe_answered: false,
                checked_device: None,
                held_model: None,
                group,
                strikes: Strikes::default(),
                turnaround: None,
                suspicion: Strikes::default(),
                secret: format!("{secret:032x}"),
                disconnected_at: Some(now),
            },
        );
        Ok(session)
    }

    pub fn connect(&mut self, session: u64) {
        if let Some(info) = self.by_id.get_mut(&session) {
            info.connected = true;
            info.disconnected_at = None;
        }
    }

    pub fn disconnect(&mut self, session: u64, now: Instant) {
        if let Some(info) = self.by_id.get_mut(&session) {
            info.connected = false;
            info.disconnected_at = Some(now);
        }
    }

    /// Forgets sessions disconnected for longer than `ttl`; returns how many.
    pub fn expire(&mut self, now: Instant, ttl: Duration) -> usize {
        let before = self.by_id.len();
        self.by_id.retain(|_, s| {
            s.disconnected_at
                .is_none_or(|at| now.saturating_duration_since(at) < ttl)
        });
        before - self.by_id.len()
    }

    /// When the next bench after `now` ends, if any session is on one.
    pub fn next_bench_end(&self, now: Instant) -> Option<Instant> {
        self.by_id
            .values()
            .filter_map(|s| s.strikes.benched_until(now))
            .min()
    }

    /// When the next disconnected session expires, if any is waiting.
    pub fn next_expiry(&self, ttl: Duration) -> Option<Instant> {
        self.by_id
            .values()
            .filter_map(|s| s.disconnected_at)
            .min()
            .map(|at| at + ttl)
    }

    /// The disconnected session that left first, of the group keeping the most
    /// sessions (connected or not); `None` when every session is connected.
    fn oldest_of_largest_group(&self) -> Option<u64> {
        let mut kept: BTreeMap<u64, usize> = BTreeMap::new();
        for info in self.by_id.values() {
            *kept.entry(info.group).or_default() += 1;
        }
        let mut groups: Vec<(usize, u64)> = kept.into_iter().map(|(g, n)| (n, g)).collect();
        groups.sort_unstable_by(|a, b| b.cmp(a));
        groups.into_iter().find_map(|(_, group)| {
            self.by_id
                .values()
                .filter(|s| s.group == group)
                .filter_map(|s| Some((s.disconnected_at?, s.session)))
                .min()
                .map(|(_, session)| session)
        })
    }

    /// Ends a session now (an operator's revocation).
    pub fn revoke(&mut self, session: u64) -> Option<SessionInfo> {
        self.by_id.remove(&session)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(60);

    fn pool() -> Vec<String> {
        ["A", "B"].map(String::from).to_vec()
    }

    #[test]
    fn tokens_are_random_and_bound_to_their_session() {
        let mut sessions = Sessions::new();
        let now = Instant::now();
        let a = sessions
            .create(
                Some("A".into()),
                "native",
                0,
                10,
                now,
                TTL,
                11400714819323198485,
            )
            .unwrap();
        let b = sessions
            .create(
                Some("B".into()),
                "native",
                0,
                10,
                now,
                TTL,
                22801429638646396970,
            )
            .unwrap();
        let (ta, tb) = (
            sessions.get(a).unwrap().token(),
            sessions.get(b).unwrap().token(),
        );
        assert_eq!(ta.len(), "1.".len() + 32);
        assert_ne!(ta[2..], tb[2..]);
        assert_eq!(sessions.find_resumable(&ta), Ok(Some(a)));
        // Another session's secret, a forged one, garbage: no session.
        let swapped = format!("{a}.{}", &tb[2..]);
        for forged in [swapped.as_str(), "0000000000000001-1", "1.", "", "x.y"] {
            assert_eq!(sessions.find_resumable(forged), Ok(None), "{forged}");
        }
        sessions.connect(a);
        assert_eq!(sessions.find_resumable(&ta), Err(SessionError::InUse));
    }

    #[test]
    fn a_connected_client_is_never_handed_out_twice() {
        let mut sessions = Sessions::new();
        let now = Instant::now();
        let a = sessions
            .create(
                Some("A".into()),
                "browser",
                0,
                10,
                now,
                TTL,
                34202144457969595455,
            )
            .unwrap();
        sessions.connect(a);
        assert_eq!(
            sessions.pick_client(Some("A"), &pool()),
            Err(SessionError::ClientTaken("A".into()))
        );
        assert_eq!(sessions.pick_client(None, &pool()), Ok("B".into()));
        let b = sessions
            .create(
                Some("B".into()),
                "browser",
                0,
                10,
                now,
                TTL,
                45602859277292793940,
            )
            .unwrap();
        sessions.connect(b);
        assert_eq!(
            sessions.pick_client(None, &pool()),
            Err(SessionError::NoFreeClient)
        );
        // A leaves; a new session may take A, which revokes A's old token.
        let token = sessions.get(a).unwrap().token();
        sessions.disconnect(a, now);
        assert_eq!(sessions.pick_client(None, &pool()), Ok("A".into()));
        sessions
            .create(
                Some("A".into()),
                "browser",
                0,
                10,
                now,
                TTL,
                57003574096615992425,
            )
            .unwrap();
        assert_eq!(sessions.find_resumable(&token), Ok(None));
    }

    #[test]
    fn disconnected_sessions_expire_and_the_table_is_bounded() {
        let mut sessions = Sessions::new();
        let now = Instant::now();
        let a = sessions
            .create(
                Some("A".into()),
                "native",
                0,
                2,
                now,
                TTL,
                68404288915939190910,
            )
            .unwrap();
        sessions.connect(a);
        sessions
            .create(
                Some("B".into()),
                "native",
                0,
                2,
                now,
                TTL,
                79805003735262389395,
            )
            .unwrap();
        assert_eq!(sessions.expire(now + TTL, TTL), 1);
        assert!(sessions.get(a).is_some(), "connected sessions never expire");
        let c = sessions
            .create(
                Some("C".into()),
                "native",
                0,
                2,
                now + TTL,
                TTL,
                91205718554585587880,
            )
            .unwrap();
        sessions.connect(c);
        assert_eq!(
            sessions.create(
                Some("D".into()),
                "native",
                0,
                2,
                now + TTL,
                TTL,
                102606433373908786365
            ),
            Err(SessionError::Full),
            "every session kept is connected"
        );
    }

    #[test]
    fn a_full_table_forgets_the_largest_groups_oldest_left_session() {
        let mut sessions = Sessions::new();
        let now = Instant::now();
        let later = |s: u64| now + Duration::from_secs(s);
        // One session of group 1 left first; three of group 2 left after it.
        let lone = sessions
            .create(
                Some("L".into()),
                "browser",
                1,
                4,
                now,
                TTL,
                114007148193231984850,
            )
            .unwrap();
        let crowd: Vec<u64> = ["X", "Y", "Z"]
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let s = sessions
                    .create(
                        Some((*id).into()),
                        "native",
                        2,
                        4,
                        later(i as u64 + 1),
                        TTL,
                        125407863012555183335,
                    )
                    .unwrap();
                sessions.disconnect(s, later(i as u64 + 1));
                s
            })
            .collect();
        sessions.disconnect(lone, now);
        let newcomer = sessions.create(
            Some("N".into()),
            "browser",
            3,
            4,
            later(5),
            TTL,
            136808577831878381820,
        );
        assert!(newcomer.is_ok());
        assert!(
            sessions.get(lone).is_some(),
            "the small group keeps its session"
        );
        assert!(sessions.get(crowd[0]).is_none(), "the crowd's oldest goes");
        assert!(sessions.get(crowd[1]).is_some());
    }
}
