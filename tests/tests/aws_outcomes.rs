//! Failure outcomes on AWS through the real SQS and S3 plumbing (moto): an
//! engine node and a worker loop in this process, with a scripted Batch
//! behind the job-runner trait (moto's Batch jobs only ever succeed). Then
//! duplicated and reordered deliveries of worker results, which change nothing.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use evalflow_activities::{ActivityError, Checked, EndedJob, JobRunner, LaunchRequest, RunningJob};
use evalflow_tests::aws::{AwsCompetition, Tuning};
use evalflow_worker::aws::queues::EventMessage;
use evalflow_worker::views::{EventView, RunView};
use evalflow_workflow::{
    Attempt, Detail, Envelope, Event, Input, JobId, JobOutcome, JobUsage, Resource, RunId, RunSpec, Stage, StateTag,
    SubmissionId, SubmissionSource, TeamId, Timestamp,
};

/// AWS Batch, scripted: each submission's jobs end as its script says;
/// `cancelme`'s job runs until terminated, and the first termination fails.
#[derive(Debug, Default)]
struct ScriptedBatch {
    launches: Mutex<BTreeMap<(RunId, Attempt), (String, u32)>>,
    terminations: Mutex<u32>,
}

fn script(submission: &str, attempt: Attempt) -> JobOutcome {
    let detail = Detail::new;
    match (submission, attempt.0) {
        ("oom", 1) => JobOutcome::OutOfMemory { resource: Resource::HostMemory },
        ("gpu", 1) => JobOutcome::OutOfMemory { resource: Resource::GpuMemory },
        ("spot", 1) => JobOutcome::Interrupted { detail: detail("Host EC2 (instance i-0a1b2c3d) terminated.") },
        ("slow", _) => JobOutcome::TimedOut,
        ("pull", _) => JobOutcome::CannotStart { detail: detail("CannotPullContainerError: pull access denied") },
        _ => JobOutcome::Succeeded,
    }
}

#[async_trait]
impl JobRunner for ScriptedBatch {
    async fn launch(&self, request: &LaunchRequest) -> Result<JobId, ActivityError> {
        let mut launches = self.launches.lock().unwrap();
        let entry = launches
            .entry((request.spec.run.clone(), request.attempt))
            .or_insert((request.profile.name.to_string(), 0));
        entry.1 += 1;
        Ok(JobId::new(format!("job-{}-a{}", request.spec.run, request.attempt)).unwrap())
    }

    async fn terminate(&self, _run: &RunId, _attempt: Attempt, _job: Option<&JobId>) -> Result<(), ActivityError> {
        let mut count = self.terminations.lock().unwrap();
        *count += 1;
        match *count {
            1 => Err(ActivityError::Permanent("AccessDeniedException: not authorized to TerminateJob".into())),
            _ => Ok(()),
        }
    }

    async fn check(&self, jobs: &[RunningJob]) -> Result<Checked, ActivityError> {
        let now = Timestamp::now();
        let ended = jobs
            .iter()
            .filter(|job| job.run.parts().0.as_str() != "cancelme")
            .map(|job| EndedJob {
                job: job.clone(),
                outcome: script(job.run.parts().0.as_str(), job.attempt),
                usage: JobUsage { started_at: Some(job.since), ended_at: now, peak_memory_mib: None },
                evidence: Default::default(),
            })
            .collect();
        Ok(Checked { ended, waiting: Vec::new() })
    }
}

fn spec(submission: &str) -> RunSpec {
    RunSpec::new(
        SubmissionId::new(submission).unwrap(),
        TeamId::new(format!("team-{submission}")).unwrap(),
        Stage::Public,
        false,
        SubmissionSource::Image { uri: format!("registry.example/{submission}:1") },
        Timestamp::now(),
    )
}

