use super::*;

/// The case's ladder at its prices, with `extra` appended to the workload.
fn workload(extra: &str) -> String {
    format!(
        r#"
        {extra}
        [policy]
        time_limit_secs = 172800
        [[policy.profile]]
        name = "c4"
        host_memory_mib = 7680
        gpu_memory_mib = 0
        vcpus = 4
        price_per_hour_usd = 0.199
        relative_speed = 0.5
        cpu_only = true
        [[policy.profile]]
        name = "g4"
        host_memory_mib = 16384
        gpu_memory_mib = 16384
        vcpus = 4
        price_per_hour_usd = 0.526
        relative_speed = 0.45
        [[policy.profile]]
        name = "p3"
        host_memory_mib = 62464
        gpu_memory_mib = 16384
        vcpus = 8
        price_per_hour_usd = 3.06
        relative_speed = 1.0
        "#
    )
}

fn planned(extra: &str) -> Plan {
    plan(&Workload::from_toml(&workload(extra), None).unwrap()).unwrap()
}

fn policy<'a>(plan: &'a Plan, name: &str) -> &'a PolicyPlan {
    plan.policies.iter().find(|p| p.name == name).unwrap_or_else(|| panic!("no policy {name} in {plan:#?}"))
}

fn profile<'a>(plan: &'a PolicyPlan, name: &str) -> &'a ProfilePlan {
    plan.profiles.iter().find(|p| p.name.as_str() == name).unwrap()
}

fn near(actual: f64, expected: f64) -> bool {
    (actual - expected).abs() <= 1e-6 * expected.abs().max(1.0)
}

#[test]
fn hours_and_cost_follow_from_the_run_time_and_the_speeds() {
    let plan = planned(
        r#"submissions = 40
        run_time = { mean_hours = 2.0 }
        fleet = { instances = { c4 = 1, g4 = 4, p3 = 4 } }"#,
    );
    let p3 = policy(&plan, "all on p3");
    assert!(near(p3.total_hours, 80.0), "{p3:#?}");
    assert!(near(p3.total_cost_usd, 80.0 * 3.06));
    // 40 runs of 2 h on 4 instances: 10 rounds, and a few seconds of scoring.
    let makespan = p3.makespan_hours.unwrap();
    assert!((20.0..20.1).contains(&makespan), "{makespan}");
    assert_eq!(profile(p3, "p3").peak_instances, 4);
    let g4 = policy(&plan, "all on g4");
    assert!(near(g4.total_hours, 80.0 / 0.45), "{g4:#?}");
    assert_eq!(g4.runs, RunCounts { published: 40, failed: 0, unfinished: 0 });
    assert_eq!(plan.chosen.name, "g4 → p3");
}

#[test]
fn the_smallest_fleet_meets_the_deadline_and_one_less_does_not() {
    let plan = planned(
        r#"submissions = 100
        run_time = { mean_hours = 1.0 }
        fleet = { deadline_hours = 10.5, headroom = 0.5 }"#,
    );
    let p3 = policy(&plan, "all on p3");
    // 100 one-hour runs in 10.5 h: 10 rounds of 10 instances.
    assert_eq!(profile(p3, "p3").fleet, 10, "{p3:#?}");
    assert_eq!(profile(p3, "p3").provision, 15);
    assert_eq!(p3.deadline_met, Some(true));
    let nine = BTreeMap::from([(ProfileName::new("p3").unwrap(), 9)]);
    let text = workload("submissions = 100\nrun_time = { mean_hours = 1.0 }\nfleet = { deadline_hours = 10.5 }");
    let ten_hours = Workload::from_toml(&text, None).unwrap();
    let drawn = draw(&ten_hours);
    let nine = Planner::new(&ten_hours, &drawn, Variant::AllOnFastest).simulate(&nine, HORIZON).unwrap();
    assert!(!nine.ends_by(10.5), "9 instances take 12 rounds: {:?}", nine.makespan_hours);
    // Times that vary: the work spread over the deadline is not enough, the
    // search doubles and bisects, and what it finds is the smallest.
    let text = workload("submissions = 200\nrun_time = { mean_hours = 1.0, cv = 0.8 }\nfleet = { deadline_hours = 8 }");
    let varied = Workload::from_toml(&text, None).unwrap();
    let drawn = draw(&varied);
    let planner = Planner::new(&varied, &drawn, Variant::AllOnFastest);
    let (fleet, found, note) = planner.smallest_fleet(8.0).unwrap();
    assert!(found.ends_by(8.0) && note.is_none(), "{:?} {note:?}", found.makespan_hours);
    let p3 = ProfileName::new("p3").unwrap();
    let work = drawn.iter().map(|d| d.nature.reference_secs).sum::<f64>() / 3600.0;
    assert!(fleet[&p3] as f64 > (work / 8.0).ceil(), "more than the work spread over the deadline: {fleet:?}");
    let less = BTreeMap::from([(p3.clone(), fleet[&p3] - 1)]);
    let less = planner.simulate(&less, HORIZON).unwrap();
    assert!(!less.ends_by(8.0), "{} p3 end in {:?} h", fleet[&p3] - 1, less.makespan_hours);
    let too_short = planned(
        r#"submissions = 10
        run_time = { mean_hours = 3.0 }
        fleet = { deadline_hours = 2.0 }"#,
    );
    let p3 = policy(&too_short, "all on p3");
    assert_eq!(p3.deadline_met, Some(false));
    assert!(p3.note.as_deref().unwrap().contains("no fleet meets the 2 h deadline"), "{p3:#?}");
}

