//! The whole stack: a real engine node serving its HTTP API in a process of
//! its own, runs submitted through that API, jobs that end at once (the
//! benchmark's [`InstantJobs`], handed to the node in code: no
//! competition's configuration can select it), each scored from a real
//! predictions file against the stage's labels and published to the real
//! leaderboard, until every run is published.
//!
//! Where the jobs' outputs come from is measured both ways ([`Outputs`]):
//! written before the clock starts, as jobs that ended at once would have
//! left them (the stack alone, the headline), and written by each launch on
//! the node's CPUs (the stack and the file-system work of a job's output).

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use evalflow_activities::{ActivityError, Checked, EndedJob, JobRunner, LaunchRequest, RunningJob};
use evalflow_worker::api;
use evalflow_worker::api::operations::Submit;
use evalflow_worker::api::token::ApiToken;
use evalflow_worker::config::Config;
use evalflow_worker::datadir::lock::{EngineInfo, LockState, lock_for_engine};
use evalflow_worker::node::{Mode, Node, NodeOptions};
use evalflow_worker::views::{RunView, StatusView};
use evalflow_workflow::{
    Attempt, Evidence, JobId, JobOutcome, JobUsage, RunId, RunSpec, Stage, StateTag, SubmissionId, SubmissionSource,
    TeamId, Timestamp, job_name,
};
use tokio_util::sync::CancellationToken;

use crate::Error;

/// The argument that makes this binary the serving node of the full-stack phase.
pub const SERVE_CHILD: &str = "--serve-child";

/// Files in the benchmark's test set; each job's predictions list them all.
const TEST_FILES: usize = 10;
/// Runs per submit request.
const SUBMIT_BATCH: usize = 1_000;
/// Teams the runs belong to (the DFDC's 2,265, rounded).
const TEAMS: usize = 2_300;

/// Where the jobs' outputs (`jobs/<job>/output/submission.csv`) come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outputs {
    /// Written before the clock starts, the job's directory included, as
    /// jobs that ended at once would have left them: a launch records its
    /// job, and what is measured is the stack alone (the headline, which
    /// the 0.5x target is read against). A job's output is made by its own
    /// processes locally (its supervisor and the job) and by another
    /// machine on AWS. Neither mode has the local runner's own work at a
    /// launch (a staged job directory, its `job.json` and two fsyncs, the
    /// supervisor's spawn): the sandbox phase measures that, one job at a
    /// time, where sandboxes can be made.
    Prepared,
    /// Written by each launch on the node's CPUs: two directories and a
    /// file on the file system, which the machine's two CPUs share with the
    /// stack.
    AtLaunch,
}

impl Outputs {
    fn arg(self) -> &'static str {
        match self {
            Outputs::Prepared => "prepared",
            Outputs::AtLaunch => "at-launch",
        }
    }

    /// The outputs named `arg` on the serving node's command line.
    pub fn from_arg(arg: &str) -> Result<Outputs, Error> {
        [Outputs::Prepared, Outputs::AtLaunch]
            .into_iter()
            .find(|o| o.arg() == arg)
            .ok_or_else(|| format!("no job outputs {arg:?}: prepared or at-launch").into())
    }
}

/// The job's name of the `index`th run's first attempt: the directory its
/// output is in.
fn first_job(index: usize) -> String {
    job_name(&spec(index).run, Attempt(1))
}

/// Writes a job's output under `jobs_dir`: its directory, its output
/// directory and its predictions.
fn write_output(jobs_dir: &Path, job: &str, predictions: &[u8]) -> std::io::Result<()> {
    let (dir, output) = (jobs_dir.join(job), jobs_dir.join(job).join("output"));
    for made in [&dir, &output] {
        match std::fs::create_dir(made) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
    }
    std::fs::write(output.join("submission.csv"), predictions)
}

/// Jobs that end at once: a launch (with [`Outputs::AtLaunch`], after
/// writing the job's output) hints that the job ended, and the next check
/// finds it succeeded. With [`Outputs::Prepared`], a job whose output was
/// not prepared fails its scoring, and the benchmark with it.
struct InstantJobs {
    jobs_dir: PathBuf,
    outputs: Outputs,
    predictions: Vec<u8>,
    launched: Mutex<HashMap<JobId, Timestamp>>,
    ended: tokio::sync::Notify,
}

