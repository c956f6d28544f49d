//! How results are printed: tables for people, `--json` for programs.

use comfy_table::presets::UTF8_BORDERS_ONLY;
use comfy_table::{Cell, CellAlignment, ColumnConstraint, ContentArrangement, Table};
use evalflow_activities::leaderboard::Leaderboard;
use evalflow_worker::views::{
    ActionView, CostView, EventView, ReplayView, ReproduceView, RunView, StatusView, duration, money,
};
use evalflow_workflow::plan::Plan;
use evalflow_workflow::progress::Progress;
use evalflow_workflow::{StateTag, Timestamp};
use serde::Serialize;

/// Prints `value` as pretty JSON.
pub fn json(value: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// A JSON array written to standard output element by element, as
/// [`json`] would write it whole.
pub struct JsonArray {
    out: std::io::BufWriter<std::io::Stdout>,
    started: bool,
}

impl JsonArray {
    /// An array about to start.
    pub fn stdout() -> anyhow::Result<JsonArray> {
        Ok(JsonArray { out: std::io::BufWriter::new(std::io::stdout()), started: false })
    }

    /// Writes `items`, and flushes them.
    pub fn extend(&mut self, items: &[impl Serialize]) -> anyhow::Result<()> {
        use std::io::Write as _;
        for item in items {
            // An element of a pretty array is the element pretty, one level in
            // (a line break inside a JSON string is escaped: each is the layout's).
            let text = serde_json::to_string_pretty(item)?;
            self.out.write_all(if self.started { b",\n" } else { b"[\n" })?;
            for (n, line) in text.lines().enumerate() {
                if n > 0 {
                    self.out.write_all(b"\n")?;
                }
                write!(self.out, "  {line}")?;
            }
            self.started = true;
        }
        self.out.flush()?;
        Ok(())
    }

    /// Ends the array.
    pub fn end(mut self) -> anyhow::Result<()> {
        use std::io::Write as _;
        self.out.write_all(if self.started { b"\n]\n" } else { b"[]\n" })?;
        self.out.flush()?;
        Ok(())
    }
}

/// Whether tables show every cell whole (`--wide`), set once at start.
static WIDE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// Tables show every cell whole, however wide; otherwise (by default) they
/// fit the terminal, or 80 columns when the output is not one.
pub fn set_wide(wide: bool) {
    let _ = WIDE.set(wide);
}

fn wide() -> bool {
    WIDE.get().copied().unwrap_or(false)
}

fn table(header: &[&str]) -> Table {
    use std::io::IsTerminal as _;
    let mut table = Table::new();
    table.load_preset(UTF8_BORDERS_ONLY).set_header(header);
    if wide() {
        table.set_content_arrangement(ContentArrangement::Disabled);
    } else {
        // On a terminal, comfy-table finds its width itself. Ids and
        // figures keep their width; the last column (the words: a reason,
        // a detail) wraps.
        table.set_content_arrangement(ContentArrangement::Dynamic);
        let last = header.len().saturating_sub(1);
        for column in table.column_iter_mut().take(last) {
            column.set_constraint(ColumnConstraint::ContentWidth);
        }
        if !std::io::stdout().is_terminal() {
            table.set_width(80);
        }
    }
    table
}

fn right(text: impl ToString) -> Cell {
    Cell::new(text).set_alignment(CellAlignment::Right)
}

fn time(ms: u64) -> String {
    humantime::format_rfc3339_seconds(Timestamp(ms).to_system_time()).to_string()
}

/// `12-02 01:04:46`, in UTC.
fn short_time(ms: u64) -> String {
    let full = time(ms); // 2026-12-02T01:04:46Z
    full.get(5..19).map_or(full.clone(), |t| t.replacen('T', " ", 1))
}

fn score(value: Option<f64>) -> String {
    value.map(|s| format!("{s:.4}")).unwrap_or_default()
}

fn eta(progress: &Progress) -> String {
    match (progress.eta_secs, progress.remaining_cost_usd) {
        (Some(0), _) if progress.ended == progress.total => "done".into(),
        (Some(secs), _) => duration(secs),
        (None, None) => "not known until a run ends".into(),
        (None, Some(_)) => "none while launching is stopped".into(),
    }
}

fn projected(progress: &Progress) -> String {
    progress.projected_cost_usd.map(money).unwrap_or_else(|| "?".into())
}

/// `evalflow status`.
pub fn status(view: &StatusView) {
    println!("competition {} in {}", view.competition, view.data_dir);
    println!("engine: {}", view.engine.as_deref().unwrap_or("none running (read from the store)"));
    let whole = &view.progress.whole;
    let running: Vec<String> = whole.running_per_profile.iter().map(|(p, n)| format!("{n} on {p}")).collect();
    let running = if running.is_empty() { String::new() } else { format!(" ({})", running.join(", ")) };
    println!(
        "{} of {} runs ended, {} running{running}, {} queued; {} ended in the last hour",
        whole.ended, whole.total, whole.running, whole.queued, whole.ended_last_hour
    );
    let remaining = whole.remaining_cost_usd.map(|usd| format!(", {} more for the live runs", money(usd)));
    println!(
        "ETA: {}; cost: {} so far, {} projected{}",
        eta(whole),
        money(whole.cost_usd),
        projected(whole),
        remaining.unwrap_or_default()
    );
    if let Some(budget) = &view.budget {
        let allowance = &budget.allowance;
        match &budget.stopped {
            Some(stopped) => println!("budget: {stopped}"),
            None => println!(
                "budget: {} ({} spent, {} committed to the running jobs)",
                money(allowance.budget_usd),
                money(allowance.spent_usd),
                money(allowance.committed_usd)
            ),
        }
    }
    let mut stages = table(&["stage", "ended", "running", "queued", "last hour", "ETA", "cost", "projected"]);
    for (stage, progress) in &view.progress.stages {
        stages.add_row(vec![
            Cell::new(stage),
            right(format!("{} / {}", progress.ended, progress.total)),
            right(progress.running),
            right(progress.queued),
            right(progress.ended_last_hour),
            right(eta(progress)),
            right(money(progress.cost_usd)),
            right(projected(progress)),
        ]);
    }
    if !view.progress.stages.is_empty() {
        println!("{stages}");
    }
    let states: Vec<String> =
        view.counts.iter().filter(|(_, n)| **n > 0).map(|(state, n)| format!("{n} {state}")).collect();
    match states.is_empty() {
        true => println!("no run yet: `evalflow submit` adds them"),
        false => println!("runs: {}", states.join(", ")),
    }
    if let Some(paused) = &view.paused {
        println!("launching paused (running jobs go on): {paused}");
    }
    for stage in &view.stage_problems {
        println!(
            "stage {} is not ready, so none of its runs launches until it is (the engine looks again every few \
             seconds): {}",
            stage.stage, stage.problem
        );
    }
    let queued = view.counts.get(&StateTag::Queued).copied().unwrap_or(0);
    if queued > 0 && whole.running >= view.max_active {
        println!(
            "{queued} queued runs wait for a launch slot: {} of {} in use (max_concurrent_jobs, or [aws] max_active_jobs)",
            whole.running, view.max_active
        );
    }
    for waiting in &view.waiting_long {
        let reason = waiting.reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default();
        println!(
            "{} has waited {} s for its job to start ({}{reason})",
            waiting.run, waiting.waited_secs, waiting.status
        );
    }
    if let Some(dead) = view.dead_letters {
        println!(
            "dead letters: {} tasks, {} events (messages that kept failing: see the worker and engine logs)",
            dead.tasks, dead.events
        );
    }
}

/// `evalflow reproduce`.
pub fn reproduce(view: &ReproduceView) {
    let mut table = table(&["original", "audit", "state", "score", "audit score", "max |diff|", "verdict", "why"]);
    for audit in &view.audits {
        table.add_row(vec![
            Cell::new(&audit.original),
            Cell::new(&audit.audit),
            Cell::new(audit.state),
            right(score(audit.original_score)),
            right(score(audit.audit_score)),
            right(audit.max_abs_difference.map(|d| format!("{d:.3e}")).unwrap_or_default()),
            Cell::new(&audit.verdict),
            Cell::new(&audit.note),
        ]);
    }
    println!("{table}");
    let pending = view.audits.iter().filter(|a| a.verdict == "pending").count();
    match view.share_reproduced {
        Some(share) => println!(
            "reproduced: {} of {} judged audits ({:.0}%), within {} per test file; {pending} pending",
            view.reproduced,
            view.judged,
            share * 100.0,
            view.tolerance
        ),
        None => println!("no audit judged yet; {pending} pending (`evalflow reproduce --wait` waits for them)"),
    }
}

/// `evalflow runs`: with `--wide`, every column; else the team is left out
/// and the profile and attempts share one (`p3 x2`).
pub fn runs(views: &[RunView]) {
    let why = "failure, or waiting for";
    let mut table = match wide() {
        true => table(&["run", "team", "state", "profile", "attempts", "score", "cost", why]),
        false => table(&["run", "state", "on", "score", "cost", why]),
    };
    for run in views {
        let profile = run.profile.as_ref().map(ToString::to_string).unwrap_or_default();
        let reason = Cell::new(run.reason.as_deref().or(run.waiting.as_deref()).unwrap_or_default());
        let (score, cost) = (right(score(run.score)), right(money(run.cost_usd)));
        table.add_row(match wide() {
            true => vec![
                Cell::new(&run.id),
                Cell::new(&run.team),
                Cell::new(run.state),
                Cell::new(profile),
                right(run.attempts),
                score,
                cost,
                reason,
            ],
            false => {
                let on = if run.attempts > 1 { format!("{profile} x{}", run.attempts) } else { profile };
                vec![Cell::new(&run.id), Cell::new(run.state), Cell::new(on), score, cost, reason]
            }
        });
    }
    println!("{table}");
    println!("{} runs", views.len());
}

/// `evalflow history`: with `--wide`, the whole time and the placement
/// after each event in its own column; else both shorter.
pub fn history(events: &[EventView]) {
    let mut table = table(&["seq", "at", "event", "state after", "detail"]);
    for event in events {
        let mut detail = match event.disposition.as_str() {
            "applied" => event.detail.clone(),
            other => format!("{} [{other}]", event.detail).trim_start().to_owned(),
        };
        let (at, state) = match (&event.placement, wide()) {
            (Some(placement), true) => (time(event.at_ms), format!("{} ({placement})", event.state)),
            (Some(placement), false) => {
                detail = if detail.is_empty() { placement.clone() } else { format!("{placement}: {detail}") };
                (short_time(event.at_ms), event.state.to_string())
            }
            (None, true) => (time(event.at_ms), event.state.to_string()),
            (None, false) => (short_time(event.at_ms), event.state.to_string()),
        };
        table.add_row(vec![
            right(event.seq),
            Cell::new(at),
            Cell::new(&event.event),
            Cell::new(state),
            Cell::new(detail),
        ]);
    }
    println!("{table}");
}

/// `evalflow replay`.
pub fn replay(view: &ReplayView) {
    for divergence in &view.diverged {
        println!("{}", divergence.error);
    }
    println!("{} runs replayed, {} diverge", view.checked, view.diverged.len());
}

/// `evalflow submit`, `cancel`, `retry`.
pub fn actions(views: &[ActionView]) {
    for view in views {
        let mark = if view.accepted { "ok" } else { "refused" };
        println!("{mark:>7}  {}: {}", view.run, view.message);
    }
}

/// `evalflow leaderboard`.
pub fn leaderboard(board: &Leaderboard) {
    println!("{} leaderboard (binary log loss, lower is better)", board.stage);
    let mut table = table(&["rank", "team", "submission", "score", "submitted"]);
    for entry in &board.entries {
        table.add_row(vec![
            right(entry.rank),
            Cell::new(&entry.team),
            Cell::new(&entry.submission),
            right(format!("{:.4}", entry.score)),
            Cell::new(time(entry.submitted_at.as_millis())),
        ]);
    }
    println!("{table}");
}

/// `evalflow cost`.
pub fn cost(view: &CostView) {
    let mut table = table(&["profile", "attempts", "hours", "cost $"]);
    for line in &view.report.lines {
        table.add_row(vec![
            Cell::new(&line.profile),
            right(line.attempts),
            right(format!("{:.5}", line.hours)),
            right(format!("{:.5}", line.usd)),
        ]);
    }
    table.add_row(vec![
        Cell::new("total"),
        right(""),
        right(format!("{:.5}", view.report.total_hours)),
        right(format!("{:.5}", view.report.total_usd)),
    ]);
    println!("{table}");
    if view.billing == evalflow_workflow::cost::Billing::ScaledBySpeed {
        println!("hours: this machine's running time divided by each profile's relative speed");
    }
}

/// The failed runs, with their reasons.
pub fn failures(views: &[RunView]) {
    let failed: Vec<&RunView> = views.iter().filter(|r| r.failure.is_some()).collect();
    if failed.is_empty() {
        return;
    }
    let mut table = table(&["run", "failure", "profile", "attempts", "reason"]);
    for run in failed {
        table.add_row(vec![
            Cell::new(&run.id),
            Cell::new(run.failure.as_deref().unwrap_or_default()),
            Cell::new(run.profile.as_ref().map(ToString::to_string).unwrap_or_default()),
            right(run.attempts),
            Cell::new(run.reason.as_deref().or(run.waiting.as_deref()).unwrap_or_default()),
        ]);
    }
    println!("failures\n{table}");
}

/// `evalflow plan`.
pub fn plan(plan: &Plan) {
    let after = plan.after.map(|s| format!(", after the {s} stage ran on evalflow")).unwrap_or_default();
    println!(
        "{} submissions on the {} stage{after}; {:.2} h a run on the reference profile (mean drawn)",
        plan.submissions, plan.stage, plan.mean_run_hours
    );
    let mut limits = Vec::new();
    if let Some(deadline) = plan.deadline_hours {
        limits.push(format!("deadline {deadline} h ({:.1} days)", deadline / 24.0));
    }
    if let Some(budget) = plan.budget_usd {
        limits.push(format!("budget ${budget:.0}"));
    }
    if !limits.is_empty() {
        println!("{}", limits.join(", "));
    }
    let mut policies = table(&["policy", "makespan h", "hours", "cost $", "fleet", "failed", "deadline"]);
    for policy in &plan.policies {
        let fleet: Vec<String> =
            policy.profiles.iter().filter(|p| p.fleet > 0).map(|p| format!("{} {}", p.fleet, p.name)).collect();
        let marker = if policy.variant == plan.chosen.variant { " *" } else { "" };
        policies.add_row(vec![
            Cell::new(format!("{}{marker}", policy.name)),
            right(policy.makespan_hours.map_or("never ends".into(), |h| format!("{h:.0}"))),
            right(format!("{:.0}", policy.total_hours)),
            right(format!("{:.0}", policy.total_cost_usd)),
            Cell::new(fleet.join(", ")),
            right(policy.runs.failed + policy.runs.unfinished),
            Cell::new(policy.deadline_met.map_or("", |met| if met { "met" } else { "missed" })),
        ]);
    }
    println!("{policies}");
    let chosen = &plan.chosen;
    println!("* the workload's policy: {}", chosen.name);
    let mut table = table(&["profile", "hours", "cost $", "peak", "fleet", "provision"]);
    for profile in &chosen.profiles {
        table.add_row(vec![
            Cell::new(&profile.name),
            right(format!("{:.0}", profile.hours)),
            right(format!("{:.0}", profile.cost_usd)),
            right(profile.peak_instances),
            right(profile.fleet),
            right(profile.provision),
        ]);
    }
    println!("{table}");
    if plan.headroom > 0.0 {
        println!("provision: the fleet with {:.0}% spare capacity", plan.headroom * 100.0);
    }
    for policy in plan.policies.iter().filter(|p| p.note.is_some()) {
        println!("{}: {}", policy.name, policy.note.as_deref().unwrap_or_default());
    }
}
