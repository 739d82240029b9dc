//! `folio bench secagg`: what secure aggregation costs next to a plain round,
//! with the same model, clients and training, measured in one run.
//!
//! Every message of both kinds of round is built for real and encoded as the
//! WebSocket carries it (its bytes counted); the clients' crypto and the
//! server's work are timed here, one client after another. A round's time is
//! what it takes with each device on its own machine: one client's training
//! and its own work, plus the server's work for the whole round (network
//! time left out: loopback, or a LAN, adds milliseconds per step). The
//! distributed-DP rows add each device's work on top: conditional rounding and
//! its share of Skellam noise (z = 1, planned for 80 % of the clients).

use std::collections::BTreeMap;
use std::time::Instant;

use burn::prelude::Device;
use clap::Args;
use folio_fed::codec::CheckedDelta;
use folio_fed::{Clipping, Encoding, StrategyConfig, codec, strategy};
use folio_model::Preset;
use folio_proto::{ClientMessage, ClientStep, RoundStart, ServerMessage, ServerStep, Update};
use folio_secagg::{Closed, Input, Quantizer, SecureClient, SecureServer, SecureSpec};

#[derive(Args)]
pub struct SecaggBenchArgs {
    #[arg(long, value_delimiter = ',', default_value = "small,medium")]
    presets: Vec<Preset>,
    #[arg(long, value_delimiter = ',', default_value = "10,64")]
    clients: Vec<usize>,
    /// SecAgg+'s degree for the sparse rows (0: 2⌈log₂ n⌉, the log-degree graph).
    #[arg(long, default_value_t = 0)]
    degree: u32,
    /// Runs of each round kind, after a warm-up; the median round is shown.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
}

/// One client's and the server's side of a round.
#[derive(Default)]
struct Cost {
    up: usize,
    down: usize,
    client_seconds: f64,
    server_seconds: f64,
}

impl Cost {
    /// The client's and the server's work (training is the same for both).
    fn seconds(&self) -> f64 {
        self.client_seconds + self.server_seconds
    }
}

const BOUND: f32 = 1.0;

fn frame_len<M: serde::Serialize>(message: &M) -> usize {
    folio_proto::encode(message).len()
}

fn round_start(weights: &[u8], secure: Option<SecureSpec>) -> ServerMessage {
    ServerMessage::RoundStart(RoundStart {
        round: 1,
        model: 0,
        weights: Some(weights.to_vec()),
        weights_encoding: Encoding::F16,
        deadline_ms: 600_000,
        local_epochs: 1,
        max_batches: Some(5),
        optimizer: folio_proto::Optimizer::Sgd,
        learning_rate: 0.5,
        clip_norm: None,
        delta_encoding: Encoding::F32,
        seed: 1,
        secure,
    })
}

fn delta(params: usize, salt: u64) -> Vec<f32> {
    let mut rng = folio_data::rng::SplitMix64::new(salt);
    (0..params)
        .map(|_| ((rng.next_f64() - 0.5) * 1e-3) as f32)
        .collect()
}

fn plain(params: usize, segments: &[usize], model: &[u8], deltas: &[Vec<f32>]) -> Cost {
    let strategy = strategy::build(
        StrategyConfig {
            clipping: Clipping::Fixed { bound: BOUND },
            ..StrategyConfig::fedavg(deltas.len())
        },
        &strategy::StrategyContext::seeded(0),
    );
    let state = strategy.initial_state(params);
    let mut open = strategy.open_round(&state, params).unwrap();
    let mut cost = Cost {
        down: frame_len(&round_start(model, None)),
        ..Cost::default()
    };
    let mut server = 0.0;
    for (i, delta) in deltas.iter().enumerate() {
        let started = Instant::now();
        let update = Update {
            round: 1,
            examples: 40,
            encoding: Encoding::F32,
            delta: codec::encode(delta, segments, Encoding::F32),
            train_loss: 2.0,
            train_accuracy: 0.3,
            train_seconds: 1.0,
        };
        let frame = folio_proto::encode(&ClientMessage::Update(update));
        if i == 0 {
            cost.client_seconds = started.elapsed().as_secs_f64();
            cost.up = frame.len();
        }
        let started = Instant::now();
        let Ok(ClientMessage::Update(update)) = folio_proto::decode_client(&frame) else {
            unreachable!("an update")
        };
        let checked = CheckedDelta::new(update.delta, segments, Encoding::F32).unwrap();
        strategy.accept(&mut open, &checked, 40, 40).unwrap();
        server += started.elapsed().as_secs_f64();
    }
    let started = Instant::now();
    let weights = vec![0f32; params];
    strategy.aggregate(&open, &weights, &state).unwrap();
    cost.server_seconds = server + started.elapsed().as_secs_f64();
    cost
}

