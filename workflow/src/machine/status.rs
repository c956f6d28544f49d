//! A run as stored: its spec, its status (the state plus the bookkeeping
//! `step` needs: attempts, versions, what is owed) and its history entries.

use serde::{Deserialize, Serialize};

use super::commands::{Command, Termination};
use super::detail::Detail;
use super::events::{Disposition, Envelope};
use super::outcome::{Evidence, JobOutcome, JobUsage};
use super::spec::RunSpec;
use super::state::RunState;
use crate::ids::{Attempt, JobId, ProfileName};
use crate::time::Timestamp;

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptEnd {
    /// The job ran and ended this way.
    Job(JobOutcome),
    /// The job could not be launched.
    LaunchFailed,
    /// The run was cancelled during this attempt.
    Cancelled,
}

/// One launch of a run on one profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// The attempt's number.
    pub attempt: Attempt,
    /// Where it was placed.
    pub profile: ProfileName,
    /// When the launch was decided.
    pub launched_at: Timestamp,
    /// The job, once the runner reported it.
    pub job: Option<JobId>,
    /// What the job used, once it ended.
    pub usage: Option<JobUsage>,
    /// How it ended, once it did.
    pub end: Option<AttemptEnd>,
    /// What the runner saw of its end.
    pub evidence: Option<Evidence>,
    /// Why its job has not started, while it waits (AWS Batch: RUNNABLE, for want of capacity).
    pub waiting: Option<Waiting>,
}

/// A job's status before it ended, as its runner last reported it: a wait
/// for something (`RUNNABLE`, for capacity), or `RUNNING`, the wait over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Waiting {
    /// The runner's status for it (`RUNNABLE`, `STARTING` ...).
    pub status: Detail,
    /// The runner's reason, when it gives one (`CAPACITY:INSUFFICIENT_INSTANCE_CAPACITY - ...`).
    pub reason: Option<Detail>,
    /// When evalflow first saw it so.
    pub since: Timestamp,
}

impl Waiting {
    /// Whether the job waits still (its program has not started).
    pub fn waits(&self) -> bool {
        self.status.as_str() != "RUNNING"
    }
}

/// Everything about a run that changes: what `step` reads and writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunStatus {
    /// Grows by one each time the state changes; commands carry it, results bring it back.
    pub version: u64,
    /// Where the run is.
    pub state: RunState,
    /// Every launch so far, in order; the last one is the current attempt.
    pub attempts: Vec<AttemptRecord>,
    /// Interruptions in a row on the current profile.
    pub interruptions: u32,
    /// Terminations not yet acknowledged.
    pub terminations: Vec<Termination>,
    /// Attempts whose score must come off the leaderboard (the run was
    /// cancelled while publishing it), until acknowledged.
    pub withdrawals: Vec<Attempt>,
    /// When the status last changed.
    pub updated_at: Timestamp,
}

impl RunStatus {
    /// The status of a run just submitted.
    pub fn submitted(now: Timestamp) -> RunStatus {
        RunStatus {
            version: 1,
            state: RunState::Queued,
            attempts: Vec::new(),
            interruptions: 0,
            terminations: Vec::new(),
            withdrawals: Vec::new(),
            updated_at: now,
        }
    }

    /// The commands this run is owed, outstanding until their results arrive:
    /// the terminations, the withdrawals, then the current state's own
    /// command. After a crash the engine sends exactly these again
    /// (level-triggered recovery).
    pub fn outbox(&self) -> Vec<Command> {
        let terminations =
            self.terminations.iter().map(|t| Command::TerminateJob { attempt: t.attempt, job: t.job.clone() });
        let withdrawals = self.withdrawals.iter().map(|&attempt| Command::Withdraw { attempt });
        terminations.chain(withdrawals).chain(self.state.command()).collect()
    }

    /// Whether it is owed any command: whether [`RunStatus::outbox`] is not
    /// empty, without making it.
    pub fn owes(&self) -> bool {
        !self.terminations.is_empty() || !self.withdrawals.is_empty() || self.state.command().is_some()
    }

    /// The number of the next attempt.
    pub fn next_attempt(&self) -> Attempt {
        Attempt(u32::try_from(self.attempts.len()).unwrap_or(u32::MAX).saturating_add(1))
    }

    /// The record of `attempt`, if it was launched.
    pub fn attempt(&self, attempt: Attempt) -> Option<&AttemptRecord> {
        self.attempts.get(Self::index(attempt)?)
    }

    /// The record of `attempt`, to change it.
    pub fn attempt_mut(&mut self, attempt: Attempt) -> Option<&mut AttemptRecord> {
        self.attempts.get_mut(Self::index(attempt)?)
    }

    /// Where `attempt`'s record is: attempts count from 1.
    fn index(attempt: Attempt) -> Option<usize> {
        usize::try_from(attempt.0).ok()?.checked_sub(1)
    }

    /// The profile of the latest attempt.
    pub fn last_profile(&self) -> Option<&ProfileName> {
        self.attempts.last().map(|a| &a.profile)
    }

    /// Whether the run still needs the engine: it is not terminal, or it is
    /// owed a command. Such runs are in the live index and are recovered on open.
    pub fn is_live(&self) -> bool {
        !self.state.tag().is_terminal() || !self.terminations.is_empty() || !self.withdrawals.is_empty()
    }

    /// Checks the invariants a stored status must hold. Called right before a
    /// write and right after a read.
    pub fn validate(&self) -> Result<(), String> {
        if self.version == 0 {
            return Err("version 0".into());
        }
        for (index, record) in self.attempts.iter().enumerate() {
            if usize::try_from(record.attempt.0).ok() != Some(index + 1) {
                return Err(format!("attempt record {} is numbered {}", index + 1, record.attempt));
            }
        }
        let current = self.attempts.last();
        if let Some((attempt, profile, job)) = self.state.placement() {
            let matches = current.is_some_and(|r| {
                r.attempt == attempt && &r.profile == profile && (job.is_none() || r.job.as_ref() == job)
            });
            if !matches {
                return Err(format!("state {} does not match the last attempt record", self.state.tag()));
            }
        }
        if let Some(t) = self.terminations.iter().find(|t| self.attempt(t.attempt).is_none()) {
            return Err(format!("termination of attempt {} that was never launched", t.attempt));
        }
        if let Some(attempt) = self.withdrawals.iter().find(|&&a| self.attempt(a).is_none()) {
            return Err(format!("withdrawal of attempt {attempt} that was never launched"));
        }
        if usize::try_from(self.interruptions).unwrap_or(usize::MAX) > self.attempts.len() {
            return Err(format!("{} interruptions in {} attempts", self.interruptions, self.attempts.len()));
        }
        self.state.validate()
    }
}

/// A run: its spec and its current status.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    /// What was submitted.
    pub spec: RunSpec,
    /// Where it is now.
    pub status: RunStatus,
}

/// One event of a run's history, with the status it left the run in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// Its position in the run's history, from 1.
    pub seq: u32,
    /// When the engine recorded it (the `now` given to `step`).
    pub at: Timestamp,
    /// The event as it arrived.
    pub input: Envelope,
    /// What it did.
    pub disposition: Disposition,
    /// The run's status after it.
    pub status: RunStatus,
}
