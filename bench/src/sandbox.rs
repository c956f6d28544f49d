//! The local sandbox's own cost: where the time goes between a launch and
//! the program's first instruction, and between its exit and the runner
//! reporting its end; and how many trivial sandboxed runs this machine
//! runs per second.
//!
//! Jobs run through the real [`LocalRunner`]: a supervisor process each
//! (this binary, as `--supervise`), a job uid, cgroups, bubblewrap and the
//! seccomp filter, exactly as `serve` runs them. The program is `date
//! +%s%N`, which prints the moment it runs; the other moments are read off
//! the files the launch, the supervisor and bubblewrap leave in the job's
//! directory, so nothing is timed from inside the code measured.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use evalflow_activities::local::job::{JobPaths, JobStatus, Limits, Started};
use evalflow_activities::local::sandbox::Isolation;
use evalflow_activities::local::supervisor::LAUNCHES_LOG;
use evalflow_activities::local::{LocalRunner, LocalRunnerConfig};
use evalflow_activities::{JobRunner, LaunchRequest, RunningJob};
use evalflow_workflow::{Attempt, Policy, RunSpec, Stage, SubmissionId, SubmissionSource, TeamId, Timestamp};

use crate::Error;

/// The argument that makes this binary a job's supervisor.
pub const SUPERVISE_CHILD: &str = "--supervise";

/// The size of the large submission's model file.
const MODEL_BYTES: usize = 256 << 20;
/// The large submission's other files.
const LARGE_FILES: usize = 200;

/// The moments of one job, in microseconds since the launch was asked for
/// (those the supervisor wrote down are to the millisecond).
#[derive(Debug, Clone, Copy, Default)]
struct Moments {
    /// `launch` returned (job directory made, supervisor spawned).
    launched: f64,
    /// The supervisor started (`started.json` written).
    supervisor: f64,
    /// The program is about to be spawned (its line in `launches.log`).
    spawning: f64,
    /// The program's first instruction (what `date` printed).
    program: f64,
    /// The supervisor saw the program end (the status's `ended_at`).
    exit_seen: f64,
    /// `check` reported the end.
    reported: f64,
}

impl Moments {
    /// The phases between the moments, and the two totals.
    fn phases(&self) -> [f64; PHASES.len()] {
        [
            self.launched,
            self.supervisor - self.launched,
            self.spawning - self.supervisor,
            self.program - self.spawning,
            self.exit_seen - self.program,
            self.reported - self.exit_seen,
            self.program,
            self.reported,
        ]
    }
}

/// What [`Moments::phases`] measures.
const PHASES: [&str; 8] = [
    "launch: the job's directory, the supervisor spawned",
    "the supervisor starts",
    "it prepares: a uid, the scratch directory, cgroups, logs",
    "bubblewrap spawned, to the program's first instruction",
    "the program runs, and its end is seen",
    "the status is written and synced, the runner reports it",
    "launch to the program's first instruction",
    "launch to the end reported",
];

/// Each phase's median over many jobs, in microseconds.
type Timeline = [f64; PHASES.len()];

/// The figures of the sandbox phase.
pub struct Report {
    /// The median timeline of a small submission, one job at a time.
    small: Timeline,
    /// The median timeline of a large one.
    large: Timeline,
    /// Trivial runs per second, `at_once` at a time.
    runs_per_sec: f64,
    /// How many runs that was, how many at once.
    runs: usize,
    at_once: usize,
}

impl Report {
    /// Prints the figures.
    pub fn print(&self) {
        println!(
            "sandbox, one job at a time, median ms (a small submission; one of {} MiB in {} files):",
            MODEL_BYTES >> 20,
            LARGE_FILES + 2
        );
        for (i, what) in PHASES.iter().enumerate() {
            println!("  {what:<58} {:>8.1} {:>8.1}", self.small[i] / 1e3, self.large[i] / 1e3);
        }
        println!(
            "sandbox, {} trivial runs, {} at once:          {:>9.1} runs/s",
            self.runs, self.at_once, self.runs_per_sec
        );
    }
}

