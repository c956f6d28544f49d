//! A node of the embedded deployment: the engine thread, the activity
//! workers and the job watcher on one competition's data directory, and the
//! operations the CLI and the API offer on it.
//!
//! In [`Mode::Engine`] (`evalflow serve`, `evalflow demo`) the node runs the
//! competition: it admits queued runs, carries out every command and follows
//! running jobs. In [`Mode::Direct`] it acts for one CLI command while no
//! engine runs: it starts no job, and carries out only the commands its own
//! requests cause (a cancel's termination, a resumed scoring), before it returns.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::sync::Arc;
use std::time::Duration;

use evalflow_activities::artifacts::FsArtifacts;
use evalflow_activities::aws::logs::BatchLogs;
use evalflow_activities::aws::requests::RequestCounter;
use evalflow_activities::leaderboard::Leaderboard;
use evalflow_activities::local::job::{JobPaths, tail};
use evalflow_activities::local::sandbox::{Isolation, SandboxError};
use evalflow_activities::local::{LocalRunner, LocalRunnerConfig};
use evalflow_activities::{ArtifactStore, JobRunner, PublishedResult};
use evalflow_workflow::cost::{Billing, cost_report};
use evalflow_workflow::engine::InputError;
use evalflow_workflow::plan::observed_secs;
use evalflow_workflow::progress::Tally;
use evalflow_workflow::store::{LIST_LIMIT_MAX, RunFilter, SledOptions, all_runs};
use evalflow_workflow::{
    Dispatch, Disposition, Engine, EngineError, Envelope, Event, FailureReason, IgnoreReason, Input, Outcome, Policy,
    Run, RunId, RunSpec, RunState, SledStore, Stage, StateTag, StoreError, SubmissionId, TeamId, Timestamp,
    WorkflowStore, job_name, replay,
};
use tokio::sync::{Mutex, Notify, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::aws::queues::Queues;
use crate::config::{AwsConfig, Config, ConfigError};
use crate::datadir::lock::DataDirLock;
use crate::engine::activity::Activities;
use crate::engine::watcher::{self, Watch};
use crate::engine::{self, EngineHandle, EngineStopped};
use crate::local::space::Space;
use crate::local::worker;
use crate::metrics::{QueueDepths, Snapshot};
use crate::views::{
    ActionView, BackupView, BudgetView, CostView, DeadLetters, Divergence, DurationsView, EventView, Filter, LogPart,
    LogView, ReloadView, ReplayView, RunView, Selection, StageProblem, StatusView, Wait, WaitingView, waiting,
};

/// Activities other than scorings carried out at once by an engine node
/// (and [`worker::SCORINGS_MAX`] scorings).
const ACTIVITY_CONCURRENCY: usize = 256;
/// Locally, a command owed this long is sent again.
const LOCAL_RESEND_AFTER: Duration = Duration::from_secs(300);
/// Loops reading the events queue, on AWS.
const EVENT_CONSUMERS: usize = 2;
/// How often the watcher looks at running jobs.
const WATCH_INTERVAL: Duration = Duration::from_millis(250);
/// Runs per group when an operator acts on many.
const BULK_GROUP: usize = 1000;
/// Rounds of follow-up commands a direct node carries out for one request.
const SETTLE_ROUNDS_MAX: usize = 16;

/// What the node does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Runs the competition.
    Engine,
    /// Acts for one CLI command while no engine runs.
    Direct,
}

/// How to start a node.
#[derive(Clone)]
pub struct NodeOptions {
    /// How jobs are isolated.
    pub isolation: Isolation,
    /// The supervisor program and its leading arguments (`evalflow supervise`).
    pub supervisor: Vec<OsString>,
    /// What the node does.
    pub mode: Mode,
    /// A job runner to use instead of the sandbox or AWS Batch: tests script
    /// job outcomes with one, and the benchmark's jobs end at once. Never set
    /// from a competition's configuration.
    pub runner: Option<Arc<dyn JobRunner>>,
}

/// Why a node could not start or stopped badly.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The engine.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The sandbox.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// The AWS deployment cannot be reached.
    #[error(transparent)]
    Aws(#[from] crate::aws::ConnectError),
    /// The data directory cannot be made private to the engine's user.
    #[error("cannot make {0} private to evalflow ({1}): run evalflow as the user that owns it")]
    Private(String, std::io::Error),
    /// The engine thread panicked.
    #[error("the engine thread panicked")]
    Panicked,
}

/// Why an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No such run (in the engine's words).
    #[error("{}", InputError::UnknownRun(.0.clone()))]
    UnknownRun(RunId),
    /// The engine stopped.
    #[error(transparent)]
    Stopped(#[from] EngineStopped),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The request itself is wrong.
    #[error("{0}")]
    BadRequest(String),
    /// evalflow itself failed (a worker thread, a service it depends on): not the request's fault.
    #[error("{0}")]
    Internal(String),
}

struct Direct {
    dispatches: Mutex<mpsc::UnboundedReceiver<Dispatch>>,
    activities: Arc<Activities>,
}

/// A running node.
pub struct Node {
    config: Arc<Config>,
    store: SledStore,
    engine: EngineHandle,
    engine_thread: std::thread::JoinHandle<Result<(), EngineError>>,
    shutdown: CancellationToken,
    loops: Vec<JoinHandle<()>>,
    direct: Option<Direct>,
    /// The SQS queues, on AWS.
    queues: Option<Arc<Queues>>,
    /// The AWS requests made, on AWS.
    requests: Option<RequestCounter>,
    /// CloudWatch Logs, on AWS: the jobs' output.
    logs: Option<BatchLogs>,
    /// The stages the engine holds, as it last checked them (an engine's node only).
    held: Option<StageProblems>,
    /// Free disk space, where an engine runs jobs on this machine.
    space: Option<Arc<Space>>,
    /// The budget, and what it allowed when the engine last looked.
    budget: Budget,
    billing: Billing,
    /// Every run tallied, kept up to date (an engine's node only).
    tally: Option<SharedTally>,
    lock: DataDirLock,
}

