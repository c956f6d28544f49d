//! The engine: applies events to runs in groups, durably, and hands out the
//! commands they owe.
//!
//! One call to [`Engine::apply`] is one group commit:
//!
//! 1. each input is applied with [`step`] to the run as this group left it;
//! 2. queued runs are admitted while fewer than `max_active` jobs are
//!    launching or running, oldest submission first;
//! 3. every entry of the group is written in one atomic batch and flushed once;
//! 4. only then are the outcomes and the commands returned, so nothing leaves
//!    the engine before the transition that caused it is on disk.
//!
//! [`Engine::open`] recovers: it reads the live index and returns every
//! command each live run is owed, for the driver to send again. Commands are
//! idempotent, so sending one twice is harmless; losing one is not possible.

use std::collections::{BTreeSet, HashMap};

use crate::ids::{RunId, Stage, SubmissionId};
use crate::machine::{
    AUDIT_SUFFIX, Activity, Command, Detail, Disposition, Envelope, Event, HistoryEntry, LearnedStart, Run, RunSpec,
    RunStatus, StateTag, TransitionError, is_audit_name, learned_start, step,
};
use crate::policy::Policy;
use crate::store::{self, Commit, RunChange, RunFilter, StoreError, StoredRun, WorkflowStore};
use crate::time::Timestamp;

/// Something to apply: a submission or an event for a run.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Input {
    /// A new submission; the same one again is a no-op.
    Submit(RunSpec),
    /// An event for an existing run.
    Event {
        /// The run.
        run: RunId,
        /// The event and its fence.
        envelope: Envelope,
    },
}

impl Input {
    /// The run the input is for.
    pub fn run(&self) -> &RunId {
        match self {
            Input::Submit(spec) => &spec.run,
            Input::Event { run, .. } => run,
        }
    }
}

/// Why an input was refused. Nothing was recorded for it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InputError {
    /// No run has this id.
    #[error("no run {0}: list runs with `evalflow runs`")]
    UnknownRun(RunId),
    /// The run's state does not allow the request.
    #[error(transparent)]
    Transition(#[from] TransitionError),
}

/// What happened to one input.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Recorded as entry `seq` of the run's history.
    Recorded {
        /// The run.
        run: RunId,
        /// The entry.
        seq: u32,
        /// The run's version after it.
        version: u64,
        /// The run's state after it.
        state: StateTag,
        /// What it did.
        disposition: Disposition,
    },
    /// Refused; nothing recorded.
    Rejected {
        /// The run.
        run: RunId,
        /// Why.
        error: InputError,
    },
}

/// A command to carry out, with the run it is for and the version it was issued at.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Dispatch {
    /// The run's spec: everything a worker needs to know about the submission.
    pub spec: RunSpec,
    /// The run's version; the answering event carries it back as its fence.
    pub version: u64,
    /// What to do.
    pub command: Command,
}

impl Dispatch {
    /// The answer of a worker that gave up on this command after `error`:
    /// the run fails with a resumable `activity_failed`. A termination or a
    /// withdrawal has none: it stays owed, and is sent again.
    pub fn given_up(&self, error: impl Into<String>) -> Option<Input> {
        let (attempt, activity) = match &self.command {
            Command::LaunchJob { attempt, .. } => (*attempt, Activity::Launch),
            Command::ScorePredictions { attempt, .. } => (*attempt, Activity::Score),
            Command::Publish { attempt, .. } => (*attempt, Activity::Publish),
            Command::TerminateJob { .. } | Command::Withdraw { .. } => return None,
        };
        let event = Event::ActivityFailed { attempt, activity, error: Detail::new(error) };
        Some(Input::Event { run: self.spec.run.clone(), envelope: Envelope::answering(event, self.version) })
    }
}

/// The result of one group commit.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Applied {
    /// One outcome per input, in input order.
    pub outcomes: Vec<Outcome>,
    /// The commands to send, now that the group is durable.
    pub dispatches: Vec<Dispatch>,
    /// Runs admitted by the scheduler in this group.
    pub admitted: usize,
    /// Every run the group changed, with every command it owes now (its
    /// outbox): what was sent for it and is not among them need not be
    /// sent again ([`Dispatcher::settle`](crate::dispatcher::Dispatcher::settle)).
    pub changed: Vec<(RunId, Vec<Command>)>,
}

