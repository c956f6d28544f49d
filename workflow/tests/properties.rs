//! Property tests over random event sequences, valid and invalid.
//!
//! Events are drawn as seeds and made concrete against the run's current
//! status, so most of them are plausible (the current attempt, its job, the
//! current version) and the rest are stale, stray or out of place.

use evalflow_workflow::store::{LIST_LIMIT_MAX, RunFilter, StoredRun, all_runs};
use evalflow_workflow::*;
use proptest::prelude::*;

const POLICY: &str = r#"
    time_limit_secs = 600
    [retry]
    interruptions_max = 2
    backoff_base_secs = 5
    backoff_max_secs = 20
    attempts_max = 6
    [[profile]]
    name = "g4"
    host_memory_mib = 100
    gpu_memory_mib = 100
    vcpus = 1
    price_per_hour_usd = 0.5
    [[profile]]
    name = "g4-2x"
    host_memory_mib = 200
    gpu_memory_mib = 100
    vcpus = 2
    price_per_hour_usd = 0.7
    [[profile]]
    name = "p3"
    host_memory_mib = 400
    gpu_memory_mib = 160
    vcpus = 4
    price_per_hour_usd = 3.0
    [[profile]]
    name = "cpu"
    host_memory_mib = 80
    vcpus = 1
    price_per_hour_usd = 0.2
    cpu_only = true
"#;

fn policy() -> Policy {
    Policy::from_toml(POLICY).unwrap()
}

fn spec(index: usize, cpu_only: bool) -> RunSpec {
    RunSpec::new(
        SubmissionId::new(format!("s{index}")).unwrap(),
        TeamId::new(format!("t{}", index % 3)).unwrap(),
        if index % 4 == 3 { Stage::Private } else { Stage::Public },
        cpu_only,
        SubmissionSource::Directory { path: format!("/subs/s{index}"), digest: format!("{index:x}") },
        Timestamp(index as u64),
    )
}

/// A random event, made concrete against a run's status by [`Seed::event`].
#[derive(Debug, Clone)]
struct Seed {
    kind: u8,
    attempt_shift: i8,
    stray_job: bool,
    detail: u8,
    score: f64,
    fence: u8,
}

fn seed() -> impl Strategy<Value = Seed> {
    (0u8..17, -1i8..=1, prop::bool::weighted(0.15), any::<u8>(), 0.0f64..3.0, 0u8..4).prop_map(
        |(kind, attempt_shift, stray_job, detail, score, fence)| Seed {
            kind,
            attempt_shift: if attempt_shift != 0 && detail % 4 != 0 { 0 } else { attempt_shift },
            stray_job,
            detail,
            score,
            fence,
        },
    )
}

impl Seed {
    fn event(&self, run: &Run) -> Envelope {
        let status = &run.status;
        let current = status.attempts.last().map_or(1, |r| r.attempt.0);
        let attempt = Attempt(current.saturating_add_signed(i32::from(self.attempt_shift)).max(1));
        let known_job = status.attempts.last().and_then(|r| r.job.clone());
        let job = match (self.stray_job, known_job) {
            (false, Some(job)) => job,
            _ => JobId::new(format!("job-{}-{}", attempt.0, self.detail % 3)).unwrap(),
        };
        let outcome = match self.detail % 7 {
            0 | 1 => JobOutcome::Succeeded,
            2 => JobOutcome::OutOfMemory { resource: Resource::HostMemory },
            3 => JobOutcome::OutOfMemory { resource: Resource::GpuMemory },
            4 => JobOutcome::Interrupted { detail: Detail::new("spot") },
            5 if self.detail > 200 => JobOutcome::LimitExceeded { limit: Limit::Processes },
            5 => JobOutcome::TimedOut,
            _ => JobOutcome::Crashed { exit_code: Some(i32::from(self.detail)) },
        };
        let usage = JobUsage { started_at: Some(Timestamp(1)), ended_at: Timestamp(2), peak_memory_mib: Some(5) };
        let activity = [Activity::Launch, Activity::Score, Activity::Publish][usize::from(self.detail % 3)];
        let event = match self.kind {
            0 => Event::Admitted { start: None },
            1 | 2 => Event::JobLaunched { attempt, job },
            3 => Event::LaunchFailed { attempt, error: Detail::new("bad") },
            4 | 5 => Event::JobEnded { attempt, job, outcome, usage, evidence: Evidence::default() },
            6 => Event::PredictionsScored { attempt, score: Score::new(self.score).unwrap() },
            7 => Event::PredictionsRejected { attempt, reason: Detail::new("row 1") },
            8 => Event::Published { attempt },
            9 => Event::JobTerminated { attempt, job: self.detail.is_multiple_of(2).then_some(job) },
            10 => Event::ActivityFailed { attempt, activity, error: Detail::new("api down") },
            11 => Event::CancelRequested,
            12 => Event::RetryRequested,
            13 => Event::Withdrawn { attempt },
            15 => Event::RescoreRequested,
            14 => Event::JobWaiting {
                attempt,
                job,
                status: Detail::new(["RUNNABLE", "STARTING"][usize::from(self.detail % 2)]),
                reason: (!self.detail.is_multiple_of(3))
                    .then(|| Detail::new("CAPACITY:INSUFFICIENT_INSTANCE_CAPACITY")),
            },
            _ => Event::Submitted(RunSpec { cpu_only: self.detail.is_multiple_of(5), ..run.spec.clone() }),
        };
        let expected_version = match self.fence {
            0 => None,
            1 | 2 => Some(status.version),
            _ => Some(status.version.saturating_sub(1 + u64::from(self.detail % 2))),
        };
        Envelope { event, expected_version }
    }
}

