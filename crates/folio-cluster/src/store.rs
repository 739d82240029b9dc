//! The cluster's state in JetStream, so that no process holds the only copy:
//!
//! - **`folio-state`** (Key/Value): `global` (the last commit: its record, for
//!   edges to adopt), `order` (the open round's order), `edges.<name>` (each
//!   edge's report: its address and its sessions);
//! - **`folio-lease`** (Key/Value, entries expire): `root`, held by the one root
//!   that runs rounds;
//! - **`folio-objects`** (Object Store): `weights-r<N>` (round N's weights, f32)
//!   and `state-r<N>` (its weights and strategy state, for a root that restarts);
//!   `part-r<N>-a<A>-<edge>` (an edge's folded share);
//! - **`FOLIO_HISTORY`** (stream): one record per committed round, deduplicated
//!   by its round: appending it is the commit;
//! - **`FOLIO_PARTS`** (stream): one notice per share, deduplicated by
//!   (round, attempt, edge), so a share sent twice is counted once.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use async_nats::jetstream::{self, kv, object_store, stream};
use bytes::Bytes;
use folio_engine::{RoundOrder, RoundRecord, ShareReport};
use folio_fed::{Candidate, Partial};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

const STATE: &str = "folio-state";
const LEASE: &str = "folio-lease";
const OBJECTS: &str = "folio-objects";
const HISTORY: &str = "FOLIO_HISTORY";
const HISTORY_SUBJECT: &str = "folio.history";
const PARTS: &str = "FOLIO_PARTS";
pub const PARTS_SUBJECT: &str = "folio.parts";

/// How long a root's lease lasts unless renewed (it renews three times as often).
pub const LEASE_TIME: Duration = Duration::from_secs(3);
/// An edge silent this long (ms) is taken for dead: the root offers none of its
/// sessions, and tabs are not sent to it.
pub const EDGE_SILENCE_MS: u64 = 3_000;
/// Rounds whose weights are kept in the Object Store (older ones are deleted,
/// but for round 0's).
const KEPT_ROUNDS: u64 = 3;

/// What every process of the cluster runs by, set by the root: an edge takes it
/// rather than flags of its own, so no edge can disagree with the root.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    pub preset: String,
    pub seed: u64,
    pub rounds: folio_server::RoundConfig,
}

/// The last commit, as edges read it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GlobalModel {
    pub record: RoundRecord,
}

/// What an edge tells the root, every half second.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EdgeReport {
    pub name: String,
    /// Where tabs reach it (`ws://host:port/ws`).
    pub url: String,
    /// Its connected sessions, by their cluster-wide ids.
    pub sessions: Vec<Candidate>,
    /// The Shakespeare client each of `sessions` trains as.
    #[serde(default)]
    pub characters: Vec<String>,
    /// When it was sent (ms since the Unix epoch).
    pub at_ms: u64,
}

/// A share's notice on `FOLIO_PARTS`; the folded sum is the object it names.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShareNotice {
    pub edge: String,
    /// Session ids are cluster-wide.
    pub report: ShareReport,
    pub total_weight: f64,
    pub updates: usize,
    pub norms: Vec<f64>,
    pub object: String,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A cluster-wide session id: the edge's id over its own session id.
pub fn global_id(edge: u32, session: u64) -> u64 {
    u64::from(edge) << 32 | (session & 0xffff_ffff)
}

/// The edge a cluster-wide id belongs to, and its session there.
pub fn split_id(id: u64) -> (u32, u64) {
    ((id >> 32) as u32, id & 0xffff_ffff)
}

