//! The commands' timing, on the engine thread: what is sent when. A launch
//! after a backoff is held until its `not_before` and dropped if the run
//! moved on meanwhile (a cancel); a command owed for too long is sent again;
//! while launching is paused, launches wait here until it resumes.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use evalflow_workflow::{
    Attempt, Command, Dispatch, Engine, EngineError, Run, RunId, SledStore, Timestamp, WorkflowStore,
};
use tokio::sync::mpsc;

/// The longest time between two looks for commands owed too long.
const RESEND_CHECK_MAX: Duration = Duration::from_secs(60);
/// The dispatcher forgets the commands no longer owed once it remembers
/// twice as many as after it last did, and at least this many.
const SENT_FORGET_MIN: usize = 4096;

/// A command owed, as the engine thread tells them apart.
type CommandKey = (RunId, &'static str, Attempt);

fn key(dispatch: &Dispatch) -> CommandKey {
    (dispatch.spec.run.clone(), dispatch.command.kind(), dispatch.command.attempt())
}

/// Sends the engine's commands out, remembering when each was sent (not the
/// run's outbox, which is what its status owes). Every map is bounded by the
/// live runs' owed commands: `sent` by [`Dispatcher::forget_unowed`], `held`
/// by one launch per owed attempt until its time, `paused` until resuming.
pub(super) struct Dispatcher {
    channel: mpsc::UnboundedSender<Dispatch>,
    sent: HashMap<CommandKey, Instant>,
    /// `sent`'s size at which [`Dispatcher::forget_unowed`] next prunes it.
    forget_at: usize,
    /// Launches waiting for the end of their backoff, by when it ends.
    held: BTreeMap<(Timestamp, CommandKey), Dispatch>,
    /// While launching is paused, the launches owed meanwhile (one per run
    /// and attempt: bounded by the live runs).
    paused: Option<BTreeMap<CommandKey, Dispatch>>,
    resend_after: Duration,
    /// When stale commands were last looked for.
    checked: Instant,
}

impl Dispatcher {
    /// A dispatcher sending to `channel`, launching paused with `paused`.
    pub(super) fn new(channel: mpsc::UnboundedSender<Dispatch>, resend_after: Duration, paused: bool) -> Dispatcher {
        Dispatcher {
            channel,
            sent: HashMap::new(),
            forget_at: SENT_FORGET_MIN,
            held: BTreeMap::new(),
            paused: paused.then(BTreeMap::new),
            resend_after,
            checked: Instant::now(),
        }
    }
    /// Sends `dispatch` now, or holds it if it is a launch whose backoff is not over.
    pub(super) fn send(&mut self, dispatch: Dispatch) {
        let key = key(&dispatch);
        self.sent.insert(key.clone(), Instant::now());
        if let (Some(paused), Command::LaunchJob { .. }) = (&mut self.paused, &dispatch.command) {
            paused.insert(key, dispatch);
            return;
        }
        match dispatch.command {
            Command::LaunchJob { not_before: Some(at), .. } if at > Timestamp::now() => {
                self.held.insert((at, key), dispatch);
            }
            _ => _ = self.channel.send(dispatch),
        }
    }

    /// Pauses or resumes launching; on resuming, sends the launches owed
    /// meanwhile that are still owed (a run cancelled meanwhile has moved on).
    pub(super) fn pause(&mut self, engine: &Engine<SledStore>, paused: bool) -> Result<(), EngineError> {
        match (paused, self.paused.take()) {
            (true, waiting) => self.paused = Some(waiting.unwrap_or_default()),
            (false, Some(waiting)) => {
                for dispatch in waiting.into_values() {
                    let stored = engine.store().load(&dispatch.spec.run)?;
                    if stored.is_some_and(|s| s.run.status.version == dispatch.version) {
                        self.send(dispatch);
                    }
                }
            }
            (false, None) => {}
        }
        Ok(())
    }

    pub(super) fn tick(&mut self, engine: &Engine<SledStore>) -> Result<(), EngineError> {
        self.release(engine)?;
        if self.checked.elapsed() >= (self.resend_after / 2).min(RESEND_CHECK_MAX) {
            self.checked = Instant::now();
            self.resend(engine)?;
        }
        Ok(())
    }

    /// Sends the held launches that are due and still owed: a run that moved
    /// on while its launch waited (cancelled, say) has a new version.
    fn release(&mut self, engine: &Engine<SledStore>) -> Result<(), EngineError> {
        let now = Timestamp::now();
        while let Some(entry) = self.held.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let (_, dispatch) = entry.remove_entry();
            let stored = engine.store().load(&dispatch.spec.run)?;
            if stored.is_some_and(|s| s.run.status.version == dispatch.version) {
                self.send(dispatch);
            }
        }
        Ok(())
    }

    /// Sends again what live runs have owed for longer than `resend_after`,
    /// and forgets what is no longer owed.
    fn resend(&mut self, engine: &Engine<SledStore>) -> Result<(), EngineError> {
        let owed = owed(engine)?;
        self.forget(&owed);
        for (key, dispatch) in owed {
            if self.sent.get(&key).is_none_or(|at| at.elapsed() >= self.resend_after) {
                tracing::info!(run = %dispatch.spec.run, command = dispatch.command.kind(), "owed for long: sending it again");
                self.send(dispatch);
            }
        }
        Ok(())
    }

    /// Forgets the commands no live run owes any more, once `sent` has
    /// doubled since it last did: amortized, one look at the live runs per
    /// as many sends as it remembers.
    pub(super) fn forget_unowed(&mut self, engine: &Engine<SledStore>) -> Result<(), EngineError> {
        if self.sent.len() >= self.forget_at {
            let owed = owed(engine)?;
            self.forget(&owed);
        }
        Ok(())
    }

    /// Keeps only what `owed` holds, in `sent` and in the paused launches.
    fn forget(&mut self, owed: &HashMap<CommandKey, Dispatch>) {
        self.sent.retain(|k, _| owed.contains_key(k));
        if let Some(paused) = &mut self.paused {
            paused.retain(|k, _| owed.contains_key(k));
        }
        self.forget_at = (self.sent.len() * 2).max(SENT_FORGET_MIN);
    }
}

