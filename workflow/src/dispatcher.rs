//! The commands' timing: what goes out when. Pure: it is handed `now` and
//! hands back what to send, so the engine thread and the simulation run the
//! same code, one on the wall clock, the other on a virtual one.
//!
//! - A launch after a backoff is held until its `not_before`, and dropped if
//!   the run moved on meanwhile (a cancel during the backoff launches nothing).
//! - A command owed for longer than `resend_after` (its task lost, given up
//!   on or dead-lettered) is sent again; duplicates are harmless by design.
//! - While launching is paused (the host's disk is short of space), every
//!   launch, a retry's too, waits here; on resuming, those still owed go out.
//!
//! It is not the run's outbox (what its status owes): it remembers when it
//! sent what, and every map it keeps is bounded by the live runs' owed
//! commands: `sent` and `paused` because each group commit tells it what
//! the runs it changed still owe ([`Dispatcher::settle`]), `held` by one
//! launch per owed attempt until its time.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use crate::engine::{Dispatch, Engine, EngineError};
use crate::ids::{Attempt, JobId, RunId};
use crate::machine::{Command, Run};
use crate::store::WorkflowStore;
use crate::time::Timestamp;

/// The longest time between two looks for commands owed too long.
const RESEND_CHECK_MAX: Duration = Duration::from_secs(60);

