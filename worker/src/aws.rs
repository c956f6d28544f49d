//! The loops of the AWS deployment.
//!
//! Engine side (`evalflow serve`):
//! - [`publish_tasks`]: commands, once their group is durable, to the tasks queue;
//! - [`consume_events`]: events from the events queue, applied with group
//!   commit, and deleted only once applied (a crash before means redelivery,
//!   and a duplicate event changes nothing).
//!
//! Worker side (`evalflow worker`, any number, on any hosts):
//! - [`work`]: long-polls the tasks queue, carries out each command while
//!   extending its message's visibility, sends the answer to the events
//!   queue, then deletes the message.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use evalflow_workflow::{Command, Dispatch};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use evalflow_activities::aws::batch::{BatchRunner, BatchSettings};
use evalflow_activities::aws::classify::STARTED;
use evalflow_activities::aws::logs::BatchLogs;
use evalflow_activities::aws::outputs::{OutputKey, OutputKeyError};
use evalflow_activities::aws::requests::RequestCounter;
use evalflow_activities::aws::s3::{S3Artifacts, S3Location};
use evalflow_activities::aws::{Endpoint, batch_client, s3_client, sdk_config};
use evalflow_activities::backoff::Backoff;
use evalflow_activities::{ArtifactStore, JobRunner};

use crate::activity::{Activities, gave_up};
use crate::config::Config;
use crate::engine_thread::EngineHandle;
use crate::sqs::{
    BATCH_MAX, Carried, QueueError, Queues, Received, heartbeat_interval, job_ended, job_waiting, parse_event_message,
};

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
    /// policy (no disk watch: Batch jobs do not write this machine's disk).
    pub fn activities(&self, config: &Config) -> Arc<Activities> {
        Arc::new(Activities {
            runner: self.runner.clone(),
            artifacts: self.artifacts.clone(),
            policy: config.policy.clone(),
            space: None,
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
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// The first delay after a queue failed.
const BACKOFF_FIRST: Duration = Duration::from_millis(250);

/// Sends the engine's commands to the tasks queue until `shutdown`. A command
/// not sent by then is still owed: the next engine sends it again.
pub async fn publish_tasks(
    queues: Arc<Queues>,
    mut dispatches: mpsc::UnboundedReceiver<Dispatch>,
    shutdown: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            dispatch = dispatches.recv() => match dispatch { Some(d) => d, None => return },
            _ = shutdown.cancelled() => return,
        };
        let mut batch = vec![first];
        while batch.len() < BATCH_MAX {
            let Ok(next) = dispatches.try_recv() else { break };
            batch.push(next);
        }
        tracing::debug!(commands = batch.len(), "sending to the tasks queue");
        let mut backoff = Backoff::new(BACKOFF_FIRST, BACKOFF_MAX);
        while let Err(e) = queues.send_tasks(&batch).await {
            tracing::warn!("cannot send {} commands to the tasks queue, trying again: {e}", batch.len());
            tokio::select! { _ = tokio::time::sleep(backoff.delay()) => {}, _ = shutdown.cancelled() => return }
        }
    }
}

/// Applies the events queue's messages until `shutdown`, deleting each
/// message once what it carries is durable. A failed Batch job's end is read
/// with its log (`logs`); when the log cannot be read now, the message comes
/// back later. A message that is not an event is left alone: after
/// `max_receive_count` receives it moves to the dead-letter queue, where
/// `evalflow status` shows it.
pub async fn consume_events(queues: Arc<Queues>, logs: BatchLogs, engine: EngineHandle, shutdown: CancellationToken) {
    let mut backoff = Backoff::new(BACKOFF_FIRST, BACKOFF_MAX);
    loop {
        let received = tokio::select! {
            received = queues.receive(&queues.events, BATCH_MAX) => received,
            _ = shutdown.cancelled() => return,
        };
        let messages = match received {
            Ok(messages) => messages,
            Err(e) => {
                tracing::warn!("cannot read the events queue: {e}");
                tokio::select! { _ = tokio::time::sleep(backoff.delay()) => {}, _ = shutdown.cancelled() => return }
                continue;
            }
        };
        backoff.reset();
        let mut inputs = Vec::new();
        let mut done = Vec::new();
        for message in messages {
            match parse_event_message(&message.body) {
                Ok(Carried::Inputs(carried)) => {
                    inputs.extend(carried);
                    done.push(message.receipt);
                }
                Ok(Carried::Batch { run, attempt, job, detail }) if detail.waiting() || detail.status == STARTED => {
                    inputs.push(job_waiting(run, attempt, job, &detail));
                    done.push(message.receipt);
                }
                Ok(Carried::Batch { run, attempt, job, detail }) => match logs.ended(&detail).await {
                    Ok(end) => {
                        inputs.extend(end.map(|end| job_ended(run, attempt, job, end)));
                        done.push(message.receipt);
                    }
                    Err(e) => tracing::warn!("job {job}: its end is read again later: {e}"),
                },
                Ok(Carried::Nothing) => done.push(message.receipt),
                Err(e) => {
                    tracing::warn!("events queue: a message that is not an event ({e}): left for the dead-letter queue")
                }
            }
        }
        tracing::debug!(messages = done.len(), inputs = inputs.len(), "applying the events queue's messages");
        if engine.apply(inputs).await.is_err() {
            let _ = queues.release(&queues.events, &done).await;
            return;
        }
        if let Err(e) = queues.delete(&queues.events, &done).await {
            tracing::warn!("cannot delete applied events (they will come again, and change nothing): {e}");
        }
    }
}

/// How a worker works.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerSettings {
    /// Activities at once.
    pub concurrency: usize,
    /// The tasks queue's visibility timeout, in seconds.
    pub visibility_timeout_secs: u32,
    /// Receives before a message moves to the dead-letter queue.
    pub max_receive_count: u32,
    /// How long running activities may finish at shutdown before their
    /// messages are released.
    pub shutdown_grace: Duration,
}

