//! The protocol end to end, natively and (wasm-bindgen-test) in a browser:
//! exact sums, dropouts after every step, abandoned rounds, refused shares,
//! and what one masked input tells the server.

use std::collections::BTreeMap;

use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

use crate::quantize::EXTRAS;
use crate::{
    ClientStep, Closed, Input, Quantizer, SecAggError, SecureClient, SecureServer, SecureSpec,
    ServerStep, mask,
};

#[cfg(target_family = "wasm")]
wasm_bindgen_test::wasm_bindgen_test_configure!(run_in_browser);

const PARAMS: usize = 40;

fn spec(clients: u32, threshold: u32, degree: u32) -> SecureSpec {
    SecureSpec {
        id: 7,
        threshold,
        degree,
        quantizer: Quantizer {
            clients,
            clip_bound: 1.0,
            held_out_chars: 1_000,
            noise: None,
        },
        weight_scale: Some(100),
    }
}

/// The step after which a client goes silent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Drop {
    /// Sends no keys.
    Keys,
    /// Sends keys, no shares.
    Shares,
    /// Sends shares, no masked input.
    Masked,
    /// Sends its masked input, reveals nothing.
    Reveal,
}

struct Outcome {
    /// The unmasked sum, or why the round was abandoned.
    sum: Result<Vec<u32>, SecAggError>,
    /// The plain sum of the quantised inputs the server says it summed.
    expected: Vec<u32>,
    contributors: usize,
}

/// A round of `n` clients (sessions 100, 101, ...), those in `drops` going
/// silent at their step.
fn run(n: u64, spec: SecureSpec, drops: &BTreeMap<u64, Drop>, seed: u64) -> Outcome {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let sessions: Vec<u64> = (100..100 + n).collect();
    let mut server = SecureServer::new(spec, PARAMS, sessions.clone(), [seed as u8; 32]).unwrap();
    let mut clients = BTreeMap::new();
    let mut quantised = BTreeMap::new();
    let alive = |s: u64, step: Drop| drops.get(&s).is_none_or(|&d| d > step);
    for &s in &sessions {
        let mut entropy = [0u8; 32];
        rng.fill_bytes(&mut entropy);
        let (client, keys) = SecureClient::new(spec, entropy);
        clients.insert(s, client);
        let delta: Vec<f32> = (0..PARAMS)
            .map(|_| (rng.next_u32() % 1000) as f32 / 5e4 - 0.01)
            .collect();
        let input = Input {
            delta: &delta,
            weight: 0.5,
            loss: 3.0,
            accuracy: 0.4,
            held_out: crate::HeldOut {
                loss_sum: 600.0,
                correct: 120.0,
                chars: 300.0,
            },
        };
        quantised.insert(s, spec.quantizer.encode(&input, &mut rng).unwrap());
        if alive(s, Drop::Keys) {
            server.receive(s, ClientStep::Keys(keys)).unwrap();
        } else {
            server.leave(s);
        }
    }
    let result = loop {
        assert!(server.is_complete());
        let messages = match server.close() {
            Err(why) => break Err(why),
            Ok(Closed::Unmask(unmasking)) => break Ok(unmasking.run()),
            Ok(Closed::Send(messages)) => messages,
        };
        for (s, message) in messages {
            // The step each message asks for (the check comes with the shares).
            let step = match &message {
                ServerStep::Roster(_) => Drop::Shares,
                ServerStep::Shares(_) => Drop::Keys,
                ServerStep::Proceed(_) => Drop::Masked,
                ServerStep::Unmask(_) => Drop::Reveal,
            };
            if !alive(s, step) {
                server.leave(s);
                continue;
            }
            let client = clients.get_mut(&s).unwrap();
            let reply = match message {
                ServerStep::Roster(roster) => ClientStep::Shares(client.roster(roster).unwrap()),
                ServerStep::Shares(shares) => ClientStep::Check(client.shares(shares).unwrap()),
                ServerStep::Proceed(proceed) => {
                    client.proceed(proceed).unwrap();
                    ClientStep::Masked(client.mask_values(quantised[&s].clone()).unwrap())
                }
                ServerStep::Unmask(request) => ClientStep::Reveal(client.unmask(request).unwrap()),
            };
            server.receive(s, reply).unwrap();
        }
    };
    let contributors = server.contributors();
    let mut expected = vec![0u32; PARAMS + EXTRAS];
    for s in &contributors {
        for (e, v) in expected.iter_mut().zip(&quantised[s]) {
            *e = e.wrapping_add(*v);
        }
    }
    Outcome {
        sum: result,
        expected,
        contributors: contributors.len(),
    }
}

