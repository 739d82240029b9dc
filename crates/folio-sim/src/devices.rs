//! A population of devices of every speed on a simulated clock: the rounds of
//! `folio simulate --population --devices`, synchronous or asynchronous, with
//! each client's local training really run but timed as its device would take.
//!
//! Each client is given a device: a class (a native client, a tab on the CPU
//! fallback, a tab on a software WebGPU) with the speed measured for it on this
//! project's machines, spread log-normally within the class. A task sent at
//! time t arrives at t + latency + model down + characters trained / speed +
//! delta up. Events are taken in time order: the engine's timeouts, and the
//! arrivals; the clock jumps from one to the next. Local training is run when
//! its arrival is near (a few at a time, in parallel) from the model the task
//! was sent, so the run's results do not depend on the machine it runs on.
//!
//! `clock.jsonl` in the run folder holds, per commit, the simulated time and
//! the client compute spent so far, wasted work included (tasks that arrived
//! too late or too stale, or were called off).

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use folio_data::rng::SplitMix64;
use folio_host::eval::parallel_map;
use folio_model::Preset;
use folio_proto::{ErrorCode, RoundStart, ServerMessage};
use serde::Serialize;

use crate::host::{InProcess, Jobs};

/// A kind of device, with its training speed measured here for each preset
/// (characters a second, batches of 8 × 100).
#[derive(Debug, Clone, Copy)]
pub struct DeviceClass {
    pub name: &'static str,
    /// The share of clients on such a device.
    pub share: f64,
    /// Median speed for `seed`, `small`, `medium`.
    pub chars_per_second: [f64; 3],
}

/// The devices measured on this project's machines (2 cores, no GPU): native
/// flex (`folio bench train`), a tab on the CPU fallback and a tab on WebGPU
/// through SwiftShader, a GPU emulated on the CPU (`browser-bench`; docs/browser.md).
/// `medium` was not measured on SwiftShader: its figure is `seed`'s ratio to
/// native flex (0.017) times native flex's `medium` speed.
pub const DEVICE_MIX: [DeviceClass; 3] = [
    DeviceClass {
        name: "native",
        share: 0.2,
        chars_per_second: [800.0, 35_000.0, 7_000.0],
    },
    DeviceClass {
        name: "tab, CPU fallback",
        share: 0.5,
        chars_per_second: [420.0, 20_000.0, 1_400.0],
    },
    DeviceClass {
        name: "tab, WebGPU (SwiftShader)",
        share: 0.3,
        chars_per_second: [10.0, 150.0, 120.0],
    },
];

/// σ of a device's log-speed around its class's median.
pub const SPEED_SPREAD: f64 = 0.5;

/// The network every device is on: this much latency each way, this many
/// bytes a second.
const LATENCY: Duration = Duration::from_millis(20);
const BYTES_PER_SECOND: f64 = 20e6 / 8.0;

/// Each client's device: its class and speed (characters a second).
#[derive(Debug, Clone)]
pub struct Devices {
    pub speed: BTreeMap<u64, (usize, f64)>,
}

impl Devices {
    /// Draws a device for each session, from `seed`.
    pub fn draw(sessions: &[u64], preset: Preset, seed: u64) -> Self {
        let column = match preset {
            Preset::Seed => 0,
            Preset::Small => 1,
            Preset::Medium => 2,
        };
        let mut rng = SplitMix64::new(seed ^ 0xDE71_CE5E);
        let speed = sessions
            .iter()
            .map(|&session| {
                let pick = rng.next_f64();
                let mut class = DEVICE_MIX.len() - 1;
                let mut acc = 0.0;
                for (i, c) in DEVICE_MIX.iter().enumerate() {
                    acc += c.share;
                    if pick < acc {
                        class = i;
                        break;
                    }
                }
                let median = DEVICE_MIX[class].chars_per_second[column];
                (
                    session,
                    (class, median * (SPEED_SPREAD * normal(&mut rng)).exp()),
                )
            })
            .collect();
        Self { speed }
    }