/// What a deployment acts with.
struct Setup {
    runner: Arc<dyn JobRunner>,
    artifacts: Arc<dyn ArtifactStore>,
    /// The SQS queues, on AWS.
    queues: Option<Arc<Queues>>,
    /// CloudWatch Logs, on AWS.
    logs: Option<BatchLogs>,
    /// The AWS requests made, on AWS.
    requests: Option<RequestCounter>,
    watch: Watch,
    /// Commands owed this long are sent again.
    resend_after: Duration,
    max_active: usize,
    billing: Billing,
}

impl Setup {
    fn local(config: &Config, options: &NodeOptions) -> Result<Setup, NodeError> {
        if options.mode == Mode::Engine {
            config.make_private().map_err(|e| NodeError::Private(config.data_dir.display().to_string(), e))?;
        }
        let runner: Arc<dyn JobRunner> = match &options.runner {
            Some(runner) => runner.clone(),
            None => {
                let runner = LocalRunner::new(LocalRunnerConfig {
                    jobs_dir: config.jobs_dir(),
                    supervisor: options.supervisor.clone(),
                    test_sets: config.stages.iter().map(|(stage, files)| (*stage, files.test_set.clone())).collect(),
                    isolation: options.isolation,
                    limits: config.local.limits(),
                    signatures: config.causes.signature.clone(),
                });
                if options.mode == Mode::Engine {
                    runner.check_host()?;
                }
                Arc::new(runner)
            }
        };
        let labels = config.stages.iter().map(|(stage, files)| (*stage, files.labels.clone())).collect();
        Ok(Setup {
            runner,
            artifacts: Arc::new(FsArtifacts::new(&config.data_dir, labels)),
            queues: None,
            logs: None,
            requests: None,
            watch: Watch { interval: WATCH_INTERVAL, quiet_for: Duration::ZERO },
            resend_after: LOCAL_RESEND_AFTER,
            max_active: config.local.max_concurrent_jobs,
            billing: Billing::ScaledBySpeed,
        })
    }

    async fn aws(config: &Config, aws: &AwsConfig, options: &NodeOptions) -> Result<Setup, NodeError> {
        let parts = crate::aws::connect(config, options.runner.clone()).await?;
        Ok(Setup {
            runner: parts.runner,
            artifacts: parts.artifacts,
            queues: Some(parts.queues),
            logs: Some(parts.logs),
            requests: Some(parts.requests),
            watch: Watch {
                interval: Duration::from_secs(aws.reconcile_interval_secs),
                quiet_for: Duration::from_secs(aws.reconcile_after_secs),
            },
            resend_after: Duration::from_secs(aws.resend_after_secs),
            max_active: aws.max_active_jobs,
            billing: Billing::Actual,
        })
    }
}

/// How often the engine looks again at stages whose files did not agree,
/// and at the free disk space.
const STAGE_WATCH: Duration = Duration::from_secs(5);

/// The stages whose queued runs wait: those not ready, or all of them while
/// the disk is short of space.
fn stages_held(config: &Config, problems: &BTreeMap<Stage, String>, space: Option<&Space>) -> BTreeSet<Stage> {
    match space.and_then(Space::short) {
        Some(_) => config.stages.keys().copied().collect(),
        None => problems.keys().copied().collect(),
    }
}

/// What the engine was told at start: the stages it holds, and whether launching is paused.
struct Holding {
    stages: BTreeSet<Stage>,
    paused: bool,
}

/// The budget an engine holds the competition to (`[policy] budget_usd`,
/// as last loaded), what it allowed when the engine last looked, and a
/// wake-up for the engine to look again at once (after a reload).
#[derive(Default)]
struct BudgetState {
    budget_usd: Option<f64>,
    last: Option<BudgetView>,
}

#[derive(Clone, Default)]
struct Budget {
    state: Arc<std::sync::Mutex<BudgetState>>,
    changed: Arc<Notify>,
}