fn dropping(sessions: impl IntoIterator<Item = u64>, at: Drop) -> BTreeMap<u64, Drop> {
    sessions.into_iter().map(|s| (s, at)).collect()
}

#[cfg_attr(not(target_family = "wasm"), test)]
#[cfg_attr(target_family = "wasm", wasm_bindgen_test::wasm_bindgen_test)]
fn the_unmasked_sum_is_the_plain_quantised_sum() {
    // Full SecAgg with a majority threshold, and SecAgg+ with 6 neighbours
    // (t = 4 of the 7 holders).
    for (n, degree, t) in [(3, 0, 2), (10, 0, 6), (20, 6, 4)] {
        let outcome = run(n, spec(n as u32, t, degree), &BTreeMap::new(), n);
        assert_eq!(outcome.contributors, n as usize);
        assert_eq!(
            outcome.sum.unwrap(),
            outcome.expected,
            "{n} clients, degree {degree}"
        );
    }
}

#[cfg_attr(not(target_family = "wasm"), test)]
#[cfg_attr(target_family = "wasm", wasm_bindgen_test::wasm_bindgen_test)]
fn dropouts_after_each_step_up_to_n_minus_t_still_give_the_exact_sum() {
    let (n, t) = (10u64, 6u32);
    for at in [Drop::Keys, Drop::Shares, Drop::Masked, Drop::Reveal] {
        for dropped in [0, 1, n - u64::from(t)] {
            let drops = dropping(100..100 + dropped, at);
            let outcome = run(n, spec(n as u32, t, 0), &drops, 11 + dropped);
            let sum = outcome
                .sum
                .unwrap_or_else(|e| panic!("{dropped} dropped at {at:?}: {e}"));
            assert_eq!(sum, outcome.expected, "{dropped} dropped at {at:?}");
            // Clients that masked their input are in the sum, even if they
            // then left: their self masks are rebuilt from shares.
            let in_sum = if at >= Drop::Reveal { n } else { n - dropped };
            assert_eq!(outcome.contributors as u64, in_sum);
        }
    }
    // Dropouts spread over every step at once.
    let drops = BTreeMap::from([
        (100, Drop::Keys),
        (103, Drop::Shares),
        (105, Drop::Masked),
        (108, Drop::Reveal),
    ]);
    let outcome = run(n, spec(n as u32, t, 0), &drops, 5);
    assert_eq!(outcome.sum.unwrap(), outcome.expected);
    assert_eq!(outcome.contributors, 7);
}

#[cfg_attr(not(target_family = "wasm"), test)]
#[cfg_attr(target_family = "wasm", wasm_bindgen_test::wasm_bindgen_test)]
fn more_than_n_minus_t_dropouts_abandon_the_round() {
    let (n, t) = (10u64, 6u32);
    for at in [Drop::Keys, Drop::Shares, Drop::Masked, Drop::Reveal] {
        let drops = dropping(100..100 + n - u64::from(t) + 1, at);
        let outcome = run(n, spec(n as u32, t, 0), &drops, 23);
        assert!(
            matches!(outcome.sum, Err(SecAggError::TooFew { .. })),
            "{at:?}: {:?}",
            outcome.sum.map(|_| "a sum")
        );
    }
}

#[cfg_attr(not(target_family = "wasm"), test)]
#[cfg_attr(target_family = "wasm", wasm_bindgen_test::wasm_bindgen_test)]
fn secagg_plus_survives_dropouts_within_each_neighbourhood() {
    // 30 clients, 8 neighbours each, t = 5 of the 9 holders: 3 dropped anywhere
    // leave every neighbourhood at least 6.
    let drops = BTreeMap::from([
        (101, Drop::Shares),
        (110, Drop::Masked),
        (120, Drop::Reveal),
    ]);
    let outcome = run(30, spec(30, 5, 8), &drops, 31);
    assert_eq!(outcome.sum.unwrap(), outcome.expected);
    assert_eq!(outcome.contributors, 28);
}

