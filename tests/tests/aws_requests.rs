//! How AWS Batch requests grow with the number of running jobs: the
//! reconciler's check is one DescribeJobs per 100 jobs, against moto.

use evalflow_activities::JobRunner;
use evalflow_activities::RunningJob;
use evalflow_activities::aws::batch::{BatchRunner, BatchSettings, DESCRIBE_JOBS_MAX};
use evalflow_activities::aws::logs::BatchLogs;
use evalflow_activities::aws::requests::RequestCounter;
use evalflow_activities::causes::Signatures;
use evalflow_tests::aws::{AwsCompetition, Tuning};
use evalflow_workflow::{Attempt, JobId, RunId, Stage, Timestamp, job_name};

#[tokio::test]
async fn checking_running_jobs_takes_one_describe_jobs_per_hundred() {
    let dir = tempfile::tempdir().unwrap();
    let tuning = Tuning { visibility_timeout_secs: 30, reconcile_after_secs: 600, resend_after_secs: 900 };
    let competition = AwsCompetition::create(&dir.path().join("c"), "requests", tuning).await;
    let cli = competition.cli.clone();
    tokio::task::spawn_blocking(move || cli.ok(&["aws", "bootstrap"])).await.unwrap();
    let batch = competition.moto.batch().await;
    let queue = format!("{}-g4", competition.prefix);
    let mut jobs = Vec::new();
    for n in 0..250 {
        let run = RunId::parse(&format!("s{n}-public")).unwrap();
        let submitted = batch
            .submit_job()
            .job_name(job_name(&run, Attempt(1)))
            .job_queue(&queue)
            .job_definition(format!("{}-submission", competition.prefix))
            .send()
            .await
            .unwrap();
        let job = JobId::new(submitted.job_id().unwrap()).unwrap();
        jobs.push(RunningJob { run, stage: Stage::Public, attempt: Attempt(1), job, since: Timestamp::now() });
    }

    let requests = RequestCounter::default();
    let settings = BatchSettings {
        job_definition_template: format!("{}-submission", competition.prefix),
        inputs: Default::default(),
        output_bucket: format!("{}-artifacts", competition.prefix),
        queues: vec![queue],
        output_key: competition.output_key(),
    };
    let sdk = competition.moto.sdk().await;
    let logs = BatchLogs::from_sdk(&sdk, &requests, Signatures::new(&[]).unwrap());
    let runner = BatchRunner::from_sdk(&sdk, &requests, logs, settings);
    let mut previous = 0;
    for running in [1, 99, 100, 101, 250] {
        let ended = runner.check(&jobs[..running]).await.unwrap().ended;
        assert_eq!(ended.len(), running, "moto's jobs have all ended");
        let calls = requests.snapshot().get("Batch.DescribeJobs").copied().unwrap_or(0) - previous;
        previous += calls;
        eprintln!("{running:>4} running jobs: {calls} DescribeJobs calls");
        assert_eq!(calls as usize, running.div_ceil(DESCRIBE_JOBS_MAX), "{running} jobs");
    }
}
