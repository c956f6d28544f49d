//! The moto server the test command starts on loopback, and what the AWS
//! tests need from it: clients, IAM roles, a subnet and a security group.

use std::time::{SystemTime, UNIX_EPOCH};

use aws_config::{BehaviorVersion, Region, SdkConfig};

/// moto on loopback.
#[derive(Debug, Clone)]
pub struct Moto {
    /// Its URL.
    pub url: String,
}

const REGION: &str = "us-east-1";

/// A unique prefix for one test's resources (tests share the server).
pub fn unique_prefix(test: &str) -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    format!("ef{test}{}{nanos:x}", std::process::id())
}

/// A signature moto accepts (it does not check them).
fn authorization(service: &str) -> String {
    format!(
        "AWS4-HMAC-SHA256 Credential=test/20261124/{REGION}/{service}/aws4_request, SignedHeaders=host, Signature=0"
    )
}

impl Moto {
    /// The server of `EVALFLOW_MOTO_URL`, in Batch's simple mode (no Docker:
    /// jobs succeed at once).
    pub async fn shared() -> Moto {
        let url = std::env::var("EVALFLOW_MOTO_URL").unwrap_or_else(|_| {
            panic!(
                "EVALFLOW_MOTO_URL is not set: run the suite with scripts/test, which starts moto, or start \
                 `.venv/bin/moto_server -p PORT` and set EVALFLOW_MOTO_URL=http://127.0.0.1:PORT"
            )
        });
        // The SDK's default credentials chain reads these; moto takes any.
        for (key, value) in [("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test")] {
            if std::env::var(key).is_err() {
                panic!("set {key}={value} for the AWS tests (scripts/test does)");
            }
        }
        let moto = Moto { url };
        let response = reqwest::Client::new()
            .post(format!("{}/moto-api/config", moto.url))
            .body(r#"{"batch": {"use_docker": false}}"#)
            .send()
            .await
            .unwrap_or_else(|e| panic!("moto does not answer at {}: {e}", moto.url));
        assert!(response.status().is_success());
        moto
    }

    /// The SDK configuration for moto.
    pub async fn sdk(&self) -> SdkConfig {
        aws_config::defaults(BehaviorVersion::latest()).region(Region::new(REGION)).endpoint_url(&self.url).load().await
    }

    /// An S3 client.
    pub async fn s3(&self) -> aws_sdk_s3::Client {
        let sdk = self.sdk().await;
        aws_sdk_s3::Client::from_conf(aws_sdk_s3::config::Builder::from(&sdk).force_path_style(true).build())
    }

    /// An AWS Batch client.
    pub async fn batch(&self) -> aws_sdk_batch::Client {
        aws_sdk_batch::Client::new(&self.sdk().await)
    }

    /// A CloudWatch Logs client.
    pub async fn logs(&self) -> aws_sdk_cloudwatchlogs::Client {
        aws_sdk_cloudwatchlogs::Client::new(&self.sdk().await)
    }

    /// Writes `lines` to the log stream `stream` of Batch's log group, as a
    /// job's container would have (the group and stream are made if missing).
    pub async fn put_job_log(&self, stream: &str, lines: &[&str]) {
        let logs = self.logs().await;
        let group = evalflow_activities::aws::logs::LOG_GROUP;
        // Tests share the server: the group may be there already.
        let _ = logs.create_log_group().log_group_name(group).send().await;
        logs.create_log_stream()
            .log_group_name(group)
            .log_stream_name(stream)
            .send()
            .await
            .unwrap_or_else(|e| panic!("CreateLogStream {stream}: {e:?}"));
        let start = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        for (chunk_index, chunk) in lines.chunks(5000).enumerate() {
            let events = chunk.iter().enumerate().map(|(i, line)| {
                let at = start + (chunk_index * 5000 + i) as i64;
                aws_sdk_cloudwatchlogs::types::InputLogEvent::builder().timestamp(at).message(*line).build().unwrap()
            });
            logs.put_log_events()
                .log_group_name(group)
                .log_stream_name(stream)
                .set_log_events(Some(events.collect()))
                .send()
                .await
                .unwrap_or_else(|e| panic!("PutLogEvents {stream}: {e:?}"));
        }
    }

    /// An SQS client.
    pub async fn sqs(&self) -> aws_sdk_sqs::Client {
        aws_sdk_sqs::Client::new(&self.sdk().await)
    }

    async fn query(&self, service: &str, form: &[(&str, &str)]) -> String {
        let response = reqwest::Client::new()
            .post(&self.url)
            .header("Authorization", authorization(service))
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(form.iter().map(|(k, v)| format!("{k}={}", urlencode(v))).collect::<Vec<_>>().join("&"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("moto does not answer: {e}"));
        response.text().await.unwrap_or_default()
    }

    /// The Batch service role and ECS instance profile of `prefix`: (role ARN, profile ARN).
    pub async fn roles(&self, prefix: &str) -> (String, String) {
        let role = format!("{prefix}-batch");
        let policy = r#"{"Version":"2012-10-17","Statement":[]}"#;
        let form = [
            ("Action", "CreateRole"),
            ("Version", "2010-05-08"),
            ("RoleName", role.as_str()),
            ("AssumeRolePolicyDocument", policy),
        ];
        self.query("iam", &form).await;
        let profile = format!("{prefix}-ecs");
        let form =
            [("Action", "CreateInstanceProfile"), ("Version", "2010-05-08"), ("InstanceProfileName", profile.as_str())];
        self.query("iam", &form).await;
        (
            format!("arn:aws:iam::123456789012:role/{role}"),
            format!("arn:aws:iam::123456789012:instance-profile/{profile}"),
        )
    }

    /// A subnet and a security group of moto's default VPC.
    pub async fn network(&self) -> (String, String) {
        let subnets = self.query("ec2", &[("Action", "DescribeSubnets"), ("Version", "2016-11-15")]).await;
        let groups = self.query("ec2", &[("Action", "DescribeSecurityGroups"), ("Version", "2016-11-15")]).await;
        (first_element(&subnets, "subnetId"), first_element(&groups, "groupId"))
    }
}

fn first_element(xml: &str, tag: &str) -> String {
    let open = format!("<{tag}>");
    let start = xml.find(&open).map(|i| i + open.len()).unwrap_or_else(|| panic!("no <{tag}> in {xml}"));
    xml[start..].split('<').next().unwrap_or_default().to_owned()
}

fn urlencode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
