//! `evalflow`: evaluate competition submissions as durable state machines.
//!
//! Every command takes `--data-dir` (or `EVALFLOW_DATA_DIR`): the competition's
//! directory, holding `evalflow.toml` and its state. When an engine serves that
//! directory, commands go through its API; otherwise they open its store.

#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

mod backend;
mod competition;
mod demo;
mod fleet;
mod logs;
mod output;
mod plan;
mod reproduce;
mod serve;
mod signals;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use evalflow_activities::local::sandbox::Isolation;
use evalflow_worker::api::operations::{
    Backup, Cancel, Cost, History, Reload, Replay, Rescore, Retry, Runs, Standings, Status, Stopping, Submit, Teams,
};
use evalflow_worker::config::Config;
use evalflow_worker::datadir::submit::{
    SubmissionRequest, SubmitLock, check_requests, check_stages, clear_unsubmitted, prepare_all, read_manifest,
};
use evalflow_worker::views::{ActionView, Filter, Selection};
use evalflow_workflow::{FailureReason, ProfileName, RunId, Stage, StateTag, SubmissionId, TeamId, Timestamp};

use crate::backend::{Backend, connect};

/// The engine's groups, the API's answers and the workers' activities
/// allocate and free many small buffers across threads; mimalloc serves
/// them faster than the system allocator (the benchmark's figures).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Whether this process may get transparent huge pages. mimalloc asks for
/// them, so the first touch of each fresh 2 MiB zeroes all of it at once:
/// in the full-stack benchmark the engine thread spent about a sixth of its
/// time there, with a group in hand. Without them the node took about 13%
/// less CPU a run and published about 15% more runs a second. The setting
/// passes to children, even through `exec`, so a job's supervisor allows
/// them again: the submission gets the machine's default. (Linux only; a
/// kernel that refuses leaves things as they were.)
fn huge_pages(allowed: bool) {
    #[cfg(target_os = "linux")]
    let _ = rustix::thread::disable_transparent_huge_pages(!allowed);
}

