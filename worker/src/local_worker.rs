//! The in-process activity loop of the embedded deployment: commands from
//! the engine thread are carried out by tasks, at most `concurrency` at once,
//! and their answers go back to the engine.

use std::sync::Arc;

use evalflow_workflow::Dispatch;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::activity::Activities;
use crate::engine_thread::EngineHandle;

/// Runs commands until `shutdown`, then lets the running ones finish. A
/// command dropped at shutdown (waiting for a slot, or not yet received) is
/// still owed and is sent again when the engine reopens.
pub async fn run(
    activities: Arc<Activities>,
    mut dispatches: mpsc::UnboundedReceiver<Dispatch>,
    engine: EngineHandle,
    concurrency: usize,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut tasks = JoinSet::new();
    loop {
        let dispatch = tokio::select! {
            dispatch = dispatches.recv() => match dispatch { Some(d) => d, None => break },
            _ = shutdown.cancelled() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        // A slot before a task: at most `concurrency` tasks, however many commands wait.
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot { Ok(slot) => slot, Err(_) => break },
            _ = shutdown.cancelled() => break,
        };
        let (activities, engine) = (activities.clone(), engine.clone());
        tasks.spawn(async move {
            let _slot = slot;
            let inputs = activities.execute_with_retries(&dispatch).await;
            if engine.send(inputs).await.is_err() {
                tracing::warn!(run = %dispatch.spec.run, "the engine stopped before the answer to {} reached it", dispatch.command.kind());
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}
