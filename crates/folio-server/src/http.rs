//! The HTTP surface: the page and its assets, `/ws`, the public status and
//! model, and the admin API (state export, session revocation) behind the admin
//! token.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::http::{HeaderName, HeaderValue};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use folio_model::checkpoint::{self, Precision};
use tower_http::services::{ServeDir, ServeFile};
use tower_http::set_header::SetResponseHeaderLayer;

use folio_engine::Release;

use crate::Shared;
use crate::access::AdminRefusal;
use crate::driver::Delivery;
use crate::driver::Served;
use crate::net::PeerInfo;
use crate::{state, ws};

pub fn router<R: Served>(shared: Arc<Shared<R>>) -> Router {
    let mut router = Router::new()
        .route("/ws", get(ws::upgrade))
        .route("/api/status", get(public_status))
        .route("/api/history", get(history))
        .route("/api/characters", get(characters))
        .route("/api/model", get(model_file))
        .route("/api/model/start", get(start_model_file))
        .route("/api/qr.svg", get(qr_code))
        .route("/api/admin/state", get(export_state))
        .route("/metrics", get(metrics))
        .route("/api/admin/sessions/{session}/revoke", post(revoke_session));
    if let Some(root) = &shared.config.web_root {
        // The page and its assets only, not the folder they live in. The wasm goes
        // out as brotli or gzip (`build_page` leaves both beside it). Browsers
        // revalidate every asset (a rebuilt page is never stale) and get
        // "304 Not Modified", no body, while it is unchanged.
        let pages = Router::new()
            .route_service("/", ServeFile::new(root.join("index.html")))
            .nest_service("/web", ServeDir::new(root.join("web")))
            .nest_service(
                "/pkg",
                ServeDir::new(root.join("pkg"))
                    .precompressed_br()
                    .precompressed_gzip(),
            )
            .nest_service("/models", ServeDir::new(root.join("models")))
            .layer(SetResponseHeaderLayer::overriding(
                header::CACHE_CONTROL,
                HeaderValue::from_static("no-cache"),
            ))
            // Cross-origin isolation: the page may then share memory between
            // Web Workers, which the CPU fallback's thread pool needs.
            .layer(SetResponseHeaderLayer::overriding(
                HeaderName::from_static("cross-origin-opener-policy"),
                HeaderValue::from_static("same-origin"),
            ))
            .layer(SetResponseHeaderLayer::overriding(
                HeaderName::from_static("cross-origin-embedder-policy"),
                HeaderValue::from_static("require-corp"),
            ));
        router = router.merge(pages);
    }
    if shared.config.tls.is_some() {
        router = router.layer(SetResponseHeaderLayer::overriding(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static(crate::tls::HSTS),
        ));
    }
    router.with_state(shared)
}

/// The Shakespeare clients a tab can train as: `[[id, training chars], ...]`,
/// for the page's character picker.
async fn characters<R: Served>(State(shared): State<Arc<Shared<R>>>) -> Json<Vec<(String, usize)>> {
    let clients = shared.read(|e| e.clients().clone());
    Json(clients.into_iter().collect())
}

/// Rounds of the history per request at most.
const HISTORY_PAGE: usize = 2_000;

#[derive(serde::Deserialize)]
struct HistoryQuery {
    /// The first round wanted (0: from the start).
    #[serde(default)]
    from: u64,
    limit: Option<usize>,
}

/// Committed rounds from `from` on, a page at a time: a page polls only for what
/// is new. A private federation's records without what it withholds, unless
/// the operator asks.
async fn history<R: Served>(
    State(shared): State<Arc<Shared<R>>>,
    ConnectInfo(peer): ConnectInfo<PeerInfo>,
    headers: HeaderMap,
    Query(query): Query<HistoryQuery>,
) -> Response {
    let asker = match asker(&shared, &peer, &headers).await {
        Ok(asker) => asker,
        Err(refused) => return refused,
    };
    let limit = query.limit.unwrap_or(HISTORY_PAGE).min(HISTORY_PAGE);
    let records = shared.read(|e| e.history(query.from, limit).to_vec());
    let (release, _) = asker.view(shared.release);
    let records: Vec<serde_json::Value> = records.iter().map(|r| release.record(r)).collect();
    Json(records).into_response()
}

