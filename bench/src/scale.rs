//! The stored runs at scale, through a serving node's API: how long the node
//! takes to start on them, and how long `status`, `runs --state failed` and
//! one run's `history` take to answer (the median of [`ASKED`] asks each),
//! each answer parsed into the types the CLI parses it into, and a scrape
//! of its `/metrics`, which counts every run.

use std::path::Path;
use std::time::{Duration, Instant};

use evalflow_worker::views::{EventView, RunView, StatusView};
use serde::de::DeserializeOwned;

use crate::Error;
use crate::fullstack::{self, Api};

/// How many times each question is asked.
const ASKED: usize = 20;
/// The page a paging client asks for.
const PAGE: usize = 1_000;
/// How many times `/metrics` is scraped: it reads every run.
const SCRAPED: usize = 3;

/// What the node answered, and how fast.
pub struct Answers {
    /// From spawning the node to its first answer.
    start: Duration,
    status: Duration,
    failed: Asked,
    /// Its first page of [`PAGE`] runs, as a client that pages asks it.
    first_page: Asked,
    history: Duration,
    /// The median of [`SCRAPED`] scrapes of `/metrics`, to its last byte.
    scrape: Duration,
}

/// The median of [`ASKED`] asks of one question.
#[derive(Default)]
struct Asked {
    /// To the answer parsed.
    parsed: Duration,
    /// To its last byte received.
    received: Duration,
    /// Its items (1 for an answer that is not a list).
    items: usize,
    /// Its bytes.
    bytes: usize,
}

impl Answers {
    /// Prints the figures.
    pub fn print(&self, stored: usize) {
        let ms = crate::ms;
        println!("a serving node on {stored} stored runs: started in {:.1} s", self.start.as_secs_f64());
        println!("  status through the API:                 {:>9.1} ms (target < 100 ms)", ms(self.status));
        let failed = &self.failed;
        println!(
            "  runs --state failed through the API:    {:>9.1} ms ({} runs; target < 100 ms)",
            ms(failed.parsed),
            failed.items
        );
        println!(
            "    of which received (its last byte):   {:>9.1} ms ({:.1} MB of JSON; the rest is parsing it)",
            ms(failed.received),
            failed.bytes as f64 / 1e6
        );
        println!(
            "    its first page:                       {:>9.1} ms ({} runs, as a client that pages asks)",
            ms(self.first_page.parsed),
            self.first_page.items
        );
        println!("  one run's history through the API:     {:>9.1} ms (target < 100 ms)", ms(self.history));
        println!("  a scrape of /metrics (counts every run): {:>7.1} ms", ms(self.scrape));
    }
}

/// Serves the competition of `dir` (its store filled) and asks it.
pub fn measure(dir: &Path, run: &str) -> Result<Answers, Error> {
    let spawned = Instant::now();
    fullstack::serving(dir, |api| async move {
        let start = spawned.elapsed();
        let status = median::<StatusView>(&api, "/v1/status", |_| 1).await?.parsed;
        let failed = median::<Vec<RunView>>(&api, "/v1/runs?state=failed", Vec::len).await?;
        let page = format!("/v1/runs?state=failed&limit={PAGE}");
        let first_page = median::<Vec<RunView>>(&api, &page, Vec::len).await?;
        let history = median::<Vec<EventView>>(&api, &format!("/v1/runs/{run}/history"), Vec::len).await?.parsed;
        let mut scrapes = Vec::with_capacity(SCRAPED);
        for _ in 0..SCRAPED {
            let start = Instant::now();
            let text = api.get_bytes("/metrics").await?;
            scrapes.push(start.elapsed());
            if !text.starts_with(b"# HELP") {
                return Err(
                    format!("/metrics answered {:?}", String::from_utf8_lossy(&text[..text.len().min(200)])).into()
                );
            }
        }
        scrapes.sort();
        Ok(Answers { start, status, failed, first_page, history, scrape: scrapes[SCRAPED / 2] })
    })
    .map(|(answers, _cpu)| answers)
}

/// The median times `path` takes to answer, parsed as a `T` of `items`, and its size.
async fn median<T: DeserializeOwned>(api: &Api, path: &str, items: impl Fn(&T) -> usize) -> Result<Asked, Error> {
    let (mut parsed, mut received) = (Vec::with_capacity(ASKED), Vec::with_capacity(ASKED));
    let mut asked = Asked::default();
    for _ in 0..ASKED {
        let start = Instant::now();
        let bytes = api.get_bytes(path).await?;
        received.push(start.elapsed());
        let answer: T = serde_json::from_slice(&bytes)?;
        parsed.push(start.elapsed());
        (asked.items, asked.bytes) = (items(&answer), bytes.len());
    }
    parsed.sort();
    received.sort();
    (asked.parsed, asked.received) = (parsed[ASKED / 2], received[ASKED / 2]);
    Ok(asked)
}
