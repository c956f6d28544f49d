//! The engine's side of the events queue: what a message carries (a
//! worker's results, or an EventBridge "Batch Job State Change" event), and
//! the loop that applies them.

use std::sync::Arc;

use evalflow_activities::aws::classify::{BatchEvent, BatchJob, JOB_STATE_CHANGE, STARTED};
use evalflow_activities::aws::logs::BatchLogs;
use evalflow_activities::backoff::Backoff;
use evalflow_workflow::{
    Attempt, Detail, Envelope, Event, Evidence, Input, JobId, JobOutcome, JobUsage, RunId, parse_job_name,
};
use tokio_util::sync::CancellationToken;

use super::queues::{BATCH_MAX, EventMessage, Queues};
use super::{BACKOFF_FIRST, BACKOFF_MAX};
use crate::engine::EngineHandle;

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
        let (mut inputs, mut done) = (Vec::new(), Vec::new());
        for message in messages {
            if let Some(read) = read(&message.body, &logs).await {
                inputs.extend(read);
                done.push(message.receipt);
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

/// The inputs a message's `body` makes, or `None` to leave the message in
/// the queue: a job's end whose log cannot be read now (it comes back
/// later), or a body that is not an event (it ends in the dead-letter queue).
async fn read(body: &str, logs: &BatchLogs) -> Option<Vec<Input>> {
    match parse_event_message(body) {
        Ok(Carried::Inputs(inputs)) => Some(inputs),
        Ok(Carried::Batch { run, attempt, job, detail }) if detail.waiting() || detail.status == STARTED => {
            Some(vec![job_waiting(run, attempt, job, &detail)])
        }
        Ok(Carried::Batch { run, attempt, job, detail }) => match logs.ended(&detail).await {
            Ok(end) => Some(end.map(|end| job_ended(run, attempt, job, end)).into_iter().collect()),
            Err(e) => {
                tracing::warn!("job {job}: its end is read again later: {e}");
                None
            }
        },
        Ok(Carried::Nothing) => Some(Vec::new()),
        Err(e) => {
            tracing::warn!("events queue: a message that is not an event ({e}): left for the dead-letter queue");
            None
        }
    }
}

/// What an events-queue message carries.
#[derive(Debug, Clone, PartialEq)]
pub enum Carried {
    /// A worker's results.
    Inputs(Vec<Input>),
    /// A state change of one of evalflow's Batch jobs: whether and how it
    /// ended is read from it, and from its log ([`BatchLogs::ended`]).
    ///
    /// [`BatchLogs::ended`]: evalflow_activities::aws::logs::BatchLogs::ended
    Batch {
        /// The run.
        run: RunId,
        /// The attempt.
        attempt: Attempt,
        /// The job.
        job: JobId,
        /// What Batch said of it.
        detail: Box<BatchJob>,
    },
    /// Nothing of evalflow's: another event of Batch, another service's job.
    Nothing,
}

/// What an events-queue message carries: a worker's results, or a state
/// change of one of evalflow's Batch jobs. An unreadable body is an error.
pub fn parse_event_message(body: &str) -> Result<Carried, String> {
    let value: serde_json::Value = serde_json::from_str(body).map_err(|e| format!("not JSON: {e}"))?;
    if value.get("detail-type").is_none() {
        let message: EventMessage = serde_json::from_value(value).map_err(|e| format!("not an event message: {e}"))?;
        return Ok(Carried::Inputs(message.inputs));
    }
    let event: BatchEvent = serde_json::from_value(value).map_err(|e| format!("not a Batch event: {e}"))?;
    if event.detail_type != JOB_STATE_CHANGE {
        return Ok(Carried::Nothing);
    }
    let Some((run, attempt)) = parse_job_name(&event.detail.job_name) else { return Ok(Carried::Nothing) };
    let job = JobId::new(event.detail.job_id.clone()).map_err(|e| e.to_string())?;
    Ok(Carried::Batch { run, attempt, job, detail: Box::new(event.detail) })
}

/// The input a job that has not started makes: its status and Batch's reason.
fn job_waiting(run: RunId, attempt: Attempt, job: JobId, detail: &BatchJob) -> Input {
    let event = Event::JobWaiting {
        attempt,
        job,
        status: Detail::new(&detail.status),
        reason: detail.waiting_reason().map(Detail::new),
    };
    Input::Event { run, envelope: Envelope::unfenced(event) }
}

/// The input a job's end makes.
fn job_ended(run: RunId, attempt: Attempt, job: JobId, end: (JobOutcome, JobUsage, Evidence)) -> Input {
    let (outcome, usage, evidence) = end;
    Input::Event { run, envelope: Envelope::unfenced(Event::JobEnded { attempt, job, outcome, usage, evidence }) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use evalflow_activities::aws::classify::classify;
    use evalflow_workflow::{JobOutcome, Resource};

    #[test]
    fn events_queue_messages_parse() {
        let run = RunId::parse("good-public").unwrap();
        let input = Input::Event {
            run: run.clone(),
            envelope: Envelope::answering(Event::Published { attempt: Attempt(1) }, 5),
        };
        let body = serde_json::to_string(&EventMessage { inputs: vec![input.clone()] }).unwrap();
        assert_eq!(parse_event_message(&body).unwrap(), Carried::Inputs(vec![input]));

        let batch = r#"{"version":"0","detail-type":"Batch Job State Change","source":"aws.batch",
            "detail":{"jobName":"ef-good-public-a2","jobId":"j-9","status":"FAILED","newField":1,
            "statusReason":"Essential container in task exited",
            "attempts":[{"container":{"exitCode":137,"reason":"OutOfMemoryError: Container killed due to memory usage"},
            "startedAt":1000,"stoppedAt":5000}]}}"#;
        let carried = parse_event_message(batch).unwrap();
        let Carried::Batch { run: got, attempt: Attempt(2), job, detail } = carried else { panic!("{carried:?}") };
        assert_eq!((got, job.as_str()), (run, "j-9"));
        let (outcome, _, evidence) = classify(&detail).unwrap();
        assert_eq!(outcome, JobOutcome::OutOfMemory { resource: Resource::HostMemory });
        assert_eq!(evidence.rule.unwrap().as_str(), "batch:OutOfMemoryError");
        let running = batch.replace("FAILED", "RUNNING");
        let Carried::Batch { detail, .. } = parse_event_message(&running).unwrap() else { panic!("not a job") };
        assert_eq!(classify(&detail), None, "a job starting is not an end");
        let foreign = batch.replace("ef-good-public-a2", "nightly-etl");
        assert_eq!(parse_event_message(&foreign).unwrap(), Carried::Nothing, "not one of evalflow's jobs");
        assert!(parse_event_message("{\"hello\":1}").is_err());
        assert!(parse_event_message("poison").is_err());
    }
}
