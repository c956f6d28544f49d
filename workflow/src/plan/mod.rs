//! The planner: how many instances, how long, how much. A whole competition
//! is simulated ([`crate::sim`]) on the real engine and policy, without
//! faults, once for each policy compared, and its cost is the cost report
//! of the runs' own records ([`cost_report`]). With a deadline, the smallest
//! fleet that meets it is searched for, policy by policy.
//!
//! Every policy sees the same submissions (the same draws from the
//! workload's seed), so the differences between them are the policies'.

use std::collections::BTreeMap;
use std::time::Duration;

use rand::rngs::Xoshiro256PlusPlus;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, LogNormal};
use serde::{Deserialize, Serialize};

use crate::cost::{Billing, cost_report};
use crate::engine::EngineError;
use crate::ids::{ProfileName, Stage, SubmissionId, TeamId};
use crate::machine::{AttemptEnd, JobOutcome, Run, RunSpec, StateTag, SubmissionSource, is_audit_name};
use crate::policy::{Policy, PolicyConfig};
use crate::sim::{Faults, Nature, Scenario, simulate_on};
use crate::store::{MemoryStore, RunFilter, WorkflowStore, all_runs};
use crate::time::Timestamp;

pub mod workload;

pub use workload::{RunTime, Workload, WorkloadConfig, WorkloadError};

/// When the planned stage's simulation starts (an earlier stage learned
/// from runs before it).
const START: Timestamp = Timestamp(1_800_000_000_000);
/// How long a simulation may run in virtual time: a fleet too small to end
/// within it is reported as not ending.
const HORIZON: Duration = Duration::from_secs(365 * 24 * 3600);
/// The fleet-size factor searched up to (the smallest fleet at most 64
/// times the deadline's share of the work).
const SCALE_MAX: f64 = 64.0;
/// Bisections of the fleet-size factor.
const BISECTIONS: u32 = 10;

/// A policy compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Variant {
    /// Every run, CPU-only ones too, on the fastest GPU profile.
    AllOnFastest,
    /// Every run, CPU-only ones too, on the cheapest GPU profile.
    AllOnCheapest,
    /// The workload's ladder: the cheapest profile first, a bigger one after
    /// running out of memory, CPU-only runs on the CPU ladder.
    Ladder {
        /// On Spot instances, at Spot prices, interrupted at the workload's rate.
        spot: bool,
        /// Placement learned from the stage run before.
        learned: bool,
    },
}

/// A plan: the workload's own policy, then every policy compared.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Submissions planned.
    pub submissions: usize,
    /// The stage planned.
    pub stage: Stage,
    /// The stage learned from, if any.
    pub after: Option<Stage>,
    /// The mean running time drawn, on the reference profile, in hours.
    pub mean_run_hours: f64,
    /// The deadline, if any.
    pub deadline_hours: Option<f64>,
    /// Spare capacity on top of the smallest fleet.
    pub headroom: f64,
    /// The budget, if any.
    pub budget_usd: Option<f64>,
    /// The workload's own policy (its ladder, on Spot if `[spot]` is given,
    /// learning across stages if it runs after another).
    #[serde(flatten)]
    pub chosen: PolicyPlan,
    /// Every policy compared, the chosen one among them.
    pub policies: Vec<PolicyPlan>,
}

/// What one policy does to the workload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyPlan {
    /// The policy in words.
    pub name: String,
    /// The policy.
    pub variant: Variant,
    /// From the first submission to the last run's end, in hours; `None`
    /// when some run never ends (a fleet without a profile it needs).
    pub makespan_hours: Option<f64>,
    /// Billed hours in all.
    pub total_hours: f64,
    /// Cost in all, in US dollars.
    pub total_cost_usd: f64,
    /// Whether it ends within the deadline, when there is one.
    pub deadline_met: Option<bool>,
    /// Whether it costs no more than the budget, when there is one.
    pub within_budget: Option<bool>,
    /// How the runs ended.
    pub runs: RunCounts,
    /// Per profile of the policy.
    pub profiles: Vec<ProfilePlan>,
    /// Why the deadline cannot be met, when it cannot.
    pub note: Option<String>,
}

/// How the planned runs ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunCounts {
    /// Published.
    pub published: usize,
    /// Failed (out of memory at the top of the ladder, timed out, interrupted too often).
    pub failed: usize,
    /// Never ended.
    pub unfinished: usize,
}