/// Measures the sandbox: `timed` jobs of each submission one at a time,
/// then `runs` trivial jobs `at_once` at a time. `Ok(None)` (with the
/// reason printed) when this machine cannot make sandboxes.
pub fn measure(policy: &Policy, timed: usize, runs: usize, at_once: usize) -> Result<Option<Report>, Error> {
    let dir = crate::scratch()?;
    let (small, large) = (dir.path().join("submissions/small"), dir.path().join("submissions/large"));
    submission(&small, false)?;
    submission(&large, true)?;
    let test_set = dir.path().join("test-set");
    std::fs::create_dir_all(&test_set)?;
    std::fs::write(test_set.join("videos.csv"), "video\na.mp4\n")?;
    let jobs_dir = dir.path().join("jobs");
    let config = LocalRunnerConfig {
        jobs_dir: jobs_dir.clone(),
        supervisor: vec![std::env::current_exe()?.into_os_string(), OsString::from(SUPERVISE_CHILD)],
        test_sets: BTreeMap::from([(Stage::Public, test_set)]),
        isolation: Isolation::Sandbox,
        limits: Limits { pids_max: 64, disk_max_mib: 1024, files_max: 10_000, kill_grace_secs: 1 },
        signatures: Vec::new(),
    };
    let runner = LocalRunner::new(config);
    if let Err(e) = runner.check_host() {
        println!("sandbox: skipped ({e})");
        return Ok(None);
    }
    let profile = policy.profiles().first().ok_or("the benchmark's policy has a profile")?.clone();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let launch = |index: usize, submission: &Path| LaunchRequest {
            spec: spec(index, submission),
            attempt: Attempt(1),
            profile: profile.clone(),
            time_limit_secs: 600,
        };
        let small_timeline = timelines(&runner, &jobs_dir, (0..timed).map(|i| launch(i, &small))).await?;
        let large_timeline = timelines(&runner, &jobs_dir, (timed..2 * timed).map(|i| launch(i, &large))).await?;
        let requests: Vec<_> = (2 * timed..2 * timed + runs).map(|i| launch(i, &small)).collect();
        let runs_per_sec = throughput(&runner, requests, at_once).await?;
        Ok(Some(Report { small: small_timeline, large: large_timeline, runs_per_sec, runs, at_once }))
    })
}

/// The median timeline of `requests`, run one at a time.
async fn timelines(
    runner: &LocalRunner,
    jobs_dir: &Path,
    requests: impl Iterator<Item = LaunchRequest>,
) -> Result<Timeline, Error> {
    let mut timelines = Vec::new();
    for request in requests {
        timelines.push(one(runner, jobs_dir, &request).await?.phases());
        // The large submission's copies would fill the disk.
        std::fs::remove_dir_all(runner.job_paths(&request.spec.run, request.attempt).dir())?;
    }
    Ok(median(&timelines))
}

/// A kept submission: `submission.toml` running `date +%s%N`, and, when
/// `large`, a model file and many small ones beside it.
fn submission(dir: &Path, large: bool) -> Result<(), Error> {
    std::fs::create_dir_all(dir.join("lib"))?;
    std::fs::write(dir.join("submission.toml"), "command = [\"date\", \"+%s%N\"]\n")?;
    if large {
        std::fs::write(dir.join("model.bin"), vec![0x5a_u8; MODEL_BYTES])?;
        for n in 0..LARGE_FILES {
            std::fs::write(dir.join(format!("lib/module{n}.py")), vec![b'#'; 4096])?;
        }
    }
    Ok(())
}

fn spec(index: usize, submission: &Path) -> RunSpec {
    let source = SubmissionSource::Directory { path: submission.display().to_string(), digest: "bench".into() };
    RunSpec::new(
        SubmissionId::new(format!("s{index:07}")).unwrap_or_else(|e| panic!("{e}")),
        TeamId::new(format!("team{}", index % 2300)).unwrap_or_else(|e| panic!("{e}")),
        Stage::Public,
        false,
        source,
        Timestamp::now(),
    )
}

fn running(request: &LaunchRequest, job: evalflow_workflow::JobId) -> RunningJob {
    let spec = &request.spec;
    RunningJob { run: spec.run.clone(), stage: spec.stage, attempt: request.attempt, job, since: Timestamp::now() }
}

