//! Asynchronous rounds (FedBuff, Nguyen et al. 2022): no client waits for
//! another. Up to `clients_per_round` sessions train at once, each on the global
//! model it was handed; an update joins a buffer, scaled by its staleness, and
//! the global model steps once the buffer holds `buffer` updates. The trust
//! rules of synchronous rounds hold per update: examples bounded by the task's
//! plan, the strategy's clipping, one update per session per model, and none
//! staler than `max_staleness`.
//!
//! A device that takes a task and says nothing holds no slot for long: its
//! slot is given to another device once it took `SLACK` times as long as that
//! device usually takes (a device new to tasks: the population's median task),
//! so more devices can be in flight than `clients_per_round`; its task still
//! counts until the deadline. Both count the time the session has held tasks
//! since its last update (a task called off as stale hands its time on to the
//! next), so a silent device cannot start afresh on each new model.
//! A task that reaches its deadline is a strike: the session gets no task for
//! a growing time.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use folio_fed::strategy::OpenUpdates;
use folio_proto::ErrorCode;

use crate::engine::{Closing, Phase};
use crate::error::EngineError;
use crate::jobs::Collected;
use crate::roles::Role;
use crate::rounds::refused_update;
use crate::sessions::SessionInfo;
use crate::settings::AsyncRounds;
use crate::{DecodedUpdate, Engine};

/// A session's task: train the model of round `round` (the global model after
/// round `round − 1`) by its plan.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Task {
    pub round: u64,
    /// The most examples its update may claim.
    pub allowed: u64,
    /// Since when the session owes an update: this task's hand-out, less the
    /// time it held tasks that were called off as stale since its last update.
    pub owed_since: Instant,
    pub deadline: Instant,
    /// When its slot goes to another device if no update came.
    pub patience: Instant,
}

impl Task {
    /// Whether it still holds one of the `clients_per_round` slots at `now`.
    pub fn holds_slot(&self, now: Instant) -> bool {
        now < self.patience
    }
}

/// A task's slot is handed on after this many times the device's usual time.
pub(crate) const SLACK: u32 = 3;
/// ...and never sooner than this.
pub(crate) const MIN_PATIENCE: Duration = Duration::from_secs(1);
/// One slot in this many (at least one) is open to devices new to tasks
/// whatever the proven ones want.
const PROBATION_SHARE: usize = 4;
/// Tasks' times kept for the population's median.
const RECENT_TASKS: usize = 64;

/// The updates waiting for the next step of the global model.
pub(crate) struct Buffer {
    pub updates: OpenUpdates,
    pub count: usize,
    pub loss_sum: f64,
    pub accuracy_sum: f64,
    pub examples: u64,
    pub staleness_sum: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub started: Instant,
}

impl Buffer {
    pub fn new(updates: OpenUpdates, now: Instant) -> Self {
        Self {
            updates,
            count: 0,
            loss_sum: 0.0,
            accuracy_sum: 0.0,
            examples: 0,
            staleness_sum: 0,
            bytes_up: 0,
            bytes_down: 0,
            started: now,
        }
    }
}

pub(crate) struct Buffered {
    pub settings: AsyncRounds,
    /// Sessions training now.
    pub tasks: BTreeMap<u64, Task>,
    /// Sessions whose task for the current model passed its deadline: not handed
    /// that model again.
    pub timed_out: BTreeSet<u64>,
    /// Draws of sessions made for the current model (each draw is seeded apart).
    pub draws: u32,
    pub buffer: Buffer,
    /// Full buffers waiting for the step before them to be committed.
    pub full: VecDeque<Buffer>,
    /// How long the latest tasks took, from handed out to update in.
    pub recent: VecDeque<Duration>,
    /// Sessions whose task was called off as stale: how long each held tasks
    /// with no update (its next task goes on from there).
    pub owing: BTreeMap<u64, Duration>,
}

impl Buffered {
    pub fn new(settings: AsyncRounds, updates: OpenUpdates, now: Instant) -> Self {
        Self {
            settings,
            tasks: BTreeMap::new(),
            timed_out: BTreeSet::new(),
            draws: 0,
            buffer: Buffer::new(updates, now),
            full: VecDeque::new(),
            recent: VecDeque::new(),
            owing: BTreeMap::new(),
        }
    }

