//! Secure rounds beside one hostile client, on a simulated clock: the rounds
//! committed in a span of time against honest clients alone.

use std::collections::BTreeMap;

use folio_secagg::{ClientStep, SecureClient, ServerStep};

use super::*;

/// What the hostile client does in each secure round it is in.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Hostile {
    /// Seals garbage for every neighbour.
    SpoilsShares,
    /// Says its neighbours' good shares did not open.
    AccusesFalsely,
    /// Masks random integers instead of its update.
    GarbageInput,
    /// Checks the shares, then says nothing.
    SilentAfterCheck,
}

/// Secure rounds committed in `minutes`: five clients (E hostile as told),
/// four a round, quorum 3, a 30 s step timeout; honest clients answer each
/// step at once and train for a second.
fn secure_rounds_beside(hostile: Option<Hostile>, minutes: u64) -> u64 {
    let mut config = config(
        StrategyConfig {
            clipping: Clipping::Fixed { bound: 1.0 },
            ..strategy_config(4, 3)
        },
        None,
    );
    config.rounds.secure = Some(folio_engine::SecureRounds {
        threshold: None,
        degree: 0,
        step_timeout: Duration::from_secs(30),
        min_cohort: 3,
    });
    let mut host = Host::new(config, fresh_start());
    let sessions: Vec<u64> = ["A", "B", "C", "D", "E"]
        .iter()
        .map(|c| host.join(c))
        .collect();
    let bad = sessions[4];
    let acts = |session: u64, kind: Hostile| session == bad && hostile == Some(kind);
    let mut clients: BTreeMap<u64, SecureClient> = BTreeMap::new();
    let mut queue: Vec<(Instant, u64, ClientStep)> = Vec::new();
    let mut seen = 0;
    let mut draws = 0u8;
    let end = host.now + Duration::from_secs(60 * minutes);
    while host.now < end {
        let sent: Vec<_> = host.sent[seen..].to_vec();
        seen = host.sent.len();
        for (to, message) in sent {
            for session in to {
                let now = host.now;
                let reply = match message.as_ref() {
                    ServerMessage::RoundStart(start) => {
                        let spec = start.secure.expect("secure rounds");
                        draws = draws.wrapping_add(1);
                        let (client, keys) = SecureClient::new(spec, [draws; 32]);
                        clients.insert(session, client);
                        Some((now, ClientStep::Keys(keys)))
                    }
                    ServerMessage::Secure(step) => {
                        let Some(client) = clients.get_mut(&session) else {
                            continue;
                        };
                        answer(client, step.clone(), session, &acts, now)
                    }
                    _ => None,
                };
                if let Some((at, step)) = reply {
                    queue.push((at, session, step));
                }
            }
        }
        let (due, later): (Vec<_>, Vec<_>) =
            queue.into_iter().partition(|(at, ..)| *at <= host.now);
        queue = later;
        if due.is_empty() {
            host.wait(Duration::from_millis(100));
        }
        for (_, session, step) in due {
            let _ = host.engine.secure(session, step, host.now);
            host.run();
        }
    }
    host.engine.completed_rounds()
}

/// `session`'s answer to `step` and when it goes up, as the client `acts`.
fn answer(
    client: &mut SecureClient,
    step: ServerStep,
    session: u64,
    acts: &impl Fn(u64, Hostile) -> bool,
    now: Instant,
) -> Option<(Instant, ClientStep)> {
    let spec = *client.spec();
    Some(match step {
        ServerStep::Roster(roster) => {
            let mut shares = client.roster(roster).ok()?;
            if acts(session, Hostile::SpoilsShares) {
                for sealed in &mut shares.sealed {
                    sealed.ciphertext[20] ^= 1;
                }
            }
            (now, ClientStep::Shares(shares))
        }
        ServerStep::Shares(mut shares) => {
            if acts(session, Hostile::AccusesFalsely) {
                // Spoiled here, so that the proofs are valid.
                for sealed in &mut shares.sealed {
                    sealed.ciphertext[20] ^= 1;
                }
            }
            (now, ClientStep::Check(client.shares(shares).ok()?))
        }
        ServerStep::Proceed(proceed) => {
            client.proceed(proceed).ok()?;
            if acts(session, Hostile::SilentAfterCheck) {
                return None;
            }
            let values = if acts(session, Hostile::GarbageInput) {
                (0..PARAMS + folio_secagg::quantize::EXTRAS)
                    .map(|i| (i as u32 + 1).wrapping_mul(0x9E37_79B9))
                    .collect()
            } else {
                let input = folio_secagg::Input {
                    delta: &[0.01; PARAMS],
                    weight: spec.weight(8),
                    loss: 2.0,
                    accuracy: 0.25,
                    held_out: folio_secagg::HeldOut::default(),
                };
                let mut rng =
                    <rand_chacha::ChaCha20Rng as rand_core::SeedableRng>::seed_from_u64(session);
                spec.quantizer.encode(&input, &mut rng).ok()?
            };
            let trained = now + Duration::from_secs(1);
            (
                trained,
                ClientStep::Masked(client.mask_values(values).ok()?),
            )
        }
        ServerStep::Unmask(request) => (now, ClientStep::Reveal(client.unmask(request).ok()?)),
    })
}

#[test]
fn one_hostile_client_of_each_kind_does_not_stall_secure_rounds() {
    let honest = secure_rounds_beside(None, 5);
    let mut rates = Vec::new();
    for kind in [
        Hostile::SpoilsShares,
        Hostile::AccusesFalsely,
        Hostile::GarbageInput,
        Hostile::SilentAfterCheck,
    ] {
        let rounds = secure_rounds_beside(Some(kind), 5);
        rates.push((kind, rounds));
    }
    println!(
        "secure rounds in 5 simulated minutes: honest {honest}, beside one hostile: {rates:?}"
    );
    assert!(honest > 100, "{honest}");
    for (kind, rounds) in rates {
        assert!(rounds * 10 >= honest * 9, "{kind:?}: {rounds} of {honest}");
    }
}
