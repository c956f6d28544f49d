//! The simulated fleet: what the engine's commands do in a world of
//! instances. Jobs wait for an instance of their profile, run for their
//! submission's time at the profile's speed, and end as their fate says: out
//! of memory on a profile too small, interrupted (Spot) at a rate per hour,
//! timed out past the limit, or succeeded. It keeps the truth the checks
//! compare the store with: every job ever started, the leaderboard, the time
//! each profile's instances were busy.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use rand::RngExt;
use rand::rngs::Xoshiro256PlusPlus;

use crate::ids::{Attempt, JobId, ProfileName, RunId};
use crate::machine::{Activity, Detail, JobOutcome, Score};
use crate::policy::{Policy, Resource};
use crate::time::Timestamp;

/// What a submission is, as the world runs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Nature {
    /// Its running time on a profile of `relative_speed` 1, in seconds.
    pub reference_secs: f64,
    /// The memory it needs beyond what the cheapest profile has, if any: it
    /// runs out of that resource on every profile with less.
    pub needs: Option<(Resource, u64)>,
    /// Its score, once its predictions are read.
    pub score: f64,
}

/// A job of the world: one (run, attempt).
#[derive(Debug, Clone)]
pub struct Job {
    /// Its id.
    pub id: JobId,
    /// The profile it runs on.
    pub profile: ProfileName,
    /// Where it is.
    pub state: JobState,
}

/// Where a job is.
#[derive(Debug, Clone, PartialEq)]
pub enum JobState {
    /// Waiting for an instance of its profile.
    Waiting,
    /// On an instance since `since`; ends at `ends_at` as `outcome`.
    Running {
        /// When it started.
        since: Timestamp,
        /// When it ends.
        ends_at: Timestamp,
        /// How.
        outcome: JobOutcome,
    },
    /// Ended.
    Ended {
        /// When it started, if it did.
        started: Option<Timestamp>,
        /// When it ended.
        at: Timestamp,
        /// How; `None` for a job terminated on request.
        outcome: Option<JobOutcome>,
    },
}

/// One profile's instances.
#[derive(Debug, Clone, Default)]
struct Pool {
    instances: usize,
    busy: usize,
    peak: usize,
    waiting: VecDeque<(RunId, Attempt)>,
    busy_ms: u64,
}

/// The world's side of every job and publication.
pub struct World {
    policy: Policy,
    natures: BTreeMap<RunId, Nature>,
    pools: BTreeMap<ProfileName, Pool>,
    /// Spot interruptions per instance-hour.
    interruptions_per_hour: f64,
    /// The share of its running time a job gets through before it runs out
    /// of memory.
    oom_after: f64,
    /// Every job ever made, by (run, attempt).
    pub jobs: BTreeMap<(RunId, Attempt), Job>,
    /// How many jobs were made for each (run, attempt): more than one is a
    /// job launched twice.
    pub made: BTreeMap<(RunId, Attempt), u32>,
    /// The leaderboard: each run's published attempt and score.
    pub board: BTreeMap<RunId, (Attempt, Score)>,
    /// Every (run, attempt) ever published.
    pub published: BTreeMap<RunId, Vec<Attempt>>,
    /// The attempts withdrawn: kept off the leaderboard even if published
    /// after, as the artifact stores keep them.
    withdrawn: BTreeSet<(RunId, Attempt)>,
    /// The activities a worker gave up on (throttled too often).
    pub given_up: Vec<(RunId, Activity)>,
    next_job: u64,
}

/// A job that started, and when it ends: for the driver to schedule.
pub type Started = ((RunId, Attempt), Timestamp);

