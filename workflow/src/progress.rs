//! How far the runs are and what finishing them takes: the organizer's view
//! (`evalflow status`), and the measure a budget is held to.
//!
//! A [`Tally`] takes the runs one at a time (the store is read as a stream,
//! never held whole) and estimates the rest from what the ended runs took.
//! Nothing it keeps depends on the clock, and a run can be taken out again
//! as it was put in: an engine keeps one up to date change by change
//! ([`Tally::change`]) and forecasts from it at any moment, however many
//! runs ended, in the time its live runs take.
//! A live run on profile p is expected to cost and take, in all, what the
//! ended runs that ran on p did (so the escalations seen are in the
//! estimate); a queued run what an ended run of its stage did. The ETA
//! places the live runs on the launch slots as the engine would: the runs
//! holding a slot first, then the queued ones oldest submission first, each
//! on the slot that frees first.

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};

use serde::{Deserialize, Serialize};

use crate::cost::{Billing, attempt_cost};
use crate::ids::{ProfileName, RunId, Stage};
use crate::machine::{Run, RunSpec, RunState, RunStatus, StateTag};
use crate::policy::Policy;
use crate::time::Timestamp;

/// How far a set of runs (the competition's, or a stage's) is.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Runs in all.
    pub total: u64,
    /// Runs ended: published, failed or cancelled.
    pub ended: u64,
    /// Runs queued for a launch slot.
    pub queued: u64,
    /// Runs launching or running a job now.
    pub running: u64,
    /// Of them, per profile.
    pub running_per_profile: BTreeMap<ProfileName, u64>,
    /// Runs that ended in the last hour.
    pub ended_last_hour: u64,
    /// Seconds until the last live run is expected to end; `None` until a
    /// run has ended to estimate from, or when no launch slot is configured.
    pub eta_secs: Option<u64>,
    /// What the attempts that ended cost, in US dollars.
    pub cost_usd: f64,
    /// What the live runs are expected to cost on top of it; `None` until a
    /// run has ended to estimate from.
    pub remaining_cost_usd: Option<f64>,
    /// `cost_usd + remaining_cost_usd`.
    pub projected_cost_usd: Option<f64>,
}

/// The whole competition's progress and each stage's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Forecast {
    /// Every run.
    #[serde(flatten)]
    pub whole: Progress,
    /// Per stage with runs.
    pub stages: BTreeMap<Stage, Progress>,
}

/// What a budget allows now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Allowance {
    /// The budget, in US dollars.
    pub budget_usd: f64,
    /// What the attempts that ended cost.
    pub spent_usd: f64,
    /// What the jobs running now cost so far (their time at their price).
    pub accrued_usd: f64,
    /// What the runs holding a launch slot are expected to cost on top of
    /// what their ended attempts cost, and never less than they accrued:
    /// the jobs running now, and what follows them.
    pub committed_usd: f64,
    /// What one more run is expected to cost, as the published runs did;
    /// before any was published, its price for the whole time limit.
    pub per_run_usd: f64,
    /// How many more queued runs may be admitted; `None`: any number (they cost nothing).
    pub admits: Option<u64>,
}

impl Allowance {
    /// Whether what was spent and what the running jobs accrued reach the
    /// budget: then not even a relaunch of a run already admitted goes out.
    pub fn spent(&self) -> bool {
        self.spent_usd + self.accrued_usd >= self.budget_usd
    }
}

/// Cost and job time of ended runs, summed.
#[derive(Debug, Clone, Copy, Default)]
struct Sums {
    runs: u64,
    usd: f64,
    secs: f64,
}

/// What a run is expected to take in all.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Expected {
    usd: f64,
    secs: f64,
}

impl Sums {
    fn mean(&self) -> Option<Expected> {
        let runs = self.runs as f64;
        (self.runs > 0).then(|| Expected { usd: self.usd / runs, secs: self.secs / runs })
    }
}

/// Which ended runs an estimate is drawn from: of one stage or all, that
/// ran on one profile or any.
type Key = (Option<Stage>, Option<ProfileName>);

