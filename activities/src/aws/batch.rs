//! The AWS Batch job runner.
//!
//! - A job is named `ef-<run>-a<attempt>`. SubmitJob has no idempotency
//!   token, so a launch first looks the name up (ListJobs, filter JOB_NAME)
//!   on the profile's job queue and adopts the job it finds.
//! - Batch cannot override a job's image at submission, so each submission
//!   gets its own job definition, `<template>-<submission>`: the bootstrap's
//!   template with the submission's image, registered once.
//! - A job learns where to write from `EVALFLOW_OUTPUT_URI`, a location
//!   derived with the output key ([`super::outputs`]): no other job can guess it.
//! - Jobs are submitted with the profile's vCPUs, memory and GPU, the
//!   competition's time limit as the attempt timeout, tags (run, attempt,
//!   profile) and no Batch retry strategy: evalflow owns retries.
//! - Termination uses TerminateJob; checking uses DescribeJobs, at most
//!   [`DESCRIBE_JOBS_MAX`] ids a call.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_batch::types::{
    ContainerOverrides, JobDefinitionType, JobTimeout, KeyValuePair, KeyValuesPair, ResourceRequirement, ResourceType,
};
use evalflow_workflow::{
    Attempt, Detail, Evidence, JobId, JobOutcome, JobUsage, Profile, RunId, Stage, SubmissionId, SubmissionSource,
};
use evalflow_workflow::{Timestamp, job_name};

use aws_config::retry::RetryConfig;

use super::classify::{BatchJob, STARTED, UNPLACEABLE_REASON};
use super::logs::BatchLogs;
use super::outputs::OutputKey;
use super::{activity_error, error_code, error_status};
use crate::backoff::Backoff;
use crate::submission::GPU_OOM_EXIT_CODE;
use crate::{ActivityError, Checked, EndedJob, JobRunner, LaunchRequest, RunningJob, WaitingJob};

/// The most job ids one DescribeJobs call takes.
pub const DESCRIBE_JOBS_MAX: usize = 100;
/// The shortest attempt timeout Batch accepts, in seconds.
pub const TIMEOUT_MIN_SECS: u64 = 60;
/// Jobs of one name a termination by name stops, at most.
const JOBS_PER_NAME_MAX: usize = 10;
/// Pages of a listing read at most.
const PAGES_MAX: usize = 20;
/// Tries of one SubmitJob, throttled or failing, before the activity fails (to be retried).
const SUBMIT_TRIES_MAX: usize = 6;
/// The first backoff after a failed SubmitJob; it doubles each time.
const SUBMIT_BACKOFF: Duration = Duration::from_millis(200);
/// The longest backoff between two SubmitJobs.
const SUBMIT_BACKOFF_MAX: Duration = Duration::from_secs(10);
/// The reason given to TerminateJob.
pub const TERMINATE_REASON: &str = "evalflow: cancelled";

/// Where the Batch runner puts things.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchSettings {
    /// The job definition whose revisions are copied for each submission.
    pub job_definition_template: String,
    /// Each stage's test set, as an S3 URI the job reads.
    pub inputs: BTreeMap<Stage, String>,
    /// The bucket jobs write their predictions to.
    pub output_bucket: String,
    /// The job queues of the ladder, to find a job by name when its queue is unknown.
    pub queues: Vec<String>,
    /// What each attempt's output location is derived with.
    pub output_key: OutputKey,
}

/// Runs jobs on AWS Batch.
#[derive(Debug, Clone)]
pub struct BatchRunner {
    client: aws_sdk_batch::Client,
    logs: BatchLogs,
    settings: Arc<BatchSettings>,
}

impl BatchRunner {
    /// A runner with `client`, reading failed jobs' logs with `logs`.
    pub fn new(client: aws_sdk_batch::Client, logs: BatchLogs, settings: BatchSettings) -> BatchRunner {
        BatchRunner { client, logs, settings: Arc::new(settings) }
    }

    /// A runner with a client for `sdk`, counting its requests in `requests`.
    pub fn from_sdk(
        sdk: &aws_config::SdkConfig,
        requests: &super::requests::RequestCounter,
        logs: BatchLogs,
        settings: BatchSettings,
    ) -> BatchRunner {
        BatchRunner::new(super::batch_client(sdk, requests), logs, settings)
    }

