//! The root: one task that owns a round engine in the root role. It selects
//! across the sessions the edges report, orders rounds, combines the edges'
//! shares, evaluates, and commits to JetStream. It holds the cluster's lease
//! while it runs: a second root waits as a standby and takes over when the
//! lease lapses; a root that loses it stops.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use folio_data::Corpus;
use folio_engine::{
    Engine, EngineConfig, Entropy, Release, Root as RootRole, RootAction, RoundRecord, Start,
};
use folio_fed::{Candidate, Partial};
use folio_host::eval::Evaluator;
use folio_host::jobs::{self, Done};
use folio_host::state;
use folio_server::ServerConfig;
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::store::{
    EDGE_SILENCE_MS, EdgeReport, LEASE_TIME, Settings, ShareNotice, Store, edge_id, now_ms,
    split_id,
};

/// How often the root reads the edges' reports.
const OFFER_EVERY: Duration = Duration::from_millis(250);

pub struct RootConfig {
    pub server: ServerConfig,
    pub nats: String,
    /// This root's name in the lease.
    pub name: String,
}

pub struct Root {
    task: JoinHandle<anyhow::Result<()>>,
    /// The last round committed.
    committed: watch::Receiver<Option<RoundRecord>>,
    release: Release,
}

impl Root {
    /// Connects, takes the lease (waiting as a standby while another root holds
    /// it), resumes from the committed history, and runs rounds.
    pub async fn start(config: RootConfig) -> anyhow::Result<Root> {
        let store = Store::connect(&config.nats).await?;
        let mut lease = loop {
            if let Some(revision) = store.take_lease(&config.name).await? {
                break revision;
            }
            tracing::info!("standby: another root holds the lease");
            tokio::time::sleep(LEASE_TIME / 3).await;
        };
        let server = &config.server;
        let corpus = Corpus::load(&server.data_dir.join("shakespeare"))?;
        let model = server.preset.config();
        let engine_config = EngineConfig {
            max_rounds: server.max_rounds,
            ..folio_host::engine_config(
                server.preset,
                server.rounds.clone(),
                server.seed,
                Entropy::from_os(),
            )
        };
        let history = store.committed().await?;
        let start = match history.last() {
            Some(last) => {
                let snapshot = store.snapshot(last.round).await?;
                let origin = format!("round {}'s snapshot in JetStream", last.round);
                let (round, weights, strategy) =
                    state::read_snapshot(&snapshot, engine_config.num_params(), &origin)?;
                anyhow::ensure!(round == last.round, "{origin} is of round {round}");
                store.announce(last).await?;
                Start {
                    weights,
                    strategy: Some(strategy),
                    history,
                }
            }
            None => Start {
                weights: folio_host::starting_weights(model, server.init.as_deref(), server.seed)
                    .await?,
                strategy: None,
                history,
            },
        };
        let evaluator = Arc::new(Evaluator::new(model, &corpus, &server.rounds, server.seed)?);
        let mut engine: Engine<RootRole> =
            folio_host::build_engine(engine_config, folio_host::corpus_clients(&corpus), start)?;
        let completed = engine.completed_rounds();
        if let Some((order, _)) = store.order().await?
            && order.round == completed + 1
        {
            // The round a root before this one ordered runs again, as a new attempt.
            engine.resume_attempts(order.attempt + 1);
        }
        tracing::info!(completed, "root {} holds the lease", config.name);
        lease = store
            .renew_lease(&config.name, lease)
            .await?
            .context("another root took the lease while this one started")?;
        store
            .put_settings(&Settings {
                preset: server.preset.to_string(),
                seed: server.seed,
                rounds: server.rounds.clone(),
            })
            .await?;
        let (progress, watched) = watch::channel(engine.history(completed, 1).first().cloned());
        let release = engine.release();
        let host = RootHost {
            release,
            store,
            engine,
            evaluator,
            seed: server.seed,
            name: config.name,
            lease,
            progress,
        };
        Ok(Root {
            task: tokio::spawn(host.run()),
            committed: watched,
            release,
        })
    }