/// Every command the live runs owe, as it would be sent.
fn owed(engine: &Engine<SledStore>) -> Result<HashMap<CommandKey, Dispatch>, EngineError> {
    let mut owed = HashMap::new();
    let runs: Vec<RunId> = engine.live_run_ids().cloned().collect();
    for run in runs {
        let Some(stored) = engine.store().load(&run)? else { continue };
        let Run { spec, status } = stored.run;
        for command in status.outbox() {
            let dispatch = Dispatch { spec: spec.clone(), version: status.version, command };
            owed.insert(key(&dispatch), dispatch);
        }
    }
    Ok(owed)
}

#[cfg(test)]
mod tests {
    use evalflow_workflow::store::SledOptions;
    use evalflow_workflow::{Envelope, Event, Input};

    use super::*;
    use crate::testing;

    #[test]
    fn the_dispatcher_forgets_what_no_run_owes_any_more() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), SledOptions::default()).unwrap();
        let (mut engine, _) = Engine::open(store, testing::policy(), 8).unwrap();
        let (channel, _commands) = mpsc::unbounded_channel();
        let mut dispatcher = Dispatcher::new(channel, Duration::from_secs(3600), false);
        dispatcher.forget_at = 0;
        let spec = testing::spec("gone");
        let run = spec.run.clone();
        let applied = engine.apply(vec![Input::Submit(spec)], Timestamp::now()).unwrap();
        applied.dispatches.into_iter().for_each(|d| dispatcher.send(d));
        dispatcher.forget_unowed(&engine).unwrap();
        assert_eq!(dispatcher.sent.len(), 1, "the launch is owed: remembered");
        let cancel = Input::Event { run: run.clone(), envelope: Envelope::unfenced(Event::CancelRequested) };
        let terminated = Event::JobTerminated { attempt: Attempt(1), job: None };
        let acknowledged = Input::Event { run, envelope: Envelope::unfenced(terminated) };
        engine.apply(vec![cancel, acknowledged], Timestamp::now()).unwrap();
        dispatcher.forget_at = 0;
        dispatcher.forget_unowed(&engine).unwrap();
        assert!(dispatcher.sent.is_empty(), "{:?}", dispatcher.sent);
        assert_eq!(dispatcher.forget_at, SENT_FORGET_MIN);
    }
}
