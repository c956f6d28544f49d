//! The engine's driver, the same in both deployments: the engine thread
//! (here), the job watcher ([`watcher`]), and carrying out one command
//! ([`activity`]).
//!
//! The engine thread is the one owner of the engine and its store.
//!
//! It takes every request waiting in its channel (up to [`GROUP_MAX`]),
//! applies their inputs as one group (one flush), sends the group's commands
//! out, and then answers each requester: when a requester hears back, what
//! its inputs caused is already on its way. While it flushes, new requests
//! queue up and form the next group: group commit without a timer.
//!
//! Its [`Dispatcher`] (pure, in the workflow crate, the same code the
//! simulation runs on a virtual clock) keeps the commands' timing: a launch
//! after a backoff is held until its `not_before` and dropped if the run
//! moved on meanwhile (a cancel), and a command owed for too long is sent
//! again. A [`tick`] loop wakes it for both. While launching is paused (the
//! host's disk is short of space), every launch, a retry's too, waits in it
//! until launching resumes.

pub mod activity;
pub mod watcher;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use evalflow_activities::RunningJob;
use evalflow_workflow::{
    Dispatch, Engine, EngineError, Input, Outcome, RunId, RunState, SledStore, Stage, StateTag, Timestamp,
};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use evalflow_workflow::dispatcher::Dispatcher;

/// The most requests one group takes.
pub const GROUP_MAX: usize = 1024;
/// Requests waiting for the engine thread, at most.
pub const QUEUE_MAX: usize = 8192;
/// How often [`tick`] wakes the engine thread.
pub const TICK: Duration = Duration::from_secs(1);

enum Request {
    Apply { inputs: Vec<Input>, reply: Option<oneshot::Sender<Vec<Outcome>>> },
    Running { reply: oneshot::Sender<Vec<RunningJob>> },
    HoldStages { stages: BTreeSet<Stage> },
    PauseLaunches { paused: bool },
    LimitAdmissions { until: Option<u64> },
    Admitted { reply: oneshot::Sender<u64> },
    Tick,
}

/// The engine thread has stopped (after a store failure, or at shutdown).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the engine has stopped")]
pub struct EngineStopped;

/// What the engine thread measures of its groups, for `GET /metrics`.
#[derive(Debug, Clone)]
pub struct EngineMetrics {
    /// Inputs per group applied (one flush each).
    pub group_inputs: Histogram,
    /// Seconds to apply a group and flush it.
    pub group_seconds: Histogram,
}

impl Default for EngineMetrics {
    fn default() -> Self {
        EngineMetrics {
            group_inputs: Histogram::new(exponential_buckets(1.0, 2.0, 11)), // 1 .. 1024 = GROUP_MAX
            group_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)), // 0.1 ms .. 3.3 s
        }
    }
}

/// A handle to send the engine thread inputs and questions.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Request>,
    metrics: EngineMetrics,
}

impl EngineHandle {
    /// What the engine thread measured of its groups.
    pub fn metrics(&self) -> &EngineMetrics {
        &self.metrics
    }

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

    /// Admits no queued run of `stages` from now on (and again those of
    /// every other stage).
    pub async fn hold_stages(&self, stages: BTreeSet<Stage>) -> Result<(), EngineStopped> {
        self.tx.send(Request::HoldStages { stages }).await.map_err(|_| EngineStopped)
    }

    /// Sends no launch from now on, until called again with `false`; the
    /// launches owed meanwhile then go out (those still owed).
    pub async fn pause_launches(&self, paused: bool) -> Result<(), EngineStopped> {
        self.tx.send(Request::PauseLaunches { paused }).await.map_err(|_| EngineStopped)
    }

    /// Runs admitted since the engine opened, once it applied every input sent before.
    pub async fn admitted(&self) -> Result<u64, EngineStopped> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(Request::Admitted { reply }).await.map_err(|_| EngineStopped)?;
        answer.await.map_err(|_| EngineStopped)
    }

    /// Admits queued runs only until [`EngineHandle::admitted`] reaches
    /// `until` (`None`: as slots free).
    pub async fn limit_admissions(&self, until: Option<u64>) -> Result<(), EngineStopped> {
        self.tx.send(Request::LimitAdmissions { until }).await.map_err(|_| EngineStopped)
    }
}

/// Wakes the engine thread every [`TICK`] until `shutdown`, to release the
/// launches whose backoff is over and resend what is owed for too long.
pub async fn tick(engine: EngineHandle, shutdown: CancellationToken) {
    loop {
        tokio::select! { _ = tokio::time::sleep(TICK) => {}, _ = shutdown.cancelled() => return }
        if engine.tx.send(Request::Tick).await.is_err() {
            return;
        }
    }
}