/// One profile's share of a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfilePlan {
    /// The profile.
    pub name: ProfileName,
    /// Billed hours on it.
    pub hours: f64,
    /// Their cost.
    pub cost_usd: f64,
    /// The most instances busy at once.
    pub peak_instances: usize,
    /// The instances simulated: the fleet given, or the smallest found.
    pub fleet: usize,
    /// The instances to provision: the fleet with the headroom.
    pub provision: usize,
}

/// Instances per profile.
type Fleet = BTreeMap<ProfileName, usize>;

/// A submission as the plan draws it.
struct Drawn {
    id: SubmissionId,
    cpu_only: bool,
    nature: Nature,
}

/// Plans `workload`: every policy compared, each on the fleet given or on
/// the smallest that meets the deadline.
pub fn plan(workload: &Workload) -> Result<Plan, EngineError> {
    let drawn = draw(workload);
    let mean_run_hours = drawn.iter().map(|d| d.nature.reference_secs).sum::<f64>() / drawn.len() as f64 / 3600.0;
    let variants = variants(workload);
    // The policies on as many threads as there are cores, a few at a time.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut policies = Vec::with_capacity(variants.len());
    for some in variants.chunks(cores) {
        let planned: Vec<Result<PolicyPlan, EngineError>> = std::thread::scope(|scope| {
            let handles: Vec<_> =
                some.iter().map(|v| scope.spawn(|| Planner::new(workload, &drawn, *v).plan())).collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))).collect()
        });
        for plan in planned {
            policies.push(plan?);
        }
    }
    let chosen = chosen(workload);
    let chosen = policies.iter().find(|p| p.variant == chosen).cloned().unwrap_or_else(|| policies[0].clone());
    let config = &workload.config;
    Ok(Plan {
        submissions: config.submissions,
        stage: config.stage,
        after: config.after,
        mean_run_hours,
        deadline_hours: config.fleet.deadline_hours,
        headroom: config.fleet.headroom,
        budget_usd: config.budget_usd,
        chosen,
        policies,
    })
}

/// How long the runs of `runs` whose last job ran to its end (succeeded,
/// whatever its predictions then scored) took on the reference profile (of
/// `relative_speed` 1), in seconds: that job's running time at its
/// profile's speed, billed as `billing` says. Audits (re-runs of a run) are
/// left out.
pub fn observed_secs<'a>(runs: impl IntoIterator<Item = &'a Run>, policy: &Policy, billing: Billing) -> Vec<f64> {
    runs.into_iter()
        .filter(|run| !is_audit_name(run.spec.submission.as_str()))
        .filter_map(|run| {
            let last = run.status.attempts.last()?;
            let succeeded = matches!(last.end, Some(AttemptEnd::Job(JobOutcome::Succeeded)));
            let secs = last.usage.as_ref().filter(|_| succeeded)?.running_secs();
            let speed = match billing {
                Billing::Actual => policy.profile(&last.profile)?.relative_speed,
                // The local stand-in's time is already the reference's (see `Billing`).
                Billing::ScaledBySpeed => 1.0,
            };
            Some(secs * speed).filter(|secs| secs.is_finite() && *secs > 0.0)
        })
        .collect()
}

/// The workload's own policy.
fn chosen(workload: &Workload) -> Variant {
    let learned = workload.config.after.is_some() && workload.policy.learns_across_stages();
    Variant::Ladder { spot: workload.config.spot.is_some(), learned }
}

/// The policies compared: all on the fastest GPU, all on the cheapest, the
/// ladder; with and without Spot when `[spot]` is given, with and without
/// placement learned when the workload runs after another stage.
fn variants(workload: &Workload) -> Vec<Variant> {
    let mut variants = vec![Variant::AllOnFastest];
    if fastest_gpu(&workload.policy) != cheapest_gpu(&workload.policy) {
        variants.push(Variant::AllOnCheapest);
    }
    let spots: &[bool] = if workload.config.spot.is_some() { &[false, true] } else { &[false] };
    let learns: &[bool] = if workload.config.after.is_some() { &[false, true] } else { &[false] };
    for &spot in spots {
        for &learned in learns {
            variants.push(Variant::Ladder { spot, learned });
        }
    }
    variants
}

fn fastest_gpu(policy: &Policy) -> Option<&ProfileName> {
    let gpus = policy.profiles().iter().filter(|p| !p.cpu_only);
    gpus.fold(None, |best: Option<&crate::policy::Profile>, p| match best {
        Some(b) if b.relative_speed >= p.relative_speed => Some(b),
        _ => Some(p),
    })
    .map(|p| &p.name)
}

fn cheapest_gpu(policy: &Policy) -> Option<&ProfileName> {
    policy.first_profile(false).map(|p| &p.name)
}

