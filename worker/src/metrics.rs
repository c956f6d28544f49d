//! `GET /metrics`: the competition in the Prometheus text format
//! (OpenMetrics 1.0, which Prometheus scrapes), built from the store on each
//! scrape, so it stays true after a restart, with the engine thread's own
//! measures of its groups since it started.

use std::collections::BTreeMap;

use evalflow_workflow::cost::{Billing, attempt_cost};
use evalflow_workflow::progress::Progress;
use evalflow_workflow::{AttemptEnd, Policy, ProfileName, Run, Stage, StateTag};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::engine::EngineMetrics;

/// The content type of the answer.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The bounds of the job-duration histogram, in seconds: 10 s to 2 days.
const DURATION_BUCKETS: [f64; 12] =
    [10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0, 43200.0, 86400.0, 172800.0];

/// Messages in the AWS queues.
#[derive(Debug, Clone, Copy, Default)]
pub struct QueueDepths {
    /// Commands waiting for a worker.
    pub tasks: u64,
    /// Events waiting for the engine.
    pub events: u64,
    /// Commands no worker could carry out.
    pub tasks_dead: u64,
    /// Events the engine could not read.
    pub events_dead: u64,
}

/// What the store holds, counted for one scrape.
#[derive(Debug, Default)]
pub struct Snapshot {
    runs: BTreeMap<(Stage, StateTag), u64>,
    /// Ended attempts per profile and how they ended.
    attempts: BTreeMap<(ProfileName, &'static str), u64>,
    /// Attempts not ended yet, per profile.
    running: BTreeMap<ProfileName, u64>,
    /// The running time of each ended job, per profile.
    durations: BTreeMap<ProfileName, Vec<f64>>,
    cost_usd: BTreeMap<ProfileName, f64>,
}

impl Snapshot {
    /// Counts `run`.
    pub fn add(&mut self, run: &Run, policy: &Policy, billing: Billing) {
        *self.runs.entry((run.spec.stage, run.status.state.tag())).or_default() += 1;
        for attempt in &run.status.attempts {
            let ended = match &attempt.end {
                Some(AttemptEnd::Job(outcome)) => outcome.kind(),
                Some(AttemptEnd::LaunchFailed) => "launch_failed",
                Some(AttemptEnd::Cancelled) => "cancelled",
                None => {
                    *self.running.entry(attempt.profile.clone()).or_default() += 1;
                    continue;
                }
            };
            *self.attempts.entry((attempt.profile.clone(), ended)).or_default() += 1;
            if let Some(usage) = &attempt.usage {
                self.durations.entry(attempt.profile.clone()).or_default().push(usage.running_secs());
            }
            if let Some((_, usd)) = attempt_cost(attempt, policy, billing) {
                *self.cost_usd.entry(attempt.profile.clone()).or_default() += usd;
            }
        }
    }

    /// The text of the scrape: this snapshot, `progress`, the AWS queues'
    /// depths when known, and `engine`'s measures.
    pub fn encode(
        self,
        progress: &Progress,
        queues: Option<QueueDepths>,
        engine: &EngineMetrics,
    ) -> Result<String, std::fmt::Error> {
        type Labels = Vec<(&'static str, String)>;
        let mut registry = Registry::with_prefix("evalflow");

        let runs = Family::<Labels, Gauge>::default();
        for ((stage, state), n) in &self.runs {
            runs.get_or_create(&vec![("stage", stage.to_string()), ("state", state.to_string())]).set(gauge(*n));
        }
        registry.register("runs", "Runs per stage and state", runs);

        let attempts = Family::<Labels, Counter>::default();
        for ((profile, ended), n) in &self.attempts {
            attempts.get_or_create(&vec![("profile", profile.to_string()), ("outcome", (*ended).into())]).inc_by(*n);
        }
        registry.register("attempts", "Ended attempts per profile and how they ended", attempts);
        let running = Family::<Labels, Gauge>::default();
        for (profile, n) in &self.running {
            running.get_or_create(&vec![("profile", profile.to_string())]).set(gauge(*n));
        }
        registry.register("attempts_running", "Attempts launching or running, per profile", running);

        let durations = Family::<Labels, Histogram>::new_with_constructor(|| Histogram::new(DURATION_BUCKETS));
        for (profile, secs) in &self.durations {
            let histogram = durations.get_or_create(&vec![("profile", profile.to_string())]);
            secs.iter().for_each(|s| histogram.observe(*s));
        }
        registry.register_with_unit(
            "job_duration",
            "Running time of ended jobs, per profile",
            Unit::Seconds,
            durations,
        );

        let cost = Family::<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        for (profile, usd) in &self.cost_usd {
            cost.get_or_create(&vec![("profile", profile.to_string())]).set(*usd);
        }
        registry.register("cost_usd", "What the ended attempts cost, per profile, in US dollars", cost);
        let float = |value: f64| {
            let gauge = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
            gauge.set(value);
            gauge
        };
        if let Some(projected) = progress.projected_cost_usd {
            registry.register("projected_cost_usd", "Cost so far plus the live runs' expected cost", float(projected));
        }
        if let Some(eta) = progress.eta_secs {
            registry.register_with_unit(
                "eta",
                "Until the last live run is expected to end",
                Unit::Seconds,
                float(eta as f64),
            );
        }

        if let Some(depths) = queues {
            let messages = Family::<Labels, Gauge>::default();
            for (queue, n) in [("tasks", depths.tasks), ("events", depths.events)] {
                messages.get_or_create(&vec![("queue", queue.into())]).set(gauge(n));
            }
            registry.register("queue_messages", "Messages waiting in the SQS queues", messages);
            let dead = Family::<Labels, Gauge>::default();
            for (queue, n) in [("tasks", depths.tasks_dead), ("events", depths.events_dead)] {
                dead.get_or_create(&vec![("queue", queue.into())]).set(gauge(n));
            }
            registry.register("dead_letters", "Messages in the dead-letter queues", dead);
        }

        registry.register("engine_group_inputs", "Inputs per group commit", engine.group_inputs.clone());
        registry.register_with_unit(
            "engine_group",
            "Time to apply a group and flush it to disk",
            Unit::Seconds,
            engine.group_seconds.clone(),
        );
        let mut text = String::new();
        encode(&mut text, &registry)?;
        Ok(text)
    }
}

fn gauge(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