    /// The id of the newest job named `name` on `queue`, if any.
    pub async fn find(&self, queue: &str, name: &str) -> Result<Option<String>, ActivityError> {
        Ok(self.find_all(queue, name, 1).await?.into_iter().next())
    }

    /// The ids of the jobs named `name` on `queue`, newest first, at most `max`.
    pub async fn find_all(&self, queue: &str, name: &str, max: usize) -> Result<Vec<String>, ActivityError> {
        let mut found = Vec::new();
        let mut token = None;
        for _ in 0..PAGES_MAX {
            let page = self
                .client
                .list_jobs()
                .job_queue(queue)
                .filters(KeyValuesPair::builder().name("JOB_NAME").values(name).build())
                .set_next_token(token)
                .send()
                .await
                .map_err(|e| activity_error(&format!("ListJobs {name} on {queue}"), e))?;
            // The filter is case-insensitive and `*` matches prefixes: keep exact names.
            let exact = page.job_summary_list().iter().filter(|j| j.job_name() == Some(name));
            found.extend(exact.filter_map(|j| j.job_id().map(str::to_owned)));
            token = page.next_token().map(str::to_owned);
            if token.is_none() || found.len() >= max {
                break;
            }
        }
        found.truncate(max);
        Ok(found)
    }

    /// The ARN of the job definition of `submission` with `image`,
    /// registered from the template if it does not exist yet. Its name starts
    /// with the template's, so competitions sharing an account do not mix.
    async fn definition(&self, submission: &SubmissionId, image: &str) -> Result<String, ActivityError> {
        let name = format!("{}-{submission}", self.settings.job_definition_template);
        let mine = self
            .client
            .describe_job_definitions()
            .job_definition_name(&name)
            .status("ACTIVE")
            .send()
            .await
            .map_err(|e| activity_error(&format!("DescribeJobDefinitions {name}"), e))?;
        let same_image =
            mine.job_definitions().iter().find(|d| d.container_properties().and_then(|c| c.image()) == Some(image));
        if let Some(arn) = same_image.and_then(|d| d.job_definition_arn()) {
            return Ok(arn.to_owned());
        }
        let template_name = &self.settings.job_definition_template;
        let templates = self
            .client
            .describe_job_definitions()
            .job_definition_name(template_name)
            .status("ACTIVE")
            .send()
            .await
            .map_err(|e| activity_error(&format!("DescribeJobDefinitions {template_name}"), e))?;
        let template = templates.job_definitions().iter().max_by_key(|d| d.revision()).ok_or_else(|| {
            ActivityError::Permanent(format!(
                "job definition {template_name} does not exist: create it with `evalflow aws bootstrap`"
            ))
        })?;
        let mut properties = template
            .container_properties()
            .cloned()
            .unwrap_or_else(|| aws_sdk_batch::types::ContainerProperties::builder().build());
        properties.image = Some(image.to_owned());
        let registered = self
            .client
            .register_job_definition()
            .job_definition_name(&name)
            .r#type(JobDefinitionType::Container)
            .container_properties(properties)
            .set_platform_capabilities(Some(template.platform_capabilities().to_vec()))
            .tags("evalflow-submission", submission.as_str())
            .send()
            .await
            .map_err(|e| activity_error(&format!("RegisterJobDefinition {name}"), e))?;
        registered
            .job_definition_arn()
            .map(str::to_owned)
            .ok_or_else(|| ActivityError::Transient(format!("RegisterJobDefinition {name} returned no ARN")))
    }

    fn overrides(&self, request: &LaunchRequest, output_bucket: &str) -> Result<ContainerOverrides, ActivityError> {
        let spec = &request.spec;
        let input = self.settings.inputs.get(&spec.stage).ok_or_else(|| {
            ActivityError::Permanent(format!("no [aws.stages.{}] test_set is configured in evalflow.toml", spec.stage))
        })?;
        let output = format!("s3://{output_bucket}/{}", self.settings.output_key.prefix(&spec.run, request.attempt));
        let profile = &request.profile;
        let env = [
            ("EVALFLOW_INPUT_URI", input.clone()),
            ("EVALFLOW_OUTPUT_URI", output),
            ("EVALFLOW_RUN", spec.run.to_string()),
            ("EVALFLOW_ATTEMPT", request.attempt.to_string()),
            ("EVALFLOW_PROFILE", profile.name.to_string()),
            ("EVALFLOW_GPU_OOM_EXIT_CODE", GPU_OOM_EXIT_CODE.to_string()),
        ];
        let requirement = |kind, value: String| ResourceRequirement::builder().r#type(kind).value(value).build();
        let mut requirements = vec![
            requirement(ResourceType::Vcpu, profile.vcpus.to_string()),
            requirement(ResourceType::Memory, profile.host_memory_mib.to_string()),
        ];
        if !profile.cpu_only {
            requirements.push(requirement(ResourceType::Gpu, "1".into()));
        }
        Ok(ContainerOverrides::builder()
            .set_environment(Some(
                env.into_iter().map(|(k, v)| KeyValuePair::builder().name(k).value(v).build()).collect(),
            ))
            .set_resource_requirements(Some(requirements))
            .build())
    }

