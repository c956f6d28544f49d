//! What the API answers and the CLI prints (`--json`): plain data, the same
//! whether the CLI talks to an engine or reads the store itself.

use std::collections::BTreeMap;

use evalflow_workflow::cost::{Billing, CostReport, attempt_cost, run_cost_usd};
use evalflow_workflow::progress::{Allowance, Forecast};
use evalflow_workflow::{
    AttemptEnd, AttemptRecord, Detail, Disposition, Event, Evidence, HistoryEntry, JobId, JobUsage, Policy,
    ProfileName, Run, RunId, RunState, RunStatus, Stage, StateTag, SubmissionId, TeamId, Timestamp,
};
use serde::{Deserialize, Serialize};

/// One run, as listed by `evalflow runs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunView {
    /// The run id, `<submission>-<stage>`.
    pub id: RunId,
    /// The submission.
    pub submission: SubmissionId,
    /// Its team.
    pub team: TeamId,
    /// The stage.
    pub stage: Stage,
    /// The state, lowercase.
    pub state: StateTag,
    /// The last profile used.
    pub profile: Option<ProfileName>,
    /// Launches so far.
    pub attempts: usize,
    /// The failure's kind (`out_of_memory`, `timed_out` ...), if failed.
    pub failure: Option<String>,
    /// The failure in words, if failed.
    pub reason: Option<String>,
    /// The score, once scored.
    pub score: Option<f64>,
    /// What its attempts cost so far, in US dollars.
    pub cost_usd: f64,
    /// The last job.
    pub job: Option<JobId>,
    /// Each attempt: where it ran, how it ended and the evidence for it.
    pub attempt_details: Vec<AttemptView>,
    /// Why a live run is not moving, when it waits for something.
    pub waiting: Option<String>,
    /// For an audit run (`evalflow reproduce`), the published run it re-runs.
    pub audit_of: Option<RunId>,
    /// The run's version.
    pub version: u64,
    /// When it was submitted, in ms since the epoch.
    pub submitted_at_ms: u64,
    /// When it last changed, in ms since the epoch.
    pub updated_at_ms: u64,
}

impl RunView {
    /// The view of `run`.
    pub fn new(run: &Run, policy: &Policy, billing: Billing) -> RunView {
        let (spec, status) = (&run.spec, &run.status);
        let (failure, reason) = match &status.state {
            RunState::Failed { reason, .. } => (Some(reason.kind().to_owned()), Some(reason.to_string())),
            _ => (None, None),
        };
        RunView {
            id: spec.run.clone(),
            submission: spec.submission.clone(),
            team: spec.team.clone(),
            stage: spec.stage,
            state: status.state.tag(),
            profile: status.last_profile().cloned(),
            attempts: status.attempts.len(),
            failure,
            reason,
            score: status.state.score().map(|s| s.value()),
            cost_usd: run_cost_usd(status, policy, billing),
            job: status.attempts.last().and_then(|a| a.job.clone()),
            attempt_details: status.attempts.iter().map(|a| AttemptView::new(a, policy, billing)).collect(),
            waiting: waiting(status, Timestamp::now()).map(|w| w.words()),
            audit_of: spec.audit.as_ref().map(|a| a.of.clone()),
            version: status.version,
            submitted_at_ms: spec.submitted_at.as_millis(),
            updated_at_ms: status.updated_at.as_millis(),
        }
    }
}

/// What a live run waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wait {
    /// A launch slot: as many jobs as allowed are launching or running.
    Slot,
    /// The end of its backoff after an interruption.
    Backoff {
        /// Seconds left.
        secs: u64,
    },
    /// Its job to start, for the runner's reason.
    Start {
        /// The runner's status (`RUNNABLE`).
        status: String,
        /// The runner's reason.
        reason: Option<String>,
        /// Seconds waited so far.
        secs: u64,
    },
}

impl Wait {
    /// The wait in words.
    pub fn words(&self) -> String {
        match self {
            Wait::Slot => "waiting for a launch slot".into(),
            Wait::Backoff { secs } => format!("held {secs} s more, backing off after an interruption"),
            Wait::Start { status, reason: Some(reason), secs } => format!("{status} for {}: {reason}", duration(*secs)),
            Wait::Start { status, reason: None, secs } => format!("{status} for {}", duration(*secs)),
        }
    }
}

