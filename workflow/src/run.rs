//! A run as stored: its immutable spec, its status (the machine's state plus
//! the bookkeeping `step` needs), and the entries of its history.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ids::{Attempt, IdError, JobId, ProfileName, RunId, Stage, SubmissionId, TeamId};
use crate::machine::{Command, Event, JobOutcome, RunState};
use crate::time::Timestamp;

/// The longest free-text detail kept in a record (error messages, reasons), in bytes.
pub const DETAIL_MAX_LEN: usize = 2048;

/// Where the submission's code is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubmissionSource {
    /// A directory with `submission.toml`, kept in the data directory (local runner).
    Directory {
        /// The directory's absolute path.
        path: String,
        /// A digest of its contents: the same id with other contents is another submission.
        digest: String,
    },
    /// A container image URI (AWS Batch).
    Image {
        /// The image, e.g. `123456789012.dkr.ecr.us-east-1.amazonaws.com/team42:final`.
        uri: String,
    },
}

/// What was submitted: never changes after the run is created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSpec {
    /// The run: `<submission>-<stage>`.
    pub run: RunId,
    /// The submission evaluated.
    pub submission: SubmissionId,
    /// The team that made it.
    pub team: TeamId,
    /// The test set it runs on.
    pub stage: Stage,
    /// Whether it runs on the CPU ladder.
    pub cpu_only: bool,
    /// Its code.
    pub source: SubmissionSource,
    /// When it was submitted; breaks leaderboard ties.
    pub submitted_at: Timestamp,
    /// Set for an audit run (`evalflow reproduce`): the published run it
    /// re-runs. Its score never reaches the leaderboard.
    pub audit: Option<Audit>,
}

/// What an audit run re-runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Audit {
    /// The published run it re-runs.
    pub of: RunId,
    /// Which audit of it, from 1.
    pub number: u32,
}

/// The suffix of an audit run's submission part: `<submission>-audit<n>-<stage>`.
pub const AUDIT_SUFFIX: &str = "-audit";

