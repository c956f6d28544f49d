//! Policy is data: where a run is placed, how far it escalates, how often an
//! interrupted job is retried, and how long a job may run.
//!
//! It comes from the `[policy]` table of `evalflow.toml`:
//!
//! ```toml
//! [policy]
//! time_limit_secs = 32400
//!
//! [policy.retry]
//! interruptions_max = 3
//! backoff_base_secs = 60
//! backoff_max_secs = 900
//! attempts_max = 12
//!
//! [[policy.profile]]
//! name = "g4"
//! host_memory_mib = 16384
//! gpu_memory_mib = 16384
//! vcpus = 4
//! price_per_hour_usd = 0.526
//! relative_speed = 0.45
//! batch_job_queue = "evalflow-g4"
//! ```
//!
//! GPU submissions climb the GPU ladder (profiles without `cpu_only`), CPU
//! submissions the CPU ladder. A run starts on the cheapest profile of its
//! ladder; when it runs out of a resource it moves to the cheapest profile
//! with strictly more of that resource.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::ids::ProfileName;

/// A resource a job can run out of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resource {
    /// The host's (container's) memory.
    HostMemory,
    /// The GPU's memory.
    GpuMemory,
}

impl Resource {
    /// The resource in words.
    pub fn words(self) -> &'static str {
        match self {
            Resource::HostMemory => "host memory",
            Resource::GpuMemory => "GPU memory",
        }
    }
}

/// One rung of the placement ladder: a kind of machine a job can run on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// The profile's name (`g4`, `p3`, `cpu`).
    pub name: ProfileName,
    /// Memory a job may use on the host, in MiB (a hard limit).
    pub host_memory_mib: u64,
    /// Memory of the GPU, in MiB; 0 for CPU-only profiles.
    #[serde(default)]
    pub gpu_memory_mib: u64,
    /// Virtual CPUs a job gets.
    pub vcpus: u32,
    /// What an hour of this profile costs, in US dollars.
    pub price_per_hour_usd: f64,
    /// Throughput relative to the reference machine (1.0); a T4 runs these
    /// models at about 0.45 of a V100.
    #[serde(default = "default_speed")]
    pub relative_speed: f64,
    /// Whether this profile serves CPU-only submissions (the CPU ladder).
    #[serde(default)]
    pub cpu_only: bool,
    /// The AWS Batch job queue that places jobs on this profile (AWS only).
    #[serde(default)]
    pub batch_job_queue: Option<String>,
}

fn default_speed() -> f64 {
    1.0
}

impl Profile {
    /// How much of `resource` this profile has, in MiB.
    pub fn amount_mib(&self, resource: Resource) -> u64 {
        match resource {
            Resource::HostMemory => self.host_memory_mib,
            Resource::GpuMemory => self.gpu_memory_mib,
        }
    }
}

/// How interrupted jobs are retried, and the bound on launches of one run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Interruptions (Spot reclaim, host lost) tolerated in a row before the run fails.
    #[serde(default = "default_interruptions_max")]
    pub interruptions_max: u32,
    /// Delay before relaunching after the first interruption; doubles each time.
    #[serde(default = "default_backoff_base_secs")]
    pub backoff_base_secs: u64,
    /// The longest delay before a relaunch.
    #[serde(default = "default_backoff_max_secs")]
    pub backoff_max_secs: u64,
    /// The most launches one run may ever have, whatever caused them.
    #[serde(default = "default_attempts_max")]
    pub attempts_max: u32,
}

fn default_interruptions_max() -> u32 {
    3
}
fn default_backoff_base_secs() -> u64 {
    60
}
fn default_backoff_max_secs() -> u64 {
    900
}
fn default_attempts_max() -> u32 {
    12
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            interruptions_max: default_interruptions_max(),
            backoff_base_secs: default_backoff_base_secs(),
            backoff_max_secs: default_backoff_max_secs(),
            attempts_max: default_attempts_max(),
        }
    }
}

/// The `[policy]` table as written in `evalflow.toml`, before validation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// The wall-clock limit of one job, in seconds.
    pub time_limit_secs: u64,
    /// Retry limits and backoff.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// The placement ladder.
    #[serde(default)]
    pub profile: Vec<Profile>,
    /// Whether a run starts where its submission succeeded on another stage
    /// after an escalation (on by default): a submission that ran out of
    /// memory on g4 in the public stage starts its private run on p3.
    #[serde(default = "default_learn_across_stages")]
    pub learn_across_stages: bool,
    /// The most the competition may spend, in US dollars: once what was
    /// spent and what the running jobs are expected to cost would pass it, no
    /// new attempt is launched (running ones finish) until it is raised.
    #[serde(default)]
    pub budget_usd: Option<f64>,
}