/// `42 s`, `12 min`, `3.5 h`.
pub fn duration(secs: u64) -> String {
    match secs {
        0..120 => format!("{secs} s"),
        120..7200 => format!("{} min", secs / 60),
        _ => format!("{:.1} h", secs as f64 / 3600.0),
    }
}

/// `$12.34`; small amounts (a local run's) with the digits that show them.
pub fn money(usd: f64) -> String {
    match usd {
        0.0 => "$0".into(),
        ..1.0 => format!("${usd:.5}"),
        ..100.0 => format!("${usd:.2}"),
        _ => format!("${usd:.0}"),
    }
}

/// What the run waits for at `now`, if anything.
pub fn waiting(status: &RunStatus, now: Timestamp) -> Option<Wait> {
    match &status.state {
        RunState::Queued => Some(Wait::Slot),
        RunState::Launching { not_before: Some(at), .. } if *at > now => {
            Some(Wait::Backoff { secs: at.since(now).as_secs() })
        }
        RunState::Running { attempt, .. } => {
            let record = status.attempt(*attempt)?;
            let wait = record.waiting.as_ref().filter(|w| w.waits())?;
            Some(Wait::Start {
                status: wait.status.to_string(),
                reason: wait.reason.as_ref().map(ToString::to_string),
                secs: now.since(record.launched_at).as_secs(),
            })
        }
        _ => None,
    }
}

/// A run flagged by `evalflow status`: its job has waited long to start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WaitingView {
    /// The run.
    pub run: RunId,
    /// Seconds since its attempt was launched.
    pub waited_secs: u64,
    /// The runner's status for the job.
    pub status: String,
    /// The runner's reason (Batch's `statusReason`).
    pub reason: Option<String>,
}

/// One attempt of a run: where it ran, how it ended, and why evalflow
/// judged it so.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptView {
    /// Its number, from 1.
    pub attempt: u32,
    /// The profile it ran on.
    pub profile: ProfileName,
    /// The runner's job (on AWS, the Batch job id).
    pub job: Option<JobId>,
    /// How it ended, in words, once it did.
    pub outcome: Option<String>,
    /// The rule that decided the outcome (`pytorch-oom`, `cgroup-oom-kill`, `batch:OutOfMemoryError` ...).
    pub rule: Option<String>,
    /// What the rule matched: the log's fatal line, Batch's reason.
    pub matched: Option<String>,
    /// `out of GPU memory on g4: torch.OutOfMemoryError: ...`: the end and its evidence in one line.
    pub summary: Option<String>,
    /// The program's exit code.
    pub exit_code: Option<i32>,
    /// The signal that ended it.
    pub signal: Option<i32>,
    /// The runner's status reason (AWS Batch's `statusReason`).
    pub status_reason: Option<String>,
    /// Its CloudWatch Logs stream, on AWS.
    pub log_stream: Option<String>,
    /// How long it ran, in seconds.
    pub running_secs: Option<f64>,
    /// Its peak memory, when measured.
    pub peak_memory_mib: Option<u64>,
    /// What it cost, in US dollars.
    pub cost_usd: f64,
}

impl AttemptView {
    /// The view of `record`.
    pub fn new(record: &AttemptRecord, policy: &Policy, billing: Billing) -> AttemptView {
        let evidence = record.evidence.clone().unwrap_or_default();
        let text = |d: Option<Detail>| d.map(|d| d.as_str().to_owned());
        let outcome = record.end.as_ref().map(end_words);
        AttemptView {
            attempt: record.attempt.0,
            profile: record.profile.clone(),
            job: record.job.clone(),
            summary: outcome.as_ref().map(|words| summary(words, &record.profile, &evidence)),
            outcome,
            rule: text(evidence.rule),
            matched: text(evidence.matched),
            exit_code: evidence.exit_code,
            signal: evidence.signal,
            status_reason: text(evidence.status_reason),
            log_stream: text(evidence.log_stream),
            running_secs: record.usage.as_ref().map(JobUsage::running_secs),
            peak_memory_mib: record.usage.as_ref().and_then(|u| u.peak_memory_mib),
            cost_usd: attempt_cost(record, policy, billing).map_or(0.0, |(_, usd)| usd),
        }
    }
}

