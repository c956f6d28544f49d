//! On AWS, Batch says of a PyTorch program that died of GPU memory only that
//! it exited 1: evalflow reads the fatal error from the job's CloudWatch Logs
//! stream (moto's CloudWatch Logs, with the events a real job would have
//! written), moves the run to p3, and `evalflow logs` shows the stream. A
//! job waiting for capacity is flagged by `status`, with Batch's reason.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use evalflow_activities::aws::classify::BatchJob;
use evalflow_activities::aws::logs::{BatchLogs, TAIL_EVENTS};
use evalflow_activities::aws::requests::RequestCounter;
use evalflow_activities::causes::Signatures;
use evalflow_activities::{ActivityError, Checked, JobRunner, LaunchRequest, RunningJob};
use evalflow_tests::aws::{AwsCompetition, Tuning};
use evalflow_tests::moto::{Moto, unique_prefix};
use evalflow_workflow::{
    Attempt, JobId, JobOutcome, Resource, RunId, RunSpec, Stage, StateTag, SubmissionId, SubmissionSource, TeamId,
    Timestamp,
};

const TORCH: &[&str] = &[
    "loading model from /model/weights.pt",
    "Traceback (most recent call last):",
    "  File \"/app/predict.py\", line 88, in <module>",
    "    logits = model(frames.cuda())",
    "  File \"/usr/local/lib/python3.10/site-packages/torch/nn/modules/module.py\", line 1518, in _wrapped_call_impl",
    "    return self._call_impl(*args, **kwargs)",
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 14.58 GiB \
     of which 1.23 GiB is free. Including non-PyTorch memory, this process has 13.34 GiB memory in use.",
];

const MENTION: &[&str] = &[
    "2026-11-30 10:00:01.000000: W tensorflow/core/common_runtime/bfc_allocator.cc:290] Allocator (GPU_0_bfc) ran out \
     of memory trying to allocate 2.25GiB with freed_by_count=0.",
    "Traceback (most recent call last):",
    "  File \"/app/predict.py\", line 12, in <module>",
    "    frames = np.stack(batch)",
    "ValueError: all input arrays must have the same shape",
];

/// A failed job as Batch reports it: exit code `exit_code`, no reason of its own, its log in `stream`.
fn failed_job(job: &str, exit_code: i32, stream: Option<&str>) -> BatchJob {
    let container = serde_json::json!({ "exitCode": exit_code, "logStreamName": stream });
    serde_json::from_value(serde_json::json!({
        "jobId": job,
        "jobName": "ef-gpu-public-a1",
        "status": "FAILED",
        "statusReason": "Essential container in task exited",
        "attempts": [{ "container": container, "startedAt": 1_000, "stoppedAt": 61_000,
                       "statusReason": "Essential container in task exited" }],
        "container": container,
    }))
    .unwrap()
}

#[tokio::test]
async fn the_fatal_error_is_read_from_the_jobs_cloudwatch_stream() {
    let moto = Moto::shared().await;
    let prefix = unique_prefix("logs");
    let logs = BatchLogs::from_sdk(&moto.sdk().await, &RequestCounter::default(), Signatures::new(&[]).unwrap());
    let stream = |name: &str| format!("{prefix}-submission-x/default/{name}");

    moto.put_job_log(&stream("torch"), TORCH).await;
    let (outcome, _, evidence) = logs.ended(&failed_job("j-torch", 1, Some(&stream("torch")))).await.unwrap().unwrap();
    assert_eq!(outcome, JobOutcome::OutOfMemory { resource: Resource::GpuMemory });
    assert_eq!(evidence.rule.as_ref().map(|r| r.as_str()), Some("pytorch-oom"));
    assert!(evidence.matched.unwrap().as_str().starts_with("torch.OutOfMemoryError: CUDA out of memory. Tried"));
    assert_eq!((evidence.exit_code, evidence.log_stream.unwrap().as_str()), (Some(1), stream("torch").as_str()));
    assert_eq!(evidence.status_reason.unwrap().as_str(), "Essential container in task exited");

    moto.put_job_log(&stream("mention"), MENTION).await;
    let (outcome, _, evidence) = logs.ended(&failed_job("j-m", 1, Some(&stream("mention")))).await.unwrap().unwrap();
    assert_eq!(outcome, JobOutcome::Crashed { exit_code: Some(1) }, "a mention that died of a ValueError");
    assert_eq!(evidence.rule, None);

    // A stream that was never written (the container died before logging) is a crash, not an error.
    let (outcome, ..) = logs.ended(&failed_job("j-n", 1, Some(&stream("never")))).await.unwrap().unwrap();
    assert_eq!(outcome, JobOutcome::Crashed { exit_code: Some(1) });

    // A log of many thousand lines is read from its end, bounded.
    let noise: Vec<String> = (0..12_000).map(|i| format!("frame {i}: {}", "x".repeat(40))).collect();
    let mut long: Vec<&str> = noise.iter().map(String::as_str).collect();
    long.extend(TORCH);
    moto.put_job_log(&stream("long"), &long).await;
    let tail = logs.tail(&stream("long")).await.unwrap();
    assert!(tail.len() <= TAIL_EVENTS as usize && tail.len() > 100, "{} lines", tail.len());
    assert_eq!(tail.last().unwrap().message, TORCH[TORCH.len() - 1], "oldest first, ending with the newest");
    let (outcome, ..) = logs.ended(&failed_job("j-l", 1, Some(&stream("long")))).await.unwrap().unwrap();
    assert_eq!(outcome, JobOutcome::OutOfMemory { resource: Resource::GpuMemory });

    // What Batch explains itself is not read from the log.
    let mut succeeded = failed_job("j-ok", 0, Some(&stream("torch")));
    succeeded.status = "SUCCEEDED".into();
    assert_eq!(logs.ended(&succeeded).await.unwrap().unwrap().0, JobOutcome::Succeeded, "nothing escalates a success");
}