impl Budget {
    fn lock(&self) -> std::sync::MutexGuard<'_, BudgetState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Every run of `store`, tallied.
fn tally(store: &SledStore, policy: &Policy, billing: Billing) -> Result<Tally, StoreError> {
    let mut tally = Tally::new(policy, billing);
    store.each_run(|stored| tally.add(&stored.run))?;
    Ok(tally)
}

/// An engine's tally of every run, which its engine thread keeps up to date
/// as each group becomes durable ([`Engine::observe`]): what `status` and
/// the budget read, without reading every run.
type SharedTally = Arc<std::sync::Mutex<Tally>>;

fn lock_tally(tally: &SharedTally) -> std::sync::MutexGuard<'_, Tally> {
    tally.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What `budget_usd` allows now, from the runs `tally` counted.
fn budget_view(tally: &Tally, budget_usd: f64) -> BudgetView {
    let now = Timestamp::now();
    BudgetView::new(tally.allowance(budget_usd, now), tally.forecast(0, now).whole.queued)
}

/// Looks again at the budget (when one is set): tells the engine how many
/// more runs it may admit, and returns whether it is spent, so that not even
/// a relaunch goes out. The engine's count is taken before the store is
/// read, so that a run admitted meanwhile is counted twice, never not at all.
async fn watch_budget(tally: &SharedTally, budget: &Budget, engine: &EngineHandle) -> Result<bool, EngineStopped> {
    let Some(budget_usd) = budget.lock().budget_usd else {
        budget.lock().last = None;
        engine.limit_admissions(None).await?;
        return Ok(false);
    };
    let admitted = engine.admitted().await?;
    let view = budget_view(&lock_tally(tally), budget_usd);
    engine.limit_admissions(view.allowance.admits.map(|n| admitted.saturating_add(n))).await?;
    let mut state = budget.lock();
    let was = state.last.as_ref().and_then(|v| v.stopped.clone());
    match (&was, &view.stopped) {
        (None, Some(stopped)) => tracing::warn!("{stopped}"),
        (Some(_), None) => tracing::info!("the budget covers the queued runs again: they launch"),
        _ => {}
    }
    let spent = view.allowance.spent();
    state.last = Some(view);
    Ok(spent)
}

/// Looks at the stages' test sets and labels, at the free disk space and
/// at the budget every [`STAGE_WATCH`] (and at once after a reload) until
/// `shutdown`, and holds the queued runs that cannot launch, so that an
/// organizer's fix (freed space, a raised budget) is taken up without a
/// restart. `told` is what the engine was told at start.
async fn watch_launching(
    config: Arc<Config>,
    held: StageProblems,
    space: Option<Arc<Space>>,
    (tally, budget): (SharedTally, Budget),
    engine: EngineHandle,
    told: Holding,
    shutdown: CancellationToken,
) {
    let Holding { stages: mut holding, mut paused } = told;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(STAGE_WATCH) => {},
            _ = budget.changed.notified() => {},
            _ = shutdown.cancelled() => return,
        }
        let (checked, looked) = (config.clone(), space.clone());
        let Ok(problems) = tokio::task::spawn_blocking(move || {
            if let Some(space) = &looked {
                space.check();
            }
            checked.stage_problems()
        })
        .await
        else {
            return;
        };
        let before = lock_stages(&held).clone();
        for stage in before.keys().filter(|s| !problems.contains_key(s)) {
            tracing::info!("stage {stage} is ready: its runs launch");
        }
        warn_not_ready(&problems, &before);
        let hold = stages_held(&config, &problems, space.as_deref());
        *lock_stages(&held) = problems;
        if hold != holding {
            if engine.hold_stages(hold.clone()).await.is_err() {
                return;
            }
            holding = hold;
        }
        let short = space.as_ref().is_some_and(|space| space.short().is_some());
        let Ok(spent) = watch_budget(&tally, &budget, &engine).await else { return };
        let pause = short || spent;
        if pause != paused {
            if engine.pause_launches(pause).await.is_err() {
                return;
            }
            paused = pause;
        }
    }
}

/// The stages an engine holds, with what is wrong with each: kept by
/// [`watch_stages`], read by `status` and `runs`.
type StageProblems = Arc<std::sync::Mutex<BTreeMap<Stage, String>>>;

fn lock_stages(held: &StageProblems) -> std::sync::MutexGuard<'_, BTreeMap<Stage, String>> {
    held.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Logs each problem of `problems` not already in `known`.
fn warn_not_ready(problems: &BTreeMap<Stage, String>, known: &BTreeMap<Stage, String>) {
    for (stage, problem) in problems.iter().filter(|(s, p)| known.get(s) != Some(p)) {
        tracing::warn!("stage {stage} is not ready, so none of its runs launches until it is: {problem}");
    }
}

/// The competition's artifacts (predictions, labels, results), as its
/// workers reach them: the data directory, or S3.
pub async fn artifacts(config: &Config) -> Result<Arc<dyn ArtifactStore>, NodeError> {
    Ok(match &config.aws {
        None => {
            let labels = config.stages.iter().map(|(stage, files)| (*stage, files.labels.clone())).collect();
            Arc::new(FsArtifacts::new(&config.data_dir, labels))
        }
        Some(_) => crate::aws::connect(config, None).await?.artifacts,
    })
}

/// The runs of `running` whose job has waited more than `secs` to start, longest first.
fn waiting_longer_than(store: &SledStore, running: &[RunId], secs: u64) -> Result<Vec<WaitingView>, ControlError> {
    let now = Timestamp::now();
    let mut flagged = Vec::new();
    for id in running {
        let Some(stored) = store.load(id)? else { continue };
        if let Some(Wait::Start { status, reason, secs: waited }) = waiting(&stored.run.status, now)
            && waited > secs
        {
            flagged.push(WaitingView { run: id.clone(), waited_secs: waited, status, reason });
        }
    }
    flagged.sort_by(|a, b| b.waited_secs.cmp(&a.waited_secs).then_with(|| a.run.cmp(&b.run)));
    Ok(flagged)
}