impl World {
    /// The world of `scenario`: its instances per profile (a profile not
    /// named has none), running its submissions.
    pub fn new(scenario: &super::Scenario) -> World {
        let policy = scenario.policy.clone();
        let natures = scenario.submissions.iter().map(|(spec, nature)| (spec.run.clone(), nature.clone())).collect();
        let instances = &scenario.instances;
        let pools = policy
            .profiles()
            .iter()
            .map(|p| {
                (p.name.clone(), Pool { instances: instances.get(&p.name).copied().unwrap_or(0), ..Pool::default() })
            })
            .collect();
        World {
            policy,
            natures,
            pools,
            interruptions_per_hour: scenario.interruptions_per_hour,
            oom_after: scenario.oom_after,
            jobs: BTreeMap::new(),
            made: BTreeMap::new(),
            board: BTreeMap::new(),
            published: BTreeMap::new(),
            withdrawn: BTreeSet::new(),
            given_up: Vec::new(),
            next_job: 0,
        }
    }

    /// The nature of a run's submission.
    pub fn nature(&self, run: &RunId) -> Option<&Nature> {
        self.natures.get(run)
    }

    /// Launches the job of (`run`, `attempt`) on `profile`, or finds the one
    /// launched before (a launch sent again adopts it, as the runners do by
    /// the job's name). Returns its id and what started.
    pub fn launch(
        &mut self,
        run: &RunId,
        attempt: Attempt,
        profile: &ProfileName,
        now: Timestamp,
        rng: &mut Xoshiro256PlusPlus,
    ) -> (JobId, Vec<Started>) {
        let key = (run.clone(), attempt);
        if let Some(job) = self.jobs.get(&key) {
            return (job.id.clone(), Vec::new());
        }
        *self.made.entry(key.clone()).or_default() += 1;
        self.next_job += 1;
        let id = JobId::new(format!("sim-{}", self.next_job)).unwrap_or_else(|e| unreachable!("{e}"));
        self.jobs.insert(key.clone(), Job { id: id.clone(), profile: profile.clone(), state: JobState::Waiting });
        if let Some(pool) = self.pools.get_mut(profile) {
            pool.waiting.push_back(key);
        }
        (id, self.start_waiting(profile, now, rng))
    }

    /// Starts waiting jobs of `profile` on its free instances.
    fn start_waiting(&mut self, profile: &ProfileName, now: Timestamp, rng: &mut Xoshiro256PlusPlus) -> Vec<Started> {
        let mut started = Vec::new();
        while let Some(pool) = self.pools.get_mut(profile).filter(|pool| pool.busy < pool.instances) {
            let Some(key) = pool.waiting.pop_front() else { break };
            pool.busy += 1;
            pool.peak = pool.peak.max(pool.busy);
            let (ends_at, outcome) = self.fate(&key.0, profile, now, rng);
            if let Some(job) = self.jobs.get_mut(&key) {
                job.state = JobState::Running { since: now, ends_at, outcome };
            }
            started.push((key, ends_at));
        }
        started
    }

    /// How and when a job of `run` started `now` on `profile` ends.
    fn fate(
        &self,
        run: &RunId,
        profile: &ProfileName,
        now: Timestamp,
        rng: &mut Xoshiro256PlusPlus,
    ) -> (Timestamp, JobOutcome) {
        let (Some(nature), Some(on)) = (self.natures.get(run), self.policy.profile(profile)) else {
            return (now, JobOutcome::CannotStart { detail: Detail::new("no such submission or profile") });
        };
        let secs = nature.reference_secs / on.relative_speed.max(1e-6);
        let limit = self.policy.time_limit_secs() as f64;
        let (mut secs, mut outcome) = match nature.needs {
            Some((resource, need)) if on.amount_mib(resource) < need => {
                (secs.min(limit) * self.oom_after, JobOutcome::OutOfMemory { resource })
            }
            _ if secs > limit => (limit, JobOutcome::TimedOut),
            _ => (secs, JobOutcome::Succeeded),
        };
        if self.interruptions_per_hour > 0.0 {
            let hours: f64 = -(1.0 - rng.random::<f64>()).ln() / self.interruptions_per_hour;
            if hours * 3600.0 < secs {
                secs = hours * 3600.0;
                outcome = JobOutcome::Interrupted { detail: Detail::new("Host EC2 (instance i-sim) terminated.") };
            }
        }
        (now.plus_ms((secs * 1000.0).max(1.0) as u64), outcome)
    }