/// The header a device proves its session with (its resume token), to see its
/// own row of a private federation's status.
pub const SESSION_HEADER: &str = "folio-session";

/// Who asks a public endpoint.
enum Asker {
    /// The admin token: everything.
    Operator,
    /// Anyone, or the device holding this session.
    Public(Option<u64>),
}

impl Asker {
    /// What this asker is shown of a federation that releases `federation`,
    /// and the session whose row it may see.
    fn view(self, federation: Release) -> (Release, Option<u64>) {
        match self {
            Asker::Operator => (Release::Full, None),
            Asker::Public(own) => (federation, own),
        }
    }
}

/// Who is asking: a request with a bearer token, where the admin API is on,
/// must hold the admin token (a wrong one waits and is refused, as on the admin
/// API); one with [`SESSION_HEADER`] is the device of that session if the token
/// is right; anyone else (a proxy's own `Authorization: Basic` included) is
/// the public.
async fn asker<R: Served>(
    shared: &Shared<R>,
    peer: &PeerInfo,
    headers: &HeaderMap,
) -> Result<Asker, Response> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("Bearer "));
    if bearer && shared.access.config.admin_token.is_some() {
        return match admin_refused(shared, peer, headers).await {
            Some(refused) => Err(refused),
            None => Ok(Asker::Operator),
        };
    }
    let own = headers
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|token| shared.read(|e| e.session_of_token(token)));
    Ok(Asker::Public(own))
}

async fn public_status<R: Served>(
    State(shared): State<Arc<Shared<R>>>,
    ConnectInfo(peer): ConnectInfo<PeerInfo>,
    headers: HeaderMap,
) -> Response {
    match asker(&shared, &peer, &headers).await {
        Ok(asker) => {
            let (release, own) = asker.view(shared.release);
            Json(status(&shared, release, own)).into_response()
        }
        Err(refused) => refused,
    }
}

