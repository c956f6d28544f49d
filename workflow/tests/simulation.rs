//! Deterministic simulation testing: seed after seed, a random competition
//! with faults of every kind (messages lost, duplicated, late; the engine
//! crashed between a flush and its sends, or its flush failing; workers
//! dying mid-activity; throttling; clock jumps) runs on the real engine and
//! dispatcher, and the invariants of `sim::check` must hold after each.
//!
//! `EVALFLOW_SIM_SEEDS=N` runs N seeds (1,000 by default);
//! `EVALFLOW_SIM_SEED=S` replays seed S alone. For many more, faster, with
//! figures: `cargo run --release -p evalflow-bench --bin dst -- --seeds 10000`.

use evalflow_workflow::WorkflowStore;
use evalflow_workflow::sim::seeded;

fn env(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| v.parse().unwrap_or_else(|e| panic!("{name}={v:?}: {e}")))
}

#[test]
fn every_seed_keeps_every_invariant() {
    let seeds: Vec<u64> = match env("EVALFLOW_SIM_SEED") {
        Some(seed) => vec![seed],
        None => (0..env("EVALFLOW_SIM_SEEDS").unwrap_or(1000)).collect(),
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let broken: Vec<String> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let seeds = &seeds;
                scope.spawn(move || {
                    let mine = seeds.iter().skip(t).step_by(threads);
                    mine.filter_map(|&seed| {
                        let violations = seeded::run(seed).violations;
                        (!violations.is_empty()).then(|| {
                            let lines: Vec<String> = violations.iter().map(|v| format!("  {v}")).collect();
                            format!(
                                "seed {seed} broke {} invariant(s):\n{}\n  replay it: EVALFLOW_SIM_SEED={seed} cargo test \
                                 -p evalflow-workflow --test simulation, or in detail: cargo run --release -p \
                                 evalflow-bench --bin dst -- --seed {seed}",
                                violations.len(),
                                lines.join("\n")
                            )
                        })
                    })
                    .collect::<Vec<_>>()
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().unwrap_or_else(|_| panic!("a simulation panicked"))).collect()
    });
    assert!(broken.is_empty(), "{} of {} seeds broke an invariant:\n{}", broken.len(), seeds.len(), broken.join("\n"));
}

/// The simulation is deterministic: one seed, run twice, does the same.
#[test]
fn a_seed_replays_exactly() {
    for seed in [7, 4010, 10834] {
        let scenario = seeded::scenario(seed);
        let first = evalflow_workflow::sim::simulate(&scenario, seed).unwrap();
        let again = evalflow_workflow::sim::simulate(&seeded::scenario(seed), seed).unwrap();
        assert_eq!((first.steps, first.end, first.faults), (again.steps, again.end, again.faults), "seed {seed}");
        assert_eq!(first.world.board, again.world.board, "seed {seed}");
        for (spec, _) in &scenario.submissions {
            let history = |s: &evalflow_workflow::MemoryStore| s.history(&spec.run).unwrap();
            assert_eq!(history(&first.store), history(&again.store), "seed {seed}, run {}", spec.run);
        }
    }
}