impl Node {
    /// Opens the store under the data directory's lock and starts the node:
    /// on this machine, or on AWS when the configuration has an `[aws]` table.
    pub async fn start(config: Config, lock: DataDirLock, options: NodeOptions) -> Result<Node, NodeError> {
        let config = Arc::new(config);
        let setup = match &config.aws {
            None => Setup::local(&config, &options)?,
            Some(aws) => Setup::aws(&config, aws, &options).await?,
        };
        let store = SledStore::open(&config.store_dir(), SledOptions::default())?;
        let max_active = match options.mode {
            Mode::Engine => setup.max_active,
            Mode::Direct => 0,
        };
        let (mut engine, recovered) = Engine::open(store.clone(), config.policy.clone(), max_active)?;
        // An engine counts every run once, then follows each change.
        let tally = match options.mode {
            Mode::Engine => {
                let tally: SharedTally = Arc::new(std::sync::Mutex::new(tally(&store, &config.policy, setup.billing)?));
                let kept = tally.clone();
                engine.observe(Box::new(move |spec, before, after| lock_tally(&kept).change(spec, before, after)));
                Some(tally)
            }
            Mode::Direct => None,
        };
        let shutdown = CancellationToken::new();
        // Jobs, results and the store take this machine's disk when it runs the jobs.
        let space = (options.mode == Mode::Engine && config.aws.is_none()).then(|| {
            let dirs = vec![config.store_dir(), config.jobs_dir(), config.data_dir.clone(), config.submissions_dir()];
            let space = Space::new(dirs, config.local.free_disk_min_mib, shutdown.clone());
            space.check();
            Arc::new(space)
        });
        // A direct node (a CLI command while no engine runs) holds nothing and checks when asked.
        let budget = Budget::default();
        budget.lock().budget_usd = config.policy.budget_usd();
        let mut spent = false;
        if let (Some(tally), Some(budget_usd)) = (&tally, config.policy.budget_usd()) {
            // Before the engine admits what waited while none ran.
            let view = budget_view(&lock_tally(tally), budget_usd);
            engine.limit_admissions(view.allowance.admits);
            spent = view.allowance.spent();
            if let Some(stopped) = &view.stopped {
                tracing::warn!("{stopped}");
            }
            budget.lock().last = Some(view);
        }
        let paused = space.as_ref().is_some_and(|space| space.short().is_some()) || spent;
        let mut told = Holding { stages: BTreeSet::new(), paused };
        let held = (options.mode == Mode::Engine).then(|| {
            let problems = config.stage_problems();
            warn_not_ready(&problems, &BTreeMap::new());
            told.stages = stages_held(&config, &problems, space.as_deref());
            engine.hold_stages(told.stages.clone());
            Arc::new(std::sync::Mutex::new(problems))
        });
        let activities = Arc::new(Activities {
            runner: setup.runner.clone(),
            artifacts: setup.artifacts.clone(),
            policy: config.policy.clone(),
        });
        let (dispatch_tx, dispatch_rx) = mpsc::unbounded_channel();
        let (recovered, direct, worker_rx) = match options.mode {
            Mode::Engine => (recovered, None, Some(dispatch_rx)),
            // What was owed before stays owed: it is the next engine's work.
            Mode::Direct => {
                let direct = Direct { dispatches: Mutex::new(dispatch_rx), activities: activities.clone() };
                (Vec::new(), Some(direct), None)
            }
        };
        let (engine, engine_thread) = engine::spawn(engine, recovered, dispatch_tx, setup.resend_after, paused);
        let mut loops = Vec::new();
        if let Some(dispatches) = worker_rx {
            match (&setup.queues, &setup.logs) {
                (None, _) | (_, None) => {
                    let worker = worker::run(
                        activities,
                        space.clone(),
                        dispatches,
                        engine.clone(),
                        ACTIVITY_CONCURRENCY,
                        shutdown.clone(),
                    );
                    loops.push(tokio::spawn(worker));
                }
                (Some(queues), Some(logs)) => {
                    loops.push(tokio::spawn(crate::aws::publish_tasks(queues.clone(), dispatches, shutdown.clone())));
                    for _ in 0..EVENT_CONSUMERS {
                        let consumer =
                            crate::aws::consume_events(queues.clone(), logs.clone(), engine.clone(), shutdown.clone());
                        loops.push(tokio::spawn(consumer));
                    }
                }
            }
            loops.push(tokio::spawn(watcher::run(setup.runner.clone(), engine.clone(), setup.watch, shutdown.clone())));
            loops.push(tokio::spawn(engine::tick(engine.clone(), shutdown.clone())));
            if let (Some(held), Some(tally)) = (&held, &tally) {
                let watch = watch_launching(
                    config.clone(),
                    held.clone(),
                    space.clone(),
                    (tally.clone(), budget.clone()),
                    engine.clone(),
                    told,
                    shutdown.clone(),
                );
                loops.push(tokio::spawn(watch));
            }
        }
        let (queues, requests, logs, billing) = (setup.queues, setup.requests, setup.logs, setup.billing);
        Ok(Node {
            config,
            store,
            engine,
            engine_thread,
            shutdown,
            loops,
            direct,
            queues,
            requests,
            logs,
            held,
            space,
            budget,
            billing,
            tally,
            lock,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Stops the loops (letting running activities finish), then the engine
    /// thread once it has applied what they sent. Jobs keep running.
    pub async fn shutdown(self) -> Result<(), NodeError> {
        let Node { engine, engine_thread, shutdown, loops, direct, .. } = self;
        shutdown.cancel();
        for task in loops {
            let _ = task.await;
        }
        drop((engine, direct));
        let joined = tokio::task::spawn_blocking(move || engine_thread.join()).await;
        match joined {
            Ok(Ok(result)) => Ok(result?),
            _ => Err(NodeError::Panicked),
        }
    }

    /// The AWS requests this node made, on AWS.
    pub fn requests(&self) -> Option<&RequestCounter> {
        self.requests.as_ref()
    }

    /// Whether the engine thread has stopped (a store failure).
    pub fn stopped(&self) -> bool {
        self.engine_thread.is_finished()
    }

    async fn read<T: Send + 'static>(
        &self,
        work: impl FnOnce(&SledStore) -> Result<T, ControlError> + Send + 'static,
    ) -> Result<T, ControlError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || work(&store))
            .await
            .map_err(|e| ControlError::Internal(format!("reader thread: {e}")))?
    }

