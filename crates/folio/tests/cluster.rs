//! A cluster of real processes on loopback: `nats-server` (JetStream, file
//! storage), a `folio serve --role root`, three `folio serve --role edge` and six
//! `folio client`s spread over the edges (each told every edge, to fail over).
//! Each part is killed with SIGKILL mid-round in turn (an edge, the root) and
//! NATS is restarted: the rounds go on, every committed round stays in the
//! history exactly once, and the clients of the dead edge train elsewhere.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use folio_cluster::nats_server::NatsServer;
use folio_cluster::store::Store;
use folio_server::RoundRecord;
use folio_testkit::KING_LEAR;

fn folio(logs: &Path, name: &str) -> Command {
    let data = folio_testkit::data_dir();
    let mut cmd = Command::new(assert_cmd::cargo::cargo_bin("folio"));
    cmd.arg("--data-dir").arg(data);
    let log = std::fs::File::create(logs.join(format!("{name}.log"))).unwrap();
    cmd.stdout(Stdio::null()).stderr(log);
    cmd
}

fn free_address() -> String {
    let probe = TcpListener::bind("127.0.0.1:0").unwrap();
    probe.local_addr().unwrap().to_string()
}

struct Cluster {
    dir: tempfile::TempDir,
    nats: NatsServer,
    store: Store,
    runtime: tokio::runtime::Runtime,
    root: Child,
    edges: Vec<(String, Child)>,
    clients: Vec<Child>,
}