/// Batch, as far as the engine's commands go: jobs are named, terminations
/// succeed, and ends arrive only as the test's events.
#[derive(Debug, Default)]
struct QuietBatch {
    launches: Mutex<BTreeMap<(RunId, Attempt), String>>,
}

#[async_trait]
impl JobRunner for QuietBatch {
    async fn launch(&self, request: &LaunchRequest) -> Result<JobId, ActivityError> {
        let mut launches = self.launches.lock().unwrap();
        launches.insert((request.spec.run.clone(), request.attempt), request.profile.name.to_string());
        Ok(JobId::new(format!("job-{}-a{}", request.spec.run, request.attempt)).unwrap())
    }

    async fn terminate(&self, _run: &RunId, _attempt: Attempt, _job: Option<&JobId>) -> Result<(), ActivityError> {
        Ok(())
    }

    async fn check(&self, _jobs: &[RunningJob]) -> Result<Checked, ActivityError> {
        Ok(Checked::default())
    }
}

const CAPACITY: &str = "CAPACITY:INSUFFICIENT_INSTANCE_CAPACITY - Service cannot fulfill the capacity requested for \
                        instance type [g4dn.xlarge]";

/// The EventBridge event Batch sends when `run`'s `attempt` waits for capacity.
fn runnable_event(run: &str, attempt: u32) -> String {
    serde_json::json!({
        "version": "0",
        "detail-type": "Batch Job State Change",
        "source": "aws.batch",
        "detail": {
            "jobName": format!("ef-{run}-a{attempt}"),
            "jobId": format!("job-{run}-a{attempt}"),
            "status": "RUNNABLE",
            "statusReason": CAPACITY,
            "attempts": [],
        }
    })
    .to_string()
}

/// The EventBridge event Batch sends when `run`'s `attempt` starts.
fn started_event(run: &str, attempt: u32) -> String {
    runnable_event(run, attempt).replace("\"RUNNABLE\"", "\"RUNNING\"").replace(CAPACITY, "")
}

/// The EventBridge event Batch sends when `job` of `run`'s `attempt` stops.
fn batch_event(run: &str, attempt: u32, status: &str, exit_code: i32, stream: &str) -> String {
    serde_json::json!({
        "version": "0",
        "detail-type": "Batch Job State Change",
        "source": "aws.batch",
        "detail": {
            "jobName": format!("ef-{run}-a{attempt}"),
            "jobId": format!("job-{run}-a{attempt}"),
            "status": status,
            "statusReason": "Essential container in task exited",
            "attempts": [{ "container": { "exitCode": exit_code, "logStreamName": stream },
                           "startedAt": 1_000, "stoppedAt": 61_000 }],
            "container": { "exitCode": exit_code, "logStreamName": stream },
        }
    })
    .to_string()
}