    /// Runs per state, progress, ETA and cost, the budget, and what keeps runs waiting.
    pub async fn status(&self) -> Result<StatusView, ControlError> {
        let counts = self.store.counts()?;
        // A local job starts at once: only on AWS does one wait long to.
        let (max_active, flag_after) =
            (self.max_active(), self.config.aws.as_ref().map(|aws| aws.flag_waiting_after_secs));
        let problems = self.stage_problems().await?;
        let waiting_long = match flag_after {
            Some(after) => {
                let running: Vec<RunId> = self.engine.running().await?.into_iter().map(|job| job.run).collect();
                self.read(move |store| waiting_longer_than(store, &running, after)).await?
            }
            None => Vec::new(),
        };
        // An engine's budget as it enforces it (it looks again every few
        // seconds); with no engine, as it would be now.
        let (budget_usd, enforced) = {
            let state = self.budget.lock();
            (state.budget_usd.filter(|_| self.direct.is_some()), state.last.clone())
        };
        let (policy, billing) = (self.config.policy.clone(), self.billing);
        let look = move |tally: &Tally| {
            let now = Timestamp::now();
            let forecast = tally.forecast(max_active as u64, now);
            let budget = match budget_usd {
                Some(usd) => Some(BudgetView::new(tally.allowance(usd, now), forecast.whole.queued)),
                None => enforced,
            };
            (forecast, budget)
        };
        let (mut progress, budget) = match &self.tally {
            Some(tally) => look(&lock_tally(tally)),
            None => self.read(move |store| Ok(look(&tally(store, &policy, billing)?))).await?,
        };
        let paused = self.space.as_ref().and_then(|space| space.short());
        // While launching is stopped, the queued runs' end cannot be foreseen.
        let budget_stops = budget.as_ref().is_some_and(|b| b.allowance.spent() || b.allowance.admits == Some(0));
        for (stage, forecast) in &mut progress.stages {
            let held = paused.is_some() || budget_stops || problems.contains_key(stage);
            if held && forecast.queued > 0 {
                forecast.eta_secs = None;
                progress.whole.eta_secs = None;
            }
        }
        let stage_problems = problems.into_iter().map(|(stage, problem)| StageProblem { stage, problem }).collect();
        Ok(StatusView {
            competition: self.config.competition.name.clone(),
            data_dir: self.config.data_dir.display().to_string(),
            counts: counts.iter().collect(),
            progress,
            budget,
            engine: self.lock.announced().map(|info| format!("pid {} at {}", info.pid, info.api)),
            dead_letters: match &self.queues {
                Some(queues) => {
                    let (tasks, events) =
                        queues.dead_letters().await.map_err(|e| ControlError::Internal(e.to_string()))?;
                    Some(DeadLetters { tasks, events })
                }
                None => None,
            },
            max_active: max_active as u64,
            waiting_long,
            stage_problems,
            paused,
        })
    }

    /// The stages that are not ready: as the engine last checked them, or,
    /// with no engine, checked now.
    async fn stage_problems(&self) -> Result<BTreeMap<Stage, String>, ControlError> {
        match &self.held {
            Some(held) => Ok(lock_stages(held).clone()),
            None => {
                let config = self.config.clone();
                self.read(move |_| Ok(config.stage_problems())).await
            }
        }
    }

    /// The runs, all or those in one state, in id order, read after the
    /// engine applied every input sent to it before: those after `after`,
    /// at most `limit` of them (fewer: there are no more).
    pub async fn runs(
        &self,
        state: Option<StateTag>,
        after: Option<RunId>,
        limit: Option<usize>,
    ) -> Result<Vec<RunView>, ControlError> {
        self.engine.running().await?;
        let (policy, billing) = (self.config.policy.clone(), self.billing);
        let problems = self.stage_problems().await?;
        let short = self.space.as_ref().and_then(|space| space.short());
        let budget =
            self.budget.lock().last.as_ref().filter(|b| b.allowance.admits == Some(0)).and_then(|b| b.stopped.clone());
        self.read(move |store| {
            let filter = match state {
                None => RunFilter::All,
                Some(tag) if tag.is_terminal() => RunFilter::Terminal(tag),
                Some(_) => RunFilter::Live,
            };
            let limit = limit.unwrap_or(usize::MAX);
            let (mut views, mut after) = (Vec::new(), after);
            while views.len() < limit {
                // A page of a terminal state or of every run is read whole: no more than asked for.
                let read = match filter {
                    RunFilter::Live => LIST_LIMIT_MAX,
                    RunFilter::All | RunFilter::Terminal(_) => (limit - views.len()).min(LIST_LIMIT_MAX),
                };
                let page = store.stored_runs(filter, after.as_ref(), read)?;
                let last_page = page.len() < read;
                after = page.last().map(|stored| stored.run.spec.run.clone());
                for stored in page {
                    if views.len() == limit {
                        break;
                    }
                    if state.is_some_and(|tag| stored.run.status.state.tag() != tag) {
                        continue;
                    }
                    let mut view = RunView::new(&stored.run, &policy, billing);
                    if let (StateTag::Queued, Some(problem)) = (view.state, &short) {
                        view.waiting = Some(format!("waiting for disk space: {problem}"));
                    } else if let (StateTag::Queued, Some(stopped)) = (view.state, &budget) {
                        view.waiting = Some(format!("waiting for the budget: {stopped}"));
                    } else if let (StateTag::Queued, Some(problem)) = (view.state, problems.get(&view.stage)) {
                        view.waiting = Some(format!("waiting for stage {} to be ready: {problem}", view.stage));
                    }
                    views.push(view);
                }
                if last_page {
                    break;
                }
            }
            Ok(views)
        })
        .await
    }

    /// The teams of those of `submissions` that have a run, read after the
    /// engine applied every input sent to it before: a look-up per stage of
    /// each, however many runs are stored.
    pub async fn teams(&self, submissions: Vec<SubmissionId>) -> Result<BTreeMap<SubmissionId, TeamId>, ControlError> {
        self.engine.running().await?;
        self.read(move |store| {
            let mut teams = BTreeMap::new();
            for submission in submissions {
                for stage in Stage::ALL {
                    if let Some(stored) = store.load(&RunId::new(&submission, stage))? {
                        teams.insert(submission, stored.run.spec.team);
                        break;
                    }
                }
            }
            Ok(teams)
        })
        .await
    }