#[derive(Debug, Parser)]
#[command(name = "evalflow", version, about = "Re-run and score competition submissions as durable state machines")]
struct Cli {
    /// The competition's directory, holding evalflow.toml and its state [default: ., or evalflow-demo for demo (/var/tmp/evalflow-demo when job sandboxes cannot reach the current directory)].
    #[arg(long, global = true, env = "EVALFLOW_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Show every table cell whole, however wide (by default tables fit the
    /// terminal, or 80 columns; long cells wrap).
    #[arg(long, global = true)]
    wide: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write an evalflow.toml and empty stages for a local competition in DIR.
    Init {
        /// Where to create it.
        dir: PathBuf,
    },
    /// Evaluate a sample competition of eight example submissions, end to end.
    Demo {
        /// Run submissions without the sandbox (only for code you trust).
        #[arg(long)]
        no_sandbox: bool,
    },
    /// Run the engine, its workers and its HTTP API until stopped.
    Serve {
        /// The API's address, on loopback (port 0: any free port).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Run submissions without the sandbox (only for code you trust).
        #[arg(long)]
        no_sandbox: bool,
    },
    /// Submit a submission directory, or a manifest (JSON lines) of many.
    Submit {
        /// The submission's id.
        #[arg(long, required_unless_present = "manifest")]
        id: Option<SubmissionId>,
        /// Its team.
        #[arg(long, required_unless_present = "manifest")]
        team: Option<TeamId>,
        /// The stage to evaluate it on.
        #[arg(long, default_value = "public")]
        stage: Stage,
        /// A JSON-lines manifest: {"id", "team", "stage", "path" or "image"} per line.
        #[arg(long, conflicts_with_all = ["id", "team", "path", "image"])]
        manifest: Option<PathBuf>,
        /// The submission's directory (with submission.toml), on this machine.
        #[arg(required_unless_present_any = ["manifest", "image"])]
        path: Option<PathBuf>,
        /// The submission's container image, on AWS.
        #[arg(long, conflicts_with = "path")]
        image: Option<String>,
        /// The image runs on the CPU ladder.
        #[arg(long, requires = "image")]
        cpu_only: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Re-run published runs as audit runs (never on the leaderboard) and
    /// compare each with its original: predictions row by row, score, verdict.
    /// Without runs or --top: report the audits made so far.
    Reproduce {
        /// Published runs to re-run.
        runs: Vec<RunId>,
        /// Or: the runs of the first N places of a stage's leaderboard.
        #[arg(long, conflicts_with = "runs")]
        top: Option<usize>,
        /// The leaderboard's stage, with --top.
        #[arg(long, default_value = "public", requires = "top")]
        stage: Stage,
        /// Wait until every audit has ended, then report.
        #[arg(long)]
        wait: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Progress, ETA and cost, in all and per stage; the budget; runs per
    /// state; and what keeps runs waiting.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Redraw it every --interval seconds until stopped (Ctrl-C).
        #[arg(long, conflicts_with = "json")]
        watch: bool,
        /// Seconds between redraws, with --watch.
        #[arg(long, default_value_t = 2, requires = "watch", value_parser = clap::value_parser!(u64).range(1..=3600))]
        interval: u64,
    },
    /// Write a backup of the competition to DEST, a new directory, while it
    /// runs too: `evalflow serve --data-dir DEST` starts from it.
    Backup {
        /// The backup's directory (it must not exist yet).
        dest: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Read [policy] budget_usd in evalflow.toml again: the engine holds the
    /// competition to it from now on (the rest of the file is read at the
    /// next start).
    Reload {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List runs.
    Runs {
        /// Only runs in this state.
        #[arg(long)]
        state: Option<StateTag>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// A run's history: every event, and the state it left.
    History {
        /// The run (<submission>-<stage>).
        run: RunId,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Rebuild runs from their history and compare with the stored state.
    Replay {
        /// The run.
        #[arg(required_unless_present = "all")]
        run: Option<RunId>,
        /// Every run.
        #[arg(long, conflicts_with = "run")]
        all: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run failed or cancelled runs again: those named, or every one that
    /// matches the filters given.
    Retry(Bulk),
    /// Stop runs, terminating their jobs: those named, or every one that
    /// matches the filters given.
    Cancel(Bulk),
    /// Score every scored or published run of a stage again from its stored
    /// predictions (after its labels were corrected) and publish it, which
    /// rebuilds the leaderboard; no job runs again.
    Rescore {
        /// The stage.
        #[arg(long)]
        stage: Stage,
        #[command(flatten)]
        confirm: Confirm,
    },
    /// A stage's leaderboard.
    Leaderboard {
        /// The stage.
        #[arg(long, default_value = "public")]
        stage: Stage,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// What the runs cost, per profile.
    Cost {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Plan a competition's run: simulate it on the engine and policy, for
    /// each policy compared, and find the smallest fleet for its deadline.
    Plan {
        /// The workload file (see examples/dfdc.toml).
        #[arg(long)]
        workload: PathBuf,
        /// Draw the running times from the runs whose job succeeded in this
        /// competition's data directory instead of the workload's [run_time].
        #[arg(long)]
        from: Option<PathBuf>,
        /// Find the smallest fleet for this deadline instead of the workload's [fleet].
        #[arg(long)]
        deadline_hours: Option<f64>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// On AWS: carry out the engine's commands from the tasks queue until stopped.
    Worker,
    /// AWS resources.
    Aws {
        #[command(subcommand)]
        command: AwsCommand,
    },
    /// A run's job: how it ended, and the end of its output.
    Logs {
        /// The run.
        run: RunId,
        /// The attempt [default: the latest].
        #[arg(long)]
        attempt: Option<u32>,
    },
    /// Print the address of the dashboard of the engine serving the data
    /// directory, with the token that signs a browser in (keep it to yourself).
    Dashboard,
    /// Print the shell's completion script: `source <(evalflow completions bash)`,
    /// or save it where the shell looks (fish: ~/.config/fish/completions/evalflow.fish).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Supervise one local job (started by the engine, not by hand).
    #[command(hide = true)]
    Supervise {
        /// The job's directory.
        job_dir: PathBuf,
    },
}

/// The runs a bulk request is for, and how it is confirmed.
#[derive(Debug, clap::Args)]
struct Bulk {
    /// The runs.
    #[arg(required_unless_present_any = ["state", "cause", "profile", "stage", "team"])]
    runs: Vec<RunId>,
    /// Every run in this state.
    #[arg(long, conflicts_with = "runs")]
    state: Option<StateTag>,
    /// Every run failed for this cause.
    #[arg(long, conflicts_with = "runs", value_parser = clap::builder::PossibleValuesParser::new(FailureReason::KINDS))]
    cause: Option<String>,
    /// Every run whose latest attempt is on this profile.
    #[arg(long, conflicts_with = "runs")]
    profile: Option<ProfileName>,
    /// Every run of this stage.
    #[arg(long, conflicts_with = "runs")]
    stage: Option<Stage>,
    /// Every run of this team.
    #[arg(long, conflicts_with = "runs")]
    team: Option<TeamId>,
    #[command(flatten)]
    confirm: Confirm,
}

/// How a request for many runs is confirmed, and reported.
#[derive(Debug, clap::Args)]
struct Confirm {
    /// Only show how many runs it would touch and what would happen to each.
    #[arg(long)]
    dry_run: bool,
    /// Do not ask before acting on more than 10 runs.
    #[arg(long, short)]
    yes: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

impl Bulk {
    fn selection(&self) -> Selection {
        match self.runs.is_empty() {
            false => Selection::Runs(self.runs.clone()),
            true => Selection::Matching(Filter {
                state: self.state,
                cause: self.cause.clone(),
                profile: self.profile.clone(),
                stage: self.stage,
                team: self.team.clone(),
            }),
        }
    }
}

#[derive(Debug, Subcommand)]
enum AwsCommand {
    /// Create the queues, buckets, compute environments, job queues and job
    /// definition evalflow.toml describes, if missing.
    Bootstrap,
}

/// Standard error, dropping what cannot be written instead of panicking: a
/// supervisor's standard error is a log file on a disk that may be full.
struct Stderr;

impl std::io::Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    huge_pages(matches!(cli.command, Command::Supervise { .. }));
    // sled's own log lines restate, in its raw words, what evalflow reports:
    // shown only when EVALFLOW_LOG names sled.
    let mut filter = std::env::var("EVALFLOW_LOG").unwrap_or_else(|_| "warn".into());
    if !filter.split(',').any(|directive| directive.trim().starts_with("sled")) {
        filter.push_str(",sled=off");
    }
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(|| Stderr).init();
    if let Command::Supervise { job_dir } = &cli.command {
        return match evalflow_activities::local::supervisor::supervise(job_dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                let _ = writeln!(Stderr, "error: supervising {}: {e}", job_dir.display());
                ExitCode::FAILURE
            }
        };
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn isolation(no_sandbox: bool) -> Isolation {
    if !no_sandbox {
        return Isolation::Sandbox;
    }
    eprintln!(
        "WARNING: --no-sandbox: submissions run unconfined, with this user's rights, files and network. \
         Only do this for code you trust."
    );
    Isolation::Unconfined
}

async fn run(cli: Cli) -> Result<ExitCode> {
    output::set_wide(cli.wide);
    let data_dir = cli.data_dir.clone();
    let dir = || data_dir.clone().unwrap_or_else(|| PathBuf::from("."));
    match cli.command {
        Command::Init { dir } => {
            competition::init(&dir, &competition::INIT)?;
            println!(
                "wrote {}: put each stage's test files in data/<stage>/test and their labels in \
                 data/<stage>/labels.csv (filename,label with 1 = FAKE), then `evalflow --data-dir {} submit`",
                dir.join(evalflow_worker::config::CONFIG_FILE).display(),
                dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { no_sandbox } => {
            let dir = data_dir.unwrap_or_else(demo::default_dir);
            demo::run(&dir, isolation(no_sandbox)).await
        }
        Command::Serve { listen, no_sandbox } => serve::run(&dir(), listen, isolation(no_sandbox)).await,
        Command::Worker => fleet::worker(&Config::load(&dir())?).await,
        Command::Plan { workload, from, deadline_hours, json } => {
            plan::run(&workload, from.as_deref(), deadline_hours, json).await
        }
        Command::Aws { command: AwsCommand::Bootstrap } => fleet::bootstrap(&Config::load(&dir())?).await,
        Command::Supervise { .. } => unreachable!("handled before the runtime starts"),
        Command::Dashboard => dashboard(&dir()),
        Command::Completions { shell } => {
            use clap::CommandFactory as _;
            clap_complete::generate(shell, &mut Cli::command(), "evalflow", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { watch: true, interval, .. } => watch_status(&dir(), interval).await,
        Command::Logs { run, attempt } => {
            let config = Config::load(&dir())?;
            match config.aws {
                None => logs::print(&config, &run, attempt)?,
                Some(_) => {
                    let backend = connect(&dir()).await?;
                    let printed = logs::print_aws(&config, &backend, &run, attempt).await;
                    backend.close().await?;
                    printed?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        command => {
            let backend = connect(&dir()).await?;
            let result = act(&backend, &dir(), command).await;
            backend.close().await?;
            result
        }
    }
}

/// The commands that act through a backend.
async fn act(backend: &Backend, dir: &Path, command: Command) -> Result<ExitCode> {
    match command {
        Command::Submit { id, team, stage, manifest, path, image, cpu_only, json } => {
            let requests = match (manifest, id, team) {
                (Some(manifest), ..) => read_manifest(&manifest)?,
                (None, Some(id), Some(team)) => vec![SubmissionRequest { id, team, stage, path, image, cpu_only }],
                _ => bail!("give --id, --team and a directory (or --image), or --manifest"),
            };
            let config = Config::load(dir)?;
            check_stages(&config, &requests)?;
            let lock = SubmitLock::take(&config)
                .with_context(|| format!("cannot take {} for this submit", config.submit_lock().display()))?;
            // Only the teams of the ids at hand: a manifest is checked without reading every stored run.
            let mut asked: Vec<_> = requests.iter().map(|r| r.id.clone()).chain(lock.left().iter().cloned()).collect();
            asked.sort();
            asked.dedup();
            let stored = backend.call(Teams { submissions: asked }).await?.into_iter().collect();
            check_requests(&requests, &stored)?;
            let cleared = clear_unsubmitted(&config, &stored, &lock);
            if cleared > 0 {
                eprintln!("removed {cleared} copies left by a submit that did not finish (none of them had a run)");
            }
            let bar = preparing(requests.len());
            let prepared = prepare_all(&config, &requests, Timestamp::now(), &lock, |n| bar.inc(n));
            bar.finish_and_clear();
            let prepared = prepared?;
            // Without an answer the engine may or may not have them: the
            // journal stays, and the next submit removes what it does not have.
            let views = backend.call(Submit(prepared.specs.clone())).await?;
            if !views.iter().any(|v| v.accepted) {
                prepared.discard(); // nothing went through: nothing of it stays behind
            }
            lock.done().with_context(|| format!("cannot empty {}", config.submit_lock().display()))?;
            report_actions(&views, json, "submit")
        }
        Command::Reproduce { runs, top, stage, wait, json } => {
            let chosen = match (top, runs.is_empty()) {
                (Some(n), _) => reproduce::Chosen::Top { n, stage },
                (None, false) => reproduce::Chosen::Runs(runs),
                (None, true) => reproduce::Chosen::Report,
            };
            let view = reproduce::run(backend, &Config::load(dir)?, chosen, wait).await?;
            if json {
                output::json(&view)?
            } else {
                output::reproduce(&view)
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { json: true, .. } => output::json(&backend.call(Status {}).await?).map(|()| ExitCode::SUCCESS),
        Command::Status { json: false, .. } => Ok({
            output::status(&backend.call(Status {}).await?);
            ExitCode::SUCCESS
        }),
        Command::Backup { dest, json } => {
            let dest = std::path::absolute(&dest).with_context(|| format!("cannot find {}", dest.display()))?;
            let view = backend.call(Backup { dest: dest.display().to_string() }).await?;
            if json {
                output::json(&view)?
            } else {
                println!(
                    "backup of {} runs written to {} ({} entries; commits waited {:.2} s): \
                     `evalflow serve --data-dir {}` starts from it",
                    view.runs, view.dest, view.entries, view.secs, view.dest
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Reload { json } => {
            let view = backend.call(Reload {}).await?;
            if json {
                output::json(&view)?
            } else {
                println!("{}", view.message)
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Runs { state, json: true } => {
            // Page by page: however many runs there are, neither the engine
            // nor this process holds them all.
            let mut out = output::JsonArray::stdout()?;
            let mut after = None;
            loop {
                let page = backend.call(Runs { state, after, limit: Some(RUNS_PAGE) }).await?;
                out.extend(&page)?;
                if page.len() < RUNS_PAGE {
                    break;
                }
                after = page.last().map(|view| view.id.clone());
            }
            out.end()?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Runs { state, json: false } => {
            output::runs(&backend.call(Runs { state, ..Runs::default() }).await?);
            Ok(ExitCode::SUCCESS)
        }
        Command::History { run, json } => {
            let events = backend.call(History { run: run.clone() }).await?;
            if json {
                output::json(&events)?
            } else {
                output::history(&events)
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Replay { run, json, .. } => {
            let view = backend.call(Replay { run }).await?;
            if json {
                output::json(&view)?
            } else {
                output::replay(&view)
            }
            Ok(if view.diverged.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Retry(bulk) => {
            if let Some(state) = bulk.state.filter(|s| !matches!(s, StateTag::Failed | StateTag::Cancelled)) {
                bail!(
                    "retry --state {state}: only failed or cancelled runs are retried (`evalflow runs --state {state}` lists these)"
                );
            }
            let preview = backend.call(Retry { selection: bulk.selection(), dry_run: true }).await?;
            let Some(runs) = confirmed(&bulk.confirm, &preview, "retry")? else {
                return unconfirmed(&bulk.confirm, &preview, "retry");
            };
            let views = backend.call(Retry { selection: Selection::Runs(runs), dry_run: false }).await?;
            report_actions(&views, bulk.confirm.json, "retry")
        }
        Command::Cancel(bulk) => {
            if let Some(state) = bulk.state.filter(|s| s.is_terminal()) {
                bail!("cancel --state {state}: a {state} run has ended already, there is nothing to stop");
            }
            let preview = backend.call(Cancel { selection: bulk.selection(), dry_run: true }).await?;
            let Some(runs) = confirmed(&bulk.confirm, &preview, "cancel")? else {
                return unconfirmed(&bulk.confirm, &preview, "cancel");
            };
            let views = backend.call(Cancel { selection: Selection::Runs(runs), dry_run: false }).await?;
            wait_for_terminations(backend, &views).await?;
            report_actions(&views, bulk.confirm.json, "cancel")
        }
        Command::Rescore { stage, confirm } => {
            let preview = backend.call(Rescore { stage, runs: None, dry_run: true }).await?;
            let Some(runs) = confirmed(&confirm, &preview, "score again")? else {
                return unconfirmed(&confirm, &preview, "score again");
            };
            // Exactly the runs previewed: one that moved on meanwhile is refused, not rescored.
            let views = backend.call(Rescore { stage, runs: Some(runs), dry_run: false }).await?;
            report_actions(&views, confirm.json, "score again")
        }
        Command::Leaderboard { stage, json } => {
            let board = backend.call(Standings { stage: Some(stage) }).await?;
            if json {
                output::json(&board)?
            } else {
                output::leaderboard(&board)
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Cost { json } => {
            let cost = backend.call(Cost {}).await?;
            if json {
                output::json(&cost)?
            } else {
                output::cost(&cost)
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Init { .. }
        | Command::Demo { .. }
        | Command::Serve { .. }
        | Command::Logs { .. }
        | Command::Worker
        | Command::Plan { .. }
        | Command::Completions { .. }
        | Command::Dashboard
        | Command::Aws { .. } => unreachable!("handled without a backend"),
        Command::Supervise { .. } => unreachable!("handled before the runtime starts"),
    }
}

/// `evalflow dashboard`: the sign-in address of the engine serving `dir`.
fn dashboard(dir: &Path) -> Result<ExitCode> {
    use evalflow_worker::datadir::lock::{LockState, try_lock};
    match try_lock(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        LockState::HeldBy(Some(info)) => {
            let token = evalflow_worker::api::token::ApiToken::read(dir)?;
            println!("{}/dashboard?token={}", info.api, token.as_str());
            Ok(ExitCode::SUCCESS)
        }
        LockState::HeldBy(None) => bail!("the engine of {} is starting: try again in a moment", dir.display()),
        LockState::Acquired(_) => bail!(
            "no engine serves {}: start one with `evalflow --data-dir {} serve`, then run this again",
            dir.display(),
            dir.display()
        ),
    }
}

/// `evalflow status --watch`: the status redrawn every `interval` seconds
/// until Ctrl-C or SIGTERM. Each look connects anew, so that it never holds
/// the data directory from an engine starting meanwhile.
async fn watch_status(dir: &Path, interval: u64) -> Result<ExitCode> {
    use std::io::IsTerminal as _;
    let terminal = std::io::stdout().is_terminal();
    let stop = signals::shutdown();
    tokio::pin!(stop);
    loop {
        let backend = connect(dir).await?;
        let view = backend.call(Status {}).await;
        backend.close().await?;
        let view = view?;
        if terminal {
            print!("\x1b[H\x1b[2J"); // home, then clear the screen
        }
        output::status(&view);
        println!(
            "(every {interval} s, at {}; Ctrl-C stops)",
            humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        );
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(interval)) => {}
            _ = &mut stop => return Ok(ExitCode::SUCCESS),
        }
    }
}

/// A progress bar for preparing `n` submissions, on a terminal and for more
/// than a few; hidden otherwise.
fn preparing(n: usize) -> indicatif::ProgressBar {
    use std::io::IsTerminal as _;
    if n < 100 || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(n as u64);
    let style = indicatif::ProgressStyle::with_template("preparing {pos}/{len} submissions {wide_bar} {eta}");
    if let Ok(style) = style {
        bar.set_style(style);
    }
    bar
}

/// Runs per page of `runs --json`.
const RUNS_PAGE: usize = 1_000;

/// Above this many runs, a bulk request asks before it acts (`--yes` does not).
const CONFIRM_ABOVE: usize = 10;

/// Whether to go on with a bulk request, given what it would do (`preview`):
/// the runs to act on, exactly those previewed as changed, or `None` for a
/// dry run or when none would change (the preview is then the report).
/// Above [`CONFIRM_ABOVE`] runs it asks on a terminal, and without one
/// wants `--yes`.
fn confirmed(confirm: &Confirm, preview: &[ActionView], verb: &str) -> Result<Option<Vec<RunId>>> {
    use std::io::IsTerminal as _;
    if confirm.dry_run {
        return Ok(None);
    }
    // Only the runs shown as changed: one refused or already done then is left alone.
    let runs: Vec<RunId> =
        preview.iter().filter(|v| v.message.starts_with("would be")).map(|v| v.run.clone()).collect();
    if runs.is_empty() {
        return Ok(None);
    }
    let touched = runs.len();
    if touched > CONFIRM_ABOVE && !confirm.yes {
        let what = format!("{verb} {touched} runs ({} matched)", preview.len());
        if !std::io::stdin().is_terminal() {
            bail!("this would {what}: pass --yes to do it, or --dry-run to see each run first");
        }
        eprint!("{what}? [y/N] ");
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            bail!("nothing done: not confirmed");
        }
    }
    Ok(Some(runs))
}

/// The report of a request [`confirmed`] did not go on with: the dry run's,
/// or that of the preview (no run would change: each says why).
fn unconfirmed(confirm: &Confirm, preview: &[ActionView], verb: &str) -> Result<ExitCode> {
    match confirm.dry_run {
        true => dry_run(preview, confirm.json, verb),
        false => report_actions(preview, confirm.json, verb),
    }
}

fn report_actions(views: &[ActionView], json: bool, verb: &str) -> Result<ExitCode> {
    if json {
        output::json(&views)?
    } else if views.is_empty() {
        println!("no run matched: nothing to {verb}");
    } else {
        output::actions(views)
    }
    Ok(if views.iter().all(|v| v.accepted) { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// `--dry-run`: what would happen to each run, and how many it would touch.
fn dry_run(preview: &[ActionView], json: bool, verb: &str) -> Result<ExitCode> {
    if json {
        output::json(&preview)?;
    } else {
        output::actions(preview);
        let touched = preview.iter().filter(|v| v.message.starts_with("would be")).count();
        println!("dry run: {verb} would change {touched} of the {} runs matched; nothing was done", preview.len());
    }
    Ok(ExitCode::SUCCESS)
}

/// How long `cancel` waits for cancelled jobs to stop.
const TERMINATION_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Waits until the cancelled runs' jobs are stopped, so that `cancel`
/// returning means the jobs no longer run.
async fn wait_for_terminations(backend: &Backend, views: &[ActionView]) -> Result<()> {
    let deadline = std::time::Instant::now() + TERMINATION_WAIT;
    for view in views.iter().filter(|v| v.state == Some(StateTag::Cancelled)) {
        while backend.call(Stopping { run: view.run.clone() }).await? {
            if std::time::Instant::now() > deadline {
                bail!("{}: cancelled, but its job has not stopped yet: see `evalflow logs {}`", view.run, view.run);
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn unsafe_run_ids_are_refused_with_the_rule() {
        let err = Cli::try_parse_from(["evalflow", "history", "../../etc"]).unwrap_err().to_string();
        assert!(err.contains("is not of the form <submission>-public or <submission>-private"), "{err}");
        let err = Cli::try_parse_from(["evalflow", "runs", "--state", "done"]).unwrap_err().to_string();
        assert!(err.contains("is not one of: queued, launching"), "{err}");
    }
}
