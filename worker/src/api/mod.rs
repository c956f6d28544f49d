//! The engine's HTTP API, on loopback: what the CLI calls while an engine
//! runs. Every answer is JSON: a view, or `{"error": "..."}`.
//!
//! Every request must carry the data directory's token
//! (`Authorization: Bearer TOKEN`, the token in `DIR/state/api.token`, see
//! [`crate::api::token`]; for a `GET`, the dashboard's cookie will do, see
//! [`dashboard`]) and a `Host` naming this engine's loopback address
//! (`127.0.0.1:PORT`, `localhost:PORT` or `[::1]:PORT`), so that a web page
//! that renamed its host to 127.0.0.1 (DNS rebinding) is refused too. A
//! request without them gets 421 (host) or 401 (token), whatever its path.
//!
//! The operations, each with its request and answer, are in [`operations`]:
//!
//! | method | path | answer |
//! |---|---|---|
//! | GET | `/v1/ping` | `"pong"`: the engine answers |
//! | GET | `/v1/status` | [`StatusView`] |
//! | GET | `/v1/runs?state=S` | [`RunView`]s |
//! | GET | `/v1/runs/{run}` | [`RunView`] |
//! | GET | `/v1/runs/{run}/stopping` | whether a termination is still owed |
//! | GET | `/v1/runs/{run}/history` | [`EventView`](EventView)s |
//! | GET | `/v1/runs/{run}/log` | [`LogView`](LogView): the end of its latest job's output |
//! | POST | `/v1/replay` `{"run": R?}` | [`ReplayView`](ReplayView) |
//! | POST | `/v1/submit` `[RunSpec]` | [`ActionView`]s; specs as `evalflow submit` prepares them (see [`crate::datadir::submit::check_specs`]) |
//! | POST | `/v1/cancel`, `/v1/retry` `{"selection": {"runs": [R]} or {"matching": {"state", "cause", "profile", "stage", "team"}}, "dry_run": B}` | [`ActionView`]s (with `dry_run`, what would happen; nothing changes) |
//! | POST | `/v1/rescore` `{"stage": S, "dry_run": B}` | [`ActionView`]s: every scored or published run of S scored again from its predictions, and published |
//! | GET | `/v1/leaderboard?stage=S` | the leaderboard |
//! | GET | `/v1/cost` | [`CostView`](CostView) |
//! | GET | `/v1/durations` | [`DurationsView`](DurationsView) |
//! | POST | `/v1/reload` `{}` | [`ReloadView`](ReloadView): `[policy] budget_usd` read again |
//! | POST | `/v1/backup` `{"dest": PATH}` | [`BackupView`](BackupView): a data directory `serve` starts from, written while it runs |
//! | GET | `/dashboard` | the dashboard's page (see [`dashboard`]), its script and style under `/dashboard/` |
//! | GET | `/metrics` | the Prometheus (OpenMetrics) text of [`crate::metrics`] |
//!
//! Connections are bounded (see [`ApiConfig`]): at most `connections_max`
//! at once, headers within `header_read_timeout_secs` (which also ends a
//! kept-alive connection left idle that long), a request within
//! `request_timeout_secs`, a body of at most `body_max_mib`.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST, WWW_AUTHENTICATE};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

mod dashboard;
pub mod operations;
pub mod token;

use crate::config::ApiConfig;
use crate::node::{ControlError, Node};
use operations::{
    Backup, Cancel, Cost, Durations, GetRun, History, Log, Method, Operation, Ping, Reload, Replay, Rescore, Retry,
    Runs, Standings, Status, Stopping, Submit, Teams,
};
use token::ApiToken;

/// How long connections still open at shutdown may take to finish their
/// request; the rest are then closed.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The API's state: the node, and what a request must carry.
#[derive(Clone)]
struct Api {
    node: Arc<Node>,
    guard: Arc<Guard>,
}

/// What every request is checked against.
struct Guard {
    token: ApiToken,
    /// Where the token is kept, to say so to a client that lacks it.
    token_path: String,
    /// The `Host` values that name this engine.
    hosts: Vec<String>,
    request_timeout: Duration,
    body_max_bytes: usize,
}

/// A request's failure, as JSON with a status code.
struct ApiError(StatusCode, String);

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        let code = match e {
            ControlError::UnknownRun(_) => StatusCode::NOT_FOUND,
            ControlError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ControlError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ControlError::Stopped(_) | ControlError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError(code, e.to_string())
    }
}