/// The submissions, drawn once from the workload's seed. The shares are
/// exact (of 4,200 submissions, a share of 0.143 is 601 CPU-only ones),
/// the submissions they fall on drawn at random; running times are drawn
/// per submission.
fn draw(workload: &Workload) -> Vec<Drawn> {
    let config = &workload.config;
    let count = config.submissions;
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(config.seed);
    let mut order: Vec<usize> = (0..count).collect();
    order.shuffle(&mut rng);
    let cpu_only = (config.cpu_only_share * count as f64).round() as usize;
    let memory = config.memory.as_ref();
    let big = memory.map_or(0, |m| (m.share * (count - cpu_only) as f64).round() as usize);
    // The first in the shuffled order are CPU-only, the next need more memory.
    let mut kind = vec![(false, false); count];
    for (rank, &n) in order.iter().enumerate() {
        kind[n] = (rank < cpu_only, rank >= cpu_only && rank < cpu_only + big);
    }
    let lognormal = match &workload.run_time {
        RunTime::LogNormal { mean_hours, cv } if *cv > 0.0 => LogNormal::from_mean_cv(*mean_hours, *cv).ok(),
        _ => None,
    };
    kind.into_iter()
        .enumerate()
        .map(|(n, (cpu_only, big))| {
            let hours = match (&workload.run_time, lognormal) {
                (_, Some(lognormal)) => lognormal.sample(&mut rng),
                (RunTime::LogNormal { mean_hours, .. }, None) => *mean_hours,
                (RunTime::Observed { secs }, None) => secs[rng.random_range(0..secs.len())] / 3600.0,
            };
            let needs = memory.filter(|_| big).map(|m| (m.resource, m.need_mib));
            let score = rng.random_range(0.05..0.7);
            let id = SubmissionId::new(format!("s{n:06}")).unwrap_or_else(|e| unreachable!("{e}"));
            Drawn { id, cpu_only, nature: Nature { reference_secs: hours * 3600.0, needs, score } }
        })
        .collect()
}

/// One policy's simulations.
struct Planner<'a> {
    workload: &'a Workload,
    drawn: &'a [Drawn],
    variant: Variant,
    policy: Policy,
    /// The store of the stage run before, to learn from.
    before: Option<(MemoryStore, Timestamp)>,
}

/// One simulation's figures.
struct Simulation {
    makespan_hours: Option<f64>,
    runs: RunCounts,
    /// Per profile: billed hours, cost, peak instances.
    lines: Vec<(ProfileName, f64, f64, usize)>,
}

impl Simulation {
    fn busy_hours(&self) -> BTreeMap<ProfileName, f64> {
        self.lines.iter().map(|(name, hours, _, _)| (name.clone(), *hours)).collect()
    }

    fn ends_by(&self, deadline_hours: f64) -> bool {
        self.makespan_hours.is_some_and(|h| h <= deadline_hours)
    }
}

