//! The engine thread: the one owner of the engine and its store.
//!
//! It takes every request waiting in its channel (up to [`GROUP_MAX`]),
//! applies their inputs as one group (one flush), answers each requester and
//! only then sends the group's commands out. While it flushes, new requests
//! queue up and form the next group: group commit without a timer.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use evalflow_activities::RunningJob;
use evalflow_workflow::{
    Attempt, Command, Dispatch, Engine, EngineError, Input, Outcome, Run, RunId, RunState, SledStore, StateTag,
    Timestamp, WorkflowStore,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// The most requests one group takes.
pub const GROUP_MAX: usize = 1024;
/// Requests waiting for the engine thread, at most.
pub const QUEUE_MAX: usize = 8192;

enum Request {
    Apply { inputs: Vec<Input>, reply: Option<oneshot::Sender<Vec<Outcome>>> },
    Running { reply: oneshot::Sender<Vec<RunningJob>> },
    Live { reply: oneshot::Sender<LiveCounts> },
    Resend { older_than: Duration },
}

/// A command owed, as the engine thread tells them apart.
type CommandKey = (RunId, &'static str, Attempt);

fn key(dispatch: &Dispatch) -> CommandKey {
    let attempt = match &dispatch.command {
        Command::LaunchJob { attempt, .. }
        | Command::TerminateJob { attempt, .. }
        | Command::ScorePredictions { attempt, .. }
        | Command::Publish { attempt, .. } => *attempt,
    };
    (dispatch.spec.run.clone(), dispatch.command.kind(), attempt)
}

/// Runs the engine knows to be live, and how many of them hold a job slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LiveCounts {
    /// Runs not ended, or owed a command.
    pub live: usize,
    /// Runs launching or running.
    pub active: usize,
}

/// The engine thread has stopped (after a store failure, or at shutdown).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the engine has stopped")]
pub struct EngineStopped;

/// A handle to send the engine thread inputs and questions.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Request>,
}

impl EngineHandle {
    /// Applies `inputs` and waits until they are durable.
    pub async fn apply(&self, inputs: Vec<Input>) -> Result<Vec<Outcome>, EngineStopped> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(Request::Apply { inputs, reply: Some(reply) }).await.map_err(|_| EngineStopped)?;
        answer.await.map_err(|_| EngineStopped)
    }

    /// Queues `inputs` without waiting for them to be applied.
    pub async fn send(&self, inputs: Vec<Input>) -> Result<(), EngineStopped> {
        if inputs.is_empty() {
            return Ok(());
        }
        self.tx.send(Request::Apply { inputs, reply: None }).await.map_err(|_| EngineStopped)
    }

    /// The jobs of the runs now running.
    pub async fn running(&self) -> Result<Vec<RunningJob>, EngineStopped> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(Request::Running { reply }).await.map_err(|_| EngineStopped)?;
        answer.await.map_err(|_| EngineStopped)
    }

    /// How many runs are live and active.
    pub async fn live(&self) -> Result<LiveCounts, EngineStopped> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(Request::Live { reply }).await.map_err(|_| EngineStopped)?;
        answer.await.map_err(|_| EngineStopped)
    }

    /// Sends again every command owed for longer than `older_than`: one whose
    /// activity was given up on, or whose message was lost, is not left
    /// waiting for a restart. Duplicates are harmless by design.
    pub async fn resend(&self, older_than: Duration) -> Result<(), EngineStopped> {
        self.tx.send(Request::Resend { older_than }).await.map_err(|_| EngineStopped)
    }
}

/// Asks the engine thread to resend stale commands every `every` until `shutdown`.
pub async fn resend_stale(engine: EngineHandle, every: Duration, older_than: Duration, shutdown: CancellationToken) {
    loop {
        tokio::select! { _ = tokio::time::sleep(every) => {}, _ = shutdown.cancelled() => return }
        if engine.resend(older_than).await.is_err() {
            return;
        }
    }
}

/// Starts the engine thread. `recovered` are the commands the live runs were
/// owed on open; they go out first. Commands go to `dispatch`: unbounded,
/// because what is owed is bounded by the live runs, and a bounded channel
/// here could deadlock with workers waiting to send their results.
pub fn spawn(
    engine: Engine<SledStore>,
    recovered: Vec<Dispatch>,
    dispatch: mpsc::UnboundedSender<Dispatch>,
) -> (EngineHandle, std::thread::JoinHandle<Result<(), EngineError>>) {
    let (tx, rx) = mpsc::channel(QUEUE_MAX);
    let thread = std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || run(engine, recovered, rx, dispatch))
        .unwrap_or_else(|e| panic!("cannot start the engine thread: {e}"));
    (EngineHandle { tx }, thread)
}

