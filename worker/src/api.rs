//! The engine's HTTP API, on loopback: what the CLI calls while an engine
//! runs. Every answer is JSON: a view, or `{"error": "..."}`.
//!
//! | method | path | answer |
//! |---|---|---|
//! | GET | `/v1/ping` | `"pong"`: the engine answers |
//! | GET | `/v1/status` | [`StatusView`] |
//! | GET | `/v1/runs?state=S` | [`RunView`]s |
//! | GET | `/v1/runs/{run}` | [`RunView`] |
//! | GET | `/v1/runs/{run}/stopping` | whether a termination is still owed |
//! | GET | `/v1/runs/{run}/history` | [`EventView`](crate::views::EventView)s |
//! | POST | `/v1/replay` `{"run": R?}` | [`ReplayView`](crate::views::ReplayView) |
//! | POST | `/v1/submit` `[RunSpec]` | [`ActionView`]s |
//! | POST | `/v1/cancel`, `/v1/retry` `{"runs": [R]}` or `{"state": S}` | [`ActionView`]s |
//! | GET | `/v1/leaderboard?stage=S` | the leaderboard |
//! | GET | `/v1/cost` | [`CostView`](crate::views::CostView) |

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use evalflow_workflow::{RunId, RunSpec, Stage, StateTag};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::lock::EngineInfo;
use crate::node::{ControlError, Node};
use crate::views::{ActionView, RunView, StatusView};

/// The API's state: the node, and how it announced itself.
#[derive(Clone)]
struct Api {
    node: Arc<Node>,
    info: EngineInfo,
}

/// A request's failure, as JSON with a status code.
struct ApiError(StatusCode, String);

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        let code = match e {
            ControlError::UnknownRun(_) => StatusCode::NOT_FOUND,
            ControlError::BadRequest(_) => StatusCode::BAD_REQUEST,
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

fn parse_run(run: &str) -> Result<RunId, ApiError> {
    RunId::parse(run).map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))
}

/// Which runs an operator's request is for.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Selection {
    /// These runs.
    Runs(Vec<RunId>),
    /// Every run in this state.
    State(StateTag),
}

/// The body of `/v1/replay`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReplayRequest {
    /// One run, or every run when absent.
    pub run: Option<RunId>,
}

#[derive(Debug, Deserialize)]
struct StateQuery {
    state: Option<StateTag>,
}

#[derive(Debug, Deserialize)]
struct StageQuery {
    stage: Option<Stage>,
}

/// Serves the API on `listener` until `shutdown`.
pub async fn serve(
    node: Arc<Node>,
    info: EngineInfo,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/v1/ping", get(|| async { Json("pong") }))
        .route("/v1/status", get(status))
        .route("/v1/runs", get(runs))
        .route("/v1/runs/{run}", get(run))
        .route("/v1/runs/{run}/stopping", get(stopping))
        .route("/v1/runs/{run}/history", get(history))
        .route("/v1/replay", post(replay))
        .route("/v1/submit", post(submit))
        .route("/v1/cancel", post(cancel))
        .route("/v1/retry", post(retry))
        .route("/v1/leaderboard", get(leaderboard))
        .route("/v1/cost", get(cost))
        .with_state(Api { node, info });
    axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await
}

async fn status(State(api): State<Api>) -> Answer<StatusView> {
    let mut view = api.node.status().await?;
    view.engine = Some(format!("pid {} at {}", api.info.pid, api.info.api));
    Ok(Json(view))
}

async fn runs(State(api): State<Api>, Query(query): Query<StateQuery>) -> Answer<Vec<RunView>> {
    Ok(Json(api.node.runs(query.state).await?))
}

async fn run(State(api): State<Api>, Path(run): Path<String>) -> Answer<RunView> {
    Ok(Json(api.node.run(&parse_run(&run)?).await?))
}

async fn stopping(State(api): State<Api>, Path(run): Path<String>) -> Answer<bool> {
    Ok(Json(api.node.stopping(&parse_run(&run)?).await?))
}

async fn history(State(api): State<Api>, Path(run): Path<String>) -> Answer<Vec<crate::views::EventView>> {
    Ok(Json(api.node.history(&parse_run(&run)?).await?))
}

async fn replay(State(api): State<Api>, Json(request): Json<ReplayRequest>) -> Answer<crate::views::ReplayView> {
    Ok(Json(api.node.replay(request.run).await?))
}

async fn submit(State(api): State<Api>, Json(specs): Json<Vec<RunSpec>>) -> Answer<Vec<ActionView>> {
    Ok(Json(api.node.submit(specs).await?))
}

async fn selected(node: &Node, selection: Selection) -> Result<Vec<RunId>, ApiError> {
    Ok(match selection {
        Selection::Runs(runs) => runs,
        Selection::State(state) => node.runs_in(state).await?,
    })
}

async fn cancel(State(api): State<Api>, Json(selection): Json<Selection>) -> Answer<Vec<ActionView>> {
    let runs = selected(&api.node, selection).await?;
    Ok(Json(api.node.cancel(runs).await?))
}

async fn retry(State(api): State<Api>, Json(selection): Json<Selection>) -> Answer<Vec<ActionView>> {
    let runs = selected(&api.node, selection).await?;
    Ok(Json(api.node.retry(runs).await?))
}

async fn leaderboard(
    State(api): State<Api>,
    Query(query): Query<StageQuery>,
) -> Answer<evalflow_activities::leaderboard::Leaderboard> {
    Ok(Json(api.node.leaderboard(query.stage.unwrap_or(Stage::Public)).await?))
}

async fn cost(State(api): State<Api>) -> Answer<crate::views::CostView> {
    Ok(Json(api.node.cost().await?))
}
