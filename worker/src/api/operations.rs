//! Every operation the CLI and the API offer, each written once: its request
//! (the type), its answer, its route, and the [`Node`] method that does it.
//! The API serves all of them with two generic handlers (see
//! [`super::router`]), and the CLI calls each through one generic function,
//! whether it talks to an engine's API or acts on the store itself.
//!
//! A `GET` request's fields are strings: those named in the route
//! (`/v1/runs/{run}`) are path segments, the others the query
//! (`/v1/runs?state=failed`). A `POST` request is its body, as JSON.

use std::collections::BTreeMap;
use std::future::Future;

use evalflow_activities::leaderboard::Leaderboard;
use evalflow_workflow::{RunId, RunSpec, Stage, StateTag, SubmissionId, TeamId};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::node::{ControlError, Node};
use crate::views::{
    ActionView, BackupView, CostView, DurationsView, EventView, LogView, ReloadView, ReplayView, RunView, Selection,
    StatusView,
};

/// How an operation travels over HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// It reads: its fields in the path and the query.
    Get,
    /// It acts: the request is the body.
    Post,
}

/// One operation of a node.
pub trait Operation: Serialize + DeserializeOwned + Send + 'static {
    /// What it answers.
    type Answer: Serialize + DeserializeOwned + Send + 'static;
    /// How it travels.
    const METHOD: Method;
    /// Its route, with `{field}` for each field that is a path segment.
    const ROUTE: &'static str;

    /// Does it on `node`.
    fn run(self, node: &Node) -> impl Future<Output = Result<Self::Answer, ControlError>> + Send;

    /// The path and query a `GET` of this request asks for.
    fn target(&self) -> Result<String, ControlError> {
        let mut fields = fields(self)?;
        let mut target = String::new();
        for segment in Self::ROUTE.split('/').skip(1) {
            target.push('/');
            match segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                Some(name) => {
                    let value = fields.remove(name).ok_or_else(|| missing(name))?;
                    target.extend(utf8_percent_encode(&value, SEGMENT));
                }
                None => target.push_str(segment),
            }
        }
        if !fields.is_empty() {
            let query = serde_urlencoded::to_string(&fields).map_err(|e| ControlError::Internal(e.to_string()))?;
            target.push('?');
            target.push_str(&query);
        }
        Ok(target)
    }

    /// The request a `GET` carried: its path segments and its query. A
    /// field given twice is refused, not chosen from.
    fn from_fields(path: Vec<(String, String)>, query: Vec<(String, String)>) -> Result<Self, ControlError> {
        let mut fields = serde_json::Map::new();
        for (name, value) in path.into_iter().chain(query) {
            if fields.contains_key(&name) {
                return Err(ControlError::BadRequest(format!("{name} is given twice: give it once")));
            }
            fields.insert(name, value.into());
        }
        serde_json::from_value(fields.into()).map_err(|e| ControlError::BadRequest(e.to_string()))
    }
}

/// What a path segment keeps as it is.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

fn missing(name: &str) -> ControlError {
    ControlError::Internal(format!("the request has no {name}, which its route needs"))
}

/// A `GET` request's fields, as strings; the absent ones left out.
fn fields(request: &impl Serialize) -> Result<BTreeMap<String, String>, ControlError> {
    let value = serde_json::to_value(request).map_err(|e| ControlError::Internal(e.to_string()))?;
    let serde_json::Value::Object(object) = value else {
        return Err(ControlError::Internal("a GET request must be a struct of named fields".into()));
    };
    let mut fields = BTreeMap::new();
    for (name, value) in object {
        match value {
            serde_json::Value::Null => {}
            serde_json::Value::String(text) => _ = fields.insert(name, text),
            serde_json::Value::Number(number) => _ = fields.insert(name, number.to_string()),
            other => {
                return Err(ControlError::Internal(format!("field {name} of a GET request is not a string: {other}")));
            }
        }
    }
    Ok(fields)
}

/// Whether the engine answers: `"pong"`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Ping {}

impl Operation for Ping {
    type Answer = String;
    const METHOD: Method = Method::Get;
    const ROUTE: &'static str = "/v1/ping";
    async fn run(self, _: &Node) -> Result<String, ControlError> {
        Ok("pong".into())
    }
}

/// `evalflow status`: runs per state, and what keeps runs waiting.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {}

impl Operation for Status {
    type Answer = StatusView;
    const METHOD: Method = Method::Get;
    const ROUTE: &'static str = "/v1/status";
    async fn run(self, node: &Node) -> Result<StatusView, ControlError> {
        node.status().await
    }
}

/// `evalflow runs`: all runs, or those in one state, in id order; or a
/// page of them: at most `limit`, those after `after` (fewer: the last page).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Runs {
    /// Only the runs in this state.
    pub state: Option<StateTag>,
    /// Only the runs after this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<RunId>,
    /// At most this many runs.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "count")]
    pub limit: Option<usize>,
}

