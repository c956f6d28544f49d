//! The stored runs at scale, through a serving node's API: how long the node
//! takes to start on them, and how long `status`, `runs --state failed` and
//! one run's `history` take to answer (the median of [`ASKED`] asks each).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::Error;
use crate::fullstack::{self, Api};

/// How many times each question is asked.
const ASKED: usize = 20;

/// What the node answered, and how fast.
pub struct Answers {
    /// From spawning the node to its first answer.
    start: Duration,
    status: Duration,
    failed: Duration,
    /// How many failed runs `runs --state failed` listed.
    failed_runs: usize,
    history: Duration,
}

impl Answers {
    /// Prints the figures.
    pub fn print(&self, stored: usize) {
        let ms = crate::ms;
        println!("a serving node on {stored} stored runs: started in {:.1} s", self.start.as_secs_f64());
        println!("  status through the API:                 {:>9.1} ms (target < 100 ms)", ms(self.status));
        println!(
            "  runs --state failed through the API:    {:>9.1} ms ({} runs; target < 100 ms)",
            ms(self.failed),
            self.failed_runs
        );
        println!("  one run's history through the API:     {:>9.1} ms (target < 100 ms)", ms(self.history));
    }
}

/// Serves the competition of `dir` (its store filled) and asks it.
pub fn measure(dir: &Path, run: &str) -> Result<Answers, Error> {
    let spawned = Instant::now();
    fullstack::serving(dir, |api| async move {
        let start = spawned.elapsed();
        let status = median(&api, "/v1/status").await?.0;
        let (failed, failed_runs) = median(&api, "/v1/runs?state=failed").await?;
        let history = median(&api, &format!("/v1/runs/{run}/history")).await?.0;
        Ok(Answers { start, status, failed, failed_runs, history })
    })
}

/// The median time `path` takes to answer, and how many items its answer has.
async fn median(api: &Api, path: &str) -> Result<(Duration, usize), Error> {
    let mut times = Vec::with_capacity(ASKED);
    let mut items = 0;
    for _ in 0..ASKED {
        let start = Instant::now();
        let answer: serde_json::Value = api.get(path).await?;
        times.push(start.elapsed());
        items = answer.as_array().map_or(1, Vec::len);
    }
    times.sort();
    Ok((times[ASKED / 2], items))
}
