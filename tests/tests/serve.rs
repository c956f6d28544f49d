//! `evalflow serve` and the CLI through its API, with submissions that try
//! to get out of the sandbox or past its limits.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use evalflow_tests::cli::{Cli, competition, wait_until};
use evalflow_worker::datadir::lock::EngineInfo;
use evalflow_worker::views::{RunView, StatusView};
use evalflow_workflow::{Stage, StateTag};

fn submission(root: &Path, id: &str, command: &str, program: &str) -> String {
    let dir = root.join(id);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("submission.toml"), format!("command = {command}\n")).unwrap();
    fs::write(dir.join("main.py"), program).unwrap();
    dir.to_str().unwrap().to_owned()
}

const WRITE_HALVES: &str = r#"
def write_halves():
    files = sorted(os.listdir(os.environ["EVALFLOW_INPUT_DIR"]))
    with open(os.path.join(os.environ["EVALFLOW_OUTPUT_DIR"], "submission.csv"), "w") as f:
        f.write("filename,label\n")
        for n in files:
            f.write("%s,0.5\n" % n)
"#;

fn run_view(cli: &Cli, id: &str) -> RunView {
    let runs: Vec<RunView> = cli.json(&["runs", "--json"]);
    runs.into_iter().find(|r| r.id.as_str() == id).unwrap_or_else(|| panic!("no run {id}"))
}

fn sleeping(marker: &str) -> bool {
    let output = Command::new("pgrep").args(["-f", &format!("^sleep {marker}$")]).output().unwrap();
    output.status.success()
}

#[test]
fn the_sandbox_holds_and_cancel_really_stops_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let cli = competition(&dir.path().join("competition"));
    let mut serve = cli.spawn(&["serve"]);
    let info_path = cli.data_dir.join("state/engine.json");
    wait_until("the engine announces its API", Duration::from_secs(30), || info_path.exists());
    let info: EngineInfo = serde_json::from_slice(&fs::read(&info_path).unwrap()).unwrap();
    let port = info.api.rsplit(':').next().unwrap().to_owned();
    let status: StatusView = cli.json(&["status", "--json"]);
    assert_eq!(status.engine, Some(format!("pid {} at {}", info.pid, info.api)), "the CLI goes through the API");

    let subs = dir.path().join("subs");
    let labels = cli.data_dir.join("data/public/labels.csv");
    let probe = format!(
        "import os, socket, sys\n{WRITE_HALVES}\n\
         try:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2).close(); print('api: OPEN', file=sys.stderr)\n\
         except OSError as e:\n    print('api: blocked (%s)' % e, file=sys.stderr)\n\
         try:\n    open({labels:?}).read(); print('labels: READ', file=sys.stderr)\n\
         except OSError as e:\n    print('labels: blocked (%s)' % e.strerror, file=sys.stderr)\n\
         write_halves()\n"
    );
    let bomb =
        "import os, time\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        time.sleep(0.01)\n";
    let fill = "import os\ni = 0\nwhile True:\n    open(os.path.join(os.environ['EVALFLOW_OUTPUT_DIR'], 'f%d' % i), 'wb').write(b'x' * (8 << 20))\n    i += 1\n";
    let py = "[\"python3\", \"main.py\"]";
    for (id, command, program) in [
        ("probe", py, probe.as_str()),
        ("forkbomb", py, bomb),
        ("diskfill", py, fill),
        ("sleeper", "[\"sleep\", \"7777\"]", ""),
    ] {
        let path = submission(&subs, id, command, program);
        cli.ok(&["submit", "--id", id, "--team", id, &path]);
    }

    wait_until("the sleeper runs", Duration::from_secs(60), || sleeping("7777"));
    let ended = |id: &str| run_view(&cli, id).state.is_terminal();
    wait_until("the others end", Duration::from_secs(120), || {
        ["probe", "forkbomb", "diskfill"].iter().all(|id| ended(&format!("{id}-public")))
    });

    let probe = run_view(&cli, "probe-public");
    assert_eq!(
        (probe.state, probe.score),
        (StateTag::Published, Some(std::f64::consts::LN_2)),
        "0.5 everywhere: no labels"
    );
    let logs = cli.ok(&["logs", "probe-public"]);
    assert!(logs.contains("api: blocked") && logs.contains("labels: blocked"), "{logs}");
    for (id, limit) in [("forkbomb-public", "processes"), ("diskfill-public", "disk space")] {
        let run = run_view(&cli, id);
        assert_eq!(run.failure.as_deref(), Some("limit_exceeded"), "{id}: {run:?}");
        assert!(run.reason.as_deref().unwrap_or_default().ends_with(limit), "{id}: {run:?}");
    }

    let cancelled = cli.ok(&["cancel", "sleeper-public"]);
    assert!(cancelled.contains("cancelled: now cancelled"), "{cancelled}");
    assert!(!sleeping("7777"), "cancel returns once the job is stopped");
    assert_eq!(run_view(&cli, "sleeper-public").state, StateTag::Cancelled);
    assert!(cli.ok(&["logs", "sleeper-public"]).contains("terminated on request"));

    // Retry through the API: the cancelled run runs again as attempt 2.
    cli.ok(&["retry", "sleeper-public"]);
    wait_until("the sleeper runs again", Duration::from_secs(60), || sleeping("7777"));
    assert_eq!(run_view(&cli, "sleeper-public").attempts, 2);
    cli.ok(&["cancel", "--state", "running"]);
    assert!(!sleeping("7777"));

    // One engine per data directory.
    let second = cli.fails(&["serve"]);
    assert!(second.contains(&format!("is already served by an engine (pid {}) at {}", info.pid, info.api)), "{second}");
    let kill = Command::new("kill").args(["-TERM", &serve.id().to_string()]).status().unwrap();
    assert!(kill.success());
    assert!(serve.wait().unwrap().success(), "serve stops cleanly on SIGTERM");
    assert!(!info_path.exists(), "a stopped engine withdraws its announcement");
    assert!(cli.ok(&["replay", "--all"]).contains("4 runs replayed, 0 diverge"));
}

