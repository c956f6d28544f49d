//! `GET /metrics` on a real `serve` after real sandboxed runs, read back
//! with the Prometheus project's own OpenMetrics parser (Python
//! `prometheus_client`, installed by scripts/test), which refuses text a
//! scrape would not take.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use evalflow_tests::cli::Cli;
use evalflow_tests::local::{competition, serve, submit, wait_ended};
use evalflow_worker::datadir::lock::EngineInfo;

/// The samples of the scrape, `name{labels}` -> value, as the parser read them.
const PARSE: &str = r#"
import sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
for family in text_string_to_metric_families(sys.stdin.read()):
    for sample in family.samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
        print(f"{sample.name}{{{labels}}} {sample.value}")
"#;

fn scrape(cli: &Cli) -> String {
    let info: EngineInfo =
        serde_json::from_slice(&std::fs::read(cli.data_dir.join("state/engine.json")).unwrap()).unwrap();
    let token = std::fs::read_to_string(cli.data_dir.join("state/api.token")).unwrap();
    let out = Command::new("curl")
        .args(["-sf", "-H", &format!("Authorization: Bearer {}", token.trim()), &format!("{}/metrics", info.api)])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn parsed(text: &str) -> BTreeMap<String, f64> {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    let mut child = Command::new(&python)
        .args(["-c", PARSE])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e} (scripts/test installs it)", python.display()));
    use std::io::Write as _;
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the parser refuses the scrape: {}\n{text}", String::from_utf8_lossy(&out.stderr));
    let lines = String::from_utf8(out.stdout).unwrap();
    lines.lines().map(|l| l.rsplit_once(' ').unwrap()).map(|(k, v)| (k.to_owned(), v.parse().unwrap())).collect()
}

#[test]
fn metrics_count_the_runs_their_attempts_durations_cost_and_the_engines_groups() {
    let dir = tempfile::tempdir().unwrap();
    let cli = competition(&dir.path().join("competition"));
    let _engine = serve(&cli);
    let subs = dir.path().join("subs");
    submit(&cli, &subs, "fine", "halves()\n");
    submit(&cli, &subs, "broken", "sys.exit(3)\n");
    wait_ended(&cli, &["fine", "broken"], Duration::from_secs(60));

    let samples = parsed(&scrape(&cli));
    let get = |name: &str| samples.get(name).copied().unwrap_or_else(|| panic!("no {name} in {samples:#?}"));
    assert_eq!(get("evalflow_runs{stage=public,state=published}"), 1.0);
    assert_eq!(get("evalflow_runs{stage=public,state=failed}"), 1.0);
    assert_eq!(get("evalflow_attempts_total{outcome=succeeded,profile=g4}"), 1.0);
    assert_eq!(get("evalflow_attempts_total{outcome=crashed,profile=g4}"), 1.0);
    assert_eq!(get("evalflow_job_duration_seconds_count{profile=g4}"), 2.0);
    assert_eq!(get("evalflow_job_duration_seconds_bucket{le=+Inf,profile=g4}"), 2.0);
    assert!(get("evalflow_job_duration_seconds_sum{profile=g4}") > 0.0);
    assert!(get("evalflow_cost_usd{profile=g4}") > 0.0);
    assert_eq!(get("evalflow_eta_seconds{}"), 0.0, "nothing left");
    assert_eq!(get("evalflow_projected_cost_usd{}"), get("evalflow_cost_usd{profile=g4}"));
    // Two submissions, their launches, ends, scores and publishes: several groups.
    assert!(get("evalflow_engine_group_inputs_count{}") >= 4.0, "{samples:#?}");
    assert!(get("evalflow_engine_group_seconds_count{}") >= 4.0);
    assert!(!samples.keys().any(|k| k.starts_with("evalflow_queue_messages")), "no queue here: {samples:#?}");
}
