//! A federation of every Shakespeare client in one process: the round engine of
//! `folio serve`, its strategy, evaluation and commits, with the clients trained
//! in process by the same local step as a tab or a `folio client`
//! ([`folio_client::train_locally`]). The run folder holds the same state and
//! `metrics.jsonl` as `folio serve`'s. Selection and local shuffles are functions
//! of the seed and the round, so a run stopped at any point resumes exactly where
//! it stopped.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use folio_data::{Corpus, vocab};
use folio_engine::{
    CheckedJoin, Commit, Engine, EngineConfig, Entropy, Evaluation, RoundConfig, RoundRecord,
};
use folio_host::eval::{Evaluator, parallel_map};
use folio_host::{engine_config, starting_weights, state};
use folio_model::Preset;

use crate::devices::{Clocked, Devices};
use crate::host::{InProcess, Jobs, Trained};

/// A round's deadline in process without simulated devices: never reached.
const IN_PROCESS_DEADLINE: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// A population run.
#[derive(Debug, Clone)]
pub struct Population {
    pub rounds: RoundConfig,
    pub preset: Preset,
    /// The starting model; `None`: fresh weights from the seed.
    pub init: Option<PathBuf>,
    pub seed: u64,
    /// Run until this many rounds are committed.
    pub max_rounds: u64,
    pub state_dir: PathBuf,
    /// The data cache holding `shakespeare/`.
    pub data_dir: PathBuf,
    /// Train and evaluate on the corpus's validation view
    /// ([`Corpus::validation_view`]): for tuning, never for the figure reported.
    pub validation: bool,
    /// Give each client a device of a measured speed and run the rounds on a
    /// simulated clock ([`crate::devices`]); asynchronous rounds need it.
    pub devices: bool,
}