/// Checks the machine's guarantees for one step.
fn check_step(policy: &Policy, before: &RunStatus, input: &Envelope, t: &Transition) -> Result<(), TestCaseError> {
    let after = &t.status;
    prop_assert!(after.validate().is_ok(), "invalid status {:?}", after.validate());
    let applied = t.disposition == Disposition::Applied;
    prop_assert_eq!(after.version, before.version + u64::from(applied), "versions only grow, by one per change");
    if before.state.tag().is_terminal() && !matches!(input.event, Event::RetryRequested | Event::RescoreRequested) {
        prop_assert_eq!(&after.state, &before.state, "a terminal state never changes");
    }
    if let (Event::JobEnded { outcome: JobOutcome::OutOfMemory { resource }, .. }, RunState::Launching { profile, .. }) =
        (&input.event, &after.state)
        && applied
    {
        let from = before.state.placement().map(|(_, p, _)| p.clone()).unwrap();
        let had = policy.profile(&from).unwrap().amount_mib(*resource);
        let has = policy.profile(profile).unwrap().amount_mib(*resource);
        prop_assert!(has > had, "escalated from {from} ({had}) to {profile} ({has}) for {resource:?}");
    }
    let owed = after.outbox();
    prop_assert!(t.commands.iter().all(|c| owed.contains(c)), "every new command is owed");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// `step` never panics, and every guarantee holds after every step.
    #[test]
    fn step_keeps_its_guarantees(cpu_only: bool, audit: bool, seeds in prop::collection::vec(seed(), 1..80)) {
        let policy = policy();
        let original = spec(0, cpu_only);
        let spec = if audit { original.audit(1, Timestamp(0)).unwrap() } else { original };
        let mut run = Run { spec, status: RunStatus::submitted(Timestamp(0)) };
        for (tick, seed) in (1u64..).zip(&seeds) {
            let input = seed.event(&run);
            let Ok(transition) = step(&policy, &run, &input, Timestamp(tick * 1000)) else { continue };
            check_step(&policy, &run.status, &input, &transition)?;
            let publishes = transition.commands.iter().any(|c| matches!(c, Command::Publish { .. }));
            prop_assert!(!(audit && publishes), "an audit run is never published");
            run.status = transition.status;
        }
    }

    /// The same inputs through an engine on sled and one on the in-memory
    /// store give the same outcomes, commands, histories, indexes and counts;
    /// every history replays to the stored status; and reopening the sled
    /// store recovers exactly the commands every live run is owed.
    #[test]
    fn sled_and_memory_stores_agree_and_replay(
        runs in 1usize..5,
        cpu_mask in any::<u8>(),
        max_active in 1usize..4,
        groups in prop::collection::vec(prop::collection::vec((0usize..8, seed()), 0..12), 1..10),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let sled = SledStore::open(dir.path(), Default::default()).unwrap();
        let (mut on_sled, _) = Engine::open(sled, policy(), max_active).unwrap();
        let (mut in_memory, _) = Engine::open(MemoryStore::new(), policy(), max_active).unwrap();
        let submissions = (0..runs).map(|i| Input::Submit(spec(i, cpu_mask & (1 << i) != 0))).collect::<Vec<_>>();
        let mut now = Timestamp(1_000);
        prop_assert_eq!(on_sled.apply(submissions.clone(), now).unwrap(), in_memory.apply(submissions, now).unwrap());
        for group in &groups {
            now = now.plus_secs(1);
            let inputs = group.iter().map(|(index, seed)| {
                let run = spec(index % runs, false).run;
                let current = in_memory.store().load(&run).unwrap().unwrap().run;
                Input::Event { run, envelope: seed.event(&current) }
            }).collect::<Vec<_>>();
            let a = on_sled.apply(inputs.clone(), now).unwrap();
            let b = in_memory.apply(inputs, now).unwrap();
            prop_assert_eq!(a, b);
            stores_agree(on_sled.store(), in_memory.store())?;
            sled_reads_runs_whole(on_sled.store(), in_memory.store())?;
        }
        let all = all_runs(in_memory.store(), RunFilter::All).unwrap();
        prop_assert_eq!(all.len(), runs);
        for run in &all {
            let replayed = replay::check(&policy(), on_sled.store(), run);
            prop_assert!(replayed.is_ok(), "{}", replayed.unwrap_err());
        }
        let counts = on_sled.store().counts().unwrap();
        prop_assert_eq!(counts.total(), runs as u64);
        for tag in StateTag::ALL {
            let actual = all.iter().filter(|r| on_sled.store().load(r).unwrap().unwrap().run.status.state.tag() == tag).count();
            prop_assert_eq!(counts[tag], actual as u64, "count of {}", tag);
        }

        let owed: Vec<Dispatch> = live_outboxes(in_memory.store());
        drop(on_sled);
        let reopened = SledStore::open(dir.path(), Default::default()).unwrap();
        let (_, recovered) = Engine::open(reopened, policy(), max_active).unwrap();
        prop_assert_eq!(sorted(recovered), sorted(owed));
    }
}