fn default_learn_across_stages() -> bool {
    true
}

/// A configuration that cannot be used, with what to change.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PolicyError {
    /// The ladder has no profile at all.
    #[error("the placement ladder is empty: add at least one [[policy.profile]]")]
    EmptyLadder,
    /// Two profiles share a name.
    #[error("profile name \"{name}\" is used twice: give each [[policy.profile]] its own name")]
    DuplicateName {
        /// The repeated name.
        name: ProfileName,
    },
    /// A profile has no host memory.
    #[error("profile \"{profile}\" has host_memory_mib = 0: give it the memory a job may use, in MiB")]
    ZeroHostMemory {
        /// The profile.
        profile: ProfileName,
    },
    /// A GPU profile has no GPU memory.
    #[error(
        "profile \"{profile}\" has gpu_memory_mib = 0 but is not cpu_only: give it the GPU's memory in MiB, \
         or set cpu_only = true"
    )]
    ZeroGpuMemory {
        /// The profile.
        profile: ProfileName,
    },
    /// A profile has no vCPU.
    #[error("profile \"{profile}\" has vcpus = 0: give it at least 1")]
    ZeroVcpus {
        /// The profile.
        profile: ProfileName,
    },
    /// A price that is negative or not a number.
    #[error("profile \"{profile}\" has price_per_hour_usd = {price}: use a finite price of 0 or more")]
    BadPrice {
        /// The profile.
        profile: ProfileName,
        /// The price given.
        price: f64,
    },
    /// A speed that is not positive.
    #[error("profile \"{profile}\" has relative_speed = {speed}: use a finite number above 0 (1.0 = reference)")]
    BadSpeed {
        /// The profile.
        profile: ProfileName,
        /// The speed given.
        speed: f64,
    },
    /// A zero time limit.
    #[error("time_limit_secs = 0: give jobs a wall-clock limit of at least 1 second")]
    ZeroTimeLimit,
    /// A zero launch bound.
    #[error("retry.attempts_max = 0: allow at least 1 launch per run")]
    ZeroAttempts,
    /// A backoff range upside down.
    #[error("retry.backoff_base_secs = {base} is above retry.backoff_max_secs = {max}: make base <= max")]
    BackoffRange {
        /// The base delay.
        base: u64,
        /// The largest delay.
        max: u64,
    },
    /// A budget that is not a positive amount.
    #[error("budget_usd = {0}: give the most the competition may spend in US dollars, above 0, or leave it out")]
    BadBudget(f64),
    /// The TOML itself is malformed or has unknown fields.
    #[error("policy configuration: {0}")]
    Toml(String),
}

/// The validated policy the state machine decides with.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    profiles: Vec<Profile>,
    retry: RetryPolicy,
    time_limit_secs: u64,
    learn_across_stages: bool,
    budget_usd: Option<f64>,
}

impl Policy {
    /// Validates a configuration.
    pub fn new(config: PolicyConfig) -> Result<Policy, PolicyError> {
        let PolicyConfig { time_limit_secs, retry, profile: profiles, learn_across_stages, budget_usd } = config;
        if profiles.is_empty() {
            return Err(PolicyError::EmptyLadder);
        }
        let mut names = HashSet::new();
        for profile in &profiles {
            check_profile(profile)?;
            if !names.insert(&profile.name) {
                return Err(PolicyError::DuplicateName { name: profile.name.clone() });
            }
        }
        if time_limit_secs == 0 {
            return Err(PolicyError::ZeroTimeLimit);
        }
        if retry.attempts_max == 0 {
            return Err(PolicyError::ZeroAttempts);
        }
        if retry.backoff_base_secs > retry.backoff_max_secs {
            return Err(PolicyError::BackoffRange { base: retry.backoff_base_secs, max: retry.backoff_max_secs });
        }
        if let Some(budget) = budget_usd.filter(|b| !b.is_finite() || *b <= 0.0) {
            return Err(PolicyError::BadBudget(budget));
        }
        Ok(Policy { profiles, retry, time_limit_secs, learn_across_stages, budget_usd })
    }

    /// Parses and validates a document whose top level is the `[policy]` table.
    pub fn from_toml(text: &str) -> Result<Policy, PolicyError> {
        let config: PolicyConfig = toml::from_str(text).map_err(|e| PolicyError::Toml(e.to_string()))?;
        Policy::new(config)
    }

    /// Every profile, in configuration order.
    pub fn profiles(&self) -> &[Profile] {
        &self.profiles
    }

