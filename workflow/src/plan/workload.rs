//! A workload file: the competition to plan, as an organizer knows it
//! before the re-run (how many submissions, how long one takes, how many
//! need the big GPU, prices, the deadline), validated into a [`Workload`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::{ProfileName, Stage};
use crate::policy::{Policy, PolicyConfig, PolicyError, Resource};

/// Submissions one plan simulates at most.
pub const SUBMISSIONS_MAX: usize = 50_000;

/// The longest deadline planned for, in hours (half a year: a candidate
/// fleet is simulated for twice the deadline at most).
pub const DEADLINE_MAX_HOURS: f64 = 4380.0;
/// The longest job time limit planned with.
const TIME_LIMIT_MAX_SECS: u64 = 30 * 24 * 3600;
/// The most launches or interruptions in a row a planned run may have.
const RETRIES_MAX: u32 = 50;

/// The workload file as written, before validation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadConfig {
    /// How many submissions are run.
    pub submissions: usize,
    /// The stage planned.
    #[serde(default = "default_stage")]
    pub stage: Stage,
    /// The stage the same submissions ran on before, on evalflow, if any:
    /// the plan learns placement from it and does not count its cost.
    #[serde(default)]
    pub after: Option<Stage>,
    /// The share of submissions that run on the CPU ladder.
    #[serde(default)]
    pub cpu_only_share: f64,
    /// The seed every draw of the plan comes from.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// How long one run takes on a profile of `relative_speed` 1; `--from`
    /// gives observed durations instead.
    #[serde(default)]
    pub run_time: Option<RunTimeConfig>,
    /// The runs that need more memory than the cheapest GPU profile has.
    #[serde(default)]
    pub memory: Option<MemoryConfig>,
    /// Spot instances: their prices and how often they are taken back.
    #[serde(default)]
    pub spot: Option<SpotConfig>,
    /// The fleet: fixed, or the smallest that meets a deadline.
    pub fleet: FleetConfig,
    /// What the run may cost at most, in US dollars.
    #[serde(default)]
    pub budget_usd: Option<f64>,
    /// The policy, as in `evalflow.toml`'s `[policy]`.
    pub policy: PolicyConfig,
}

impl WorkloadConfig {
    /// Parses a workload file's text, unvalidated.
    pub fn from_toml(text: &str) -> Result<WorkloadConfig, WorkloadError> {
        toml::from_str(text).map_err(|e| WorkloadError::Toml(e.to_string()))
    }
}

fn default_stage() -> Stage {
    Stage::Private
}

fn default_seed() -> u64 {
    1
}

/// `[run_time]`: a log-normal distribution of running times.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunTimeConfig {
    /// The mean, in hours.
    pub mean_hours: f64,
    /// The coefficient of variation (standard deviation over mean); 0: every
    /// run takes the mean.
    #[serde(default)]
    pub cv: f64,
}

/// `[memory]`: the share of GPU runs that run out of memory on profiles too small.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    /// The share of GPU runs that need more.
    pub share: f64,
    /// What they need more of.
    pub resource: Resource,
    /// How much they need, in MiB.
    pub need_mib: u64,
    /// How far into its run such a run gets on a profile too small before it
    /// runs out, as a share of its running time.
    #[serde(default = "default_runs_out_after")]
    pub runs_out_after: f64,
}

fn default_runs_out_after() -> f64 {
    0.05
}

/// `[spot]`: prices per profile and interruptions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpotConfig {
    /// Interruptions per instance-hour.
    pub interruptions_per_hour: f64,
    /// The Spot price of every profile, per hour.
    pub price_per_hour_usd: BTreeMap<ProfileName, f64>,
}

/// `[fleet]`: the instances, or the deadline to find the smallest for.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// Instances per profile, fixed.
    #[serde(default)]
    pub instances: Option<BTreeMap<ProfileName, usize>>,
    /// The hours the stage must end within.
    #[serde(default)]
    pub deadline_hours: Option<f64>,
    /// Spare capacity to provision on top of the smallest fleet (0.5: 50% more).
    #[serde(default)]
    pub headroom: f64,
}

/// How long runs take on the reference profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum RunTime {
    /// Log-normal, with this mean and coefficient of variation.
    LogNormal {
        /// The mean, in hours.
        mean_hours: f64,
        /// Standard deviation over mean.
        cv: f64,
    },
    /// Drawn from these observed durations, in seconds.
    Observed {
        /// The durations.
        secs: Vec<f64>,
    },
}