#[test]
fn runs_that_need_more_memory_move_up_the_ladder_and_a_later_stage_starts_them_there() {
    let plan = planned(
        r#"submissions = 20
        after = "public"
        run_time = { mean_hours = 1.0 }
        memory = { share = 0.5, resource = "host_memory", need_mib = 32768, runs_out_after = 0.5 }
        fleet = { instances = { c4 = 1, g4 = 20, p3 = 20 } }"#,
    );
    let g4 = policy(&plan, "all on g4");
    let big = g4.runs.failed;
    assert_eq!(big, 10, "half need more than g4 has: {g4:#?}");
    assert_eq!(g4.runs.published, 20 - big);
    let ladder = policy(&plan, "g4 → p3");
    assert_eq!(ladder.runs.published, 20);
    // The big ones ran half their g4 time, then all of it on p3.
    let g4_hours = (20 - big) as f64 / 0.45 + big as f64 * 0.5 / 0.45;
    assert!(near(profile(ladder, "g4").hours, g4_hours), "{ladder:#?}");
    assert!(near(profile(ladder, "p3").hours, big as f64));
    let learned = policy(&plan, "g4 → p3, placement learned");
    assert!(near(profile(learned, "g4").hours, (20 - big) as f64 / 0.45), "{learned:#?}");
    assert!(near(profile(learned, "p3").hours, big as f64));
    assert_eq!(plan.chosen.name, "g4 → p3, placement learned");
}

#[test]
fn spot_costs_its_prices_and_its_interruptions() {
    let plan = planned(
        r#"submissions = 200
        run_time = { mean_hours = 4.0, cv = 0.3 }
        spot = { interruptions_per_hour = 0.05, price_per_hour_usd = { c4 = 0.06, g4 = 0.16, p3 = 0.92 } }
        fleet = { instances = { c4 = 1, g4 = 50, p3 = 5 } }"#,
    );
    let on_demand = policy(&plan, "g4 → p3");
    let spot = policy(&plan, "g4 → p3 on Spot");
    assert!(spot.total_hours > on_demand.total_hours * 1.05, "interrupted runs start over: {spot:#?}");
    let g4 = profile(spot, "g4");
    assert!(near(g4.cost_usd, g4.hours * 0.16));
    assert!(spot.total_cost_usd < on_demand.total_cost_usd / 2.0);
    assert_eq!(plan.chosen.name, "g4 → p3 on Spot");
}

#[test]
fn a_workload_that_cannot_be_planned_says_what_to_change() {
    let error = |extra: &str| Workload::from_toml(&workload(extra), None).unwrap_err().to_string();
    let run_time = "run_time = { mean_hours = 1.0 }";
    assert!(
        error(&format!("submissions = 0\n{run_time}\nfleet = {{ deadline_hours = 1 }}")).contains("plan 1 to 50,000")
    );
    assert!(error("submissions = 5\nfleet = { deadline_hours = 1 }").contains("--from DIR"));
    assert!(error(&format!("submissions = 5\n{run_time}\nfleet = {{}}")).contains("needs instances"));
    let missing = error(&format!("submissions = 5\n{run_time}\nfleet = {{ instances = {{ g4 = 1, p3 = 1 }} }}"));
    assert!(missing.contains("has no c4"), "{missing}");
    let unknown =
        error(&format!("submissions = 5\n{run_time}\nfleet = {{ instances = {{ c4 = 1, g4 = 1, p3 = 1, x9 = 1 }} }}"));
    assert!(unknown.contains("names x9"), "{unknown}");
    let spot = error(&format!(
        "submissions = 5\n{run_time}\nfleet = {{ deadline_hours = 1 }}\nspot = {{ interruptions_per_hour = 0.1, price_per_hour_usd = {{ g4 = 0.1 }} }}"
    ));
    assert!(spot.contains("has no c4: give every profile of the policy its Spot price"), "{spot}");
    let share = error(&format!("submissions = 5\ncpu_only_share = 1.5\n{run_time}\nfleet = {{ deadline_hours = 1 }}"));
    assert!(share.contains("cpu_only_share = 1.5: give a share from 0 to 1"), "{share}");
    let after = error(&format!("submissions = 5\nafter = \"private\"\n{run_time}\nfleet = {{ deadline_hours = 1 }}"));
    assert!(after.contains("is the stage planned"), "{after}");
    let typo = error(&format!("submissions = 5\nsubmisions = 5\n{run_time}\nfleet = {{ deadline_hours = 1 }}"));
    assert!(typo.contains("submisions"), "{typo}");
    let nan = error("submissions = 5\nrun_time = { mean_hours = nan }\nfleet = { deadline_hours = 1 }");
    assert!(nan.contains("run_time.mean_hours = NaN"), "{nan}");
    let observed = Workload::from_toml(&workload("submissions = 5\nfleet = { deadline_hours = 1 }"), Some(Vec::new()));
    assert_eq!(observed.unwrap_err(), WorkloadError::NothingObserved);
}

#[test]
fn observed_durations_are_what_runs_take() {
    let text = workload("submissions = 30\nfleet = { instances = { c4 = 1, g4 = 1, p3 = 30 } }");
    let one = plan(&Workload::from_toml(&text, Some(vec![5400.0])).unwrap()).unwrap();
    assert!(near(policy(&one, "all on p3").total_hours, 45.0), "{one:#?}");
    assert!(near(policy(&one, "all on g4").total_hours, 45.0 / 0.45));
    let two = plan(&Workload::from_toml(&text, Some(vec![3600.0, 36_000.0])).unwrap()).unwrap();
    let hours = policy(&two, "all on p3").total_hours;
    // Each run draws one of the two: a whole number of 1 h and 10 h runs, some of each.
    let long = (hours - 30.0) / 9.0;
    assert!(near(long, long.round()) && long > 5.0 && long < 25.0, "{hours}");
}
