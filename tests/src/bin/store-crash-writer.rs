//! The child of the store crash test: drives runs to their end through an
//! engine on a sled store, printing `ack <run> <seq> <version> <state>` for
//! every entry once its group is durable, until every run has ended.
//!
//! Usage: `store-crash-writer <store dir> <runs> <seed>`

use std::io::Write;

use evalflow_tests::test_policy;
use evalflow_workflow::sim::InstantWorld;
use evalflow_workflow::store::{RunFilter, all_runs};
use evalflow_workflow::{
    Engine, Envelope, Event, Input, JobOutcome, Outcome, Resource, RunSpec, SledStore, Stage, StateTag, SubmissionId,
    SubmissionSource, TeamId, Timestamp, WorkflowStore,
};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, dir, runs, seed] = args.as_slice() else { panic!("usage: store-crash-writer <store dir> <runs> <seed>") };
    let runs: usize = runs.parse().expect("runs");
    let mut rng = StdRng::seed_from_u64(seed.parse().expect("seed"));
    let store = SledStore::open(dir.as_ref(), Default::default()).expect("open store");
    let (mut engine, recovered) = Engine::open(store, test_policy(), 16).expect("open engine");

    let mut outcome_rng = StdRng::seed_from_u64(rng.random());
    let mut world = InstantWorld::new(move |_| match outcome_rng.random_range(0..20) {
        0 => JobOutcome::OutOfMemory { resource: Resource::HostMemory },
        1 => JobOutcome::OutOfMemory { resource: Resource::GpuMemory },
        2 => JobOutcome::Interrupted { detail: evalflow_workflow::Detail::new("spot") },
        3 => JobOutcome::Crashed { exit_code: Some(1) },
        _ => JobOutcome::Succeeded,
    });
    // Runs submitted before a kill are not submitted again: every
    // acknowledgement is then a step of real work, where a kill may land.
    let mut pending: Vec<Input> = (0..runs)
        .map(spec)
        .filter(|spec| engine.store().load(&spec.run).expect("load").is_none())
        .map(Input::Submit)
        .collect();
    let now = Timestamp::now();
    pending.extend(recovered.iter().flat_map(|d| world.answer(d, now)));
    // Running jobs owe no command: a watcher observes their end, as here.
    pending.extend(engine.live_runs(StateTag::Running).map(|run| job_end(&engine, run)));
    let stdout = std::io::stdout();
    loop {
        let take = rng.random_range(1..=64).min(pending.len());
        let mut group: Vec<Input> = pending.drain(..take).collect();
        if rng.random_range(0..10) == 0 {
            group.push(operator_request(&engine, &mut rng));
        }
        let now = Timestamp::now();
        let applied = engine.apply(group, now).expect("apply");
        let mut out = stdout.lock();
        for outcome in &applied.outcomes {
            if let Outcome::Recorded { run, seq, version, state, .. } = outcome {
                writeln!(out, "ack {run} {seq} {version} {state}").expect("stdout");
            }
        }
        out.flush().expect("stdout");
        pending.extend(applied.dispatches.iter().flat_map(|d| world.answer(d, now)));
        if pending.is_empty() && engine.live_counts().0 == 0 {
            writeln!(out, "done").expect("stdout");
            return;
        }
    }
}

/// The end of a job that ran while this process was down.
fn job_end(engine: &Engine<SledStore>, run: &evalflow_workflow::RunId) -> Input {
    let stored = engine.store().load(run).expect("load").expect("live run exists");
    let Some((attempt, _, Some(job))) = stored.run.status.state.placement() else { panic!("{run} is not running") };
    let now = Timestamp::now();
    let usage = evalflow_workflow::JobUsage { started_at: Some(now), ended_at: now, peak_memory_mib: None };
    let event = Event::JobEnded {
        attempt,
        job: job.clone(),
        outcome: JobOutcome::Succeeded,
        usage,
        evidence: Default::default(),
    };
    Input::Event { run: run.clone(), envelope: Envelope::unfenced(event) }
}

fn spec(index: usize) -> RunSpec {
    RunSpec::new(
        SubmissionId::new(format!("s{index}")).expect("id"),
        TeamId::new(format!("t{}", index % 7)).expect("id"),
        Stage::Public,
        false,
        SubmissionSource::Image { uri: format!("registry/s{index}") },
        Timestamp(index as u64),
    )
}

/// Now and then an operator cancels a live run or retries a failed one.
fn operator_request(engine: &Engine<SledStore>, rng: &mut StdRng) -> Input {
    let failed = all_runs(engine.store(), RunFilter::Terminal(StateTag::Failed)).expect("list");
    let live: Vec<_> =
        StateTag::ALL.into_iter().filter(|t| !t.is_terminal()).flat_map(|t| engine.live_runs(t).cloned()).collect();
    let (run, event) = match (failed.is_empty(), rng.random_range(0..3)) {
        (false, 0 | 1) => (failed[rng.random_range(0..failed.len())].clone(), Event::RetryRequested),
        _ if !live.is_empty() => (live[rng.random_range(0..live.len())].clone(), Event::CancelRequested),
        _ => (spec(0).run, Event::CancelRequested),
    };
    Input::Event { run, envelope: Envelope::unfenced(event) }
}
