//! The simulation's one loop: a virtual clock, a queue of what happens next,
//! and the real engine and dispatcher in the middle. No thread, no sleep,
//! nothing random but the seeded generator: a seed replays exactly.

use std::collections::BTreeMap;

use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};

use super::store::FlakyStore;
use super::world::{Started, World};
use super::{Faults, Scenario};
use crate::dispatcher::{Dispatcher, millis};
use crate::engine::{Dispatch, Engine, EngineError, Input};
use crate::ids::{Attempt, RunId};
use crate::machine::{Activity, Command, Envelope, Event, Evidence, JobUsage, RunState, Score, StateTag};
use crate::store::{MemoryStore, WorkflowStore};
use crate::time::Timestamp;

/// Tries of an activity that meets throttling before the worker gives up
/// (as the in-process worker does).
const TRIES_MAX: u32 = 5;
/// Happenings one simulation handles at most, per run and in all (a seed
/// takes about 3,600 on average): a scenario that never settles ends there,
/// with its live runs reported as never ended.
const STEPS_MAX: u64 = 500_000;
const STEPS_PER_RUN_MAX: u64 = 1_000;
/// The first delay between two tries; it doubles each time.
const RETRY_FIRST_MS: u64 = 500;

/// What happens at a point of virtual time.
#[derive(Debug)]
enum Happening {
    /// Inputs reach the engine.
    ToEngine(Vec<Input>),
    /// A command reaches a worker.
    ToWorker(Dispatch),
    /// A worker's try of a command is done.
    Done(Dispatch, u32),
    /// A job's time is up.
    JobEnds((RunId, Attempt)),
    /// The dispatcher's deadline.
    Tick,
    /// The watcher (or reconciler) looks at the running jobs.
    Reconcile,
    /// The engine's clock jumps.
    ClockJump,
}

/// What a simulation ended with.
pub struct Simulated {
    /// The engine's store at the end.
    pub store: MemoryStore,
    /// The world at the end.
    pub world: World,
    /// When the last run ended (or the horizon, if some never did).
    pub end: Timestamp,
    /// Engine crashes, messages dropped, duplicated: what the faults did.
    pub faults: FaultCounts,
    /// Happenings handled.
    pub steps: u64,
    /// Commands the dispatcher let out that their run no longer owed then:
    /// (run, what was sent, the run's version at the time).
    pub unowed_sends: Vec<(RunId, String, u64)>,
}

/// What the injected faults did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultCounts {
    /// Engine crashes between a flush and its sends.
    pub engine_crashes: u32,
    /// Flushes that failed, each stopping the engine.
    pub failed_flushes: u32,
    /// Workers that died in the middle of an activity.
    pub worker_crashes: u32,
    /// Messages lost.
    pub dropped: u32,
    /// Messages delivered twice.
    pub duplicated: u32,
    /// Activity tries throttled.
    pub throttled: u32,
    /// Clock jumps.
    pub clock_jumps: u32,
}

impl std::ops::AddAssign for FaultCounts {
    fn add_assign(&mut self, other: FaultCounts) {
        self.engine_crashes += other.engine_crashes;
        self.failed_flushes += other.failed_flushes;
        self.worker_crashes += other.worker_crashes;
        self.dropped += other.dropped;
        self.duplicated += other.duplicated;
        self.throttled += other.throttled;
        self.clock_jumps += other.clock_jumps;
    }
}

struct Driver<'a> {
    scenario: &'a Scenario,
    rng: Xoshiro256PlusPlus,
    queue: BTreeMap<(u64, u64), Happening>,
    seq: u64,
    now: Timestamp,
    /// The engine's clock minus the world's, in ms (clock jumps).
    skew: i64,
    engine: Option<Engine<FlakyStore>>,
    dispatcher: Dispatcher,
    tick_at: Option<u64>,
    /// Whether the watcher's next look is scheduled.
    watching: bool,
    world: World,
    faults: FaultCounts,
    last_end: Timestamp,
    unowed_sends: Vec<(RunId, String, u64)>,
}

/// Runs `scenario` with `seed` until every run ended or the horizon.
pub fn simulate(scenario: &Scenario, seed: u64) -> Result<Simulated, EngineError> {
    simulate_on(MemoryStore::default(), scenario, seed)
}