/// The devices' noise of distributed DP at z = 1 for rounds of `n`.
fn device_noise(n: usize, params: usize) -> folio_secagg::quantize::DeviceNoise {
    let plan = folio_fed::DeviceNoisePlan::new(
        1.0,
        folio_fed::strategy::default_min_inputs(n as f64),
        n,
        params,
    )
    .expect("a plan fits");
    folio_engine::device_noise(&plan)
}

fn secure(
    params: usize,
    model: &[u8],
    deltas: &[Vec<f32>],
    degree: u32,
    noise: Option<folio_secagg::quantize::DeviceNoise>,
) -> Cost {
    let n = deltas.len();
    let spec = SecureSpec {
        id: 1,
        threshold: folio_secagg::graph::majority(n, degree as usize),
        degree,
        quantizer: Quantizer {
            clients: n as u32,
            clip_bound: BOUND,
            held_out_chars: 0,
            noise,
        },
        weight_scale: Some(40),
    };
    let sessions: Vec<u64> = (0..n as u64).collect();
    let mut server = SecureServer::new(spec, params, sessions.clone(), [7; 32]).unwrap();
    let mut cost = Cost {
        down: frame_len(&round_start(model, Some(spec))),
        ..Cost::default()
    };
    // Per client: bytes up and down, seconds of its own work.
    let mut per_client: BTreeMap<u64, Cost> = BTreeMap::new();
    let mut clients = BTreeMap::new();
    let mut server_seconds = 0.0;
    let take = |server: &mut SecureServer, session: u64, step: ClientStep| {
        let frame = folio_proto::encode(&ClientMessage::Secure(step));
        let started = Instant::now();
        let Ok(ClientMessage::Secure(step)) = folio_proto::decode_client(&frame) else {
            unreachable!("a secure step")
        };
        server.receive(session, step).unwrap();
        (frame.len(), started.elapsed().as_secs_f64())
    };
    for &s in &sessions {
        let started = Instant::now();
        let (client, keys) = SecureClient::new(spec, [s as u8 + 1; 32]);
        let own = per_client.entry(s).or_default();
        own.client_seconds += started.elapsed().as_secs_f64();
        let (bytes, seconds) = take(&mut server, s, ClientStep::Keys(keys));
        own.up += bytes;
        server_seconds += seconds;
        clients.insert(s, client);
    }
    loop {
        let started = Instant::now();
        let closed = server.close().unwrap();
        server_seconds += started.elapsed().as_secs_f64();
        let messages = match closed {
            Closed::Send(messages) => messages,
            Closed::Unmask(unmasking) => {
                let started = Instant::now();
                let sum = spec.quantizer.decode(&unmasking.run()).unwrap();
                std::hint::black_box(sum);
                server_seconds += started.elapsed().as_secs_f64();
                break;
            }
        };
        for (s, step) in messages {
            let own = per_client.get_mut(&s).unwrap();
            own.down += frame_len(&ServerMessage::Secure(step.clone()));
            let client = clients.get_mut(&s).unwrap();
            let started = Instant::now();
            let reply = match step {
                ServerStep::Roster(roster) => ClientStep::Shares(client.roster(roster).unwrap()),
                ServerStep::Shares(shares) => ClientStep::Check(client.shares(shares).unwrap()),
                ServerStep::Proceed(proceed) => {
                    client.proceed(proceed).unwrap();
                    let input = Input {
                        delta: &deltas[s as usize],
                        weight: spec.weight(40),
                        loss: 2.0,
                        accuracy: 0.3,
                        held_out: folio_secagg::HeldOut::default(),
                    };
                    ClientStep::Masked(client.mask(&input).unwrap())
                }
                ServerStep::Unmask(request) => ClientStep::Reveal(client.unmask(request).unwrap()),
            };
            own.client_seconds += started.elapsed().as_secs_f64();
            let (bytes, seconds) = take(&mut server, s, reply);
            own.up += bytes;
            server_seconds += seconds;
        }
    }
    // The busiest client's bytes and seconds (they differ little).
    let busiest = |f: fn(&Cost) -> f64| per_client.values().map(f).fold(0.0, f64::max);
    cost.up = busiest(|c| c.up as f64) as usize;
    cost.down += busiest(|c| c.down as f64) as usize;
    cost.client_seconds = busiest(|c| c.client_seconds);
    cost.server_seconds = server_seconds;
    cost
}