#[test]
fn a_port_in_use_is_named_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let cli = competition(&dir.path().join("competition"));
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let err = cli.fails(&["serve", "--listen", &address]);
    assert!(err.contains(&format!("cannot listen on {address}: another process uses that address")), "{err}");
    let err = cli.fails(&["serve", "--listen", "0.0.0.0:0"]);
    assert!(err.contains("listens on loopback only"), "{err}");
}

#[test]
fn a_run_waiting_for_a_launch_slot_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let cli = competition(&dir.path().join("competition")); // 2 jobs at once
    let _serve = cli.spawn(&["serve"]);
    let info_path = cli.data_dir.join("state/engine.json");
    wait_until("the engine announces its API", Duration::from_secs(30), || info_path.exists());
    let subs = dir.path().join("subs");
    for (id, seconds) in [("first", "7781"), ("second", "7782"), ("third", "7783")] {
        let path = submission(&subs, id, &format!("[\"sleep\", \"{seconds}\"]"), "");
        cli.ok(&["submit", "--id", id, "--team", id, &path]);
    }
    wait_until("two jobs run", Duration::from_secs(60), || sleeping("7781") && sleeping("7782"));
    let third = run_view(&cli, "third-public");
    assert_eq!((third.state, third.waiting.as_deref()), (StateTag::Queued, Some("waiting for a launch slot")));
    assert_eq!(run_view(&cli, "first-public").waiting, None, "a running local job waits for nothing");
    let status = cli.ok(&["status"]);
    assert!(status.contains("1 queued runs wait for a launch slot: 2 of 2 in use"), "{status}");
    cli.ok(&["cancel", "--state", "queued"]);
    cli.ok(&["cancel", "--state", "running"]);
    assert!(!sleeping("7781") && !sleeping("7782") && !sleeping("7783"));
}

#[test]
fn a_stage_whose_labels_disagree_launches_nothing_until_they_are_fixed() {
    let dir = tempfile::tempdir().unwrap();
    let cli = competition(&dir.path().join("competition"));
    let subs = dir.path().join("subs");
    let program = format!("import os\n{WRITE_HALVES}\nwrite_halves()\n");
    let path = submission(&subs, "early", "[\"python3\", \"main.py\"]", &program);
    cli.ok(&["submit", "--id", "early", "--team", "early", &path]);
    let labels = cli.data_dir.join("data/public/labels.csv");
    let good = fs::read_to_string(&labels).unwrap();
    fs::write(&labels, good.replace("f3.txt,1", "f3.txt,2")).unwrap();

    let _serve = cli.spawn(&["serve"]);
    let info_path = cli.data_dir.join("state/engine.json");
    wait_until("the engine announces its API", Duration::from_secs(30), || info_path.exists());
    let status: StatusView = cli.json(&["status", "--json"]);
    let problem = status.stage_problems.iter().find(|p| p.stage == Stage::Public).unwrap();
    assert!(
        problem.problem.ends_with("line 5: label \"2\" is not 0 or 1 (1 for FAKE, 0 for REAL)"),
        "what is wrong, and where: {problem:?}"
    );
    let said = cli.ok(&["status"]);
    assert!(said.contains("stage public is not ready, so none of its runs launches until it is"), "{said}");
    std::thread::sleep(Duration::from_secs(2));
    let early = run_view(&cli, "early-public");
    assert_eq!(early.state, StateTag::Queued, "nothing launches that could only fail: {early:?}");
    assert!(early.waiting.as_deref().unwrap().starts_with("waiting for stage public to be ready: "), "{early:?}");
    assert_eq!(early.attempts, 0);

    fs::write(&labels, good).unwrap();
    wait_until("the fixed stage's run is published", Duration::from_secs(60), || {
        run_view(&cli, "early-public").state == StateTag::Published
    });
    let status: StatusView = cli.json(&["status", "--json"]);
    assert!(status.stage_problems.iter().all(|p| p.stage != Stage::Public), "{status:?}");
}