    /// How long a device that usually takes `turnaround` keeps its slot:
    /// `SLACK` times that; a device new to tasks (`None`) as long as the
    /// population's median task, or an eighth of the deadline before any task
    /// came back; within [`MIN_PATIENCE`, `deadline`]. A slower task goes on
    /// outside the slot.
    pub fn patience(&self, turnaround: Option<Duration>, deadline: Duration) -> Duration {
        let patience = match turnaround {
            Some(usual) => usual * SLACK,
            None => {
                let mut recent: Vec<Duration> = self.recent.iter().copied().collect();
                recent.sort_unstable();
                recent
                    .get(recent.len() / 2)
                    .copied()
                    .unwrap_or(deadline / 8)
            }
        };
        patience.max(MIN_PATIENCE).min(deadline)
    }

    /// A task came back after `took`.
    pub fn finished(&mut self, took: Duration) {
        if self.recent.len() == RECENT_TASKS {
            self.recent.pop_front();
        }
        self.recent.push_back(took);
    }

    /// Tasks holding a slot at `now`.
    pub fn in_flight(&self, now: Instant) -> usize {
        self.tasks.values().filter(|t| t.holds_slot(now)).count()
    }

    /// The steps the global model moved since round `round`'s model, when the
    /// next round is `next`.
    pub fn staleness(next: u64, round: u64) -> u64 {
        next.saturating_sub(round)
    }

    /// The earliest task deadline, or slot handed on, after `now`.
    pub fn next_deadline(&self, now: Instant) -> Option<Instant> {
        self.tasks
            .values()
            .flat_map(|t| [t.deadline, t.patience])
            .filter(|&at| at > now)
            .min()
    }

    /// Removes the tasks past their deadline at `now`, and returns their sessions.
    pub fn expire(&mut self, now: Instant) -> Vec<u64> {
        let late: Vec<u64> = self
            .tasks
            .iter()
            .filter(|(_, t)| t.deadline <= now)
            .map(|(&s, _)| s)
            .collect();
        for s in &late {
            self.tasks.remove(s);
            self.owing.remove(s);
            self.timed_out.insert(*s);
        }
        late
    }

    /// Removes the tasks whose model is now more than `max_staleness` steps
    /// behind (the next round being `next`), and returns their sessions.
    pub fn drop_stale(&mut self, next: u64, now: Instant) -> Vec<u64> {
        let max = self.settings.max_staleness;
        let stale: Vec<u64> = self
            .tasks
            .iter()
            .filter(|(_, t)| Self::staleness(next, t.round) > max)
            .map(|(&s, _)| s)
            .collect();
        for s in &stale {
            let task = self.tasks.remove(s).expect("listed above");
            let held = now.saturating_duration_since(task.owed_since);
            self.owing.insert(*s, held);
        }
        stale
    }
}

impl<R: Role> Engine<R> {
    /// The round the buffer being filled will make: past the commit in flight
    /// (or the last commit) and the full buffers waiting behind it.
    fn buffer_round(&self) -> u64 {
        let last = match &self.phase {
            Phase::Aggregating(closing) | Phase::Evaluating(closing, _) => closing.round,
            Phase::Persisting(_, record) => record.round,
            _ => self.completed_rounds(),
        };
        let waiting = self.buffered.as_ref().map_or(0, |b| b.full.len()) as u64;
        last + 1 + waiting
    }

    /// Asynchronous rounds move along: the buffer steps the model once full
    /// (and no step is in flight), and free sessions get the latest model.
    pub(crate) fn advance_async(&mut self, now: Instant) {
        if matches!(self.phase, Phase::Idle) {
            let done = self
                .config
                .max_rounds
                .is_some_and(|max| self.completed_rounds() >= max);
            let refused = self.strategy.admits_next_round(&self.global.state).err();
            if done || refused.is_some() {
                if let Some(why) = refused {
                    tracing::warn!("{why}");
                    self.stopped = Some(why);
                }
                self.phase = Phase::Finished;
                let training: Vec<u64> = self.buffered_mut().tasks.keys().copied().collect();
                self.buffered_mut().tasks.clear();
                self.send(
                    training,
                    EngineError::new(
                        ErrorCode::RoundClosed,
                        "training finished; your update will be ignored",
                    ),
                );
                return;
            }
            if let Some(full) = self.buffered_mut().full.pop_front() {
                self.close_buffer(full);
            }
        }
        if !matches!(self.phase, Phase::Finished) {
            self.assign_tasks(now);
        }
    }

    fn buffered_mut(&mut self) -> &mut Buffered {
        self.buffered.as_mut().expect("asynchronous rounds")
    }