#[async_trait]
impl JobRunner for InstantJobs {
    async fn launch(&self, request: &LaunchRequest) -> Result<JobId, ActivityError> {
        let name = job_name(&request.spec.run, request.attempt);
        if self.outputs == Outputs::AtLaunch {
            write_output(&self.jobs_dir, &name, &self.predictions)?;
        }
        let job = JobId::new(name).map_err(|e| ActivityError::Permanent(e.to_string()))?;
        self.launched.lock().unwrap_or_else(PoisonError::into_inner).insert(job.clone(), Timestamp::now());
        self.ended.notify_one();
        Ok(job)
    }

    async fn terminate(&self, _run: &RunId, _attempt: Attempt, _job: Option<&JobId>) -> Result<(), ActivityError> {
        Ok(())
    }

    async fn check(&self, jobs: &[RunningJob]) -> Result<Checked, ActivityError> {
        let mut launched = self.launched.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Timestamp::now();
        let ended = jobs
            .iter()
            .map(|job| EndedJob {
                job: job.clone(),
                outcome: JobOutcome::Succeeded,
                usage: JobUsage {
                    started_at: Some(launched.remove(&job.job).unwrap_or(job.since)),
                    ended_at: now,
                    peak_memory_mib: None,
                },
                evidence: Evidence { exit_code: Some(0), ..Evidence::default() },
            })
            .collect();
        Ok(Checked { ended, waiting: Vec::new() })
    }

    async fn ended_hint(&self) {
        self.ended.notified().await;
    }
}

/// Writes a competition of one public stage in `dir`, whose every job may
/// run at once.
pub fn competition(dir: &Path) -> Result<(), Error> {
    let stage = dir.join("data/public");
    std::fs::create_dir_all(stage.join("test"))?;
    let mut labels = String::from("filename,label\n");
    for n in 0..TEST_FILES {
        std::fs::write(stage.join("test").join(format!("clip{n:02}.mp4")), [n as u8])?;
        labels.push_str(&format!("clip{n:02}.mp4,{}\n", n % 2));
    }
    std::fs::write(stage.join("labels.csv"), labels)?;
    std::fs::write(
        dir.join("evalflow.toml"),
        r#"
[competition]
name = "fullstack-benchmark"
metric = "binary_log_loss"

[stages.public]
test_set = "data/public/test"
labels = "data/public/labels.csv"

[policy]
time_limit_secs = 32400

[[policy.profile]]
name = "g4"
host_memory_mib = 15000
gpu_memory_mib = 15360
vcpus = 4
price_per_hour_usd = 0.526

[local]
max_concurrent_jobs = 100000
"#,
    )?;
    Ok(())
}

/// A job's predictions: every test file, a little off its label.
fn predictions() -> Vec<u8> {
    let mut csv = String::from("filename,label\n");
    for n in 0..TEST_FILES {
        csv.push_str(&format!("clip{n:02}.mp4,{}\n", if n % 2 == 1 { 0.8 } else { 0.2 }));
    }
    csv.into_bytes()
}

/// The serving node of the full-stack phase: `evalflow serve`'s engine,
/// workers and API on `dir`, with [`InstantJobs`] for a runner.
pub fn serve_child(dir: &Path, outputs: Outputs) -> Result<(), Error> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let LockState::Acquired(mut lock) = lock_for_engine(dir, Duration::from_secs(5))? else {
            return Err("the benchmark's data directory is locked".into());
        };
        let config = Config::load(dir)?;
        let token = ApiToken::load_or_create(&config.data_dir)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        lock.announce(&EngineInfo { pid: std::process::id(), api: format!("http://{}", listener.local_addr()?) })?;
        let jobs = InstantJobs {
            jobs_dir: config.jobs_dir(),
            outputs,
            predictions: predictions(),
            launched: Mutex::default(),
            ended: Default::default(),
        };
        let options = NodeOptions {
            isolation: evalflow_activities::local::sandbox::Isolation::Sandbox,
            supervisor: Vec::new(),
            mode: Mode::Engine,
            runner: Some(Arc::new(jobs)),
        };
        let node = Arc::new(Node::start(config, lock, options).await?);
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            stop.cancel();
        });
        let mut stdin = tokio::io::stdin();
        let eof = shutdown.clone();
        // The parent closes stdin to stop it.
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut stdin, &mut tokio::io::sink()).await;
            eof.cancel();
        });
        api::serve(node.clone(), token, listener, shutdown).await?;
        match Arc::try_unwrap(node) {
            Ok(node) => node.shutdown().await?,
            Err(_) => return Err("the API kept the node busy".into()),
        }
        Ok(())
    })
}

