//! `evalflow reproduce`: re-runs published runs as audit runs (named
//! `<submission>-audit<n>-<stage>`, never on the leaderboard) and compares
//! each with its original: the predictions row by row, the scores, and a
//! verdict against `[reproduce] tolerance`.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use evalflow_activities::ArtifactStore;
use evalflow_activities::scoring::{PREDICTIONS_MAX_BYTES, compare};
use evalflow_worker::api::operations::{History, Runs, Standings, Submit};
use evalflow_worker::config::Config;
use evalflow_worker::node::ControlError;
use evalflow_worker::views::{AuditView, ReproduceView, RunView};
use evalflow_workflow::{Attempt, Event, RunId, Stage, StateTag, Timestamp};

use crate::backend::Backend;

/// How often `--wait` looks at the audits.
const WAIT_POLL: Duration = Duration::from_secs(2);

/// What to reproduce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chosen {
    /// These published runs.
    Runs(Vec<RunId>),
    /// The runs of a stage's first `n` leaderboard places.
    Top {
        /// How many.
        n: usize,
        /// The stage.
        stage: Stage,
    },
    /// Nothing new: report every audit made so far.
    Report,
}

/// Starts an audit of each chosen run that has none yet, waits for the
/// audits to end if `wait`, and reports them.
pub async fn run(backend: &Backend, config: &Config, chosen: Chosen, wait: bool) -> Result<ReproduceView> {
    let originals = match chosen {
        Chosen::Runs(runs) => runs,
        Chosen::Top { n, stage } => {
            let board = backend.call(Standings { stage: Some(stage) }).await?;
            if board.entries.is_empty() {
                bail!("the {stage} leaderboard is empty: nothing is published to reproduce yet");
            }
            board.entries.into_iter().take(n).map(|e| e.run).collect()
        }
        Chosen::Report => Vec::new(),
    };
    let runs = by_id(backend.call(Runs::default()).await?);
    let mut new = Vec::new();
    for original in &originals {
        let Some(view) = runs.get(original) else { bail!("{}", ControlError::UnknownRun(original.clone())) };
        if let Some(audited) = &view.audit_of {
            bail!("{original} is itself an audit run: reproduce the run it audits, {audited}");
        }
        if view.state != StateTag::Published {
            bail!("{original} is {}: only a published run can be reproduced", view.state);
        }
        if latest_audit(&runs, original).is_none() {
            let history = backend.call(History { run: original.clone() }).await?;
            let Some(Event::Submitted(spec)) = history.first().map(|e| &e.data) else {
                bail!("{original}'s history does not start with its submission");
            };
            let audit =
                spec.audit(1, Timestamp::now()).with_context(|| format!("cannot name an audit of {original}"))?;
            new.push(audit);
        }
    }
    if !new.is_empty() {
        for action in backend.call(Submit(new)).await? {
            if !action.accepted {
                bail!("the audit {} was refused: {}", action.run, action.message);
            }
            eprintln!("audit {} started", action.run);
        }
    }
    let mut runs = by_id(backend.call(Runs::default()).await?);
    let audited: Vec<RunId> = if originals.is_empty() {
        let mut all: Vec<RunId> = runs.values().filter_map(|r| r.audit_of.clone()).collect();
        all.sort();
        all.dedup();
        all
    } else {
        originals
    };
    while wait && audited.iter().any(|o| latest_audit(&runs, o).is_some_and(|a| !a.state.is_terminal())) {
        tokio::time::sleep(WAIT_POLL).await;
        runs = by_id(backend.call(Runs::default()).await?);
    }
    report(config, &runs, &audited).await
}

fn by_id(views: Vec<RunView>) -> BTreeMap<RunId, RunView> {
    views.into_iter().map(|v| (v.id.clone(), v)).collect()
}

/// The newest audit run of `original`.
fn latest_audit<'a>(runs: &'a BTreeMap<RunId, RunView>, original: &RunId) -> Option<&'a RunView> {
    runs.values().filter(|r| r.audit_of.as_ref() == Some(original)).max_by_key(|r| r.submitted_at_ms)
}

