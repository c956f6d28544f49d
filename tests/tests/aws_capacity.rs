//! The reconciler's look at jobs that have not started: one waiting for
//! capacity is reported as waiting, with Batch's reason; one that no compute
//! environment can ever place (`MISCONFIGURATION:...`) is stopped and ends as
//! unable to start, instead of waiting for ever. moto starts every job at
//! once, so a local server answering DescribeJobs with recorded Batch JSON
//! stands in for Batch here.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use evalflow_activities::aws::batch::{BatchRunner, BatchSettings};
use evalflow_activities::aws::logs::BatchLogs;
use evalflow_activities::aws::outputs::OutputKey;
use evalflow_activities::aws::requests::RequestCounter;
use evalflow_activities::aws::{Endpoint, sdk_config};
use evalflow_activities::causes::Signatures;
use evalflow_activities::{JobRunner, RunningJob};
use evalflow_workflow::{Attempt, JobId, JobOutcome, RunId, Stage, Timestamp};

const CAPACITY: &str =
    "CAPACITY:INSUFFICIENT_INSTANCE_CAPACITY - Service cannot fulfill the capacity requested for instance type g4dn";
const NEVER: &str = "MISCONFIGURATION:JOB_RESOURCE_REQUIREMENT - The job resource requirement (vCPU/memory/GPU) is \
                     higher than that can be met by the CE(s) attached to the job queue.";

/// DescribeJobs as Batch answers it for three jobs, as recorded.
fn described() -> String {
    let job = |id: &str, status: &str, reason: &str| {
        serde_json::json!({
            "jobId": id, "jobName": format!("ef-{id}-public-a1"), "status": status, "statusReason": reason,
            "jobQueue": "arn:aws:batch:us-east-1:123456789012:job-queue/q-g4", "createdAt": 1_795_000_000_000_i64,
            "jobDefinition": "arn:aws:batch:us-east-1:123456789012:job-definition/ef-x:1", "attempts": [],
            "container": { "image": "registry.example/x:1", "vcpus": 4 }
        })
    };
    serde_json::json!({ "jobs": [
        job("waits", "RUNNABLE", CAPACITY),
        job("never", "RUNNABLE", NEVER),
        job("starts", "STARTING", ""),
    ]})
    .to_string()
}

#[tokio::test]
async fn a_job_short_of_capacity_waits_and_one_that_can_never_be_placed_fails() {
    let terminated = Arc::new(Mutex::new(Vec::<String>::new()));
    let recorded = terminated.clone();
    // The first TerminateJob is refused, as with an engine role that may not call it.
    let app = Router::new().route("/v1/describejobs", post(|| async { described() })).route(
        "/v1/terminatejob",
        post(move |body: String| async move {
            let mut calls = recorded.lock().unwrap();
            calls.push(body);
            if calls.len() == 1 {
                let denied = [("x-amzn-ErrorType", "AccessDeniedException")];
                return (StatusCode::FORBIDDEN, denied, r#"{"message":"not authorized"}"#).into_response();
            }
            (StatusCode::OK, "{}").into_response()
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let sdk = sdk_config(&Endpoint { region: "us-east-1".into(), url: Some(url) }).await;
    let requests = RequestCounter::default();
    let keys = tempfile::tempdir().unwrap();
    let settings = BatchSettings {
        job_definition_template: "template".into(),
        inputs: Default::default(),
        output_bucket: "bucket".into(),
        queues: vec!["q-g4".into()],
        output_key: OutputKey::load_or_create(&keys.path().join("output.key")).unwrap().0,
    };
    let logs = BatchLogs::from_sdk(&sdk, &requests, Signatures::new(&[]).unwrap());
    let runner = BatchRunner::from_sdk(&sdk, &requests, logs, settings);
    let running = |id: &str| RunningJob {
        run: RunId::parse(&format!("{id}-public")).unwrap(),
        stage: Stage::Public,
        attempt: Attempt(1),
        job: JobId::new(id).unwrap(),
        since: Timestamp::now(),
    };
    let jobs = [running("waits"), running("never"), running("starts")];
    let refused = runner.check(&jobs).await.unwrap();
    assert!(refused.ended.is_empty(), "not stopped, so not ended: {refused:?}");
    assert_eq!(refused.waiting.len(), 2, "and the other jobs' checks go on: {refused:?}");
    let checked = runner.check(&jobs).await.unwrap();

    let waiting: Vec<(&str, &str, Option<&str>)> =
        checked.waiting.iter().map(|w| (w.job.job.as_str(), w.status.as_str(), w.reason.as_deref())).collect();
    assert_eq!(waiting, [("waits", "RUNNABLE", Some(CAPACITY)), ("starts", "STARTING", None)]);
    assert!(checked.waiting.iter().all(|w| w.job.job.as_str() != "never"));
    let [never] = checked.ended.as_slice() else { panic!("one job ended: {:?}", checked.ended) };
    assert_eq!(never.job.job.as_str(), "never");
    let JobOutcome::CannotStart { detail } = &never.outcome else { panic!("{:?}", never.outcome) };
    assert_eq!(detail.as_str(), format!("AWS Batch cannot place it: {NEVER}"));
    assert_eq!(never.evidence.rule.as_ref().map(|r| r.as_str()), Some("batch:MISCONFIGURATION"));
    let terminated = terminated.lock().unwrap().clone();
    assert_eq!(terminated.len(), 2, "the unplaceable job is stopped, the second time: {terminated:?}");
    assert!(terminated[1].contains("\"jobId\":\"never\""), "{terminated:?}");
}