/// A live run at some moment: as the tally keeps it, and what its running
/// job added by then.
#[derive(Debug, Clone)]
struct LiveRun<'t> {
    live: Cow<'t, Live>,
    /// How long its jobs ran so far, the current one's too.
    spent_secs: f64,
    /// What its running job cost so far.
    accrued_usd: f64,
}

/// A live run as the tally keeps it: what does not change with the clock.
#[derive(Debug, Clone)]
struct Live {
    stage: Stage,
    tag: StateTag,
    submitted_at: Timestamp,
    cpu_only: bool,
    /// The current attempt's profile, once admitted.
    profile: Option<ProfileName>,
    /// What its ended attempts cost.
    spent_usd: f64,
    /// How long its ended jobs ran.
    ended_secs: f64,
    /// When its running job was launched.
    running_since: Option<Timestamp>,
}

/// Whether a run is counted in or taken out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sign {
    In,
    Out,
}

impl Sign {
    fn count(self, n: &mut u64) {
        match self {
            Sign::In => *n += 1,
            Sign::Out => *n = n.saturating_sub(1),
        }
    }

    fn sum(self, total: &mut f64, value: f64) {
        match self {
            Sign::In => *total += value,
            Sign::Out => *total -= value,
        }
    }
}

/// The runs, taken one at a time.
#[derive(Debug, Clone)]
pub struct Tally {
    policy: Policy,
    billing: Billing,
    whole: Progress,
    stages: BTreeMap<Stage, Progress>,
    observed: HashMap<Key, Sums>,
    /// The same, of the published runs only: a budget's measure, which a
    /// run that failed at once (at no cost) must not bring down.
    published: HashMap<Key, Sums>,
    /// When the ended runs of each stage ended (ms), and how many then.
    ended_at: BTreeMap<Stage, BTreeMap<u64, u64>>,
    live: BTreeMap<RunId, Live>,
}

/// How long an ended run counts as ended lately.
const LATELY_MS: u64 = 3_600_000;

/// Whether a run in state `tag` has an entry in [`Tally`]'s live runs: all
/// but the published, failed and cancelled ones.
fn has_live_entry(tag: StateTag) -> bool {
    !matches!(tag, StateTag::Published | StateTag::Failed | StateTag::Cancelled)
}

impl Tally {
    /// An empty tally, costs billed as `billing`.
    pub fn new(policy: &Policy, billing: Billing) -> Tally {
        Tally {
            policy: policy.clone(),
            billing,
            whole: Progress::default(),
            stages: BTreeMap::new(),
            observed: HashMap::new(),
            published: HashMap::new(),
            ended_at: BTreeMap::new(),
            live: BTreeMap::new(),
        }
    }

    /// Counts `run`.
    pub fn add(&mut self, run: &Run) {
        self.count(&run.spec, &run.status, Sign::In, false);
    }

    /// Takes out `run`, counted before as it is.
    pub fn remove(&mut self, run: &Run) {
        self.count(&run.spec, &run.status, Sign::Out, false);
    }

    /// Follows a run of `spec` from `before` (`None`: a new run) to `after`.
    pub fn change(&mut self, spec: &RunSpec, before: Option<&RunStatus>, after: &RunStatus) {
        // A run that stays live keeps its entry, overwritten below.
        let stays_live = has_live_entry(after.state.tag());
        if let Some(before) = before {
            self.count(spec, before, Sign::Out, stays_live);
        }
        self.count(spec, after, Sign::In, false);
    }

