//! How an AWS Batch job ended, from a DescribeJobs `JobDetail` or from the
//! `detail` of an EventBridge "Batch Job State Change" event (the same shape,
//! in JSON). Batch reports an exit code and reason strings; evalflow needs to
//! tell OOM from timeout (both often exit 137) from Spot reclaim from image
//! pull failures, so it goes by the reason strings first.

use evalflow_workflow::{Detail, Evidence, JobOutcome, JobUsage, Resource, Timestamp};
use serde::Deserialize;

use crate::submission::GPU_OOM_EXIT_CODE;

/// What classification needs of a Batch job.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct BatchJob {
    /// The job's id.
    pub job_id: String,
    /// Its name (`ef-<run>-a<attempt>`).
    pub job_name: String,
    /// SUBMITTED, PENDING, RUNNABLE, STARTING, RUNNING, SUCCEEDED or FAILED.
    pub status: String,
    /// Why it is in that status.
    pub status_reason: Option<String>,
    /// Its attempts (evalflow submits without Batch retries: at most one).
    pub attempts: Vec<BatchAttempt>,
    /// Its container, as of the last attempt.
    pub container: Option<BatchContainer>,
    /// When it started, in ms since the epoch.
    pub started_at: Option<i64>,
    /// When it stopped, in ms since the epoch.
    pub stopped_at: Option<i64>,
}

/// One attempt of a Batch job.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct BatchAttempt {
    /// Its container.
    pub container: Option<BatchContainer>,
    /// Why the attempt stopped.
    pub status_reason: Option<String>,
    /// When it started.
    pub started_at: Option<i64>,
    /// When it stopped.
    pub stopped_at: Option<i64>,
}

/// A job's container.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct BatchContainer {
    /// Its exit code.
    pub exit_code: Option<i32>,
    /// Why it stopped (`OutOfMemoryError: Container killed due to memory usage`).
    pub reason: Option<String>,
    /// Its CloudWatch Logs stream, in the group `/aws/batch/job`.
    pub log_stream_name: Option<String>,
}

impl From<&aws_sdk_batch::types::JobDetail> for BatchJob {
    fn from(job: &aws_sdk_batch::types::JobDetail) -> Self {
        let container = |exit_code, reason: Option<&str>, stream: Option<&str>| BatchContainer {
            exit_code,
            reason: reason.map(str::to_owned),
            log_stream_name: stream.map(str::to_owned),
        };
        BatchJob {
            job_id: job.job_id().unwrap_or_default().to_owned(),
            job_name: job.job_name().unwrap_or_default().to_owned(),
            status: job.status().map(|s| s.as_str().to_owned()).unwrap_or_default(),
            status_reason: job.status_reason().map(str::to_owned),
            attempts: job
                .attempts()
                .iter()
                .map(|a| BatchAttempt {
                    container: a.container().map(|c| container(c.exit_code(), c.reason(), c.log_stream_name())),
                    status_reason: a.status_reason().map(str::to_owned),
                    started_at: a.started_at(),
                    stopped_at: a.stopped_at(),
                })
                .collect(),
            container: job.container().map(|c| container(c.exit_code(), c.reason(), c.log_stream_name())),
            started_at: job.started_at(),
            stopped_at: job.stopped_at(),
        }
    }
}

/// Reason prefixes of a failed job, in the order they are tried.
const RULES: &[(&str, Rule)] = &[
    ("OutOfMemoryError", Rule::OutOfMemory),
    ("Job attempt duration exceeded timeout", Rule::TimedOut),
    ("Host EC2", Rule::Interrupted),
    ("CannotPullContainerError", Rule::CannotStart),
    ("CannotStartContainerError", Rule::CannotStart),
    ("CannotCreateContainerError", Rule::CannotStart),
    ("CannotInspectContainerError", Rule::CannotStart),
    ("ResourceInitializationError", Rule::Interrupted),
    ("DockerTimeoutError", Rule::Interrupted),
    ("TaskFailedToStart", Rule::Interrupted),
    // What evalflow itself says when it stops a job no compute environment can place.
    (UNPLACEABLE_REASON, Rule::CannotStart),
];

/// The status of a job whose container runs: its wait, if it had one, is over.
pub const STARTED: &str = "RUNNING";

/// The reason evalflow gives TerminateJob for a job Batch can never place.
pub const UNPLACEABLE_REASON: &str = "evalflow: no compute environment can place this job";

