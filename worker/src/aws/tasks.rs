//! The engine's side of the tasks queue: commands, once their group is
//! durable, go to the tasks queue, in batches.

use std::sync::Arc;

use evalflow_activities::backoff::Backoff;
use evalflow_workflow::Dispatch;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::queues::{BATCH_MAX, Queues};
use super::{BACKOFF_FIRST, BACKOFF_MAX};

/// Sends the engine's commands to the tasks queue until `shutdown`. A command
/// not sent by then is still owed: the next engine sends it again.
pub async fn publish_tasks(
    queues: Arc<Queues>,
    mut dispatches: mpsc::UnboundedReceiver<Dispatch>,
    shutdown: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            dispatch = dispatches.recv() => match dispatch { Some(d) => d, None => return },
            _ = shutdown.cancelled() => return,
        };
        let mut batch = vec![first];
        while batch.len() < BATCH_MAX {
            let Ok(next) = dispatches.try_recv() else { break };
            batch.push(next);
        }
        tracing::debug!(commands = batch.len(), "sending to the tasks queue");
        let mut backoff = Backoff::new(BACKOFF_FIRST, BACKOFF_MAX);
        while let Err(e) = queues.send_tasks(&batch).await {
            tracing::warn!("cannot send {} commands to the tasks queue, trying again: {e}", batch.len());
            tokio::select! { _ = tokio::time::sleep(backoff.delay()) => {}, _ = shutdown.cancelled() => return }
        }
    }
}