/// Whether `id` ends as audit runs are named (`-audit<n>`): such ids are
/// evalflow's, not a team's.
pub fn is_audit_name(id: &str) -> bool {
    id.rsplit_once(AUDIT_SUFFIX).is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The name of the `number`-th audit run of `submission` on `stage`.
fn audit_run(submission: &SubmissionId, stage: Stage, number: u32) -> Result<RunId, IdError> {
    Ok(RunId::new(&SubmissionId::new(format!("{submission}{AUDIT_SUFFIX}{number}"))?, stage))
}

impl RunSpec {
    /// The spec of `submission` on `stage`.
    pub fn new(
        submission: SubmissionId,
        team: TeamId,
        stage: Stage,
        cpu_only: bool,
        source: SubmissionSource,
        submitted_at: Timestamp,
    ) -> RunSpec {
        RunSpec {
            run: RunId::new(&submission, stage),
            submission,
            team,
            stage,
            cpu_only,
            source,
            submitted_at,
            audit: None,
        }
    }

    /// The `number`-th audit run of `self`, a published run: the same code
    /// on the same stage, named `<submission>-audit<number>-<stage>`.
    pub fn audit(&self, number: u32, now: Timestamp) -> Result<RunSpec, IdError> {
        Ok(RunSpec {
            run: audit_run(&self.submission, self.stage, number)?,
            submitted_at: now,
            audit: Some(Audit { of: self.run.clone(), number }),
            ..self.clone()
        })
    }

    /// The name this spec's run must have: `<submission>-<stage>`, or an audit's name.
    pub fn expected_run(&self) -> Result<RunId, IdError> {
        match &self.audit {
            None => Ok(RunId::new(&self.submission, self.stage)),
            Some(audit) if audit.of == RunId::new(&self.submission, self.stage) => {
                audit_run(&self.submission, self.stage, audit.number)
            }
            Some(audit) => Err(IdError::BadRunId { value: audit.of.to_string() }),
        }
    }

    /// Whether `other` submits the same thing (the submission time aside), so
    /// that submitting it again is a no-op rather than a conflict.
    pub fn same_submission(&self, other: &RunSpec) -> bool {
        RunSpec { submitted_at: other.submitted_at, ..self.clone() } == *other
    }
}

/// Free text of bounded size (an error message, a rejection reason).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Detail(String);

impl Detail {
    /// Keeps at most [`DETAIL_MAX_LEN`] bytes of `text`, cut at a character
    /// boundary, without control characters or the Unicode marks that
    /// reorder a line (a job's words could carry terminal escapes to an
    /// operator's screen, or make a line read otherwise than it is).
    pub fn new(text: impl Into<String>) -> Detail {
        let mut text: String = text.into();
        let hostile = |c: char| c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        if text.chars().any(hostile) {
            text = text.chars().map(|c| if hostile(c) { ' ' } else { c }).collect();
        }
        if text.len() > DETAIL_MAX_LEN {
            let mut cut = DETAIL_MAX_LEN - 3;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            text.push_str("...");
        }
        Detail(text)
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Detail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a job used, as reported by its runner when it ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobUsage {
    /// When the job's program started, if it did.
    pub started_at: Option<Timestamp>,
    /// When the job ended.
    pub ended_at: Timestamp,
    /// The peak memory of the job's processes, in MiB, when known.
    pub peak_memory_mib: Option<u64>,
}

impl JobUsage {
    /// The job's running time in seconds (zero if it never started).
    pub fn running_secs(&self) -> f64 {
        self.started_at.map_or(0.0, |start| self.ended_at.since(start).as_secs_f64())
    }
}

/// What the runner saw of a job that ended: the grounds for its outcome,
/// kept with the attempt, so that "why did this run move to P3, or fail" is
/// answered by one command.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    /// The rule that decided the outcome: a log signature (`pytorch-oom`),
    /// `cgroup-oom-kill`, `exit-code-86`, a Batch reason (`batch:OutOfMemoryError`).
    pub rule: Option<Detail>,
    /// What the rule matched: the log's fatal line, the runner's reason.
    pub matched: Option<Detail>,
    /// The program's exit code, if it exited.
    pub exit_code: Option<i32>,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
    /// The runner's reason for the job's status (AWS Batch's `statusReason`).
    pub status_reason: Option<Detail>,
    /// Where its log is, beyond its job directory (a CloudWatch Logs stream).
    pub log_stream: Option<Detail>,
}

impl Evidence {
    /// This evidence, with the rule that decided the outcome and what it matched.
    pub fn decided(self, rule: &str, matched: impl Into<String>) -> Evidence {
        Evidence { rule: Some(Detail::new(rule)), matched: Some(Detail::new(matched)), ..self }
    }

    /// `rule: matched`, the words `history` and `logs` show; `None` when no rule decided.
    pub fn words(&self) -> Option<String> {
        let rule = self.rule.as_ref()?;
        Some(match &self.matched {
            Some(matched) => format!("{matched} [{rule}]"),
            None => format!("[{rule}]"),
        })
    }
}

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

/// A `TerminateJob` the run still owes: issued on cancel, or for a job
/// launched for an attempt nobody waits for any more, until acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Termination {
    /// The attempt whose job must stop.
    pub attempt: Attempt,
    /// The job, when known; otherwise the runner finds it by its deterministic name.
    pub job: Option<JobId>,
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

    /// The number of the next attempt.
    pub fn next_attempt(&self) -> Attempt {
        Attempt(u32::try_from(self.attempts.len()).unwrap_or(u32::MAX).saturating_add(1))
    }

    /// The record of `attempt`, if it was launched.
    pub fn attempt(&self, attempt: Attempt) -> Option<&AttemptRecord> {
        let index = usize::try_from(attempt.0).ok()?.checked_sub(1)?;
        self.attempts.get(index)
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

/// An event addressed to a run, with the fence that guards it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// What happened.
    pub event: Event,
    /// The run's version when the command this event answers was issued.
    /// `None` for events not answering a command (job-state changes, operators).
    pub expected_version: Option<u64>,
}

impl Envelope {
    /// An event without a version fence.
    pub fn unfenced(event: Event) -> Envelope {
        Envelope { event, expected_version: None }
    }

    /// The result of a command issued at `version`.
    pub fn answering(event: Event, version: u64) -> Envelope {
        Envelope { event, expected_version: Some(version) }
    }
}

/// Why an event changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IgnoreReason {
    /// It answers a command issued at another version of the run.
    StaleVersion {
        /// The version the event was fenced with.
        expected: u64,
        /// The run's version when it arrived.
        actual: u64,
    },
    /// The run is not waiting for it: a late, duplicated or misdirected event.
    NotAwaited,
    /// The same request again (a resubmission, a second cancel).
    Duplicate,
    /// It reports a job the run no longer waits for; that job is being terminated.
    OrphanJob,
}

impl fmt::Display for IgnoreReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IgnoreReason::StaleVersion { expected, actual } => {
                write!(f, "stale: answers version {expected}, run is at {actual}")
            }
            IgnoreReason::NotAwaited => f.write_str("not awaited in this state"),
            IgnoreReason::Duplicate => f.write_str("duplicate"),
            IgnoreReason::OrphanJob => f.write_str("orphan job: terminating it"),
        }
    }
}