#[derive(Debug, Clone, Copy)]
enum Rule {
    OutOfMemory,
    TimedOut,
    Interrupted,
    CannotStart,
}

impl BatchJob {
    /// Every reason string the job carries, most specific first.
    fn reasons(&self) -> impl Iterator<Item = &str> {
        let last = self.attempts.last();
        [
            last.and_then(|a| a.container.as_ref()).and_then(|c| c.reason.as_deref()),
            self.container.as_ref().and_then(|c| c.reason.as_deref()),
            last.and_then(|a| a.status_reason.as_deref()),
            self.status_reason.as_deref(),
        ]
        .into_iter()
        .flatten()
    }

    fn exit_code(&self) -> Option<i32> {
        let last = self.attempts.last().and_then(|a| a.container.as_ref()).and_then(|c| c.exit_code);
        last.or_else(|| self.container.as_ref().and_then(|c| c.exit_code))
    }

    /// When its last attempt stopped, in ms since the epoch.
    pub fn stopped_at(&self) -> Option<i64> {
        self.attempts.last().and_then(|a| a.stopped_at).or(self.stopped_at)
    }

    /// Whether it has not started yet (submitted, waiting for its
    /// dependencies, for capacity, or for its container to start).
    pub fn waiting(&self) -> bool {
        matches!(self.status.as_str(), "SUBMITTED" | "PENDING" | "RUNNABLE" | "STARTING")
    }

    /// Batch's reason for the job's status, when it gives one.
    pub fn waiting_reason(&self) -> Option<&str> {
        self.status_reason.as_deref().filter(|r| !r.trim().is_empty())
    }

    /// Batch's reason, when the job waits for something no compute
    /// environment of its queue can ever give it
    /// (`MISCONFIGURATION:JOB_RESOURCE_REQUIREMENT - ...`): it would wait for ever.
    pub fn misconfigured(&self) -> Option<&str> {
        let reason = self.status_reason.as_deref()?;
        (self.status == "RUNNABLE" && starts_with_ignoring_case(reason, "MISCONFIGURATION:")).then_some(reason)
    }

    /// The CloudWatch Logs stream of its last attempt.
    pub fn log_stream(&self) -> Option<&str> {
        let last = self.attempts.last().and_then(|a| a.container.as_ref()).and_then(|c| c.log_stream_name.as_deref());
        last.or_else(|| self.container.as_ref().and_then(|c| c.log_stream_name.as_deref()))
    }

    /// What Batch reports of the job's end, before any rule decides.
    fn evidence(&self) -> Evidence {
        Evidence {
            exit_code: self.exit_code(),
            status_reason: self.status_reason.as_deref().map(Detail::new),
            log_stream: self.log_stream().map(Detail::new),
            ..Evidence::default()
        }
    }

    /// What the job used: its running time (no peak memory from Batch).
    fn usage(&self) -> JobUsage {
        let last = self.attempts.last();
        let started = last.and_then(|a| a.started_at).or(self.started_at);
        let stopped = last.and_then(|a| a.stopped_at).or(self.stopped_at);
        let millis = |ms: i64| Timestamp(u64::try_from(ms).unwrap_or(0));
        JobUsage {
            started_at: started.map(millis),
            ended_at: stopped.map_or_else(Timestamp::now, millis),
            peak_memory_mib: None,
        }
    }
}

/// How the job ended, as Batch tells it; `None` while it has not. A failed
/// job that Batch says only exited non-zero may still have died of GPU
/// memory: its log tells ([`crate::aws::logs`]).
pub fn classify(job: &BatchJob) -> Option<(JobOutcome, JobUsage, Evidence)> {
    let (outcome, evidence) = match job.status.as_str() {
        "SUCCEEDED" => (JobOutcome::Succeeded, job.evidence()),
        "FAILED" => failed(job),
        _ => return None,
    };
    Some((outcome, job.usage(), evidence))
}