/// Runs `scenario` with `seed` on an engine whose store already holds
/// `store` (the runs of an earlier stage, to learn from).
pub fn simulate_on(store: MemoryStore, scenario: &Scenario, seed: u64) -> Result<Simulated, EngineError> {
    let (engine, recovered) = Engine::open(FlakyStore::new(store), scenario.policy.clone(), scenario.max_active)?;
    let world = World::new(scenario);
    let start = scenario.submissions.iter().map(|(spec, _)| spec.submitted_at).min().unwrap_or_default();
    let mut driver = Driver {
        scenario,
        rng: Xoshiro256PlusPlus::seed_from_u64(seed),
        queue: BTreeMap::new(),
        seq: 0,
        now: start,
        skew: 0,
        engine: Some(engine),
        dispatcher: Dispatcher::new(scenario.resend_after, false, start),
        tick_at: None,
        watching: false,
        world,
        faults: FaultCounts::default(),
        last_end: start,
        unowed_sends: Vec::new(),
    };
    driver.dispatch(recovered)?;
    for (spec, _) in &scenario.submissions {
        driver.schedule(spec.submitted_at, Happening::ToEngine(vec![Input::Submit(spec.clone())]));
    }
    for (at, run, event) in &scenario.requests {
        let request = Input::Event { run: run.clone(), envelope: Envelope::unfenced(event.clone()) };
        driver.schedule(*at, Happening::ToEngine(vec![request]));
    }
    if scenario.faults.clock_jump_per_hour > 0.0 {
        let after = driver.exponential_ms(scenario.faults.clock_jump_per_hour);
        driver.schedule(start.plus_ms(after), Happening::ClockJump);
    }
    let horizon = start.plus_ms(millis(scenario.horizon));
    // And enough for the dispatcher's look every minute until the horizon.
    let steps_max = STEPS_MAX
        .max(STEPS_PER_RUN_MAX.saturating_mul(scenario.submissions.len() as u64))
        .max(scenario.horizon.as_secs() / 30);
    let mut steps = 0;
    while let Some(((at, _), happening)) = driver.queue.pop_first() {
        if at > horizon.0 || steps >= steps_max {
            break;
        }
        driver.now = Timestamp(at);
        steps += 1;
        driver.handle(happening)?;
    }
    let end = if driver.live() > 0 { horizon } else { driver.last_end };
    let store = driver.engine.take().map(Engine::into_store).unwrap_or_default().into_inner();
    let unowed_sends = driver.unowed_sends;
    Ok(Simulated { store, world: driver.world, end, faults: driver.faults, steps, unowed_sends })
}