/// A count, as a `GET`'s query gives it (text) or a body (a number).
fn count<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<usize>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Count {
        Number(usize),
        Text(String),
    }
    match Option::<Count>::deserialize(deserializer)? {
        None => Ok(None),
        Some(Count::Number(n)) => Ok(Some(n)),
        Some(Count::Text(text)) => text
            .parse()
            .map(Some)
            .map_err(|_| serde::de::Error::custom(format!("limit must be a whole number of runs, not {text:?}"))),
    }
}

impl Operation for Runs {
    type Answer = Vec<RunView>;
    const METHOD: Method = Method::Get;
    const ROUTE: &'static str = "/v1/runs";
    async fn run(self, node: &Node) -> Result<Vec<RunView>, ControlError> {
        node.runs(self.state, self.after, self.limit).await
    }
}

/// One run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GetRun {
    /// The run.
    pub run: RunId,
}

impl Operation for GetRun {
    type Answer = RunView;
    const METHOD: Method = Method::Get;
    const ROUTE: &'static str = "/v1/runs/{run}";
    async fn run(self, node: &Node) -> Result<RunView, ControlError> {
        node.run(&self.run).await
    }
}

/// Whether a run still owes the termination of a job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stopping {
    /// The run.
    pub run: RunId,
}

impl Operation for Stopping {
    type Answer = bool;
    const METHOD: Method = Method::Get;
    const ROUTE: &'static str = "/v1/runs/{run}/stopping";
    async fn run(self, node: &Node) -> Result<bool, ControlError> {
        node.stopping(&self.run).await
    }
}

/// `evalflow history RUN`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct History {
    /// The run.
    pub run: RunId,
}

impl Operation for History {
    type Answer = Vec<EventView>;
    const METHOD: Method = Method::Get;
    const ROUTE: &'static str = "/v1/runs/{run}/history";
    async fn run(self, node: &Node) -> Result<Vec<EventView>, ControlError> {
        node.history(&self.run).await
    }
}

/// The end of a run's latest job's output (the dashboard's run page).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Log {
    /// The run.
    pub run: RunId,
}

impl Operation for Log {
    type Answer = LogView;
    const METHOD: Method = Method::Get;
    const ROUTE: &'static str = "/v1/runs/{run}/log";
    async fn run(self, node: &Node) -> Result<LogView, ControlError> {
        node.log(&self.run).await
    }
}

/// `evalflow replay [RUN]`: one run's history, or every run's, replayed
/// against the stored status.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Replay {
    /// One run, or every run when absent.
    pub run: Option<RunId>,
}

impl Operation for Replay {
    type Answer = ReplayView;
    const METHOD: Method = Method::Post;
    const ROUTE: &'static str = "/v1/replay";
    async fn run(self, node: &Node) -> Result<ReplayView, ControlError> {
        node.replay(self.run).await
    }
}

/// `evalflow submit`: specs as it prepares them (see
/// [`crate::datadir::submit::check_specs`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Submit(pub Vec<RunSpec>);

impl Operation for Submit {
    type Answer = Vec<ActionView>;
    const METHOD: Method = Method::Post;
    const ROUTE: &'static str = "/v1/submit";
    async fn run(self, node: &Node) -> Result<Vec<ActionView>, ControlError> {
        node.submit(self.0).await
    }
}

/// The teams of those of `submissions` that have runs: what `evalflow
/// submit` checks a manifest against, without reading every run. A `POST`,
/// since a manifest's ids do not fit in a query.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Teams {
    /// The submissions asked about.
    pub submissions: Vec<SubmissionId>,
}

impl Operation for Teams {
    type Answer = BTreeMap<SubmissionId, TeamId>;
    const METHOD: Method = Method::Post;
    const ROUTE: &'static str = "/v1/teams";
    async fn run(self, node: &Node) -> Result<BTreeMap<SubmissionId, TeamId>, ControlError> {
        node.teams(self.submissions).await
    }
}

/// `evalflow cancel`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cancel {
    /// The runs.
    pub selection: Selection,
    /// Only say what would happen to each.
    #[serde(default)]
    pub dry_run: bool,
}

impl Operation for Cancel {
    type Answer = Vec<ActionView>;
    const METHOD: Method = Method::Post;
    const ROUTE: &'static str = "/v1/cancel";
    async fn run(self, node: &Node) -> Result<Vec<ActionView>, ControlError> {
        node.cancel(self.selection, self.dry_run).await
    }
}

/// `evalflow retry`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retry {
    /// The runs.
    pub selection: Selection,
    /// Only say what would happen to each.
    #[serde(default)]
    pub dry_run: bool,
}

impl Operation for Retry {
    type Answer = Vec<ActionView>;
    const METHOD: Method = Method::Post;
    const ROUTE: &'static str = "/v1/retry";
    async fn run(self, node: &Node) -> Result<Vec<ActionView>, ControlError> {
        node.retry(self.selection, self.dry_run).await
    }
}