/// What the full stack did.
pub struct FullStack {
    /// Runs published per second, from the first submit to the last publish.
    pub runs_per_sec: f64,
    /// State changes recorded per second.
    pub transitions_per_sec: f64,
    /// State changes a run went through.
    pub transitions_per_run: u64,
    /// Seconds submitting took (the runs started on their way meanwhile).
    pub submit_secs: f64,
    /// Inputs per group commit of the engine, on average.
    pub group_inputs: f64,
    /// The node's CPU time (every thread, user and system) per run, from
    /// its start to the last look at its answers.
    pub cpu_per_run: Duration,
}

fn spec(index: usize) -> RunSpec {
    let submission = SubmissionId::new(format!("s{index:07}")).unwrap_or_else(|e| panic!("{e}"));
    let team = TeamId::new(format!("team{}", index % TEAMS)).unwrap_or_else(|e| panic!("{e}"));
    let uri = format!("123456789012.dkr.ecr.us-east-1.amazonaws.com/team{}:final", index % TEAMS);
    RunSpec::new(submission, team, Stage::Public, false, SubmissionSource::Image { uri }, Timestamp::now())
}

/// Runs `runs` runs through a serving node in a child process, their jobs'
/// outputs from `outputs`. Returns its data directory too, to be removed
/// once every phase is done: ext4 (without a journal) passes over inodes
/// freed in the last minutes when it makes a file, so removing tens of
/// thousands of them would slow the next phases.
pub fn measure(runs: usize, outputs: Outputs) -> Result<(FullStack, tempfile::TempDir), Error> {
    let dir = crate::scratch()?;
    competition(dir.path())?;
    if outputs == Outputs::Prepared {
        let (jobs_dir, predictions) = (Config::load(dir.path())?.jobs_dir(), predictions());
        std::fs::create_dir_all(&jobs_dir)?;
        for index in 0..runs {
            write_output(&jobs_dir, &first_job(index), &predictions)?;
        }
    }
    // What earlier phases left to write back is not left to this one's clock.
    rustix::fs::sync();
    let (mut result, cpu) = serving_with(dir.path(), outputs, |api| drive(dir.path(), api, runs))?;
    result.cpu_per_run = cpu / runs.max(1) as u32;
    Ok((result, dir))
}

/// Runs `work` against a serving node on `dir`, in a child process stopped
/// after it, once the node answers. Returns `work`'s answer and the CPU
/// time (user and system, every thread) the node took until then.
pub fn serving<T, F: Future<Output = Result<T, Error>>>(
    dir: &Path,
    work: impl FnOnce(Api) -> F,
) -> Result<(T, Duration), Error> {
    serving_with(dir, Outputs::AtLaunch, work)
}