fn stores_agree(a: &impl WorkflowStore, b: &impl WorkflowStore) -> Result<(), TestCaseError> {
    prop_assert_eq!(a.counts().unwrap(), b.counts().unwrap());
    let mut filters = vec![RunFilter::All, RunFilter::Live];
    filters.extend(StateTag::ALL.into_iter().filter(|t| t.is_terminal()).map(RunFilter::Terminal));
    for filter in filters {
        prop_assert_eq!(all_runs(a, filter).unwrap(), all_runs(b, filter).unwrap(), "{:?}", filter);
    }
    for run in all_runs(a, RunFilter::All).unwrap() {
        prop_assert_eq!(a.load(&run).unwrap(), b.load(&run).unwrap());
        prop_assert_eq!(a.history(&run).unwrap(), b.history(&run).unwrap());
    }
    Ok(())
}

/// The sled store's listings of loaded runs (a terminal state's read from
/// its index, which holds them) and its visit of every run agree with a
/// load of each run of the in-memory store.
fn sled_reads_runs_whole(sled: &SledStore, memory: &MemoryStore) -> Result<(), TestCaseError> {
    let loaded = |filter| -> Vec<StoredRun> {
        all_runs(memory, filter).unwrap().iter().map(|run| memory.load(run).unwrap().unwrap()).collect()
    };
    let mut filters = vec![RunFilter::All, RunFilter::Live];
    filters.extend(StateTag::ALL.into_iter().filter(|t| t.is_terminal()).map(RunFilter::Terminal));
    for filter in filters {
        prop_assert_eq!(sled.stored_runs(filter, None, LIST_LIMIT_MAX).unwrap(), loaded(filter), "{:?}", filter);
    }
    let mut visited = Vec::new();
    sled.each_run(|stored| visited.push(stored)).unwrap();
    prop_assert_eq!(visited, loaded(RunFilter::All), "each run visited once, in id order, as loaded");
    Ok(())
}

/// Every command every live run is owed, as recovery should return them.
fn live_outboxes(store: &impl WorkflowStore) -> Vec<Dispatch> {
    let mut owed = Vec::new();
    for run in all_runs(store, RunFilter::Live).unwrap() {
        let Run { spec, status } = store.load(&run).unwrap().unwrap().run;
        owed.extend(status.outbox().into_iter().map(|command| Dispatch {
            spec: spec.clone(),
            version: status.version,
            command,
        }));
    }
    owed
}

fn sorted(mut dispatches: Vec<Dispatch>) -> Vec<Dispatch> {
    dispatches.sort_by_key(|d| (d.spec.run.clone(), format!("{:?}", d.command)));
    dispatches
}