/// What a run reports as it goes.
pub enum Progress<'a> {
    /// Before the first round: clients to sample from, and the rounds done.
    Started { clients: usize, completed: u64 },
    /// A round's clients are training.
    Training { clients: usize },
    /// A round (0: the starting model) is committed.
    Committed(&'a RoundRecord),
    /// Training stopped before the last round, and why (a privacy budget spent).
    Stopped(&'a str),
}

/// Runs rounds until `max_rounds` are committed; returns the whole history.
pub fn run(
    sim: &Population,
    mut progress: impl FnMut(Progress),
) -> anyhow::Result<Vec<RoundRecord>> {
    sim.rounds
        .validate()
        .map_err(|why| anyhow::anyhow!("inconsistent round settings: {why}"))?;
    let corpus = Corpus::load(&sim.data_dir.join("shakespeare"))?;
    let corpus = if sim.validation {
        corpus.validation_view()
    } else {
        corpus
    };
    let model = sim.preset.config();
    std::fs::create_dir_all(&sim.state_dir)
        .with_context(|| format!("cannot create {}", sim.state_dir.display()))?;
    check_split(sim)?;
    let evaluator = Evaluator::new(model, &corpus, &sim.rounds, sim.seed)?;
    let start = pollster::block_on(starting_weights(model, sim.init.as_deref(), sim.seed))?;
    // In process every selected client reports, so without simulated devices no
    // round waits on the wall clock: a run suspended (a sleeping laptop, a
    // stopped job) or slower than the deadline must not time its rounds out.
    let rounds = if sim.devices {
        sim.rounds.clone()
    } else {
        RoundConfig {
            deadline: IN_PROCESS_DEADLINE,
            ..sim.rounds.clone()
        }
    };
    let config = EngineConfig {
        max_sessions: corpus.clients.len(),
        session_ttl: Duration::MAX,
        max_rounds: Some(sim.max_rounds),
        ..engine_config(sim.preset, rounds, sim.seed, Entropy::from_seed(sim.seed))
    };
    let start = folio_host::resume_or(&sim.state_dir, config.num_params(), start)?;
    let mut engine: Engine =
        folio_host::build_engine(config, folio_host::corpus_clients(&corpus), start)?;
    let clock_base = Instant::now();
    anyhow::ensure!(
        sim.devices || sim.rounds.asynchronous.is_none(),
        "asynchronous rounds run on simulated devices: add --devices"
    );
    anyhow::ensure!(
        !sim.devices || engine.completed_rounds() == 0,
        "{} holds a run already; a run on simulated devices starts afresh (its clock and tasks in flight are not saved): use an empty --state-dir",
        sim.state_dir.display()
    );
    // Every client with text to train on is connected, as itself, before the
    // first round is drawn.
    let ids: Vec<String> = engine.clients().keys().cloned().collect();
    let sessions = join(&mut engine, &ids)?;
    let (mut texts, mut held_out) = (BTreeMap::new(), BTreeMap::new());
    for (id, session) in ids.iter().zip(sessions) {
        let client = corpus.client(id)?;
        texts.insert(session, vocab::encode(&client.train_text()).0);
        held_out.insert(session, vocab::encode(&client.test_text()).0);
    }
    progress(Progress::Started {
        clients: texts.len(),
        completed: engine.completed_rounds(),
    });
    let mut host = InProcess::new(engine, model).with_held_out(held_out);
    let mut jobs = Disk {
        sim,
        evaluator,
        progress,
    };
    if sim.devices {
        let sessions: Vec<u64> = texts.keys().copied().collect();
        let devices = Devices::draw(&sessions, sim.preset, sim.seed);
        let mut clocked = Clocked::new(host, &texts, devices, clock_base, &sim.state_dir)?;
        clocked.run(&mut jobs)?;
        return Ok(clocked.host.engine.history(0, usize::MAX).to_vec());
    }
    while let Some(round) = host.next_round(&mut jobs)? {
        (jobs.progress)(Progress::Training {
            clients: round.clients.len(),
        });
        let locals = parallel_map(&round.clients, |(session, start)| {
            host.train(start, &texts[session])
        });
        // Sent in session order, whichever finished first: the sum is the same
        // bit for bit whatever the number of cores.
        let trained = locals
            .into_iter()
            .zip(&round.clients)
            .map(|(local, (session, _))| {
                let local = local?;
                Ok(Trained {
                    session: *session,
                    metrics: (local.metrics.loss, local.metrics.accuracy, local.seconds),
                    delta: local.delta,
                    examples: local.examples,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        host.send_all(&round, trained)?;
    }
    if let Some(why) = host.engine.stopped() {
        (jobs.progress)(Progress::Stopped(why));
    }
    Ok(host.engine.history(0, usize::MAX).to_vec())
}

/// A run folder's marker: its rounds trained and evaluated on the validation view.
pub const VALIDATION_MARKER: &str = "validation";

/// Marks a new validation run's folder, and refuses to continue a run on the
/// other split than it started on.
fn check_split(sim: &Population) -> anyhow::Result<()> {
    let marker = sim.state_dir.join(VALIDATION_MARKER);
    let started = state::state_path(&sim.state_dir).exists();
    match (sim.validation, marker.exists()) {
        (true, false) if started => anyhow::bail!(
            "{} holds a run on the full training text: continue it without --validation",
            sim.state_dir.display()
        ),
        (true, false) => std::fs::write(
            &marker,
            "this run trains without, and evaluates on, the validation split\n",
        )
        .with_context(|| format!("cannot write {}", marker.display())),
        (false, true) => anyhow::bail!(
            "{} holds a validation run: continue it with --validation",
            sim.state_dir.display()
        ),
        _ => Ok(()),
    }
}

/// Joins each of `clients` to the engine as itself, all before a round can
/// start; returns their sessions.
pub fn join(engine: &mut Engine, clients: &[String]) -> anyhow::Result<Vec<u64>> {
    let joins = clients.iter().enumerate().map(|(i, client)| CheckedJoin {
        kind: "simulated",
        backend: "flex".into(),
        adapter: None,
        resume: None,
        client: Some(client.clone()),
        held_model: None,
        // Simulated clients are devices of their own.
        group: i as u64,
        resume_only: false,
    });
    let joined = engine.join_many(joins, Instant::now());
    clients
        .iter()
        .zip(joined)
        .map(|(client, joined)| {
            joined
                .map(|j| j.session)
                .map_err(|e| anyhow::anyhow!("{client} cannot join: {}", e.message))
        })
        .collect()
}

/// A population run's jobs: evaluated here, committed to the run folder.
struct Disk<'a, P> {
    sim: &'a Population,
    evaluator: Evaluator,
    progress: P,
}

impl<P: FnMut(Progress)> Jobs for Disk<'_, P> {
    fn evaluate(
        &mut self,
        weights: &[f32],
        population: bool,
    ) -> anyhow::Result<(Evaluation, Option<Evaluation>)> {
        self.evaluator.evaluate(weights, population)
    }

    fn persist(&mut self, commit: &Commit) -> anyhow::Result<()> {
        state::commit(&self.sim.state_dir, commit, self.sim.seed)?;
        Ok(())
    }

    fn committed(&mut self, record: &RoundRecord) {
        (self.progress)(Progress::Committed(record));
    }
}