/// Starts the engine thread. `recovered` are the commands the live runs were
/// owed on open; they go out first. Commands go to `dispatch`: unbounded,
/// because what is owed is bounded by the live runs, and a bounded channel
/// here could deadlock with workers waiting to send their results. A command
/// owed for longer than `resend_after` (its task lost, given up on or
/// dead-lettered) is sent again; duplicates are harmless by design. With
/// `paused`, it starts with launching paused ([`EngineHandle::pause_launches`]).
pub fn spawn(
    engine: Engine<SledStore>,
    recovered: Vec<Dispatch>,
    dispatch: mpsc::UnboundedSender<Dispatch>,
    resend_after: Duration,
    paused: bool,
) -> (EngineHandle, std::thread::JoinHandle<Result<(), EngineError>>) {
    let (tx, rx) = mpsc::channel(QUEUE_MAX);
    let clock = Clock { wall: Timestamp::now(), start: Instant::now() };
    let dispatcher = Dispatcher::new(resend_after, paused, clock.now());
    let metrics = EngineMetrics::default();
    let measured = metrics.clone();
    let thread = std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || run(engine, recovered, rx, Out { dispatcher, channel: dispatch, clock }, &measured))
        .unwrap_or_else(|e| panic!("cannot start the engine thread: {e}"));
    (EngineHandle { tx, metrics }, thread)
}

/// The dispatcher's clock: the wall time the thread started at, moved on by
/// a monotonic clock, so that a step of the wall clock neither holds resends
/// back nor sends everything again at once.
struct Clock {
    wall: Timestamp,
    start: Instant,
}

impl Clock {
    fn now(&self) -> Timestamp {
        self.wall.plus_ms(u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX))
    }
}

/// The dispatcher, the channel what it decides goes out on, and its clock.
struct Out {
    dispatcher: Dispatcher,
    channel: mpsc::UnboundedSender<Dispatch>,
    clock: Clock,
}

impl Out {
    fn send(&mut self, dispatches: Vec<Dispatch>) {
        let now = self.clock.now();
        dispatches.into_iter().for_each(|d| self.dispatcher.send(d, now));
        self.flush();
    }

    /// Sends what the dispatcher decided goes out now.
    fn flush(&mut self) {
        for dispatch in self.dispatcher.take_outgoing() {
            let _ = self.channel.send(dispatch);
        }
    }
}

