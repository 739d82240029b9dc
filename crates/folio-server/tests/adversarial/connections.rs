//! Connections: oversized fields and frames, garbage, forged and doubled
//! sessions, tokens, origins and the admin API, slow and idle connections.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_fields_and_frames_are_refused_before_any_work() {
    let (_dir, server) = start(rounds(2), Limits::default(), AccessConfig::default()).await;
    let mut socket = connect(&server).await;
    // A 200 kB client id used to freeze the server in a closest-match search.
    let started = Instant::now();
    let long_id = "K".repeat(200_000);
    let huge_id = join_with(|j| j.client = Some(long_id.clone()));
    expect_error(&mut socket, binary(&huge_id), ErrorCode::FieldTooLong).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let big_backend = join_with(|j| j.backend = "w".repeat(65));
    expect_error(&mut socket, binary(&big_backend), ErrorCode::FieldTooLong).await;
    let big_adapter = join_with(|j| j.adapter = Some("a".repeat(257)));
    expect_error(&mut socket, binary(&big_adapter), ErrorCode::FieldTooLong).await;
    // A near-miss id of legal length gets suggestions, quickly.
    let started = Instant::now();
    let typo = join_with(|j| j.client = Some("THE_TRAGEDY_OF_KING_LEAR_KENTT".into()));
    socket.send(binary(&typo)).await.unwrap();
    let ServerMessage::Error(error) = next_message(&mut socket).await else {
        panic!("no error")
    };
    assert_eq!(error.code, ErrorCode::UnknownClient);
    assert!(error.message.contains(KENT), "{}", error.message);
    assert!(started.elapsed() < Duration::from_secs(2));
    // Nothing was kept for the refused joins.
    assert_eq!(server.status()["clients"].as_array().unwrap().len(), 0);

    // A 10 MB frame: cut off by the WebSocket layer from its header.
    let mut flooder = connect(&server).await;
    let _ = flooder
        .send(Message::Binary(vec![0u8; 10 << 20].into()))
        .await;
    until_closed(&mut flooder, Duration::from_secs(10)).await;
    assert_eq!(error_count(&server, "frame_too_large"), 1);
    // The first connection is unharmed.
    assert_eq!(
        join_as(&mut socket, join(Some(KENT)))
            .await
            .unwrap()
            .client_id,
        KENT
    );
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_keeps_sending_garbage_is_closed() {
    let limits = Limits {
        error_budget: 5,
        ..Limits::default()
    };
    let (_dir, server) = start(rounds(2), limits, AccessConfig::default()).await;
    let mut socket = connect(&server).await;
    for _ in 0..6 {
        let _ = socket.send(Message::Binary(vec![0xff; 3].into())).await;
    }
    let codes = until_closed(&mut socket, Duration::from_secs(10)).await;
    assert_eq!(codes.len(), 6, "{codes:?}");
    assert_eq!(codes.last(), Some(&ErrorCode::TooManyErrors));

    // Late updates are a slow client, not garbage: they never spend the budget.
    let mut slow = connect(&server).await;
    join_as(&mut slow, join(Some(KENT))).await.unwrap();
    let n = server.weights().len();
    for _ in 0..10 {
        expect_error(
            &mut slow,
            binary(&update(0, 8, &vec![0.0; n], Encoding::F32)),
            ErrorCode::RoundClosed,
        )
        .await;
    }
    assert!(
        join_as(&mut slow, join(None)).await.is_err(),
        "still served"
    );
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_cannot_be_forged_stolen_or_doubled() {
    let limits = Limits {
        session_ttl: Duration::from_secs(2),
        ..Limits::default()
    };
    let (_dir, server) = start(rounds(5), limits, AccessConfig::default()).await;
    let mut victim = connect(&server).await;
    let welcome = join_as(&mut victim, join(Some(KENT))).await.unwrap();
    let (id, secret) = welcome.session.split_once('.').unwrap();
    assert_eq!(secret.len(), 32, "128 random bits");
    assert!(secret.chars().all(|c| c.is_ascii_hexdigit()));

    // While the victim is connected: its token, its client, are not to be had.
    let mut thief = connect(&server).await;
    let resume = |token: &str| join_with(|j| j.resume = Some(token.to_owned()));
    assert_eq!(
        join_as(&mut thief, resume(&welcome.session))
            .await
            .unwrap_err(),
        ErrorCode::SessionInUse
    );
    assert_eq!(
        join_as(&mut thief, join(Some(KENT))).await.unwrap_err(),
        ErrorCode::NoFreeClient
    );
    drop(victim);
    eventually("the server sees the victim leave", || {
        server.status()["connected"] == 0
    })
    .await;

    // Forged tokens (the old scheme, a guessed secret) give a new session and
    // another client, never the victim's.
    for forged in [
        "0000000000000001-1".to_owned(),
        format!("{id}.{}", "0".repeat(32)),
        format!("{id}.{}", &secret[..31]),
    ] {
        let mut thief = connect(&server).await;
        let got = join_as(&mut thief, resume(&forged)).await.unwrap();
        assert_ne!(got.client_id, KENT, "{forged}");
        assert_ne!(got.session, welcome.session);
    }
    // The rightful owner resumes.
    let mut back = connect(&server).await;
    let resumed = join_as(&mut back, resume(&welcome.session)).await.unwrap();
    assert_eq!(
        (resumed.client_id.as_str(), resumed.session.as_str()),
        (KENT, welcome.session.as_str())
    );
    drop(back);

    // Disconnected longer than the TTL: forgotten.
    let left = Instant::now();
    eventually("the session expires", || {
        let status = server.status();
        let clients = status["clients"].as_array().unwrap();
        !clients.iter().any(|c| c["client_id"] == KENT)
    })
    .await;
    assert!(
        left.elapsed() >= Duration::from_secs(1),
        "kept under its TTL"
    );
    let mut late = connect(&server).await;
    let fresh = join_as(&mut late, resume(&welcome.session)).await.unwrap();
    assert_ne!(fresh.session, welcome.session);
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_origins_and_the_admin_api() {
    let limits = Limits {
        token_lockout: Duration::from_secs(2),
        ..Limits::default()
    };
    let access = AccessConfig {
        join_token: Some("sesame".into()),
        admin_token: Some("root-secret".into()),
        allowed_origins: vec!["https://folio.example".into()],
        ..AccessConfig::default()
    };
    let (_dir, server) = start(rounds(5), limits, access).await;

    // A wrong token is answered only after the address's delay (2 s, then 4 s):
    // the guesser waits, not the others behind its address.
    let mut guesser = connect(&server).await;
    let guess = join_with(|j| j.token = Some("open".into()));
    let guessed = Instant::now();
    guesser.send(binary(&guess)).await.unwrap();
    let mut member = connect(&server).await;
    let right = join_with(|j| j.token = Some("sesame".into()));
    assert!(join_as(&mut member, right).await.is_ok());
    assert!(
        guessed.elapsed() < Duration::from_secs(2),
        "the right token waited for the wrong one"
    );
    assert_eq!(
        until_closed(&mut guesser, Duration::from_secs(5)).await,
        vec![ErrorCode::BadToken]
    );
    assert!(
        guessed.elapsed() >= Duration::from_secs(2),
        "answered before its delay"
    );

    // Origin: the page's own and allowed ones; not others.
    let with_origin = |origin: &str| {
        let mut request = url(&server).into_client_request().unwrap();
        request
            .headers_mut()
            .insert("Origin", origin.parse().unwrap());
        request
    };
    let own = format!("http://{}", server.addr);
    assert!(
        tokio_tungstenite::connect_async(with_origin(&own))
            .await
            .is_ok()
    );
    assert!(
        tokio_tungstenite::connect_async(with_origin("https://folio.example"))
            .await
            .is_ok()
    );
    let evil = tokio_tungstenite::connect_async(with_origin("http://evil.example"))
        .await
        .unwrap_err();
    assert!(evil.to_string().contains("403"), "{evil}");

    // The admin API: state export and revocation, only with the admin token.
    let admin = |method: &str, path: &str, token: Option<&str>| {
        let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        format!("{method} {path} HTTP/1.0\r\nHost: x\r\n{auth}Content-Length: 0\r\n\r\n")
    };
    // A wrong admin token waits the address's next delay (4 s); the right one
    // from the same address, meanwhile, does not.
    let (refused, state) = tokio::join!(
        async {
            let asked = Instant::now();
            let answer = raw_http(&server, &admin("GET", "/api/admin/state", None)).await;
            (answer, asked.elapsed())
        },
        async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let asked = Instant::now();
            let answer = raw_http(
                &server,
                &admin("GET", "/api/admin/state", Some("root-secret")),
            )
            .await;
            (answer, asked.elapsed())
        }
    );
    assert!(refused.0.starts_with("HTTP/1.0 401"), "{}", refused.0);
    assert!(refused.1 >= Duration::from_secs(4), "{:?}", refused.1);
    assert!(state.1 < refused.1, "{:?} vs {:?}", state.1, refused.1);
    let state = state.0;
    assert!(
        state.starts_with("HTTP/1.0 200") && state.contains("server_optimizer"),
        "{} bytes",
        state.len()
    );
    let session = server.status()["clients"][0]["session"].as_u64().unwrap();
    let revoked = raw_http(
        &server,
        &admin(
            "POST",
            &format!("/api/admin/sessions/{session}/revoke"),
            Some("root-secret"),
        ),
    )
    .await;
    assert!(revoked.starts_with("HTTP/1.0 200"), "{revoked}");
    until_closed(&mut member, Duration::from_secs(5)).await;
    // The operator's metrics: with the admin token only.
    let metrics = raw_http(&server, &admin("GET", "/metrics", Some("root-secret"))).await;
    assert!(metrics.starts_with("HTTP/1.0 200"), "{metrics}");
    for line in [
        "# TYPE folio_rounds_completed_total counter",
        "folio_rounds_completed_total 0",
        "folio_round_duration_seconds_bucket{le=\"+Inf\"} 0",
        "folio_refused_total{reason=\"bad_token\"} 2",
        "folio_sessions{state=\"connected\"} 0",
        "folio_eval_loss ",
    ] {
        assert!(metrics.contains(line), "no {line:?} in {metrics}");
    }
    server.abort();

    let (_dir, open) = start(rounds(5), Limits::default(), AccessConfig::default()).await;
    for path in ["/api/admin/state", "/metrics"] {
        assert!(
            raw_http(&open, &admin("GET", path, Some("x")))
                .await
                .starts_with("HTTP/1.0 403")
        );
    }
    open.abort();
}

async fn raw_http(server: &Server, request: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    String::from_utf8_lossy(&response).into_owned()
}

/// Whether the server closes `stream` within `within` (reads EOF or an error).
async fn closed_by_server(stream: &mut tokio::net::TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// A request whose head trickles in, a byte at a time well inside the idle
/// timeout, is closed once its head has taken longer than the header timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_trickling_its_head_is_closed_at_the_header_timeout() {
    let limits = Limits {
        header_timeout: Duration::from_secs(2),
        ..Limits::default()
    };
    let (_dir, server) = start(rounds(5), limits, AccessConfig::default()).await;
    let mut slow = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let head = b"GET /api/status HTTP/1.1\r\nHost: x\r\nX-Slow: ";
    let started = Instant::now();
    let mut closed = false;
    for &byte in head.iter().cycle().take(60) {
        if slow.write_all(&[byte]).await.is_err()
            || closed_by_server(&mut slow, Duration::from_millis(250)).await
        {
            closed = true;
            break;
        }
    }
    assert!(closed, "still open after {:?}", started.elapsed());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // A whole request in time is served as ever.
    let mut quick = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    quick
        .write_all(b"GET /api/status HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), quick.read_to_end(&mut response))
        .await
        .expect("answered")
        .unwrap();
    assert!(response.starts_with(b"HTTP/1.0 200"), "{response:?}");
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_half_open_and_excess_connections_are_closed() {
    let limits = Limits {
        max_connections_per_address: 3,
        http_idle: Duration::from_secs(2),
        join_timeout: Duration::from_millis(1500),
        heartbeat: Duration::from_millis(400),
        idle_timeout: Duration::from_millis(1500),
        ..Limits::default()
    };
    let (_dir, server) = start(rounds(5), limits, AccessConfig::default()).await;
    // Per-address cap: 3 WebSockets, and 8 more connections kept for plain
    // HTTP; the 12th connection is closed at once.
    let mut held = Vec::new();
    for _ in 0..11 {
        held.push(tokio::net::TcpStream::connect(server.addr).await.unwrap());
    }
    let mut twelfth = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    assert!(closed_by_server(&mut twelfth, Duration::from_secs(5)).await);
    assert_eq!(server.open_connections(), 11);
    // Idle sockets and a half-sent request are closed after the idle timeout.
    held[0]
        .write_all(b"GET /api/status HTTP/1.1\r\nHost:")
        .await
        .unwrap();
    let started = Instant::now();
    for stream in &mut held {
        assert!(closed_by_server(stream, Duration::from_secs(5)).await);
    }
    assert!(started.elapsed() >= Duration::from_secs(1), "closed early");
    drop(held);
    eventually("the closed sockets are released", || {
        server.open_connections() == 0
    })
    .await;

    // A WebSocket that never joins: told, then closed, even if it sends pings.
    let mut pinger = connect(&server).await;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(5);
    let mut codes = Vec::new();
    while Instant::now() < deadline {
        let _ = pinger.send(Message::Ping(Vec::new().into())).await;
        match tokio::time::timeout(Duration::from_millis(200), pinger.next()).await {
            Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => break,
            Ok(Some(Ok(Message::Binary(frame)))) => {
                if let Ok(ServerMessage::Error(e)) = folio_proto::decode_server(&frame) {
                    codes.push(e.code);
                }
            }
            _ => {}
        }
    }
    assert_eq!(codes, vec![ErrorCode::Timeout]);
    assert!(started.elapsed() < Duration::from_secs(4));

    // A joined client that never answers the heartbeat (and is not training): closed.
    let mut mute = connect(&server).await;
    join_as(&mut mute, join(Some(KENT))).await.unwrap();
    let codes = until_closed(&mut mute, Duration::from_secs(6)).await;
    assert_eq!(codes.last(), Some(&ErrorCode::Timeout), "{codes:?}");
    // One that answers stays.
    let mut alive = connect(&server).await;
    join_as(&mut alive, join(Some(LEAR))).await.unwrap();
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        match tokio::time::timeout(Duration::from_millis(100), alive.next()).await {
            Ok(Some(Ok(Message::Binary(frame)))) => {
                if let Ok(ServerMessage::Heartbeat) = folio_proto::decode_server(&frame) {
                    alive.send(binary(&ClientMessage::Heartbeat)).await.unwrap();
                }
            }
            Ok(other) => panic!("the live client was dropped: {other:?}"),
            Err(_) => {}
        }
    }
    assert_eq!(server.status()["connected"], 1);
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qr_codes_only_of_short_web_addresses() {
    let (_dir, server) = start(rounds(5), Limits::default(), AccessConfig::default()).await;
    let drawn = http_get(&server, "/api/qr.svg?url=https%3A%2F%2Ffolio.example%2F").await;
    assert!(
        drawn.starts_with("HTTP/1.0 200")
            && drawn.contains("image/svg+xml")
            && drawn.contains("<svg"),
        "{drawn}"
    );
    let long = format!("/api/qr.svg?url=https://{}", "a".repeat(600));
    for refused in [
        "/api/qr.svg?url=javascript:alert(1)",
        "/api/qr.svg",
        long.as_str(),
    ] {
        let answer = http_get(&server, refused).await;
        assert!(answer.starts_with("HTTP/1.0 400"), "{refused}: {answer}");
    }
    server.abort();
}

/// A connection that floods frames is read at its rate: 1,000 heartbeats
/// (4 KiB each by the budget, 4.1 MB) past a burst of two of the largest frames
/// (0.74 MB for `small`), at 1 MB/s, take the server over 3 s to read, so the
/// answer to a frame sent after them comes only then (at once, unpaced).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flooding_frames_is_read_at_its_rate() {
    let limits = Limits {
        read_bytes_per_sec: 1_000_000,
        ..Limits::default()
    };
    let (_dir, server) = start(rounds(2), limits, AccessConfig::default()).await;
    let mut socket = connect(&server).await;
    join_as(&mut socket, join(None)).await.unwrap();
    let started = Instant::now();
    for _ in 0..1000 {
        socket
            .feed(binary(&ClientMessage::Heartbeat))
            .await
            .unwrap();
    }
    // No device check was asked: this answer is refused, and the refusal is
    // the reply.
    let unasked = ClientMessage::ProbeAnswer(folio_proto::ProbeAnswer {
        id: 7,
        loss: 1.0,
        projections: vec![0.0; 8],
    });
    socket.feed(binary(&unasked)).await.unwrap();
    socket.flush().await.unwrap();
    loop {
        if let ServerMessage::Error(_) = next_message(&mut socket).await {
            break;
        }
    }
    let waited = started.elapsed().as_secs_f64();
    println!("1,000 heartbeats and a refused answer read in {waited:.2} s at 1 MB/s");
    assert!(waited > 2.0, "read in {waited:.2} s: not paced");
    server.abort();
}
