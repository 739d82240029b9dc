//! The `folio` binary as a user runs it.

use std::collections::BTreeMap;

use assert_cmd::Command;
use burn::prelude::Device;
use folio_model::checkpoint::{self, Precision};
use folio_model::{CharRnn, Preset};
use folio_testkit::data_dir;

fn folio() -> Command {
    let mut cmd = Command::cargo_bin("folio").unwrap();
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .arg("--data-dir")
        .arg(data_dir());
    cmd
}

fn stdout(cmd: &mut Command) -> String {
    let output = cmd.output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn data_stats_reports_the_federation() {
    let out = stdout(folio().args(["data", "stats"]));
    let figure = |label: &str| -> usize {
        let line = out
            .lines()
            .find(|l| l.starts_with(label))
            .unwrap_or_else(|| panic!("no `{label}` in\n{out}"));
        line[label.len()..]
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(figure("plays"), 37);
    assert!(figure("clients (2+ speeches)") >= 900, "{out}");
    assert!(figure("clients with a full batch") >= 500, "{out}");
}

#[test]
fn data_show_prints_a_client_and_suggests_close_ids() {
    let out = stdout(folio().args([
        "data",
        "show",
        "the tragedy of king lear kent",
        "--lines",
        "2",
    ]));
    assert!(
        out.contains("I thought the King had more affected the Duke of Albany than"),
        "{out}"
    );
    let output = folio()
        .args(["data", "show", "THE_TRAGEDY_OF_KING_LEAR_KANT"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        err.contains("no client") && err.contains("THE_TRAGEDY_OF_KING_LEAR_KENT"),
        "{err}"
    );
}

#[test]
fn a_missing_corpus_says_how_to_fetch_it() {
    let output = Command::cargo_bin("folio")
        .unwrap()
        .args(["--data-dir", "/nonexistent", "data", "stats"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("scripts/setup.sh data"), "{err}");
}

#[test]
fn eval_and_generate_run_on_a_checkpoint() {
    let config = Preset::Small.config();
    let weights = pollster::block_on(CharRnn::init(config, 1, &Device::flex()).to_flat()).unwrap();
    let path = std::env::temp_dir().join(format!("folio-cli-{}.safetensors", std::process::id()));
    checkpoint::save(&path, config, &weights, Precision::F16, &BTreeMap::new()).unwrap();
    let path = path.to_str().unwrap();

    let out = stdout(folio().args(["eval", "--checkpoint", path, "--random"]));
    assert!(out.contains("random text: 5 batches, 4000 chars"), "{out}");
    let out = stdout(folio().args([
        "eval",
        "--checkpoint",
        path,
        "--client",
        "THE_TRAGEDY_OF_KING_LEAR_LEAR",
    ]));
    assert!(
        out.contains("THE_TRAGEDY_OF_KING_LEAR_LEAR: 5 batches"),
        "{out}"
    );
    let out = stdout(folio().args([
        "generate",
        "--checkpoint",
        path,
        "--length",
        "30",
        "--prompt",
        "Hi ",
    ]));
    assert_eq!(
        out.strip_suffix('\n').unwrap().chars().count(),
        33,
        "{out:?}"
    );

    let output = folio()
        .args([
            "eval",
            "--checkpoint",
            "/nonexistent.safetensors",
            "--random",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && err.contains("folio pretrain"),
        "{err}"
    );
    std::fs::remove_file(path).unwrap();
}

/// Runs `folio simulate --population` on the small preset for `rounds` in `dir`,
/// with `extra` flags, twice: whole and stopped after 2 rounds then resumed.
/// Returns the two state folders, which must hold the same run.
/// `folio simulate --population` on the small preset from fresh weights, a batch
/// per client and a one-batch central evaluation: `clients` a round.
fn small_population(clients: &str) -> Command {
    let mut command = folio();
    command.args([
        "simulate",
        "--population",
        "--preset",
        "small",
        "--fresh",
        "--clients-per-round",
        clients,
        "--max-batches",
        "1",
        "--eval-clients",
        "1",
        "--eval-batches",
        "1",
    ]);
    command
}

fn whole_and_resumed_population_runs(extra: &[&str]) -> (tempfile::TempDir, tempfile::TempDir) {
    let simulate = |dir: &std::path::Path, rounds: &str| {
        stdout(small_population("3").args(extra).args([
            "--seed",
            "4",
            // A step schedule that takes effect after the interruption.
            "--client-lr-halve-at",
            "3",
            "--rounds",
            rounds,
            "--state-dir",
            dir.to_str().unwrap(),
        ]))
    };
    let (whole, split) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    simulate(whole.path(), "4");
    simulate(split.path(), "2");
    let resumed = simulate(split.path(), "4");
    assert!(resumed.contains("2 of 4 rounds done"), "{resumed}");
    let load = |dir: &std::path::Path| {
        folio_host::state::load(dir, Preset::Small.config().num_params())
            .unwrap()
            .unwrap()
    };
    let (a, b) = (load(whole.path()), load(split.path()));
    assert_eq!(a.weights, b.weights, "same weights as an uninterrupted run");
    assert_eq!(a.strategy, b.strategy, "same server optimizer state");
    let figures = |h: &[folio_server::RoundRecord]| -> Vec<(u64, String, f64, Option<f64>)> {
        h.iter()
            .map(|r| (r.round, r.model_hash.clone(), r.eval_loss, r.train_loss))
            .collect()
    };
    assert_eq!(figures(&a.history), figures(&b.history));
    assert_eq!(a.history.len(), 5);
    (whole, split)
}

#[test]
fn a_resumed_population_simulation_continues_exactly_where_it_stopped() {
    let (whole, _) = whole_and_resumed_population_runs(&[]);
    let a = folio_host::state::load(whole.path(), Preset::Small.config().num_params())
        .unwrap()
        .unwrap();

    // The run's model as a model file, scored on the whole population.
    let exported = whole.path().join("model.safetensors");
    let out = stdout(folio().args([
        "export",
        whole.path().to_str().unwrap(),
        "--out",
        exported.to_str().unwrap(),
    ]));
    assert!(out.contains("round 4"), "{out}");
    let model = checkpoint::load(&exported, Some(Preset::Small.config())).unwrap();
    let accuracy: f64 = model.metadata["population_test_accuracy"].parse().unwrap();
    assert!((0.05..0.6).contains(&accuracy), "{accuracy}");
    assert_eq!(model.metadata["round"], "4");
    // Its budget: 4 rounds of 3 clients, one batch of 8 sequences each at most.
    let budget = |key: &str| -> u64 { model.metadata[key].parse().unwrap() };
    assert_eq!(budget("budget_client_updates"), 12);
    let characters = budget("budget_characters_trained");
    assert!(characters > 0 && characters <= 12 * 8 * 100, "{characters}");
    let history_bytes: u64 = a.history.iter().map(|r| r.bytes_up).sum();
    assert_eq!(budget("budget_bytes_up"), history_bytes);
    for (f16, f32) in model.weights.iter().zip(&a.weights) {
        assert!((f16 - f32).abs() <= 1e-3 * f32.abs().max(1.0));
    }
}

#[test]
fn a_validation_run_is_tuned_on_validation_and_scored_on_test_once() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().to_str().unwrap();
    let simulate = |validation: bool| {
        let mut command = small_population("3");
        command.args([
            "--rounds",
            "2",
            "--population-eval-every",
            "2",
            "--state-dir",
            run,
        ]);
        if validation {
            command.arg("--validation");
        }
        command.output().unwrap()
    };
    let out = simulate(true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Its population figure is on validation: the validation view is what the
    // model was not trained on.
    let history = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(history.lines().last().unwrap()).unwrap();
    let validation = last["population_accuracy"].as_f64().unwrap();
    // The same run cannot go on on the full training text.
    let refused = simulate(false);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("holds a validation run"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    // Exported, the model carries both: the validation figure from the run, the
    // test figure computed now, and they are different splits.
    let exported = dir.path().join("model.safetensors");
    stdout(folio().args(["export", run, "--out", exported.to_str().unwrap()]));
    let model = checkpoint::load(&exported, Some(Preset::Small.config())).unwrap();
    let figure = |key: &str| -> f64 { model.metadata[key].parse().unwrap() };
    assert!((figure("population_validation_accuracy") - validation).abs() < 1e-4);
    let test = figure("population_test_accuracy");
    // (A model this young predicts mostly spaces: its accuracies on the two
    // splits can agree; its losses cannot.)
    assert_ne!(
        model.metadata["population_validation_loss"],
        model.metadata["population_test_loss"]
    );
    // `folio eval` scores the file on either split and agrees with the metadata.
    let scored = |split: &str| -> String {
        stdout(folio().args([
            "eval",
            "--checkpoint",
            exported.to_str().unwrap(),
            "--population",
            "--split",
            split,
        ]))
    };
    // (The file holds f16 weights; the export scored the run's f32 ones.)
    let accuracy = |out: String| -> f64 {
        let (_, after) = out.split_once("accuracy ").expect("an accuracy");
        after.split_whitespace().next().unwrap().parse().unwrap()
    };
    assert!((accuracy(scored("test")) - test).abs() < 2e-3);
    assert!((accuracy(scored("validation")) - validation).abs() < 2e-3);
}

#[test]
fn a_size_sampled_bias_corrected_fedadam_run_resumes_exactly_too() {
    // Bias correction depends on the server's step count, so a resumed run only
    // matches if the count is saved with the moments.
    let (whole, _) = whole_and_resumed_population_runs(&[
        "--sample-by-size",
        "--server-optimizer",
        "fedadam",
        "--server-lr",
        "0.001",
        "--server-beta2",
        "0.999",
        "--server-bias-correction",
    ]);
    let history = std::fs::read_to_string(whole.path().join("metrics.jsonl")).unwrap();
    // Drawn by size, three distinct clients a round, every round three updates.
    assert_eq!(history.matches(r#""clients":3"#).count(), 4, "{history}");
}

#[test]
fn plot_draws_every_run_into_one_svg() {
    let runs = tempfile::tempdir().unwrap();
    for (name, slope) in [("fedavg", 0.01), ("fedadam", 0.02)] {
        let dir = runs.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let lines: String = (0..5)
            .map(|round| {
                let population = if round % 2 == 0 { format!("{}", 0.4 + slope * round as f64) } else { "null".into() };
                format!(
                    r#"{{"round":{round},"clients":2,"train_loss":null,"train_accuracy":null,"eval_loss":"NaN","eval_accuracy":{},"bytes_up":0,"bytes_down":0,"seconds":1.0,"population_accuracy":{population}}}"#,
                    0.4 + slope * round as f64
                ) + "\n"
            })
            .collect();
        std::fs::write(dir.join("metrics.jsonl"), lines).unwrap();
    }
    let out = runs.path().join("curves.svg");
    let table = stdout(
        folio()
            .arg("plot")
            .arg(runs.path().join("fedavg"))
            .arg(runs.path().join("fedadam"))
            .args(["--target", "0.44", "--out"])
            .arg(&out),
    );
    for row in [
        "| fedavg | 4 | 0.4400 (4) | 4 | 0 min |",
        "| fedadam | 4 | 0.4800 (4) | 2 | 0 min |",
    ] {
        assert!(table.contains(row), "no {row:?} in {table}");
    }
    let early = stdout(
        folio()
            .arg("plot")
            .arg(runs.path().join("fedavg"))
            .args(["--max-round", "2", "--out"])
            .arg(&out),
    );
    assert!(
        early.contains("| fedavg | 2 | 0.4200 (2) | not yet |"),
        "{early}"
    );
    stdout(
        folio()
            .arg("plot")
            .arg(runs.path().join("fedavg"))
            .arg(runs.path().join("fedadam"))
            .arg("--out")
            .arg(&out),
    );
    let svg = std::fs::read_to_string(&out).unwrap();
    for label in [
        "fedavg: eval accuracy",
        "fedadam: population accuracy",
        "round",
        "accuracy",
    ] {
        assert!(svg.contains(label), "no {label:?} in the plot");
    }
    assert!(svg.matches("<circle").count() >= 6, "population points");
    // Against client updates: 2 a round (the round-0 record's included), so the
    // axis ends at the last round's 10.
    stdout(
        folio()
            .arg("plot")
            .arg(runs.path().join("fedavg"))
            .args(["--by", "updates", "--out"])
            .arg(&out),
    );
    let svg = std::fs::read_to_string(&out).unwrap();
    assert!(svg.contains("client updates (thousands)"), "the axis");
    assert!(
        svg.contains("\n0.01\n</text>"),
        "the last round at 10 updates: {svg}"
    );
    let missing = folio().args(["plot", "/nonexistent-run"]).output().unwrap();
    assert!(String::from_utf8_lossy(&missing.stderr).contains("is it a run folder?"));
}

#[test]
fn centralized_training_on_the_pooled_clients_stops_at_its_character_budget() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("central.safetensors");
    let output = folio()
        .args([
            "pretrain",
            "--shakespeare",
            "--preset",
            "small",
            "--max-chars",
            "12000",
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{err}");
    assert!(err.contains("1103 Shakespeare clients pooled"), "{err}");
    let model = checkpoint::load(&out, Some(Preset::Small.config())).unwrap();
    // 12,000 chars in batches of 64 × 100: two steps.
    assert_eq!(model.metadata["trained_chars"], "12800");
    assert_eq!(model.metadata["epoch"], "1");
    let accuracy: f64 = model.metadata["held_out_accuracy"].parse().unwrap();
    assert!((0.0..0.5).contains(&accuracy), "{accuracy}");

    // A zero budget is refused rather than reported as written.
    let output = folio()
        .args(["pretrain", "--shakespeare", "--max-chars", "0", "--out"])
        .arg(dir.path().join("none.safetensors"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && err.contains("nothing to train"),
        "{err}"
    );

    // Never onto the shipped Dickens model by default.
    let output = folio()
        .args(["pretrain", "--shakespeare", "--preset", "small"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && err.contains("--out"), "{err}");
}

#[test]
fn a_secure_population_simulation_trains_the_model_a_plain_one_does() {
    let run = |secure: bool| {
        let dir = tempfile::tempdir().unwrap();
        let mut command = small_population("4");
        command.args([
            "--clip",
            "fixed",
            "--clip-bound",
            "0.5",
            "--seed",
            "6",
            "--rounds",
            "2",
            "--state-dir",
            dir.path().to_str().unwrap(),
        ]);
        if secure {
            command.arg("--secure-aggregation");
        }
        stdout(&mut command);
        let state = folio_host::state::load(dir.path(), Preset::Small.config().num_params())
            .unwrap()
            .unwrap();
        (state.weights, state.history)
    };
    let (plain, plain_history) = run(false);
    let (secure, secure_history) = run(true);
    assert!(
        secure_history[1..]
            .iter()
            .all(|r| r.secure && r.clients == 4)
    );
    assert!(plain_history.iter().all(|r| !r.secure));
    // The sum of quantised, masked updates is the sum of the updates, up to the
    // rounding: 2⁻³¹ of the bound per client.
    let worst = plain
        .iter()
        .zip(&secure)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-5, "secure and plain models differ by {worst}");
    assert_ne!(plain, vec![0.0; plain.len()]);
}

#[test]
fn asynchronous_rounds_on_simulated_devices_step_sooner_and_repeat_exactly() {
    let run = |mode: &str| {
        let dir = tempfile::tempdir().unwrap();
        stdout(small_population("6").args([
            "--devices",
            "--mode",
            mode,
            "--buffer",
            "3",
            "--max-staleness",
            "2",
            "--seed",
            "2",
            "--rounds",
            "4",
            "--state-dir",
            dir.path().to_str().unwrap(),
        ]));
        let state = folio_host::state::load(dir.path(), Preset::Small.config().num_params())
            .unwrap()
            .unwrap();
        let clock: Vec<serde_json::Value> = std::fs::read_to_string(dir.path().join("clock.jsonl"))
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        (state, clock)
    };
    let (sync, sync_clock) = run("sync");
    let (buffered, clock) = run("async");
    assert_eq!(clock.len(), 5, "round 0 and four steps: {clock:?}");
    assert!(
        buffered.history[1..]
            .iter()
            .all(|r| r.clients == 3 && r.staleness.is_some())
    );
    assert!(sync.history[1..].iter().all(|r| r.staleness.is_none()));
    let seconds = |clock: &[serde_json::Value]| clock.last().unwrap()["seconds"].as_f64().unwrap();
    // A synchronous round waits for its slowest device; the buffer steps as
    // soon as the fastest three are back.
    assert!(
        seconds(&clock) < seconds(&sync_clock),
        "async {} s, sync {} s",
        seconds(&clock),
        seconds(&sync_clock)
    );
    let times: Vec<f64> = clock
        .iter()
        .map(|c| c["seconds"].as_f64().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    // Simulated time and the training it orders depend on the seed alone.
    let (again, _) = run("async");
    assert_eq!(buffered.weights, again.weights);
}

#[test]
fn a_population_run_never_times_its_own_rounds_out() {
    // In process every client reports: a deadline shorter than a round's training
    // (or a run suspended past it) must not abandon the round.
    let dir = tempfile::tempdir().unwrap();
    let out = stdout(small_population("3").args([
        "--deadline-secs",
        "0.000001",
        "--rounds",
        "2",
        "--state-dir",
        dir.path().to_str().unwrap(),
    ]));
    assert!(out.contains("2 rounds in"), "{out}");
}

/// `folio serve --data device` with two `folio client --text` processes, one
/// given a file and one a folder of .txt files: a round trains on their text,
/// and the devices measure the candidate on what they hold out. A client given
/// no text, and one given text against the simulation, are told why not.
#[test]
fn native_devices_train_on_text_of_their_own() {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let texts = tempfile::tempdir().unwrap();
    let file = texts.path().join("mine.txt");
    std::fs::write(&file, "A line only this machine has.\n".repeat(80)).unwrap();
    let folder = texts.path().join("notes");
    std::fs::create_dir(&folder).unwrap();
    for (name, line) in [
        ("a.txt", "First notes of mine.\n"),
        ("b.txt", "Second notes.\n"),
    ] {
        std::fs::write(folder.join(name), line.repeat(60)).unwrap();
    }
    let state = tempfile::tempdir().unwrap();
    let server = process()
        .args(["serve", "--data", "device", "--preset", "small", "--fresh"])
        .args(["--addr", &addr, "--rounds", "1", "--clients-per-round", "2"])
        .args([
            "--federated-eval-every",
            "1",
            "--federated-eval-devices",
            "2",
        ])
        .arg("--state-dir")
        .arg(state.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let url = format!("ws://{addr}/ws");
    let client = |text: &std::path::Path| {
        process()
            .args(["client", "--server", &url, "--text"])
            .arg(text)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let devices = [client(&file), client(&folder)];
    let table = server.wait_with_output().unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.lines().any(|l| l.trim_start().starts_with("1 ")),
        "no round 1: {table}"
    );
    for device in devices {
        let said = String::from_utf8_lossy(&device.wait_with_output().unwrap().stdout).into_owned();
        assert!(said.contains("the text never leaves it"), "{said}");
        assert!(said.contains("round 1 evaluated here"), "{said}");
    }
    let history = std::fs::read_to_string(state.path().join("metrics.jsonl")).unwrap();
    assert!(history.contains("\"federated\""), "{history}");

    // Without text of its own, against a server whose devices bring theirs.
    let mut server = process()
        .args(["serve", "--data", "device", "--preset", "small", "--fresh"])
        .args(["--addr", &addr, "--rounds", "1"])
        .arg("--state-dir")
        .arg(tempfile::tempdir().unwrap().path())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    while std::net::TcpStream::connect(&addr).is_err() {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let out = process()
        .args(["client", "--server", &url])
        .output()
        .unwrap();
    let refused = (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    server.kill().unwrap();
    let _ = server.wait();
    assert!(!refused.0.success(), "{}", refused.1);
    assert!(refused.1.contains("--text PATH"), "{}", refused.1);
}

/// The `folio` binary as a process of its own (to run beside others).
fn process() -> std::process::Command {
    let mut cmd = std::process::Command::new(assert_cmd::cargo::cargo_bin("folio"));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .arg("--data-dir")
        .arg(data_dir());
    cmd
}

/// A DP run's ledger outlives any restart: 3 DP rounds, then the same state
/// continued with another server optimizer (ε only grows), then restarts that
/// would drop the ledger (plain FedAvg) or account for rounds it never saw (a
/// plain run turned DP) are refused with what to do.
#[test]
fn a_dp_ledger_survives_every_restart_and_a_run_that_would_reset_it_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().to_str().unwrap().to_owned();
    let run = |extra: &[&str], rounds: &str| {
        let mut command = small_population("3");
        command.args(["--seed", "4", "--rounds", rounds, "--state-dir", &state]);
        command.args(extra);
        command.output().unwrap()
    };
    let dp = ["--strategy", "dp-fedavg", "--clip-bound", "0.5"];
    let epsilons = || -> Vec<f64> {
        folio_host::state::load(dir.path(), Preset::Small.config().num_params())
            .unwrap()
            .unwrap()
            .history
            .iter()
            .filter_map(|r| r.epsilon)
            .collect()
    };
    assert!(run(&dp, "3").status.success());
    let before = epsilons();
    assert_eq!(before.len(), 4, "round 0 and 3 rounds: {before:?}");
    // Another server optimizer: the ledger carries on.
    let mut momentum = dp.to_vec();
    momentum.extend(["--server-optimizer", "fedavgm"]);
    let out = run(&momentum, "5");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = epsilons();
    assert_eq!(after.len(), 6);
    assert_eq!(after[..4], before[..], "the first rounds as they were");
    assert!(
        after.windows(2).all(|w| w[1] > w[0]),
        "ε never drops: {after:?}"
    );
    // Without DP the ledger would be dropped: refused, the state untouched.
    let plain = run(&[], "6");
    assert!(!plain.status.success());
    let why = String::from_utf8_lossy(&plain.stderr);
    assert!(
        why.contains("cannot be continued") && why.contains("--state-dir"),
        "{why}"
    );
    assert_eq!(epsilons(), after, "nothing changed");
    // A plain run turned DP: its earlier rounds had no ledger.
    let plain_dir = tempfile::tempdir().unwrap();
    let plain_state = plain_dir.path().to_str().unwrap();
    let mut first = small_population("3");
    first.args(["--seed", "4", "--rounds", "2", "--state-dir", plain_state]);
    assert!(first.output().unwrap().status.success());
    let mut turned = small_population("3");
    turned.args(["--seed", "4", "--rounds", "4", "--state-dir", plain_state]);
    turned.args(dp);
    let turned = turned.output().unwrap();
    assert!(!turned.status.success());
    let why = String::from_utf8_lossy(&turned.stderr);
    assert!(why.contains("cannot be continued"), "{why}");
}