/// The body of an error answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, and what to do.
    pub error: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

type Answer<T> = Result<Json<T>, ApiError>;

/// Serves the API on `listener` until `shutdown`, to clients presenting
/// `token`; then lets open requests finish (for up to 10 s).
pub async fn serve(
    node: Arc<Node>,
    token: ApiToken,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let limits = node.config().api.clone();
    let guard = Guard {
        token,
        token_path: ApiToken::path(&node.config().data_dir).display().to_string(),
        hosts: hosts(listener.local_addr()?),
        request_timeout: Duration::from_secs(limits.request_timeout_secs),
        body_max_bytes: limits.body_max_mib.saturating_mul(1 << 20),
    };
    let app = router(Api { node, guard: Arc::new(guard) });
    accept(app, listener, &limits, shutdown).await
}

fn router(api: Api) -> Router {
    Router::new()
        .serves::<Ping>()
        .serves::<Status>()
        .serves::<Runs>()
        .serves::<GetRun>()
        .serves::<Stopping>()
        .serves::<History>()
        .serves::<Log>()
        .serves::<Replay>()
        .serves::<Submit>()
        .serves::<Teams>()
        .serves::<Cancel>()
        .serves::<Retry>()
        .serves::<Rescore>()
        .serves::<Standings>()
        .serves::<Cost>()
        .serves::<Durations>()
        .serves::<Reload>()
        .serves::<Backup>()
        .route("/metrics", get(metrics))
        .route("/dashboard", get(dashboard::page))
        .route("/dashboard/dashboard.js", get(dashboard::script))
        .route("/dashboard/dashboard.css", get(dashboard::style))
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such API route: see `evalflow --help`".into()) })
        .layer(DefaultBodyLimit::max(api.guard.body_max_bytes))
        // The last layer sees a request first: host, token, size, deadline.
        .layer(middleware::from_fn_with_state(api.clone(), deadline))
        .layer(middleware::from_fn_with_state(api.clone(), check_size))
        .layer(middleware::from_fn_with_state(api.clone(), authorize))
        .layer(middleware::from_fn_with_state(api.clone(), check_host))
        .with_state(api)
}

/// `GET /metrics`, in the Prometheus text format (see [`crate::metrics`]).
async fn metrics(State(api): State<Api>) -> Result<Response, ApiError> {
    let text = api.node.metrics().await?;
    Ok(([(CONTENT_TYPE, HeaderValue::from_static(crate::metrics::CONTENT_TYPE))], text).into_response())
}

/// The `Host` values a client of `address` sends.
fn hosts(address: SocketAddr) -> Vec<String> {
    let port = address.port();
    let mut hosts = vec![format!("127.0.0.1:{port}"), format!("localhost:{port}"), format!("[::1]:{port}")];
    if !hosts.contains(&address.to_string()) {
        hosts.push(address.to_string());
    }
    hosts
}

/// Refuses a request addressed to another host (or to none): a browser
/// tricked by DNS rebinding sends the attacker's name.
async fn check_host(State(api): State<Api>, request: Request, next: Next) -> Response {
    let ours = |host: &str| api.guard.hosts.iter().any(|h| h.eq_ignore_ascii_case(host));
    let host = request.headers().get(HOST).and_then(|h| h.to_str().ok());
    // An absolute request target (`GET http://host/...`) names a host too.
    let target = request.uri().authority().map(|a| a.as_str());
    if host.is_some_and(ours) && target.is_none_or(ours) {
        return next.run(request).await;
    }
    let problem = format!(
        "this engine answers only requests for its own address ({}): a request for another host, \
         or without a Host header, is refused",
        api.guard.hosts.join(", ")
    );
    ApiError(StatusCode::MISDIRECTED_REQUEST, problem).into_response()
}

