//! evalflow's long-running parts: the engine thread that owns the store,
//! the activity workers, the job watcher, the data directory's lock, and the
//! HTTP API, put together as a [`node::Node`].

#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod activity;
pub mod api;
pub mod aws;
pub mod bootstrap;
pub mod config;
pub mod engine_thread;
pub mod local_worker;
pub mod lock;
pub mod node;
pub mod space;
pub mod sqs;
pub mod submit;
pub mod token;
pub mod views;
pub mod watcher;

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
