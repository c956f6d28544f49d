//! The AWS deployment end to end, with the real binaries against moto: one
//! engine (`evalflow serve`) and two `evalflow worker` processes; job ends
//! delivered as EventBridge "Batch Job State Change" events, duplicated and
//! out of order, as an EventBridge rule would deliver them.

use std::collections::BTreeMap;
use std::process::{Child, Command};
use std::time::Duration;

use evalflow_activities::leaderboard::Leaderboard;
use evalflow_tests::aws::{AwsCompetition, Tuning};
use evalflow_tests::cli::{Cli, wait_until};
use evalflow_worker::views::{EventView, RunView, StatusView};
use evalflow_workflow::StateTag;

fn block_on<F: Future>(future: F) -> F::Output {
    tokio::runtime::Runtime::new().unwrap().block_on(future)
}

fn runs(cli: &Cli) -> BTreeMap<String, RunView> {
    cli.json::<Vec<RunView>>(&["runs", "--json"]).into_iter().map(|r| (r.id.to_string(), r)).collect()
}

fn stop(child: &mut Child) {
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    assert!(child.wait().unwrap().success(), "stops cleanly on SIGTERM");
}

/// The EventBridge event Batch sends for a job, from its DescribeJobs detail.
async fn eventbridge_event(competition: &AwsCompetition, job_id: &str) -> String {
    let batch = competition.moto.batch().await;
    let described = batch.describe_jobs().jobs(job_id).send().await.unwrap();
    let job = &described.jobs()[0];
    let attempts: Vec<serde_json::Value> = job
        .attempts()
        .iter()
        .map(|a| {
            let container =
                a.container().map(|c| serde_json::json!({ "exitCode": c.exit_code(), "reason": c.reason() }));
            serde_json::json!({ "container": container, "startedAt": a.started_at(), "stoppedAt": a.stopped_at() })
        })
        .collect();
    serde_json::json!({
        "version": "0",
        "id": format!("event-{job_id}"),
        "detail-type": "Batch Job State Change",
        "source": "aws.batch",
        "account": "123456789012",
        "region": "us-east-1",
        "resources": [job.job_arn()],
        "detail": {
            "jobArn": job.job_arn(),
            "jobName": job.job_name(),
            "jobId": job.job_id(),
            "jobQueue": job.job_queue(),
            "status": job.status().map(|s| s.as_str()),
            "statusReason": job.status_reason(),
            "attempts": attempts,
            "startedAt": job.started_at(),
            "stoppedAt": job.stopped_at(),
            "tags": job.tags()
        }
    })
    .to_string()
}