async fn wait_for(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oom_timeouts_spot_and_image_pulls_take_their_paths_through_sqs_and_s3() {
    let dir = tempfile::tempdir().unwrap();
    let tuning = Tuning { visibility_timeout_secs: 10, reconcile_after_secs: 1, resend_after_secs: 2 };
    let competition = AwsCompetition::create(&dir.path().join("c"), "outcomes", tuning).await;
    let cli = competition.cli.clone();
    let bootstrap = tokio::task::spawn_blocking(move || cli.ok(&["aws", "bootstrap"])).await.unwrap();
    assert!(bootstrap.contains("created"), "{bootstrap}");
    competition.upload_labels().await;
    let mut scores = BTreeMap::new();
    for (run, attempt) in [("good-public", 1), ("oom-public", 2), ("gpu-public", 2), ("spot-public", 2)] {
        scores.insert(run, competition.stage_predictions(run, attempt, 0.6).await);
    }

    let batch = Arc::new(ScriptedBatch::default());
    let fleet = competition.fleet(batch.clone()).await;
    let (node, queues) = (&fleet.node, fleet.queues.clone());

    let submissions = ["good", "oom", "gpu", "spot", "slow", "pull", "cancelme"];
    let accepted = node.submit(submissions.iter().map(|s| spec(s)).collect()).await.unwrap();
    assert!(accepted.iter().all(|a| a.accepted), "{accepted:?}");
    let cancelme = RunId::parse("cancelme-public").unwrap();
    wait_for("cancelme runs", async || node.run(&cancelme).await.unwrap().state == StateTag::Running).await;
    node.cancel(evalflow_worker::views::Selection::Runs(vec![cancelme.clone()]), false).await.unwrap();
    wait_for("every run ends", async || {
        node.runs(None, None, None).await.unwrap().iter().all(|r| r.state.is_terminal())
    })
    .await;
    // The first termination was given up on; the engine sent it again.
    wait_for("cancelme's job is stopped", async || !node.stopping(&cancelme).await.unwrap()).await;
    assert_eq!(*batch.terminations.lock().unwrap(), 2, "given up once, then sent again by the engine");

    let runs: BTreeMap<String, RunView> =
        node.runs(None, None, None).await.unwrap().into_iter().map(|r| (r.id.to_string(), r)).collect();
    let outcome = |id: &str| {
        let r = &runs[id];
        (r.state, r.profile.as_ref().map(ToString::to_string).unwrap(), r.attempts, r.failure.clone())
    };
    use StateTag::{Failed, Published};
    assert_eq!(outcome("good-public"), (Published, "g4".into(), 1, None));
    assert_eq!(outcome("oom-public"), (Published, "p3".into(), 2, None), "host OOM on g4 moves to p3");
    assert_eq!(outcome("gpu-public"), (Published, "p3".into(), 2, None), "GPU OOM on g4 moves to p3");
    assert_eq!(outcome("spot-public"), (Published, "g4".into(), 2, None), "a Spot reclaim retries on g4");
    assert_eq!(outcome("slow-public"), (Failed, "g4".into(), 1, Some("timed_out".into())));
    assert_eq!(outcome("pull-public"), (Failed, "g4".into(), 1, Some("cannot_start".into())));
    assert!(runs["pull-public"].reason.as_deref().unwrap().contains("CannotPullContainerError"));
    for (run, score) in &scores {
        assert!((runs[*run].score.unwrap() - score).abs() < 1e-12, "{run}");
    }
    let metrics = node.metrics().await.unwrap();
    for line in [
        "evalflow_queue_messages{queue=\"tasks\"} 0",
        "evalflow_dead_letters{queue=\"events\"} 0",
        "evalflow_attempts_total{profile=\"g4\",outcome=\"interrupted\"} 1",
        "evalflow_runs{stage=\"public\",state=\"cancelled\"} 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in the metrics on AWS:\n{metrics}");
    }
    let launches = batch.launches.lock().unwrap().clone();
    assert!(launches.values().all(|(_, n)| *n == 1), "each (run, attempt) launched once: {launches:?}");
    let placement = |run: &str, attempt| launches[&(RunId::parse(run).unwrap(), Attempt(attempt))].0.clone();
    assert_eq!((placement("oom-public", 1), placement("oom-public", 2)), ("g4".into(), "p3".into()));
    assert_eq!((placement("spot-public", 1), placement("spot-public", 2)), ("g4".into(), "g4".into()));

    // Old worker results again, twice and backwards: nothing changes.
    let good = RunId::parse("good-public").unwrap();
    let history = node.history(&good).await.unwrap();
    // Entry n answered the command issued at the version entry n - 1 left.
    let issued_at = |answer: usize| history[answer - 2].version;
    let replayed: Vec<Input> = [
        (Event::JobLaunched { attempt: Attempt(1), job: JobId::new("job-good-public-a1").unwrap() }, issued_at(3)),
        (
            Event::PredictionsScored { attempt: Attempt(1), score: evalflow_workflow::Score::new(0.01).unwrap() },
            issued_at(5),
        ),
        (Event::Published { attempt: Attempt(1) }, issued_at(6)),
    ]
    .into_iter()
    .rev()
    .flat_map(|(event, version)| {
        let input = Input::Event { run: good.clone(), envelope: Envelope::answering(event, version) };
        [input.clone(), input]
    })
    .collect();
    let before = node.run(&good).await.unwrap();
    queues.send_events(replayed.clone()).await.unwrap();
    let body = serde_json::to_string(&EventMessage { inputs: replayed.clone() }).unwrap();
    assert!(body.len() < 256 * 1024);
    wait_for("the replayed results are recorded", async || {
        node.history(&good).await.unwrap().len() == history.len() + replayed.len()
    })
    .await;
    let after = node.run(&good).await.unwrap();
    assert_eq!((after.state, after.version, after.score), (before.state, before.version, before.score));
    let recorded: Vec<EventView> = node.history(&good).await.unwrap().split_off(history.len());
    assert!(recorded.iter().all(|e| e.disposition.starts_with("ignored")), "{recorded:?}");

    fleet.stop().await;
}