fn serving_with<T, F: Future<Output = Result<T, Error>>>(
    dir: &Path,
    outputs: Outputs,
    work: impl FnOnce(Api) -> F,
) -> Result<(T, Duration), Error> {
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args([SERVE_CHILD, &dir.display().to_string(), outputs.arg()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .env("RUST_LOG", "warn")
        .spawn()?;
    let result = tokio::runtime::Runtime::new()?.block_on(async { work(Api::connect(dir, &mut child).await?).await });
    let cpu = cpu_time(child.id());
    drop(child.stdin.take());
    let status = child.wait()?;
    let result = result?;
    if !status.success() {
        return Err(format!("the serving node exited with {status}").into());
    }
    Ok((result, cpu?))
}

/// The CPU time process `pid` has taken: user and system, of every thread
/// it ran (`/proc/PID/stat`'s fields 14 and 15, in clock ticks).
fn cpu_time(pid: u32) -> Result<Duration, Error> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // After the command's name, which may hold spaces, in parentheses.
    let fields: Vec<&str> = stat.rsplit_once(')').ok_or("no command name in /proc/PID/stat")?.1.split(' ').collect();
    let ticks = |n: usize| -> Result<u64, Error> { Ok(fields.get(n - 2).ok_or("a short /proc/PID/stat")?.parse()?) };
    let per_sec = rustix::param::clock_ticks_per_second();
    Ok(Duration::from_secs_f64((ticks(14)? + ticks(15)?) as f64 / per_sec as f64))
}

/// A serving node's API, as a client reaches it.
pub struct Api {
    /// Its address.
    pub base: String,
    /// Its token.
    pub token: ApiToken,
    /// The client.
    pub http: reqwest::Client,
}

impl Api {
    /// Waits (bounded) until the node of `dir`, the process `node`,
    /// announces its API and answers.
    async fn connect(dir: &Path, node: &mut std::process::Child) -> Result<Api, Error> {
        let info_path = dir.join("state/engine.json");
        let deadline = Instant::now() + Duration::from_secs(600);
        let info: EngineInfo = loop {
            if let Ok(bytes) = std::fs::read(&info_path)
                && let Ok(info) = serde_json::from_slice(&bytes)
            {
                break info;
            }
            if let Some(status) = node.try_wait()? {
                return Err(format!("the serving node exited with {status} before it announced its API").into());
            }
            if Instant::now() > deadline {
                return Err("the serving node did not announce its API in 600 s".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let api = Api { base: info.api, token: ApiToken::read(dir)?, http: reqwest::Client::new() };
        let deadline = Instant::now() + Duration::from_secs(60);
        while api.get::<String>("/v1/ping").await.is_err() {
            if Instant::now() > deadline {
                return Err("the serving node does not answer".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(api)
    }

    /// `GET path`, its answer's bytes.
    pub async fn get_bytes(&self, path: &str) -> Result<Vec<u8>, Error> {
        let response = self.http.get(format!("{}{path}", self.base)).bearer_auth(self.token.as_str()).send().await?;
        Ok(response.error_for_status()?.bytes().await?.to_vec())
    }

    /// `GET path`, its answer parsed.
    pub async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, Error> {
        let response = self.http.get(format!("{}{path}", self.base)).bearer_auth(self.token.as_str()).send().await?;
        Ok(response.error_for_status()?.json().await?)
    }
}

async fn drive(dir: &Path, api: Api, runs: usize) -> Result<FullStack, Error> {
    let Api { base, token, http } = &api;
    let get_status = || api.get::<StatusView>("/v1/status");

    // The requests are made before the clock starts: the client shares the
    // machine's CPUs with the node it measures.
    let mut bodies = Vec::with_capacity(runs.div_ceil(SUBMIT_BATCH));
    for first in (0..runs).step_by(SUBMIT_BATCH) {
        let specs: Vec<RunSpec> = (first..(first + SUBMIT_BATCH).min(runs)).map(spec).collect();
        bodies.push(serde_json::to_vec(&Submit(specs))?);
    }
    let (start, started_ms) = (Instant::now(), Timestamp::now().as_millis());
    for body in bodies {
        let response = http
            .post(format!("{base}/v1/submit"))
            .bearer_auth(token.as_str())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await?;
        response.error_for_status()?;
    }
    let submit_secs = start.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(3600);
    loop {
        let status = get_status().await?;
        let published = status.counts.get(&StateTag::Published).copied().unwrap_or(0);
        let failed = status.counts.get(&StateTag::Failed).copied().unwrap_or(0);
        if failed > 0 {
            return Err(format!("{failed} runs failed: the benchmark's runs should all be published").into());
        }
        // A node that stopped launching (its disk short of space or inodes)
        // would not finish: its words, at once.
        if let Some(paused) = &status.paused {
            return Err(format!("the serving node paused launching: {paused}").into());
        }
        if published as usize == runs {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("{published} of {runs} runs published after an hour").into());
        }
        // Each look reads every run: not too often.
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    // The last run's last change, not the look that found it.
    let views: Vec<RunView> = api.get("/v1/runs").await?;
    let ended_ms = views.iter().map(|v| v.updated_at_ms).max().unwrap_or(started_ms);
    let secs = (ended_ms.saturating_sub(started_ms) as f64 / 1000.0).max(f64::EPSILON);
    let run = spec(0).run;
    let history: Vec<serde_json::Value> = api.get(&format!("/v1/runs/{run}/history")).await?;
    let transitions_per_run = history.iter().filter(|e| e["disposition"] == "applied").count() as u64;
    let board = std::fs::read(dir.join("leaderboard/public.json"))?;
    let board: evalflow_activities::leaderboard::Leaderboard = serde_json::from_slice(&board)?;
    if board.entries.len() != TEAMS.min(runs) {
        return Err(format!("the leaderboard has {} teams, not {}", board.entries.len(), TEAMS.min(runs)).into());
    }
    let metrics = String::from_utf8(api.get_bytes("/metrics").await?)?;
    let metric = |name: &str| -> f64 {
        let line = metrics.lines().find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '));
        line.and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or(f64::NAN)
    };
    let group_inputs = metric("evalflow_engine_group_inputs_sum") / metric("evalflow_engine_group_inputs_count");
    Ok(FullStack {
        group_inputs,
        runs_per_sec: runs as f64 / secs,
        transitions_per_sec: (runs as u64 * transitions_per_run) as f64 / secs,
        transitions_per_run,
        submit_secs,
        cpu_per_run: Duration::ZERO, // the caller's, who sees the process
    })
}
