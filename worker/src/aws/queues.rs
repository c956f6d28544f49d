//! The queues between the engine and its workers.
//!
//! - The **tasks** queue carries commands (`Dispatch`, JSON), engine to
//!   workers. It is a FIFO queue whose message groups are runs: SQS hands out
//!   one task of a run at a time, so two workers never launch (or score, or
//!   publish) for the same run at once. A command sent twice within five
//!   minutes is deduplicated by SQS.
//! - The **events** queue carries what happened to the engine: workers'
//!   results (`{"inputs": [...]}`) and AWS Batch's EventBridge "Batch Job
//!   State Change" events.
//!
//! Each has a dead-letter queue (`<name>-dlq`) that messages move to after
//! `max_receive_count` receives. All batch calls take at most 10 entries.

use std::time::Duration;

use aws_sdk_sqs::error::{BuildError, ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry, MessageSystemAttributeName,
    QueueAttributeName, SendMessageBatchRequestEntry,
};
use evalflow_activities::aws::describe;
use evalflow_workflow::{Dispatch, Input};
use serde::{Deserialize, Serialize};

use crate::config::AwsConfig;

/// Entries per SQS batch call, at most.
pub const BATCH_MAX: usize = 10;
/// Inputs per events message, at most (well under the 256 KiB message size).
const INPUTS_PER_MESSAGE: usize = 50;

/// A queue operation that failed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct QueueError(String);

fn queue_error<E, R>(what: &str, e: SdkError<E, R>) -> QueueError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    QueueError(format!("{what}: {}", describe(&e)))
}

fn build_error(what: &str, e: BuildError) -> QueueError {
    QueueError(format!("{what}: {e}"))
}

/// A worker's results, as sent to the events queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventMessage {
    /// The events, in order.
    pub inputs: Vec<Input>,
}

/// A message received.
#[derive(Debug, Clone)]
pub struct Received {
    /// Its body.
    pub body: String,
    /// The handle to delete it or change its visibility.
    pub receipt: String,
    /// How many times it has been received, this time included.
    pub receive_count: u32,
}

/// The two queues and their dead-letter queues, by URL.
#[derive(Debug, Clone)]
pub struct Queues {
    client: aws_sdk_sqs::Client,
    /// The tasks queue.
    pub tasks: String,
    /// The events queue.
    pub events: String,
    /// The tasks queue's dead letters.
    pub tasks_dlq: String,
    /// The events queue's dead letters.
    pub events_dlq: String,
    /// How long a receive waits for messages, in seconds.
    long_poll_secs: i32,
}

/// The name of a queue's dead-letter queue (FIFO for a FIFO queue).
pub fn dead_letter_name(queue: &str) -> String {
    match queue.strip_suffix(".fifo") {
        Some(base) => format!("{base}-dlq.fifo"),
        None => format!("{queue}-dlq"),
    }
}

impl Queues {
    /// Finds the queues named in `aws`.
    pub async fn open(client: aws_sdk_sqs::Client, aws: &AwsConfig) -> Result<Queues, QueueError> {
        let url = |name: String| {
            let client = client.clone();
            async move {
                let found = client.get_queue_url().queue_name(&name).send().await.map_err(|e| {
                    QueueError(format!(
                        "queue {name} cannot be found ({}): create it with `evalflow aws bootstrap`",
                        describe(&e)
                    ))
                })?;
                found.queue_url().map(str::to_owned).ok_or_else(|| QueueError(format!("queue {name} has no URL")))
            }
        };
        Ok(Queues {
            tasks: url(aws.tasks_queue.clone()).await?,
            events: url(aws.events_queue.clone()).await?,
            tasks_dlq: url(dead_letter_name(&aws.tasks_queue)).await?,
            events_dlq: url(dead_letter_name(&aws.events_queue)).await?,
            long_poll_secs: i32::try_from(aws.long_poll_secs).unwrap_or(20),
            client,
        })
    }

    /// Sends commands to the tasks queue, each in its run's message group.
    pub async fn send_tasks(&self, dispatches: &[Dispatch]) -> Result<(), QueueError> {
        for chunk in dispatches.chunks(BATCH_MAX) {
            let mut entries = Vec::with_capacity(chunk.len());
            for (index, dispatch) in chunk.iter().enumerate() {
                let body = serde_json::to_string(dispatch).map_err(|e| QueueError(e.to_string()))?;
                let entry = SendMessageBatchRequestEntry::builder()
                    .id(index.to_string())
                    .message_body(body)
                    .message_group_id(dispatch.spec.run.as_str())
                    .message_deduplication_id(deduplication_id(dispatch))
                    .build()
                    .map_err(|e| build_error("SendMessageBatch entry", e))?;
                entries.push(entry);
            }
            self.send_batch(&self.tasks, entries).await?;
        }
        Ok(())
    }