/// `<how it ended> on <profile>: <what the rule matched> [<rule>]`.
fn summary(outcome: &str, profile: &ProfileName, evidence: &Evidence) -> String {
    match evidence.words() {
        Some(words) => format!("{outcome} on {profile}: {words}"),
        None => format!("{outcome} on {profile}"),
    }
}

fn end_words(end: &AttemptEnd) -> String {
    match end {
        AttemptEnd::Job(outcome) => outcome.to_string(),
        AttemptEnd::LaunchFailed => "could not be launched".into(),
        AttemptEnd::Cancelled => "cancelled".into(),
    }
}

/// One entry of a run's history, as shown by `evalflow history`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventView {
    /// Its position in the history, from 1.
    pub seq: u32,
    /// When it was recorded, in ms since the epoch.
    pub at_ms: u64,
    /// The event's name.
    pub event: String,
    /// The state after it, lowercase.
    pub state: StateTag,
    /// The attempt and profile after it, when a job is involved (`a2 on p3`).
    pub placement: Option<String>,
    /// The run's version after it.
    pub version: u64,
    /// `applied`, `acknowledged`, or `ignored: <why>`.
    pub disposition: String,
    /// The event in words.
    pub detail: String,
    /// The event, whole.
    pub data: Event,
}

impl EventView {
    /// The view of a history entry.
    pub fn new(entry: &HistoryEntry) -> EventView {
        let state = &entry.status.state;
        EventView {
            seq: entry.seq,
            at_ms: entry.at.as_millis(),
            event: entry.input.event.kind().to_owned(),
            state: state.tag(),
            placement: state.placement().map(|(attempt, profile, _)| format!("a{attempt} on {profile}")),
            version: entry.status.version,
            disposition: match &entry.disposition {
                Disposition::Applied => "applied".to_owned(),
                Disposition::Acknowledged => "acknowledged".to_owned(),
                Disposition::Noted => "noted".to_owned(),
                Disposition::Ignored(why) => format!("ignored: {why}"),
            },
            detail: describe(&entry.input.event, &entry.status),
            data: entry.input.event.clone(),
        }
    }
}

/// An event in a few words.
fn describe(event: &Event, after: &RunStatus) -> String {
    match event {
        Event::Submitted(spec) => format!("team {} on {}", spec.team, spec.stage),
        Event::JobLaunched { attempt, job } => format!("attempt {attempt}: job {job}"),
        Event::LaunchFailed { attempt, error } => format!("attempt {attempt}: {error}"),
        Event::JobEnded { attempt, outcome, usage, evidence, .. } => {
            let peak = usage.peak_memory_mib.map(|m| format!(", peak {m} MiB")).unwrap_or_default();
            let ran = format!("ran {:.1} s{peak}", usage.running_secs());
            match after.attempt(*attempt) {
                Some(record) => {
                    format!("attempt {attempt}: {}; {ran}", summary(&outcome.to_string(), &record.profile, evidence))
                }
                None => format!("attempt {attempt}: {outcome}, {ran}"),
            }
        }
        Event::JobWaiting { attempt, status, reason, .. } => match reason {
            Some(reason) => format!("attempt {attempt}: {status}: {reason}"),
            None => format!("attempt {attempt}: {status}"),
        },
        Event::PredictionsScored { score, .. } => format!("log loss {:.4}", score.value()),
        Event::PredictionsRejected { reason, .. } => reason.to_string(),
        Event::ActivityFailed { activity, error, .. } => format!("{}: {error}", activity.as_str()),
        Event::JobTerminated { attempt, job: Some(job) } => format!("attempt {attempt}: job {job} stopped"),
        Event::JobTerminated { attempt, job: None } => format!("attempt {attempt}: its jobs stopped"),
        Event::Withdrawn { attempt } => format!("attempt {attempt}: its score kept off the leaderboard"),
        Event::Admitted { start: Some(start) } => format!("starts on {}: {}", start.profile, start.reason),
        Event::Admitted { start: None }
        | Event::Published { .. }
        | Event::CancelRequested
        | Event::RetryRequested
        | Event::RescoreRequested => match &after.state {
            RunState::Failed { reason, .. } => reason.to_string(),
            _ => String::new(),
        },
    }
}