    /// One run.
    pub async fn run(&self, run: &RunId) -> Result<RunView, ControlError> {
        let (policy, id, billing) = (self.config.policy.clone(), run.clone(), self.billing);
        self.read(move |store| {
            let stored = store.load(&id)?.ok_or_else(|| ControlError::UnknownRun(id.clone()))?;
            Ok(RunView::new(&stored.run, &policy, billing))
        })
        .await
    }

    /// Whether the run still owes the termination of a job.
    pub async fn stopping(&self, run: &RunId) -> Result<bool, ControlError> {
        let id = run.clone();
        self.read(move |store| {
            let stored = store.load(&id)?.ok_or_else(|| ControlError::UnknownRun(id.clone()))?;
            Ok(!stored.run.status.terminations.is_empty())
        })
        .await
    }

    /// A run's history.
    pub async fn history(&self, run: &RunId) -> Result<Vec<EventView>, ControlError> {
        let id = run.clone();
        self.read(move |store| {
            let history = store.history(&id)?;
            if history.is_empty() {
                return Err(ControlError::UnknownRun(id));
            }
            Ok(history.iter().map(EventView::new).collect())
        })
        .await
    }

    /// Replays one run's history, or every run's, against the stored status.
    pub async fn replay(&self, run: Option<RunId>) -> Result<ReplayView, ControlError> {
        let policy = self.config.policy.clone();
        self.read(move |store| {
            let runs = match run {
                Some(run) if store.load(&run)?.is_none() => return Err(ControlError::UnknownRun(run)),
                Some(run) => vec![run],
                None => all_runs(store, RunFilter::All)?,
            };
            let mut diverged = Vec::new();
            for run in &runs {
                if let Err(e) = replay::check(&policy, store, run) {
                    diverged.push(Divergence { run: run.clone(), error: e.to_string() });
                }
            }
            Ok(ReplayView { checked: runs.len(), diverged })
        })
        .await
    }

    /// Submits runs; the same submission again is a no-op. The specs are
    /// checked first, whoever sent them ([`crate::datadir::submit::check_specs`]: a
    /// directory only as `evalflow submit` keeps it, with its digest), and
    /// none is submitted if one is refused.
    pub async fn submit(&self, specs: Vec<RunSpec>) -> Result<Vec<ActionView>, ControlError> {
        let (config, now) = (self.config.clone(), Timestamp::now());
        let specs = self
            .read(move |store| {
                let checked = crate::datadir::submit::check_specs(&config, &specs, now)
                    .and_then(|()| crate::datadir::submit::check_audits(store, &specs));
                match checked {
                    Ok(()) => Ok(specs),
                    Err(refused) => Err(ControlError::BadRequest(refused.to_string())),
                }
            })
            .await?;
        let mut views = Vec::with_capacity(specs.len());
        for chunk in specs.chunks(BULK_GROUP) {
            let outcomes = self.engine.apply(chunk.iter().cloned().map(Input::Submit).collect()).await?;
            views.extend(outcomes.into_iter().map(|o| action(o, "submitted")));
        }
        Ok(views)
    }

    /// Cancels the selected runs, terminating their jobs; with `dry_run`,
    /// says what would happen to each and changes nothing.
    pub async fn cancel(&self, selection: Selection, dry_run: bool) -> Result<Vec<ActionView>, ControlError> {
        let runs = self.selected(selection).await?;
        match dry_run {
            true => self.preview(runs, Event::CancelRequested, "cancelled").await,
            false => self.request(runs, Event::CancelRequested, "cancelled").await,
        }
    }

    /// Retries the selected runs (failed or cancelled ones); with `dry_run`,
    /// says what would happen to each and changes nothing.
    pub async fn retry(&self, selection: Selection, dry_run: bool) -> Result<Vec<ActionView>, ControlError> {
        let runs = self.selected(selection).await?;
        match dry_run {
            true => self.preview(runs, Event::RetryRequested, "requeued").await,
            false => self.request(runs, Event::RetryRequested, "requeued").await,
        }
    }

    /// Scores every scored or published run of `stage` again from its stored
    /// predictions (after the labels were corrected) and publishes it, which
    /// rebuilds the leaderboard; no job runs again. With `dry_run`, says
    /// what would happen to each and changes nothing.
    /// With `only`, just those of them.
    pub async fn rescore(
        &self,
        stage: Stage,
        only: Option<Vec<RunId>>,
        dry_run: bool,
    ) -> Result<Vec<ActionView>, ControlError> {
        let mut runs = Vec::new();
        for state in [StateTag::Scored, StateTag::Published] {
            let filter = Filter { state: Some(state), stage: Some(stage), ..Filter::default() };
            runs.extend(self.selected(Selection::Matching(filter)).await?);
        }
        if let Some(only) = only {
            if let Some(other) = only.iter().find(|run| run.parts().1 != stage) {
                return Err(ControlError::BadRequest(format!("run {other} is not of stage {stage}")));
            }
            runs = only; // the machine refuses each that is no longer scored or published
        }
        runs.sort();
        match dry_run {
            true => self.preview(runs, Event::RescoreRequested, "scored again").await,
            false => self.request(runs, Event::RescoreRequested, "scored again").await,
        }
    }