fn failed(job: &BatchJob) -> (JobOutcome, Evidence) {
    for (prefix, rule) in RULES {
        let Some(reason) = job.reasons().find(|r| starts_with_ignoring_case(r, prefix)) else { continue };
        let detail = || Detail::new(reason);
        let outcome = match rule {
            Rule::OutOfMemory => JobOutcome::OutOfMemory { resource: Resource::HostMemory },
            Rule::TimedOut => JobOutcome::TimedOut,
            Rule::Interrupted => JobOutcome::Interrupted { detail: detail() },
            Rule::CannotStart => JobOutcome::CannotStart { detail: detail() },
        };
        return (outcome, job.evidence().decided(&format!("batch:{prefix}"), reason));
    }
    match job.exit_code() {
        Some(GPU_OOM_EXIT_CODE) => {
            let evidence = job.evidence().decided("exit-code-86", format!("exit code {GPU_OOM_EXIT_CODE}"));
            (JobOutcome::OutOfMemory { resource: Resource::GpuMemory }, evidence)
        }
        Some(code) => (JobOutcome::Crashed { exit_code: Some(code) }, job.evidence()),
        None => {
            // No exit code and no reason we know: most likely the machine's
            // fault, not the submission's. Retrying is bounded; failing a
            // submission for an unknown reason is not fair.
            let reason = job.reasons().next().unwrap_or("no reason given");
            tracing::warn!(job = %job.job_name, "unclassified Batch failure, treated as an interruption: {reason}");
            let outcome = JobOutcome::Interrupted { detail: Detail::new(format!("unclassified: {reason}")) };
            (outcome, job.evidence())
        }
    }
}

fn starts_with_ignoring_case(text: &str, prefix: &str) -> bool {
    text.get(..prefix.len()).is_some_and(|head| head.eq_ignore_ascii_case(prefix))
}

/// An EventBridge event from Batch, as delivered to the events queue.
#[derive(Debug, Clone, Deserialize)]
pub struct BatchEvent {
    /// `Batch Job State Change` for job events.
    #[serde(rename = "detail-type")]
    pub detail_type: String,
    /// The job.
    pub detail: BatchJob,
}

/// The detail-type of Batch job events.
pub const JOB_STATE_CHANGE: &str = "Batch Job State Change";

#[cfg(test)]
mod tests {
    use super::*;

    /// An EventBridge event, as recorded from Batch, with one attempt.
    fn event(status: &str, status_reason: &str, exit_code: Option<i32>, reason: Option<&str>) -> String {
        let container = serde_json::json!({ "exitCode": exit_code, "reason": reason, "logStreamName": "x" });
        serde_json::json!({
            "version": "0",
            "id": "c8f9c4b5-76e5-d76a-f980-7011e206042b",
            "detail-type": "Batch Job State Change",
            "source": "aws.batch",
            "account": "123456789012",
            "time": "2026-11-24T10:00:00Z",
            "region": "us-east-1",
            "resources": ["arn:aws:batch:us-east-1:123456789012:job/4c7599ae-0a82-49aa-ba5a-4727fcce14a8"],
            "detail": {
                "jobArn": "arn:aws:batch:us-east-1:123456789012:job/4c7599ae-0a82-49aa-ba5a-4727fcce14a8",
                "jobName": "ef-good-public-a1",
                "jobId": "4c7599ae-0a82-49aa-ba5a-4727fcce14a8",
                "jobQueue": "arn:aws:batch:us-east-1:123456789012:job-queue/evalflow-g4",
                "status": status,
                "statusReason": status_reason,
                "attempts": [{
                    "container": container,
                    "startedAt": 1_795_000_000_000_i64,
                    "stoppedAt": 1_795_000_600_000_i64,
                    "statusReason": status_reason
                }],
                "createdAt": 1_794_999_000_000_i64,
                "startedAt": 1_795_000_000_000_i64,
                "stoppedAt": 1_795_000_600_000_i64,
                "tags": { "run": "good-public", "attempt": "1", "profile": "g4" },
                "aFieldBatchAddsLater": { "nested": [1, 2, 3] },
                "container": { "image": "team/x:1", "exitCode": exit_code, "reason": reason, "vcpus": 4 }
            }
        })
        .to_string()
    }

    fn outcome(json: &str) -> JobOutcome {
        let event: BatchEvent = serde_json::from_str(json).unwrap();
        assert_eq!(event.detail_type, JOB_STATE_CHANGE);
        classify(&event.detail).unwrap().0
    }

