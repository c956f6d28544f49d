//! evalflow's long-running parts, by deployment.
//!
//! - [`engine`]: what both deployments drive the engine with: the engine
//!   thread that owns the store, the commands' timing, the job watcher, and
//!   carrying out one command.
//! - [`local`]: the embedded deployment's own parts: its in-process workers
//!   and the watch on this machine's free disk space.
//! - [`aws`]: the AWS deployment's: its queues, the engine's and the
//!   workers' loops on them, and the bootstrap of what it runs on.
//! - [`node`]: either deployment put together on one data directory, and the
//!   operations the CLI and the API offer on it.
//! - [`views`]: what a node answers, through the API or to the CLI itself.
//! - [`api`]: the HTTP API over a node, its operations and its token.
//! - [`config`]: what `evalflow.toml` says.
//! - [`datadir`]: the data directory's lock, and the submissions kept in it.

#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod api;
pub mod aws;
pub mod config;
pub mod datadir;
pub mod engine;
pub mod local;
pub mod metrics;
pub mod node;
pub mod views;

#[cfg(test)]
mod testing {
    use evalflow_workflow::{Policy, RunSpec, Stage, SubmissionId, SubmissionSource, TeamId, Timestamp};

    /// A one-profile policy whose backoffs last a second.
    pub fn policy() -> Policy {
        let toml = r#"
            time_limit_secs = 600
            [retry]
            backoff_base_secs = 1
            backoff_max_secs = 1
            [[profile]]
            name = "g4"
            host_memory_mib = 100
            gpu_memory_mib = 100
            vcpus = 1
            price_per_hour_usd = 0.5
        "#;
        Policy::from_toml(toml).unwrap()
    }

    /// The public run of an image submission named `name`.
    pub fn spec(name: &str) -> RunSpec {
        let submission = SubmissionId::new(name).unwrap();
        let source = SubmissionSource::Image { uri: "img".into() };
        RunSpec::new(submission, TeamId::new("t").unwrap(), Stage::Public, false, source, Timestamp::now())
    }
}