    /// Counts the run of `spec` in `status` in or out; out, it keeps its
    /// live entry when `keep_live` (it is about to be counted in, live).
    fn count(&mut self, spec: &RunSpec, status: &RunStatus, sign: Sign, keep_live: bool) {
        let tag = status.state.tag();
        let (usd, secs) = status.attempts.iter().fold((0.0, 0.0), |(usd, secs), a| {
            let cost = attempt_cost(a, &self.policy, self.billing).map_or(0.0, |(_, usd)| usd);
            (usd + cost, secs + a.usage.as_ref().map_or(0.0, crate::JobUsage::running_secs))
        });
        let profile = match &status.state {
            RunState::Launching { profile, .. } | RunState::Running { profile, .. } => Some(profile),
            _ => None,
        };
        if tag.is_terminal() {
            let ended = self.ended_at.entry(spec.stage).or_default();
            let at = ended.entry(status.updated_at.as_millis()).or_default();
            sign.count(at);
            if *at == 0 {
                ended.remove(&status.updated_at.as_millis());
            }
        }
        let stage = self.stages.entry(spec.stage).or_default();
        for progress in [&mut self.whole, stage] {
            sign.count(&mut progress.total);
            if tag.is_terminal() {
                sign.count(&mut progress.ended);
            }
            if tag == StateTag::Queued {
                sign.count(&mut progress.queued);
            }
            sign.sum(&mut progress.cost_usd, usd);
            if let Some(profile) = profile {
                sign.count(&mut progress.running);
                let on = progress.running_per_profile.entry(profile.clone()).or_default();
                sign.count(on);
                if *on == 0 {
                    progress.running_per_profile.remove(profile);
                }
            }
        }
        if self.stages.get(&spec.stage).is_some_and(|p| p.total == 0) {
            self.stages.remove(&spec.stage);
            self.ended_at.remove(&spec.stage);
        }
        if self.whole.total == 0 {
            // Nothing left: no sum keeps what rounding left of what was taken out.
            self.whole.cost_usd = 0.0;
        }
        // What a cancelled run took says nothing of what a run takes.
        if matches!(tag, StateTag::Published | StateTag::Failed) {
            let mut profiles: Vec<&ProfileName> = status.attempts.iter().map(|a| &a.profile).collect();
            profiles.sort();
            profiles.dedup();
            let keys = [(Some(spec.stage), None), (None, None)].into_iter().chain(
                profiles.into_iter().flat_map(|p| [(Some(spec.stage), Some(p.clone())), (None, Some(p.clone()))]),
            );
            for key in keys {
                let mut maps = vec![&mut self.observed];
                if tag == StateTag::Published {
                    maps.push(&mut self.published);
                }
                for map in maps {
                    let sums = map.entry(key.clone()).or_default();
                    sign.count(&mut sums.runs);
                    sign.sum(&mut sums.usd, usd);
                    sign.sum(&mut sums.secs, secs);
                    if sums.runs == 0 {
                        map.remove(&key);
                    }
                }
            }
        }
        if !has_live_entry(tag) {
            return;
        }
        match sign {
            Sign::Out => {
                if !keep_live {
                    self.live.remove(&spec.run);
                }
            }
            Sign::In => {
                let running_since = match (&status.state, status.attempts.last()) {
                    (RunState::Running { .. }, Some(current)) => Some(current.launched_at),
                    _ => None,
                };
                let live = Live {
                    stage: spec.stage,
                    tag,
                    submitted_at: spec.submitted_at,
                    cpu_only: spec.cpu_only,
                    profile: profile.cloned(),
                    spent_usd: usd,
                    ended_secs: secs,
                    running_since,
                };
                match self.live.get_mut(&spec.run) {
                    Some(entry) => *entry = live,
                    None => _ = self.live.insert(spec.run.clone(), live),
                }
            }
        }
    }

