//! A small random competition per seed, with faults: what deterministic
//! simulation testing runs, seed after seed. Everything in it comes from the
//! seed, so `scenario(seed)` and `simulate(.., seed)` replay one run exactly.

use std::collections::BTreeMap;
use std::time::Duration;

use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};

use super::{Faults, Nature, Scenario, Simulated, Violation, check, simulate};
use crate::ids::{ProfileName, Stage, SubmissionId, TeamId};
use crate::machine::{Event, RunSpec, SubmissionSource};
use crate::policy::{Policy, Resource};
use crate::time::Timestamp;

/// The fleet of every seeded scenario: CPU, the cheap GPU, the big GPU.
const POLICY: &str = r#"
    time_limit_secs = 32400
    [retry]
    interruptions_max = 3
    backoff_base_secs = 60
    backoff_max_secs = 900
    attempts_max = 12
    [[profile]]
    name = "c4"
    host_memory_mib = 7680
    gpu_memory_mib = 0
    vcpus = 4
    price_per_hour_usd = 0.199
    relative_speed = 0.3
    cpu_only = true
    [[profile]]
    name = "g4"
    host_memory_mib = 16384
    gpu_memory_mib = 16384
    vcpus = 4
    price_per_hour_usd = 0.526
    relative_speed = 0.45
    [[profile]]
    name = "p3"
    host_memory_mib = 62464
    gpu_memory_mib = 16384
    vcpus = 8
    price_per_hour_usd = 3.06
    relative_speed = 1.0
"#;

/// The policy of the seeded scenarios.
pub fn policy() -> Policy {
    Policy::from_toml(POLICY).unwrap_or_else(|e| unreachable!("the built-in policy parses: {e}"))
}

/// The competition of `seed`: 4 to 24 submissions over a few hours, on both
/// stages for some, a share needing more host memory than the cheap GPU has
/// (and a few more than any profile), some CPU-only, a few cancelled, the
/// failed ones retried now and then, Spot interruptions, and faults of every
/// kind at rates drawn from the seed.
pub fn scenario(seed: u64) -> Scenario {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed ^ 0x5eed_0f5c_e7a7_1000);
    let start = Timestamp(1_800_000_000_000);
    let count = rng.random_range(4..=24);
    let mut submissions = Vec::new();
    for n in 0..count {
        let submission = SubmissionId::new(format!("s{n}")).unwrap_or_else(|e| unreachable!("{e}"));
        let team = TeamId::new(format!("t{}", n % 5)).unwrap_or_else(|e| unreachable!("{e}"));
        let cpu_only = rng.random_bool(0.15);
        let needs = match rng.random_range(0..10) {
            0..=1 => Some((Resource::HostMemory, 32_768)),
            2 => Some((Resource::HostMemory, 100_000)), // more than any profile has
            _ => None,
        };
        let reference_secs = rng.random_range(600.0..14_400.0);
        let submitted_at = start.plus_ms(rng.random_range(0..3_600_000));
        let stages: &[Stage] = if rng.random_bool(0.4) { &[Stage::Public, Stage::Private] } else { &[Stage::Public] };
        for (i, stage) in stages.iter().enumerate() {
            let source = SubmissionSource::Image { uri: format!("sim/{submission}") };
            let at = submitted_at.plus_ms(i as u64 * 60_000);
            let spec = RunSpec::new(submission.clone(), team.clone(), *stage, cpu_only, source, at);
            let score = rng.random_range(0.05..0.7);
            submissions.push((spec, Nature { reference_secs, needs, score }));
        }
    }
    // The operator cancels a few runs, and now and then retries every run
    // (as `evalflow retry --state failed` does; a run that has not failed
    // refuses it).
    let mut requests = Vec::new();
    for (spec, _) in &submissions {
        if rng.random_bool(0.1) {
            let at = spec.submitted_at.plus_ms(rng.random_range(0..20_000_000));
            requests.push((at, spec.run.clone(), Event::CancelRequested));
        }
    }
    for _ in 0..rng.random_range(0..=3) {
        let at = start.plus_ms(rng.random_range(0..40_000_000));
        requests.extend(submissions.iter().map(|(spec, _)| (at, spec.run.clone(), Event::RetryRequested)));
    }
    let name = |n: &str| ProfileName::new(n).unwrap_or_else(|e| unreachable!("{e}"));
    let instances = BTreeMap::from([
        (name("c4"), rng.random_range(1..=3)),
        (name("g4"), rng.random_range(1..=6)),
        (name("p3"), rng.random_range(1..=3)),
    ]);
    let faults = Faults {
        drop: rng.random_range(0.0..0.1),
        duplicate: rng.random_range(0.0..0.1),
        delay_max_ms: rng.random_range(0..120_000),
        engine_crash: rng.random_range(0.0..0.05),
        flush_fail: rng.random_range(0.0..0.05),
        worker_crash: rng.random_range(0.0..0.05),
        throttle: rng.random_range(0.0..0.2),
        clock_jump_per_hour: rng.random_range(0.0..1.0),
        clock_jump_max_ms: 600_000,
    };
    Scenario {
        policy: policy(),
        submissions,
        instances,
        interruptions_per_hour: rng.random_range(0.0..0.2),
        oom_after: 0.05,
        max_active: rng.random_range(2..=16),
        requests,
        faults,
        resend_after: Duration::from_secs(300),
        reconcile_every: Duration::from_secs(120),
        horizon: Duration::from_secs(30 * 24 * 3600),
    }
}

/// One seed, run and checked.
pub struct Checked {
    /// Its competition.
    pub scenario: Scenario,
    /// What the simulation ended with, unless the engine failed or panicked.
    pub simulated: Option<Simulated>,
    /// What did not hold: none when all did. An engine that fails or
    /// panics is one too, so that no seed is lost to it.
    pub violations: Vec<Violation>,
}

/// Runs seed `seed` and checks it.
pub fn run(seed: u64) -> Checked {
    let scenario = scenario(seed);
    let first = scenario.submissions[0].0.run.clone();
    let broken = |problem: String| vec![Violation { run: first.clone(), problem }];
    let simulated = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| simulate(&scenario, seed)));
    let (simulated, violations) = match simulated {
        Ok(Ok(simulated)) => {
            let violations = check(&scenario, &simulated);
            (Some(simulated), violations)
        }
        Ok(Err(e)) => (None, broken(format!("the engine failed: {e}"))),
        Err(panic) => {
            let message =
                panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
            (None, broken(format!("the simulation panicked: {}", message.unwrap_or_default())))
        }
    };
    Checked { scenario, simulated, violations }
}
