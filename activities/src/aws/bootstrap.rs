//! Creating the S3 buckets and the Batch resources a competition runs on:
//! per profile, a managed compute environment and a job queue; one template
//! job definition. Each is described first and created only if missing, so
//! running it again changes nothing.

use std::time::Duration;

use aws_sdk_batch::types::{
    CeState, CeStatus, ComputeEnvironmentOrder, ComputeResource, CrAllocationStrategy, CrType, JobDefinitionType,
    JqState, ResourceRequirement, ResourceType,
};
use aws_sdk_s3::types::{BucketLocationConstraint, CreateBucketConfiguration};

use super::{activity_error, error_status};
use crate::ActivityError;

/// Polls of a compute environment before giving up on it becoming VALID.
const VALID_POLLS_MAX: usize = 90;
/// Time between two polls.
const VALID_POLL: Duration = Duration::from_secs(2);

/// What bootstrap did to one resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// The kind of resource ("bucket", "job queue" ...).
    pub kind: &'static str,
    /// Its name.
    pub name: String,
    /// Whether it was created now (or already existed).
    pub created: bool,
}

/// A compute environment and job queue for one profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSpec {
    /// The job queue's name; the compute environment is `<queue>-ce`.
    pub queue: String,
    /// The EC2 instance types.
    pub instance_types: Vec<String>,
}

/// What the Batch resources are made with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchSpec {
    /// The Batch service role's ARN.
    pub service_role: String,
    /// The ECS instance profile's ARN.
    pub instance_role: String,
    /// The role jobs run with, if any.
    pub job_role: Option<String>,
    /// Subnets.
    pub subnets: Vec<String>,
    /// Security groups.
    pub security_group_ids: Vec<String>,
    /// Spot or on-demand.
    pub spot: bool,
    /// The most vCPUs of each compute environment.
    pub max_vcpus: i32,
    /// The template job definition's name.
    pub job_definition: String,
    /// Its image.
    pub template_image: String,
    /// One per profile.
    pub queues: Vec<QueueSpec>,
}

/// Creates `bucket` in `region` unless it exists.
pub async fn ensure_bucket(client: &aws_sdk_s3::Client, region: &str, bucket: &str) -> Result<Step, ActivityError> {
    let step = |created| Step { kind: "bucket", name: bucket.to_owned(), created };
    match client.head_bucket().bucket(bucket).send().await {
        Ok(_) => return Ok(step(false)),
        Err(e) if error_status(&e) == Some(404) => {}
        Err(e) => return Err(activity_error(&format!("HeadBucket {bucket}"), e)),
    }
    let mut create = client.create_bucket().bucket(bucket);
    if region != "us-east-1" {
        let constraint = BucketLocationConstraint::from(region);
        create = create
            .create_bucket_configuration(CreateBucketConfiguration::builder().location_constraint(constraint).build());
    }
    create.send().await.map_err(|e| activity_error(&format!("CreateBucket {bucket}"), e))?;
    Ok(step(true))
}

/// Creates the Batch resources of `spec` that are missing.
pub async fn ensure_batch(client: &aws_sdk_batch::Client, spec: &BatchSpec) -> Result<Vec<Step>, ActivityError> {
    let mut steps = Vec::new();
    for queue in &spec.queues {
        let (environment, created) = ensure_environment(client, spec, queue).await?;
        steps.push(Step { kind: "compute environment", name: format!("{}-ce", queue.queue), created });
        steps.push(Step {
            kind: "job queue",
            name: queue.queue.clone(),
            created: ensure_queue(client, queue, &environment).await?,
        });
    }
    steps.push(Step {
        kind: "job definition",
        name: spec.job_definition.clone(),
        created: ensure_definition(client, spec).await?,
    });
    Ok(steps)
}