/// A failure of the engine itself. Fatal: stop, and reopen to recover.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The store failed; the group was not acknowledged.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The live index and a run's status disagree.
    #[error("the live index lists run {run}, which {problem}")]
    Inconsistent {
        /// The run.
        run: RunId,
        /// What is wrong.
        problem: &'static str,
    },
}

/// The in-memory view of the live runs, rebuilt on open.
///
/// It holds every live run past its queue whole, as the engine last wrote
/// it: a group starts from it instead of reading the run back from the
/// store, and so do the dispatcher and the job watcher. Queued runs, which
/// a bulk submission can make numerous, are read from the store once, when
/// they are admitted.
#[derive(Debug, Default)]
struct LiveSet {
    runs: HashMap<RunId, LiveRun>,
    /// Queued runs, oldest submission first: the admission order.
    queue: BTreeSet<(Timestamp, RunId)>,
    /// Runs launching or running: the jobs that hold a slot.
    active: usize,
    /// Runs that owe a command (their outbox is not empty).
    owing: BTreeSet<RunId>,
}

#[derive(Debug)]
struct LiveRun {
    tag: StateTag,
    /// The run as last written, unless it is queued.
    stored: Option<StoredRun>,
}

fn holds_slot(tag: StateTag) -> bool {
    matches!(tag, StateTag::Launching | StateTag::Running)
}

impl LiveSet {
    /// Takes the run as it was just written (or read on open).
    fn update(&mut self, stored: StoredRun) {
        let Run { spec, status } = &stored.run;
        let run = &spec.run.clone(); // `stored` moves into the set below
        match (status.owes(), self.owing.contains(run)) {
            (true, false) => _ = self.owing.insert(run.clone()),
            (false, true) => _ = self.owing.remove(run),
            _ => {}
        }
        let (tag, submitted_at) = (status.state.tag(), spec.submitted_at);
        let old = self.runs.get(run).map(|old| old.tag);
        if let Some(old) = old {
            self.active -= usize::from(holds_slot(old));
            if old == StateTag::Queued {
                self.queue.remove(&(submitted_at, run.clone()));
            }
        }
        if !status.is_live() {
            if old.is_some() {
                self.runs.remove(run);
            }
            return;
        }
        self.active += usize::from(holds_slot(tag));
        if tag == StateTag::Queued {
            self.queue.insert((submitted_at, run.clone()));
        }
        let stored = (tag != StateTag::Queued).then_some(stored);
        match self.runs.get_mut(run) {
            Some(live) => (live.tag, live.stored) = (tag, stored),
            None => _ = self.runs.insert(run.clone(), LiveRun { tag, stored }),
        }
    }

    /// Takes a live run's copy out, for a group to change: until the group
    /// puts it back ([`LiveSet::update`]), the run is read from the store.
    fn take(&mut self, run: &RunId) -> Option<StoredRun> {
        self.runs.get_mut(run)?.stored.take()
    }
}

/// A run being changed by the current group.
struct Working {
    stored: StoredRun,
    before: Option<RunStatus>,
    entries: Vec<HistoryEntry>,
    /// Commands issued by this group's entries.
    issued: Vec<Command>,
}

/// The runs a group touches, in the order it first touched them.
struct Group {
    order: Vec<RunId>,
    runs: HashMap<RunId, Working>,
}

/// What is told, once a group is durable, of each run it changed: its
/// spec, its status before (`None`: new) and after.
pub type Observer = Box<dyn FnMut(&RunSpec, Option<&RunStatus>, &RunStatus) + Send>;

/// Applies events to runs, durably, in groups.
pub struct Engine<S: WorkflowStore> {
    store: S,
    policy: Policy,
    max_active: usize,
    live: LiveSet,
    /// Stages whose queued runs are not admitted (their files are not ready).
    held: BTreeSet<Stage>,
    /// Runs admitted since the engine opened.
    admitted: u64,
    /// Admissions stop once `admitted` reaches it (a budget's allowance).
    admit_until: Option<u64>,
    observer: Option<Observer>,
}