impl Cluster {
    fn start() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let nats = NatsServer::start(&dir.path().join("nats")).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let store = runtime.block_on(Store::connect(&nats.url())).unwrap();
        let mut cluster = Cluster {
            root: Command::new("true").spawn().unwrap(),
            edges: Vec::new(),
            clients: Vec::new(),
            dir,
            nats,
            store,
            runtime,
        };
        cluster.root = cluster.spawn_root("root-1");
        for name in ["edge-a", "edge-b", "edge-c"] {
            let addr = free_address();
            let edge = folio(cluster.dir.path(), name)
                .args(["serve", "--nats", &cluster.nats.url(), "--role", "edge"])
                .args(["--name", name, "--addr", &addr, "--state-dir"])
                .arg(cluster.dir.path().join(name))
                .spawn()
                .unwrap();
            cluster.edges.push((format!("ws://{addr}/ws"), edge));
        }
        for (i, client) in KING_LEAR.iter().enumerate() {
            // Two clients an edge, each told every edge from its own on.
            let mut command = folio(cluster.dir.path(), &format!("client-{i}"));
            command.args(["client", "--client", client]);
            for k in 0..3 {
                command.args(["--server", &cluster.edges[(i / 2 + k) % 3].0]);
            }
            cluster.clients.push(command.spawn().unwrap());
        }
        cluster
    }

    fn spawn_root(&self, name: &str) -> Child {
        folio(self.dir.path(), name)
            .args(["serve", "--nats", &self.nats.url(), "--role", "root"])
            .args([
                "--name",
                name,
                "--preset",
                "small",
                "--fresh",
                "--state-dir",
            ])
            .arg(self.dir.path().join(name))
            .args(["--clients-per-round", "6", "--quorum", "4"])
            .args(["--max-batches", "1", "--deadline-secs", "4"])
            .args(["--eval-clients", "1", "--eval-batches", "1"])
            .spawn()
            .unwrap()
    }

    /// Every history record, as appended.
    fn history(&self) -> Vec<RoundRecord> {
        self.runtime
            .block_on(self.store.history())
            .unwrap_or_default()
    }

    fn completed(&self) -> u64 {
        self.history().last().map_or(0, |r| r.round)
    }

    /// Waits for `what` of the history, showing the processes' logs if it never comes.
    fn wait_for(&self, what: &str, mut done: impl FnMut(&[RoundRecord]) -> bool) {
        let started = Instant::now();
        while !done(&self.history()) {
            if started.elapsed() > Duration::from_secs(120) {
                for entry in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
                    let path = entry.path();
                    if path.extension().is_some_and(|e| e == "log") {
                        let log = std::fs::read_to_string(&path).unwrap_or_default();
                        let tail: Vec<&str> = log.lines().rev().take(15).collect();
                        eprintln!("--- {}", path.display());
                        for line in tail.iter().rev() {
                            eprintln!("{line}");
                        }
                    }
                }
                panic!(
                    "{what}: not within 120 s; history {:?}",
                    rounds(&self.history())
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the next round is ordered (its clients are training).
    fn wait_mid_round(&self) -> u64 {
        let next = self.completed() + 1;
        let started = Instant::now();
        loop {
            let order = self.runtime.block_on(self.store.order()).ok().flatten();
            if order.is_some_and(|(order, _)| order.round >= next) {
                return next;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "round {next} never ordered"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let children = std::iter::once(&mut self.root)
            .chain(self.edges.iter_mut().map(|(_, e)| e))
            .chain(&mut self.clients);
        for child in children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn rounds(history: &[RoundRecord]) -> Vec<u64> {
    history.iter().map(|r| r.round).collect()
}

fn kill(child: &mut Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn killing_an_edge_the_root_or_nats_loses_no_committed_round() {
    let mut cluster = Cluster::start();
    cluster.wait_for("two rounds over three edges", |h| h.len() > 2);

    // An edge dies mid-round: the round closes on the others' quorum (or runs
    // again), and its clients, reconnected to the others, train a full round.
    let round = cluster.wait_mid_round();
    kill(&mut cluster.edges[2].1);
    cluster.wait_for("a full round after the edge died", |h| {
        h.iter()
            .any(|r| r.round > round && r.clients == KING_LEAR.len())
    });

    // The root dies mid-round; another takes over its lease and runs the round again.
    let round = cluster.wait_mid_round();
    kill(&mut cluster.root);
    cluster.root = cluster.spawn_root("root-2");
    cluster.wait_for("the round the root died in, committed by the next", |h| {
        h.last().is_some_and(|r| r.round > round)
    });

    // NATS itself restarts: the root and the edges reconnect and go on.
    let before = cluster.history();
    cluster.nats.restart().unwrap();
    let resumed = before.last().unwrap().round + 2;
    cluster.wait_for("two rounds after NATS restarted", |h| {
        h.last().is_some_and(|r| r.round >= resumed)
    });

    let history = cluster.history();
    let clients: Vec<(u64, usize)> = history.iter().map(|r| (r.round, r.clients)).collect();
    eprintln!("(round, clients): {clients:?}");
    assert_eq!(
        rounds(&history),
        (0..=history.last().unwrap().round).collect::<Vec<_>>(),
        "every committed round once, in order"
    );
    assert_eq!(
        &history[..before.len()],
        &before[..],
        "nothing committed is lost"
    );

    // Each live edge's own history is whole too: the rounds committed while it
    // was not looking (NATS away) are filled in from JetStream.
    for (url, _) in &cluster.edges[..2] {
        let addr = url.trim_start_matches("ws://").trim_end_matches("/ws");
        let started = Instant::now();
        loop {
            let seen = rounds(&edge_history(addr));
            if seen.last().is_some_and(|&last| last >= resumed) {
                let last = *seen.last().unwrap();
                assert_eq!(
                    seen,
                    (0..=last).collect::<Vec<_>>(),
                    "edge {addr}'s history has gaps"
                );
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "edge {addr} never adopted round {resumed}: {seen:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// An edge's `/api/history`.
fn edge_history(addr: &str) -> Vec<RoundRecord> {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(addr) else {
        return Vec::new();
    };
    let request = format!("GET /api/history HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let mut answer = String::new();
    if stream.write_all(request.as_bytes()).is_err() || stream.read_to_string(&mut answer).is_err()
    {
        return Vec::new();
    }
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    serde_json::from_str(body).unwrap_or_default()
}