/// Refuses a request without the token (see [`dashboard`] for a browser's).
async fn authorize(State(api): State<Api>, request: Request, next: Next) -> Response {
    if dashboard::presented(&request).is_some_and(|token| api.guard.token.matches(token)) {
        return next.run(request).await;
    }
    if let Some(token) = dashboard::sign_in(&request).filter(|t| api.guard.token.matches(t.as_bytes())) {
        return dashboard::signed_in(&token);
    }
    let problem = format!(
        "missing or wrong API token: send `Authorization: Bearer TOKEN` with the token kept in {} \
         (readable by the engine's user only)",
        api.guard.token_path
    );
    let mut response = ApiError(StatusCode::UNAUTHORIZED, problem).into_response();
    response.headers_mut().insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// Refuses a body its `Content-Length` says is too large before reading it
/// (a body without one is cut off at the limit as it is read:
/// [`DefaultBodyLimit`]).
async fn check_size(State(api): State<Api>, request: Request, next: Next) -> Response {
    let length = request.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let limit = api.guard.body_max_bytes;
    if length.is_none_or(|length| length <= limit as u64) {
        return next.run(request).await;
    }
    let problem = format!(
        "the request body is larger than the engine takes ({} MiB): send fewer runs at once, \
         or raise body_max_mib in the [api] table of evalflow.toml",
        limit >> 20
    );
    ApiError(StatusCode::PAYLOAD_TOO_LARGE, problem).into_response()
}

/// Answers 503 for a request not done within the request timeout (a body
/// sent slowly, an engine too busy).
async fn deadline(State(api): State<Api>, request: Request, next: Next) -> Response {
    let limit = api.guard.request_timeout;
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            let problem = format!("the request took more than {} s: send it again later", limit.as_secs());
            ApiError(StatusCode::SERVICE_UNAVAILABLE, problem).into_response()
        }
    }
}

/// Accepts connections until `shutdown`, each served in a task of its own.
///
/// When `connections_max` are open, the loop waits for one to end before it
/// accepts the next: new connections wait in the kernel's listen backlog
/// rather than being dropped, so the operator's command is served late
/// rather than refused. The wait is short, because every connection is
/// bounded in time: headers (and idleness) by the header-read timeout, a
/// request by the request timeout.
async fn accept(app: Router, listener: TcpListener, limits: &ApiConfig, shutdown: CancellationToken) -> io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.connections_max));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(Duration::from_secs(limits.header_read_timeout_secs));
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.map_err(io::Error::other)?,
            () = shutdown.cancelled() => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let connection = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        connections.spawn(serve_connection(connection, slot, shutdown.clone()));
    }
    let drained =
        tokio::time::timeout(SHUTDOWN_GRACE, async { while connections.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!("API connections still open {} s after shutdown: closing them", SHUTDOWN_GRACE.as_secs());
        connections.shutdown().await;
    }
    Ok(())
}

type Connection = http1::Connection<TokioIo<TcpStream>, TowerToHyperService<Router>>;

/// Serves one connection, holding its `slot`; at `shutdown`, finishes the
/// request under way and closes.
async fn serve_connection(connection: Connection, slot: OwnedSemaphorePermit, shutdown: CancellationToken) {
    let mut connection = std::pin::pin!(connection);
    let served = tokio::select! {
        served = connection.as_mut() => served,
        () = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = served {
        // A client gone, or too slow with its headers: its problem, not the engine's.
        tracing::debug!("API connection ended: {e}");
    }
    drop(slot);
}

/// An accept that failed: a connection reset before it was accepted is
/// skipped; anything else (out of file descriptors) is waited out.
async fn accept_failed(e: io::Error) {
    use io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if !matches!(e.kind(), ConnectionAborted | ConnectionRefused | ConnectionReset) {
        tracing::warn!("cannot accept an API connection: {e}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Routes of the operations, each to a generic handler.
trait Serves {
    fn serves<O: Operation>(self) -> Self;
}

impl Serves for Router<Api> {
    fn serves<O: Operation>(self) -> Self {
        match O::METHOD {
            Method::Get => self.route(O::ROUTE, get(read::<O>)),
            Method::Post => self.route(O::ROUTE, post(act::<O>)),
        }
    }
}

/// Answers a `GET`: the request from its path and query.
async fn read<O: Operation>(
    State(api): State<Api>,
    path: Option<Path<Vec<(String, String)>>>,
    Query(query): Query<Vec<(String, String)>>,
) -> Answer<O::Answer> {
    let request = O::from_fields(path.map(|Path(path)| path).unwrap_or_default(), query)?;
    Ok(Json(request.run(&api.node).await?))
}

/// Answers a `POST`: the request is its body.
async fn act<O: Operation>(State(api): State<Api>, Json(request): Json<O>) -> Answer<O::Answer> {
    Ok(Json(request.run(&api.node).await?))
}