/// The current global model, f16 safetensors: public, the page's generator uses
/// it. Encoded off the engine and off the async workers.
async fn model_file<R: Served>(State(shared): State<Arc<Shared<R>>>) -> Response {
    let (weights, round) = shared.read(|e| (e.weights(), e.completed_rounds()));
    let model = shared.model;
    let encoded = tokio::task::spawn_blocking(move || {
        let metadata = BTreeMap::from([("round".to_owned(), round.to_string())]);
        checkpoint::encode(model, &weights, Precision::F16, &metadata)
    })
    .await;
    match encoded {
        Ok(Ok(bytes)) => {
            ([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response()
        }
        Ok(Err(err)) => (StatusCode::INTERNAL_SERVER_ERROR, err.to_string()).into_response(),
        Err(err) => (StatusCode::INTERNAL_SERVER_ERROR, err.to_string()).into_response(),
    }
}

/// The model the federation started from (round 0), for comparing with the
/// current one.
async fn start_model_file<R: Served>(State(shared): State<Arc<Shared<R>>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/octet-stream")],
        shared.start_model.clone(),
    )
        .into_response()
}

#[derive(serde::Deserialize)]
struct QrQuery {
    url: String,
}

/// Longest address a QR code is drawn for.
const MAX_QR_URL_BYTES: usize = 512;

/// A QR code of `url` (an `http(s)://` address), SVG: the page shows the
/// address other devices open, for a phone's camera.
async fn qr_code(Query(query): Query<QrQuery>) -> Response {
    let url = query.url;
    if url.len() > MAX_QR_URL_BYTES || !(url.starts_with("https://") || url.starts_with("http://"))
    {
        return (
            StatusCode::BAD_REQUEST,
            format!("?url= must be an http(s):// address of at most {MAX_QR_URL_BYTES} bytes"),
        )
            .into_response();
    }
    match qrcode::QrCode::new(url.as_bytes()) {
        Ok(code) => (
            [(header::CONTENT_TYPE, "image/svg+xml")],
            code.render::<qrcode::render::svg::Color<'_>>()
                .min_dimensions(200, 200)
                .build(),
        )
            .into_response(),
        Err(err) => (StatusCode::BAD_REQUEST, format!("no QR code for it: {err}")).into_response(),
    }
}

/// Why an admin request is refused, if it is; a wrong token is answered only
/// after the address's wrong-token delay.
async fn admin_refused<R: Served>(
    shared: &Shared<R>,
    peer: &PeerInfo,
    headers: &HeaderMap,
) -> Option<Response> {
    match shared.access.admin(headers) {
        Ok(()) => None,
        Err(AdminRefusal::Off) => Some(
            (
                StatusCode::FORBIDDEN,
                "the admin API is off: start the server with FOLIO_ADMIN_TOKEN or --admin-token-file",
            )
                .into_response(),
        ),
        Err(AdminRefusal::Wrong) => {
            let wait = shared.access.wrong_token(peer.address.ip(), Instant::now());
            tokio::time::sleep(wait).await;
            Some(
                (
                    StatusCode::UNAUTHORIZED,
                    "send `Authorization: Bearer <admin token>`",
                )
                    .into_response(),
            )
        }
    }
}

/// The aggregator's metrics (Prometheus's text format), for the operator's
/// monitoring: behind the admin token.
async fn metrics<R: Served>(
    State(shared): State<Arc<Shared<R>>>,
    ConnectInfo(peer): ConnectInfo<PeerInfo>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = admin_refused(&shared, &peer, &headers).await {
        return refused;
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::render(&shared),
    )
        .into_response()
}

/// The committed state file (weights, optimizer moments, history).
async fn export_state<R: Served>(
    State(shared): State<Arc<Shared<R>>>,
    ConnectInfo(peer): ConnectInfo<PeerInfo>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = admin_refused(&shared, &peer, &headers).await {
        return refused;
    }
    match tokio::fs::read(state::state_path(&shared.config.state_dir)).await {
        Ok(bytes) => ([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response(),
        Err(err) => (
            StatusCode::NOT_FOUND,
            format!("no committed state yet: {err}"),
        )
            .into_response(),
    }
}

/// Ends a session: its connection closes and its token stops working.
async fn revoke_session<R: Served>(
    State(shared): State<Arc<Shared<R>>>,
    ConnectInfo(peer): ConnectInfo<PeerInfo>,
    Path(session): Path<u64>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = admin_refused(&shared, &peer, &headers).await {
        return refused;
    }
    let revoked = shared.engine(|e| {
        shared.deliver(Delivery::Close(session));
        e.revoke(session, Instant::now())
    });
    match revoked {
        Some(client) => format!("session {session} ({client}) revoked\n").into_response(),
        None => (StatusCode::NOT_FOUND, format!("no session {session}\n")).into_response(),
    }
}

/// `/api/status`: the engine's status and the open TCP connections. Its size
/// depends on the sessions held, not on the rounds run.
#[derive(serde::Serialize)]
pub struct ServerStatus {
    /// The engine's status as `release` shows it.
    #[serde(flatten)]
    engine: serde_json::Value,
    /// TCP connections open now.
    connections: u64,
    /// Connections refused at a cap, and ended to make room for a newcomer from
    /// a less represented network, since the start.
    connections_refused: u64,
    connections_evicted: u64,
    /// A cluster's edges that serve tabs (absent on a single server).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    edges: Vec<String>,
}

/// The status as `release` shows it to the holder of session `own`.
pub fn status<R: Served>(shared: &Shared<R>, release: Release, own: Option<u64>) -> ServerStatus {
    let count = &shared.connections;
    ServerStatus {
        engine: release.status(shared.read(|e| e.status(Instant::now())), own),
        connections: count.open(),
        connections_refused: count.refused.load(std::sync::atomic::Ordering::Relaxed),
        connections_evicted: count.evicted.load(std::sync::atomic::Ordering::Relaxed),
        edges: shared.edges.lock().map(|e| e.clone()).unwrap_or_default(),
    }
}
