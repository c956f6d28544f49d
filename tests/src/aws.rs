//! A competition on AWS for tests: its `evalflow.toml` points at moto, and
//! every resource name carries a prefix of its own.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;
use evalflow_activities::JobRunner;
use evalflow_activities::aws::outputs::OutputKey;
use evalflow_activities::scoring::log_loss;
use evalflow_worker::aws::queues::Queues;
use evalflow_worker::aws::{WorkerSettings, connect, work};
use evalflow_worker::config::Config;
use evalflow_worker::datadir::lock::{LockState, try_lock};
use evalflow_worker::node::{Mode, Node, NodeOptions};
use evalflow_workflow::{Attempt, RunId};
use tokio_util::sync::CancellationToken;

use crate::cli::Cli;
use crate::moto::{Moto, unique_prefix};

/// A competition on (moto's) AWS.
pub struct AwsCompetition {
    /// The CLI on its data directory.
    pub cli: Cli,
    /// The prefix of its resources.
    pub prefix: String,
    /// The moto server.
    pub moto: Moto,
    /// Its labels: test file -> FAKE.
    pub labels: BTreeMap<String, bool>,
}

/// How a test tunes the competition.
pub struct Tuning {
    /// `visibility_timeout_secs`.
    pub visibility_timeout_secs: u32,
    /// `reconcile_after_secs` (large: the test delivers job ends itself).
    pub reconcile_after_secs: u64,
    /// `resend_after_secs`.
    pub resend_after_secs: u64,
}

/// An engine node and one worker loop in this process, on the real SQS and
/// S3 plumbing, with a scripted job runner in place of AWS Batch.
pub struct Fleet {
    /// The engine's node.
    pub node: Node,
    /// The queues.
    pub queues: Arc<Queues>,
    stop: CancellationToken,
    worker: tokio::task::JoinHandle<()>,
}

impl Fleet {
    /// Stops the worker, then the engine.
    pub async fn stop(self) {
        self.stop.cancel();
        self.worker.await.unwrap_or_else(|e| panic!("the worker loop: {e}"));
        self.node.shutdown().await.unwrap_or_else(|e| panic!("the engine: {e}"));
    }
}

impl AwsCompetition {
    /// Starts an engine and a worker on the competition (bootstrapped), with `runner` for Batch.
    pub async fn fleet(&self, runner: Arc<dyn JobRunner>) -> Fleet {
        let config = Config::load(&self.cli.data_dir).unwrap_or_else(|e| panic!("{e}"));
        let LockState::Acquired(lock) = try_lock(&config.data_dir).unwrap_or_else(|e| panic!("{e}")) else {
            panic!("the data directory is locked")
        };
        let options = NodeOptions {
            isolation: evalflow_activities::local::sandbox::Isolation::Sandbox,
            supervisor: Vec::new(),
            mode: Mode::Engine,
            runner: Some(runner.clone()),
        };
        let node = Node::start(config.clone(), lock, options).await.unwrap_or_else(|e| panic!("{e}"));
        let parts = connect(&config, Some(runner)).await.unwrap_or_else(|e| panic!("{e}"));
        let queues = parts.queues.clone();
        let activities = parts.activities(&config);
        let settings = WorkerSettings {
            concurrency: 4,
            visibility_timeout_secs: 10,
            max_receive_count: 5,
            shutdown_grace: Duration::from_secs(5),
        };
        let stop = CancellationToken::new();
        let worker = tokio::spawn(work(activities, queues.clone(), settings, stop.clone()));
        Fleet { node, queues, stop, worker }
    }