async fn report(config: &Config, runs: &BTreeMap<RunId, RunView>, audited: &[RunId]) -> Result<ReproduceView> {
    let tolerance = config.reproduce.tolerance;
    let artifacts = evalflow_worker::node::artifacts(config).await?;
    let mut labels = BTreeMap::new();
    let mut audits = Vec::new();
    for original in audited {
        let (Some(source), Some(audit)) = (runs.get(original), latest_audit(runs, original)) else { continue };
        let mut view = AuditView {
            original: original.clone(),
            audit: audit.id.clone(),
            state: audit.state,
            original_score: source.score,
            audit_score: audit.score,
            score_difference: source.score.zip(audit.score).map(|(a, b)| b - a),
            rows: None,
            max_abs_difference: None,
            verdict: "pending".into(),
            note: audit.waiting.clone().unwrap_or_else(|| audit.state.to_string()),
        };
        match audit.state {
            StateTag::Published => {
                let stage_labels = match labels.entry(source.stage) {
                    std::collections::btree_map::Entry::Occupied(known) => known.into_mut(),
                    std::collections::btree_map::Entry::Vacant(new) => {
                        new.insert(artifacts.labels(source.stage).await?)
                    }
                };
                let before = predictions(artifacts.as_ref(), source).await?;
                let after = predictions(artifacts.as_ref(), audit).await?;
                match compare(&before, &after, stage_labels) {
                    Ok(comparison) => {
                        let reproduced = comparison.max_abs_difference <= tolerance;
                        view.rows = Some(comparison.rows);
                        view.max_abs_difference = Some(comparison.max_abs_difference);
                        view.verdict = if reproduced { "reproduced" } else { "not_reproduced" }.into();
                        view.note = format!(
                            "{} rows: largest difference {:.3e} (tolerance {tolerance:.3e})",
                            comparison.rows, comparison.max_abs_difference
                        );
                    }
                    Err(rejection) => {
                        view.verdict = "failed".into();
                        view.note = format!("the predictions cannot be compared: {rejection}");
                    }
                }
            }
            // The original ran to a score; its audit did not, by the code's own
            // doing (a crash, an OOM ...), or for the infrastructure's (not judged).
            StateTag::Failed => {
                let infrastructure = matches!(
                    audit.failure.as_deref(),
                    Some("interrupted" | "activity_failed" | "attempts_exhausted" | "no_eligible_profile")
                );
                view.verdict = if infrastructure { "failed" } else { "not_reproduced" }.into();
                let reason = audit.reason.as_deref().unwrap_or("no reason");
                view.note = match infrastructure {
                    true => format!("the audit could not run to its end: {reason}: `evalflow retry` runs it again"),
                    false => format!("the audit failed: {reason}"),
                };
            }
            StateTag::Cancelled => {
                view.verdict = "cancelled".into();
                view.note = "the audit was cancelled: `evalflow retry` runs it again".into();
            }
            _ => {}
        }
        audits.push(view);
    }
    let judged = audits.iter().filter(|a| matches!(a.verdict.as_str(), "reproduced" | "not_reproduced")).count();
    let reproduced = audits.iter().filter(|a| a.verdict == "reproduced").count();
    let share_reproduced = (judged > 0).then(|| reproduced as f64 / judged as f64);
    Ok(ReproduceView { tolerance, audits, judged, reproduced, share_reproduced })
}

/// The predictions of `run`'s last attempt, the one scored.
async fn predictions(
    artifacts: &dyn ArtifactStore,
    run: &RunView,
) -> Result<evalflow_activities::artifacts::Predictions> {
    let attempt = Attempt(u32::try_from(run.attempts).context("attempt number")?);
    Ok(artifacts.predictions(&run.id, attempt, PREDICTIONS_MAX_BYTES).await?)
}