    /// The profile called `name`, if the ladder has it.
    pub fn profile(&self, name: &ProfileName) -> Option<&Profile> {
        self.profiles.iter().find(|p| &p.name == name)
    }

    /// Retry limits and backoff.
    pub fn retry(&self) -> &RetryPolicy {
        &self.retry
    }

    /// The wall-clock limit of one job, in seconds.
    pub fn time_limit_secs(&self) -> u64 {
        self.time_limit_secs
    }

    /// Whether a run starts where another stage of its submission succeeded
    /// after an escalation.
    pub fn learns_across_stages(&self) -> bool {
        self.learn_across_stages
    }

    /// The most the competition may spend, if it is bounded.
    pub fn budget_usd(&self) -> Option<f64> {
        self.budget_usd
    }

    /// The same policy with another budget.
    pub fn with_budget(mut self, budget_usd: Option<f64>) -> Policy {
        self.budget_usd = budget_usd;
        self
    }

    /// Where a new run starts: the cheapest profile of its ladder.
    pub fn first_profile(&self, cpu_only: bool) -> Option<&Profile> {
        self.cheapest(self.ladder(cpu_only))
    }

    /// Where a run goes after running out of `resource` on `from`: the
    /// cheapest profile of the same ladder with strictly more of it. `None`
    /// at the top of the ladder, or when `from` is no longer configured.
    pub fn escalate(&self, from: &ProfileName, resource: Resource) -> Option<&Profile> {
        let from = self.profile(from)?;
        let had = from.amount_mib(resource);
        self.cheapest(self.ladder(from.cpu_only).filter(|p| p.amount_mib(resource) > had))
    }

    /// The delay before relaunching after the `interruption`-th interruption in a row (from 1).
    pub fn backoff_secs(&self, interruption: u32) -> u64 {
        let doublings = interruption.saturating_sub(1).min(32);
        self.retry.backoff_base_secs.saturating_mul(1 << doublings).min(self.retry.backoff_max_secs)
    }

    fn ladder(&self, cpu_only: bool) -> impl Iterator<Item = &Profile> {
        self.profiles.iter().filter(move |p| p.cpu_only == cpu_only)
    }

    /// The lowest price wins; on a tie, the profile listed first.
    fn cheapest<'a>(&self, candidates: impl Iterator<Item = &'a Profile>) -> Option<&'a Profile> {
        candidates.fold(None, |best: Option<&Profile>, p| match best {
            Some(b) if b.price_per_hour_usd <= p.price_per_hour_usd => Some(b),
            _ => Some(p),
        })
    }
}