/// `evalflow rescore --stage S`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rescore {
    /// The stage whose scored and published runs are scored again.
    pub stage: Stage,
    /// Only these runs of it.
    #[serde(default)]
    pub runs: Option<Vec<RunId>>,
    /// Only say what would happen to each.
    #[serde(default)]
    pub dry_run: bool,
}

impl Operation for Rescore {
    type Answer = Vec<ActionView>;
    const METHOD: Method = Method::Post;
    const ROUTE: &'static str = "/v1/rescore";
    async fn run(self, node: &Node) -> Result<Vec<ActionView>, ControlError> {
        node.rescore(self.stage, self.runs, self.dry_run).await
    }
}

/// `evalflow leaderboard`: a stage's, the public one when none is named.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Standings {
    /// The stage.
    pub stage: Option<Stage>,
}

impl Operation for Standings {
    type Answer = Leaderboard;
    const METHOD: Method = Method::Get;
    const ROUTE: &'static str = "/v1/leaderboard";
    async fn run(self, node: &Node) -> Result<Leaderboard, ControlError> {
        node.leaderboard(self.stage.unwrap_or(Stage::Public)).await
    }
}

/// `evalflow cost`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Cost {}

impl Operation for Cost {
    type Answer = CostView;
    const METHOD: Method = Method::Get;
    const ROUTE: &'static str = "/v1/cost";
    async fn run(self, node: &Node) -> Result<CostView, ControlError> {
        node.cost().await
    }
}

/// `evalflow reload`: `[policy] budget_usd` read again.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Reload {}

impl Operation for Reload {
    type Answer = ReloadView;
    const METHOD: Method = Method::Post;
    const ROUTE: &'static str = "/v1/reload";
    async fn run(self, node: &Node) -> Result<ReloadView, ControlError> {
        node.reload().await
    }
}

/// `evalflow backup DEST`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backup {
    /// The backup's data directory, an absolute path on the engine's machine, not there yet.
    pub dest: String,
}

impl Operation for Backup {
    type Answer = BackupView;
    const METHOD: Method = Method::Post;
    const ROUTE: &'static str = "/v1/backup";
    async fn run(self, node: &Node) -> Result<BackupView, ControlError> {
        node.backup(std::path::PathBuf::from(self.dest)).await
    }
}

/// `evalflow plan --from`: how long the runs whose job succeeded took.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Durations {}

impl Operation for Durations {
    type Answer = DurationsView;
    const METHOD: Method = Method::Get;
    const ROUTE: &'static str = "/v1/durations";
    async fn run(self, node: &Node) -> Result<DurationsView, ControlError> {
        node.durations().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_get_request_goes_there_and_back() {
        let runs = Runs { state: Some(StateTag::Failed), ..Runs::default() };
        assert_eq!(runs.target().unwrap(), "/v1/runs?state=failed");
        assert_eq!(Runs::default().target().unwrap(), "/v1/runs");
        let history = History { run: RunId::parse("a_b-public").unwrap() };
        assert_eq!(history.target().unwrap(), "/v1/runs/a_b-public/history");

        let back = History::from_fields(field("run", "a_b-public"), Vec::new()).unwrap();
        assert_eq!(back.run, history.run);
        assert_eq!(Runs::from_fields(Vec::new(), field("state", "failed")).unwrap().state, Some(StateTag::Failed));

        // A page: its count travels as text in the query, and comes back a number.
        let page = Runs { after: Some(RunId::parse("a-public").unwrap()), limit: Some(1000), ..Runs::default() };
        assert_eq!(page.target().unwrap(), "/v1/runs?after=a-public&limit=1000");
        let back =
            Runs::from_fields(Vec::new(), [field("after", "a-public"), field("limit", "1000")].concat()).unwrap();
        assert_eq!((back.after, back.limit), (page.after, Some(1000)));
        let refused = Runs::from_fields(Vec::new(), field("limit", "many")).unwrap_err();
        assert!(refused.to_string().contains("limit must be a whole number of runs"), "{refused}");
    }

    #[test]
    fn a_get_request_with_a_wrong_field_is_refused_in_words() {
        let refused = Runs::from_fields(Vec::new(), field("state", "bogus")).unwrap_err();
        assert!(matches!(&refused, ControlError::BadRequest(m) if m.contains("bogus")), "{refused}");
        assert!(matches!(
            History::from_fields(field("run", "../../etc"), Vec::new()),
            Err(ControlError::BadRequest(_))
        ));
    }

    #[test]
    fn a_field_given_twice_is_refused_not_chosen_from() {
        let twice = [field("state", "failed"), field("state", "queued")].concat();
        assert!(
            matches!(Runs::from_fields(Vec::new(), twice), Err(ControlError::BadRequest(m)) if m.contains("twice"))
        );
        let (path, query) = (field("run", "mine-public"), field("run", "theirs-public"));
        assert!(matches!(History::from_fields(path, query), Err(ControlError::BadRequest(_))));
    }

    fn field(name: &str, value: &str) -> Vec<(String, String)> {
        vec![(name.to_owned(), value.to_owned())]
    }
}