    /// How long `session`'s device takes for a task: the model down, `chars`
    /// characters trained, `up` bytes back.
    pub fn task_time(&self, session: u64, down: u64, chars: u64, up: u64) -> Duration {
        let (_, speed) = self.speed[&session];
        let network = (down + up) as f64 / BYTES_PER_SECOND;
        2 * LATENCY + Duration::from_secs_f64(network + chars as f64 / speed)
    }
}

/// A standard normal draw (Box–Muller).
fn normal(rng: &mut SplitMix64) -> f64 {
    let u = 1.0 - rng.next_f64();
    let v = rng.next_f64();
    (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
}

/// One line of `clock.jsonl`: where a commit stands in simulated time and
/// client compute.
#[derive(Debug, Clone, Serialize)]
pub struct ClockRecord {
    pub round: u64,
    /// Simulated seconds since the run started.
    pub seconds: f64,
    /// Updates the engine took, and those it refused (too stale, too late).
    pub updates: u64,
    pub refused: u64,
    /// Characters trained by every device so far, and those of work that
    /// counted for nothing (refused, or called off part-way).
    pub chars_trained: u64,
    pub chars_wasted: u64,
}

/// A task on its way: sent at `sent`, due back at `due`.
struct Task {
    session: u64,
    start: RoundStart,
    weights: Arc<Vec<f32>>,
    sent: Duration,
    due: Duration,
    /// Characters it trains (the most its plan allows).
    chars: u64,
    trained: Option<folio_client::LocalResult>,
}

/// The clock and the tasks in flight, ordered by when they come back.
pub struct Clocked<'a> {
    pub host: InProcess,
    texts: &'a BTreeMap<u64, Vec<u32>>,
    devices: Devices,
    base: Instant,
    now: Duration,
    /// By (due, sequence number).
    tasks: BTreeMap<(Duration, u64), Task>,
    sent: u64,
    pub clock: ClockRecord,
    log: std::fs::File,
}

