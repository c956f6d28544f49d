//! The job watcher: asks the runner how running jobs are, and tells the
//! engine about those that ended, and why those that have not started wait
//! (each new reason once). Level-triggered: it starts from the runs in
//! the `running` state each time, so a job that ended while no engine ran is
//! seen at the first look after a restart.
//!
//! Locally it looks at every job every 250 ms, and sooner when the runner
//! hints that a job ended (a supervisor exited), at most once per
//! [`HINTED_GAP`]. On AWS, where job ends arrive
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

/// The least time between a look and the next one that a hint brings
/// forward: jobs that end by the thousand make a look per gap, not one each.
pub const HINTED_GAP: Duration = Duration::from_millis(20);

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
    let mut looked_at = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(watch.interval) => {},
            _ = runner.ended_hint() => {
                let gap = tokio::time::sleep_until((looked_at + HINTED_GAP).into());
                tokio::select! { _ = gap => {}, _ = shutdown.cancelled() => return }
            }
            _ = shutdown.cancelled() => return,
        }
        looked_at = Instant::now();
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

#[cfg(test)]
mod tests {
    use evalflow_activities::{ActivityError, LaunchRequest};
    use evalflow_workflow::store::SledOptions;
    use evalflow_workflow::{Engine, JobId, JobOutcome, JobUsage, SledStore};
    use tokio::sync::{Notify, mpsc};

    use super::*;
    use crate::testing;

    /// Every job it is asked about has ended; it says so when told to.
    #[derive(Default)]
    struct EndedJobs {
        ended: Notify,
    }

    #[async_trait::async_trait]
    impl JobRunner for EndedJobs {
        async fn launch(&self, _request: &LaunchRequest) -> Result<JobId, ActivityError> {
            unreachable!("the test launches nothing")
        }

        async fn terminate(&self, _run: &RunId, _attempt: Attempt, _job: Option<&JobId>) -> Result<(), ActivityError> {
            Ok(())
        }

        async fn check(&self, jobs: &[RunningJob]) -> Result<Checked, ActivityError> {
            let usage = JobUsage { started_at: None, ended_at: Timestamp::now(), peak_memory_mib: None };
            let ended = jobs.iter().map(|job| EndedJob {
                job: job.clone(),
                outcome: JobOutcome::Succeeded,
                usage: usage.clone(),
                evidence: Default::default(),
            });
            Ok(Checked { ended: ended.collect(), waiting: Vec::new() })
        }

        async fn ended_hint(&self) {
            self.ended.notified().await;
        }
    }

    #[tokio::test]
    async fn a_job_end_the_runner_hints_at_is_seen_long_before_the_next_look() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), SledOptions::default()).unwrap();
        let (engine, recovered) = Engine::open(store, testing::policy(), 8).unwrap();
        let (tx, mut commands) = mpsc::unbounded_channel();
        let (engine, _thread) = crate::engine::spawn(engine, recovered, tx, Duration::from_secs(3600), false);
        let spec = testing::spec("a");
        engine.apply(vec![Input::Submit(spec.clone())]).await.unwrap();
        let launch = commands.recv().await.unwrap();
        let launched = Event::JobLaunched { attempt: launch.command.attempt(), job: JobId::new("j").unwrap() };
        let input = Input::Event { run: spec.run.clone(), envelope: Envelope::answering(launched, launch.version) };
        engine.apply(vec![input]).await.unwrap();
        assert_eq!(engine.running().await.unwrap().len(), 1);

        let runner = Arc::new(EndedJobs::default());
        let shutdown = CancellationToken::new();
        let hour = Watch { interval: Duration::from_secs(3600), quiet_for: Duration::ZERO };
        let watcher = tokio::spawn(run(runner.clone(), engine.clone(), hour, shutdown.clone()));
        runner.ended.notify_one();
        let mut looks = 0;
        while !engine.running().await.unwrap().is_empty() {
            looks += 1;
            assert!(looks < 1_000, "the hinted end was not seen in 10 s, with a look an hour");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(commands.recv().await.unwrap().command.kind(), "score_predictions", "its end was applied");
        shutdown.cancel();
        watcher.await.unwrap();
    }
}