impl<'a> Planner<'a> {
    fn new(workload: &'a Workload, drawn: &'a [Drawn], variant: Variant) -> Planner<'a> {
        Planner { workload, drawn, variant, policy: variant_policy(workload, variant), before: None }
    }

    fn plan(mut self) -> Result<PolicyPlan, EngineError> {
        let learned = matches!(self.variant, Variant::Ladder { learned: true, .. });
        if let (true, Some(after)) = (learned, self.workload.config.after) {
            self.before = Some(self.stage_before(after)?);
        }
        let config = &self.workload.config.fleet;
        let (fleet, simulation, note) = match (&config.instances, config.deadline_hours) {
            (Some(instances), _) => (instances.clone(), self.simulate(instances, HORIZON)?, None),
            (None, Some(deadline)) => self.smallest_fleet(deadline)?,
            (None, None) => unreachable!("a validated workload has a fleet or a deadline"),
        };
        Ok(self.report(&fleet, simulation, note))
    }

    /// Runs the stage before on a fleet that starts every run at once; its
    /// store is what the planned stage learns from.
    fn stage_before(&self, stage: Stage) -> Result<(MemoryStore, Timestamp), EngineError> {
        let unbounded = self.unbounded_fleet();
        let scenario = self.scenario(stage, START, &unbounded, HORIZON);
        let simulated = simulate_on(MemoryStore::new(), &scenario, self.workload.config.seed)?;
        Ok((simulated.store, simulated.end.plus_ms(3_600_000)))
    }

    /// As many instances of every profile as there are runs.
    fn unbounded_fleet(&self) -> Fleet {
        self.policy.profiles().iter().map(|p| (p.name.clone(), self.drawn.len())).collect()
    }

    /// The smallest fleet that ends by `deadline`: the work each profile
    /// did on an unbounded fleet, spread over the deadline and scaled up
    /// until it ends in time (doubling, then bisecting the factor), never
    /// above the unbounded run's peaks (which start every job at once).
    fn smallest_fleet(&self, deadline: f64) -> Result<(Fleet, Simulation, Option<String>), EngineError> {
        let free = self.simulate(&self.unbounded_fleet(), HORIZON)?;
        let peaks: Fleet = free.lines.iter().map(|(name, _, _, peak)| (name.clone(), *peak)).collect();
        if !free.ends_by(deadline) {
            let took = free.makespan_hours.map_or("do not end within a year".into(), |h| format!("take {h:.1} h"));
            let note = format!("no fleet meets the {deadline} h deadline: with every run started at once, runs {took}");
            return Ok((peaks, free, Some(note)));
        }
        // A candidate that has not ended by twice the deadline has missed it.
        let cut = Duration::from_secs_f64(deadline * 2.0 * 3600.0).min(HORIZON);
        let work = free.busy_hours();
        let fleet_at = |scale: f64| -> Fleet {
            work.iter()
                .map(|(name, hours)| {
                    let count = if *hours > 0.0 { ((scale * hours / deadline).ceil() as usize).max(1) } else { 0 };
                    (name.clone(), count.min(peaks.get(name).copied().unwrap_or(0)))
                })
                .collect()
        };
        // Below a factor of 1 a profile does less work per hour than the
        // deadline needs: 1 is where the search starts.
        let mut best = (peaks.clone(), free);
        let (mut low, mut high) = (None, 1.0);
        while high <= SCALE_MAX {
            let fleet = fleet_at(high);
            if fleet == best.0 {
                break;
            }
            let simulation = self.simulate(&fleet, cut)?;
            if simulation.ends_by(deadline) {
                best = (fleet, simulation);
                break;
            }
            low = Some(high);
            high *= 2.0;
        }
        let Some(mut low) = low else { return Ok((best.0, best.1, None)) };
        for _ in 0..BISECTIONS {
            let middle = (low + high) / 2.0;
            let fleet = fleet_at(middle);
            if fleet == best.0 {
                high = middle;
            } else if fleet == fleet_at(low) {
                low = middle;
            } else {
                let simulation = self.simulate(&fleet, cut)?;
                if simulation.ends_by(deadline) {
                    high = middle;
                    best = (fleet, simulation);
                } else {
                    low = middle;
                }
            }
        }
        Ok((best.0, best.1, None))
    }

    /// The planned stage on `fleet`, for `horizon` at most.
    fn simulate(&self, fleet: &Fleet, horizon: Duration) -> Result<Simulation, EngineError> {
        let (store, start) = match &self.before {
            Some((store, start)) => (store.clone(), *start),
            None => (MemoryStore::new(), START),
        };
        let stage = self.workload.config.stage;
        let scenario = self.scenario(stage, start, fleet, horizon);
        let simulated = simulate_on(store, &scenario, self.workload.config.seed)?;
        let mut statuses = Vec::new();
        let mut runs = RunCounts::default();
        for id in all_runs(&simulated.store, RunFilter::All)? {
            let Some(stored) = simulated.store.load(&id)? else { continue };
            if stored.run.spec.stage != stage {
                continue;
            }
            match stored.run.status.state.tag() {
                StateTag::Published => runs.published += 1,
                StateTag::Failed => runs.failed += 1,
                _ => runs.unfinished += 1,
            }
            statuses.push(stored.run.status);
        }
        let report = cost_report(&statuses, &self.policy, Billing::Actual);
        let usage = simulated.world.usage();
        let lines = report
            .lines
            .into_iter()
            .map(|line| {
                let peak = usage.get(&line.profile).map_or(0, |(_, peak)| *peak);
                (line.profile, line.hours, line.usd, peak)
            })
            .collect();
        let makespan_hours = (runs.unfinished == 0).then(|| simulated.end.since(start).as_secs_f64() / 3600.0);
        Ok(Simulation { makespan_hours, runs, lines })
    }

    /// The scenario of `stage`: every submission submitted at `start`.
    fn scenario(&self, stage: Stage, start: Timestamp, fleet: &Fleet, horizon: Duration) -> Scenario {
        let on_gpu = matches!(self.variant, Variant::AllOnFastest | Variant::AllOnCheapest);
        let team = TeamId::new("team").unwrap_or_else(|e| unreachable!("{e}"));
        let submissions = self
            .drawn
            .iter()
            .map(|d| {
                let source = SubmissionSource::Image { uri: format!("plan/{}", d.id) };
                let spec = RunSpec::new(d.id.clone(), team.clone(), stage, d.cpu_only && !on_gpu, source, start);
                (spec, d.nature.clone())
            })
            .collect();
        let config = &self.workload.config;
        let spot = matches!(self.variant, Variant::Ladder { spot: true, .. });
        Scenario {
            policy: self.policy.clone(),
            submissions,
            instances: fleet.clone(),
            interruptions_per_hour: config.spot.as_ref().filter(|_| spot).map_or(0.0, |s| s.interruptions_per_hour),
            oom_after: config.memory.as_ref().map_or(0.05, |m| m.runs_out_after),
            // The fleet queues what it cannot start, as a Batch job queue does.
            max_active: self.drawn.len(),
            requests: Vec::new(),
            faults: Faults::default(),
            resend_after: Duration::from_secs(300),
            reconcile_every: Duration::from_secs(12 * 3600),
            horizon,
        }
    }

    fn report(&self, fleet: &Fleet, simulation: Simulation, note: Option<String>) -> PolicyPlan {
        let config = &self.workload.config;
        let headroom = config.fleet.headroom;
        let profiles: Vec<ProfilePlan> = simulation
            .lines
            .iter()
            .map(|(name, hours, cost_usd, peak_instances)| {
                let fleet = fleet.get(name).copied().unwrap_or(0);
                ProfilePlan {
                    name: name.clone(),
                    hours: *hours,
                    cost_usd: *cost_usd,
                    peak_instances: *peak_instances,
                    fleet,
                    provision: (fleet as f64 * (1.0 + headroom)).ceil() as usize,
                }
            })
            .collect();
        let unfinished = simulation.runs.unfinished;
        let note = note.or_else(|| {
            (unfinished > 0).then(|| {
                format!(
                    "{unfinished} runs do not end within a year on this fleet: a profile they need has no instance, \
                     or the fleet is far too small"
                )
            })
        });
        let total_hours = profiles.iter().fold(0.0, |total, p| total + p.hours);
        let total_cost_usd = profiles.iter().fold(0.0, |total, p| total + p.cost_usd);
        PolicyPlan {
            name: name(&self.policy, self.variant),
            variant: self.variant,
            makespan_hours: simulation.makespan_hours,
            total_hours,
            total_cost_usd,
            deadline_met: config.fleet.deadline_hours.map(|d| simulation.ends_by(d)),
            within_budget: config.budget_usd.map(|budget| total_cost_usd <= budget),
            runs: simulation.runs,
            profiles,
            note,
        }
    }
}