    /// Ends the job of `key` now, if it still runs at this time: frees its
    /// instance and returns its outcome and what started in its place.
    pub fn end(
        &mut self,
        key: &(RunId, Attempt),
        now: Timestamp,
        rng: &mut Xoshiro256PlusPlus,
    ) -> Option<(JobOutcome, Vec<Started>)> {
        let job = self.jobs.get_mut(key)?;
        let JobState::Running { since, ends_at, outcome } = job.state.clone() else { return None };
        if ends_at != now {
            return None;
        }
        job.state = JobState::Ended { started: Some(since), at: now, outcome: Some(outcome.clone()) };
        let profile = job.profile.clone();
        self.free(&profile, since, now);
        Some((outcome, self.start_waiting(&profile, now, rng)))
    }

    /// Stops the job of `key`, wherever it is; returns what started in its place.
    pub fn terminate(&mut self, key: &(RunId, Attempt), now: Timestamp, rng: &mut Xoshiro256PlusPlus) -> Vec<Started> {
        let Some(job) = self.jobs.get_mut(key) else { return Vec::new() };
        let profile = job.profile.clone();
        match job.state.clone() {
            JobState::Waiting => {
                job.state = JobState::Ended { started: None, at: now, outcome: None };
                if let Some(pool) = self.pools.get_mut(&profile) {
                    pool.waiting.retain(|k| k != key);
                }
                Vec::new()
            }
            JobState::Running { since, .. } => {
                job.state = JobState::Ended { started: Some(since), at: now, outcome: None };
                self.free(&profile, since, now);
                self.start_waiting(&profile, now, rng)
            }
            JobState::Ended { .. } => Vec::new(),
        }
    }

    fn free(&mut self, profile: &ProfileName, since: Timestamp, now: Timestamp) {
        if let Some(pool) = self.pools.get_mut(profile) {
            pool.busy -= 1;
            pool.busy_ms += now.0.saturating_sub(since.0);
        }
    }

    /// Publishes `run`'s `attempt` with `score`, unless it was withdrawn.
    pub fn publish(&mut self, run: &RunId, attempt: Attempt, score: Score) {
        if self.withdrawn.contains(&(run.clone(), attempt)) {
            return;
        }
        self.board.insert(run.clone(), (attempt, score));
        let attempts = self.published.entry(run.clone()).or_default();
        if !attempts.contains(&attempt) {
            attempts.push(attempt);
        }
    }

    /// Takes `run`'s `attempt` off the leaderboard, for good.
    pub fn withdraw(&mut self, run: &RunId, attempt: Attempt) {
        self.withdrawn.insert((run.clone(), attempt));
        if self.board.get(run).is_some_and(|(published, _)| *published == attempt) {
            self.board.remove(run);
        }
    }

    /// The attempts of `run` published and not withdrawn: more than one is a
    /// run counted twice.
    pub fn standing(&self, run: &RunId) -> Vec<Attempt> {
        let published = self.published.get(run).map_or(&[][..], Vec::as_slice);
        published.iter().copied().filter(|a| !self.withdrawn.contains(&(run.clone(), *a))).collect()
    }

    /// Per profile: instance-hours busy and the most instances busy at once.
    pub fn usage(&self) -> BTreeMap<ProfileName, (f64, usize)> {
        self.pools.iter().map(|(name, pool)| (name.clone(), (pool.busy_ms as f64 / 3_600_000.0, pool.peak))).collect()
    }

    /// The jobs not ended.
    pub fn unfinished(&self) -> impl Iterator<Item = (&(RunId, Attempt), &Job)> {
        self.jobs.iter().filter(|(_, job)| !matches!(job.state, JobState::Ended { .. }))
    }
}
