//! A Batch job's log, in CloudWatch Logs: the group `/aws/batch/job`, the
//! stream Batch names in the job's `logStreamName`.
//!
//! Batch says of a PyTorch program that died of GPU memory only that it
//! exited 1. So a failed job that Batch's reasons do not explain is read
//! again from the end of its log, with the same signatures as a local job's
//! ([`crate::causes`]): [`BatchLogs::ended`]. `evalflow logs` reads the same
//! tail ([`BatchLogs::tail`]).
//!
//! The log is the submission's words: at most [`TAIL_EVENTS`] events and
//! [`TAIL_BYTES_MAX`] bytes are read, and they are only matched against the
//! table's regular expressions (linear time, whatever the text) or printed as
//! text.

use aws_sdk_cloudwatchlogs::error::ProvideErrorMetadata;
use evalflow_workflow::{Evidence, JobOutcome, JobUsage, Timestamp};

use super::activity_error;
use super::classify::{BatchJob, classify};
use super::requests::RequestCounter;
use crate::ActivityError;
use crate::causes::Signatures;

/// The log group of Batch jobs that log with the `awslogs` driver's defaults.
pub const LOG_GROUP: &str = "/aws/batch/job";
/// The most events read from the end of a stream (one GetLogEvents page).
pub const TAIL_EVENTS: i32 = 500;
/// The most bytes of them kept, the newest.
pub const TAIL_BYTES_MAX: usize = 64 * 1024;
/// How long after a job stopped its last lines may still be on their way
/// to CloudWatch (the awslogs driver sends asynchronously): a log read
/// sooner that shows no cause is read again later.
pub const LOG_SETTLE_MS: i64 = 30_000;
/// How long after a job stopped its log is waited for at most: then the end
/// is judged from what Batch said alone.
pub const LOG_WAIT_MAX_MS: i64 = 15 * 60 * 1000;

/// One event of a log stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// When it was logged, in ms since the epoch.
    pub at_ms: i64,
    /// What was logged (one line of the program's output, usually).
    pub message: String,
}

/// Reads Batch jobs' logs.
#[derive(Debug, Clone)]
pub struct BatchLogs {
    client: aws_sdk_cloudwatchlogs::Client,
    signatures: Signatures,
}

impl BatchLogs {
    /// Logs read with `client`, classified with `signatures`.
    pub fn new(client: aws_sdk_cloudwatchlogs::Client, signatures: Signatures) -> BatchLogs {
        BatchLogs { client, signatures }
    }

    /// Logs read with a client for `sdk`, counting its requests in `requests`.
    pub fn from_sdk(sdk: &aws_config::SdkConfig, requests: &RequestCounter, signatures: Signatures) -> BatchLogs {
        let config = aws_sdk_cloudwatchlogs::config::Builder::from(sdk).interceptor(requests.clone()).build();
        BatchLogs::new(aws_sdk_cloudwatchlogs::Client::from_conf(config), signatures)
    }

    /// The end of `stream`, oldest event first: at most [`TAIL_EVENTS`]
    /// events and [`TAIL_BYTES_MAX`] bytes. A stream that does not exist
    /// (the job never logged) is empty.
    pub async fn tail(&self, stream: &str) -> Result<Vec<LogLine>, ActivityError> {
        let answer = self
            .client
            .get_log_events()
            .log_group_name(LOG_GROUP)
            .log_stream_name(stream)
            .start_from_head(false)
            .limit(TAIL_EVENTS)
            .send()
            .await;
        let page = match answer {
            Ok(page) => page,
            Err(e) if e.code() == Some("ResourceNotFoundException") => return Ok(Vec::new()),
            Err(e) => return Err(activity_error(&format!("GetLogEvents {LOG_GROUP} {stream}"), e)),
        };
        let mut lines: Vec<LogLine> = page
            .events()
            .iter()
            .map(|e| LogLine { at_ms: e.timestamp().unwrap_or(0), message: e.message().unwrap_or_default().to_owned() })
            .collect();
        keep_newest_bytes(&mut lines, TAIL_BYTES_MAX);
        Ok(lines)
    }

    /// How `job` ended, as Batch tells it and, when Batch says only that it
    /// exited non-zero, as the fatal error at the end of its log shows.
    /// `Ok(None)` while it has not ended. An error when its log cannot be
    /// read yet, or may still be missing its last lines: the end is read
    /// again later rather than judged a crash, for at most
    /// [`LOG_WAIT_MAX_MS`] after the job stopped; then, or when the log can
    /// never be read (no permission), Batch's word alone decides.
    pub async fn ended(&self, job: &BatchJob) -> Result<Option<(JobOutcome, JobUsage, Evidence)>, ActivityError> {
        let Some((outcome, usage, evidence)) = classify(job) else { return Ok(None) };
        let (JobOutcome::Crashed { .. }, Some(stream)) = (&outcome, job.log_stream()) else {
            return Ok(Some((outcome, usage, evidence)));
        };
        let since_stop = job.stopped_at().map_or(i64::MAX, |at| Timestamp::now().as_millis() as i64 - at);
        let lines = match self.tail(stream).await {
            Ok(lines) => lines,
            Err(e) if e.is_retryable() && since_stop < LOG_WAIT_MAX_MS => return Err(e),
            Err(e) => {
                tracing::warn!(job = %job.job_name, "judged without its log, which cannot be read: {e}");
                let said = format!("its log cannot be read ({e}): check the engine's logs:GetLogEvents permission");
                return Ok(Some((outcome, usage, evidence.decided("log-unreadable", said))));
            }
        };
        let text: Vec<String> = lines.into_iter().map(|l| l.message).collect();
        Ok(Some(match self.signatures.cause(&text.join("\n")) {
            Some(cause) => {
                let outcome = JobOutcome::OutOfMemory { resource: cause.resource.resource() };
                (outcome, usage, evidence.decided(&cause.rule, cause.line))
            }
            None if since_stop < LOG_SETTLE_MS => {
                return Err(ActivityError::Transient(format!(
                    "{stream} shows no cause yet, {} s after the job stopped: its last lines may still be on their way",
                    since_stop / 1000
                )));
            }
            None => (outcome, usage, evidence),
        }))
    }
}

/// The log stream of Batch job `job`, once it has one.
pub async fn stream_of(batch: &aws_sdk_batch::Client, job: &str) -> Result<Option<String>, ActivityError> {
    let described =
        batch.describe_jobs().jobs(job).send().await.map_err(|e| activity_error(&format!("DescribeJobs {job}"), e))?;
    Ok(described.jobs().first().and_then(|d| BatchJob::from(d).log_stream().map(str::to_owned)))
}

/// Drops the oldest lines until at most `max` bytes of messages are left.
fn keep_newest_bytes(lines: &mut Vec<LogLine>, max: usize) {
    let mut total = 0;
    let keep_from = lines
        .iter()
        .rposition(|line| {
            total += line.message.len();
            total > max
        })
        .map_or(0, |over| over + 1);
    lines.drain(..keep_from);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_bytes_are_kept() {
        let line = |message: &str| LogLine { at_ms: 0, message: message.into() };
        let mut lines = vec![line("aaaa"), line("bbbb"), line("cc")];
        keep_newest_bytes(&mut lines, 6);
        assert_eq!(lines, vec![line("bbbb"), line("cc")]);
        keep_newest_bytes(&mut lines, 1);
        assert!(lines.is_empty(), "a line is kept whole or not at all");
    }
}