/// The policy of `variant`: the workload's, its ladder cut down to one GPU
/// profile for the "all on" ones, at Spot prices on Spot, learning across
/// stages only where it says so.
fn variant_policy(workload: &Workload, variant: Variant) -> Policy {
    let mut config: PolicyConfig = workload.config.policy.clone();
    let only = match variant {
        Variant::AllOnFastest => fastest_gpu(&workload.policy),
        Variant::AllOnCheapest => cheapest_gpu(&workload.policy),
        Variant::Ladder { .. } => None,
    };
    if let Some(only) = only {
        config.profile.retain(|p| &p.name == only);
    }
    let (spot, learned) = match variant {
        Variant::Ladder { spot, learned } => (spot, learned),
        Variant::AllOnFastest | Variant::AllOnCheapest => (false, false),
    };
    if let (true, Some(prices)) = (spot, &workload.config.spot) {
        for profile in &mut config.profile {
            if let Some(price) = prices.price_per_hour_usd.get(&profile.name) {
                profile.price_per_hour_usd = *price;
            }
        }
    }
    config.learn_across_stages = learned;
    Policy::new(config).unwrap_or_else(|e| unreachable!("a part of a valid policy is valid: {e}"))
}

/// A policy in words: "all on p3", "g4 → p3 on Spot, placement learned".
fn name(policy: &Policy, variant: Variant) -> String {
    let mut gpus: Vec<_> = policy.profiles().iter().filter(|p| !p.cpu_only).collect();
    gpus.sort_by(|a, b| a.relative_speed.total_cmp(&b.relative_speed));
    let ladder = gpus.iter().map(|p| p.name.as_str()).collect::<Vec<_>>().join(" → ");
    match variant {
        Variant::AllOnFastest | Variant::AllOnCheapest => format!("all on {ladder}"),
        Variant::Ladder { spot, learned } => {
            let spot = if spot { " on Spot" } else { "" };
            let learned = if learned { ", placement learned" } else { "" };
            format!("{ladder}{spot}{learned}")
        }
    }
}

#[cfg(test)]
mod tests;
