//! The engine thread: the one owner of the engine and its store.
//!
//! It takes every request waiting in its channel (up to [`GROUP_MAX`]),
//! applies their inputs as one group (one flush), answers each requester and
//! only then sends the group's commands out. While it flushes, new requests
//! queue up and form the next group: group commit without a timer.

use evalflow_activities::RunningJob;
use evalflow_workflow::engine::Applied;
use evalflow_workflow::{Dispatch, Engine, EngineError, Input, Outcome, RunState, SledStore, StateTag, Timestamp};
use evalflow_workflow::{RunId, WorkflowStore};
use tokio::sync::{mpsc, oneshot};

/// The most requests one group takes.
pub const GROUP_MAX: usize = 1024;
/// Requests waiting for the engine thread, at most.
pub const QUEUE_MAX: usize = 8192;

enum Request {
    Apply { inputs: Vec<Input>, reply: Option<oneshot::Sender<Vec<Outcome>>> },
    Running { reply: oneshot::Sender<Vec<RunningJob>> },
    Live { reply: oneshot::Sender<LiveCounts> },
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

fn run(
    mut engine: Engine<SledStore>,
    recovered: Vec<Dispatch>,
    mut rx: mpsc::Receiver<Request>,
    dispatch: mpsc::UnboundedSender<Dispatch>,
) -> Result<(), EngineError> {
    let send_all = |applied: Applied| applied.dispatches.into_iter().for_each(|d| _ = dispatch.send(d));
    recovered.into_iter().for_each(|d| _ = dispatch.send(d));
    // Admit what waited while no engine ran.
    send_all(engine.apply(Vec::new(), Timestamp::now())?);
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
        let mut applied = engine.apply(inputs, Timestamp::now())?;
        let outcomes = std::mem::take(&mut applied.outcomes);
        // Commands first: when a requester hears back, what its inputs caused is already queued.
        send_all(applied);
        for (reply, range) in replies {
            if let Some(reply) = reply {
                let _ = reply.send(outcomes[range].to_vec());
            }
        }
        for question in questions {
            answer(&engine, question)?;
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
        Request::Apply { .. } => unreachable!("applied with the group"),
    }
    Ok(())
}
