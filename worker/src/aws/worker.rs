//! The worker side of the AWS deployment (`evalflow worker`, any number, on
//! any hosts): it long-polls the tasks queue, carries out each command while
//! extending its message's visibility, sends the answer to the events
//! queue, then deletes the message.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use evalflow_workflow::{Command, Dispatch};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::queues::{BATCH_MAX, Queues, Received, heartbeat_interval};
use crate::engine::activity::{Activities, gave_up};

/// How a worker works.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerSettings {
    /// Activities at once.
    pub concurrency: usize,
    /// The tasks queue's visibility timeout, in seconds.
    pub visibility_timeout_secs: u32,
    /// Receives before a message moves to the dead-letter queue.
    pub max_receive_count: u32,
    /// How long running activities may finish at shutdown before their
    /// messages are released.
    pub shutdown_grace: Duration,
}

/// Messages being worked on: their receipt, and whether they launch a job.
type InFlight = Arc<Mutex<HashMap<u64, (String, bool)>>>;

/// Carries out the tasks queue's commands until `shutdown`; then gives
/// running activities `shutdown_grace` to finish and releases the messages of
/// those that did not (visibility 0), for another worker. A launch cut short
/// is not released: its job may have reached Batch, and is found by name
/// when the task comes back after its visibility timeout.
pub async fn work(
    activities: Arc<Activities>,
    queues: Arc<Queues>,
    settings: WorkerSettings,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(settings.concurrency.max(1)));
    let in_flight: InFlight = Arc::default();
    let mut tasks = JoinSet::new();
    let mut next_id = 0_u64;
    loop {
        while tasks.try_join_next().is_some() {}
        let free = slots.available_permits();
        if free == 0 {
            tokio::select! { _ = tasks.join_next() => continue, _ = shutdown.cancelled() => break }
        }
        let received = tokio::select! {
            received = queues.receive(&queues.tasks, free.min(BATCH_MAX)) => received,
            _ = shutdown.cancelled() => break,
        };
        let messages = match received {
            Ok(messages) => {
                tracing::debug!(tasks = messages.len(), free, "received from the tasks queue");
                messages
            }
            Err(e) => {
                tracing::warn!("cannot read the tasks queue: {e}");
                tokio::select! { _ = tokio::time::sleep(Duration::from_secs(1)) => continue, _ = shutdown.cancelled() => break }
            }
        };
        for message in messages {
            let dispatch: Dispatch = match serde_json::from_str(&message.body) {
                Ok(dispatch) => dispatch,
                Err(e) => {
                    tracing::warn!(
                        "tasks queue: a message that is not a command ({e}): left for the dead-letter queue"
                    );
                    continue;
                }
            };
            let Ok(slot) = slots.clone().acquire_owned().await else { break };
            next_id += 1;
            let id = next_id;
            let launch = matches!(dispatch.command, Command::LaunchJob { .. });
            lock(&in_flight).insert(id, (message.receipt.clone(), launch));
            let (activities, queues, in_flight) = (activities.clone(), queues.clone(), in_flight.clone());
            tasks.spawn(async move {
                handle(&activities, &queues, settings, dispatch, message).await;
                lock(&in_flight).remove(&id);
                drop(slot);
            });
        }
    }
    let _ = tokio::time::timeout(settings.shutdown_grace, async { while tasks.join_next().await.is_some() {} }).await;
    tasks.abort_all();
    let unfinished: Vec<String> =
        lock(&in_flight).drain().filter(|(_, (_, launch))| !launch).map(|(_, (receipt, _))| receipt).collect();
    if !unfinished.is_empty() {
        tracing::info!("releasing {} unfinished tasks for other workers", unfinished.len());
        if let Err(e) = queues.release(&queues.tasks, &unfinished).await {
            tracing::warn!("cannot release unfinished tasks (they come back after their visibility timeout): {e}");
        }
    }
}

fn lock(in_flight: &InFlight) -> std::sync::MutexGuard<'_, HashMap<u64, (String, bool)>> {
    in_flight.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Carries out one task.
async fn handle(
    activities: &Activities,
    queues: &Queues,
    settings: WorkerSettings,
    dispatch: Dispatch,
    message: Received,
) {
    let visibility = settings.visibility_timeout_secs;
    let heartbeat = async {
        loop {
            tokio::time::sleep(heartbeat_interval(visibility)).await;
            if let Err(e) = queues.hide(&queues.tasks, &message.receipt, u64::from(visibility)).await {
                tracing::warn!("heartbeat of a task failed: {e}");
            }
        }
    };
    let result = tokio::select! { result = activities.execute(&dispatch) => result, () = heartbeat => unreachable!() };
    let (run, kind) = (&dispatch.spec.run, dispatch.command.kind());
    let answer = match result {
        Ok(inputs) => Some(inputs),
        Err(e) if e.is_retryable() && message.receive_count < settings.max_receive_count => {
            // Try again later: after a delay that grows with each receive.
            tracing::warn!(%run, command = kind, "will try again: {e}");
            let delay = 5_u64.saturating_mul(1 << message.receive_count.min(10));
            let _ = queues.hide(&queues.tasks, &message.receipt, delay).await;
            return;
        }
        Err(e) => {
            // Given up: the run fails with a resumable reason; a message that
            // kept failing also goes to the dead-letter queue, to be seen.
            tracing::error!(%run, command = kind, "giving up: {e}");
            let failed = gave_up(&dispatch, &e).into_iter().collect::<Vec<_>>();
            if !failed.is_empty() && queues.send_events(failed).await.is_err() {
                return;
            }
            if e.is_retryable() { None } else { Some(Vec::new()) }
        }
    };
    let Some(inputs) = answer else { return };
    tracing::debug!(%run, command = kind, "done");
    if let Err(e) = queues.send_events(inputs).await {
        tracing::warn!(%run, command = kind, "cannot send the answer, the task will come again: {e}");
        return;
    }
    if let Err(e) = queues.delete(&queues.tasks, &[message.receipt]).await {
        tracing::warn!(%run, command = kind, "cannot delete a done task (doing it again changes nothing): {e}");
    }
}