/// A command as the dispatcher tells a run's commands apart: by kind and
/// attempt, and, for a termination, by job (an attempt can owe two: its
/// job's, and that of a second job a raced launch made).
type CommandKey = (&'static str, Attempt, Option<JobId>);

fn key(command: &Command) -> CommandKey {
    let job = match command {
        Command::TerminateJob { job, .. } => job.clone(),
        _ => None,
    };
    (command.kind(), command.attempt(), job)
}

/// The commands' timing; see the module's doc.
pub struct Dispatcher {
    /// When each run's commands were last sent.
    sent: HashMap<RunId, Vec<(CommandKey, Timestamp)>>,
    /// Launches waiting for the end of their backoff, by when it ends.
    held: BTreeMap<(Timestamp, RunId, CommandKey), Dispatch>,
    /// While launching is paused, each run's launches owed meanwhile (one
    /// per attempt: bounded by the live runs).
    paused: Option<BTreeMap<RunId, Vec<Dispatch>>>,
    resend_after: Duration,
    /// When stale commands were last looked for.
    checked: Timestamp,
    /// What is to go out now, in order.
    outgoing: Vec<Dispatch>,
}

impl Dispatcher {
    /// A dispatcher that resends what is owed for longer than
    /// `resend_after`; with `paused`, launching starts paused.
    pub fn new(resend_after: Duration, paused: bool, now: Timestamp) -> Dispatcher {
        Dispatcher {
            sent: HashMap::new(),
            held: BTreeMap::new(),
            paused: paused.then(BTreeMap::new),
            resend_after,
            checked: now,
            outgoing: Vec::new(),
        }
    }

    /// What is to go out now, in the order it was decided; the caller sends it.
    pub fn take_outgoing(&mut self) -> Vec<Dispatch> {
        std::mem::take(&mut self.outgoing)
    }

    /// Sends `dispatch` now, or holds it: a launch whose backoff is not
    /// over, or any launch while launching is paused.
    pub fn send(&mut self, dispatch: Dispatch, now: Timestamp) {
        let (run, key) = (&dispatch.spec.run, key(&dispatch.command));
        let sent = self.sent.entry(run.clone()).or_default();
        match sent.iter_mut().find(|(k, _)| *k == key) {
            Some((_, at)) => *at = now,
            None => sent.push((key.clone(), now)),
        }
        if let (Some(paused), Command::LaunchJob { .. }) = (&mut self.paused, &dispatch.command) {
            let launches = paused.entry(run.clone()).or_default();
            launches.retain(|d| d.command.attempt() != dispatch.command.attempt());
            launches.push(dispatch);
            return;
        }
        match dispatch.command {
            Command::LaunchJob { not_before: Some(at), .. } if at > now => {
                self.held.insert((at, run.clone(), key), dispatch);
            }
            _ => self.outgoing.push(dispatch),
        }
    }

    /// Forgets, for each run a group commit changed, what it no longer owes
    /// (`changed`: each run with every command it owes now, as
    /// [`Applied::changed`](crate::engine::Applied::changed) has them).
    pub fn settle(&mut self, changed: &[(RunId, Vec<Command>)]) {
        for (run, owed) in changed {
            let owes = |k: &CommandKey| owed.iter().any(|c| key(c) == *k);
            if let Some(sent) = self.sent.get_mut(run) {
                sent.retain(|(k, _)| owes(k));
                if sent.is_empty() {
                    self.sent.remove(run);
                }
            }
            if let Some(launches) = self.paused.as_mut().and_then(|paused| paused.get_mut(run)) {
                launches.retain(|d| owes(&key(&d.command)));
                if launches.is_empty() {
                    self.paused.as_mut().map(|paused| paused.remove(run));
                }
            }
        }
    }

    /// Pauses or resumes launching; on resuming, sends the launches owed
    /// meanwhile that are still owed (a run cancelled meanwhile has moved on).
    pub fn pause<S: WorkflowStore>(
        &mut self,
        engine: &Engine<S>,
        paused: bool,
        now: Timestamp,
    ) -> Result<(), EngineError> {
        match (paused, self.paused.take()) {
            (true, waiting) => self.paused = Some(waiting.unwrap_or_default()),
            (false, Some(waiting)) => {
                for dispatch in waiting.into_values().flatten() {
                    if still_owed(engine, &dispatch)? {
                        self.send(dispatch, now);
                    }
                }
            }
            (false, None) => {}
        }
        Ok(())
    }

    /// When [`Dispatcher::tick`] next has something to do: the first held
    /// launch's time, or the next look for commands owed too long.
    pub fn next_deadline(&self) -> Timestamp {
        let look = Timestamp(self.checked.0.saturating_add(millis(self.resend_interval())));
        self.held.first_key_value().map_or(look, |((at, ..), _)| (*at).min(look))
    }

    /// Releases the held launches that are due, and, when it is time,
    /// resends what is owed for too long.
    pub fn tick<S: WorkflowStore>(&mut self, engine: &Engine<S>, now: Timestamp) -> Result<(), EngineError> {
        self.release(engine, now)?;
        if now.since(self.checked) >= self.resend_interval() {
            self.checked = now;
            self.resend(engine, now)?;
        }
        Ok(())
    }

    fn resend_interval(&self) -> Duration {
        (self.resend_after / 2).min(RESEND_CHECK_MAX)
    }

    /// Sends the held launches that are due and still owed: a run that moved
    /// on while its launch waited (cancelled, say) has a new version.
    fn release<S: WorkflowStore>(&mut self, engine: &Engine<S>, now: Timestamp) -> Result<(), EngineError> {
        while let Some(entry) = self.held.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let (_, dispatch) = entry.remove_entry();
            if still_owed(engine, &dispatch)? {
                self.send(dispatch, now);
            }
        }
        Ok(())
    }

    /// Sends again what live runs have owed for longer than `resend_after`,
    /// and forgets what is no longer owed.
    fn resend<S: WorkflowStore>(&mut self, engine: &Engine<S>, now: Timestamp) -> Result<(), EngineError> {
        for (key, dispatch) in owed(engine)? {
            // A launch whose backoff is not over is waiting, not late: it is held already.
            let waiting = matches!(dispatch.command, Command::LaunchJob { not_before: Some(at), .. } if at > now);
            let sent = self.sent.get(&key.0).and_then(|sent| sent.iter().find(|(k, _)| *k == key.1));
            if !waiting && sent.is_none_or(|(_, at)| now.since(*at) >= self.resend_after) {
                tracing::info!(run = %dispatch.spec.run, command = dispatch.command.kind(), "owed for long: sending it again");
                self.send(dispatch, now);
            }
        }
        Ok(())
    }

    /// How many commands it remembers having sent.
    pub fn remembered(&self) -> usize {
        self.sent.values().map(Vec::len).sum()
    }
}