/// A three-client round up to the shares step; returns the server, the clients
/// and the share messages the server relays.
fn three_clients_relayed(seed: u8) -> (SecureServer, Vec<SecureClient>, Vec<crate::SharesFor>) {
    three_clients_sharing(seed, |_, _| {})
}

/// [`three_clients_relayed`], each client's shares edited by `spoil` (given
/// its index) before they go up.
fn three_clients_sharing(
    seed: u8,
    spoil: impl Fn(usize, &mut crate::Shares),
) -> (SecureServer, Vec<SecureClient>, Vec<crate::SharesFor>) {
    let spec = spec(3, 2, 0);
    let mut server = SecureServer::new(spec, PARAMS, [1, 2, 3], [seed; 32]).unwrap();
    let mut clients = Vec::new();
    for s in 1..=3u64 {
        let (client, keys) = SecureClient::new(spec, [seed + s as u8; 32]);
        server.receive(s, ClientStep::Keys(keys)).unwrap();
        clients.push(client);
    }
    let Ok(Closed::Send(rosters)) = server.close() else {
        panic!("keys close")
    };
    for (s, message) in rosters {
        let ServerStep::Roster(roster) = message else {
            panic!("a roster")
        };
        let mut shares = clients[s as usize - 1].roster(roster).unwrap();
        spoil(s as usize - 1, &mut shares);
        server.receive(s, ClientStep::Shares(shares)).unwrap();
    }
    let Ok(Closed::Send(relayed)) = server.close() else {
        panic!("shares close")
    };
    let relayed = relayed
        .into_iter()
        .map(|(_, m)| match m {
            ServerStep::Shares(shares) => shares,
            _ => panic!("shares"),
        })
        .collect();
    (server, clients, relayed)
}

#[cfg_attr(not(target_family = "wasm"), test)]
#[cfg_attr(target_family = "wasm", wasm_bindgen_test::wasm_bindgen_test)]
fn tampered_replayed_or_misdirected_shares_are_named_or_refused() {
    let (_, _, relayed) = three_clients_relayed(40);
    let fresh = |i: usize| {
        let (_, mut clients, _) = three_clients_relayed(40);
        clients.remove(i)
    };
    let unopened = |check: crate::Check| {
        let mut owners: Vec<u32> = check.unopened.iter().map(|u| u.owner).collect();
        owners.sort_unstable();
        owners
    };
    // Tampered: one bit of one ciphertext flipped; that share is named.
    let mut tampered = relayed[0].clone();
    tampered.sealed[0].ciphertext[20] ^= 1;
    let mut owners: Vec<u32> = relayed[0].sealed.iter().map(|s| s.peer).collect();
    owners.sort_unstable();
    let tampered_owner = tampered.sealed[0].peer;
    assert_eq!(
        unopened(fresh(0).shares(tampered).unwrap()),
        [tampered_owner]
    );
    // Replayed from another round (other keys): none opens.
    let (_, _, other_round) = three_clients_relayed(90);
    assert_eq!(
        unopened(fresh(0).shares(other_round[0].clone()).unwrap()),
        owners
    );
    // A share relabelled as coming from another neighbour: neither opens.
    let mut relabelled = relayed[0].clone();
    let (a, b) = (relabelled.sealed[0].peer, relabelled.sealed[1].peer);
    relabelled.sealed[0].peer = b;
    relabelled.sealed[1].peer = a;
    assert_eq!(unopened(fresh(0).shares(relabelled).unwrap()), owners);
    // The server's doing: the same share twice, or a client's own share.
    let mut doubled = relayed[0].clone();
    doubled.sealed.push(doubled.sealed[0].clone());
    assert!(matches!(
        fresh(0).shares(doubled),
        Err(SecAggError::BadShare(_))
    ));
    assert!(matches!(
        fresh(0).shares(relayed[1].clone()),
        Err(SecAggError::BadShare(_))
    ));
    // The genuine message opens.
    assert!(
        fresh(0)
            .shares(relayed[0].clone())
            .unwrap()
            .unopened
            .is_empty()
    );
}

