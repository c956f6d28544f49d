//! `evalflow aws bootstrap`: creates, if missing, what a competition runs on:
//! the tasks and events queues with their dead-letter queues and redrive
//! policies, the buckets, and per profile a Batch compute environment and job
//! queue, plus the template job definition; and the output key in the data
//! directory ([`OutputKey`]), to be copied to each worker. Running it again
//! changes nothing. It creates no IAM roles or policies: the operator does,
//! from `deploy/aws/`.

use std::collections::{BTreeSet, HashMap};

use aws_sdk_sqs::types::QueueAttributeName;
use evalflow_activities::ActivityError;
use evalflow_activities::aws::bootstrap::{BatchSpec, QueueSpec, Step, ensure_batch, ensure_bucket};
use evalflow_activities::aws::outputs::{OutputKey, OutputKeyError};
use evalflow_activities::aws::requests::RequestCounter;
use evalflow_activities::aws::s3::S3Location;
use evalflow_activities::aws::{Endpoint, batch_client, s3_client, sdk_config};

use crate::aws::queues::dead_letter_name;
use crate::config::Config;

/// Messages are kept this long (the most SQS allows: 14 days), in seconds.
const RETENTION_SECS: u32 = 1_209_600;

/// Why bootstrap stopped.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// The configuration lacks what bootstrap needs.
    #[error("evalflow.toml: {0}")]
    Config(String),
    /// An AWS call failed.
    #[error(transparent)]
    Aws(#[from] ActivityError),
    /// The output key cannot be made or read.
    #[error(transparent)]
    OutputKey(#[from] OutputKeyError),
}

/// Creates what is missing; returns what it found and what it made.
pub async fn bootstrap(config: &Config) -> Result<Vec<Step>, BootstrapError> {
    let aws =
        config.aws.as_ref().ok_or_else(|| BootstrapError::Config("there is no [aws] table to bootstrap".into()))?;
    let batch = aws.batch.as_ref().ok_or_else(|| {
        BootstrapError::Config(
            "[aws.batch] is missing: bootstrap needs the service role, instance role, subnets, security groups \
             and each profile's instance types"
                .into(),
        )
    })?;
    if batch.subnets.is_empty() || batch.security_group_ids.is_empty() {
        return Err(BootstrapError::Config(
            "[aws.batch] needs at least one subnet and one security group for the compute environments".into(),
        ));
    }
    let key_file = config.output_key_file();
    let (_, created) = OutputKey::load_or_create(&key_file)?;
    let mut steps = vec![Step { kind: "output key", name: key_file.display().to_string(), created }];
    let sdk = sdk_config(&Endpoint { region: aws.region.clone(), url: aws.endpoint_url.clone() }).await;
    let requests = RequestCounter::default();
    let sqs = aws_sdk_sqs::Client::new(&sdk);
    for queue in [&aws.tasks_queue, &aws.events_queue] {
        steps.extend(ensure_queue_pair(&sqs, queue, aws.visibility_timeout_secs, aws.max_receive_count).await?);
    }
    let mut buckets = BTreeSet::from([aws.bucket.clone()]);
    for files in aws.stages.values() {
        buckets.extend(
            [&files.test_set, &files.labels].into_iter().filter_map(|uri| S3Location::parse(uri)).map(|l| l.bucket),
        );
    }
    let s3 = s3_client(&sdk, &requests);
    for bucket in &buckets {
        steps.push(ensure_bucket(&s3, &aws.region, bucket).await?);
    }
    let mut queues: Vec<QueueSpec> = Vec::new();
    for profile in config.policy.profiles() {
        let Some(queue) = &profile.batch_job_queue else { continue };
        if queues.iter().any(|q| &q.queue == queue) {
            continue;
        }
        let instance_types = batch.instance_types.get(profile.name.as_str()).cloned().ok_or_else(|| {
            BootstrapError::Config(format!("[aws.batch.instance_types] has no entry for profile {}", profile.name))
        })?;
        queues.push(QueueSpec { queue: queue.clone(), instance_types });
    }
    let spec = BatchSpec {
        service_role: batch.service_role.clone(),
        instance_role: batch.instance_role.clone(),
        job_role: batch.job_role.clone(),
        subnets: batch.subnets.clone(),
        security_group_ids: batch.security_group_ids.clone(),
        spot: batch.spot,
        max_vcpus: batch.max_vcpus,
        job_definition: aws.job_definition.clone(),
        template_image: batch.template_image.clone(),
        queues,
    };
    steps.extend(ensure_batch(&batch_client(&sdk, &requests), &spec).await?);
    Ok(steps)
}

fn sqs_error<E, R>(what: &str, e: aws_sdk_sqs::error::SdkError<E, R>) -> ActivityError
where
    E: aws_sdk_sqs::error::ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    ActivityError::Permanent(format!("{what}: {}", evalflow_activities::aws::describe(&e)))
}

/// A queue and its dead-letter queue, with the redrive policy between them.
async fn ensure_queue_pair(
    client: &aws_sdk_sqs::Client,
    name: &str,
    visibility: u32,
    receives: u32,
) -> Result<Vec<Step>, ActivityError> {
    let dlq_name = dead_letter_name(name);
    let retention = HashMap::from([(QueueAttributeName::MessageRetentionPeriod, RETENTION_SECS.to_string())]);
    let (dlq, dlq_created) = ensure_queue(client, &dlq_name, retention.clone()).await?;
    let arn = client
        .get_queue_attributes()
        .queue_url(&dlq)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .map_err(|e| sqs_error(&format!("GetQueueAttributes {dlq_name}"), e))?
        .attributes()
        .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
        .ok_or_else(|| ActivityError::Permanent(format!("queue {dlq_name} has no ARN")))?;
    let redrive = serde_json::json!({ "deadLetterTargetArn": arn, "maxReceiveCount": receives.to_string() });
    let mut attributes = retention;
    attributes.insert(QueueAttributeName::RedrivePolicy, redrive.to_string());
    attributes.insert(QueueAttributeName::VisibilityTimeout, visibility.to_string());
    let (_, created) = ensure_queue(client, name, attributes).await?;
    Ok(vec![
        Step { kind: "queue", name: dlq_name, created: dlq_created },
        Step { kind: "queue", name: name.to_owned(), created },
    ])
}

/// The queue's URL, and whether it was created now. An existing queue gets
/// `attributes` (the same ones again change nothing).
async fn ensure_queue(
    client: &aws_sdk_sqs::Client,
    name: &str,
    attributes: HashMap<QueueAttributeName, String>,
) -> Result<(String, bool), ActivityError> {
    if let Ok(found) = client.get_queue_url().queue_name(name).send().await
        && let Some(url) = found.queue_url()
    {
        client
            .set_queue_attributes()
            .queue_url(url)
            .set_attributes(Some(attributes))
            .send()
            .await
            .map_err(|e| sqs_error(&format!("SetQueueAttributes {name}"), e))?;
        return Ok((url.to_owned(), false));
    }
    let mut attributes = attributes;
    if name.ends_with(".fifo") {
        // Only at creation: a queue cannot become FIFO later.
        attributes.insert(QueueAttributeName::FifoQueue, "true".into());
    }
    let created = client
        .create_queue()
        .queue_name(name)
        .set_attributes(Some(attributes))
        .send()
        .await
        .map_err(|e| sqs_error(&format!("CreateQueue {name}"), e))?;
    let url =
        created.queue_url().ok_or_else(|| ActivityError::Permanent(format!("CreateQueue {name} returned no URL")))?;
    Ok((url.to_owned(), true))
}
