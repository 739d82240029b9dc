use super::*;

#[test]
fn disconnected_sessions_expire_after_their_ttl_and_the_table_is_bounded() {
    let mut host = Host::fresh(strategy_config(5, 5), None);
    let a = host.engine.join(join("A"), host.now).unwrap();
    host.leave(a.session);
    assert_eq!(host.engine.poll_timeout(), Some(host.now + TTL));
    host.wait(TTL - Duration::from_secs(1));
    assert_eq!(host.engine.status(host.now).clients.len(), 1);
    host.wait(Duration::from_secs(2));
    assert!(host.engine.status(host.now).clients.is_empty(), "expired");
    let resume = CheckedJoin {
        resume: Some(a.token),
        client: None,
        ..join("A")
    };
    assert_ne!(
        host.engine.join(resume, host.now).unwrap().session,
        a.session
    );
    // A client with too little text to train on cannot join; a taken one neither.
    assert_eq!(
        host.engine.join(join("MUTE"), host.now).unwrap_err().code,
        ErrorCode::UnknownClient
    );
}

#[test]
fn a_crowd_from_one_network_gets_its_share_of_a_round_not_the_round() {
    // Rounds of 2 start once 5 are connected: four from one network, E alone.
    let mut host = Host::fresh(
        StrategyConfig {
            min_clients: 5,
            ..strategy_config(2, 2)
        },
        Some(6),
    );
    let crowd: Vec<u64> = ["A", "B", "C", "D"]
        .iter()
        .map(|id| {
            let joined = host
                .engine
                .join(
                    CheckedJoin {
                        group: 1,
                        ..join(id)
                    },
                    host.now,
                )
                .unwrap();
            joined.session
        })
        .collect();
    let lone = host.join("E");
    for round in 1..=6 {
        let (picked, _) = host.starts().last().cloned().unwrap();
        assert_eq!(picked.len(), 2);
        assert!(picked.contains(&lone), "round {round}: {picked:?}");
        assert_eq!(picked.iter().filter(|s| crowd.contains(s)).count(), 1);
        for session in picked {
            host.update(session, round, [1.0; PARAMS]).unwrap();
        }
    }
    assert!(host.engine.is_finished());
}

#[test]
fn a_network_opens_a_burst_of_sessions_then_one_at_a_time_and_resumes_freely() {
    let mut host = Host::fresh(strategy_config(5, 5), None);
    let from = |id: &str| CheckedJoin {
        group: 9,
        ..join(id)
    };
    let first: Vec<_> = ["A", "B", "C", "D"]
        .iter()
        .map(|id| host.engine.join(from(id), host.now).unwrap())
        .collect();
    let refused = host.engine.join(from("E"), host.now).unwrap_err();
    assert_eq!(refused.code, ErrorCode::ServerFull);
    assert!(refused.message.contains("10 s"), "{}", refused.message);
    // Another network is not held back.
    assert!(host.engine.join(join("E"), host.now).is_ok());
    // Resuming is free.
    host.leave(first[0].session);
    let resume = CheckedJoin {
        resume: Some(first[0].token.clone()),
        client: None,
        ..from("A")
    };
    assert_eq!(
        host.engine.join(resume, host.now).unwrap().session,
        first[0].session
    );
    // One more after the interval (D's client, D having left), then none.
    host.leave(first[3].session);
    host.wait(Duration::from_secs(10));
    let late = CheckedJoin {
        client: None,
        ..from("A")
    };
    assert!(host.engine.join(late.clone(), host.now).is_ok());
    assert_eq!(
        host.engine.join(late, host.now).unwrap_err().code,
        ErrorCode::ServerFull
    );
}