/// How often the benchmark asks the runner whether its jobs ended.
const CHECK_EVERY: Duration = Duration::from_millis(1);

/// Runs one job to its end and reads its moments.
async fn one(runner: &LocalRunner, jobs_dir: &Path, request: &LaunchRequest) -> Result<Moments, Error> {
    let start = SystemTime::now();
    let job = runner.launch(request).await?;
    let launched = since(start, SystemTime::now());
    let running = [running(request, job)];
    loop {
        let checked = runner.check(&running).await?;
        if let Some(ended) = checked.ended.first() {
            if !matches!(ended.outcome, evalflow_workflow::JobOutcome::Succeeded) {
                return Err(format!("a benchmark job did not succeed: {:?}", ended.outcome).into());
            }
            break;
        }
        tokio::time::sleep(CHECK_EVERY).await;
    }
    let reported = since(start, SystemTime::now());
    let paths = runner.job_paths(&request.spec.run, request.attempt);
    // The supervisor's own clock (ms); a file's times are the kernel's coarse clock, ms off.
    let started: Started = serde_json::from_slice(&std::fs::read(paths.started())?)?;
    let status: JobStatus = serde_json::from_slice(&std::fs::read(paths.status())?)?;
    let printed = std::fs::read_to_string(paths.stdout())?;
    let program_ns: u128 = printed.trim().parse().map_err(|_| format!("date printed {printed:?}"))?;
    Ok(Moments {
        launched,
        supervisor: at_ms(start, started.at.as_millis()),
        spawning: at_ms(start, launch_logged(jobs_dir, &paths)?),
        program: since(start, UNIX_EPOCH + Duration::from_nanos(u64::try_from(program_ns)?)),
        exit_seen: at_ms(start, status.usage.ended_at.as_millis()),
        reported,
    })
}

/// The moment the job's line was written to `launches.log`, in ms since the epoch.
fn launch_logged(jobs_dir: &Path, paths: &JobPaths) -> Result<u64, Error> {
    let log = std::fs::read_to_string(jobs_dir.join(LAUNCHES_LOG))?;
    let name = paths.name();
    let line = log.lines().rev().find(|l| l.split(' ').next() == Some(name.as_str())).ok_or("no launch logged")?;
    Ok(line.rsplit(' ').next().ok_or("a launch line has a time")?.parse()?)
}

/// Microseconds from `start` to `at` (negative when `at` is earlier).
fn since(start: SystemTime, at: SystemTime) -> f64 {
    match at.duration_since(start) {
        Ok(d) => d.as_secs_f64() * 1e6,
        Err(e) => -e.duration().as_secs_f64() * 1e6,
    }
}

/// Microseconds from `start` to `ms` since the epoch.
fn at_ms(start: SystemTime, ms: u64) -> f64 {
    since(start, UNIX_EPOCH + Duration::from_millis(ms))
}

/// Each phase's median.
fn median(timelines: &[Timeline]) -> Timeline {
    std::array::from_fn(|phase| {
        let mut values: Vec<f64> = timelines.iter().map(|t| t[phase]).collect();
        values.sort_by(f64::total_cmp);
        values.get(values.len() / 2).copied().unwrap_or_default()
    })
}

/// Runs `requests` through the runner, `at_once` at a time; runs/s.
async fn throughput(runner: &LocalRunner, requests: Vec<LaunchRequest>, at_once: usize) -> Result<f64, Error> {
    let count = requests.len();
    let mut waiting = requests.into_iter();
    let mut running = Vec::new();
    let mut ended = 0;
    let start = Instant::now();
    while ended < count {
        while running.len() < at_once
            && let Some(request) = waiting.next()
        {
            let job = runner.launch(&request).await?;
            running.push(self::running(&request, job));
        }
        let checked = runner.check(&running).await?;
        for end in &checked.ended {
            if !matches!(end.outcome, evalflow_workflow::JobOutcome::Succeeded) {
                return Err(format!("a benchmark job did not succeed: {:?}", end.outcome).into());
            }
        }
        ended += checked.ended.len();
        running.retain(|job| !checked.ended.iter().any(|end| end.job == *job));
        tokio::time::sleep(CHECK_EVERY).await;
    }
    Ok(count as f64 / start.elapsed().as_secs_f64())
}