    #[test]
    fn recorded_batch_events_are_told_apart() {
        let essential = "Essential container in task exited";
        let cases = [
            (event("SUCCEEDED", essential, Some(0), None), JobOutcome::Succeeded),
            (
                event("FAILED", essential, Some(137), Some("OutOfMemoryError: Container killed due to memory usage")),
                JobOutcome::OutOfMemory { resource: Resource::HostMemory },
            ),
            (
                event("FAILED", "Job attempt duration exceeded timeout by 32 seconds", Some(137), None),
                JobOutcome::TimedOut,
            ),
            (
                event("FAILED", essential, Some(GPU_OOM_EXIT_CODE), Some("CUDA out of memory")),
                JobOutcome::OutOfMemory { resource: Resource::GpuMemory },
            ),
            (event("FAILED", essential, Some(3), None), JobOutcome::Crashed { exit_code: Some(3) }),
        ];
        for (json, expected) in cases {
            assert_eq!(outcome(&json), expected, "{json}");
        }
        let spot = "Host EC2 (instance i-0b3c4a2d8e1f) terminated.";
        assert!(
            matches!(outcome(&event("FAILED", spot, None, None)), JobOutcome::Interrupted { detail } if detail.as_str() == spot)
        );
        let pull = "CannotPullContainerError: Error response from daemon: pull access denied for team/x";
        assert!(matches!(
            outcome(&event("FAILED", "Task failed to start", None, Some(pull))),
            JobOutcome::CannotStart { .. }
        ));
        let case = "outofmemoryerror: container killed due to memory usage";
        assert_eq!(
            outcome(&event("FAILED", essential, Some(137), Some(case))),
            JobOutcome::OutOfMemory { resource: Resource::HostMemory }
        );
    }

    #[test]
    fn unknown_reasons_are_interruptions_and_running_jobs_have_not_ended() {
        let odd = outcome(&event("FAILED", "Something new Batch says", None, None));
        assert!(
            matches!(odd, JobOutcome::Interrupted { detail } if detail.as_str().starts_with("unclassified: Something new"))
        );
        for status in ["SUBMITTED", "RUNNABLE", "RUNNING"] {
            let event: BatchEvent = serde_json::from_str(&event(status, "", None, None)).unwrap();
            assert_eq!(classify(&event.detail), None, "{status}");
        }
    }

    #[test]
    fn a_job_waiting_for_capacity_waits_and_one_that_can_never_be_placed_does_not() {
        let runnable = |reason: &str| -> BatchJob {
            let event: BatchEvent = serde_json::from_str(&event("RUNNABLE", reason, None, None)).unwrap();
            event.detail
        };
        let capacity = runnable(
            "CAPACITY:INSUFFICIENT_INSTANCE_CAPACITY - Service cannot fulfill the capacity requested for instance \
             type g4dn.xlarge",
        );
        assert!(capacity.waiting() && capacity.misconfigured().is_none());
        let never = runnable(
            "MISCONFIGURATION:JOB_RESOURCE_REQUIREMENT - The job resource requirement (vCPU/memory/GPU) is higher \
             than that can be met by the CE(s) attached to the job queue.",
        );
        assert!(never.misconfigured().unwrap().starts_with("MISCONFIGURATION:JOB_RESOURCE_REQUIREMENT"));
        let running: BatchEvent = serde_json::from_str(&event("RUNNING", "", None, None)).unwrap();
        assert!(!running.detail.waiting() && running.detail.misconfigured().is_none());
    }

    #[test]
    fn usage_comes_from_the_attempt() {
        let event: BatchEvent = serde_json::from_str(&event("SUCCEEDED", "", Some(0), None)).unwrap();
        let (_, usage, _) = classify(&event.detail).unwrap();
        assert_eq!(usage.running_secs(), 600.0);
    }

    #[test]
    fn a_describe_jobs_detail_classifies_like_its_event() {
        use aws_sdk_batch::types::{AttemptContainerDetail, AttemptDetail, JobDetail, JobStatus};
        let detail = JobDetail::builder()
            .job_id("j1")
            .job_name("ef-good-public-a2")
            .status(JobStatus::Failed)
            .status_reason("Essential container in task exited")
            .attempts(
                AttemptDetail::builder()
                    .container(
                        AttemptContainerDetail::builder()
                            .exit_code(137)
                            .reason("OutOfMemoryError: Container killed due to memory usage")
                            .build(),
                    )
                    .started_at(1_000)
                    .stopped_at(61_000)
                    .build(),
            )
            .build();
        let (outcome, usage, evidence) = classify(&BatchJob::from(&detail)).unwrap();
        assert_eq!(evidence.rule.as_ref().map(Detail::as_str), Some("batch:OutOfMemoryError"));
        assert_eq!(outcome, JobOutcome::OutOfMemory { resource: Resource::HostMemory });
        assert_eq!(usage.running_secs(), 60.0);
    }
}
