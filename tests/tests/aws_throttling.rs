//! A throttled AWS Batch (HTTP 429, TooManyRequestsException) is retried
//! with backoff until it answers: a local server that throttles the first
//! call of each operation stands in for Batch.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use evalflow_activities::aws::batch::{BatchRunner, BatchSettings};
use evalflow_activities::aws::logs::BatchLogs;
use evalflow_activities::aws::outputs::OutputKey;
use evalflow_activities::aws::requests::RequestCounter;
use evalflow_activities::aws::{Endpoint, sdk_config};
use evalflow_activities::causes::Signatures;
use evalflow_activities::{JobRunner, LaunchRequest};
use evalflow_workflow::{Attempt, Policy, RunSpec, Stage, SubmissionId, SubmissionSource, TeamId, Timestamp};

/// Calls per path so far; each operation is throttled on its first call.
type Calls = Arc<Mutex<HashMap<String, u32>>>;

async fn batch(calls: Calls, path: &str) -> axum::response::Response {
    let seen = {
        let mut calls = calls.lock().unwrap();
        let n = calls.entry(path.to_owned()).or_default();
        *n += 1;
        *n
    };
    if seen == 1 {
        let mut headers = HeaderMap::new();
        headers.insert("x-amzn-ErrorType", "TooManyRequestsException".parse().unwrap());
        return (StatusCode::TOO_MANY_REQUESTS, headers, r#"{"message":"Too Many Requests"}"#).into_response();
    }
    let body = match path {
        "listjobs" => r#"{"jobSummaryList":[]}"#,
        "describejobdefinitions" => {
            r#"{"jobDefinitions":[{"jobDefinitionName":"ef-s1","revision":1,"status":"ACTIVE","type":"container",
            "jobDefinitionArn":"arn:aws:batch:us-east-1:123456789012:job-definition/ef-s1:1",
            "containerProperties":{"image":"registry.example/s1:1"}}]}"#
        }
        "submitjob" => {
            r#"{"jobName":"ef-s1-public-a1","jobId":"job-1","jobArn":"arn:aws:batch:us-east-1:123456789012:job/job-1"}"#
        }
        other => panic!("unexpected Batch call {other}"),
    };
    (StatusCode::OK, body).into_response()
}

#[tokio::test]
async fn throttled_batch_calls_are_retried_until_they_succeed() {
    let calls = Calls::default();
    let routes = ["listjobs", "describejobdefinitions", "submitjob"];
    let mut app = Router::new();
    for route in routes {
        let calls = calls.clone();
        app = app.route(&format!("/v1/{route}"), post(move || batch(calls.clone(), route)));
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let sdk = sdk_config(&Endpoint { region: "us-east-1".into(), url: Some(url) }).await;
    let requests = RequestCounter::default();
    let keys = tempfile::tempdir().unwrap();
    let settings = BatchSettings {
        job_definition_template: "template".into(),
        inputs: [(Stage::Public, "s3://bucket/test/public/".to_owned())].into(),
        output_bucket: "bucket".into(),
        queues: vec!["q-g4".into()],
        output_key: OutputKey::load_or_create(&keys.path().join("output.key")).unwrap().0,
    };
    let logs = BatchLogs::from_sdk(&sdk, &requests, Signatures::new(&[]).unwrap());
    let runner = BatchRunner::from_sdk(&sdk, &requests, logs, settings);
    let policy = Policy::from_toml(
        "time_limit_secs = 600\n[[profile]]\nname = \"g4\"\nhost_memory_mib = 1000\ngpu_memory_mib = 1000\n\
         vcpus = 4\nprice_per_hour_usd = 0.5\nbatch_job_queue = \"q-g4\"\n",
    )
    .unwrap();
    let request = LaunchRequest {
        spec: RunSpec::new(
            SubmissionId::new("s1").unwrap(),
            TeamId::new("t").unwrap(),
            Stage::Public,
            false,
            SubmissionSource::Image { uri: "registry.example/s1:1".into() },
            Timestamp(0),
        ),
        attempt: Attempt(1),
        profile: policy.profiles()[0].clone(),
        time_limit_secs: 600,
    };
    let job = runner.launch(&request).await.unwrap();
    assert_eq!(job.as_str(), "job-1");
    let counts = requests.snapshot();
    for operation in ["Batch.ListJobs", "Batch.DescribeJobDefinitions", "Batch.SubmitJob"] {
        assert_eq!(counts.get(operation), Some(&2), "{operation}: throttled once, then answered: {counts:?}");
    }
}
