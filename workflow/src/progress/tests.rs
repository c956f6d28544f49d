use super::*;
use crate::ids::{Attempt, JobId, SubmissionId, TeamId};
use crate::machine::{AttemptRecord, JobUsage, RunSpec, RunStatus, Score, SubmissionSource};

const NOW: Timestamp = Timestamp(100 * 3_600_000);

fn profile(name: &str) -> ProfileName {
    ProfileName::new(name).unwrap()
}

/// An attempt on `on` launched `ago_secs` before [`NOW`], that ran `secs` if it ended.
fn attempt(n: u32, on: &str, ago_secs: u64, ran_secs: Option<u64>) -> AttemptRecord {
    let launched_at = Timestamp(NOW.0 - ago_secs * 1000);
    AttemptRecord {
        attempt: Attempt(n),
        profile: profile(on),
        launched_at,
        job: Some(JobId::new(format!("job-{n}")).unwrap()),
        usage: ran_secs.map(|secs| JobUsage {
            started_at: Some(launched_at),
            ended_at: launched_at.plus_ms(secs * 1000),
            peak_memory_mib: None,
        }),
        end: None,
        evidence: None,
        waiting: None,
    }
}

fn run(id: &str, stage: Stage, submitted: u64, state: RunState, attempts: Vec<AttemptRecord>, ago_secs: u64) -> Run {
    let submission = SubmissionId::new(id).unwrap();
    let source = SubmissionSource::Image { uri: "image".into() };
    let spec = RunSpec::new(submission, TeamId::new(id).unwrap(), stage, false, source, Timestamp(submitted));
    let status = RunStatus {
        state,
        attempts,
        updated_at: Timestamp(NOW.0 - ago_secs * 1000),
        ..RunStatus::submitted(Timestamp(0))
    };
    Run { spec, status }
}

fn published() -> RunState {
    RunState::Published { attempt: Attempt(1), score: Score::new(0.5).unwrap() }
}

fn running(on: &str, n: u32) -> RunState {
    RunState::Running { profile: profile(on), attempt: Attempt(n), job: JobId::new(format!("job-{n}")).unwrap() }
}

/// Two ended runs (one on g4, one out of memory on g4 then on p3) and three
/// live ones: queued, running on p3 after g4, running on g4.
fn competition() -> Vec<Run> {
    vec![
        run("a", Stage::Public, 1, published(), vec![attempt(1, "g4", 9000, Some(3600))], 7200),
        run(
            "b",
            Stage::Public,
            2,
            published(),
            vec![attempt(1, "g4", 9000, Some(1800)), attempt(2, "p3", 7000, Some(3600))],
            600,
        ),
        run("c", Stage::Public, 5, RunState::Queued, Vec::new(), 0),
        run(
            "d",
            Stage::Public,
            3,
            running("p3", 2),
            vec![attempt(1, "g4", 3000, Some(1800)), attempt(2, "p3", 600, None)],
            0,
        ),
        run("e", Stage::Public, 4, running("g4", 1), vec![attempt(1, "g4", 1000, None)], 0),
    ]
}