    /// Submits the job once, or adopts it. The SDK must not retry SubmitJob
    /// blindly: a retry after a timeout whose request went through makes a
    /// second job. Throttling (nothing was done) is retried after a jittered
    /// backoff; any other failure looks the name up before submitting again.
    async fn submit(&self, request: &LaunchRequest, queue: &str, name: &str) -> Result<String, ActivityError> {
        let spec = &request.spec;
        let SubmissionSource::Image { uri } = &spec.source else {
            return Err(ActivityError::InvalidSubmission(format!(
                "run {}: AWS Batch runs container images; submit it with --image",
                spec.run
            )));
        };
        let definition = self.definition(&spec.submission, uri).await?;
        let overrides = self.overrides(request, &self.settings.output_bucket)?;
        let timeout = i32::try_from(request.time_limit_secs.max(TIMEOUT_MIN_SECS)).unwrap_or(i32::MAX);
        let tags = HashMap::from([
            ("run".to_owned(), spec.run.to_string()),
            ("attempt".to_owned(), request.attempt.to_string()),
            ("profile".to_owned(), request.profile.name.to_string()),
        ]);
        let mut backoff = Backoff::new(SUBMIT_BACKOFF, SUBMIT_BACKOFF_MAX);
        for _ in 0..SUBMIT_TRIES_MAX {
            let submitted = self
                .client
                .submit_job()
                .job_name(name)
                .job_queue(queue)
                .job_definition(&definition)
                .container_overrides(overrides.clone())
                .timeout(JobTimeout::builder().attempt_duration_seconds(timeout).build())
                .set_tags(Some(tags.clone()))
                .propagate_tags(true)
                .customize()
                .config_override(aws_sdk_batch::config::Config::builder().retry_config(RetryConfig::disabled()))
                .send()
                .await;
            let error = match submitted {
                Ok(done) => {
                    let id = done.job_id().map(str::to_owned);
                    return id.ok_or_else(|| ActivityError::Transient(format!("SubmitJob {name} returned no job id")));
                }
                Err(e) => e,
            };
            let throttled = matches!(error_code(&error), Some("TooManyRequestsException" | "ThrottlingException"))
                || error_status(&error) == Some(429);
            match activity_error(&format!("SubmitJob {name}"), error) {
                ActivityError::Transient(why) if !throttled => {
                    tracing::warn!("{why}: looking the job up before submitting again");
                }
                ActivityError::Transient(_) => {}
                permanent => return Err(permanent),
            }
            tokio::time::sleep(jittered(backoff.delay())).await;
            if !throttled && let Some(existing) = self.find(queue, name).await? {
                return Ok(existing);
            }
        }
        Err(ActivityError::Transient(format!("SubmitJob {name}: AWS Batch kept throttling or failing")))
    }
}

/// A delay between half of `base` and `base`: jitter spreads the workers that
/// a throttle stopped at the same moment.
fn jittered(base: Duration) -> Duration {
    let noise = std::collections::hash_map::RandomState::new().build_hasher().finish();
    let millis = u64::try_from(base.as_millis()).unwrap_or(u64::MAX).max(2);
    Duration::from_millis(millis / 2 + noise % (millis / 2))
}

fn queue_of(profile: &Profile) -> Result<&str, ActivityError> {
    profile.batch_job_queue.as_deref().ok_or_else(|| {
        ActivityError::Permanent(format!(
            "profile {} has no batch_job_queue in evalflow.toml: AWS Batch needs one per profile",
            profile.name
        ))
    })
}

fn job_id(id: String) -> Result<JobId, ActivityError> {
    JobId::new(id).map_err(|e| ActivityError::Permanent(e.to_string()))
}