impl<S: WorkflowStore> Engine<S> {
    /// Opens the engine on `store` and recovers: returns the commands every
    /// live run is owed, to be sent again. At most `max_active` jobs are
    /// launching or running at once.
    pub fn open(store: S, policy: Policy, max_active: usize) -> Result<(Engine<S>, Vec<Dispatch>), EngineError> {
        let mut live = LiveSet::default();
        let mut dispatches = Vec::new();
        for run in store::all_runs(&store, RunFilter::Live)? {
            let stored =
                store.load(&run)?.ok_or(EngineError::Inconsistent { run: run.clone(), problem: "does not exist" })?;
            let Run { spec, status } = &stored.run;
            if !status.is_live() {
                return Err(EngineError::Inconsistent { run, problem: "is not live" });
            }
            dispatches.extend(status.outbox().into_iter().map(|command| Dispatch {
                spec: spec.clone(),
                version: status.version,
                command,
            }));
            live.update(stored);
        }
        let engine = Engine {
            store,
            policy,
            max_active,
            live,
            held: BTreeSet::new(),
            admitted: 0,
            admit_until: None,
            observer: None,
        };
        Ok((engine, dispatches))
    }

    /// Admits no queued run of `stages` (and again those of every other
    /// stage): for a stage whose test set and labels do not agree, nothing
    /// is launched that could only fail.
    pub fn hold_stages(&mut self, stages: BTreeSet<Stage>) {
        self.held = stages;
    }

    /// Tells `observer` of every change from now on, once it is durable.
    pub fn observe(&mut self, observer: Observer) {
        self.observer = Some(observer);
    }

    /// The stages held.
    pub fn held_stages(&self) -> &BTreeSet<Stage> {
        &self.held
    }

    /// Runs admitted since the engine opened.
    pub fn admitted(&self) -> u64 {
        self.admitted
    }

    /// Admits queued runs only while fewer than `until` were admitted since
    /// the engine opened (see [`Engine::admitted`]); `None`: as slots free.
    pub fn limit_admissions(&mut self, until: Option<u64>) {
        self.admit_until = until;
    }

    /// The store, for reads.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// A run as the engine last wrote it: from memory if it is live and
    /// past its queue, else from the store.
    pub fn load(&self, run: &RunId) -> Result<Option<StoredRun>, StoreError> {
        match self.live.runs.get(run).and_then(|live| live.stored.as_ref()) {
            Some(stored) => {
                debug_assert_eq!(self.store.load(run).ok().flatten().as_ref(), Some(stored), "the store's {run}");
                Ok(Some(stored.clone()))
            }
            None => self.store.load(run),
        }
    }

    /// Closes the engine, keeping its store.
    pub fn into_store(self) -> S {
        self.store
    }

    /// The policy runs are stepped with.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Live runs currently in state `tag`.
    pub fn live_runs(&self, tag: StateTag) -> impl Iterator<Item = &RunId> {
        self.live.runs.iter().filter(move |(_, r)| r.tag == tag).map(|(run, _)| run)
    }

    /// Every live run.
    pub fn live_run_ids(&self) -> impl Iterator<Item = &RunId> {
        self.live.runs.keys()
    }

    /// The live runs that owe a command: those the dispatcher looks at for
    /// what is owed too long (a run waiting for its job owes none).
    pub fn owing_run_ids(&self) -> impl Iterator<Item = &RunId> {
        self.live.owing.iter()
    }

    /// How many runs are live, and how many of them hold a launch slot.
    pub fn live_counts(&self) -> (usize, usize) {
        (self.live.runs.len(), self.live.active)
    }