/// The compute environment's ARN, once VALID, and whether it was created now.
async fn ensure_environment(
    client: &aws_sdk_batch::Client,
    spec: &BatchSpec,
    queue: &QueueSpec,
) -> Result<(String, bool), ActivityError> {
    let name = format!("{}-ce", queue.queue);
    let described = client
        .describe_compute_environments()
        .compute_environments(&name)
        .send()
        .await
        .map_err(|e| activity_error(&format!("DescribeComputeEnvironments {name}"), e))?;
    let mut created = false;
    if described.compute_environments().is_empty() {
        let (kind, strategy) = if spec.spot {
            (CrType::Spot, CrAllocationStrategy::SpotCapacityOptimized)
        } else {
            (CrType::Ec2, CrAllocationStrategy::BestFitProgressive)
        };
        let resources = ComputeResource::builder()
            .r#type(kind)
            .allocation_strategy(strategy)
            .minv_cpus(0)
            .maxv_cpus(spec.max_vcpus)
            .set_instance_types(Some(queue.instance_types.clone()))
            .set_subnets(Some(spec.subnets.clone()))
            .set_security_group_ids(Some(spec.security_group_ids.clone()))
            .instance_role(&spec.instance_role)
            .build();
        client
            .create_compute_environment()
            .compute_environment_name(&name)
            .r#type(aws_sdk_batch::types::CeType::Managed)
            .state(CeState::Enabled)
            .compute_resources(resources)
            .service_role(&spec.service_role)
            .send()
            .await
            .map_err(|e| activity_error(&format!("CreateComputeEnvironment {name}"), e))?;
        created = true;
    }
    for _ in 0..VALID_POLLS_MAX {
        let described = client
            .describe_compute_environments()
            .compute_environments(&name)
            .send()
            .await
            .map_err(|e| activity_error(&format!("DescribeComputeEnvironments {name}"), e))?;
        let Some(environment) = described.compute_environments().first() else { break };
        match environment.status() {
            Some(CeStatus::Valid) => {
                return Ok((environment.compute_environment_arn().unwrap_or_default().to_owned(), created));
            }
            Some(CeStatus::Invalid) => {
                let why = environment.status_reason().unwrap_or("no reason given");
                return Err(ActivityError::Permanent(format!("compute environment {name} is INVALID: {why}")));
            }
            _ => tokio::time::sleep(VALID_POLL).await,
        }
    }
    Err(ActivityError::Transient(format!("compute environment {name} did not become VALID in time")))
}

async fn ensure_queue(
    client: &aws_sdk_batch::Client,
    queue: &QueueSpec,
    environment: &str,
) -> Result<bool, ActivityError> {
    let name = &queue.queue;
    let described = client
        .describe_job_queues()
        .job_queues(name)
        .send()
        .await
        .map_err(|e| activity_error(&format!("DescribeJobQueues {name}"), e))?;
    if !described.job_queues().is_empty() {
        return Ok(false);
    }
    client
        .create_job_queue()
        .job_queue_name(name)
        .state(JqState::Enabled)
        .priority(1)
        .compute_environment_order(ComputeEnvironmentOrder::builder().order(1).compute_environment(environment).build())
        .send()
        .await
        .map_err(|e| activity_error(&format!("CreateJobQueue {name}"), e))?;
    Ok(true)
}

async fn ensure_definition(client: &aws_sdk_batch::Client, spec: &BatchSpec) -> Result<bool, ActivityError> {
    let name = &spec.job_definition;
    let described = client
        .describe_job_definitions()
        .job_definition_name(name)
        .status("ACTIVE")
        .send()
        .await
        .map_err(|e| activity_error(&format!("DescribeJobDefinitions {name}"), e))?;
    if !described.job_definitions().is_empty() {
        return Ok(false);
    }
    let requirement = |kind, value: &str| ResourceRequirement::builder().r#type(kind).value(value).build();
    let properties = aws_sdk_batch::types::ContainerProperties::builder()
        .image(&spec.template_image)
        .set_job_role_arn(spec.job_role.clone())
        .resource_requirements(requirement(ResourceType::Vcpu, "1"))
        .resource_requirements(requirement(ResourceType::Memory, "2048"))
        .build();
    client
        .register_job_definition()
        .job_definition_name(name)
        .r#type(JobDefinitionType::Container)
        .container_properties(properties)
        .send()
        .await
        .map_err(|e| activity_error(&format!("RegisterJobDefinition {name}"), e))?;
    Ok(true)
}