/// Three clients through the check (each client's shares edited by `spoil`
/// before they go up); returns the server's answer to closing the check.
fn three_clients_checked(
    seed: u8,
    spoil: impl Fn(usize, &mut crate::Shares),
) -> (SecureServer, Vec<SecureClient>, Result<Closed, SecAggError>) {
    let (mut server, mut clients, relayed) = three_clients_sharing(seed, spoil);
    for (i, (client, shares)) in clients.iter_mut().zip(relayed).enumerate() {
        let check = client.shares(shares).unwrap();
        server
            .receive(i as u64 + 1, ClientStep::Check(check))
            .unwrap();
    }
    let closed = server.close();
    (server, clients, closed)
}

/// Three clients ready to mask.
fn three_clients_ready(seed: u8) -> (SecureServer, Vec<SecureClient>) {
    let (server, mut clients, closed) = three_clients_checked(seed, |_, _| {});
    let Ok(Closed::Send(messages)) = closed else {
        panic!("check close")
    };
    for (s, message) in messages {
        let ServerStep::Proceed(proceed) = message else {
            panic!("proceed")
        };
        assert!(proceed.excluded.is_empty());
        clients[s as usize - 1].proceed(proceed).unwrap();
    }
    (server, clients)
}

#[cfg_attr(not(target_family = "wasm"), test)]
#[cfg_attr(target_family = "wasm", wasm_bindgen_test::wasm_bindgen_test)]
fn a_spoiled_share_puts_out_its_owner_and_a_false_claim_its_accuser() {
    // Client 1 (index 0) spoils the share it seals for index 1: index 1 names
    // it, the server opens that share itself, and client 1 is out.
    let spoil_for_1 = |i: usize, shares: &mut crate::Shares| {
        if i == 0 {
            let to_1 = shares.sealed.iter_mut().find(|s| s.peer == 1).unwrap();
            to_1.ciphertext[30] ^= 0x40;
        }
    };
    let (server, mut clients, closed) = three_clients_checked(70, spoil_for_1);
    assert_eq!(server.culprits(), [1]);
    let Ok(Closed::Send(messages)) = closed else {
        panic!("the round goes on without it")
    };
    assert_eq!(messages.len(), 2, "the two others go on");
    for (s, message) in messages {
        let ServerStep::Proceed(proceed) = message else {
            panic!("proceed")
        };
        assert_eq!(proceed.excluded, [0]);
        clients[s as usize - 1].proceed(proceed).unwrap();
    }
    // A client refuses to go on beside an owner whose share did not open.
    let (_, mut clients, _) = three_clients_checked(70, spoil_for_1);
    let kept = crate::Proceed {
        round: 7,
        excluded: Vec::new(),
    };
    assert!(matches!(
        clients[1].proceed(kept),
        Err(SecAggError::BadRequest(_))
    ));
    // Index 2 claims that index 0's good share did not open (it spoils its
    // own copy to get a valid proof): the server's copy opens, and client 3
    // is out. A claim whose proof is bent counts against its maker the same.
    for bend in [false, true] {
        let (mut server, mut clients, relayed) = three_clients_relayed(80);
        for (i, (client, mut shares)) in clients.iter_mut().zip(relayed).enumerate() {
            if i == 2 {
                shares.sealed[0].ciphertext[0] ^= 1;
            }
            let mut check = client.shares(shares).unwrap();
            if i == 2 && bend {
                check.unopened[0].proof.response[3] ^= 1;
            }
            server
                .receive(i as u64 + 1, ClientStep::Check(check))
                .unwrap();
        }
        assert!(server.close().is_ok());
        assert_eq!(server.culprits(), [3], "bent proof: {bend}");
    }
}

