//! Device checks: forged, malformed, hostile and resent answers to a probe.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_malformed_and_hostile_device_check_answers_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(checked(config(dir.path(), rounds(1), 1)))
        .await
        .unwrap();
    let answer = |id: u64, loss: f32, projections: Vec<f32>| {
        binary(&ClientMessage::ProbeAnswer(folio_proto::ProbeAnswer {
            id,
            loss,
            projections,
        }))
    };
    let mut socket = connect(&server).await;
    expect_error(
        &mut socket,
        answer(1, 1.0, vec![0.0; 8]),
        ErrorCode::NotJoined,
    )
    .await;
    join_as(&mut socket, join(Some(KENT))).await.unwrap();
    let ServerMessage::Probe(probe) = next_message(&mut socket).await else {
        panic!("a joined device is probed first");
    };
    // An answer to a probe it was not sent, one far longer than asked for.
    let forged = probe.id.wrapping_add(1);
    expect_error(
        &mut socket,
        answer(forged, 1.0, vec![0.0; 8]),
        ErrorCode::UnknownMessage,
    )
    .await;
    let long = answer(probe.id, 1.0, vec![0.0; 10_000]);
    expect_error(&mut socket, long, ErrorCode::MalformedFrame).await;
    // A non-finite answer fails the check, which is then spent: the right
    // answer afterwards is refused, and the device is never selected.
    expect_error(
        &mut socket,
        answer(probe.id, f32::NAN, vec![0.0; 8]),
        ErrorCode::DeviceCheckFailed,
    )
    .await;
    let config = folio_model::Preset::Small.config();
    let right = folio_client::answer_probe(&burn::prelude::Device::flex(), config, probe)
        .await
        .unwrap();
    let right = binary(&ClientMessage::ProbeAnswer(right));
    expect_error(&mut socket, right, ErrorCode::UnknownMessage).await;
    let status = server.status();
    assert_eq!(status["errors"]["device_check_failed"], 1, "{status}");
    assert!(status["open_round"].is_null(), "{status}");
    server.abort();
}

/// An answer to a device check resent many times is checked once: the first is
/// taken, each resend is refused at once (each would otherwise start another
/// reference computation on the server), and the device passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_check_answer_resent_many_times_is_checked_once() {
    use futures_util::SinkExt;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(checked(config(dir.path(), rounds(2), 1)))
        .await
        .unwrap();
    let mut socket = connect(&server).await;
    join_as(&mut socket, join(Some(KENT))).await.unwrap();
    let ServerMessage::Probe(probe) = next_message(&mut socket).await else {
        panic!("a joined device is probed first");
    };
    let config = folio_model::Preset::Small.config();
    let right = folio_client::answer_probe(&burn::prelude::Device::flex(), config, probe)
        .await
        .unwrap();
    // Fewer than the outbox holds: a client that does not read is dropped.
    const SENT: usize = 6;
    // In one write: the server reads them while the first is being checked.
    for _ in 0..SENT {
        socket
            .feed(binary(&ClientMessage::ProbeAnswer(right.clone())))
            .await
            .unwrap();
    }
    socket.flush().await.unwrap();
    let mut refused = Vec::new();
    while refused.len() < SENT - 1 {
        match next_message(&mut socket).await {
            ServerMessage::Error(error) => refused.push(error),
            ServerMessage::Heartbeat => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    // Refused while the first is checked, or once its verdict is in.
    assert!(
        refused.iter().all(|e| e.code == ErrorCode::UnknownMessage
            && (e.message.contains("answered already") || e.message.contains("no device check"))),
        "{refused:?}"
    );
    assert!(
        refused
            .iter()
            .any(|e| e.message.contains("answered already"))
    );
    folio_testkit::eventually("the device passes its check", || {
        server.status()["clients"][0]["check"] == "passed"
    })
    .await;
    server.abort();
}

/// The server process's resident memory, in MB.
fn rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb / 1024.0
}

/// The replay that took the server to 4 GB: 20 sessions (from 20 networks)
/// each sending a well-formed answer to its probe 30 times at once. Each probe
/// starts one reference computation, two run at a time, and the memory stays
/// flat. (The server runs in this test's process: the figure is its RSS.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_sessions_replaying_answers_leave_memory_flat() {
    use futures_util::SinkExt;
    const SESSIONS: usize = 20;
    const RESENT: usize = 30;
    let dir = tempfile::tempdir().unwrap();
    let mut config = checked(config(dir.path(), rounds(100), 1));
    // Every answer refused but the first counts against the connection.
    config.limits.error_budget = 64;
    config.limits.outbox_frames = 64;
    let server = Server::start(config).await.unwrap();
    let mut sockets = Vec::new();
    let mut probes = Vec::new();
    for i in 0..SESSIONS {
        let mut socket = ws_from(&server, &format!("127.0.{}.1", 10 + i))
            .await
            .unwrap();
        join_as(&mut socket, join(None)).await.unwrap();
        let ServerMessage::Probe(probe) = next_message(&mut socket).await else {
            panic!("a joined device is probed first");
        };
        probes.push(probe);
        sockets.push(socket);
    }
    let before = rss_mb();
    for (socket, probe) in sockets.iter_mut().zip(&probes) {
        let answer = folio_proto::ProbeAnswer {
            id: probe.id,
            loss: 4.0,
            projections: vec![0.5; probe.directions as usize],
        };
        for _ in 0..RESENT {
            socket
                .feed(binary(&ClientMessage::ProbeAnswer(answer.clone())))
                .await
                .unwrap();
        }
        socket.flush().await.unwrap();
    }
    let mut peak = before;
    folio_testkit::eventually("every device's check is in", || {
        peak = peak.max(rss_mb());
        let status = server.status();
        let clients = status["clients"].as_array().unwrap();
        clients.len() == SESSIONS && clients.iter().all(|c| c["check"].get("failed").is_some())
    })
    .await;
    println!(
        "{SESSIONS} sessions x {RESENT} answers: RSS {before:.0} MB before, peak {peak:.0} MB (+{:.0} MB)",
        peak - before
    );
    assert!(
        peak - before < 300.0,
        "RSS grew from {before:.0} to {peak:.0} MB"
    );
    server.abort();
}