async fn wait_for(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_pytorch_submission_escalates_from_its_log_and_logs_shows_the_stream() {
    let dir = tempfile::tempdir().unwrap();
    let tuning = Tuning { visibility_timeout_secs: 10, reconcile_after_secs: 3600, resend_after_secs: 2 };
    let competition = AwsCompetition::create(&dir.path().join("c"), "awslogs", tuning).await;
    let toml = competition.cli.data_dir.join("evalflow.toml");
    let flagged_at_once = std::fs::read_to_string(&toml)
        .unwrap()
        .replace("reconcile_interval_secs = 1", "reconcile_interval_secs = 1\nflag_waiting_after_secs = 0");
    std::fs::write(&toml, flagged_at_once).unwrap();
    let cli = competition.cli.clone();
    tokio::task::spawn_blocking(move || cli.ok(&["aws", "bootstrap"])).await.unwrap();
    competition.upload_labels().await;
    let score = competition.stage_predictions("gpu-public", 2, 0.6).await;
    let stream = format!("{}-submission-gpu/default/task-a1", competition.prefix);
    competition.moto.put_job_log(&stream, TORCH).await;

    let batch = Arc::new(QuietBatch::default());
    let fleet = competition.fleet(batch.clone()).await;
    let (node, queues) = (&fleet.node, fleet.queues.clone());
    let sqs = competition.moto.sqs().await;
    let send = async |body: String| {
        sqs.send_message().queue_url(&queues.events).message_body(body).send().await.unwrap();
    };

    let spec = RunSpec::new(
        SubmissionId::new("gpu").unwrap(),
        TeamId::new("team-gpu").unwrap(),
        Stage::Public,
        false,
        SubmissionSource::Image { uri: "registry.example/gpu:1".into() },
        Timestamp::now(),
    );
    node.submit(vec![spec]).await.unwrap();
    let run = RunId::parse("gpu-public").unwrap();
    wait_for("attempt 1 runs", async || node.run(&run).await.unwrap().state == StateTag::Running).await;
    // It waits for capacity first: status flags it with Batch's reason.
    send(runnable_event("gpu-public", 1)).await;
    wait_for("status flags the wait", async || !node.status().await.unwrap().waiting_long.is_empty()).await;
    let flagged = node.status().await.unwrap().waiting_long.remove(0);
    assert_eq!((flagged.run, flagged.status.as_str()), (run.clone(), "RUNNABLE"));
    assert_eq!(flagged.reason.as_deref(), Some(CAPACITY));
    let view = node.run(&run).await.unwrap();
    assert!(view.waiting.as_deref().unwrap().starts_with("RUNNABLE for "), "{view:?}");
    assert!(view.waiting.as_deref().unwrap().ends_with(CAPACITY), "{view:?}");
    // Then it starts: the wait is over, and no longer flagged.
    send(started_event("gpu-public", 1)).await;
    wait_for("the start is noted", async || node.run(&run).await.unwrap().waiting.is_none()).await;
    assert!(node.status().await.unwrap().waiting_long.is_empty(), "a running job is not flagged as waiting");
    send(batch_event("gpu-public", 1, "FAILED", 1, &stream)).await;
    wait_for("attempt 2 runs", async || {
        let view = node.run(&run).await.unwrap();
        view.state == StateTag::Running && view.attempts == 2
    })
    .await;
    send(batch_event("gpu-public", 2, "SUCCEEDED", 0, "unused")).await;
    wait_for("the run is published", async || node.run(&run).await.unwrap().state == StateTag::Published).await;

    let view = node.run(&run).await.unwrap();
    assert!((view.score.unwrap() - score).abs() < 1e-12);
    let placements = batch.launches.lock().unwrap().clone();
    assert_eq!(placements.values().cloned().collect::<Vec<_>>(), ["g4", "p3"], "exit code 1 on g4 moved to p3");
    let first = &view.attempt_details[0];
    assert_eq!(first.job.as_ref().map(JobId::as_str), Some("job-gpu-public-a1"));
    assert_eq!((first.rule.as_deref(), first.exit_code), (Some("pytorch-oom"), Some(1)));
    assert_eq!(first.log_stream.as_deref(), Some(stream.as_str()));
    assert_eq!(first.status_reason.as_deref(), Some("Essential container in task exited"));
    assert!(first.summary.as_deref().unwrap().starts_with("out of GPU memory on g4: torch.OutOfMemoryError: CUDA"));
    let history = node.history(&run).await.unwrap();
    let noted = history.iter().find(|e| e.event == "job_waiting").unwrap();
    assert_eq!((noted.disposition.as_str(), noted.state), ("noted", StateTag::Running));
    assert_eq!(noted.detail, format!("attempt 1: RUNNABLE: {CAPACITY}"));
    assert!(history.iter().any(|e| e.event == "job_waiting" && e.detail == "attempt 1: RUNNING"), "{history:?}");

    fleet.stop().await;

    let cli = competition.cli.clone();
    let logs = tokio::task::spawn_blocking(move || cli.ok(&["logs", "gpu-public", "--attempt", "1"])).await.unwrap();
    assert!(logs.contains("job job-gpu-public-a1 (attempt 1 of run gpu-public)"), "{logs}");
    assert!(logs.contains("evidence: torch.OutOfMemoryError: CUDA out of memory"), "{logs}");
    assert!(logs.contains(&format!("log stream: {stream}")), "{logs}");
    assert!(logs.contains("  File \"/app/predict.py\", line 88, in <module>"), "the stream's lines: {logs}");
}