    /// Sends events to the events queue.
    pub async fn send_events(&self, inputs: Vec<Input>) -> Result<(), QueueError> {
        for chunk in inputs.chunks(INPUTS_PER_MESSAGE) {
            let body = serde_json::to_string(&EventMessage { inputs: chunk.to_vec() })
                .map_err(|e| QueueError(e.to_string()))?;
            self.client
                .send_message()
                .queue_url(&self.events)
                .message_body(body)
                .send()
                .await
                .map_err(|e| queue_error("SendMessage to the events queue", e))?;
        }
        Ok(())
    }

    async fn send_batch(&self, queue: &str, entries: Vec<SendMessageBatchRequestEntry>) -> Result<(), QueueError> {
        let sent = self
            .client
            .send_message_batch()
            .queue_url(queue)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|e| queue_error("SendMessageBatch", e))?;
        match sent.failed().first() {
            Some(failed) => Err(QueueError(format!("SendMessageBatch: {:?}", failed.message()))),
            None => Ok(()),
        }
    }

    /// Long-polls `queue` for up to `max` (at most 10) messages.
    pub async fn receive(&self, queue: &str, max: usize) -> Result<Vec<Received>, QueueError> {
        let max = i32::try_from(max.clamp(1, BATCH_MAX)).unwrap_or(1);
        let received = self
            .client
            .receive_message()
            .queue_url(queue)
            .max_number_of_messages(max)
            .wait_time_seconds(self.long_poll_secs)
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .send()
            .await
            .map_err(|e| queue_error("ReceiveMessage", e))?;
        Ok(received
            .messages()
            .iter()
            .filter_map(|m| {
                let count = m
                    .attributes()
                    .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(1);
                Some(Received {
                    body: m.body()?.to_owned(),
                    receipt: m.receipt_handle()?.to_owned(),
                    receive_count: count,
                })
            })
            .collect())
    }

    /// Deletes messages, ten at a time.
    pub async fn delete(&self, queue: &str, receipts: &[String]) -> Result<(), QueueError> {
        for chunk in receipts.chunks(BATCH_MAX) {
            let entries = chunk
                .iter()
                .enumerate()
                .map(|(i, r)| DeleteMessageBatchRequestEntry::builder().id(i.to_string()).receipt_handle(r).build())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| build_error("DeleteMessageBatch entry", e))?;
            self.client
                .delete_message_batch()
                .queue_url(queue)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| queue_error("DeleteMessageBatch", e))?;
        }
        Ok(())
    }

    /// Hides a message for `secs` more seconds (a heartbeat, or a delay before its next try).
    pub async fn hide(&self, queue: &str, receipt: &str, secs: u64) -> Result<(), QueueError> {
        let secs = i32::try_from(secs.min(43_200)).unwrap_or(43_200);
        self.client
            .change_message_visibility()
            .queue_url(queue)
            .receipt_handle(receipt)
            .visibility_timeout(secs)
            .send()
            .await
            .map_err(|e| queue_error("ChangeMessageVisibility", e))?;
        Ok(())
    }

    /// Makes messages visible again at once, for another consumer.
    pub async fn release(&self, queue: &str, receipts: &[String]) -> Result<(), QueueError> {
        for chunk in receipts.chunks(BATCH_MAX) {
            let entries = chunk
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    ChangeMessageVisibilityBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(r)
                        .visibility_timeout(0)
                        .build()
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| build_error("ChangeMessageVisibilityBatch entry", e))?;
            self.client
                .change_message_visibility_batch()
                .queue_url(queue)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| queue_error("ChangeMessageVisibilityBatch", e))?;
        }
        Ok(())
    }

    /// Messages waiting in the tasks and events queues: (tasks, events).
    pub async fn depths(&self) -> Result<(u64, u64), QueueError> {
        Ok((self.depth(&self.tasks).await?, self.depth(&self.events).await?))
    }

    /// Messages waiting in the dead-letter queues: (tasks, events).
    pub async fn dead_letters(&self) -> Result<(u64, u64), QueueError> {
        Ok((self.depth(&self.tasks_dlq).await?, self.depth(&self.events_dlq).await?))
    }

    async fn depth(&self, queue: &str) -> Result<u64, QueueError> {
        let attributes = self
            .client
            .get_queue_attributes()
            .queue_url(queue)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .send()
            .await
            .map_err(|e| queue_error("GetQueueAttributes", e))?;
        Ok(attributes
            .attributes()
            .and_then(|a| a.get(&QueueAttributeName::ApproximateNumberOfMessages))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0))
    }
}

/// One command sent again (a restart, a resend) within SQS's five minutes is
/// delivered once: `<run>.v<version>.<command>.a<attempt>`.
fn deduplication_id(dispatch: &Dispatch) -> String {
    let (run, command) = (&dispatch.spec.run, &dispatch.command);
    format!("{run}.v{}.{}.a{}", dispatch.version, command.kind(), command.attempt())
}

/// Heartbeats for a message being worked on, every third of `visibility`.
pub fn heartbeat_interval(visibility_secs: u32) -> Duration {
    Duration::from_secs(u64::from(visibility_secs / 3).max(1))
}