#[cfg_attr(not(target_family = "wasm"), test)]
#[cfg_attr(target_family = "wasm", wasm_bindgen_test::wasm_bindgen_test)]
fn the_server_refuses_what_a_step_does_not_take() {
    let spec = spec(3, 2, 0);
    let mut server = SecureServer::new(spec, PARAMS, [1, 2, 3], [1; 32]).unwrap();
    let (_, keys) = SecureClient::new(spec, [1; 32]);
    let (_, other_round) = SecureClient::new(SecureSpec { id: 8, ..spec }, [2; 32]);
    assert!(matches!(
        server.receive(1, ClientStep::Keys(other_round)),
        Err(SecAggError::WrongRound { .. })
    ));
    assert!(matches!(
        server.receive(9, ClientStep::Keys(keys.clone())),
        Err(SecAggError::NotExpected(_))
    ));
    server.receive(1, ClientStep::Keys(keys.clone())).unwrap();
    assert!(matches!(
        server.receive(1, ClientStep::Keys(keys)),
        Err(SecAggError::NotExpected(_))
    ));
    let masked = crate::Masked {
        round: 7,
        input: vec![0; 8],
    };
    assert!(matches!(
        server.receive(2, ClientStep::Masked(masked)),
        Err(SecAggError::OutOfOrder { .. })
    ));
    // A masked input of the wrong length, at its step.
    let (mut server, mut clients) = three_clients_ready(50);
    let short = clients[0].mask_values(vec![0; PARAMS]).unwrap();
    assert!(matches!(
        server.receive(1, ClientStep::Masked(short)),
        Err(SecAggError::WrongLength { .. })
    ));
}

#[cfg_attr(not(target_family = "wasm"), test)]
#[cfg_attr(target_family = "wasm", wasm_bindgen_test::wasm_bindgen_test)]
fn a_client_never_reveals_both_secrets_of_one_neighbour() {
    let (_, mut clients) = three_clients_ready(60);
    for client in &mut clients {
        client.mask_values(vec![0; PARAMS + EXTRAS]).unwrap();
    }
    let both = crate::Unmask {
        round: 7,
        survivors: vec![0, 1],
        dropped: vec![1],
    };
    assert!(matches!(
        clients[0].unmask(both),
        Err(SecAggError::BadRequest(_))
    ));
    let too_few = crate::Unmask {
        round: 7,
        survivors: vec![0],
        dropped: vec![1, 2],
    };
    assert!(matches!(
        clients[0].unmask(too_few),
        Err(SecAggError::TooFew { .. })
    ));
}