    /// Whether `session`'s update for `round` may join the buffer: the task it
    /// was given, and not too stale. Returns its task and staleness.
    pub(crate) fn expected_async(
        &self,
        session: u64,
        round: u64,
    ) -> Result<(Task, u64), EngineError> {
        let buffered = self.buffered.as_ref().expect("asynchronous rounds");
        if matches!(self.phase, Phase::Finished) {
            return Err(EngineError::new(
                ErrorCode::RoundClosed,
                "training finished; the update is ignored",
            ));
        }
        let staleness = Buffered::staleness(self.buffer_round(), round);
        let max = buffered.settings.max_staleness;
        if staleness > max {
            return Err(EngineError::new(
                ErrorCode::Stale,
                format!(
                    "the update trained a model {staleness} steps behind the global one (at most {max}); the latest model comes to you"
                ),
            ));
        }
        match buffered.tasks.get(&session) {
            Some(task) if task.round == round => Ok((*task, staleness)),
            _ => {
                let reported = self
                    .sessions
                    .get(session)
                    .is_some_and(|s| s.reported_rounds.back() == Some(&round));
                Err(if reported {
                    EngineError::new(
                        ErrorCode::DuplicateUpdate,
                        format!("a second update from the model of round {round}"),
                    )
                } else {
                    EngineError::new(
                        ErrorCode::NotSelected,
                        format!("this client has no task for round {round}"),
                    )
                })
            }
        }
    }

    /// Folds an update into the buffer, scaled by its staleness; a refused one
    /// changes nothing.
    pub(crate) fn buffer_update(
        &mut self,
        session: u64,
        update: DecodedUpdate,
        now: Instant,
    ) -> Result<(), EngineError> {
        let (task, staleness) = self.expected_async(session, update.round)?;
        let strategy = self.strategy.clone();
        let buffered = self.buffered_mut();
        strategy
            .accept_stale(
                &mut buffered.buffer.updates,
                &update.delta,
                update.examples,
                task.allowed,
                AsyncRounds::discount(staleness),
            )
            .map_err(refused_update)?;
        buffered.tasks.remove(&session);
        buffered.owing.remove(&session);
        let took = now.saturating_duration_since(task.owed_since);
        buffered.finished(took);
        // Bounded by the task's examples, so none of these sums can overflow.
        let buffer = &mut buffered.buffer;
        let examples = update.examples as f64;
        buffer.count += 1;
        buffer.staleness_sum += staleness;
        buffer.loss_sum += f64::from(update.train_loss) * examples;
        buffer.accuracy_sum += f64::from(update.train_accuracy) * examples;
        buffer.examples += update.examples;
        // Exactly `buffer` updates a step: a full buffer waits its turn.
        if buffer.count >= buffered.settings.buffer {
            let fresh = strategy
                .open_round(&self.global.state, self.config.num_params())
                .expect("the strategy opens rounds on its own state");
            let buffered = self.buffered.as_mut().expect("asynchronous rounds");
            let full = std::mem::replace(&mut buffered.buffer, Buffer::new(fresh, now));
            buffered.full.push_back(full);
        }
        if let Some(info) = self.sessions.get_mut(session) {
            info.reported(update.client_round());
            info.strikes.clear();
            // Smoothed: one slow task moves it halfway.
            info.turnaround = Some(info.turnaround.map_or(took, |usual| (usual + took) / 2));
        }
        self.advance(now);
        Ok(())
    }

    /// A new global model: tasks now too stale are called off (their sessions
    /// get the new model), and every session may train it once.
    pub(crate) fn next_model_for_tasks(&mut self) {
        let next = self.completed_rounds() + 1;
        let Some(buffered) = &mut self.buffered else {
            return;
        };
        buffered.timed_out.clear();
        buffered.draws = 0;
        let stale = buffered.drop_stale(next, self.clock);
        let max = buffered.settings.max_staleness;
        self.send(
            stale,
            EngineError::new(
                ErrorCode::Stale,
                format!(
                    "the global model moved more than {max} steps past your task's; your update would be refused, and the latest model comes to you"
                ),
            ),
        );
    }