    /// Waits until `rounds` rounds are committed.
    pub async fn wait_for_round(&self, rounds: u64) {
        let mut committed = self.committed.clone();
        let _ = committed
            .wait_for(|last| last.as_ref().is_some_and(|r| r.round >= rounds))
            .await;
    }

    /// Rounds committed so far.
    pub fn completed_rounds(&self) -> u64 {
        self.committed.borrow().as_ref().map_or(0, |r| r.round)
    }

    /// What the federation's public surfaces and logs show.
    pub fn release(&self) -> Release {
        self.release
    }

    /// The last round committed, as it changes.
    pub fn records(&self) -> watch::Receiver<Option<RoundRecord>> {
        self.committed.clone()
    }

    /// Runs until the root stops: `max_rounds` committed, or the lease lost.
    pub async fn join(self) -> anyhow::Result<()> {
        self.task.await.context("the root's task panicked")?
    }

    /// Stops at once, as a killed process would.
    pub fn abort(self) {
        self.task.abort();
    }
}

struct RootHost {
    store: Store,
    engine: Engine<RootRole>,
    evaluator: Arc<Evaluator>,
    seed: u64,
    name: String,
    lease: u64,
    progress: watch::Sender<Option<RoundRecord>>,
    release: Release,
}

impl RootHost {
    async fn run(mut self) -> anyhow::Result<()> {
        let (done, mut finished) = mpsc::unbounded_channel();
        let (shares_in, mut shares) = mpsc::unbounded_channel();
        let reader = tokio::spawn(read_shares(self.store.clone(), shares_in));
        let _stop_reader = AbortOnDrop(reader);
        let mut offers = tokio::time::interval(OFFER_EVERY);
        let mut renewals = tokio::time::interval(LEASE_TIME / 3);
        loop {
            while let Some(action) = self.engine.poll_action() {
                self.act(action, &done).await;
            }
            if self.engine.is_finished() {
                return Ok(());
            }
            let due = self.engine.poll_timeout();
            let timeout = async {
                match due {
                    Some(due) => tokio::time::sleep_until(due.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                Some(result) = finished.recv() => result.apply(&mut self.engine, Instant::now()),
                Some((notice, part)) = shares.recv() => self.take_share(notice, part),
                _ = offers.tick() => self.offer().await,
                _ = renewals.tick() => self.renew().await?,
                () = timeout => self.engine.handle_timeout(Instant::now()),
            }
        }
    }

    /// Renews the lease; stops the root if another holds it. While NATS is
    /// away no root can run a round, so the root waits for it.
    async fn renew(&mut self) -> anyhow::Result<()> {
        match self.store.renew_lease(&self.name, self.lease).await {
            Ok(Some(revision)) => self.lease = revision,
            Ok(None) => anyhow::bail!("another root holds the lease: this one stops"),
            Err(err) => tracing::warn!("cannot renew the lease: {err:#}"),
        }
        Ok(())
    }

    async fn act(&mut self, action: RootAction, done: &mpsc::UnboundedSender<Done>) {
        let job = match action {
            RootAction::Order(order) => {
                // A private federation's sample size is not logged.
                let clients = (!self.release.is_private()).then_some(order.sessions.len());
                tracing::info!(
                    round = order.round,
                    attempt = order.attempt,
                    clients,
                    "round ordered"
                );
                if let Err(err) = self.store.put_order(&order).await {
                    // The edges never start it: it fails at its deadline and runs again.
                    tracing::error!(round = order.round, "cannot order the round: {err:#}");
                }
                return;
            }
            RootAction::Committed(record) => {
                folio_host::log_committed(&record, self.release);
                self.progress.send_replace(Some(*record));
                return;
            }
            RootAction::Job(job) => job,
        };
        let (done, store, seed) = (done.clone(), self.store.clone(), self.seed);
        let evaluator = self.evaluator.clone();
        tokio::spawn(async move {
            let save = move |commit: Box<folio_engine::Commit>| async move {
                let round = commit.record.round;
                let snapshot = state::snapshot(round, &commit.weights, &commit.state, seed)?;
                store
                    .commit(&commit.record, &commit.weights, &snapshot)
                    .await
            };
            let _ = done.send(jobs::run(job, evaluator, save).await);
        });
    }

    fn take_share(&mut self, notice: ShareNotice, part: Partial) {
        let (round, edge) = (notice.report.round, notice.edge.clone());
        if let Err(why) = self.engine.take_share(notice.report, part, Instant::now()) {
            tracing::debug!(round, edge, "share not taken: {why}");
        }
    }

    /// Offers the root the sessions of the edges heard from lately.
    async fn offer(&mut self) {
        let reports = match self.store.reports().await {
            Ok(reports) => reports,
            Err(err) => {
                tracing::warn!("cannot read the edges' reports: {err:#}");
                return;
            }
        };
        let (sessions, dead) = offered(reports, now_ms());
        // A silent edge's clients will not report: the round stops waiting for them.
        if !dead.is_empty() {
            self.engine
                .lose(|s| dead.contains(&split_id(s).0), Instant::now());
        }
        self.engine.offer(sessions, Instant::now());
    }
}

/// The sessions a root may pick from the edges' reports as of `now` (ms), and
/// the edges gone silent. Each edge keeps its own sessions, so one Shakespeare
/// client may be held on two edges: only its first (by edge name) is offered.
fn offered(mut reports: Vec<EdgeReport>, now: u64) -> (Vec<Candidate>, BTreeSet<u32>) {
    reports.sort_by(|a, b| a.name.cmp(&b.name));
    let (live, silent): (Vec<EdgeReport>, Vec<EdgeReport>) = reports
        .into_iter()
        .partition(|r| now.saturating_sub(r.at_ms) < EDGE_SILENCE_MS);
    let dead = silent.iter().map(|r| edge_id(&r.name)).collect();
    let mut seen = BTreeSet::new();
    let sessions = live
        .into_iter()
        .flat_map(|r| {
            let characters = r
                .characters
                .into_iter()
                .map(Some)
                .chain(std::iter::repeat(None));
            r.sessions.into_iter().zip(characters)
        })
        .filter(|(_, character)| character.as_ref().is_none_or(|c| seen.insert(c.clone())))
        .map(|(session, _)| session)
        .collect();
    (sessions, dead)
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reads the shares stream from now on, with their sums, reconnecting as needed
/// (from where it stopped).
async fn read_shares(store: Store, shares: mpsc::UnboundedSender<(ShareNotice, Partial)>) {
    let mut next: Option<u64> = None;
    loop {
        let mut messages = match store.shares(next).await {
            Ok(messages) => messages,
            Err(err) => {
                tracing::warn!("cannot read the shares: {err:#}");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        while let Some(message) = messages.next().await {
            let message = match message {
                Ok(message) => message,
                Err(err) => {
                    tracing::warn!("reading the shares: {err}");
                    break;
                }
            };
            if let Ok(info) = message.info() {
                next = Some(info.stream_sequence + 1);
            }
            match store.share(&message.payload).await {
                Ok(share) => {
                    if shares.send(share).is_err() {
                        return;
                    }
                }
                Err(err) => tracing::warn!("a share is unreadable: {err:#}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::global_id;

    fn report(name: &str, at_ms: u64, characters: &[&str]) -> EdgeReport {
        let id = edge_id(name);
        EdgeReport {
            name: name.into(),
            url: format!("ws://{name}/ws"),
            sessions: (0..characters.len() as u64)
                .map(|s| Candidate {
                    client: global_id(id, s + 1),
                    size: 10,
                    group: s,
                })
                .collect(),
            characters: characters.iter().map(|c| c.to_string()).collect(),
            at_ms,
        }
    }

    #[test]
    fn a_character_on_two_edges_is_offered_once_and_silent_edges_are_dead() {
        let reports = vec![
            report("b", 10_000, &["KENT", "LEAR"]),
            report("a", 10_000, &["LEAR", "FOOL"]),
            report("c", 1_000, &["EDGAR"]),
        ];
        let (sessions, dead) = offered(reports, 10_500);
        let from = |name: &str| {
            sessions
                .iter()
                .filter(|s| split_id(s.client).0 == edge_id(name))
                .count()
        };
        assert_eq!((from("a"), from("b"), from("c")), (2, 1, 0), "{sessions:?}");
        assert_eq!(dead, BTreeSet::from([edge_id("c")]));
    }
}