fn check_profile(profile: &Profile) -> Result<(), PolicyError> {
    let name = || profile.name.clone();
    if profile.host_memory_mib == 0 {
        return Err(PolicyError::ZeroHostMemory { profile: name() });
    }
    if !profile.cpu_only && profile.gpu_memory_mib == 0 {
        return Err(PolicyError::ZeroGpuMemory { profile: name() });
    }
    if profile.vcpus == 0 {
        return Err(PolicyError::ZeroVcpus { profile: name() });
    }
    let price = profile.price_per_hour_usd;
    if !price.is_finite() || price < 0.0 {
        return Err(PolicyError::BadPrice { profile: name(), price });
    }
    let speed = profile.relative_speed;
    if !speed.is_finite() || speed <= 0.0 {
        return Err(PolicyError::BadSpeed { profile: name(), speed });
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The case's ladder: g4dn (T4) and p3 (V100) for GPU runs, c4 for CPU runs.
    pub(crate) const CASE_POLICY: &str = r#"
        time_limit_secs = 32400
        [retry]
        interruptions_max = 2
        backoff_base_secs = 60
        backoff_max_secs = 600
        attempts_max = 8
        [[profile]]
        name = "p3"
        host_memory_mib = 62000
        gpu_memory_mib = 16000
        vcpus = 8
        price_per_hour_usd = 3.06
        [[profile]]
        name = "g4"
        host_memory_mib = 15000
        gpu_memory_mib = 15000
        vcpus = 4
        price_per_hour_usd = 0.526
        relative_speed = 0.45
        [[profile]]
        name = "g4-2x"
        host_memory_mib = 31000
        gpu_memory_mib = 15000
        vcpus = 8
        price_per_hour_usd = 0.752
        relative_speed = 0.45
        [[profile]]
        name = "cpu"
        host_memory_mib = 7000
        vcpus = 4
        price_per_hour_usd = 0.199
        cpu_only = true
    "#;

    pub(crate) fn case_policy() -> Policy {
        Policy::from_toml(CASE_POLICY).unwrap()
    }

    fn name(s: &str) -> ProfileName {
        ProfileName::new(s).unwrap()
    }

    #[test]
    fn runs_start_on_the_cheapest_profile_of_their_ladder() {
        let policy = case_policy();
        assert_eq!(policy.first_profile(false).unwrap().name, name("g4"));
        assert_eq!(policy.first_profile(true).unwrap().name, name("cpu"));
    }

    #[test]
    fn escalation_takes_the_cheapest_profile_with_more_of_the_exhausted_resource() {
        let policy = case_policy();
        let host = policy.escalate(&name("g4"), Resource::HostMemory).unwrap();
        assert_eq!(host.name, name("g4-2x"), "more host memory, cheaper than p3");
        let gpu = policy.escalate(&name("g4"), Resource::GpuMemory).unwrap();
        assert_eq!(gpu.name, name("p3"), "only p3 has more GPU memory");
        assert_eq!(policy.escalate(&name("g4-2x"), Resource::HostMemory).unwrap().name, name("p3"));
        assert!(policy.escalate(&name("p3"), Resource::HostMemory).is_none());
        assert!(policy.escalate(&name("cpu"), Resource::HostMemory).is_none(), "the CPU ladder has one rung");
        assert!(policy.escalate(&name("gone"), Resource::HostMemory).is_none());
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let policy = case_policy();
        let delays: Vec<u64> = (1..=6).map(|n| policy.backoff_secs(n)).collect();
        assert_eq!(delays, [60, 120, 240, 480, 600, 600]);
        assert_eq!(policy.backoff_secs(u32::MAX), 600);
    }

    fn rejects(text: &str) -> PolicyError {
        Policy::from_toml(text).unwrap_err()
    }

    const ONE_PROFILE: &str = "time_limit_secs = 60\n[[profile]]\nname = \"g4\"\nvcpus = 4\n";

    #[test]
    fn invalid_configurations_are_rejected_with_the_fix() {
        assert_eq!(rejects("time_limit_secs = 60"), PolicyError::EmptyLadder);
        let zero = format!("{ONE_PROFILE}price_per_hour_usd = 0.5\nhost_memory_mib = 0\ngpu_memory_mib = 1\n");
        assert!(matches!(rejects(&zero), PolicyError::ZeroHostMemory { .. }));
        let no_gpu = format!("{ONE_PROFILE}price_per_hour_usd = 0.5\nhost_memory_mib = 10\n");
        assert!(matches!(rejects(&no_gpu), PolicyError::ZeroGpuMemory { .. }));
        let twice = format!(
            "{ONE_PROFILE}price_per_hour_usd = 0.5\nhost_memory_mib = 1\ngpu_memory_mib = 1\n[[profile]]\nname = \"g4\"\nvcpus = 1\n\
             price_per_hour_usd = 1.0\nhost_memory_mib = 2\ngpu_memory_mib = 2\n"
        );
        assert_eq!(rejects(&twice), PolicyError::DuplicateName { name: name("g4") });
        let speed = format!(
            "{ONE_PROFILE}price_per_hour_usd = 0.5\nhost_memory_mib = 1\ngpu_memory_mib = 1\nrelative_speed = 0.0\n"
        );
        assert!(matches!(rejects(&speed), PolicyError::BadSpeed { .. }));
        let price = format!("{ONE_PROFILE}host_memory_mib = 1\ngpu_memory_mib = 1\nprice_per_hour_usd = -1.0\n");
        assert!(matches!(rejects(&price), PolicyError::BadPrice { .. }));
        let good = "price_per_hour_usd = 0.5\nhost_memory_mib = 1\ngpu_memory_mib = 1\n";
        let budget = |amount: &str| format!("budget_usd = {amount}\n{ONE_PROFILE}{good}");
        assert_eq!(rejects(&budget("0.0")), PolicyError::BadBudget(0.0));
        assert!(rejects(&budget("nan")).to_string().contains("above 0, or leave it out"));
        assert_eq!(Policy::from_toml(&budget("20000.0")).unwrap().budget_usd(), Some(20000.0));
    }

    #[test]
    fn unknown_fields_are_named() {
        let typo = format!("{ONE_PROFILE}price_per_hour_usd = 0.5\nhost_memory_mib = 1\nhost_memroy_mib = 2\n");
        let err = rejects(&typo).to_string();
        assert!(err.contains("unknown field `host_memroy_mib`"), "{err}");
        let bad_name = "time_limit_secs = 60\n[[profile]]\nname = \"g 4\"\n";
        assert!(rejects(bad_name).to_string().contains("profile name \"g 4\""));
    }
}