fn run(
    mut engine: Engine<SledStore>,
    recovered: Vec<Dispatch>,
    mut rx: mpsc::Receiver<Request>,
    mut out: Out,
    metrics: &EngineMetrics,
) -> Result<(), EngineError> {
    out.send(recovered);
    // Admit what waited while no engine ran.
    let admitted = engine.apply(Vec::new(), Timestamp::now())?;
    out.dispatcher.settle(&admitted.changed);
    out.send(admitted.dispatches);
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
                // Before this group's admissions.
                Request::HoldStages { stages } => engine.hold_stages(stages),
                Request::LimitAdmissions { until } => engine.limit_admissions(until),
                Request::PauseLaunches { paused } => {
                    out.dispatcher.pause(&engine, paused, out.clock.now())?;
                    out.flush();
                }
                question => questions.push(question),
            }
        }
        let (count, started) = (inputs.len(), Instant::now());
        let applied = engine.apply(inputs, Timestamp::now())?;
        if count > 0 {
            metrics.group_inputs.observe(count as f64);
            metrics.group_seconds.observe(started.elapsed().as_secs_f64());
        }
        // Commands first: when a requester hears back, what its inputs caused is already queued.
        out.dispatcher.settle(&applied.changed);
        out.send(applied.dispatches);
        // The last requester's outcomes are the tail, and so on back: each
        // takes its own out instead of a copy.
        let mut outcomes = applied.outcomes;
        debug_assert_eq!(outcomes.len(), count, "one outcome an input");
        for (reply, range) in replies.into_iter().rev() {
            match reply {
                Some(reply) => _ = reply.send(outcomes.split_off(range.start)),
                None => outcomes.truncate(range.start),
            }
        }
        for question in questions {
            match question {
                Request::Tick => {
                    out.dispatcher.tick(&engine, out.clock.now())?;
                    out.flush();
                }
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
                let Some(stored) = engine.load(&run)? else { continue };
                let since = stored.run.status.updated_at;
                if let RunState::Running { attempt, job, .. } = stored.run.status.state {
                    jobs.push(RunningJob { run, stage: stored.run.spec.stage, attempt, job, since });
                }
            }
            let _ = reply.send(jobs);
        }
        Request::Admitted { reply } => {
            let _ = reply.send(engine.admitted());
        }
        Request::Apply { .. }
        | Request::HoldStages { .. }
        | Request::PauseLaunches { .. }
        | Request::LimitAdmissions { .. }
        | Request::Tick => unreachable!("handled by the loop"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use evalflow_workflow::store::SledOptions;
    use evalflow_workflow::{Detail, Envelope, Event, Evidence, JobId, JobOutcome, JobUsage};

    use super::*;
    use crate::testing;

    struct Harness {
        engine: EngineHandle,
        commands: mpsc::UnboundedReceiver<Dispatch>,
        _dir: tempfile::TempDir,
    }

    impl Harness {
        fn start() -> Harness {
            let dir = tempfile::tempdir().unwrap();
            let store = SledStore::open(dir.path(), SledOptions::default()).unwrap();
            let (engine, recovered) = Engine::open(store, testing::policy(), 8).unwrap();
            let (tx, commands) = mpsc::unbounded_channel();
            let (engine, _thread) = spawn(engine, recovered, tx, Duration::from_secs(3600), false);
            Harness { engine, commands, _dir: dir }
        }

        async fn event(&self, run: &RunId, envelope: Envelope) {
            let input = Input::Event { run: run.clone(), envelope };
            self.engine.apply(vec![input]).await.unwrap();
        }

        /// Submits a run, launches it and reports its job interrupted: the
        /// run owes a second launch after a one-second backoff.
        async fn interrupted_run(&mut self, name: &str) -> RunId {
            let spec = testing::spec(name);
            let run = spec.run.clone();
            self.engine.apply(vec![Input::Submit(spec)]).await.unwrap();
            let launch = self.commands.recv().await.unwrap();
            let (attempt, job) = (launch.command.attempt(), JobId::new("j1").unwrap());
            let launched = Event::JobLaunched { attempt, job: job.clone() };
            self.event(&run, Envelope::answering(launched, launch.version)).await;
            let usage = JobUsage { started_at: None, ended_at: Timestamp::now(), peak_memory_mib: None };
            let outcome = JobOutcome::Interrupted { detail: Detail::new("spot") };
            self.event(
                &run,
                Envelope::unfenced(Event::JobEnded { attempt, job, outcome, usage, evidence: Evidence::default() }),
            )
            .await;
            run
        }

        /// Wakes the engine thread and waits until it has handled the tick.
        async fn tick(&self) {
            self.engine.tx.send(Request::Tick).await.unwrap();
            self.engine.running().await.unwrap();
        }

        fn sent(&mut self) -> Vec<(String, &'static str)> {
            std::iter::from_fn(|| self.commands.try_recv().ok())
                .map(|d| (d.spec.run.to_string(), d.command.kind()))
                .collect()
        }
    }

    #[tokio::test]
    async fn a_launch_is_held_until_its_backoff_ends() {
        let mut h = Harness::start();
        h.interrupted_run("spot").await;
        h.tick().await;
        assert_eq!(h.sent(), [], "the backoff is not over");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        h.tick().await;
        assert_eq!(h.sent(), [("spot-public".to_owned(), "launch_job")]);
    }

    #[tokio::test]
    async fn no_launch_goes_out_while_launching_is_paused() {
        let mut h = Harness::start();
        h.engine.pause_launches(true).await.unwrap();
        for name in ["first", "second"] {
            h.engine.apply(vec![Input::Submit(testing::spec(name))]).await.unwrap();
        }
        assert_eq!(h.sent(), [], "admitted, but not launched");
        let second = testing::spec("second").run;
        h.event(&second, Envelope::unfenced(Event::CancelRequested)).await;
        h.engine.pause_launches(false).await.unwrap();
        h.tick().await;
        let sent = h.sent();
        assert_eq!(
            sent,
            [("second-public".to_owned(), "terminate_job"), ("first-public".to_owned(), "launch_job")],
            "the cancelled run's launch is dropped"
        );
    }

    #[tokio::test]
    async fn a_launch_held_for_a_run_cancelled_meanwhile_is_dropped() {
        let mut h = Harness::start();
        let run = h.interrupted_run("spot").await;
        h.event(&run, Envelope::unfenced(Event::CancelRequested)).await;
        assert_eq!(h.sent(), [("spot-public".to_owned(), "terminate_job")], "nothing waits behind the launch");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        h.tick().await;
        assert_eq!(h.sent(), [], "the cancelled run's launch is never sent");
    }
}
