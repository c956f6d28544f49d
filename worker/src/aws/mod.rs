//! The AWS deployment: the engine on one host (`evalflow serve`), any number
//! of workers on others (`evalflow worker`), AWS Batch running the jobs, S3
//! keeping what they read and write, and two SQS queues between the engine
//! and the workers ([`queues`]).
//!
//! Engine side:
//! - [`publish_tasks`]: commands, once their group is durable, to the tasks queue;
//! - [`consume_events`]: events from the events queue, applied with group
//!   commit, and deleted only once applied (a crash before means redelivery,
//!   and a duplicate event changes nothing).
//!
//! Worker side: [`work`] carries out the tasks queue's commands.
//!
//! [`bootstrap`] makes what a competition runs on.

pub mod bootstrap;
mod events;
pub mod queues;
mod tasks;
mod worker;

use std::sync::Arc;
use std::time::Duration;

use evalflow_activities::aws::batch::{BatchRunner, BatchSettings};
use evalflow_activities::aws::logs::BatchLogs;
use evalflow_activities::aws::outputs::{OutputKey, OutputKeyError};
use evalflow_activities::aws::requests::RequestCounter;
use evalflow_activities::aws::s3::{S3Artifacts, S3Location};
use evalflow_activities::aws::{Endpoint, batch_client, s3_client, sdk_config};
use evalflow_activities::{ArtifactStore, JobRunner};

pub use events::consume_events;
use queues::{QueueError, Queues};
pub use tasks::publish_tasks;
pub use worker::{WorkerSettings, work};

use crate::config::Config;
use crate::engine::activity::Activities;

/// What the AWS deployment acts with, for the engine and for the workers.
pub struct AwsParts {
    /// AWS Batch (or, in tests, a scripted runner).
    pub runner: Arc<dyn JobRunner>,
    /// S3.
    pub artifacts: Arc<dyn ArtifactStore>,
    /// SQS.
    pub queues: Arc<Queues>,
    /// CloudWatch Logs, where Batch jobs' logs are.
    pub logs: BatchLogs,
    /// The AWS requests made so far.
    pub requests: RequestCounter,
}

impl AwsParts {
    /// What a worker carries out commands with: Batch and S3 under `config`'s
    /// policy.
    pub fn activities(&self, config: &Config) -> Arc<Activities> {
        Arc::new(Activities {
            runner: self.runner.clone(),
            artifacts: self.artifacts.clone(),
            policy: config.policy.clone(),
        })
    }
}

/// Connects to the AWS deployment `config` describes, as its engine (or a
/// command acting on the engine's data directory): the output key is made if
/// there is none yet. `runner` replaces AWS Batch, for tests that script job
/// outcomes.
pub async fn connect(config: &Config, runner: Option<Arc<dyn JobRunner>>) -> Result<AwsParts, ConnectError> {
    let (output_key, created) = OutputKey::load_or_create(&config.output_key_file())?;
    if created {
        tracing::info!("made the output key {}: copy it to every worker", config.output_key_file().display());
    }
    connect_with(config, runner, output_key).await
}

/// Connects to the AWS deployment `config` describes, as a worker: the output
/// key must be there already (a key of its own would send jobs' predictions
/// where no other worker looks).
pub async fn connect_worker(config: &Config) -> Result<AwsParts, ConnectError> {
    connect_with(config, None, OutputKey::load(&config.output_key_file())?).await
}

async fn connect_with(
    config: &Config,
    runner: Option<Arc<dyn JobRunner>>,
    output_key: OutputKey,
) -> Result<AwsParts, ConnectError> {
    let aws = config.aws.as_ref().ok_or(ConnectError::NotAws)?;
    let sdk = sdk_config(&Endpoint { region: aws.region.clone(), url: aws.endpoint_url.clone() }).await;
    let requests = RequestCounter::default();
    let logs = BatchLogs::from_sdk(&sdk, &requests, config.signatures());
    let runner = match runner {
        Some(runner) => runner,
        None => {
            let mut queues: Vec<String> =
                config.policy.profiles().iter().filter_map(|p| p.batch_job_queue.clone()).collect();
            queues.dedup();
            let settings = BatchSettings {
                job_definition_template: aws.job_definition.clone(),
                inputs: aws.stages.iter().map(|(stage, files)| (*stage, files.test_set.clone())).collect(),
                output_bucket: aws.bucket.clone(),
                queues,
                output_key: output_key.clone(),
            };
            Arc::new(BatchRunner::from_sdk(&sdk, &requests, logs.clone(), settings))
        }
    };
    let labels =
        aws.stages.iter().filter_map(|(stage, files)| Some((*stage, S3Location::parse(&files.labels)?))).collect();
    let artifacts = Arc::new(S3Artifacts::new(s3_client(&sdk, &requests), aws.bucket.clone(), labels, output_key));
    let sqs = aws_sdk_sqs::config::Builder::from(&sdk).interceptor(requests.clone()).build();
    let queues = Arc::new(Queues::open(aws_sdk_sqs::Client::from_conf(sqs), aws).await?);
    Ok(AwsParts { runner, artifacts, queues, logs, requests })
}

/// What `evalflow logs` reads a Batch job's log with: CloudWatch Logs, and
/// Batch to find a running job's stream.
pub async fn log_readers(config: &Config) -> Result<(BatchLogs, aws_sdk_batch::Client), ConnectError> {
    let aws = config.aws.as_ref().ok_or(ConnectError::NotAws)?;
    let sdk = sdk_config(&Endpoint { region: aws.region.clone(), url: aws.endpoint_url.clone() }).await;
    let requests = RequestCounter::default();
    Ok((BatchLogs::from_sdk(&sdk, &requests, config.signatures()), batch_client(&sdk, &requests)))
}

/// Why the AWS deployment cannot be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The configuration has no `[aws]` table.
    #[error("evalflow.toml has no [aws] table: this competition runs on this machine (evalflow serve), not on AWS")]
    NotAws,
    /// The output key cannot be had.
    #[error(transparent)]
    OutputKey(#[from] OutputKeyError),
    /// The queues cannot be found.
    #[error(transparent)]
    Queue(#[from] QueueError),
}

/// The longest wait between two tries of a failing queue call.
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// The first delay after a queue failed.
pub(crate) const BACKOFF_FIRST: Duration = Duration::from_millis(250);
