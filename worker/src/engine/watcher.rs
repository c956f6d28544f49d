//! The job watcher: asks the runner how running jobs are, and tells the
//! engine about those that ended, and why those that have not started wait
//! (each new reason once). Level-triggered: it starts from the runs in
//! the `running` state each time, so a job that ended while no engine ran is
//! seen at the first look after a restart.
//!
//! Locally it looks at every job every 250 ms. On AWS, where job ends arrive
//! as EventBridge events, it is the reconciler: it looks only at jobs not
//! heard of for a while (events can be lost), each at most once per that
//! while, with the runner's batched checks (DescribeJobs, 100 ids a call).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use evalflow_activities::{Checked, EndedJob, JobRunner, RunningJob, WaitingJob};
use evalflow_workflow::{Attempt, Detail, Envelope, Event, Input, RunId, Timestamp};
use tokio_util::sync::CancellationToken;

use crate::engine::EngineHandle;

/// How often to look, and at which jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watch {
    /// Time between two looks.
    pub interval: Duration,
    /// Only jobs whose run has not changed for this long are looked at, and
    /// each at most once per this long (zero: every job, every time).
    pub quiet_for: Duration,
}

/// What the watcher remembers of each running job.
#[derive(Default)]
struct Seen {
    /// When each job was last looked at.
    looked: HashMap<(RunId, Attempt), Instant>,
    /// Jobs whose end was reported and is not applied yet.
    reported: HashSet<(RunId, Attempt)>,
    /// The last wait reported of each job: its status and reason.
    waits: HashMap<(RunId, Attempt), (String, Option<String>)>,
}

impl Seen {
    fn forget_all_but(&mut self, running: &[RunningJob]) {
        let live: HashSet<(RunId, Attempt)> = running.iter().map(key).collect();
        self.looked.retain(|k, _| live.contains(k));
        self.reported.retain(|k| live.contains(k));
        self.waits.retain(|k, _| live.contains(k));
    }

    /// The events of the waits not reported yet in those words.
    fn new_waits(&mut self, waiting: Vec<WaitingJob>) -> Vec<Input> {
        let mut inputs = Vec::new();
        for WaitingJob { job, status, reason } in waiting {
            let wait = (status, reason);
            if self.waits.get(&key(&job)) == Some(&wait) {
                continue;
            }
            let event = Event::JobWaiting {
                attempt: job.attempt,
                job: job.job.clone(),
                status: Detail::new(&wait.0),
                reason: wait.1.as_deref().map(Detail::new),
            };
            self.waits.insert(key(&job), wait);
            inputs.push(Input::Event { run: job.run, envelope: Envelope::unfenced(event) });
        }
        inputs
    }

    fn due(&self, job: &RunningJob, quiet_for: Duration) -> bool {
        let key = key(job);
        if self.reported.contains(&key) {
            return false;
        }
        quiet_for.is_zero()
            || (Timestamp::now().since(job.since) >= quiet_for
                && self.looked.get(&key).is_none_or(|at| at.elapsed() >= quiet_for))
    }
}

fn key(job: &RunningJob) -> (RunId, Attempt) {
    (job.run.clone(), job.attempt)
}

/// Looks at running jobs as `watch` says until `shutdown`.
pub async fn run(runner: Arc<dyn JobRunner>, engine: EngineHandle, watch: Watch, shutdown: CancellationToken) {
    let mut seen = Seen::default();
    loop {
        tokio::select! { _ = tokio::time::sleep(watch.interval) => {}, _ = shutdown.cancelled() => return }
        let Ok(running) = engine.running().await else { return };
        seen.forget_all_but(&running);
        let due: Vec<RunningJob> = running.into_iter().filter(|job| seen.due(job, watch.quiet_for)).collect();
        if due.is_empty() {
            continue;
        }
        let now = Instant::now();
        seen.looked.extend(due.iter().map(|j| (key(j), now)));
        match runner.check(&due).await {
            Ok(Checked { ended, waiting }) => {
                seen.reported.extend(ended.iter().map(|e| key(&e.job)));
                let mut inputs: Vec<Input> = ended.into_iter().map(job_ended).collect();
                inputs.extend(seen.new_waits(waiting));
                if engine.send(inputs).await.is_err() {
                    return;
                }
            }
            Err(e) => tracing::warn!("cannot check running jobs: {e}"),
        }
    }
}

/// The event of a job's end.
pub fn job_ended(ended: EndedJob) -> Input {
    let EndedJob { job, outcome, usage, evidence } = ended;
    let event = Event::JobEnded { attempt: job.attempt, job: job.job, outcome, usage, evidence };
    Input::Event { run: job.run, envelope: Envelope::unfenced(event) }
}
