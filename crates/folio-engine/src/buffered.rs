//! Asynchronous rounds (FedBuff, Nguyen et al. 2022): no client waits for
//! another. Up to `clients_per_round` sessions train at once, each on the global
//! model it was handed; an update joins a buffer, scaled by its staleness, and
//! the global model steps once the buffer holds `buffer` updates. The trust
//! rules of synchronous rounds hold per update: examples bounded by the task's
//! plan, the strategy's clipping, one update per session per model, and none
//! staler than `max_staleness`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Instant;

use folio_fed::strategy::OpenUpdates;
use folio_proto::ErrorCode;

use crate::engine::{Closing, Phase};
use crate::error::EngineError;
use crate::jobs::Collected;
use crate::roles::Role;
use crate::rounds::refused_update;
use crate::settings::AsyncRounds;
use crate::{DecodedUpdate, Engine};

/// A session's task: train the model of round `round` (the global model after
/// round `round − 1`) by its plan.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Task {
    pub round: u64,
    /// The most examples its update may claim.
    pub allowed: u64,
    pub deadline: Instant,
}

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
        }
    }

    /// The steps the global model moved since round `round`'s model, when the
    /// next round is `next`.
    pub fn staleness(next: u64, round: u64) -> u64 {
        next.saturating_sub(round)
    }

    /// The earliest task deadline.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.tasks.values().map(|t| t.deadline).min()
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
            self.timed_out.insert(*s);
        }
        late
    }

    /// Removes the tasks whose model is now more than `max_staleness` steps
    /// behind (the next round being `next`), and returns their sessions.
    pub fn drop_stale(&mut self, next: u64) -> Vec<u64> {
        let max = self.settings.max_staleness;
        let stale: Vec<u64> = self
            .tasks
            .iter()
            .filter(|(_, t)| Self::staleness(next, t.round) > max)
            .map(|(&s, _)| s)
            .collect();
        for s in &stale {
            self.tasks.remove(s);
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
        let stale = buffered.drop_stale(next);
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
        let free = strategy
            .clients_per_round
            .saturating_sub(buffered.tasks.len());
        if free == 0 {
            return;
        }
        let candidates: Vec<folio_fed::Candidate> = self
            .sessions
            .connected()
            .filter(|s| {
                self.selectable(s.session)
                    && !buffered.tasks.contains_key(&s.session)
                    && !buffered.timed_out.contains(&s.session)
                    && s.reported_rounds.back() != Some(&round)
            })
            .map(|s| self.candidate(s))
            .collect();
        if candidates.is_empty() {
            return;
        }
        let draw = folio_fed::StrategyConfig {
            clients_per_round: free.min(candidates.len()),
            min_clients: 1,
            quorum: 1,
            ..strategy
        };
        let seed = self.strategy.seed();
        let picked = folio_fed::strategy::select(
            &draw,
            seed,
            round,
            buffered.draws,
            &candidates,
            &BTreeSet::new(),
        )
        .unwrap_or_default();
        let start = self.round_start(round);
        let plan = self.config.rounds.plan(start.seed);
        let deadline = now + self.config.rounds.deadline;
        let tasks: Vec<(u64, Task)> = picked
            .iter()
            .map(|&session| {
                let client = &self
                    .sessions
                    .get(session)
                    .expect("a connected session")
                    .client_id;
                let allowed = plan.max_examples(self.text_size(client));
                (
                    session,
                    Task {
                        round,
                        allowed,
                        deadline,
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