    /// The runs a selection names, in id order, read after the engine
    /// applied every input sent to it before: the one place a bulk
    /// request's runs are chosen.
    async fn selected(&self, selection: Selection) -> Result<Vec<RunId>, ControlError> {
        let filter = match selection {
            Selection::Runs(runs) => return Ok(runs),
            Selection::Matching(filter) if filter.is_empty() => {
                return Err(ControlError::BadRequest(
                    "an empty filter would select every run: name runs, or give a state, cause, profile, stage or \
                     team"
                        .into(),
                ));
            }
            Selection::Matching(filter) => filter,
        };
        if let Some(cause) = filter.cause.as_deref().filter(|c| !FailureReason::KINDS.contains(c)) {
            return Err(ControlError::BadRequest(format!(
                "no failure is called {cause:?}: use one of {}",
                FailureReason::KINDS.join(", ")
            )));
        }
        self.engine.running().await?;
        self.read(move |store| {
            let scope = match filter.state {
                Some(tag) if tag.is_terminal() => RunFilter::Terminal(tag),
                Some(_) => RunFilter::Live,
                None => RunFilter::All,
            };
            let mut runs = Vec::new();
            store.each_in(scope, |stored| {
                if filter.matches(&stored.run) {
                    runs.push(stored.run.spec.run);
                }
            })?;
            Ok(runs)
        })
        .await
    }

    /// What `event` would do to each of `runs`, from the machine's own
    /// transition on the stored run; nothing is recorded.
    async fn preview(
        &self,
        runs: Vec<RunId>,
        event: Event,
        done: &'static str,
    ) -> Result<Vec<ActionView>, ControlError> {
        let policy = self.config.policy.clone();
        self.read(move |store| {
            let (now, envelope) = (Timestamp::now(), Envelope::unfenced(event));
            let mut views = Vec::with_capacity(runs.len());
            for run in runs {
                let Some(stored) = store.load(&run)? else {
                    let error = InputError::UnknownRun(run.clone()).to_string();
                    views.push(ActionView { run, accepted: false, state: None, message: error });
                    continue;
                };
                let outcome = match evalflow_workflow::step(&policy, &stored.run, &envelope, now) {
                    Ok(transition) => Outcome::Recorded {
                        run,
                        seq: stored.last_seq + 1,
                        version: transition.status.version,
                        state: transition.status.state.tag(),
                        disposition: transition.disposition,
                    },
                    Err(error) => Outcome::Rejected { run, error: error.into() },
                };
                let mut view = action(outcome, done);
                if view.message.starts_with(done) {
                    view.message = format!("would be {}", view.message.replacen(": now ", ": then ", 1));
                }
                views.push(view);
            }
            Ok(views)
        })
        .await
    }

    async fn request(&self, runs: Vec<RunId>, event: Event, done: &str) -> Result<Vec<ActionView>, ControlError> {
        let mut views = Vec::with_capacity(runs.len());
        for chunk in runs.chunks(BULK_GROUP) {
            let inputs = chunk
                .iter()
                .map(|run| Input::Event { run: run.clone(), envelope: Envelope::unfenced(event.clone()) })
                .collect();
            let outcomes = self.engine.apply(inputs).await?;
            views.extend(outcomes.into_iter().map(|o| action(o, done)));
        }
        self.settle().await?;
        Ok(views)
    }

    /// In direct mode, carries out the commands this node's requests caused,
    /// and what those cause in turn (bounded), before returning.
    async fn settle(&self) -> Result<(), ControlError> {
        let Some(direct) = &self.direct else { return Ok(()) };
        let mut dispatches = direct.dispatches.lock().await;
        for _ in 0..SETTLE_ROUNDS_MAX {
            let mut answers = Vec::new();
            while let Ok(dispatch) = dispatches.try_recv() {
                answers.extend(worker::execute_with_retries(&direct.activities, None, &dispatch).await);
            }
            if answers.is_empty() {
                return Ok(());
            }
            self.engine.apply(answers).await?;
        }
        Ok(())
    }

    /// The leaderboard of a stage, from its published runs.
    pub async fn leaderboard(&self, stage: Stage) -> Result<Leaderboard, ControlError> {
        self.read(move |store| {
            let mut results = Vec::new();
            store.each_in(RunFilter::Terminal(StateTag::Published), |stored| {
                let Run { spec, status } = stored.run;
                // An audit run's score is its audit's, never the leaderboard's.
                let counts = spec.stage == stage && spec.audit.is_none();
                if let (RunState::Published { attempt, score }, true) = (status.state, counts) {
                    results.push(PublishedResult::new(&spec, attempt, score, status.version));
                }
            })?;
            Ok(Leaderboard::build(stage, results))
        })
        .await
    }

    /// What every attempt cost, per profile.
    pub async fn cost(&self) -> Result<CostView, ControlError> {
        let (policy, billing) = (self.config.policy.clone(), self.billing);
        self.read(move |store| {
            let mut statuses = Vec::new();
            store.each_run(|stored| statuses.push(stored.run.status))?;
            let report = cost_report(&statuses, &policy, billing);
            Ok(CostView { billing, report })
        })
        .await
    }

    /// Reads `[policy] budget_usd` again from `evalflow.toml` and holds the
    /// competition to it from now on; the rest of the file is read at the
    /// next start.
    pub async fn reload(&self) -> Result<ReloadView, ControlError> {
        if self.direct.is_some() {
            let message = "no engine serves this data directory: `evalflow serve` reads evalflow.toml as it starts";
            return Ok(ReloadView { budget_usd: self.config.policy.budget_usd(), message: message.into() });
        }
        let dir = self.config.data_dir.clone();
        let loaded =
            self.read(move |_| Config::load(&dir).map_err(|e| ControlError::BadRequest(e.to_string()))).await?;
        let budget_usd = loaded.policy.budget_usd();
        let before = std::mem::replace(&mut self.budget.lock().budget_usd, budget_usd);
        self.budget.changed.notify_one();
        let usd = |b: Option<f64>| b.map_or_else(|| "none".to_owned(), crate::views::money);
        let mut message = format!("budget: {} (was {})", usd(budget_usd), usd(before));
        if loaded.policy.with_budget(None) != self.config.policy.clone().with_budget(None) {
            message.push_str("; the other changes to [policy] take effect when evalflow serve is restarted");
        }
        tracing::info!("reloaded evalflow.toml: {message}");
        Ok(ReloadView { budget_usd, message })
    }

