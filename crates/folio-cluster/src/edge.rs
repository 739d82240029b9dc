//! An edge: `folio serve` for its own tabs (every limit and check of the single
//! server), whose rounds the root orders and commits. A link task keeps it in
//! step with JetStream: it reports its sessions, starts the rounds the root
//! orders, adopts each commit, and sends each round's folded share.

use std::time::Duration;

use anyhow::Context;
use folio_engine::{RoundOrder, ShareReport, Start};
use folio_server::{EdgeStart, Handle, Server, ServerConfig, Share};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::store::{EdgeReport, Store, edge_id, global_id, now_ms, split_id};

/// How often an edge looks at the cluster's state.
const TICK: Duration = Duration::from_millis(100);
/// How often it reports its sessions.
const REPORT_EVERY: Duration = Duration::from_millis(500);
/// How often it reads which edges are alive (every report, sessions and all).
const PEERS_EVERY: Duration = Duration::from_secs(5);

pub struct EdgeConfig {
    pub server: ServerConfig,
    /// The NATS server (`nats://host:port`).
    pub nats: String,
    /// Unique among the cluster's edges.
    pub name: String,
    /// Where tabs reach it, if not at its listening address.
    pub public_url: Option<String>,
}

pub struct Edge {
    pub server: Server<folio_engine::Edge>,
    pub url: String,
    link: Vec<JoinHandle<()>>,
}

impl Edge {
    /// Connects to the cluster, waits for the root's first commit, and serves.
    pub async fn start(config: EdgeConfig) -> anyhow::Result<Edge> {
        let store = Store::connect(&config.nats).await?;
        let (global, settings) = loop {
            if let (Some((global, _)), Some(settings)) =
                (store.global().await?, store.settings().await?)
            {
                break (global, settings);
            }
            tracing::info!("waiting for the root's first commit");
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        // The root's settings, not the edge's own flags: every edge runs the
        // rounds the root runs.
        let mut server_config = config.server;
        server_config.preset = settings
            .preset
            .parse()
            .map_err(|err| anyhow::anyhow!("the cluster's preset: {err}"))?;
        server_config.seed = settings.seed;
        server_config.rounds = settings.rounds;
        let round = global.record.round;
        let weights = store.weights(round).await?;
        let mut history = store.committed().await?;
        history.retain(|r| r.round <= round);
        let (parts, shares) = mpsc::unbounded_channel();
        let start = Start {
            weights,
            strategy: None,
            history,
        };
        let first = store.weights(0).await?;
        let edge = EdgeStart {
            start,
            first,
            parts,
        };
        let tls = server_config.tls.is_some();
        let server = Server::start_edge(server_config, edge)
            .await
            .context("cannot start the edge's server")?;
        let scheme = if tls { "wss" } else { "ws" };
        let url = config
            .public_url
            .unwrap_or_else(|| format!("{scheme}://{}/ws", server.addr));
        let id = edge_id(&config.name);
        let link = Link {
            store: store.clone(),
            handle: server.handle(),
            name: config.name.clone(),
            id,
            url: url.clone(),
            adopted: round,
            order: None,
        };
        let sender = tokio::spawn(send_shares(store, config.name, id, shares));
        Ok(Edge {
            server,
            url,
            link: vec![tokio::spawn(link.run()), sender],
        })
    }

    /// Stops at once, as a killed process would.
    pub fn abort(self) {
        for task in &self.link {
            task.abort();
        }
        self.server.abort();
    }
}

struct Link {
    store: Store,
    handle: Handle,
    name: String,
    id: u32,
    url: String,
    /// The last round adopted.
    adopted: u64,
    /// The last order started (its revision).
    order: Option<u64>,
}

impl Link {
    async fn run(mut self) {
        let mut reported = tokio::time::Instant::now() - REPORT_EVERY;
        let mut learnt = tokio::time::Instant::now() - PEERS_EVERY;
        loop {
            if reported.elapsed() >= REPORT_EVERY {
                reported = tokio::time::Instant::now();
                if let Err(err) = self.report().await {
                    tracing::warn!("edge {}: cannot report: {err:#}", self.name);
                }
            }
            if learnt.elapsed() >= PEERS_EVERY {
                learnt = tokio::time::Instant::now();
                if let Err(err) = self.learn_peers().await {
                    tracing::warn!("edge {}: cannot read the other edges: {err:#}", self.name);
                }
            }
            if let Err(err) = self.follow().await {
                tracing::warn!("edge {}: {err:#}", self.name);
            }
            tokio::time::sleep(TICK).await;
        }
    }