/// The state of a competition, as shown by `evalflow status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusView {
    /// The competition's name.
    pub competition: String,
    /// Its data directory.
    pub data_dir: String,
    /// Runs per state.
    pub counts: BTreeMap<StateTag, u64>,
    /// Runs ended of all, running per profile, the ETA and the cost, in all
    /// and per stage (`total`, `ended`, `running`, `eta_secs`, `cost_usd`,
    /// `projected_cost_usd` ... and `stages`). The ETA is `None` while
    /// launching is stopped (a budget, a stage not ready, the disk).
    #[serde(flatten)]
    pub progress: Forecast,
    /// The budget, when `[policy] budget_usd` sets one.
    pub budget: Option<BudgetView>,
    /// The engine serving it, if one runs: `pid N at URL`.
    pub engine: Option<String>,
    /// Messages in the dead-letter queues, on AWS.
    pub dead_letters: Option<DeadLetters>,
    /// Jobs launching or running at most at once.
    pub max_active: u64,
    /// Runs whose job has waited to start longer than `[aws]
    /// flag_waiting_after_secs`, longest first.
    pub waiting_long: Vec<WaitingView>,
    /// Stages whose test set and labels do not agree: none of their runs launches.
    pub stage_problems: Vec<StageProblem>,
    /// Why no new run launches on this machine now (its disk is short of space).
    #[serde(default)]
    pub paused: Option<String>,
}

/// What the budget allows, as `evalflow status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BudgetView {
    /// Spent, committed, and how many more runs it admits.
    #[serde(flatten)]
    pub allowance: Allowance,
    /// What the budget stops, and what to do, when it stops anything.
    pub stopped: Option<String>,
}

impl BudgetView {
    /// The view of `allowance`, with `queued` runs waiting.
    pub fn new(allowance: Allowance, queued: u64) -> BudgetView {
        let Allowance { budget_usd, spent_usd, accrued_usd, committed_usd, per_run_usd, admits } = allowance;
        let raise = "raise [policy] budget_usd in evalflow.toml, then `evalflow reload`";
        let stopped = match admits {
            _ if allowance.spent() => Some(format!(
                "the budget of {} is reached ({} spent, {} more by the jobs running): no new attempt launches, \
                 running jobs finish, {queued} runs stay queued; {raise}",
                money(budget_usd),
                money(spent_usd),
                money(accrued_usd)
            )),
            Some(admits) if admits < queued => Some(format!(
                "the budget of {} covers {admits} more runs at {} each ({} spent, {} committed): {} queued runs wait \
                 for it; {raise}",
                money(budget_usd),
                money(per_run_usd),
                money(spent_usd),
                money(committed_usd),
                queued - admits
            )),
            _ => None,
        };
        BudgetView { allowance, stopped }
    }
}

/// A stage that is not ready: the competition's problem, not a run's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageProblem {
    /// The stage.
    pub stage: Stage,
    /// What is wrong with its files, and what to do.
    pub problem: String,
}

/// Messages that kept failing, in the dead-letter queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetters {
    /// Commands no worker could carry out.
    pub tasks: u64,
    /// Events the engine could not read.
    pub events: u64,
}

/// The result of an operator's request for one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActionView {
    /// The run.
    pub run: RunId,
    /// Whether it was accepted.
    pub accepted: bool,
    /// The state after it, when accepted.
    pub state: Option<StateTag>,
    /// What happened, in words.
    pub message: String,
}

/// The result of replaying histories.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplayView {
    /// Runs replayed.
    pub checked: usize,
    /// The runs whose history does not replay, with the first divergence.
    pub diverged: Vec<Divergence>,
}

/// One run that does not replay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Divergence {
    /// The run.
    pub run: RunId,
    /// Where and how it diverges.
    pub error: String,
}