impl Driver<'_> {
    fn faults(&self) -> &Faults {
        &self.scenario.faults
    }

    fn engine(&mut self) -> &mut Engine<FlakyStore> {
        self.engine.as_mut().unwrap_or_else(|| unreachable!("the engine is open while the simulation runs"))
    }

    fn live(&self) -> usize {
        self.engine.as_ref().map_or(0, |engine| engine.live_counts().0)
    }

    /// The engine's clock: the world's, plus the jumps it made.
    fn clock(&self) -> Timestamp {
        Timestamp(self.now.0.saturating_add_signed(self.skew))
    }

    fn schedule(&mut self, at: Timestamp, happening: Happening) {
        self.seq += 1;
        self.queue.insert((at.0, self.seq), happening);
    }

    fn exponential_ms(&mut self, per_hour: f64) -> u64 {
        let hours = -(1.0 - self.rng.random::<f64>()).ln() / per_hour;
        (hours * 3_600_000.0) as u64
    }

    /// Sends a message over the faulty network: lost, late, or twice.
    fn send(&mut self, happening: impl Fn() -> Happening) {
        let faults = *self.faults();
        if self.rng.random_bool(faults.drop) {
            self.faults.dropped += 1;
            return;
        }
        let copies = if self.rng.random_bool(faults.duplicate) { 2 } else { 1 };
        self.faults.duplicated += copies - 1;
        for _ in 0..copies {
            let delay = if faults.delay_max_ms == 0 { 0 } else { self.rng.random_range(0..=faults.delay_max_ms) };
            self.schedule(self.now.plus_ms(delay), happening());
        }
    }

    fn handle(&mut self, happening: Happening) -> Result<(), EngineError> {
        match happening {
            Happening::ToEngine(mut inputs) => {
                // Everything that reaches the engine at once is one group.
                while let Some(entry) = self.queue.first_entry() {
                    if entry.key().0 != self.now.0 || !matches!(entry.get(), Happening::ToEngine(_)) {
                        break;
                    }
                    if let Happening::ToEngine(more) = entry.remove() {
                        inputs.extend(more);
                    }
                }
                self.apply(inputs)?;
            }
            Happening::ToWorker(dispatch) => {
                let latency = activity_ms(&dispatch.command);
                self.schedule(self.now.plus_ms(latency), Happening::Done(dispatch, 0));
            }
            Happening::Done(dispatch, tries) => self.done(dispatch, tries),
            Happening::JobEnds(key) => {
                if let Some((outcome, started)) = self.world.end(&key, self.now, &mut self.rng) {
                    self.start(started);
                    let input = self.job_ended(&key, outcome);
                    self.send(|| Happening::ToEngine(vec![input.clone()]));
                }
            }
            Happening::Tick => {
                if self.tick_at == Some(self.now.0) {
                    self.tick_at = None;
                    let clock = self.clock();
                    let Some(engine) = self.engine.as_ref() else { return Ok(()) };
                    self.dispatcher.tick(engine, clock)?;
                    self.flush();
                }
            }
            Happening::Reconcile => {
                self.watching = false;
                self.reconcile()?;
                self.watch();
            }
            Happening::ClockJump => {
                let max = self.faults().clock_jump_max_ms as i64;
                self.skew += self.rng.random_range(-max..=max);
                self.faults.clock_jumps += 1;
                // The engine's deadlines moved with its clock.
                self.tick_at = None;
                self.flush();
                if self.live() > 0 {
                    let after = self.exponential_ms(self.faults().clock_jump_per_hour);
                    self.schedule(self.now.plus_ms(after), Happening::ClockJump);
                }
            }
        }
        Ok(())
    }

    /// Applies one group. Its flush may fail (the engine stops, and its
    /// inputs are lost with it, as an unacknowledged group is), or the
    /// engine may crash after the flush, before its sends.
    fn apply(&mut self, inputs: Vec<Input>) -> Result<(), EngineError> {
        let clock = self.clock();
        let live_before = self.live();
        let flush_fails = self.rng.random_bool(self.faults().flush_fail);
        if let Some(engine) = self.engine.as_ref() {
            engine.store().fail_commits(flush_fails);
        }
        // The operator's requests, should the group fail: an operator told
        // of the failure asks again a minute later.
        let operator: Vec<Input> =
            if flush_fails { inputs.iter().filter(|i| by_operator(i)).cloned().collect() } else { Vec::new() };
        let applied = match self.engine().apply(inputs, clock) {
            Ok(applied) => applied,
            Err(EngineError::Store(_)) if flush_fails => {
                self.faults.failed_flushes += 1;
                if !operator.is_empty() {
                    self.schedule(self.now.plus_ms(60_000), Happening::ToEngine(operator));
                }
                return self.restart();
            }
            Err(e) => return Err(e),
        };
        self.note_ends(live_before);
        if self.rng.random_bool(self.faults().engine_crash) {
            // The group is durable; its commands never left.
            self.faults.engine_crashes += 1;
            return self.restart();
        }
        self.dispatcher.settle(&applied.changed);
        self.dispatch(applied.dispatches)
    }

    /// A new engine on the store, with a new dispatcher: it sends what the
    /// live runs are owed and admits what waits, as the engine thread does.
    fn restart(&mut self) -> Result<(), EngineError> {
        let clock = self.clock();
        let store = self.engine.take().map(Engine::into_store).unwrap_or_default();
        store.fail_commits(false);
        let (engine, recovered) = Engine::open(store, self.scenario.policy.clone(), self.scenario.max_active)?;
        self.engine = Some(engine);
        self.dispatcher = Dispatcher::new(self.scenario.resend_after, false, clock);
        self.tick_at = None;
        // As the engine thread does: what the live runs are owed first, then admission.
        self.dispatch(recovered)?;
        let live_before = self.live();
        let admitted = self.engine().apply(Vec::new(), clock)?;
        self.dispatcher.settle(&admitted.changed);
        self.dispatch(admitted.dispatches)?;
        self.note_ends(live_before);
        Ok(())
    }

    /// Notes when the last live run ended (for the makespan), and keeps the
    /// watcher looking while runs are live.
    fn note_ends(&mut self, live_before: usize) {
        if live_before > 0 && self.live() == 0 {
            self.last_end = self.now;
        }
        self.watch();
    }

    /// Schedules the watcher's next look, while runs are live.
    fn watch(&mut self) {
        if !self.watching && self.live() > 0 {
            self.watching = true;
            let next = self.now.plus_ms(millis(self.scenario.reconcile_every));
            self.schedule(next, Happening::Reconcile);
        }
    }

    fn dispatch(&mut self, dispatches: Vec<Dispatch>) -> Result<(), EngineError> {
        let clock = self.clock();
        for dispatch in dispatches {
            self.dispatcher.send(dispatch, clock);
        }
        self.flush();
        Ok(())
    }

    /// Sends what the dispatcher let out, and wakes it at its next deadline.
    fn flush(&mut self) {
        for dispatch in self.dispatcher.take_outgoing() {
            self.check_owed(&dispatch);
            self.send(|| Happening::ToWorker(dispatch.clone()));
        }
        // Nothing live, nothing to wake for (a submission wakes it again).
        if self.live() == 0 {
            return;
        }
        // The dispatcher's deadline is on the engine's clock.
        let deadline = self.dispatcher.next_deadline();
        let at = Timestamp(deadline.0.saturating_add_signed(-self.skew).max(self.now.0));
        if self.tick_at.is_none_or(|t| at.0 < t) {
            self.tick_at = Some(at.0);
            self.schedule(at, Happening::Tick);
        }
    }

    /// Notes a command sent that its run does not owe at this moment.
    fn check_owed(&mut self, dispatch: &Dispatch) {
        let Some(engine) = self.engine.as_ref() else { return };
        let stored = engine.store().load(&dispatch.spec.run).ok().flatten();
        let owed = stored.as_ref().is_some_and(|s| {
            s.run.status.version == dispatch.version && s.run.status.outbox().contains(&dispatch.command)
        });
        if !owed {
            let version = stored.map_or(0, |s| s.run.status.version);
            self.unowed_sends.push((
                dispatch.spec.run.clone(),
                format!("{:?} of v{}", dispatch.command, dispatch.version),
                version,
            ));
        }
    }

    /// A worker's try of `dispatch`: throttled (tried again after a delay,
    /// then given up on), or done, with its answer sent (unless the worker
    /// dies before it sends it).
    fn done(&mut self, dispatch: Dispatch, tries: u32) {
        if self.rng.random_bool(self.faults().throttle) {
            self.faults.throttled += 1;
            if tries + 1 < TRIES_MAX {
                let delay = RETRY_FIRST_MS << tries;
                self.schedule(self.now.plus_ms(delay), Happening::Done(dispatch, tries + 1));
            } else if let Some(input) = dispatch.given_up("throttled") {
                if let Some(activity) = activity_of(&dispatch.command) {
                    self.world.given_up.push((dispatch.spec.run.clone(), activity));
                }
                self.send(|| Happening::ToEngine(vec![input.clone()]));
            }
            return;
        }
        let answer = self.carry_out(&dispatch);
        if self.rng.random_bool(self.faults().worker_crash) {
            self.faults.worker_crashes += 1;
            return;
        }
        if !answer.is_empty() {
            self.send(|| Happening::ToEngine(answer.clone()));
        }
    }

    /// What `dispatch` does in the world, and the events that answer it.
    fn carry_out(&mut self, dispatch: &Dispatch) -> Vec<Input> {
        let run = &dispatch.spec.run;
        let answer = |event| Input::Event { run: run.clone(), envelope: Envelope::answering(event, dispatch.version) };
        let unfenced = |event| Input::Event { run: run.clone(), envelope: Envelope::unfenced(event) };
        match &dispatch.command {
            Command::LaunchJob { attempt, profile, .. } => {
                let (job, started) = self.world.launch(run, *attempt, profile, self.now, &mut self.rng);
                self.start(started);
                vec![answer(Event::JobLaunched { attempt: *attempt, job })]
            }
            Command::TerminateJob { attempt, job } => {
                let started = self.world.terminate(&(run.clone(), *attempt), self.now, &mut self.rng);
                self.start(started);
                vec![unfenced(Event::JobTerminated { attempt: *attempt, job: job.clone() })]
            }
            Command::ScorePredictions { attempt, .. } => {
                let score = self.world.nature(run).map_or(0.5, |n| n.score);
                let score = Score::new(score).unwrap_or_else(|| unreachable!("a finite score"));
                vec![answer(Event::PredictionsScored { attempt: *attempt, score })]
            }
            Command::Publish { attempt, score } => {
                self.world.publish(run, *attempt, *score);
                vec![answer(Event::Published { attempt: *attempt })]
            }
            Command::Withdraw { attempt } => {
                self.world.withdraw(run, *attempt);
                vec![unfenced(Event::Withdrawn { attempt: *attempt })]
            }
        }
    }

    fn start(&mut self, started: Vec<Started>) {
        for (key, ends_at) in started {
            self.schedule(ends_at, Happening::JobEnds(key));
        }
    }

    fn job_ended(&self, key: &(RunId, Attempt), outcome: crate::machine::JobOutcome) -> Input {
        let (run, attempt) = key;
        let (job, started_at) = match self.world.jobs.get(key) {
            Some(job) => match job.state {
                super::world::JobState::Ended { started, .. } => (job.id.clone(), started),
                _ => (job.id.clone(), None),
            },
            None => unreachable!("a job that ended exists"),
        };
        let usage = JobUsage { started_at, ended_at: self.now, peak_memory_mib: None };
        let event = Event::JobEnded { attempt: *attempt, job, outcome, usage, evidence: Evidence::default() };
        Input::Event { run: run.clone(), envelope: Envelope::unfenced(event) }
    }

    /// The watcher's look: a job the engine believes running that has
    /// ended is reported again (its first report may have been lost).
    fn reconcile(&mut self) -> Result<(), EngineError> {
        let Some(engine) = self.engine.as_ref() else { return Ok(()) };
        let mut running: Vec<RunId> = engine.live_runs(StateTag::Running).cloned().collect();
        running.sort();
        let mut inputs = Vec::new();
        for run in running {
            let Some(stored) = engine.store().load(&run)? else { continue };
            let RunState::Running { attempt, .. } = stored.run.status.state else { continue };
            let key = (run, attempt);
            if let Some(super::world::Job {
                state: super::world::JobState::Ended { outcome: Some(outcome), .. }, ..
            }) = self.world.jobs.get(&key)
            {
                let outcome = outcome.clone();
                inputs.push(self.job_ended(&key, outcome));
            }
        }
        if !inputs.is_empty() {
            self.send(|| Happening::ToEngine(inputs.clone()));
        }
        Ok(())
    }
}

/// The activity a command is, of those a worker can give up on.
fn activity_of(command: &Command) -> Option<Activity> {
    match command {
        Command::LaunchJob { .. } => Some(Activity::Launch),
        Command::ScorePredictions { .. } => Some(Activity::Score),
        Command::Publish { .. } => Some(Activity::Publish),
        Command::TerminateJob { .. } | Command::Withdraw { .. } => None,
    }
}

/// Whether `input` is the operator's (a submission, a cancel, a retry), not a worker's.
fn by_operator(input: &Input) -> bool {
    match input {
        Input::Submit(_) => true,
        Input::Event { envelope, .. } => {
            matches!(envelope.event, Event::CancelRequested | Event::RetryRequested | Event::RescoreRequested)
        }
    }
}

/// How long a worker takes to carry a command out, in ms.
fn activity_ms(command: &Command) -> u64 {
    match command {
        Command::LaunchJob { .. } => 2_000,
        Command::ScorePredictions { .. } => 10_000,
        Command::Publish { .. } | Command::TerminateJob { .. } | Command::Withdraw { .. } => 1_000,
    }
}
