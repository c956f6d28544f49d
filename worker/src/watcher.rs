//! The job watcher: asks the runner how the running jobs are, and tells the
//! engine about those that ended. Level-triggered: it looks at every run in
//! the `running` state each time, so a job that ended while no engine ran is
//! seen at the first look after a restart.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use evalflow_activities::{EndedJob, JobRunner};
use evalflow_workflow::{Attempt, Envelope, Event, Input, RunId};
use tokio_util::sync::CancellationToken;

use crate::engine_thread::EngineHandle;

/// Looks at running jobs every `interval` until `shutdown`.
pub async fn run(runner: Arc<dyn JobRunner>, engine: EngineHandle, interval: Duration, shutdown: CancellationToken) {
    // Ends already reported and not yet applied are not reported again.
    let mut reported: HashSet<(RunId, Attempt)> = HashSet::new();
    loop {
        tokio::select! { _ = tokio::time::sleep(interval) => {}, _ = shutdown.cancelled() => return }
        let Ok(running) = engine.running().await else { return };
        reported.retain(|(run, attempt)| running.iter().any(|j| j.run == *run && j.attempt == *attempt));
        let fresh: Vec<_> = running.into_iter().filter(|j| !reported.contains(&(j.run.clone(), j.attempt))).collect();
        if fresh.is_empty() {
            continue;
        }
        match runner.check(&fresh).await {
            Ok(ended) => {
                reported.extend(ended.iter().map(|e| (e.job.run.clone(), e.job.attempt)));
                if engine.send(ended.into_iter().map(job_ended).collect()).await.is_err() {
                    return;
                }
            }
            Err(e) => tracing::warn!("cannot check running jobs: {e}"),
        }
    }
}

/// The event of a job's end.
pub fn job_ended(ended: EndedJob) -> Input {
    let EndedJob { job, outcome, usage } = ended;
    let event = Event::JobEnded { attempt: job.attempt, job: job.job, outcome, usage };
    Input::Event { run: job.run, envelope: Envelope::unfenced(event) }
}