/// A validated workload.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    /// What was written, validated.
    pub config: WorkloadConfig,
    /// The policy, validated.
    pub policy: Policy,
    /// How long runs take.
    pub run_time: RunTime,
}

/// A workload that cannot be planned, with what to change.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WorkloadError {
    /// The TOML is malformed or has unknown fields.
    #[error("workload: {0}")]
    Toml(String),
    /// The `[policy]` table is not a valid policy.
    #[error("workload [policy]: {0}")]
    Policy(#[from] PolicyError),
    /// A field out of its range.
    #[error("workload {field} = {value}: {fix}")]
    Range {
        /// The field.
        field: &'static str,
        /// Its value.
        value: String,
        /// What it must be.
        fix: &'static str,
    },
    /// Neither `[run_time]` nor observed durations.
    #[error(
        "the workload has no [run_time]: give mean_hours (and cv), or plan from observed durations with --from DIR"
    )]
    NoRunTime,
    /// Observed durations with none in them.
    #[error(
        "the data directory has no run whose job succeeded to take a running time from: give the workload a [run_time] instead"
    )]
    NothingObserved,
    /// `[fleet]` says neither what it is nor what it must do.
    #[error("[fleet] needs instances (a fixed fleet) or deadline_hours (to find the smallest fleet that meets it)")]
    NoFleet,
    /// A fixed fleet without a profile of the ladder.
    #[error("[fleet] instances has no {profile}: give every profile of the policy a count (0 is allowed)")]
    FleetMissing {
        /// The profile.
        profile: ProfileName,
    },
    /// A fleet or Spot price for a profile the policy does not have.
    #[error("{table} names {profile}, which the policy has no [[policy.profile]] for: remove it or add the profile")]
    UnknownProfile {
        /// Where.
        table: &'static str,
        /// The profile.
        profile: ProfileName,
    },
    /// A Spot price missing for a profile.
    #[error("[spot.price_per_hour_usd] has no {profile}: give every profile of the policy its Spot price")]
    SpotPriceMissing {
        /// The profile.
        profile: ProfileName,
    },
    /// CPU-only runs without a CPU profile, or GPU runs without a GPU one.
    #[error("the workload has {what} runs but the policy has no {what} profile: add one, or set {fix}")]
    NoLadder {
        /// "CPU-only" or "GPU".
        what: &'static str,
        /// The field to change instead.
        fix: &'static str,
    },
    /// The stage learned from is the stage planned.
    #[error("after = \"{0}\" is the stage planned: name the stage the submissions ran on before, or remove after")]
    AfterItself(Stage),
}

impl Workload {
    /// Parses and validates a workload file's text; `observed` durations (in
    /// seconds on the reference profile) replace its `[run_time]`.
    pub fn from_toml(text: &str, observed: Option<Vec<f64>>) -> Result<Workload, WorkloadError> {
        Workload::new(WorkloadConfig::from_toml(text)?, observed)
    }

