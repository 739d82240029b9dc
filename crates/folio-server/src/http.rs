//! The HTTP surface: the page and its assets, `/ws`, the public status and
//! model, and the admin API (state export, session revocation) behind the admin
//! token.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::http::{HeaderName, HeaderValue};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use folio_model::checkpoint::{self, Precision};
use tower_http::services::{ServeDir, ServeFile};
use tower_http::set_header::SetResponseHeaderLayer;

use crate::Shared;
use crate::access::AdminRefusal;
use crate::net::PeerInfo;
use crate::{state, ws};

pub fn router(shared: Arc<Shared>) -> Router {
    let mut router = Router::new()
        .route("/ws", get(ws::upgrade))
        .route(
            "/api/status",
            get(|State(shared): State<Arc<Shared>>| async move { Json(status_json(&shared)) }),
        )
        .route("/api/characters", get(characters))
        .route("/api/model", get(model_file))
        .route("/api/model/start", get(start_model_file))
        .route("/api/admin/state", get(export_state))
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
    router.with_state(shared)
}

/// The Shakespeare clients a tab can train as: `[[id, training chars], ...]`,
/// for the page's character picker.
async fn characters(State(shared): State<Arc<Shared>>) -> Json<Vec<(String, usize)>> {
    let fed = shared.fed();
    Json(
        fed.characters()
            .iter()
            .map(|(id, chars)| (id.clone(), *chars))
            .collect(),
    )
}

/// The current global model, f16 safetensors: public, the page's generator uses it.
async fn model_file(State(shared): State<Arc<Shared>>) -> Response {
    let (model, weights, round) = {
        let fed = shared.fed();
        (fed.model, fed.weights.clone(), fed.round - 1)
    };
    let metadata = BTreeMap::from([("round".to_owned(), round.to_string())]);
    match checkpoint::encode(model, &weights, Precision::F16, &metadata) {
        Ok(bytes) => ([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response(),
        Err(err) => (StatusCode::INTERNAL_SERVER_ERROR, err.to_string()).into_response(),
    }
}

/// The model the federation started from (round 0), for comparing with the
/// current one.
async fn start_model_file(State(shared): State<Arc<Shared>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/octet-stream")],
        shared.start_model.clone(),
    )
        .into_response()
}

fn admin_refused(shared: &Shared, peer: &PeerInfo, headers: &HeaderMap) -> Option<Response> {
    let now = Instant::now();
    if let Some(wait) = shared.access.locked_out(peer.address.ip(), now) {
        return Some(
            (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, wait.as_secs().max(1).to_string())],
                "too many wrong tokens from this address; wait and try again",
            )
                .into_response(),
        );
    }
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
            shared.access.wrong_token(peer.address.ip(), now);
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

/// The committed state file (weights, optimizer moments, history).
async fn export_state(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<PeerInfo>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = admin_refused(&shared, &peer, &headers) {
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
async fn revoke_session(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<PeerInfo>,
    Path(session): Path<u64>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = admin_refused(&shared, &peer, &headers) {
        return refused;
    }
    let mut fed = shared.fed();
    if let Some(outbox) = fed.sessions.get(session).and_then(|s| s.outbox.clone()) {
        outbox.close();
    }
    fed.disconnect(session, Instant::now());
    match fed.sessions.revoke(session) {
        Some(info) => format!("session {session} ({}) revoked\n", info.client_id).into_response(),
        None => (StatusCode::NOT_FOUND, format!("no session {session}\n")).into_response(),
    }
}

pub fn status_json(shared: &Shared) -> serde_json::Value {
    let fed = shared.fed();
    let open = fed.open_round(Instant::now());
    let rounds = &fed.config;
    let strategy = rounds.strategy;
    serde_json::json!({
        "preset": fed.preset,
        "parameters": fed.model.num_params(),
        "next_round": fed.round,
        "completed_rounds": fed.round - 1,
        "open_round": open,
        "connected": fed.connected(),
        "connections": shared.connections.open(),
        "clients": fed.session_list(),
        "errors": fed.errors,
        "history": fed.history,
        "config": {
            "clients_per_round": strategy.clients_per_round,
            "min_clients": strategy.min_clients,
            "quorum": strategy.quorum,
            "clipping": strategy.clipping.describe(),
            "clip_bound": fed.state.clip_bound,
            "aggregation": strategy.aggregation.name(),
            "deadline_seconds": rounds.deadline.as_secs_f64(),
            "local_epochs": rounds.local_epochs,
            "max_batches": rounds.max_batches,
            "client_lr": rounds.client_lr_at(fed.round),
            "server_optimizer": strategy.server_optimizer.name(),
            "delta_encoding": format!("{:?}", rounds.delta_encoding),
            "max_rounds": shared.config.max_rounds,
        },
    })
}