/// What an event did to the run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Disposition {
    /// The state changed and the version grew by one.
    Applied,
    /// A termination was acknowledged; the state did not change.
    Acknowledged,
    /// A fact about the current attempt was noted (a job's wait); the state did not change.
    Noted,
    /// Nothing changed (except, for an orphan job, a new termination).
    Ignored(IgnoreReason),
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

/// The eight states, without their data: for indexes, counts and filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StateTag {
    /// Waiting for a launch slot.
    Queued,
    /// A job is being launched.
    Launching,
    /// A job runs.
    Running,
    /// The job wrote predictions; they are being scored.
    Predicted,
    /// Scored; being published.
    Scored,
    /// On the leaderboard. Terminal.
    Published,
    /// Ended with a reason. Terminal (retry starts it again).
    Failed,
    /// Stopped by an operator. Terminal (retry starts it again).
    Cancelled,
}

impl StateTag {
    /// Every state, in the order of the happy path then the other ends.
    pub const ALL: [StateTag; 8] = [
        StateTag::Queued,
        StateTag::Launching,
        StateTag::Running,
        StateTag::Predicted,
        StateTag::Scored,
        StateTag::Published,
        StateTag::Failed,
        StateTag::Cancelled,
    ];

    /// The lowercase name used in listings and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            StateTag::Queued => "queued",
            StateTag::Launching => "launching",
            StateTag::Running => "running",
            StateTag::Predicted => "predicted",
            StateTag::Scored => "scored",
            StateTag::Published => "published",
            StateTag::Failed => "failed",
            StateTag::Cancelled => "cancelled",
        }
    }

    /// Whether the run has ended (only an operator's retry moves it on).
    pub fn is_terminal(self) -> bool {
        match self {
            StateTag::Published | StateTag::Failed | StateTag::Cancelled => true,
            StateTag::Queued | StateTag::Launching | StateTag::Running | StateTag::Predicted | StateTag::Scored => {
                false
            }
        }
    }

    /// A stable one-byte code, for index keys.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The tag of a [`StateTag::code`].
    pub fn from_code(code: u8) -> Option<StateTag> {
        StateTag::ALL.get(usize::from(code)).copied()
    }
}

impl fmt::Display for StateTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for StateTag {
    type Err = String;
    fn from_str(value: &str) -> Result<Self, String> {
        StateTag::ALL.into_iter().find(|t| t.as_str() == value).ok_or_else(|| {
            let names: Vec<&str> = StateTag::ALL.iter().map(|t| t.as_str()).collect();
            format!("state {value:?} is not one of: {}", names.join(", "))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_detail_keeps_no_escapes_nor_reordering_marks() {
        let hostile = "torch.OutOfMemoryError\x1b]0;owned\x07: CUDA \u{202e}gnp.exe\u{2066} out of memory\r\n";
        assert_eq!(Detail::new(hostile).as_str(), "torch.OutOfMemoryError ]0;owned : CUDA  gnp.exe  out of memory  ");
        let long = Detail::new("é".repeat(DETAIL_MAX_LEN));
        assert!(long.as_str().len() <= DETAIL_MAX_LEN && long.as_str().ends_with("..."));
    }
}