    /// Validates a workload.
    pub fn new(config: WorkloadConfig, observed: Option<Vec<f64>>) -> Result<Workload, WorkloadError> {
        let policy = Policy::new(config.policy.clone())?;
        if config.submissions == 0 || config.submissions > SUBMISSIONS_MAX {
            return Err(range("submissions", config.submissions, "plan 1 to 50,000 submissions"));
        }
        share("cpu_only_share", config.cpu_only_share)?;
        if config.after == Some(config.stage) {
            return Err(WorkloadError::AfterItself(config.stage));
        }
        let run_time = match &config.run_time {
            Some(RunTimeConfig { mean_hours, cv }) => {
                if !(mean_hours.is_finite() && *mean_hours > 0.0 && *mean_hours <= 1000.0) {
                    return Err(range(
                        "run_time.mean_hours",
                        mean_hours,
                        "give a number of hours above 0, at most 1,000",
                    ));
                }
                if !(cv.is_finite() && (0.0..=10.0).contains(cv)) {
                    return Err(range("run_time.cv", cv, "give a coefficient of variation from 0 to 10"));
                }
                Some(RunTime::LogNormal { mean_hours: *mean_hours, cv: *cv })
            }
            None => None,
        };
        if let Some(memory) = &config.memory {
            share("memory.share", memory.share)?;
            let after = memory.runs_out_after;
            if !(after.is_finite() && after > 0.0 && after <= 1.0) {
                return Err(range("memory.runs_out_after", after, "give a share of the run above 0 and at most 1"));
            }
        }
        if let Some(spot) = &config.spot {
            let rate = spot.interruptions_per_hour;
            if !(rate.is_finite() && (0.0..=1.0).contains(&rate)) {
                return Err(range("spot.interruptions_per_hour", rate, "give a rate from 0 to 1 per instance-hour"));
            }
            for profile in policy.profiles() {
                match spot.price_per_hour_usd.get(&profile.name) {
                    None => return Err(WorkloadError::SpotPriceMissing { profile: profile.name.clone() }),
                    Some(price) if !(price.is_finite() && *price >= 0.0) => {
                        return Err(range("spot.price_per_hour_usd", price, "give finite prices of 0 or more"));
                    }
                    Some(_) => {}
                }
            }
            known(&policy, "[spot.price_per_hour_usd]", spot.price_per_hour_usd.keys())?;
        }
        let fleet = &config.fleet;
        match (&fleet.instances, fleet.deadline_hours) {
            (None, None) => return Err(WorkloadError::NoFleet),
            (Some(instances), _) => {
                for profile in policy.profiles() {
                    if !instances.contains_key(&profile.name) {
                        return Err(WorkloadError::FleetMissing { profile: profile.name.clone() });
                    }
                }
                known(&policy, "[fleet] instances", instances.keys())?;
            }
            (None, Some(_)) => {}
        }
        if let Some(deadline) = fleet.deadline_hours
            && !(deadline.is_finite() && deadline > 0.0 && deadline <= DEADLINE_MAX_HOURS)
        {
            return Err(range(
                "fleet.deadline_hours",
                deadline,
                "give a number of hours above 0, at most 4,380 (half a year)",
            ));
        }
        if policy.time_limit_secs() > TIME_LIMIT_MAX_SECS {
            return Err(range(
                "policy.time_limit_secs",
                policy.time_limit_secs(),
                "plan with a limit of at most 30 days",
            ));
        }
        let retry = policy.retry();
        if retry.attempts_max > RETRIES_MAX || retry.interruptions_max > RETRIES_MAX {
            let value = retry.attempts_max.max(retry.interruptions_max);
            return Err(range("policy.retry", value, "plan with attempts_max and interruptions_max of at most 50"));
        }
        if !(fleet.headroom.is_finite() && (0.0..=10.0).contains(&fleet.headroom)) {
            return Err(range("fleet.headroom", fleet.headroom, "give spare capacity from 0 to 10 (0.5: 50% more)"));
        }
        if let Some(budget) = config.budget_usd
            && !(budget.is_finite() && budget >= 0.0)
        {
            return Err(range("budget_usd", budget, "give a budget of 0 dollars or more"));
        }
        let has = |cpu: bool| policy.profiles().iter().any(|p| p.cpu_only == cpu);
        if config.cpu_only_share > 0.0 && !has(true) {
            return Err(WorkloadError::NoLadder { what: "CPU-only", fix: "cpu_only_share = 0" });
        }
        if config.cpu_only_share < 1.0 && !has(false) {
            return Err(WorkloadError::NoLadder { what: "GPU", fix: "cpu_only_share = 1" });
        }
        let run_time = match observed {
            Some(secs) if secs.is_empty() => return Err(WorkloadError::NothingObserved),
            Some(secs) => RunTime::Observed { secs },
            None => run_time.ok_or(WorkloadError::NoRunTime)?,
        };
        Ok(Workload { config, policy, run_time })
    }
}

fn range(field: &'static str, value: impl ToString, fix: &'static str) -> WorkloadError {
    WorkloadError::Range { field, value: value.to_string(), fix }
}

fn share(field: &'static str, value: f64) -> Result<(), WorkloadError> {
    if value.is_finite() && (0.0..=1.0).contains(&value) {
        Ok(())
    } else {
        Err(range(field, value, "give a share from 0 to 1"))
    }
}

fn known<'a>(
    policy: &Policy,
    table: &'static str,
    mut names: impl Iterator<Item = &'a ProfileName>,
) -> Result<(), WorkloadError> {
    match names.find(|name| policy.profile(name).is_none()) {
        Some(profile) => Err(WorkloadError::UnknownProfile { table, profile: profile.clone() }),
        None => Ok(()),
    }
}
