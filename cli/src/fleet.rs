//! The AWS deployment's commands: `evalflow worker` and `evalflow aws bootstrap`.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use evalflow_worker::aws::bootstrap::bootstrap as make;
use evalflow_worker::aws::{ConnectError, WorkerSettings, connect_worker, work};
use evalflow_worker::config::Config;
use tokio_util::sync::CancellationToken;

use crate::signals;

/// How long running activities may finish when a worker is stopped.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(25);

/// Carries out the tasks queue's commands until Ctrl-C or SIGTERM.
pub async fn worker(config: &Config) -> Result<ExitCode> {
    let aws = config.aws.as_ref().ok_or(ConnectError::NotAws)?;
    let parts = connect_worker(config).await?;
    let requests = parts.requests.clone();
    let activities = parts.activities(config);
    let settings = WorkerSettings {
        concurrency: aws.worker_concurrency,
        visibility_timeout_secs: aws.visibility_timeout_secs,
        max_receive_count: aws.max_receive_count,
        shutdown_grace: SHUTDOWN_GRACE,
    };
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        signals::shutdown().await;
        eprintln!("stopping: finishing or releasing the tasks in hand");
        stop.cancel();
    });
    println!("evalflow worker (pid {}) working on {}", std::process::id(), aws.tasks_queue);
    work(activities, parts.queues, settings, shutdown).await;
    eprintln!("{}", requests.summary());
    Ok(ExitCode::SUCCESS)
}

/// Creates the AWS resources that are missing, and says what it did.
pub async fn bootstrap(config: &Config) -> Result<ExitCode> {
    let steps = make(config).await?;
    for step in &steps {
        let what = if step.created { "created" } else { "exists " };
        println!("{what}  {:<20} {}", step.kind, step.name);
    }
    let created = steps.iter().filter(|s| s.created).count();
    println!("{created} created, {} already there", steps.len() - created);
    Ok(ExitCode::SUCCESS)
}