    /// The end of the output of `run`'s latest job: its job directory's
    /// stdout and stderr, or on AWS its CloudWatch Logs stream, once
    /// recorded. Control characters are dropped: it is the submission's text.
    pub async fn log(&self, run: &RunId) -> Result<LogView, ControlError> {
        let (id, jobs_dir) = (run.clone(), self.config.jobs_dir());
        let stored = self.read(move |store| store.load(&id)?.ok_or(ControlError::UnknownRun(id))).await?;
        let Some(record) = stored.run.status.attempts.last().cloned() else {
            return Ok(LogView { attempt: None, output: Vec::new(), note: Some("no job yet".into()) });
        };
        let attempt = Some(record.attempt.0);
        let output = match &self.logs {
            None => {
                let paths = JobPaths::new(&jobs_dir, &job_name(run, record.attempt));
                let read = tokio::task::spawn_blocking(move || {
                    [("stdout", tail(&paths.stdout())), ("stderr", tail(&paths.stderr()))]
                })
                .await
                .map_err(|e| ControlError::Internal(format!("reader thread: {e}")))?;
                read.into_iter().map(|(name, text)| LogPart { name: name.into(), text: printable(&text) }).collect()
            }
            Some(logs) => {
                let Some(stream) = record.evidence.as_ref().and_then(|e| e.log_stream.clone()) else {
                    let note = "no log stream recorded yet: `evalflow logs RUN` looks it up while the job runs";
                    return Ok(LogView { attempt, output: Vec::new(), note: Some(note.into()) });
                };
                let lines = logs.tail(stream.as_str()).await.map_err(|e| ControlError::Internal(e.to_string()))?;
                let text: Vec<String> = lines.iter().map(|l| printable(&l.message)).collect();
                vec![LogPart { name: stream.as_str().to_owned(), text: text.join("\n") }]
            }
        };
        Ok(LogView { attempt, output, note: None })
    }

    /// Writes a backup of the competition to `dest` (see [`crate::datadir::backup`]).
    pub async fn backup(&self, dest: std::path::PathBuf) -> Result<BackupView, ControlError> {
        let config = self.config.clone();
        self.read(move |store| {
            let started = std::time::Instant::now();
            let written = crate::datadir::backup::write(&config, store, &dest).map_err(|e| match e {
                crate::datadir::backup::BackupError::Store(e) => ControlError::Store(e),
                other => ControlError::BadRequest(other.to_string()),
            })?;
            let secs = started.elapsed().as_secs_f64();
            tracing::info!("backup written to {} ({} entries, {secs:.2} s)", dest.display(), written.entries);
            Ok(BackupView {
                dest: dest.display().to_string(),
                runs: store.counts()?.total(),
                entries: written.entries,
                secs,
            })
        })
        .await
    }

    /// `GET /metrics`: the store counted, the AWS queues' depths, the engine's measures.
    pub async fn metrics(&self) -> Result<String, ControlError> {
        // SQS not answering leaves its series out of this scrape, not the rest.
        let queues = match &self.queues {
            Some(queues) => match (queues.depths().await, queues.dead_letters().await) {
                (Ok((tasks, events)), Ok((tasks_dead, events_dead))) => {
                    Some(QueueDepths { tasks, events, tasks_dead, events_dead })
                }
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!("metrics without the queues' depths: {e}");
                    None
                }
            },
            None => None,
        };
        let (policy, billing, engine) = (self.config.policy.clone(), self.billing, self.engine.metrics().clone());
        let slots = self.max_active() as u64;
        self.read(move |store| {
            let (now, mut snapshot) = (Timestamp::now(), Snapshot::default());
            let mut tally = Tally::new(&policy, billing);
            store.each_run(|stored| {
                snapshot.add(&stored.run, &policy, billing);
                tally.add(&stored.run);
            })?;
            let progress = tally.forecast(slots, now).whole;
            snapshot.encode(&progress, queues, &engine).map_err(|e| ControlError::Internal(e.to_string()))
        })
        .await
    }

    /// Jobs launching or running at most at once.
    fn max_active(&self) -> usize {
        match &self.config.aws {
            Some(aws) => aws.max_active_jobs,
            None => self.config.local.max_concurrent_jobs,
        }
    }

    /// How long the runs that succeeded took on the reference profile.
    pub async fn durations(&self) -> Result<DurationsView, ControlError> {
        let (policy, billing) = (self.config.policy.clone(), self.billing);
        self.read(move |store| {
            let mut runs = Vec::new();
            store.each_run(|stored| runs.push(stored.run))?;
            let reference_secs = observed_secs(&runs, &policy, billing);
            Ok(DurationsView { runs: runs.len(), reference_secs })
        })
        .await
    }
}

/// `text` without control characters but line ends and tabs.
fn printable(text: &str) -> String {
    text.chars().filter(|c| !c.is_control() || matches!(c, '\n' | '\t')).collect()
}

/// An outcome as the operator reads it.
fn action(outcome: Outcome, done: &str) -> ActionView {
    match outcome {
        Outcome::Recorded { run, state, disposition, .. } => {
            let message = match disposition {
                Disposition::Applied | Disposition::Acknowledged | Disposition::Noted => {
                    format!("{done}: now {state}")
                }
                Disposition::Ignored(IgnoreReason::Duplicate) => format!("already {done}: {state}"),
                Disposition::Ignored(why) => format!("ignored ({why}): {state}"),
            };
            ActionView { run, accepted: true, state: Some(state), message }
        }
        Outcome::Rejected { run, error } => {
            ActionView { run, accepted: false, state: None, message: error.to_string() }
        }
    }
}