    /// Applies `inputs` then admits queued runs, as one durable group.
    pub fn apply(&mut self, inputs: Vec<Input>, now: Timestamp) -> Result<Applied, EngineError> {
        // Sized for one run an input: growing it moves every run read so far.
        let mut group = Group { order: Vec::with_capacity(inputs.len()), runs: HashMap::with_capacity(inputs.len()) };
        let mut outcomes = Vec::with_capacity(inputs.len());
        for input in inputs {
            outcomes.push(self.apply_one(&mut group, input, now)?);
        }
        let admitted = self.admit(&mut group, now)?;
        // The entries and the status before move into the commit, and are
        // read back from it once it is durable.
        let mut changes = Vec::with_capacity(group.order.len());
        for run in &group.order {
            let Some(working) = group.runs.get_mut(run) else { continue };
            if working.entries.is_empty() {
                continue; // every input for it was refused: nothing changed
            }
            changes.push(RunChange {
                run: run.clone(),
                spec: working.before.is_none().then(|| working.stored.run.spec.clone()),
                before: working.before.take(),
                entries: std::mem::take(&mut working.entries),
            });
        }
        let commit = Commit { changes };
        if !commit.changes.is_empty() {
            self.store.commit(&commit)?;
        }
        // Durable from here on: publish the effects.
        let (mut dispatches, mut changed) = (Vec::with_capacity(commit.changes.len()), Vec::new());
        for change in commit.changes {
            let Some(working) = group.runs.remove(&change.run) else {
                unreachable!("a change is of a run of the group")
            };
            let Run { spec, status } = &working.stored.run;
            if let Some(observe) = self.observer.as_mut() {
                observe(spec, change.before.as_ref(), status);
            }
            let owed = status.outbox();
            for command in working.issued.into_iter().filter(|c| owed.contains(c)) {
                dispatches.push(Dispatch { spec: spec.clone(), version: status.version, command });
            }
            changed.push((change.run, owed));
            self.live.update(working.stored);
        }
        // The runs it read but did not change go back as they were.
        for (_, working) in group.runs.drain() {
            self.live.update(working.stored);
        }
        Ok(Applied { outcomes, dispatches, admitted, changed })
    }

    fn apply_one(&mut self, group: &mut Group, input: Input, now: Timestamp) -> Result<Outcome, EngineError> {
        let run = input.run().clone();
        let (envelope, new_spec) = match input {
            Input::Submit(spec) => (Envelope::unfenced(Event::Submitted(spec.clone())), Some(spec)),
            Input::Event { envelope, .. } => (envelope, None),
        };
        if !group.runs.contains_key(&run) {
            let stored = match self.live.take(&run) {
                Some(stored) => Some(stored),
                None => self.store.load(&run)?,
            };
            let working = match (stored, new_spec) {
                (Some(stored), _) => {
                    Working { before: Some(stored.run.status.clone()), stored, entries: Vec::new(), issued: Vec::new() }
                }
                (None, Some(spec)) => return Ok(create(group, spec, envelope, now)),
                (None, None) => return Ok(Outcome::Rejected { error: InputError::UnknownRun(run.clone()), run }),
            };
            group.order.push(run.clone());
            group.runs.insert(run.clone(), working);
        }
        let Some(working) = group.runs.get_mut(&run) else { unreachable!("inserted above") };
        let transition = match step(&self.policy, &working.stored.run, &envelope, now) {
            Ok(transition) => transition,
            Err(error) => return Ok(Outcome::Rejected { run, error: error.into() }),
        };
        check_invariants(&working.stored.run.status, &envelope.event, &transition.status, &transition.disposition);
        let seq = working.stored.last_seq + 1;
        let (version, state) = (transition.status.version, transition.status.state.tag());
        working.entries.push(HistoryEntry {
            seq,
            at: now,
            input: envelope,
            disposition: transition.disposition.clone(),
            status: transition.status.clone(),
        });
        working.issued.extend(transition.commands);
        working.stored.run.status = transition.status;
        working.stored.last_seq = seq;
        Ok(Outcome::Recorded { run, seq, version, state, disposition: transition.disposition })
    }