    /// The live runs as they are at `now`, in id order.
    fn live_at(&self, now: Timestamp) -> Vec<LiveRun<'_>> {
        self.live
            .values()
            .map(|live| {
                let running_secs = live.running_since.map_or(0.0, |since| now.since(since).as_secs_f64());
                LiveRun {
                    spent_secs: live.ended_secs + running_secs,
                    accrued_usd: live.profile.as_ref().map_or(0.0, |p| self.price_of(p, running_secs)),
                    live: Cow::Borrowed(live),
                }
            })
            .collect()
    }

    /// The runs of `stage` (all: `None`) that ended in the hour before `now`.
    fn ended_lately(&self, stage: Option<Stage>, now: Timestamp) -> u64 {
        let from = now.as_millis().saturating_sub(LATELY_MS - 1);
        let of = |ended: &BTreeMap<u64, u64>| ended.range(from..).map(|(_, n)| n).sum::<u64>();
        match stage {
            Some(stage) => self.ended_at.get(&stage).map_or(0, of),
            None => self.ended_at.values().map(of).sum(),
        }
    }

    /// What a run of `stage` on `profile` (or queued) is expected to take in
    /// all, from the closest ended runs of `observed` there are.
    fn expected(observed: &HashMap<Key, Sums>, stage: Stage, profile: Option<&ProfileName>) -> Option<Expected> {
        let mut keys = vec![(Some(stage), None), (None, None)];
        if let Some(profile) = profile {
            keys.splice(0..0, [(Some(stage), Some(profile.clone())), (None, Some(profile.clone()))]);
        }
        keys.iter().find_map(|key| observed.get(key).and_then(Sums::mean))
    }

    /// What `secs` of running on `profile` cost, billed as the tally bills.
    fn price_of(&self, profile: &ProfileName, secs: f64) -> f64 {
        let Some(profile) = self.policy.profile(profile) else { return 0.0 };
        let speed = match self.billing {
            Billing::Actual => 1.0,
            Billing::ScaledBySpeed => profile.relative_speed,
        };
        secs / 3600.0 / speed * profile.price_per_hour_usd
    }

    /// What one attempt of `run` costs if it runs to the time limit.
    fn worst_usd(&self, run: &LiveRun) -> f64 {
        let profile = match &run.live.profile {
            Some(name) => Some(name.clone()),
            None => self.policy.first_profile(run.live.cpu_only).map(|p| p.name.clone()),
        };
        profile.map_or(0.0, |p| self.price_of(&p, self.policy.time_limit_secs() as f64))
    }

    /// What `run` is expected to cost and take from now on, as the ended
    /// runs of `observed` did; nothing once its job is done.
    fn remaining_in(&self, observed: &HashMap<Key, Sums>, run: &LiveRun) -> Option<Expected> {
        if matches!(run.live.tag, StateTag::Predicted | StateTag::Scored) {
            return Some(Expected { usd: 0.0, secs: 0.0 }); // scoring and publishing take no slot
        }
        let expected = Self::expected(observed, run.live.stage, run.live.profile.as_ref())?;
        Some(Expected {
            usd: (expected.usd - run.live.spent_usd).max(0.0),
            secs: (expected.secs - run.spent_secs).max(0.0),
        })
    }

    fn remaining(&self, run: &LiveRun) -> Option<Expected> {
        self.remaining_in(&self.observed, run)
    }

    /// The progress at `now`, with its estimates, when `slots` jobs may run at once.
    pub fn forecast(&self, slots: u64, now: Timestamp) -> Forecast {
        let mut whole = self.whole.clone();
        let mut stages = self.stages.clone();
        whole.ended_last_hour = self.ended_lately(None, now);
        for (stage, progress) in &mut stages {
            progress.ended_last_hour = self.ended_lately(Some(*stage), now);
        }
        let live = self.live_at(now);
        let remaining: Option<Vec<Expected>> = live.iter().map(|run| self.remaining(run)).collect();
        if let Some(remaining) = remaining {
            let mut cost: BTreeMap<Stage, f64> = BTreeMap::new();
            for (run, left) in live.iter().zip(&remaining) {
                *cost.entry(run.live.stage).or_default() += left.usd;
            }
            whole.remaining_cost_usd = Some(cost.values().fold(0.0, |total, usd| total + usd));
            for (stage, progress) in &mut stages {
                progress.remaining_cost_usd = Some(cost.get(stage).copied().unwrap_or(0.0));
            }
            if let Some(ends) = Self::schedule(&live, &remaining, slots) {
                whole.eta_secs = Some(ends.values().copied().max().unwrap_or(0));
                for (stage, progress) in &mut stages {
                    progress.eta_secs = Some(ends.get(stage).copied().unwrap_or(0));
                }
            }
        }
        for progress in std::iter::once(&mut whole).chain(stages.values_mut()) {
            progress.projected_cost_usd = progress.remaining_cost_usd.map(|usd| progress.cost_usd + usd);
        }
        Forecast { whole, stages }
    }

    /// When each stage's last live run ends, in seconds from now, placed on
    /// `slots` as the engine admits them; `None` without a slot for the queued.
    fn schedule(live: &[LiveRun], remaining: &[Expected], slots: u64) -> Option<BTreeMap<Stage, u64>> {
        let mut ends: BTreeMap<Stage, u64> = BTreeMap::new();
        let mut end_at = |stage: Stage, end: u64| {
            let last = ends.entry(stage).or_default();
            *last = (*last).max(end);
        };
        let secs = |i: usize| remaining[i].secs.ceil() as u64;
        // When each slot frees: the runs holding one keep it until they end.
        let mut free: BinaryHeap<Reverse<u64>> = BinaryHeap::new();
        let mut queued = Vec::new();
        for (i, run) in live.iter().enumerate() {
            match run.live.tag {
                StateTag::Queued => queued.push(i),
                // Its job is done: scoring and publishing take no slot.
                StateTag::Predicted | StateTag::Scored => end_at(run.live.stage, 0),
                _ => {
                    free.push(Reverse(secs(i)));
                    end_at(run.live.stage, secs(i));
                }
            }
        }
        let slots = usize::try_from(slots).unwrap_or(usize::MAX);
        // Above the slots (the configuration lowered them), the first to end free none.
        while free.len() > slots {
            free.pop();
        }
        queued.sort_by_key(|&i| (live[i].live.submitted_at, i));
        for i in queued {
            let start = if free.len() < slots { 0 } else { free.pop()?.0 };
            free.push(Reverse(start + secs(i)));
            end_at(live[i].live.stage, start + secs(i));
        }
        Some(ends)
    }

    /// What `budget_usd` allows now: how many more queued runs may be admitted.
    ///
    /// Runs are counted at what the published runs cost; before any was
    /// published, at their price for the whole time limit, and one run is
    /// let through while none runs, to learn from. A running job commits at
    /// least what it accrued so far.
    pub fn allowance(&self, budget_usd: f64, now: Timestamp) -> Allowance {
        let live = self.live_at(now);
        let expected_usd = |run: &LiveRun| match self.remaining_in(&self.published, run) {
            Some(left) => left.usd,
            None => (self.worst_usd(run) - run.live.spent_usd).max(0.0),
        };
        let holding: Vec<&LiveRun> = live.iter().filter(|r| r.live.tag != StateTag::Queued).collect();
        let committed_usd =
            holding.iter().map(|r| expected_usd(r).max(r.accrued_usd)).fold(0.0, |total, usd| total + usd);
        let accrued_usd = holding.iter().map(|r| r.accrued_usd).fold(0.0, |total, usd| total + usd);
        // The runs queued, and any run submitted before the next look.
        let any = Stage::ALL.into_iter().flat_map(|stage| {
            [false, true].map(|cpu_only| LiveRun {
                live: Cow::Owned(Live {
                    stage,
                    tag: StateTag::Queued,
                    submitted_at: now,
                    cpu_only,
                    profile: None,
                    spent_usd: 0.0,
                    ended_secs: 0.0,
                    running_since: None,
                }),
                spent_secs: 0.0,
                accrued_usd: 0.0,
            })
        });
        let queued: Vec<LiveRun> = live.iter().filter(|r| r.live.tag == StateTag::Queued).cloned().chain(any).collect();
        let mut per_run_usd = queued.iter().map(expected_usd).fold(0.0, f64::max);
        if per_run_usd <= 0.0 {
            // Published runs that cost nothing: a run still counts at its time limit's price.
            per_run_usd = queued.iter().map(|r| self.worst_usd(r)).fold(0.0, f64::max);
        }
        let spent_usd = self.whole.cost_usd;
        let headroom = budget_usd - spent_usd - committed_usd;
        let admits = if headroom <= 0.0 {
            Some(0)
        } else if per_run_usd <= 0.0 {
            None // every profile is free
        } else {
            let fits = (headroom / per_run_usd).floor() as u64;
            let probe = self.published.is_empty() && holding.is_empty();
            Some(fits.max(u64::from(probe)))
        };
        Allowance { budget_usd, spent_usd, accrued_usd, committed_usd, per_run_usd, admits }
    }
}

#[cfg(test)]
mod tests;