/// An edge's id, from its name (FNV-1a; the root refuses two live edges with one).
pub fn edge_id(name: &str) -> u32 {
    let hash = name.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    hash.max(1)
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn f32_values(bytes: &[u8]) -> anyhow::Result<Vec<f32>> {
    anyhow::ensure!(
        bytes.len().is_multiple_of(4),
        "{} bytes are no f32s",
        bytes.len()
    );
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

#[derive(Clone)]
pub struct Store {
    js: jetstream::Context,
    state: kv::Store,
    lease: kv::Store,
    objects: object_store::ObjectStore,
    history: stream::Stream,
    parts: stream::Stream,
}

impl Store {
    /// Connects to NATS at `url` (retrying until it answers) and opens, or makes,
    /// the buckets and streams.
    pub async fn connect(url: &str) -> anyhow::Result<Store> {
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(2))
            .connect(url)
            .await
            .with_context(|| format!("cannot reach NATS at {url}: is nats-server -js running?"))?;
        let js = jetstream::new(client);
        let ready = async {
            let state = js
                .create_key_value(kv::Config {
                    bucket: STATE.into(),
                    history: 1,
                    ..Default::default()
                })
                .await?;
            let lease = js
                .create_key_value(kv::Config {
                    bucket: LEASE.into(),
                    history: 1,
                    max_age: LEASE_TIME,
                    ..Default::default()
                })
                .await?;
            let objects = js
                .create_object_store(object_store::Config {
                    bucket: OBJECTS.into(),
                    ..Default::default()
                })
                .await?;
            let history = js
                .get_or_create_stream(stream::Config {
                    name: HISTORY.into(),
                    subjects: vec![HISTORY_SUBJECT.into()],
                    duplicate_window: Duration::from_secs(120),
                    ..Default::default()
                })
                .await?;
            let parts = js
                .get_or_create_stream(stream::Config {
                    name: PARTS.into(),
                    subjects: vec![PARTS_SUBJECT.into()],
                    duplicate_window: Duration::from_secs(120),
                    max_age: Duration::from_secs(3600),
                    ..Default::default()
                })
                .await?;
            anyhow::Ok((state, lease, objects, history, parts))
        };
        let (state, lease, objects, history, parts) = ready.await.with_context(|| {
            format!(
                "no JetStream at {url}: is nats-server running there, with -js \
                 (`nats-server -js -sd DIR -p PORT`)?"
            )
        })?;
        Ok(Store {
            js,
            state,
            lease,
            objects,
            history,
            parts,
        })
    }

    async fn put_object(&self, name: &str, bytes: &[u8]) -> anyhow::Result<()> {
        self.objects
            .put(name, &mut &bytes[..])
            .await
            .with_context(|| format!("cannot store {name}"))?;
        Ok(())
    }

    async fn object(&self, name: &str) -> anyhow::Result<Vec<u8>> {
        let mut object = self
            .objects
            .get(name)
            .await
            .with_context(|| format!("cannot fetch {name}"))?;
        let mut bytes = Vec::new();
        object
            .read_to_end(&mut bytes)
            .await
            .with_context(|| format!("cannot read {name}"))?;
        Ok(bytes)
    }

    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> anyhow::Result<Option<(T, u64)>> {
        let Some(entry) = self.state.entry(key).await? else {
            return Ok(None);
        };
        if entry.operation != kv::Operation::Put {
            return Ok(None);
        }
        let value = serde_json::from_slice(&entry.value)
            .with_context(|| format!("the cluster's `{key}` is unreadable"))?;
        Ok(Some((value, entry.revision)))
    }

    async fn put_json(&self, key: &str, value: &impl Serialize) -> anyhow::Result<()> {
        let bytes = Bytes::from(serde_json::to_vec(value)?);
        self.state
            .put(key, bytes)
            .await
            .with_context(|| format!("cannot write the cluster's `{key}`"))?;
        Ok(())
    }

    // --- commits -----------------------------------------------------------

    /// Commits a round: its weights and state stored, then its record appended
    /// to the history (the commit itself), then announced to the edges.
    pub async fn commit(
        &self,
        record: &RoundRecord,
        weights: &[f32],
        snapshot: &[u8],
    ) -> anyhow::Result<()> {
        let round = record.round;
        self.put_object(&format!("weights-r{round}"), &f32_bytes(weights))
            .await?;
        self.put_object(&format!("state-r{round}"), snapshot)
            .await?;
        let publish = jetstream::message::PublishMessage::build()
            .message_id(format!("round-{round}"))
            .payload(Bytes::from(serde_json::to_vec(record)?));
        self.js
            .send_publish(HISTORY_SUBJECT, publish)
            .await?
            .await
            .with_context(|| format!("cannot append round {round} to the history"))?;
        self.announce(record).await?;
        // Round 0's weights stay: the model the federation started from.
        if let Some(old) = round.checked_sub(KEPT_ROUNDS).filter(|&old| old > 0) {
            for name in [format!("weights-r{old}"), format!("state-r{old}")] {
                let _ = self.objects.delete(&name).await;
            }
        }
        Ok(())
    }

    /// Tells the edges that `record`'s round is the global model.
    pub async fn announce(&self, record: &RoundRecord) -> anyhow::Result<()> {
        self.put_json(
            "global",
            &GlobalModel {
                record: record.clone(),
            },
        )
        .await
    }

    /// The history's message sequence numbers, first to last.
    async fn history_sequences(&self) -> anyhow::Result<std::ops::RangeInclusive<u64>> {
        let state = self.history.clone().info().await?.state.clone();
        Ok(state.first_sequence.max(1)..=state.last_sequence)
    }

    /// The history's record at message `sequence`.
    async fn history_record(&self, sequence: u64) -> anyhow::Result<RoundRecord> {
        let message = self
            .history
            .get_raw_message(sequence)
            .await
            .with_context(|| format!("cannot read history message {sequence}"))?;
        serde_json::from_slice(&message.payload)
            .with_context(|| format!("history message {sequence} is unreadable"))
    }

    /// Every record in the history, as appended.
    pub async fn history(&self) -> anyhow::Result<Vec<RoundRecord>> {
        let mut records = Vec::new();
        for sequence in self.history_sequences().await? {
            records.push(self.history_record(sequence).await?);
        }
        Ok(records)
    }

    /// The committed rounds: the history, each round once (the first record of a
    /// round counts, should one repeat past the deduplication window).
    pub async fn committed(&self) -> anyhow::Result<Vec<RoundRecord>> {
        let mut records = self.history().await?;
        let mut last = None;
        records.retain(|r| {
            let new = last.is_none_or(|last| r.round > last);
            if new {
                last = Some(r.round);
            }
            new
        });
        Ok(records)
    }

    /// The committed rounds after round `after`, oldest first, each once: read
    /// from the end of the history back, so the cost is the rounds asked for.
    pub async fn committed_after(&self, after: u64) -> anyhow::Result<Vec<RoundRecord>> {
        let mut records = Vec::new();
        for sequence in self.history_sequences().await?.rev() {
            let record = self.history_record(sequence).await?;
            if record.round <= after {
                break;
            }
            records.push(record);
        }
        records.reverse();
        let mut last = after;
        records.retain(|r| {
            let next = r.round > last;
            last = last.max(r.round);
            next
        });
        Ok(records)
    }

    /// Round `round`'s committed snapshot (weights and strategy state).
    pub async fn snapshot(&self, round: u64) -> anyhow::Result<Vec<u8>> {
        self.object(&format!("state-r{round}")).await
    }

    /// The last commit as announced, if any.
    pub async fn global(&self) -> anyhow::Result<Option<(GlobalModel, u64)>> {
        self.get_json("global").await
    }

    /// Round `round`'s weights.
    pub async fn weights(&self, round: u64) -> anyhow::Result<Vec<f32>> {
        f32_values(&self.object(&format!("weights-r{round}")).await?)
    }

    // --- rounds ------------------------------------------------------------

    pub async fn put_settings(&self, settings: &Settings) -> anyhow::Result<()> {
        self.put_json("settings", settings).await
    }

    pub async fn settings(&self) -> anyhow::Result<Option<Settings>> {
        Ok(self
            .get_json("settings")
            .await?
            .map(|(settings, _)| settings))
    }

    pub async fn put_order(&self, order: &RoundOrder) -> anyhow::Result<()> {
        self.put_json("order", order).await
    }

    pub async fn order(&self) -> anyhow::Result<Option<(RoundOrder, u64)>> {
        self.get_json("order").await
    }

    pub async fn put_report(&self, report: &EdgeReport) -> anyhow::Result<()> {
        self.put_json(&format!("edges.{}", report.name), report)
            .await
    }

    /// Every edge's last report.
    pub async fn reports(&self) -> anyhow::Result<Vec<EdgeReport>> {
        use futures_util::StreamExt;
        let mut keys = self.state.keys().await?;
        let mut reports = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key?;
            if key.starts_with("edges.")
                && let Some((report, _)) = self.get_json::<EdgeReport>(&key).await?
            {
                reports.push(report);
            }
        }
        Ok(reports)
    }

    /// Sends an edge's share: the sum as an object, then its notice (sent twice,
    /// it is counted once).
    pub async fn send_share(
        &self,
        edge: &str,
        report: ShareReport,
        part: &Partial,
    ) -> anyhow::Result<()> {
        let id = format!("part-r{}-a{}-{edge}", report.round, report.attempt);
        self.put_object(&id, &f32_bytes(&part.sum)).await?;
        let notice = ShareNotice {
            edge: edge.to_owned(),
            report,
            total_weight: part.total_weight,
            updates: part.updates,
            norms: part.norms.clone(),
            object: id.clone(),
        };
        let publish = jetstream::message::PublishMessage::build()
            .message_id(id.clone())
            .payload(Bytes::from(serde_json::to_vec(&notice)?));
        self.js
            .send_publish(PARTS_SUBJECT, publish)
            .await?
            .await
            .with_context(|| format!("cannot send share {id}"))?;
        Ok(())
    }

    /// The shares' notices as they come: from `from` on (a stream sequence), or
    /// from now on.
    pub async fn shares(
        &self,
        from: Option<u64>,
    ) -> anyhow::Result<jetstream::consumer::pull::Stream> {
        let deliver_policy = match from {
            Some(start_sequence) => {
                jetstream::consumer::DeliverPolicy::ByStartSequence { start_sequence }
            }
            None => jetstream::consumer::DeliverPolicy::New,
        };
        let consumer = self
            .parts
            .create_consumer(jetstream::consumer::pull::Config {
                deliver_policy,
                ack_policy: jetstream::consumer::AckPolicy::None,
                inactive_threshold: Duration::from_secs(60),
                ..Default::default()
            })
            .await?;
        Ok(consumer.messages().await?)
    }

    /// Every share notice on the stream (as `folio bench cluster` counts the
    /// root's input), with its size in bytes.
    pub async fn notices(&self) -> anyhow::Result<Vec<(ShareNotice, usize)>> {
        let mut stream = self.parts.clone();
        let state = stream.info().await?.state.clone();
        let mut notices = Vec::new();
        for sequence in state.first_sequence.max(1)..=state.last_sequence {
            let message = stream.get_raw_message(sequence).await?;
            notices.push((
                serde_json::from_slice(&message.payload)?,
                message.payload.len(),
            ));
        }
        Ok(notices)
    }

    /// A share's notice, read, with its sum fetched.
    pub async fn share(&self, payload: &[u8]) -> anyhow::Result<(ShareNotice, Partial)> {
        let notice: ShareNotice =
            serde_json::from_slice(payload).context("a share's notice is unreadable")?;
        let sum = if notice.updates == 0 {
            Vec::new()
        } else {
            f32_values(&self.object(&notice.object).await?)?
        };
        let part = Partial {
            sum,
            total_weight: notice.total_weight,
            updates: notice.updates,
            norms: notice.norms.clone(),
        };
        Ok((notice, part))
    }

    // --- the root's lease ----------------------------------------------------

    /// Takes the root's lease if no live root holds it: its revision, to renew.
    pub async fn take_lease(&self, holder: &str) -> anyhow::Result<Option<u64>> {
        match self
            .lease
            .create("root", Bytes::from(holder.to_owned()))
            .await
        {
            Ok(revision) => Ok(Some(revision)),
            Err(err) if err.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
            Err(err) => Err(err.into()),
        }
    }

    /// Renews the lease taken at `revision`: its new revision; `None` if
    /// another root holds it now. A lease that lapsed while NATS was away (and
    /// nobody took) is taken again.
    pub async fn renew_lease(&self, holder: &str, revision: u64) -> anyhow::Result<Option<u64>> {
        let value = Bytes::from(holder.to_owned());
        match self.lease.update("root", value.clone(), revision).await {
            Ok(revision) => Ok(Some(revision)),
            Err(err) if err.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                match self.lease.entry("root").await? {
                    Some(entry) if entry.operation == kv::Operation::Put => Ok(None),
                    _ => self.take_lease(holder).await,
                }
            }
            Err(err) => Err(err.into()),
        }
    }
}