    /// Admits queued runs, oldest submission first, while job slots are free.
    /// Runs this group already changed count as this group left them.
    fn admit(&mut self, group: &mut Group, now: Timestamp) -> Result<usize, EngineError> {
        let mut active = self.live.active;
        for working in group.runs.values() {
            let was = self.live.runs.get(&working.stored.run.spec.run).map(|r| r.tag);
            active -= usize::from(was.is_some_and(holds_slot));
            active += usize::from(holds_slot(working.stored.run.status.state.tag()));
        }
        let mut free = self.max_active.saturating_sub(active);
        if let Some(until) = self.admit_until {
            free = free.min(usize::try_from(until.saturating_sub(self.admitted)).unwrap_or(usize::MAX));
        }
        if free == 0 {
            return Ok(0);
        }
        let held = &self.held;
        let queued_here = group
            .runs
            .values()
            .filter(|w| w.stored.run.status.state.tag() == StateTag::Queued && !held.contains(&w.stored.run.spec.stage))
            .map(|w| (w.stored.run.spec.submitted_at, w.stored.run.spec.run.clone()));
        let queued_before = self
            .live
            .queue
            .iter()
            .filter(|(_, run)| !group.runs.contains_key(run) && !held.contains(&run.parts().1))
            .take(free)
            .cloned();
        let mut candidates: Vec<(Timestamp, RunId)> = queued_here.chain(queued_before).collect();
        candidates.sort();
        candidates.truncate(free);
        for (_, run) in &candidates {
            let start = self.learned_start(group, run)?;
            let admit = Input::Event { run: run.clone(), envelope: Envelope::unfenced(Event::Admitted { start }) };
            self.apply_one(group, admit, now)?;
        }
        self.admitted += candidates.len() as u64;
        Ok(candidates.len())
    }
}

impl<S: WorkflowStore> Engine<S> {
    /// Where `run` should start, learned from its submission's runs on the
    /// other stages ([`learned_start`]), as this group leaves them.
    fn learned_start(&self, group: &Group, run: &RunId) -> Result<Option<LearnedStart>, EngineError> {
        if !self.policy.learns_across_stages() {
            return Ok(None);
        }
        let (submission, stage) = run.parts();
        // An audit learns from its original's stage too: `<submission>-audit<n>-<stage>`.
        let original = (submission.as_str().rsplit_once(AUDIT_SUFFIX))
            .filter(|_| is_audit_name(submission.as_str()))
            .and_then(|(original, _)| SubmissionId::new(original).ok());
        let (submission, audit) = match original {
            Some(original) => (original, true),
            None => (submission, false),
        };
        for other in Stage::ALL.into_iter().filter(|s| audit || *s != stage) {
            let sibling = RunId::new(&submission, other);
            let learned = match group.runs.get(&sibling) {
                Some(working) => learned_start(&working.stored.run),
                None => self.load(&sibling)?.and_then(|stored| learned_start(&stored.run)),
            };
            if learned.is_some() {
                return Ok(learned);
            }
        }
        Ok(None)
    }
}

/// Records the first entry of a new run.
fn create(group: &mut Group, spec: RunSpec, envelope: Envelope, now: Timestamp) -> Outcome {
    let status = RunStatus::submitted(now);
    let run = spec.run.clone();
    let entry =
        HistoryEntry { seq: 1, at: now, input: envelope, disposition: Disposition::Applied, status: status.clone() };
    let outcome = Outcome::Recorded {
        run: run.clone(),
        seq: 1,
        version: 1,
        state: StateTag::Queued,
        disposition: Disposition::Applied,
    };
    group.order.push(run.clone());
    group.runs.insert(
        run,
        Working {
            stored: StoredRun { run: Run { spec, status }, last_seq: 1 },
            before: None,
            entries: vec![entry],
            issued: Vec::new(),
        },
    );
    outcome
}