/// A duration in whole milliseconds.
pub(crate) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Whether the run still is at the version `dispatch` was issued at.
fn still_owed<S: WorkflowStore>(engine: &Engine<S>, dispatch: &Dispatch) -> Result<bool, EngineError> {
    let stored = engine.load(&dispatch.spec.run)?;
    Ok(stored.is_some_and(|s| s.run.status.version == dispatch.version))
}

/// Every command the live runs owe, as it would be sent, by run and key.
fn owed<S: WorkflowStore>(engine: &Engine<S>) -> Result<BTreeMap<(RunId, CommandKey), Dispatch>, EngineError> {
    let mut owed = BTreeMap::new();
    let runs: Vec<RunId> = engine.owing_run_ids().cloned().collect();
    for run in runs {
        let Some(stored) = engine.load(&run)? else { continue };
        let Run { spec, status } = stored.run;
        for command in status.outbox() {
            owed.insert(
                (run.clone(), key(&command)),
                Dispatch { spec: spec.clone(), version: status.version, command },
            );
        }
    }
    Ok(owed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Input;
    use crate::machine::{Envelope, Event, RunSpec, SubmissionSource};
    use crate::store::MemoryStore;
    use crate::{Policy, Stage, SubmissionId, TeamId};

    fn policy() -> Policy {
        Policy::from_toml(
            r#"
            time_limit_secs = 600
            [[profile]]
            name = "g4"
            host_memory_mib = 100
            gpu_memory_mib = 100
            vcpus = 1
            price_per_hour_usd = 0.5
        "#,
        )
        .unwrap()
    }

    fn spec(name: &str) -> RunSpec {
        let source = SubmissionSource::Image { uri: "img".into() };
        let (submission, team) = (SubmissionId::new(name).unwrap(), TeamId::new("t").unwrap());
        RunSpec::new(submission, team, Stage::Public, false, source, Timestamp(0))
    }

    #[test]
    fn the_dispatcher_forgets_what_no_run_owes_any_more() {
        let (mut engine, _) = Engine::open(MemoryStore::new(), policy(), 8).unwrap();
        let now = Timestamp(1_000);
        let mut dispatcher = Dispatcher::new(Duration::from_secs(3600), false, now);
        let spec = spec("gone");
        let run = spec.run.clone();
        let applied = engine.apply(vec![Input::Submit(spec)], now).unwrap();
        dispatcher.settle(&applied.changed);
        applied.dispatches.into_iter().for_each(|d| dispatcher.send(d, now));
        assert_eq!(dispatcher.take_outgoing().len(), 1, "the launch goes out");
        assert_eq!(dispatcher.remembered(), 1, "the launch is owed: remembered");
        let cancel = Input::Event { run: run.clone(), envelope: Envelope::unfenced(Event::CancelRequested) };
        let applied = engine.apply(vec![cancel], now).unwrap();
        dispatcher.settle(&applied.changed);
        applied.dispatches.into_iter().for_each(|d| dispatcher.send(d, now));
        assert_eq!(dispatcher.remembered(), 1, "the launch is forgotten, the termination remembered");
        let terminated = Event::JobTerminated { attempt: Attempt(1), job: None };
        let applied = engine.apply(vec![Input::Event { run, envelope: Envelope::unfenced(terminated) }], now).unwrap();
        dispatcher.settle(&applied.changed);
        assert_eq!(dispatcher.remembered(), 0);
        assert!(dispatcher.sent.is_empty(), "no run is kept without a command");
    }

    #[test]
    fn launches_paused_are_forgotten_once_not_owed() {
        let (mut engine, _) = Engine::open(MemoryStore::new(), policy(), 8).unwrap();
        let now = Timestamp(1_000);
        let mut dispatcher = Dispatcher::new(Duration::from_secs(3600), true, now);
        let (first, second) = (spec("first"), spec("second"));
        let applied = engine.apply(vec![Input::Submit(first), Input::Submit(second.clone())], now).unwrap();
        dispatcher.settle(&applied.changed);
        applied.dispatches.into_iter().for_each(|d| dispatcher.send(d, now));
        assert_eq!(dispatcher.take_outgoing(), [], "launching is paused");
        let cancel = Input::Event { run: second.run, envelope: Envelope::unfenced(Event::CancelRequested) };
        let applied = engine.apply(vec![cancel], now).unwrap();
        dispatcher.settle(&applied.changed);
        assert_eq!(dispatcher.paused.as_ref().map(BTreeMap::len), Some(1), "the cancelled run's launch is forgotten");
        dispatcher.pause(&engine, false, now).unwrap();
        let sent: Vec<_> = dispatcher.take_outgoing().into_iter().map(|d| d.spec.run.to_string()).collect();
        assert_eq!(sent, ["first-public"]);
    }

    #[test]
    fn two_terminations_of_one_attempt_are_both_sent_again() {
        let (mut engine, _) = Engine::open(MemoryStore::new(), policy(), 8).unwrap();
        let start = Timestamp(1_000);
        let mut dispatcher = Dispatcher::new(Duration::from_secs(300), false, start);
        let spec = spec("raced");
        let run = spec.run.clone();
        let launched = |job: &str| Input::Event {
            run: run.clone(),
            envelope: Envelope::answering(Event::JobLaunched { attempt: Attempt(1), job: JobId::new(job).unwrap() }, 2),
        };
        // A raced launch made a second job (its report is an orphan's), then a cancel.
        let cancel = Input::Event { run: run.clone(), envelope: Envelope::unfenced(Event::CancelRequested) };
        for inputs in [vec![Input::Submit(spec)], vec![launched("j1")], vec![launched("j2")], vec![cancel]] {
            let applied = engine.apply(inputs, start).unwrap();
            applied.dispatches.into_iter().for_each(|d| dispatcher.send(d, start));
        }
        let owed = engine.store().load(&run).unwrap().unwrap().run.status.terminations.len();
        assert_eq!(owed, 2, "both jobs are to be stopped");
        dispatcher.take_outgoing();
        let later = start.plus_secs(300);
        dispatcher.tick(&engine, later).unwrap();
        let again: Vec<_> = dispatcher.take_outgoing().into_iter().map(|d| d.command).collect();
        assert_eq!(again.iter().filter(|c| matches!(c, Command::TerminateJob { .. })).count(), 2, "{again:?}");
    }

    #[test]
    fn a_command_owed_for_long_is_sent_again_at_its_deadline() {
        let (mut engine, _) = Engine::open(MemoryStore::new(), policy(), 8).unwrap();
        let start = Timestamp(1_000);
        let mut dispatcher = Dispatcher::new(Duration::from_secs(300), false, start);
        let applied = engine.apply(vec![Input::Submit(spec("lost"))], start).unwrap();
        applied.dispatches.into_iter().for_each(|d| dispatcher.send(d, start));
        assert_eq!(dispatcher.take_outgoing().len(), 1);
        assert_eq!(dispatcher.next_deadline(), start.plus_secs(60), "the next look, at most a minute away");
        let mut now = start;
        while now < start.plus_secs(300) {
            now = dispatcher.next_deadline();
            dispatcher.tick(&engine, now).unwrap();
            let again = dispatcher.take_outgoing();
            assert_eq!(again.is_empty(), now < start.plus_secs(300), "at {now:?}: {again:?}");
        }
    }
}