    /// Whom tabs may fail over to: the edges heard from lately.
    async fn learn_peers(&self) -> anyhow::Result<()> {
        let now = now_ms();
        let mut edges: Vec<String> = self
            .store
            .reports()
            .await?
            .into_iter()
            .filter(|r| now.saturating_sub(r.at_ms) < crate::store::EDGE_SILENCE_MS)
            .map(|r| r.url)
            .collect();
        edges.sort();
        self.handle.set_edges(edges);
        Ok(())
    }

    async fn report(&self) -> anyhow::Result<()> {
        let (sessions, characters) = self
            .handle
            .candidates()
            .into_iter()
            .map(|(c, character)| {
                let c = folio_fed::Candidate {
                    client: global_id(self.id, c.client),
                    ..c
                };
                (c, character)
            })
            .unzip();
        self.store
            .put_report(&EdgeReport {
                name: self.name.clone(),
                url: self.url.clone(),
                sessions,
                characters,
                at_ms: now_ms(),
            })
            .await
    }

    /// Adopts a new commit, then starts a new order.
    async fn follow(&mut self) -> anyhow::Result<()> {
        if let Some((global, _)) = self.store.global().await?
            && global.record.round > self.adopted
        {
            let round = global.record.round;
            // Rounds committed since the last adopted (NATS was away, or they
            // came quicker than the ticks): their records, from the history.
            let missed = if round > self.adopted + 1 {
                let mut missed = self.store.committed_after(self.adopted).await?;
                missed.retain(|r| r.round < round);
                missed
            } else {
                Vec::new()
            };
            let weights = self.store.weights(round).await?;
            self.handle.adopt(missed, global.record, weights);
            self.adopted = round;
        }
        let Some((order, revision)) = self.store.order().await? else {
            return Ok(());
        };
        if self.order == Some(revision) || order.round <= self.adopted {
            return Ok(());
        }
        if order.model != self.handle.fingerprint() {
            // The commit it trains on is not announced yet: next tick.
            return Ok(());
        }
        let mine = RoundOrder {
            sessions: order
                .sessions
                .iter()
                .map(|&s| split_id(s))
                .filter(|&(edge, _)| edge == self.id)
                .map(|(_, session)| session)
                .collect(),
            ..order
        };
        self.order = Some(revision);
        self.handle
            .order(&mine)
            .map_err(|why| anyhow::anyhow!("cannot start round {}: {why}", mine.round))
    }
}

/// Sends each share as it is folded, retrying while NATS is away.
async fn send_shares(
    store: Store,
    name: String,
    id: u32,
    mut shares: mpsc::UnboundedReceiver<Share>,
) {
    while let Some((report, part)) = shares.recv().await {
        let report = ShareReport {
            reported: report.reported.iter().map(|&s| global_id(id, s)).collect(),
            dropped: report.dropped.iter().map(|&s| global_id(id, s)).collect(),
            ..report
        };
        for attempt in 0u32.. {
            match store.send_share(&name, report.clone(), &part).await {
                Ok(()) => break,
                Err(err) if attempt < 60 => {
                    tracing::warn!("edge {name}: cannot send its share yet: {err:#}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(err) => {
                    tracing::error!("edge {name}: share of round {} lost: {err:#}", report.round);
                    break;
                }
            }
        }
    }
}