#[async_trait]
impl JobRunner for BatchRunner {
    async fn launch(&self, request: &LaunchRequest) -> Result<JobId, ActivityError> {
        let queue = queue_of(&request.profile)?;
        let name = job_name(&request.spec.run, request.attempt);
        if let Some(existing) = self.find(queue, &name).await? {
            return job_id(existing); // launched before: adopt it
        }
        job_id(self.submit(request, queue, &name).await?)
    }

    async fn terminate(&self, run: &RunId, attempt: Attempt, job: Option<&JobId>) -> Result<(), ActivityError> {
        let ids = match job {
            Some(job) => vec![job.to_string()],
            None => {
                // Every job of that name: a raced launch may have made two.
                let name = job_name(run, attempt);
                let mut found = Vec::new();
                for queue in &self.settings.queues {
                    found.extend(self.find_all(queue, &name, JOBS_PER_NAME_MAX).await?);
                }
                found
            }
        };
        for id in ids {
            self.client
                .terminate_job()
                .job_id(&id)
                .reason(TERMINATE_REASON)
                .send()
                .await
                .map_err(|e| activity_error(&format!("TerminateJob {id}"), e))?;
        }
        Ok(())
    }

    async fn check(&self, jobs: &[RunningJob]) -> Result<Checked, ActivityError> {
        let mut checked = Checked::default();
        for chunk in jobs.chunks(DESCRIBE_JOBS_MAX) {
            let ids: Vec<String> = chunk.iter().map(|j| j.job.to_string()).collect();
            let described = self
                .client
                .describe_jobs()
                .set_jobs(Some(ids))
                .send()
                .await
                .map_err(|e| activity_error("DescribeJobs", e))?;
            let details: HashMap<&str, BatchJob> =
                described.jobs().iter().filter_map(|d| Some((d.job_id()?, BatchJob::from(d)))).collect();
            for job in chunk {
                let Some(detail) = details.get(job.job.as_str()) else {
                    // Batch forgets jobs some days after they end; one it never knew is lost.
                    let (outcome, usage, evidence) = lost(job);
                    checked.ended.push(EndedJob { job: job.clone(), outcome, usage, evidence });
                    continue;
                };
                if let Some(reason) = detail.misconfigured() {
                    match self.unplaceable(job, reason).await {
                        Ok(ended) => checked.ended.push(ended),
                        Err(e) => tracing::warn!("job {} can never be placed, and cannot be stopped: {e}", job.job),
                    }
                    continue;
                }
                if detail.waiting() || detail.status == STARTED {
                    let (status, reason) = (detail.status.clone(), detail.waiting_reason().map(str::to_owned));
                    checked.waiting.push(WaitingJob { job: job.clone(), status, reason });
                    continue;
                }
                match self.logs.ended(detail).await {
                    Ok(Some((outcome, usage, evidence))) => {
                        checked.ended.push(EndedJob { job: job.clone(), outcome, usage, evidence });
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!("job {}: its end is read again later: {e}", job.job),
                }
            }
        }
        Ok(checked)
    }
}

impl BatchRunner {
    /// Stops a job no compute environment can ever place, and reports it as
    /// one that could not start, with Batch's reason.
    async fn unplaceable(&self, job: &RunningJob, reason: &str) -> Result<EndedJob, ActivityError> {
        self.client
            .terminate_job()
            .job_id(job.job.as_str())
            .reason(UNPLACEABLE_REASON)
            .send()
            .await
            .map_err(|e| activity_error(&format!("TerminateJob {}", job.job), e))?;
        let said = format!("AWS Batch cannot place it: {reason}");
        Ok(EndedJob {
            job: job.clone(),
            outcome: JobOutcome::CannotStart { detail: Detail::new(&said) },
            usage: JobUsage { started_at: None, ended_at: Timestamp::now(), peak_memory_mib: None },
            evidence: Evidence {
                status_reason: Some(Detail::new(reason)),
                ..Evidence::default().decided("batch:MISCONFIGURATION", said)
            },
        })
    }
}

fn lost(job: &RunningJob) -> (JobOutcome, JobUsage, Evidence) {
    let said = format!("AWS Batch does not know job {} any more", job.job);
    let evidence = Evidence::default().decided("batch-forgot-the-job", said.clone());
    (
        JobOutcome::Interrupted { detail: Detail::new(said) },
        JobUsage { started_at: None, ended_at: Timestamp::now(), peak_memory_mib: None },
        evidence,
    )
}
