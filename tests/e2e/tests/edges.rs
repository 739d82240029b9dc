//! A tab on a cluster: a root and two edges over a real `nats-server`, each edge
//! on a runtime of its own (killed as a crashed process goes: every task and
//! connection ends at once). A headless Chromium tab opens the page from edge A,
//! trains a round, and when edge A dies it fails over to edge B (the page learnt
//! of it from A's status) and trains again. Needs the built page and
//! `nats-server` (ignored by a plain `cargo test`; `scripts/test.sh` runs it).

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use folio_cluster::nats_server::NatsServer;
use folio_cluster::{Edge, EdgeConfig, Root, RootConfig};
use folio_e2e::webdriver::Driver;
use folio_e2e::{check_page_built, repo_root};
use folio_server::{RoundConfig, ServerConfig};
use serde_json::Value;

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

fn config(state: &std::path::Path, rounds: RoundConfig) -> ServerConfig {
    ServerConfig {
        addr: "127.0.0.1:0".parse().unwrap(),
        tls: None,
        state_dir: state.to_owned(),
        data: folio_server::DataSource::Shakespeare,
        data_dir: folio_data::data_dir(&repo_root()),
        web_root: Some(repo_root()),
        preset: folio_model::Preset::Small,
        init: None,
        rounds,
        seed: 7,
        access: folio_server::AccessConfig::default(),
        limits: folio_server::Limits::default(),
        max_rounds: Some(1_000),
    }
}

/// An edge on its own runtime.
struct LiveEdge {
    edge: Edge,
    runtime: tokio::runtime::Runtime,
}

impl LiveEdge {
    fn status(&self) -> Value {
        let _entered = self.runtime.enter();
        self.edge.server.status()
    }

    /// The browser sessions connected here, with the rounds each reported.
    fn tabs(&self) -> Vec<u64> {
        self.status()["clients"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["kind"] == "browser" && c["connected"] == true)
            .map(|c| c["rounds"].as_u64().unwrap_or(0))
            .collect()
    }
}

fn wait(what: &str, within: Duration, mut done: impl FnMut() -> bool) -> anyhow::Result<Duration> {
    let started = Instant::now();
    while !done() {
        ensure!(started.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
    Ok(started.elapsed())
}

#[test]
#[ignore = "needs the built page and nats-server; scripts/test.sh runs these with --ignored"]
fn a_tab_fails_over_to_another_edge_and_keeps_training() -> anyhow::Result<()> {
    check_page_built()?;
    let dir = tempfile::tempdir()?;
    let nats = NatsServer::start(&dir.path().join("nats"))?;
    // Rounds of one: the tab trains in each.
    let rounds = RoundConfig {
        strategy: folio_fed::StrategyConfig::fedavg(1),
        max_batches: Some(1),
        client_lr: 0.1,
        eval_clients: 1,
        eval_batches: 1,
        deadline: Duration::from_secs(60),
        ..RoundConfig::tutorial()
    };
    let root_runtime = runtime()?;
    let root = root_runtime.block_on(Root::start(RootConfig {
        server: config(&dir.path().join("root"), rounds.clone()),
        nats: nats.url(),
        name: "root".into(),
    }))?;
    let mut edges = Vec::new();
    for name in ["edge-a", "edge-b"] {
        let runtime = runtime()?;
        let edge = runtime.block_on(Edge::start(EdgeConfig {
            server: config(&dir.path().join(name), rounds.clone()),
            nats: nats.url(),
            name: name.into(),
            public_url: None,
        }))?;
        edges.push(LiveEdge { edge, runtime });
    }
    wait("edge A knows both edges", Duration::from_secs(30), || {
        edges[0].status()["edges"]
            .as_array()
            .is_some_and(|e| e.len() == 2)
    })?;

    let driver = Driver::chromium()?;
    let tab = driver.session(1200, 900)?;
    let page = format!("http://{}/?backend=cpu", edges[0].edge.server.addr);
    tab.navigate(&page)?;
    let page_says = || -> String {
        tab.execute(
            "return document.getElementById('device-status').textContent + ' / ' + document.getElementById('device-notices')?.innerText",
            serde_json::json!([]),
        )
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
    };
    let took = wait(
        "the tab trains a round on edge A",
        Duration::from_secs(120),
        || edges[0].tabs().iter().any(|&r| r >= 1),
    )
    .with_context(|| {
        format!(
            "the page says: {}; edge A: {}",
            page_says(),
            edges[0].status()
        )
    })?;
    eprintln!(
        "the tab trained on edge A within {:.1} s",
        took.as_secs_f64()
    );

    // Edge A dies; the tab reconnects to B by itself and trains there.
    let dead = edges.remove(0);
    let committed = root.completed_rounds();
    dead.runtime.shutdown_background();
    drop(dead.edge);
    let took = wait(
        "the tab trains a round on edge B",
        Duration::from_secs(120),
        || edges[0].tabs().iter().any(|&r| r >= 1),
    )
    .with_context(|| {
        format!(
            "the page says: {}; edge B: {}",
            page_says(),
            edges[0].status()
        )
    })?;
    wait(
        "the root commits the tab's round",
        Duration::from_secs(60),
        || root.completed_rounds() > committed + 1,
    )?;
    eprintln!(
        "after edge A died, the tab trained on edge B within {:.1} s",
        took.as_secs_f64()
    );
    eprintln!("the page says: {}", page_says());
    drop(root_runtime);
    Ok(())
}
