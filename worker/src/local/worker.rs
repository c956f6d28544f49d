//! The in-process activity loop of the embedded deployment: commands from
//! the engine thread are carried out by tasks, at most `concurrency` at once,
//! each retried with backoff, and their answers go back to the engine.

use std::sync::Arc;
use std::time::Duration;

use evalflow_activities::ActivityError;
use evalflow_activities::backoff::Backoff;
use evalflow_workflow::{Command, Dispatch, Input};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::engine::EngineHandle;
use crate::engine::activity::{Activities, gave_up};
use crate::local::space::Space;

/// Attempts of an activity failing with a retryable error before giving up.
pub const RETRIES_MAX: u32 = 5;
/// The first delay between two attempts; it doubles each time.
pub const RETRY_BASE: Duration = Duration::from_millis(500);
/// The most scorings carried out at once: each holds a job's predictions
/// in memory (up to
/// [`PREDICTIONS_MAX_BYTES`](evalflow_activities::scoring::PREDICTIONS_MAX_BYTES)).
/// The other commands (a launch, publishing a score, stopping a job) cost
/// little each, and the more of them go at once, the more answers each of
/// the engine's group commits takes.
pub const SCORINGS_MAX: usize = 16;
/// The longest a command waits for disk space in its task; then it stays
/// owed, and the engine sends it again (a local engine after 5 minutes), so
/// that no task holds a slot for ever on a disk whose writes keep failing.
pub const ROOM_WAIT_MAX: Duration = Duration::from_secs(240);

/// Runs commands until `shutdown`: at most [`SCORINGS_MAX`] scorings and
/// `concurrency` other commands at once (a scoring waiting for its turn
/// holds back no other command), then lets the running ones finish. A
/// command dropped at shutdown (waiting for a slot, or not yet received)
/// is still owed and is sent again when the engine reopens.
pub async fn run(
    activities: Arc<Activities>,
    space: Option<Arc<Space>>,
    mut dispatches: mpsc::UnboundedReceiver<Dispatch>,
    engine: EngineHandle,
    concurrency: usize,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(concurrency.max(1)));
    let scorings = Arc::new(Semaphore::new(SCORINGS_MAX));
    let mut tasks = JoinSet::new();
    loop {
        let dispatch = tokio::select! {
            dispatch = dispatches.recv() => match dispatch { Some(d) => d, None => break },
            _ = shutdown.cancelled() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        // A slot before a task: at most `concurrency` of them, however many
        // commands wait. A scoring waits for its own in its task: a run owes
        // at most one, so they are at most the live runs.
        let scoring = match dispatch.command {
            Command::ScorePredictions { .. } => true,
            Command::LaunchJob { .. }
            | Command::Publish { .. }
            | Command::TerminateJob { .. }
            | Command::Withdraw { .. } => false,
        };
        let slot = if scoring {
            None
        } else {
            tokio::select! {
                slot = slots.clone().acquire_owned() => match slot { Ok(slot) => Some(slot), Err(_) => break },
                _ = shutdown.cancelled() => break,
            }
        };
        let (activities, space, engine, scorings) =
            (activities.clone(), space.clone(), engine.clone(), scorings.clone());
        tasks.spawn(async move {
            let _slot = slot;
            let _scoring = if scoring { Some(scorings.acquire_owned().await) } else { None };
            let inputs = execute_with_retries(&activities, space.as_deref(), &dispatch).await;
            if engine.send(inputs).await.is_err() {
                tracing::warn!(run = %dispatch.spec.run, "the engine stopped before the answer to {} reached it", dispatch.command.kind());
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// Carries out the command, retrying retryable failures with backoff.
/// When it gives up, the answer is `ActivityFailed` (which fails the run
/// with a resumable reason), except for a termination or a withdrawal,
/// which stays owed (and is sent again). A full disk counts no retry:
/// with `space`, the command waits for room (or the node's shutdown,
/// when it stays owed), then goes on.
pub async fn execute_with_retries(activities: &Activities, space: Option<&Space>, dispatch: &Dispatch) -> Vec<Input> {
    let (run, kind) = (&dispatch.spec.run, dispatch.command.kind());
    let mut backoff = Backoff::new(RETRY_BASE, RETRY_BASE * (1 << RETRIES_MAX));
    let mut failures = 0;
    let started = std::time::Instant::now();
    loop {
        match (activities.execute(dispatch).await, space) {
            (Ok(inputs), _) => return inputs,
            (Err(ActivityError::HostFull(error)), Some(space)) => {
                tracing::warn!(%run, command = kind, "out of disk space ({error}): waiting for room");
                space.full(&error);
                if started.elapsed() >= ROOM_WAIT_MAX || !space.room().await {
                    return Vec::new(); // still owed
                }
            }
            (Err(e), _) if e.is_retryable() && failures + 1 < RETRIES_MAX => {
                tracing::warn!(%run, command = kind, "retrying: {e}");
                failures += 1;
                tokio::time::sleep(backoff.delay()).await;
            }
            (Err(e), _) => {
                tracing::error!(%run, command = kind, "giving up: {e}");
                return gave_up(dispatch, &e).into_iter().collect();
            }
        }
    }
}