fn tally(policy: &Policy, runs: &[Run]) -> Tally {
    let mut tally = Tally::new(policy, Billing::Actual);
    runs.iter().for_each(|r| tally.add(r));
    tally
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[test]
fn live_runs_are_expected_to_take_what_ended_runs_on_their_profile_took() {
    let policy = crate::policy::tests::case_policy();
    let runs = competition();
    let forecast = tally(&policy, &runs).forecast(2, NOW);
    let whole = &forecast.whole;
    assert_eq!((whole.total, whole.ended, whole.queued, whole.running), (5, 2, 1, 2));
    assert_eq!(whole.running_per_profile, BTreeMap::from([(profile("g4"), 1), (profile("p3"), 1)]));
    assert_eq!(whole.ended_last_hour, 1, "a ended two hours ago, b ten minutes ago");
    // a: 1 h on g4 = $0.526; b: 0.5 h on g4 + 1 h on p3 = $3.323; d so far: 0.5 h on g4.
    assert!(close(whole.cost_usd, 0.526 + 3.323 + 0.263), "{whole:?}");
    // c (queued) as a and b on average: $1.9245; d on p3 as b, less what it spent: $3.06;
    // e on g4 as the runs that ran on g4 (a and b): $1.9245.
    assert!(close(whole.remaining_cost_usd.unwrap(), 1.9245 + 3.06 + 1.9245), "{whole:?}");
    assert!(close(whole.projected_cost_usd.unwrap(), whole.cost_usd + whole.remaining_cost_usd.unwrap()));
    // d ends in 5400 - 1800 - 600 = 3000 s, e in 4500 - 1000 = 3500 s; c takes d's slot: 3000 + 4500.
    assert_eq!(whole.eta_secs, Some(7500));
    assert_eq!(tally(&policy, &runs).forecast(3, NOW).whole.eta_secs, Some(4500), "a free slot: c starts now");
    assert_eq!(forecast.stages[&Stage::Public], forecast.whole, "one stage: the same figures");
}

#[test]
fn a_cancelled_run_is_spent_but_not_expected_to_take_more() {
    let policy = crate::policy::tests::case_policy();
    let before = tally(&policy, &competition()).forecast(2, NOW).whole;
    let mut runs = competition();
    runs.push(run("f", Stage::Public, 6, RunState::Cancelled, vec![attempt(1, "g4", 3600, Some(1800))], 0));
    let whole = tally(&policy, &runs).forecast(2, NOW).whole;
    assert_eq!((whole.total, whole.ended, whole.queued, whole.running), (6, 3, 1, 2));
    assert!(close(whole.cost_usd, before.cost_usd + 0.263), "its half hour on g4: {whole:?}");
    assert_eq!((whole.remaining_cost_usd, whole.eta_secs), (before.remaining_cost_usd, before.eta_secs));
}

#[test]
fn a_stage_is_estimated_from_its_own_runs_and_from_all_before_any_ended() {
    let policy = crate::policy::tests::case_policy();
    let mut runs = competition();
    runs.push(run("f", Stage::Private, 6, RunState::Queued, Vec::new(), 0));
    let forecast = tally(&policy, &runs).forecast(2, NOW);
    let private = &forecast.stages[&Stage::Private];
    assert_eq!((private.total, private.ended, private.queued), (1, 0, 1));
    assert!(close(private.remaining_cost_usd.unwrap(), 1.9245), "as every ended run: {private:?}");
    // f queues behind c: it takes e's slot at 3500 s and runs 4500 s.
    assert_eq!((private.eta_secs, forecast.whole.eta_secs), (Some(8000), Some(8000)));
    assert_eq!(forecast.stages[&Stage::Public].eta_secs, Some(7500));

    runs.push(run("g", Stage::Private, 0, published(), vec![attempt(1, "g4", 9000, Some(7200))], 9000));
    let private = tally(&policy, &runs).forecast(2, NOW).stages[&Stage::Private].clone();
    assert!(close(private.remaining_cost_usd.unwrap(), 1.052), "as the private run that ended: {private:?}");
}

#[test]
fn nothing_is_projected_before_a_run_ended_or_without_a_slot() {
    let policy = crate::policy::tests::case_policy();
    let runs: Vec<Run> = competition().into_iter().filter(|r| !r.status.state.tag().is_terminal()).collect();
    let whole = tally(&policy, &runs).forecast(2, NOW).whole;
    assert_eq!((whole.eta_secs, whole.remaining_cost_usd, whole.projected_cost_usd), (None, None, None));
    let whole = tally(&policy, &competition()).forecast(0, NOW).whole;
    assert_eq!(whole.eta_secs, None, "the queued run has no slot to run on");
    assert!(whole.remaining_cost_usd.is_some());
    let empty = tally(&policy, &[]).forecast(2, NOW).whole;
    assert_eq!((empty.eta_secs, empty.projected_cost_usd), (Some(0), Some(0.0)), "nothing left: done now");
}

#[test]
fn a_budget_admits_what_it_covers_beyond_what_is_spent_and_committed() {
    let policy = crate::policy::tests::case_policy();
    let runs = competition();
    // Spent $4.112; committed: d $3.06 and e $1.9245; one more run $1.9245.
    let allowance = tally(&policy, &runs).allowance(12.0, NOW);
    assert!(close(allowance.spent_usd, 4.112) && close(allowance.committed_usd, 4.9845), "{allowance:?}");
    assert!(close(allowance.per_run_usd, 1.9245));
    assert_eq!(allowance.admits, Some(1));
    assert!(!allowance.spent());
    let allowance = tally(&policy, &runs).allowance(9.0, NOW);
    assert_eq!(allowance.admits, Some(0), "$9.0965 spent or committed: no new run");
    // d has run 600 s on p3 ($0.51), e 1000 s on g4 ($0.1461): $4.768 spent or accrued.
    assert!(close(allowance.accrued_usd, 0.51 + 1000.0 / 3600.0 * 0.526), "{allowance:?}");
    assert!(!allowance.spent(), "what is committed but not spent holds no relaunch back");
    assert!(tally(&policy, &runs).allowance(4.7, NOW).spent(), "spent and accrued: no relaunch either");
    // Nothing queued: a run submitted before the next look is counted as any other.
    let allowance = tally(&policy, &runs[..2]).allowance(10.0, NOW);
    assert!(close(allowance.per_run_usd, 1.9245), "{allowance:?}");
    assert_eq!(allowance.admits, Some(3));
}

#[test]
fn before_any_run_ended_a_run_counts_at_its_time_limit_and_one_probes() {
    let policy = crate::policy::tests::case_policy();
    let queued = || run("c", Stage::Public, 5, RunState::Queued, Vec::new(), 0);
    // 9 h on g4 at $0.526.
    let allowance = tally(&policy, &[queued()]).allowance(10.0, NOW);
    assert!(close(allowance.per_run_usd, 4.734), "{allowance:?}");
    assert_eq!(allowance.admits, Some(2));
    assert_eq!(tally(&policy, &[queued()]).allowance(1.0, NOW).admits, Some(1), "one run to learn from");
    let probing = [queued(), run("e", Stage::Public, 4, running("g4", 1), vec![attempt(1, "g4", 1000, None)], 0)];
    let allowance = tally(&policy, &probing).allowance(1.0, NOW);
    assert_eq!(allowance.admits, Some(0), "the probe runs: nothing more until it ends");
    assert!(!allowance.spent(), "the probe itself may relaunch (an escalation) until it spends the budget");
}

#[test]
fn a_run_that_failed_at_no_cost_or_ran_long_does_not_loosen_a_budget() {
    let policy = crate::policy::tests::case_policy();
    let queued = run("c", Stage::Public, 5, RunState::Queued, Vec::new(), 0);
    let reason = crate::machine::FailureReason::CannotStart { detail: crate::machine::Detail::new("no image") };
    let failed =
        run("f", Stage::Public, 1, RunState::Failed { reason, resume: None }, vec![attempt(1, "g4", 10, None)], 5);
    // The failure cost $0: a run still counts at its time limit's price, not at nothing.
    let allowance = tally(&policy, &[failed.clone(), queued.clone()]).allowance(10.0, NOW);
    assert!(close(allowance.per_run_usd, 4.734) && allowance.admits == Some(2), "{allowance:?}");
    // e has run 20,000 s on g4, far past the $1.9245 the published runs took: it commits what it accrued.
    let mut runs = competition();
    runs[4] = run("e", Stage::Public, 4, running("g4", 1), vec![attempt(1, "g4", 20_000, None)], 0);
    let allowance = tally(&policy, &runs).allowance(100.0, NOW);
    assert!(close(allowance.committed_usd, 3.06 + 20_000.0 / 3600.0 * 0.526), "{allowance:?}");
}

/// The `k`th of the kinds of run the property test mixes: each state a run
/// can be counted in, on either stage.
fn kind(id: &str, k: u8) -> Run {
    let stage = if k.is_multiple_of(2) { Stage::Public } else { Stage::Private };
    let reason = || crate::machine::FailureReason::CannotStart { detail: crate::machine::Detail::new("no image") };
    let (state, attempts, ago) = match k % 8 {
        0 => (RunState::Queued, Vec::new(), 0),
        1 => (published(), vec![attempt(1, "g4", 9000, Some(3600))], 7200),
        2 => (published(), vec![attempt(1, "g4", 9000, Some(1800)), attempt(2, "p3", 7000, Some(3600))], 600),
        3 => (RunState::Failed { reason: reason(), resume: None }, vec![attempt(1, "g4", 100, Some(30))], 30),
        4 => (RunState::Cancelled, Vec::new(), 50),
        5 => (running("g4", 1), vec![attempt(1, "g4", 1000, None)], 0),
        6 => (running("p3", 2), vec![attempt(1, "g4", 3000, Some(1800)), attempt(2, "p3", 600, None)], 0),
        _ => (published(), vec![attempt(1, "g4", 90_000, Some(7200))], 80_000),
    };
    // A run keeps its stage, whatever its state: the stage is part of its id.
    let mut run = run(id, Stage::Public, u64::from(k) + 1, state, attempts, ago);
    run.spec.stage = stage;
    run.spec.run = RunId::new(&run.spec.submission, stage);
    run
}

proptest::proptest! {
    /// Kept up change by change, runs coming, moving and (retried, rescored)
    /// leaving the ended ones, a tally forecasts and budgets as one counted
    /// from scratch.
    #[test]
    fn a_tally_kept_up_by_changes_is_the_one_counted_from_scratch(
        first in proptest::collection::vec(0..8_u8, 0..12),
        moves in proptest::collection::vec((0..12_usize, 0..8_u8), 0..40),
        slots in 0..4_u64,
    ) {
        let policy = crate::policy::tests::case_policy();
        let same_stage = |id: usize, k: u8| kind(&format!("r{id}"), k - k % 2 + first[id] % 2);
        let mut runs: Vec<Run> = first.iter().enumerate().map(|(id, &k)| kind(&format!("r{id}"), k)).collect();
        let mut kept = Tally::new(&policy, Billing::Actual);
        for (n, &(id, k)) in moves.iter().enumerate() {
            if n == moves.len() / 2 {
                runs.iter().for_each(|r| kept.add(r)); // counted halfway, then followed
            }
            let Some(before) = runs.get(id).cloned() else { continue };
            let after = same_stage(id, k);
            if n >= moves.len() / 2 {
                kept.change(&after.spec, Some(&before.status), &after.status);
            }
            runs[id] = after;
        }
        if moves.is_empty() {
            runs.iter().for_each(|r| kept.add(r));
        }
        let scratch = tally(&policy, &runs);
        for now in [NOW, NOW.plus_ms(3_000_000)] {
            let (a, b) = (kept.forecast(slots, now), scratch.forecast(slots, now));
            for (x, y) in std::iter::once((&a.whole, &b.whole)).chain(a.stages.values().zip(b.stages.values())) {
                let counts = |p: &Progress| (p.total, p.ended, p.queued, p.running, p.ended_last_hour, p.eta_secs);
                proptest::prop_assert_eq!(counts(x), counts(y));
                proptest::prop_assert_eq!(&x.running_per_profile, &y.running_per_profile);
                proptest::prop_assert!(close(x.cost_usd, y.cost_usd), "{:?} {:?}", x, y);
                let near = match (x.remaining_cost_usd, y.remaining_cost_usd) {
                    (Some(a), Some(b)) => close(a, b),
                    (a, b) => a == b,
                };
                proptest::prop_assert!(near, "{:?} {:?}", x, y);
            }
            proptest::prop_assert_eq!(a.stages.keys().collect::<Vec<_>>(), b.stages.keys().collect::<Vec<_>>());
            let (a, b) = (kept.allowance(10.0, now), scratch.allowance(10.0, now));
            proptest::prop_assert_eq!(a.admits, b.admits);
            proptest::prop_assert!(close(a.committed_usd, b.committed_usd) && close(a.per_run_usd, b.per_run_usd));
        }
    }
}
