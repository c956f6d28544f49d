//! The simulated world, on a virtual clock: the real engine and the real
//! command timing ([`Dispatcher`](crate::dispatcher::Dispatcher)) against a
//! model of the fleet ([`world`]), with faults injected where real runs
//! meet them ([`Faults`]). One seed is one exact run of it; [`check`] says
//! what must hold after every one; [`seeded`] makes a random competition
//! per seed.
//!
//! [`InstantWorld`] is the simplest world of all: every command answered at
//! once, for the crash tests and the engine benchmark.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::ids::{ProfileName, RunId};
use crate::machine::{Event, RunSpec};
use crate::policy::Policy;
use crate::time::Timestamp;

pub mod check;
mod driver;
mod instant;
pub mod seeded;
mod store;
pub mod world;

pub use check::{Violation, check};
pub use driver::{FaultCounts, Simulated, simulate, simulate_on};
pub use instant::InstantWorld;
pub use world::Nature;

/// A competition to simulate.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// The policy the engine runs.
    pub policy: Policy,
    /// The runs, each submitted at its `submitted_at`, with what it is.
    pub submissions: Vec<(RunSpec, Nature)>,
    /// Instances per profile.
    pub instances: BTreeMap<ProfileName, usize>,
    /// Spot interruptions per instance-hour.
    pub interruptions_per_hour: f64,
    /// How far into its run a job that needs more memory than its profile
    /// has gets before it runs out, as a share of its running time.
    pub oom_after: f64,
    /// Jobs launching or running at once, at most (the engine's admission).
    pub max_active: usize,
    /// The operator's requests (cancels, retries): when, which run, what.
    pub requests: Vec<(Timestamp, RunId, Event)>,
    /// What goes wrong.
    pub faults: Faults,
    /// How long a command may be owed before it is sent again.
    pub resend_after: Duration,
    /// How often the watcher looks at running jobs.
    pub reconcile_every: Duration,
    /// How long the simulation may take, in virtual time, at most.
    pub horizon: Duration,
}

/// Faults, as probabilities per occasion.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Faults {
    /// A message (a command, an answer, a job's end) lost.
    pub drop: f64,
    /// A message delivered twice.
    pub duplicate: f64,
    /// Each message is late by up to this (so messages overtake each other).
    pub delay_max_ms: u64,
    /// The engine crashes after a group's flush, before its sends.
    pub engine_crash: f64,
    /// A group's flush fails (power cut, full disk): the engine stops, and
    /// a new one starts from what was durable before it.
    pub flush_fail: f64,
    /// A worker dies after carrying a command out, before it answers.
    pub worker_crash: f64,
    /// A try of an activity is throttled (5 tries in all, then given up on).
    pub throttle: f64,
    /// Jumps of the engine's clock, per hour.
    pub clock_jump_per_hour: f64,
    /// How far the clock jumps, either way, at most.
    pub clock_jump_max_ms: u64,
}