/// Sends commands out, remembering when each was sent.
struct Outbox {
    channel: mpsc::UnboundedSender<Dispatch>,
    sent: HashMap<CommandKey, Instant>,
}

impl Outbox {
    fn send(&mut self, dispatch: Dispatch) {
        self.sent.insert(key(&dispatch), Instant::now());
        let _ = self.channel.send(dispatch);
    }

    /// Sends again what live runs have owed for longer than `older_than`.
    fn resend(&mut self, engine: &Engine<SledStore>, older_than: Duration) -> Result<(), EngineError> {
        let mut owed = HashMap::new();
        let runs: Vec<RunId> = engine.live_run_ids().cloned().collect();
        for run in runs {
            let Some(stored) = engine.store().load(&run)? else { continue };
            let Run { spec, status } = stored.run;
            for command in status.outbox() {
                let dispatch = Dispatch { spec: spec.clone(), version: status.version, command };
                let sent = self.sent.get(&key(&dispatch)).copied();
                owed.insert(key(&dispatch), sent);
                if sent.is_none_or(|at| at.elapsed() >= older_than) {
                    tracing::info!(run = %dispatch.spec.run, command = dispatch.command.kind(), "owed for long: sending it again");
                    self.send(dispatch);
                }
            }
        }
        // Forget what is no longer owed.
        self.sent.retain(|k, _| owed.contains_key(k));
        Ok(())
    }
}

fn run(
    mut engine: Engine<SledStore>,
    recovered: Vec<Dispatch>,
    mut rx: mpsc::Receiver<Request>,
    channel: mpsc::UnboundedSender<Dispatch>,
) -> Result<(), EngineError> {
    let mut outbox = Outbox { channel, sent: HashMap::new() };
    recovered.into_iter().for_each(|d| outbox.send(d));
    // Admit what waited while no engine ran.
    let admitted = engine.apply(Vec::new(), Timestamp::now())?;
    admitted.dispatches.into_iter().for_each(|d| outbox.send(d));
    while let Some(first) = rx.blocking_recv() {
        let mut requests = vec![first];
        while requests.len() < GROUP_MAX {
            let Ok(next) = rx.try_recv() else { break };
            requests.push(next);
        }
        let mut inputs = Vec::new();
        let mut replies = Vec::new();
        let mut questions = Vec::new();
        for request in requests {
            match request {
                Request::Apply { inputs: more, reply } => {
                    let start = inputs.len();
                    inputs.extend(more);
                    replies.push((reply, start..inputs.len()));
                }
                question => questions.push(question),
            }
        }
        let applied = engine.apply(inputs, Timestamp::now())?;
        // Commands first: when a requester hears back, what its inputs caused is already queued.
        applied.dispatches.into_iter().for_each(|d| outbox.send(d));
        let outcomes = applied.outcomes;
        for (reply, range) in replies {
            if let Some(reply) = reply {
                let _ = reply.send(outcomes[range].to_vec());
            }
        }
        for question in questions {
            match question {
                Request::Resend { older_than } => outbox.resend(&engine, older_than)?,
                other => answer(&engine, other)?,
            }
        }
    }
    Ok(())
}

fn answer(engine: &Engine<SledStore>, question: Request) -> Result<(), EngineError> {
    match question {
        Request::Running { reply } => {
            let runs: Vec<RunId> = engine.live_runs(StateTag::Running).cloned().collect();
            let mut jobs = Vec::with_capacity(runs.len());
            for run in runs {
                let Some(stored) = engine.store().load(&run)? else { continue };
                let since = stored.run.status.updated_at;
                if let RunState::Running { attempt, job, .. } = stored.run.status.state {
                    jobs.push(RunningJob { run, stage: stored.run.spec.stage, attempt, job, since });
                }
            }
            let _ = reply.send(jobs);
        }
        Request::Live { reply } => {
            let (live, active) = engine.live_counts();
            let _ = reply.send(LiveCounts { live, active });
        }
        Request::Apply { .. } | Request::Resend { .. } => unreachable!("handled by the loop"),
    }
    Ok(())
}