/// One audit of `evalflow reproduce`: a published run re-run, compared.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditView {
    /// The published run.
    pub original: RunId,
    /// Its audit run.
    pub audit: RunId,
    /// The audit run's state.
    pub state: StateTag,
    /// The original's score.
    pub original_score: Option<f64>,
    /// The audit's score, once scored.
    pub audit_score: Option<f64>,
    /// Audit score minus original score.
    pub score_difference: Option<f64>,
    /// Test files compared.
    pub rows: Option<usize>,
    /// The largest difference between the two predictions of one test file.
    pub max_abs_difference: Option<f64>,
    /// `reproduced`, `not_reproduced` (too different, or the audit's code
    /// failed), `pending` (not ended yet), `cancelled`, or `failed` (the
    /// infrastructure failed it, or the predictions cannot be compared: not judged).
    pub verdict: String,
    /// What the verdict rests on, in words.
    pub note: String,
}

/// The report of `evalflow reproduce`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReproduceView {
    /// The largest difference per test file that counts as reproduced (`[reproduce] tolerance`).
    pub tolerance: f64,
    /// One per audit.
    pub audits: Vec<AuditView>,
    /// Audits ended with a verdict (reproduced or not).
    pub judged: usize,
    /// Of them, reproduced.
    pub reproduced: usize,
    /// `reproduced / judged`, when any was judged.
    pub share_reproduced: Option<f64>,
}

/// The cost report, as shown by `evalflow cost`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CostView {
    /// How time is billed.
    pub billing: Billing,
    /// Per profile and in total.
    #[serde(flatten)]
    pub report: CostReport,
}

/// The end of a run's latest job's output, as the dashboard shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogView {
    /// The attempt, once there is one.
    pub attempt: Option<u32>,
    /// Each part: `stdout` and `stderr` (their last 4 KiB), or on AWS the log stream's newest events.
    pub output: Vec<LogPart>,
    /// Why there is no output to show, when there is none.
    pub note: Option<String>,
}

/// One part of a job's output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogPart {
    /// `stdout`, `stderr`, or the log stream.
    pub name: String,
    /// Its text, without control characters.
    pub text: String,
}

/// The answer to `evalflow backup`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackupView {
    /// The backup's data directory.
    pub dest: String,
    /// Runs in the store copied.
    pub runs: u64,
    /// The store's entries copied.
    pub entries: u64,
    /// How long the copy held commits back, in seconds.
    pub secs: f64,
}

/// The answer to `evalflow reload`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReloadView {
    /// The budget held to from now on.
    pub budget_usd: Option<f64>,
    /// What changed, in words.
    pub message: String,
}

/// How long the runs whose job succeeded took, for `evalflow plan --from`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DurationsView {
    /// Runs in the store.
    pub runs: usize,
    /// The running time of each run whose last job succeeded, on a profile of
    /// `relative_speed` 1, in seconds.
    pub reference_secs: Vec<f64>,
}

/// Which runs an operator's request is for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Selection {
    /// These runs.
    Runs(Vec<RunId>),
    /// Every run that matches.
    Matching(Filter),
}

/// What selected runs have in common; at least one field is given.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    /// In this state.
    #[serde(default)]
    pub state: Option<StateTag>,
    /// Failed for this cause (`out_of_memory`, `timed_out` ...: see [`evalflow_workflow::FailureReason::KINDS`]).
    #[serde(default)]
    pub cause: Option<String>,
    /// Whose latest attempt is on this profile.
    #[serde(default)]
    pub profile: Option<ProfileName>,
    /// On this stage.
    #[serde(default)]
    pub stage: Option<Stage>,
    /// Of this team.
    #[serde(default)]
    pub team: Option<TeamId>,
}

impl Filter {
    /// Whether it names nothing (it would select every run).
    pub fn is_empty(&self) -> bool {
        *self == Filter::default()
    }

    /// Whether `run` matches every field given.
    pub fn matches(&self, run: &Run) -> bool {
        let (spec, status) = (&run.spec, &run.status);
        let cause = match &status.state {
            RunState::Failed { reason, .. } => Some(reason.kind()),
            _ => None,
        };
        self.state.is_none_or(|state| status.state.tag() == state)
            && self.cause.as_deref().is_none_or(|wanted| cause == Some(wanted))
            && self.profile.as_ref().is_none_or(|profile| status.last_profile() == Some(profile))
            && self.stage.is_none_or(|stage| spec.stage == stage)
            && self.team.as_ref().is_none_or(|team| spec.team == *team)
    }
}
