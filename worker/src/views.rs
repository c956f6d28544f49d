//! What the API answers and the CLI prints (`--json`): plain data, the same
//! whether the CLI talks to an engine or reads the store itself.

use std::collections::BTreeMap;

use evalflow_workflow::cost::{Billing, CostReport, run_cost_usd};
use evalflow_workflow::{
    Disposition, Event, HistoryEntry, JobId, JobOutcome, Policy, ProfileName, Run, RunId, RunState, Stage, StateTag,
    SubmissionId, TeamId,
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
            version: status.version,
            submitted_at_ms: spec.submitted_at.as_millis(),
            updated_at_ms: status.updated_at.as_millis(),
        }
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
                Disposition::Ignored(why) => format!("ignored: {why}"),
            },
            detail: describe(&entry.input.event, state),
            data: entry.input.event.clone(),
        }
    }
}

/// An event in a few words.
fn describe(event: &Event, after: &RunState) -> String {
    match event {
        Event::Submitted(spec) => format!("team {} on {}", spec.team, spec.stage),
        Event::JobLaunched { attempt, job } => format!("attempt {attempt}: job {job}"),
        Event::LaunchFailed { attempt, error } => format!("attempt {attempt}: {error}"),
        Event::JobEnded { attempt, outcome, usage, .. } => {
            let peak = usage.peak_memory_mib.map(|m| format!(", peak {m} MiB")).unwrap_or_default();
            format!("attempt {attempt}: {}, ran {:.1} s{peak}", outcome_words(outcome), usage.running_secs())
        }
        Event::PredictionsScored { score, .. } => format!("log loss {:.4}", score.value()),
        Event::PredictionsRejected { reason, .. } => reason.to_string(),
        Event::ActivityFailed { activity, error, .. } => format!("{}: {error}", activity.as_str()),
        Event::JobTerminated { attempt, job: Some(job) } => format!("attempt {attempt}: job {job} stopped"),
        Event::JobTerminated { attempt, job: None } => format!("attempt {attempt}: its jobs stopped"),
        Event::Withdrawn { attempt } => format!("attempt {attempt}: its score kept off the leaderboard"),
        Event::Admitted | Event::Published { .. } | Event::CancelRequested | Event::RetryRequested => match after {
            RunState::Failed { reason, .. } => reason.to_string(),
            _ => String::new(),
        },
    }
}

/// A job outcome in words.
pub fn outcome_words(outcome: &JobOutcome) -> String {
    match outcome {
        JobOutcome::Succeeded => "succeeded".into(),
        JobOutcome::OutOfMemory { resource } => format!("out of {}", resource.words()),
        JobOutcome::Interrupted { detail } => format!("interrupted: {detail}"),
        JobOutcome::TimedOut => "timed out".into(),
        JobOutcome::Crashed { exit_code: Some(code) } => format!("crashed with exit code {code}"),
        JobOutcome::Crashed { exit_code: None } => "killed by a signal".into(),
        JobOutcome::CannotStart { detail } => format!("could not start: {detail}"),
        JobOutcome::LimitExceeded { limit } => format!("exceeded the sandbox's limit on {}", limit.words()),
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
    /// Runs in all.
    pub total: u64,
    /// Runs launching or running.
    pub active: u64,
    /// The engine serving it, if one runs: `pid N at URL`.
    pub engine: Option<String>,
    /// Messages in the dead-letter queues, on AWS.
    pub dead_letters: Option<DeadLetters>,
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

/// The cost report, as shown by `evalflow cost`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CostView {
    /// How time is billed.
    pub billing: Billing,
    /// Per profile and in total.
    #[serde(flatten)]
    pub report: CostReport,
}