/// The machine's guarantees, asserted on every step: a bug here must stop
/// the engine before it writes anything.
fn check_invariants(before: &RunStatus, event: &Event, after: &RunStatus, disposition: &Disposition) {
    let grows = u64::from(*disposition == Disposition::Applied);
    assert_eq!(after.version, before.version + grows, "version must grow by one exactly when the state changes");
    if before.state.tag().is_terminal() && !matches!(event, Event::RetryRequested | Event::RescoreRequested) {
        assert_eq!(after.state, before.state, "a terminal state changes only on retry or rescore");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{Attempt, Stage, SubmissionId, TeamId};
    use crate::machine::JobOutcome;
    use crate::machine::{Detail, Evidence, JobUsage, SubmissionSource};
    use crate::store::MemoryStore;

    fn spec(name: &str, submitted_at: u64) -> RunSpec {
        RunSpec::new(
            SubmissionId::new(name).unwrap(),
            TeamId::new("t").unwrap(),
            Stage::Public,
            false,
            SubmissionSource::Image { uri: "img".into() },
            Timestamp(submitted_at),
        )
    }

    fn engine(max_active: usize) -> Engine<MemoryStore> {
        Engine::open(MemoryStore::new(), crate::policy::tests::case_policy(), max_active).unwrap().0
    }

    fn launched(applied: &Applied) -> Vec<&str> {
        applied
            .dispatches
            .iter()
            .filter(|d| matches!(d.command, Command::LaunchJob { .. }))
            .map(|d| d.spec.run.as_str())
            .collect()
    }

    fn event(run: &str, event: Event) -> Input {
        Input::Event { run: RunId::parse(run).unwrap(), envelope: Envelope::unfenced(event) }
    }

    #[test]
    fn admission_takes_the_oldest_submissions_while_slots_are_free() {
        let mut engine = engine(2);
        let submissions = [("c", 3), ("a", 1), ("d", 4), ("b", 2)].map(|(n, t)| Input::Submit(spec(n, t)));
        let applied = engine.apply(submissions.to_vec(), Timestamp(10)).unwrap();
        assert_eq!(launched(&applied), ["a-public", "b-public"]);
        assert_eq!(applied.admitted, 2);
        assert_eq!(engine.live_counts(), (4, 2));

        // "a" fails to launch: its slot goes to the oldest waiting run, "c".
        let failed = event("a-public", Event::LaunchFailed { attempt: Attempt(1), error: Detail::new("x") });
        let applied = engine.apply(vec![failed], Timestamp(11)).unwrap();
        assert_eq!(launched(&applied), ["c-public"]);
        assert_eq!(engine.live_counts(), (3, 2));
        assert_eq!(engine.apply(Vec::new(), Timestamp(12)).unwrap().admitted, 0, "no slot is free");
    }

    #[test]
    fn the_runs_that_owe_a_command_are_known_without_reading_the_store() {
        let mut engine = engine(4);
        let owing = |engine: &Engine<MemoryStore>| engine.owing_run_ids().map(|r| r.to_string()).collect::<Vec<_>>();
        let applied = engine.apply(vec![Input::Submit(spec("a", 1))], Timestamp(1)).unwrap();
        assert_eq!(owing(&engine), ["a-public"], "it owes its launch");
        let job = crate::ids::JobId::new("j").unwrap();
        let launched = Input::Event {
            run: RunId::parse("a-public").unwrap(),
            envelope: Envelope::answering(
                Event::JobLaunched { attempt: Attempt(1), job: job.clone() },
                applied.dispatches[0].version,
            ),
        };
        engine.apply(vec![launched], Timestamp(2)).unwrap();
        assert!(owing(&engine).is_empty(), "running, it owes nothing");
        engine.apply(vec![event("a-public", Event::CancelRequested)], Timestamp(3)).unwrap();
        assert_eq!(owing(&engine), ["a-public"], "cancelled, it owes its job's termination");
        // Reopened, the engine knows it from the store.
        let (reopened, _) = Engine::open(engine.into_store(), crate::policy::tests::case_policy(), 4).unwrap();
        assert_eq!(owing(&reopened), ["a-public"]);
        let mut engine = reopened;
        engine
            .apply(vec![event("a-public", Event::JobTerminated { attempt: Attempt(1), job: Some(job) })], Timestamp(4))
            .unwrap();
        assert!(owing(&engine).is_empty(), "terminated, it owes nothing");
    }

    #[test]
    fn a_held_stage_is_not_admitted_until_released() {
        let mut engine = engine(4);
        engine.hold_stages([Stage::Private].into());
        let private = |n: &str, t| {
            RunSpec::new(
                SubmissionId::new(n).unwrap(),
                TeamId::new("t").unwrap(),
                Stage::Private,
                false,
                SubmissionSource::Image { uri: "img".into() },
                Timestamp(t),
            )
        };
        let inputs = vec![Input::Submit(private("a", 1)), Input::Submit(spec("b", 2)), Input::Submit(private("c", 3))];
        let applied = engine.apply(inputs, Timestamp(10)).unwrap();
        assert_eq!(launched(&applied), ["b-public"], "only the stage that is ready");
        assert_eq!(engine.apply(Vec::new(), Timestamp(11)).unwrap().admitted, 0, "still held");
        engine.hold_stages(BTreeSet::new());
        let applied = engine.apply(Vec::new(), Timestamp(12)).unwrap();
        assert_eq!(launched(&applied), ["a-private", "c-private"], "released, oldest first");
    }

    #[test]
    fn admissions_stop_at_the_limit_until_it_is_raised() {
        let mut engine = engine(4);
        engine.limit_admissions(Some(1));
        let inputs = ["a", "b", "c"].iter().zip(1..).map(|(n, t)| Input::Submit(spec(n, t))).collect();
        let applied = engine.apply(inputs, Timestamp(10)).unwrap();
        assert_eq!(launched(&applied), ["a-public"], "free slots, but one admission allowed");
        assert_eq!(engine.apply(Vec::new(), Timestamp(11)).unwrap().admitted, 0);
        engine.limit_admissions(Some(engine.admitted() + 1));
        assert_eq!(launched(&engine.apply(Vec::new(), Timestamp(12)).unwrap()), ["b-public"]);
        engine.limit_admissions(None);
        assert_eq!(launched(&engine.apply(Vec::new(), Timestamp(13)).unwrap()), ["c-public"]);
        assert_eq!(engine.admitted(), 3);
    }

    #[test]
    fn a_run_whose_every_input_is_refused_keeps_its_copy() {
        let mut engine = engine(1);
        engine.apply(vec![Input::Submit(spec("a", 1))], Timestamp(1)).unwrap();
        let run = RunId::parse("a-public").unwrap();
        assert!(engine.live.runs[&run].stored.is_some(), "launching, it is kept");
        // A retry of a run that has not failed is refused: nothing changes.
        let applied = engine.apply(vec![event("a-public", Event::RetryRequested)], Timestamp(2)).unwrap();
        assert!(matches!(&applied.outcomes[..], [Outcome::Rejected { .. }]), "{:?}", applied.outcomes);
        assert!(engine.live.runs[&run].stored.is_some(), "its copy went back, not read from the store from now on");
    }

    #[test]
    fn an_event_for_an_unknown_run_is_rejected_and_not_recorded() {
        let mut engine = engine(1);
        let applied = engine.apply(vec![event("nope-public", Event::CancelRequested)], Timestamp(1)).unwrap();
        assert!(matches!(&applied.outcomes[..], [Outcome::Rejected { error: InputError::UnknownRun(_), .. }]));
        assert_eq!(engine.store().counts().unwrap().total(), 0);
    }

    #[test]
    fn commands_superseded_within_a_group_are_not_dispatched() {
        let mut engine = engine(1);
        let cancel = event("a-public", Event::CancelRequested);
        let applied = engine.apply(vec![Input::Submit(spec("a", 1)), cancel], Timestamp(1)).unwrap();
        assert!(applied.dispatches.is_empty(), "cancelled before its admission: {:?}", applied.dispatches);

        let applied = engine.apply(vec![Input::Submit(spec("b", 2))], Timestamp(2)).unwrap();
        assert_eq!(launched(&applied), ["b-public"]);
        let version = applied.dispatches[0].version;
        let job = crate::ids::JobId::new("j").unwrap();
        let launch = Input::Event {
            run: RunId::parse("b-public").unwrap(),
            envelope: Envelope::answering(Event::JobLaunched { attempt: Attempt(1), job: job.clone() }, version),
        };
        let usage = JobUsage { started_at: None, ended_at: Timestamp(3), peak_memory_mib: None };
        let end = event(
            "b-public",
            Event::JobEnded {
                attempt: Attempt(1),
                job,
                outcome: JobOutcome::Succeeded,
                usage,
                evidence: Evidence::default(),
            },
        );
        let applied = engine.apply(vec![launch, end, event("b-public", Event::CancelRequested)], Timestamp(3)).unwrap();
        let sent: Vec<&Command> = applied.dispatches.iter().map(|d| &d.command).collect();
        assert_eq!(sent, [&Command::Withdraw { attempt: Attempt(1) }], "scoring was owed, then cancelled: not sent");
    }
}