    /// A full buffer steps the global model: its updates go out to be aggregated.
    fn close_buffer(&mut self, buffer: Buffer) {
        let round = self.completed_rounds() + 1;
        let examples = buffer.examples.max(1) as f64;
        let closing = Closing {
            round,
            clients: buffer.count,
            train_loss: Some(buffer.loss_sum / examples),
            train_accuracy: Some(buffer.accuracy_sum / examples),
            examples: buffer.examples,
            bytes_up: buffer.bytes_up,
            bytes_down: buffer.bytes_down,
            started: buffer.started,
            secure: false,
            staleness: Some(buffer.staleness_sum as f64 / buffer.count.max(1) as f64),
            federated: None,
            contributors: Vec::new(),
        };
        self.aggregate(closing, Collected::Updates(buffer.updates));
    }

    /// Hands the global model to free sessions, up to `clients_per_round`
    /// training at once: drawn evenly across groups, never a session that
    /// reported for this model or let its task for it lapse.
    fn assign_tasks(&mut self, now: Instant) {
        if self.history.is_empty() {
            return;
        }
        let round = self.completed_rounds() + 1;
        let buffered = self.buffered.as_ref().expect("asynchronous rounds");
        let strategy = *self.strategy.config();
        let deadline = self.config.rounds.deadline;
        let free_sessions = self.sessions.connected().filter(|s| {
            self.drawable(s.session, now)
                && !buffered.tasks.contains_key(&s.session)
                && !buffered.timed_out.contains(&s.session)
                && s.reported_rounds.back() != Some(&round)
        });
        // A session whose stale task was called off after it held tasks past
        // its patience gets the latest model at once: that task holds no slot.
        let (mut picked, waiting): (Vec<u64>, Vec<&SessionInfo>) = {
            let (owed, waiting): (Vec<_>, Vec<_>) = free_sessions.partition(|s| {
                buffered
                    .owing
                    .get(&s.session)
                    .is_some_and(|&held| held >= buffered.patience(s.turnaround, deadline))
            });
            (owed.into_iter().map(|s| s.session).collect(), waiting)
        };
        let free = strategy
            .clients_per_round
            .saturating_sub(buffered.in_flight(now));
        // Devices that finished a task before are drawn first; those new to
        // tasks (or back from a lapse) get what that leaves, and a probation
        // share of the slots whatever it leaves, so newcomers are never shut
        // out and silent ones hold no more than that share.
        let (proven, unproven): (Vec<_>, Vec<_>) =
            waiting.into_iter().partition(|s| s.turnaround.is_some());
        let on_probation = buffered
            .tasks
            .iter()
            .filter(|&(&s, t)| {
                t.holds_slot(now) && self.sessions.get(s).is_none_or(|s| s.turnaround.is_none())
            })
            .count();
        let probation = (strategy.clients_per_round / PROBATION_SHARE).max(1);
        let reserved = probation
            .saturating_sub(on_probation)
            .min(free)
            .min(unproven.len());
        let from_proven = (free - reserved).min(proven.len());
        let from_unproven = (free - from_proven).min(unproven.len());
        let seed = self.strategy.seed();
        let draws = buffered.draws;
        let draw = |group: Vec<&SessionInfo>, count: usize, attempt: u32| -> Vec<u64> {
            if count == 0 {
                return Vec::new();
            }
            let candidates: Vec<folio_fed::Candidate> =
                group.into_iter().map(|s| self.candidate(s)).collect();
            let draw = folio_fed::StrategyConfig {
                clients_per_round: count,
                min_clients: 1,
                quorum: 1,
                ..strategy
            };
            folio_fed::strategy::select(&draw, seed, round, attempt, &candidates, &BTreeSet::new())
                .unwrap_or_default()
        };
        picked.extend(draw(proven, from_proven, 2 * draws));
        picked.extend(draw(unproven, from_unproven, 2 * draws + 1));
        if picked.is_empty() {
            return;
        }
        let start = self.round_start(round);
        let plan = self.config.rounds.plan(start.seed);
        let tasks: Vec<(u64, Task)> = picked
            .iter()
            .map(|&session| {
                let info = self.sessions.get(session).expect("a connected session");
                let allowed = plan.max_examples(self.text_size(&info.client_id));
                let patience = buffered.patience(info.turnaround, deadline);
                let held = buffered.owing.get(&session).copied().unwrap_or_default();
                let owed_since = now.checked_sub(held).unwrap_or(now);
                (
                    session,
                    Task {
                        round,
                        allowed,
                        owed_since,
                        deadline: owed_since + deadline,
                        patience: owed_since + patience,
                    },
                )
            })
            .collect();
        let buffered = self.buffered_mut();
        buffered.draws += 1;
        buffered.tasks.extend(tasks);
        self.hand_out(&start, picked);
    }
}