#[cfg_attr(not(target_family = "wasm"), test)]
#[cfg_attr(target_family = "wasm", wasm_bindgen_test::wasm_bindgen_test)]
fn one_masked_input_reads_as_uniform_noise() {
    // A client's masked input, against its plain quantised input: its bytes
    // are uniform (chi-squared) and its values uncorrelated with the input.
    let values = 20_000;
    let spec = SecureSpec {
        id: 7,
        threshold: 2,
        degree: 0,
        quantizer: Quantizer {
            clients: 3,
            clip_bound: 1.0,
            held_out_chars: 0,
            noise: None,
        },
        weight_scale: None,
    };
    let mut server = SecureServer::new(spec, values - EXTRAS, [1, 2, 3], [3; 32]).unwrap();
    let mut clients: Vec<SecureClient> = (1..=3u8)
        .map(|s| {
            let (client, keys) = SecureClient::new(spec, [s * 17; 32]);
            server
                .receive(u64::from(s), ClientStep::Keys(keys))
                .unwrap();
            client
        })
        .collect();
    for step in 0..3 {
        let Ok(Closed::Send(messages)) = server.close() else {
            panic!("step {step}")
        };
        for (s, message) in messages {
            let client = &mut clients[s as usize - 1];
            match message {
                ServerStep::Roster(roster) => {
                    let shares = client.roster(roster).unwrap();
                    server.receive(s, ClientStep::Shares(shares)).unwrap();
                }
                ServerStep::Shares(shares) => {
                    let check = client.shares(shares).unwrap();
                    server.receive(s, ClientStep::Check(check)).unwrap();
                }
                ServerStep::Proceed(proceed) => client.proceed(proceed).unwrap(),
                ServerStep::Unmask(_) => unreachable!(),
            }
        }
    }
    // A strongly structured input: a ramp.
    let plain: Vec<u32> = (0..values as u32).map(|i| i * 1000).collect();
    let masked = mask::from_bytes(&clients[0].mask_values(plain.clone()).unwrap().input).unwrap();
    let mut counts = [0f64; 256];
    for v in &masked {
        for b in v.to_le_bytes() {
            counts[b as usize] += 1.0;
        }
    }
    let expected = (values * 4) as f64 / 256.0;
    let chi2: f64 = counts
        .iter()
        .map(|c| (c - expected).powi(2) / expected)
        .sum();
    // 255 degrees of freedom: the 0.999 quantile is about 330.
    assert!(chi2 < 330.0, "chi-squared {chi2}");
    let as_f64 = |v: &[u32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<_>>();
    let r = correlation(&as_f64(&plain), &as_f64(&masked));
    // |r| of independent samples is about 1/√n = 0.007.
    assert!(r.abs() < 0.03, "correlation {r}");
}

fn correlation(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = a.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = b.iter().map(|y| (y - mb).powi(2)).sum();
    cov / (va * vb).sqrt()
}

/// Distributed DP through the whole protocol, in the browser too: each client
/// masks its own update, noised from its own entropy, and the unmasked sum
/// decodes to the clipped deltas' sum plus all the devices' noise, centred, of
/// the variance they were told to add; no device figure but the weight is in it.
#[cfg_attr(not(target_family = "wasm"), test)]
#[cfg_attr(target_family = "wasm", wasm_bindgen_test::wasm_bindgen_test)]
fn devices_noise_their_own_inputs_and_the_sum_carries_all_of_it() {
    let (n, dims) = (6u64, 4_000);
    let mut spec = spec(n as u32, 4, 0);
    spec.quantizer.held_out_chars = 0;
    // 10⁶ steps a clip bound of 1, each device adding (0.2·10⁶)² steps².
    spec.quantizer.noise = Some(crate::quantize::DeviceNoise {
        scaled_bound: 1e6,
        rounded_bound: 1e6 + 100.0,
        variance: 4e10,
    });
    let sessions: Vec<u64> = (100..100 + n).collect();
    let mut server = SecureServer::new(spec, dims, sessions.clone(), [9; 32]).unwrap();
    let mut clients = BTreeMap::new();
    let mut deltas = BTreeMap::new();
    for &s in &sessions {
        let (client, keys) = SecureClient::new(spec, [s as u8; 32]);
        clients.insert(s, client);
        let delta: Vec<f32> = (0..dims)
            .map(|i| ((s as usize * 7 + i) as f32).sin() * 0.01)
            .collect();
        deltas.insert(s, delta);
        server.receive(s, ClientStep::Keys(keys)).unwrap();
    }
    let sum = loop {
        let messages = match server.close().unwrap() {
            Closed::Unmask(unmasking) => break unmasking.run(),
            Closed::Send(messages) => messages,
        };
        for (s, message) in messages {
            let client = clients.get_mut(&s).unwrap();
            let reply = match message {
                ServerStep::Roster(roster) => ClientStep::Shares(client.roster(roster).unwrap()),
                ServerStep::Shares(shares) => ClientStep::Check(client.shares(shares).unwrap()),
                ServerStep::Proceed(proceed) => {
                    client.proceed(proceed).unwrap();
                    let input = Input {
                        delta: &deltas[&s],
                        weight: 1.0,
                        loss: 3.0,
                        accuracy: 0.4,
                        held_out: crate::HeldOut::default(),
                    };
                    ClientStep::Masked(client.mask(&input).unwrap())
                }
                ServerStep::Unmask(request) => ClientStep::Reveal(client.unmask(request).unwrap()),
            };
            server.receive(s, reply).unwrap();
        }
    };
    let decoded = spec.quantizer.decode(&sum).unwrap();
    let errors: Vec<f64> = (0..dims)
        .map(|i| {
            let exact: f64 = deltas.values().map(|d| f64::from(d[i])).sum();
            f64::from(decoded.weighted_delta[i]) - exact
        })
        .collect();
    let mean = errors.iter().sum::<f64>() / dims as f64;
    let std = (errors.iter().map(|e| e * e).sum::<f64>() / dims as f64).sqrt();
    // Six devices of 0.2 each: √6 · 0.2.
    let expected = spec.quantizer.noise_std(n as usize);
    assert!((expected - 6f64.sqrt() * 0.2).abs() < 1e-9);
    assert!(
        (std / expected - 1.0).abs() < 0.06,
        "noise {std} vs {expected}"
    );
    assert!(
        mean.abs() < 5.0 * expected / (dims as f64).sqrt(),
        "mean {mean}"
    );
    assert!((decoded.weight - 6.0).abs() < 1e-6);
    assert_eq!(
        (decoded.weighted_loss, decoded.weighted_accuracy),
        (0.0, 0.0)
    );
}