impl<'a> Clocked<'a> {
    /// A run whose clock starts at `base` (the instant the engine was made
    /// at), logging to `clock.jsonl` in `dir`.
    pub fn new(
        host: InProcess,
        texts: &'a BTreeMap<u64, Vec<u32>>,
        devices: Devices,
        base: Instant,
        dir: &std::path::Path,
    ) -> anyhow::Result<Self> {
        let path = dir.join("clock.jsonl");
        let log = std::fs::File::create(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(Self {
            host,
            texts,
            devices,
            base,
            now: Duration::ZERO,
            tasks: BTreeMap::new(),
            sent: 0,
            clock: ClockRecord {
                round: 0,
                seconds: 0.0,
                updates: 0,
                refused: 0,
                chars_trained: 0,
                chars_wasted: 0,
            },
            log,
        })
    }

    fn at(&self) -> Instant {
        self.base + self.now
    }

    /// Runs until the engine has committed its rounds.
    pub fn run(&mut self, jobs: &mut impl Jobs) -> anyhow::Result<()> {
        loop {
            while let Some(action) = self.host.engine.poll_action() {
                let committed = match &action {
                    folio_engine::Action::Committed(record) => Some(record.round),
                    _ => None,
                };
                let at = self.at();
                if let Some((to, message)) = self.host.carry_out(action, jobs, at)? {
                    self.deliver(&to, &message);
                }
                if let Some(round) = committed {
                    self.log_commit(round)?;
                }
            }
            if self.host.engine.is_finished() {
                return Ok(());
            }
            let arrival = self.tasks.keys().next().map(|&(due, _)| due);
            let timeout = self
                .host
                .engine
                .poll_timeout()
                .map(|t| t.saturating_duration_since(self.base));
            match (arrival, timeout) {
                (Some(due), Some(timeout)) if timeout < due => self.time_out(timeout),
                (Some(_), _) => self.arrive()?,
                (None, Some(timeout)) => self.time_out(timeout),
                (None, None) => anyhow::bail!(
                    "nothing is training and nothing is due: too few clients for a round"
                ),
            }
        }
    }

    fn time_out(&mut self, at: Duration) {
        self.now = self.now.max(at);
        let at = self.at();
        self.host.engine.handle_timeout(at);
    }

    /// Hands a message to its devices: a round start becomes a task due when
    /// the device would finish it; an error calls off the device's task.
    fn deliver(&mut self, to: &[u64], message: &ServerMessage) {
        match message {
            ServerMessage::RoundStart(start) => {
                let weights = self.host.global(start);
                let down = if start.weights.is_some() {
                    self.host.model_bytes(start)
                } else {
                    0
                };
                let segments = &self.host.engine.config().segments;
                let up = start.delta_encoding.encoded_len(segments) as u64;
                let plan = self.host.engine.config().rounds.plan(start.seed);
                for &session in to {
                    let chars = plan.max_examples(self.texts[&session].len()) * plan.seq_len as u64;
                    let due = self.now + self.devices.task_time(session, down, chars, up);
                    self.sent += 1;
                    self.tasks.insert(
                        (due, self.sent),
                        Task {
                            session,
                            start: start.clone(),
                            weights: weights.clone(),
                            sent: self.now,
                            due,
                            chars,
                            trained: None,
                        },
                    );
                }
            }
            ServerMessage::Error(error)
                if matches!(error.code, ErrorCode::RoundClosed | ErrorCode::Stale) =>
            {
                for &session in to {
                    self.call_off(session);
                }
            }
            _ => {}
        }
    }

    /// A device stops the task it was told is no longer wanted: the part it
    /// trained is wasted.
    fn call_off(&mut self, session: u64) {
        let Some(key) = self
            .tasks
            .iter()
            .find(|(_, t)| t.session == session)
            .map(|(&k, _)| k)
        else {
            return;
        };
        let task = self.tasks.remove(&key).expect("found above");
        let share = (self.now - task.sent).as_secs_f64() / (task.due - task.sent).as_secs_f64();
        let done = (task.chars as f64 * share.clamp(0.0, 1.0)) as u64;
        self.clock.chars_trained += done;
        self.clock.chars_wasted += done;
    }

    /// The next task comes back: trained (with the next few, in parallel) and
    /// sent to the engine.
    fn arrive(&mut self) -> anyhow::Result<()> {
        let ahead: Vec<(Duration, u64)> = self
            .tasks
            .iter()
            .filter(|(_, t)| t.trained.is_none())
            .take(folio_host::eval::workers())
            .map(|(&k, _)| k)
            .collect();
        let host = &self.host;
        let texts = self.texts;
        let pending: Vec<&Task> = ahead.iter().map(|k| &self.tasks[k]).collect();
        let results = parallel_map(&pending, |task| {
            host.train_from(&task.weights, &task.start, &texts[&task.session])
        });
        for (key, result) in ahead.iter().zip(results) {
            self.tasks.get_mut(key).expect("pending").trained = Some(result?);
        }
        let key = *self.tasks.keys().next().expect("a task is due");
        let task = self.tasks.remove(&key).expect("just seen");
        self.now = self.now.max(task.due);
        let local = task.trained.expect("trained above");
        let chars = local.examples * self.host.engine.config().rounds.seq_len as u64;
        self.clock.chars_trained += chars;
        let at = self.at();
        let metrics = (local.metrics.loss, local.metrics.accuracy, local.seconds);
        match self.host.send(
            task.session,
            &task.start,
            &local.delta,
            local.examples,
            metrics,
            at,
        ) {
            Ok(()) => self.clock.updates += 1,
            Err(_) => {
                self.clock.refused += 1;
                self.clock.chars_wasted += chars;
            }
        }
        Ok(())
    }

    fn log_commit(&mut self, round: u64) -> anyhow::Result<()> {
        self.clock.round = round;
        self.clock.seconds = self.now.as_secs_f64();
        writeln!(self.log, "{}", serde_json::to_string(&self.clock)?)?;
        Ok(())
    }
}