    /// Writes the competition's `evalflow.toml` in `dir`.
    pub async fn create(dir: &Path, test: &str, tuning: Tuning) -> AwsCompetition {
        let moto = Moto::shared().await;
        let prefix = unique_prefix(test);
        let (service_role, instance_role) = moto.roles(&prefix).await;
        let (subnet, group) = moto.network().await;
        let config = format!(
            r#"[competition]
name = "{prefix}"

[policy]
time_limit_secs = 3600
[policy.retry]
backoff_base_secs = 1
backoff_max_secs = 2
[[policy.profile]]
name = "g4"
host_memory_mib = 15000
gpu_memory_mib = 15360
vcpus = 4
price_per_hour_usd = 0.526
relative_speed = 0.45
batch_job_queue = "{prefix}-g4"
[[policy.profile]]
name = "p3"
host_memory_mib = 60000
gpu_memory_mib = 16384
vcpus = 8
price_per_hour_usd = 3.06
batch_job_queue = "{prefix}-p3"

[aws]
region = "us-east-1"
endpoint_url = "{url}"
bucket = "{prefix}-artifacts"
tasks_queue = "{prefix}-tasks.fifo"
events_queue = "{prefix}-events"
job_definition = "{prefix}-submission"
visibility_timeout_secs = {visibility}
max_receive_count = 5
# moto's FIFO long poll does not see a message group unlock until it ends.
long_poll_secs = 1
reconcile_after_secs = {reconcile}
reconcile_interval_secs = 1
resend_after_secs = {resend}
worker_concurrency = 4

[aws.stages.public]
test_set = "s3://{prefix}-artifacts/test/public/"
labels = "s3://{prefix}-labels/public/labels.csv"

[aws.batch]
service_role = "{service_role}"
instance_role = "{instance_role}"
subnets = ["{subnet}"]
security_group_ids = ["{group}"]
instance_types = {{ g4 = ["g4dn.xlarge"], p3 = ["g4dn.2xlarge"] }}
"#,
            url = moto.url,
            visibility = tuning.visibility_timeout_secs,
            reconcile = tuning.reconcile_after_secs,
            resend = tuning.resend_after_secs,
        );
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(dir.join("evalflow.toml"), config).unwrap_or_else(|e| panic!("{e}"));
        let labels = (0..40).map(|i| (format!("v{i:02}.mp4"), i % 3 == 0)).collect();
        AwsCompetition { cli: Cli::new(dir), prefix, moto, labels }
    }

    /// Uploads the labels (after bootstrap made the bucket).
    pub async fn upload_labels(&self) {
        let body: String = std::iter::once("filename,label\n".to_owned())
            .chain(self.labels.iter().map(|(f, fake)| format!("{f},{}\n", u8::from(*fake))))
            .collect();
        self.moto
            .s3()
            .await
            .put_object()
            .bucket(format!("{}-labels", self.prefix))
            .key("public/labels.csv")
            .body(ByteStream::from(body.into_bytes()))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e:?}"));
    }

    /// The competition's output key (made now if the engine has not yet).
    pub fn output_key(&self) -> OutputKey {
        let config = Config::load(&self.cli.data_dir).unwrap_or_else(|e| panic!("{e}"));
        OutputKey::load_or_create(&config.output_key_file()).unwrap_or_else(|e| panic!("{e}")).0
    }

    /// The key of `submission.csv` the job of `run`'s `attempt` is told to write.
    pub fn predictions_key(&self, run: &str, attempt: u32) -> String {
        let run = RunId::parse(run).unwrap_or_else(|e| panic!("{e}"));
        format!("{}submission.csv", self.output_key().prefix(&run, Attempt(attempt)))
    }

    /// Writes `body` at `key` of the competition's bucket.
    pub async fn put(&self, key: &str, body: Vec<u8>) {
        self.moto
            .s3()
            .await
            .put_object()
            .bucket(format!("{}-artifacts", self.prefix))
            .key(key)
            .body(ByteStream::from(body))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e:?}"));
    }

    /// Writes what the job of `run`'s `attempt` would have written: a
    /// prediction of `skill` (0: 0.5 everywhere; 1: the labels exactly).
    /// Returns its log loss.
    pub async fn stage_predictions(&self, run: &str, attempt: u32, skill: f64) -> f64 {
        let rows: Vec<(String, f64, bool)> = self
            .labels
            .iter()
            .map(|(file, fake)| (file.clone(), 0.5 + if *fake { skill / 2.0 } else { -skill / 2.0 }, *fake))
            .collect();
        let body: String = std::iter::once("filename,label\n".to_owned())
            .chain(rows.iter().map(|(file, p, _)| format!("{file},{p}\n")))
            .collect();
        self.put(&self.predictions_key(run, attempt), body.into_bytes()).await;
        log_loss(rows.iter().map(|(_, p, fake)| (*p, *fake)))
    }

    /// Every job on the competition's job queues: (job name, job id).
    pub async fn jobs(&self) -> Vec<(String, String)> {
        let batch = self.moto.batch().await;
        let mut jobs = Vec::new();
        for queue in ["g4", "p3"] {
            for status in ["SUBMITTED", "PENDING", "RUNNABLE", "STARTING", "RUNNING", "SUCCEEDED", "FAILED"] {
                let listed = batch
                    .list_jobs()
                    .job_queue(format!("{}-{queue}", self.prefix))
                    .job_status(aws_sdk_batch::types::JobStatus::from(status))
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("{e:?}"));
                jobs.extend(
                    listed.job_summary_list().iter().map(|j| {
                        (j.job_name().unwrap_or_default().to_owned(), j.job_id().unwrap_or_default().to_owned())
                    }),
                );
            }
        }
        jobs.sort();
        jobs
    }
}