pub fn run(args: SecaggBenchArgs) -> anyhow::Result<()> {
    println!(
        "a round: one client's training (5 batches of 8 × 100 on flex, measured) + its own work + the server's; bytes per client, up and down"
    );
    println!(
        "preset  clients  mode                up/client  down/client  bytes ×   client s  server s  round s  round ×"
    );
    for &preset in &args.presets {
        let config = preset.config();
        let params = config.num_params();
        let segments: Vec<usize> = config
            .param_shapes()
            .iter()
            .map(|(_, shape)| shape.iter().product())
            .collect();
        let rate = pollster::block_on(folio_client::bench::train_chars_per_second(
            config,
            &Device::flex().autodiff(),
            8,
            100,
            5,
        ))?;
        let train = 5.0 * 8.0 * 100.0 / rate;
        let model = codec::encode(&vec![0.01f32; params], &[params], Encoding::F16);
        for &n in &args.clients {
            let deltas: Vec<Vec<f32>> = (0..n).map(|i| delta(params, i as u64)).collect();
            // A warm-up round of each kind first (allocations, caches), then
            // the median of `repeats` rounds, the kinds interleaved.
            plain(params, &segments, &model, &deltas);
            secure(params, &model, &deltas, 0, None);
            let noise = Some(device_noise(n, params));
            let plus = if args.degree == 0 {
                2 * (n as f64).log2().ceil() as u32
            } else {
                args.degree
            };
            let mut runs: [Vec<Cost>; 5] = Default::default();
            for _ in 0..args.repeats.max(1) {
                runs[0].push(plain(params, &segments, &model, &deltas));
                runs[1].push(secure(params, &model, &deltas, 0, None));
                runs[2].push(secure(params, &model, &deltas, plus, None));
                runs[3].push(secure(params, &model, &deltas, 0, noise));
                runs[4].push(secure(params, &model, &deltas, plus, noise));
            }
            let [base, full, sparse, full_noised, sparse_noised] = runs.map(|mut costs| {
                costs.sort_by(|a, b| a.seconds().total_cmp(&b.seconds()));
                costs.swap_remove(costs.len() / 2)
            });
            let base_bytes = (base.up + base.down) as f64;
            let base_round = train + base.seconds();
            let rows = [
                ("plain".to_owned(), base),
                ("secagg".to_owned(), full),
                (format!("secagg+ k={plus}"), sparse),
                ("secagg+ddp".to_owned(), full_noised),
                (format!("secagg+ k={plus}+ddp"), sparse_noised),
            ];
            for (mode, cost) in rows {
                let round = train + cost.seconds();
                println!(
                    "{:<6}  {n:>7}  {mode:<18}  {:>9}  {:>11}  {:>7.3}  {:>8.3}  {:>8.3}  {:>7.2}  {:>7.2}",
                    preset.name(),
                    cost.up,
                    cost.down,
                    (cost.up + cost.down) as f64 / base_bytes,
                    cost.client_seconds,
                    cost.server_seconds,
                    round,
                    round / base_round
                );
            }
        }
    }
    Ok(())
}
