//! `folio serve` killed with SIGKILL at random moments, 20 times, while two real
//! `folio client` processes train against it and reconnect by themselves: every
//! completed round must be in the history exactly once, the history file must
//! match the committed state, and the committed model must be the last round's.
//! And stopped with SIGTERM: it exits at once, cleanly, its history intact.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use folio_data::rng::SplitMix64;
use folio_engine::model_hash;
use folio_host::state;
use folio_model::Preset;
use folio_server::RoundRecord;
use folio_testkit::data_dir;

const CYCLES: usize = 20;

fn folio() -> Command {
    let mut cmd = Command::new(assert_cmd::cargo::cargo_bin("folio"));
    cmd.arg("--data-dir").arg(data_dir());
    cmd
}

fn free_address() -> String {
    let probe = TcpListener::bind("127.0.0.1:0").unwrap();
    probe.local_addr().unwrap().to_string()
}

fn clients(addr: &str, count: usize) -> Vec<Child> {
    (0..count)
        .map(|_| {
            folio()
                .args(["client", "--server", &format!("ws://{addr}/ws")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect()
}

fn serve(addr: &str, state_dir: &Path) -> Child {
    folio()
        .args([
            "serve",
            "--preset",
            "small",
            "--fresh",
            "--addr",
            addr,
            "--state-dir",
        ])
        .arg(state_dir)
        .args([
            "--clients-per-round",
            "2",
            "--quorum",
            "2",
            "--max-batches",
            "1",
        ])
        .args([
            "--deadline-secs",
            "60",
            "--eval-clients",
            "1",
            "--eval-batches",
            "1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// The committed state: weights and history.
fn committed(state_dir: &Path) -> state::SavedState {
    state::load(state_dir, Preset::Small.config().num_params())
        .unwrap()
        .expect("a committed state")
}

/// `metrics.jsonl`, a record a line.
fn history_file(state_dir: &Path) -> Vec<RoundRecord> {
    std::fs::read_to_string(state::history_path(state_dir))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn kill_all(children: &mut [Child]) {
    for child in children {
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

fn completed_rounds(state_dir: &Path) -> Vec<RoundRecord> {
    state::load(state_dir, Preset::Small.config().num_params())
        .unwrap()
        .map_or_else(Vec::new, |saved| saved.history)
}

#[test]
fn kill_9_at_random_moments_loses_no_committed_round() {
    let state_dir = tempfile::tempdir().unwrap();
    let addr = free_address();
    let mut server = serve(&addr, state_dir.path());
    let mut clients = clients(&addr, 2);
    let mut rng = SplitMix64::new(2026);
    for cycle in 0..CYCLES {
        // 0.3 s to 3 s: sometimes mid-start, mid-round, mid-evaluation or mid-commit.
        let wait = Duration::from_millis(300 + rng.below(2700) as u64);
        std::thread::sleep(wait);
        server.kill().unwrap();
        server.wait().unwrap();
        let done = completed_rounds(state_dir.path()).len();
        eprintln!("cycle {cycle}: killed after {wait:?}, {done} records committed");
        server = serve(&addr, state_dir.path());
    }
    // Let the clients finish one more round after the last restart.
    let before = completed_rounds(state_dir.path()).len();
    let started = Instant::now();
    while completed_rounds(state_dir.path()).len() <= before {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no round after the last restart: the clients did not come back"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    kill_all(std::slice::from_mut(&mut server));
    kill_all(&mut clients);

    let saved = committed(state_dir.path());
    let rounds: Vec<u64> = saved.history.iter().map(|r| r.round).collect();
    let expected: Vec<u64> = (0..rounds.len() as u64).collect();
    assert_eq!(rounds, expected, "every round once, in order");
    assert!(
        rounds.len() > CYCLES / 2,
        "only {} rounds in {CYCLES} cycles",
        rounds.len()
    );
    let last = saved.history.last().unwrap();
    assert_eq!(model_hash(&saved.weights), last.model_hash);
    // The history file is the committed history, line for line.
    let lines = history_file(state_dir.path());
    // The last kill may fall between a round's line and its state: the file is
    // then one line ahead (a restart cuts it), never behind.
    assert!(lines.len() == saved.history.len() || lines.len() == saved.history.len() + 1);
    assert_eq!(lines[..saved.history.len()], saved.history[..]);
}

#[test]
fn sigterm_stops_the_server_within_seconds_with_its_history_whole() {
    let state_dir = tempfile::tempdir().unwrap();
    let addr = free_address();
    let mut server = serve(&addr, state_dir.path());
    let mut clients = clients(&addr, 2);
    let started = Instant::now();
    while completed_rounds(state_dir.path()).len() < 3 {
        assert!(started.elapsed() < Duration::from_secs(120), "no rounds");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Mid-round, most likely: the round is abandoned, the last commit kept.
    let term = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let stopping = Instant::now();
    let status = loop {
        if let Some(status) = server.try_wait().unwrap() {
            break status;
        }
        assert!(
            stopping.elapsed() < Duration::from_secs(20),
            "still running 20 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    eprintln!("stopped {:?} after SIGTERM", stopping.elapsed());
    kill_all(&mut clients);
    let saved = committed(state_dir.path());
    assert_eq!(
        history_file(state_dir.path()).len(),
        saved.history.len(),
        "history and state agree"
    );
    assert_eq!(
        model_hash(&saved.weights),
        saved.history.last().unwrap().model_hash
    );
}