/// Messages being worked on: their receipt, and whether they launch a job.
type InFlight = Arc<Mutex<HashMap<u64, (String, bool)>>>;

/// Carries out the tasks queue's commands until `shutdown`; then gives
/// running activities `shutdown_grace` to finish and releases the messages of
/// those that did not (visibility 0), for another worker. A launch cut short
/// is not released: its job may have reached Batch, and is found by name
/// when the task comes back after its visibility timeout.
pub async fn work(
    activities: Arc<Activities>,
    queues: Arc<Queues>,
    settings: WorkerSettings,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(settings.concurrency.max(1)));
    let in_flight: InFlight = Arc::default();
    let mut tasks = JoinSet::new();
    let mut next_id = 0_u64;
    loop {
        while tasks.try_join_next().is_some() {}
        let free = slots.available_permits();
        if free == 0 {
            tokio::select! { _ = tasks.join_next() => continue, _ = shutdown.cancelled() => break }
        }
        let received = tokio::select! {
            received = queues.receive(&queues.tasks, free.min(BATCH_MAX)) => received,
            _ = shutdown.cancelled() => break,
        };
        let messages = match received {
            Ok(messages) => {
                tracing::debug!(tasks = messages.len(), free, "received from the tasks queue");
                messages
            }
            Err(e) => {
                tracing::warn!("cannot read the tasks queue: {e}");
                tokio::select! { _ = tokio::time::sleep(Duration::from_secs(1)) => continue, _ = shutdown.cancelled() => break }
            }
        };
        for message in messages {
            let dispatch: Dispatch = match serde_json::from_str(&message.body) {
                Ok(dispatch) => dispatch,
                Err(e) => {
                    tracing::warn!(
                        "tasks queue: a message that is not a command ({e}): left for the dead-letter queue"
                    );
                    continue;
                }
            };
            let Ok(slot) = slots.clone().acquire_owned().await else { break };
            next_id += 1;
            let id = next_id;
            let launch = matches!(dispatch.command, Command::LaunchJob { .. });
            lock(&in_flight).insert(id, (message.receipt.clone(), launch));
            let (activities, queues, in_flight) = (activities.clone(), queues.clone(), in_flight.clone());
            tasks.spawn(async move {
                handle(&activities, &queues, settings, dispatch, message).await;
                lock(&in_flight).remove(&id);
                drop(slot);
            });
        }
    }
    let _ = tokio::time::timeout(settings.shutdown_grace, async { while tasks.join_next().await.is_some() {} }).await;
    tasks.abort_all();
    let unfinished: Vec<String> =
        lock(&in_flight).drain().filter(|(_, (_, launch))| !launch).map(|(_, (receipt, _))| receipt).collect();
    if !unfinished.is_empty() {
        tracing::info!("releasing {} unfinished tasks for other workers", unfinished.len());
        if let Err(e) = queues.release(&queues.tasks, &unfinished).await {
            tracing::warn!("cannot release unfinished tasks (they come back after their visibility timeout): {e}");
        }
    }
}

fn lock(in_flight: &InFlight) -> std::sync::MutexGuard<'_, HashMap<u64, (String, bool)>> {
    in_flight.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Carries out one task.
async fn handle(
    activities: &Activities,
    queues: &Queues,
    settings: WorkerSettings,
    dispatch: Dispatch,
    message: Received,
) {
    let visibility = settings.visibility_timeout_secs;
    let heartbeat = async {
        loop {
            tokio::time::sleep(heartbeat_interval(visibility)).await;
            if let Err(e) = queues.hide(&queues.tasks, &message.receipt, u64::from(visibility)).await {
                tracing::warn!("heartbeat of a task failed: {e}");
            }
        }
    };
    let result = tokio::select! { result = activities.execute(&dispatch) => result, () = heartbeat => unreachable!() };
    let (run, kind) = (&dispatch.spec.run, dispatch.command.kind());
    let answer = match result {
        Ok(inputs) => Some(inputs),
        Err(e) if e.is_retryable() && message.receive_count < settings.max_receive_count => {
            // Try again later: after a delay that grows with each receive.
            tracing::warn!(%run, command = kind, "will try again: {e}");
            let delay = 5_u64.saturating_mul(1 << message.receive_count.min(10));
            let _ = queues.hide(&queues.tasks, &message.receipt, delay).await;
            return;
        }
        Err(e) => {
            // Given up: the run fails with a resumable reason; a message that
            // kept failing also goes to the dead-letter queue, to be seen.
            tracing::error!(%run, command = kind, "giving up: {e}");
            let failed = gave_up(&dispatch, &e).into_iter().collect::<Vec<_>>();
            if !failed.is_empty() && queues.send_events(failed).await.is_err() {
                return;
            }
            if e.is_retryable() { None } else { Some(Vec::new()) }
        }
    };
    let Some(inputs) = answer else { return };
    tracing::debug!(%run, command = kind, "done");
    if let Err(e) = queues.send_events(inputs).await {
        tracing::warn!(%run, command = kind, "cannot send the answer, the task will come again: {e}");
        return;
    }
    if let Err(e) = queues.delete(&queues.tasks, &[message.receipt]).await {
        tracing::warn!(%run, command = kind, "cannot delete a done task (doing it again changes nothing): {e}");
    }
}
