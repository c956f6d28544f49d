//! The `[aws]` table of `evalflow.toml`, and its checks.

use std::collections::BTreeMap;
use std::path::PathBuf;

use evalflow_workflow::{Policy, Stage};
use serde::Deserialize;

/// The `[aws]` table: the competition runs on AWS Batch, with SQS queues
/// between the engine and its workers and S3 for the artifacts.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsConfig {
    /// The region.
    pub region: String,
    /// Another implementation of the AWS API to talk to (moto on loopback, in tests).
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// The bucket of outputs, results and leaderboards.
    pub bucket: String,
    /// The secret that jobs' output locations are derived with (relative to
    /// the data directory; default `state/output.key`). The engine makes it;
    /// every worker needs a copy, mode 0600.
    #[serde(default)]
    pub output_key_file: Option<PathBuf>,
    /// The queue of commands for the workers: a FIFO queue (`.fifo`), grouped
    /// by run, so that two tasks of one run are never carried out at once.
    #[serde(default = "default_tasks_queue")]
    pub tasks_queue: String,
    /// The queue of events for the engine: workers' results and Batch's EventBridge events.
    #[serde(default = "default_events_queue")]
    pub events_queue: String,
    /// The job definition every submission's own definition is copied from.
    #[serde(default = "default_job_definition")]
    pub job_definition: String,
    /// How long a received message stays hidden; workers extend it while they work.
    #[serde(default = "default_visibility_timeout_secs")]
    pub visibility_timeout_secs: u32,
    /// How long a receive waits for messages (SQS long polling, 1 to 20 seconds).
    #[serde(default = "default_long_poll_secs")]
    pub long_poll_secs: u32,
    /// Receives of a message before it moves to the dead-letter queue (2 or more).
    #[serde(default = "default_max_receive_count")]
    pub max_receive_count: u32,
    /// A running job not heard of for this long is checked with DescribeJobs.
    #[serde(default = "default_reconcile_after_secs")]
    pub reconcile_after_secs: u64,
    /// How often the reconciler looks.
    #[serde(default = "default_reconcile_interval_secs")]
    pub reconcile_interval_secs: u64,
    /// A run whose job has waited this long to start (RUNNABLE, for want of
    /// capacity) is flagged by `evalflow status`, with Batch's reason.
    #[serde(default = "default_flag_waiting_after_secs")]
    pub flag_waiting_after_secs: u64,
    /// A command owed this long (a task lost, given up or dead-lettered) is sent again.
    #[serde(default = "default_resend_after_secs")]
    pub resend_after_secs: u64,
    /// Activities one `evalflow worker` carries out at once.
    #[serde(default = "default_worker_concurrency")]
    pub worker_concurrency: usize,
    /// Jobs launching or running at once (Batch queues the rest as RUNNABLE).
    #[serde(default = "default_max_active_jobs")]
    pub max_active_jobs: usize,
    /// Each stage's test set and labels, as S3 URIs.
    #[serde(default)]
    pub stages: BTreeMap<Stage, AwsStage>,
    /// What `evalflow aws bootstrap` creates Batch resources with.
    pub batch: Option<BatchBootstrap>,
}

fn default_tasks_queue() -> String {
    "evalflow-tasks.fifo".into()
}
fn default_events_queue() -> String {
    "evalflow-events".into()
}
fn default_job_definition() -> String {
    "evalflow-submission".into()
}
fn default_visibility_timeout_secs() -> u32 {
    300
}
fn default_long_poll_secs() -> u32 {
    20
}
fn default_max_receive_count() -> u32 {
    5
}
fn default_reconcile_after_secs() -> u64 {
    600
}
fn default_flag_waiting_after_secs() -> u64 {
    1800
}
fn default_reconcile_interval_secs() -> u64 {
    60
}
fn default_resend_after_secs() -> u64 {
    900
}
fn default_worker_concurrency() -> usize {
    4
}
fn default_max_active_jobs() -> usize {
    10_000
}

/// A stage on AWS.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsStage {
    /// The test set's S3 prefix, given to jobs as `EVALFLOW_INPUT_URI`.
    pub test_set: String,
    /// The private labels' S3 URI, read by the scorer only.
    pub labels: String,
}

/// The `[aws.batch]` table: for `evalflow aws bootstrap`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchBootstrap {
    /// The Batch service role's ARN.
    pub service_role: String,
    /// The ECS instance profile's ARN.
    pub instance_role: String,
    /// The role jobs run with (to read their input and write their output), if any.
    #[serde(default)]
    pub job_role: Option<String>,
    /// Subnets of the compute environments: private, without a route to the internet.
    pub subnets: Vec<String>,
    /// Their security groups.
    pub security_group_ids: Vec<String>,
    /// Spot instances (or on-demand).
    #[serde(default = "default_spot")]
    pub spot: bool,
    /// The vCPUs a compute environment may grow to.
    #[serde(default = "default_max_vcpus")]
    pub max_vcpus: i32,
    /// The image of the template job definition (each submission has its own).
    #[serde(default = "default_template_image")]
    pub template_image: String,
    /// Each profile's EC2 instance types (`g4 = ["g4dn.xlarge"]`).
    pub instance_types: BTreeMap<String, Vec<String>>,
}

fn default_spot() -> bool {
    true
}
fn default_max_vcpus() -> i32 {
    256
}
fn default_template_image() -> String {
    "public.ecr.aws/amazonlinux/amazonlinux:2023".into()
}

pub(super) fn check_aws(aws: &AwsConfig, policy: &Policy) -> Result<(), String> {
    if aws.max_receive_count < 2 {
        return Err(
            "max_receive_count must be 2 or more: with 1, a worker's crash sends a task to the dead-letter queue"
                .into(),
        );
    }
    if !(1..=20).contains(&aws.long_poll_secs) {
        return Err("long_poll_secs must be between 1 and 20".into());
    }
    if aws.max_active_jobs == 0 {
        return Err("max_active_jobs = 0 would launch nothing, ever: use 1 or more".into());
    }
    if !(1..=43_200).contains(&aws.visibility_timeout_secs) {
        return Err("visibility_timeout_secs must be between 1 and 43200 (12 hours)".into());
    }
    if aws.job_definition.len() > 60 {
        return Err(format!(
            "job_definition = {:?} is longer than 60 characters: each submission's job definition adds \
             its id (up to 64) to it, and Batch allows 128",
            aws.job_definition
        ));
    }
    if !aws.tasks_queue.ends_with(".fifo") {
        return Err(format!(
            "tasks_queue = {:?} must be a FIFO queue (a name ending in .fifo): one task of a run at a time is \
             what keeps two workers from launching the same job",
            aws.tasks_queue
        ));
    }
    if aws.worker_concurrency == 0 || aws.reconcile_interval_secs == 0 {
        return Err("worker_concurrency and reconcile_interval_secs must be at least 1".into());
    }
    for (stage, files) in &aws.stages {
        for (what, uri) in [("test_set", &files.test_set), ("labels", &files.labels)] {
            if evalflow_activities::aws::s3::S3Location::parse(uri).is_none() {
                return Err(format!("stages.{stage}.{what} = {uri:?} is not an S3 URI (s3://bucket/key)"));
            }
        }
    }
    if let Some(profile) = policy.profiles().iter().find(|p| p.batch_job_queue.is_none()) {
        return Err(format!(
            "profile \"{}\" has no batch_job_queue: AWS Batch needs a job queue per profile",
            profile.name
        ));
    }
    Ok(())
}