#[test]
fn a_fleet_on_aws_evaluates_submissions_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let tuning = Tuning { visibility_timeout_secs: 30, reconcile_after_secs: 3600, resend_after_secs: 900 };
    let competition = block_on(AwsCompetition::create(&dir.path().join("c"), "fleet", tuning));
    let cli = &competition.cli;
    let first = cli.ok(&["aws", "bootstrap"]);
    assert!(first.contains("created  job queue"), "{first}");
    let again = cli.ok(&["aws", "bootstrap"]);
    assert!(
        again.trim_end().ends_with("0 created, 12 already there"),
        "bootstrap changes nothing the second time:\n{again}"
    );
    block_on(competition.upload_labels());

    // Six teams, of growing skill; their jobs' predictions are what moto's
    // jobs (which run nothing) would have written. A rival writes junk where
    // each run's predictions would be if their location were guessable.
    let mut expected = BTreeMap::new();
    let mut manifest = String::new();
    for team in 1..=6 {
        let run = format!("sub{team}-public");
        let score = block_on(competition.stage_predictions(&run, 1, f64::from(team) / 7.0));
        block_on(competition.put(&format!("outputs/{run}/a1/submission.csv"), b"filename,label\n".to_vec()));
        expected.insert(format!("team{team}"), score);
        manifest.push_str(&format!(
            "{{\"id\": \"sub{team}\", \"team\": \"team{team}\", \"stage\": \"public\", \"image\": \"123456789012.dkr.ecr.us-east-1.amazonaws.com/team{team}:final\"}}\n"
        ));
    }
    std::fs::write(dir.path().join("manifest.jsonl"), manifest).unwrap();
    cli.ok(&["submit", "--manifest", dir.path().join("manifest.jsonl").to_str().unwrap()]);

    let mut serve = cli.spawn_logged(&["serve"], &dir.path().join("serve.log"));
    let mut workers = [1, 2].map(|n| cli.spawn_logged(&["worker"], &dir.path().join(format!("worker{n}.log"))));
    wait_until("every job is launched", Duration::from_secs(120), || {
        runs(cli).values().all(|r| r.state == StateTag::Running)
    });

    // EventBridge delivers each job's end: twice, and in reverse order.
    let jobs = block_on(competition.jobs());
    assert_eq!(jobs.len(), 6, "{jobs:?}");
    block_on(async {
        let sqs = competition.moto.sqs().await;
        let queue = sqs.get_queue_url().queue_name(format!("{}-events", competition.prefix)).send().await.unwrap();
        let url = queue.queue_url().unwrap();
        for (_, job_id) in jobs.iter().rev().chain(jobs.iter()) {
            let event = eventbridge_event(&competition, job_id).await;
            sqs.send_message().queue_url(url).message_body(event).send().await.unwrap();
        }
    });
    wait_until("every run is published", Duration::from_secs(120), || {
        runs(cli).values().all(|r| r.state == StateTag::Published)
    });

    // The leaderboard in S3: every team, best first, with the right scores.
    let board: Leaderboard = block_on(async {
        let s3 = competition.moto.s3().await;
        let object = s3
            .get_object()
            .bucket(format!("{}-artifacts", competition.prefix))
            .key("leaderboard/public.json")
            .send()
            .await
            .unwrap();
        serde_json::from_slice(&object.body.collect().await.unwrap().to_vec()).unwrap()
    });
    let mut ranked: Vec<(String, f64)> = expected.clone().into_iter().collect();
    ranked.sort_by(|a, b| a.1.total_cmp(&b.1));
    let published: Vec<(String, f64)> = board.entries.iter().map(|e| (e.team.to_string(), e.score)).collect();
    assert_eq!(published.len(), ranked.len());
    for ((team, score), (expected_team, expected_score)) in published.iter().zip(&ranked) {
        assert_eq!(team, expected_team);
        assert!((score - expected_score).abs() < 1e-12, "{team}: {score} != {expected_score}");
    }
    let served: Leaderboard = cli.json(&["leaderboard", "--json"]);
    assert_eq!(served, board, "the CLI's leaderboard is the published one");

    // Exactly one Batch job per (run, attempt); duplicates changed nothing.
    let names: Vec<&str> = jobs.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, (1..=6).map(|t| format!("ef-sub{t}-public-a1")).collect::<Vec<_>>());
    let history: Vec<EventView> = cli.json(&["history", "sub3-public", "--json"]);
    let ends: Vec<&str> = history.iter().filter(|e| e.event == "job_ended").map(|e| e.disposition.as_str()).collect();
    assert_eq!(ends, ["applied", "ignored: not awaited in this state"], "the duplicate end is recorded as ignored");
    let status: StatusView = cli.json(&["status", "--json"]);
    assert_eq!(status.dead_letters.map(|d| (d.tasks, d.events)), Some((0, 0)));

    stop(&mut serve);
    for worker in &mut workers {
        stop(worker);
    }
    assert!(cli.ok(&["replay", "--all"]).contains("6 runs replayed, 0 diverge"));
    for log in ["serve.log", "worker1.log", "worker2.log"] {
        let text = std::fs::read_to_string(dir.path().join(log)).unwrap();
        let line = text.lines().find(|l| l.contains("AWS requests")).unwrap_or_else(|| panic!("{log}: {text}"));
        eprintln!("{log}, 6 runs: {line}");
    }
}
