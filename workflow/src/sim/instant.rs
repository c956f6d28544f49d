//! A world whose activities finish instantly: every command is answered at
//! once with the events a worker would send. It drives the engine in tests,
//! crash tests and the benchmark without any I/O of its own.

use crate::engine::{Dispatch, Input};
use crate::ids::JobId;
use crate::machine::{Command, Envelope, Event, Evidence, JobOutcome, JobUsage, Score};
use crate::time::Timestamp;

/// Answers commands instantly; `outcome` decides how each launched job ends.
pub struct InstantWorld<F> {
    outcome: F,
}

impl<F: FnMut(&Dispatch) -> JobOutcome> InstantWorld<F> {
    /// A world whose jobs end as `outcome` says.
    pub fn new(outcome: F) -> Self {
        InstantWorld { outcome }
    }

    /// The events that answer `dispatch`, in the order a worker would send them.
    pub fn answer(&mut self, dispatch: &Dispatch, now: Timestamp) -> Vec<Input> {
        let run = &dispatch.spec.run;
        let answer = |event| Input::Event { run: run.clone(), envelope: Envelope::answering(event, dispatch.version) };
        let unfenced = |event| Input::Event { run: run.clone(), envelope: Envelope::unfenced(event) };
        match &dispatch.command {
            Command::LaunchJob { attempt, .. } => {
                let job = JobId::new(crate::ids::job_name(run, *attempt)).unwrap_or_else(|e| unreachable!("{e}"));
                let usage = JobUsage { started_at: Some(now), ended_at: now, peak_memory_mib: None };
                let outcome = (self.outcome)(dispatch);
                vec![
                    answer(Event::JobLaunched { attempt: *attempt, job: job.clone() }),
                    unfenced(Event::JobEnded { attempt: *attempt, job, outcome, usage, evidence: Evidence::default() }),
                ]
            }
            Command::ScorePredictions { attempt, .. } => {
                let score = Score::new(score_of(run.as_str())).unwrap_or_else(|| unreachable!("finite"));
                vec![answer(Event::PredictionsScored { attempt: *attempt, score })]
            }
            Command::Publish { attempt, .. } => vec![answer(Event::Published { attempt: *attempt })],
            Command::TerminateJob { attempt, job } => {
                vec![unfenced(Event::JobTerminated { attempt: *attempt, job: job.clone() })]
            }
            Command::Withdraw { attempt } => vec![unfenced(Event::Withdrawn { attempt: *attempt })],
        }
    }
}

/// A deterministic score in [0, 1) from a run id.
fn score_of(run: &str) -> f64 {
    let hash = run.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    (hash % 10_000) as f64 / 10_000.0
}
