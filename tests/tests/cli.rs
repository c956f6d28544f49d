//! Bad input gets an error that names the problem and the fix, and loses
//! nothing: the CLI acting on the store while no engine runs.

use std::fs;
use std::path::Path;
use std::time::Duration;

use evalflow_tests::cli::{Cli, wait_until};
use evalflow_worker::datadir::lock::EngineInfo;
use evalflow_worker::views::{ActionView, RunView};
use evalflow_workflow::StateTag;

fn competition(dir: &Path) -> Cli {
    let cli = Cli::new(dir);
    cli.ok(&["init", dir.to_str().unwrap()]);
    fs::write(dir.join("data/public/test/a.txt"), "1\n").unwrap();
    fs::write(dir.join("data/public/labels.csv"), "filename,label\na.txt,1\n").unwrap();
    cli
}

fn submission(dir: &Path, manifest: &str) -> String {
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join("submission.toml"), manifest).unwrap();
    dir.to_str().unwrap().to_owned()
}

#[test]
fn submissions_are_checked_and_kept_and_resubmitting_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let cli = competition(&dir.path().join("c"));
    let good = submission(&dir.path().join("good"), "command = [\"python3\", \"main.py\"]\n");
    let views: Vec<ActionView> = cli.json(&["submit", "--id", "s1", "--team", "t", &good, "--json"]);
    assert_eq!((views[0].accepted, views[0].state), (true, Some(StateTag::Queued)));
    assert!(cli.data_dir.join("submissions/s1/submission.toml").exists(), "kept in the data directory");
    let again = cli.ok(&["submit", "--id", "s1", "--team", "t", &good]);
    assert!(again.contains("already submitted: queued"), "{again}");

    fs::write(Path::new(&good).join("main.py"), "changed").unwrap();
    let conflict = cli.fails(&["submit", "--id", "s1", "--team", "t", &good]);
    assert!(conflict.contains("submission s1 was already submitted with other contents"), "{conflict}");
    assert!(conflict.contains("give the new version its own id"), "{conflict}");

    let missing = cli.fails(&["submit", "--id", "s2", "--team", "t", dir.path().to_str().unwrap()]);
    assert!(missing.contains("has no submission.toml: add one with command"), "{missing}");
    let broken = submission(&dir.path().join("broken"), "command = python3\n");
    assert!(cli.fails(&["submit", "--id", "s3", "--team", "t", &broken]).contains("submission.toml is not valid"));
    let empty = submission(&dir.path().join("empty"), "command = []\n");
    assert!(cli.fails(&["submit", "--id", "s4", "--team", "t", &empty]).contains("command must be a non-empty list"));
    let unsafe_id = cli.fails(&["submit", "--id", "../x", "--team", "t", &good]);
    assert!(unsafe_id.contains("submission id \"../x\" has '.' at position 1"), "{unsafe_id}");
    let config = cli.data_dir.join("evalflow.toml");
    let private = "[stages.private]\ntest_set = \"data/private/test\"\nlabels = \"data/private/labels.csv\"\n";
    let text = fs::read_to_string(&config).unwrap();
    assert!(text.contains(private));
    fs::write(&config, text.replace(private, "")).unwrap();
    let no_stage = cli.fails(&["submit", "--id", "s5", "--team", "t", "--stage", "private", &good]);
    assert!(no_stage.contains("evalflow.toml has no [stages.private]: add its test_set and labels"), "{no_stage}");

    let runs: Vec<RunView> = cli.json(&["runs", "--json"]);
    assert_eq!(runs.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["s1-public"], "nothing else got in");
}

#[test]
fn a_manifest_is_checked_line_by_line_before_anything_is_submitted() {
    let dir = tempfile::tempdir().unwrap();
    let cli = competition(&dir.path().join("c"));
    submission(&dir.path().join("subs/a"), "command = [\"true\"]\n");
    submission(&dir.path().join("subs/b"), "command = [\"true\"]\ncpu_only = true\n");
    let manifest = dir.path().join("manifest.jsonl");
    let line = |id: &str, path: &str| {
        format!("{{\"id\": \"{id}\", \"team\": \"t\", \"stage\": \"public\", \"path\": \"{path}\"}}\n")
    };
    fs::write(
        &manifest,
        format!("{}\n{}{{\"id\": \"c\", \"team\": \"t\"}}\n", line("a", "subs/a"), line("b", "subs/b")),
    )
    .unwrap();
    let err = cli.fails(&["submit", "--manifest", manifest.to_str().unwrap()]);
    assert!(err.contains("manifest.jsonl, line 4: missing field `stage`"), "{err}");
    let runs: Vec<RunView> = cli.json(&["runs", "--json"]);
    assert!(runs.is_empty(), "a bad line submits nothing");

    fs::write(&manifest, format!("{}{}", line("a", "subs/a"), line("b", "subs/b"))).unwrap();
    let views: Vec<ActionView> = cli.json(&["submit", "--manifest", manifest.to_str().unwrap(), "--json"]);
    assert!(views.iter().all(|v| v.accepted), "{views:?}");
    let runs: Vec<RunView> = cli.json(&["runs", "--state", "queued", "--json"]);
    assert_eq!(runs.len(), 2);

    // More than the pages of 1,000 that `runs --json` asks for, each run once, in id order.
    let many: String = (0..2_500).map(|i| line(&format!("m{i:04}"), "subs/a")).collect();
    fs::write(&manifest, many).unwrap();
    cli.ok(&["submit", "--manifest", manifest.to_str().unwrap()]);
    let mut expected: Vec<String> = ["a-public".to_owned(), "b-public".to_owned()].into();
    expected.extend((0..2_500).map(|i| format!("m{i:04}-public")));
    for args in [&["runs", "--json"][..], &["runs", "--state", "queued", "--json"]] {
        let runs: Vec<RunView> = cli.json(args);
        assert_eq!(runs.iter().map(|r| r.id.to_string()).collect::<Vec<_>>(), expected, "{args:?}");
    }
}

#[test]
fn operator_requests_that_make_no_sense_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cli = competition(&dir.path().join("c"));
    let good = submission(&dir.path().join("good"), "command = [\"true\"]\n");
    cli.ok(&["submit", "--id", "s1", "--team", "t", &good]);

    let unknown = cli.fails(&["history", "nope-public"]);
    assert!(unknown.contains("no run nope-public: list runs with `evalflow runs`"), "{unknown}");
    let retry = cli.run(&["retry", "s1-public"]);
    let retry = String::from_utf8_lossy(&retry.stdout).into_owned();
    assert!(retry.contains("run s1-public is queued: only failed or cancelled runs can be retried"), "{retry}");
    let cancelled = cli.ok(&["cancel", "s1-public"]);
    assert!(cancelled.contains("cancelled: now cancelled"), "{cancelled}");
    let twice = cli.ok(&["cancel", "s1-public"]);
    assert!(twice.contains("already cancelled"), "{twice}");
    assert!(cli.ok(&["retry", "--state", "cancelled"]).contains("requeued: now queued"));
    let bad_state = cli.fails(&["runs", "--state", "done"]);
    assert!(bad_state.contains("is not one of: queued, launching, running"), "{bad_state}");
    let history = cli.ok(&["--wide", "history", "s1-public"]);
    assert!(history.contains("cancel_requested") && history.contains("retry_requested"), "{history}");
}

#[test]
fn broken_configurations_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let cli = competition(&dir.path().join("c"));
    let config = cli.data_dir.join("evalflow.toml");
    let original = fs::read_to_string(&config).unwrap();

    fs::write(&config, original.replace("time_limit_secs", "time_limt_secs")).unwrap();
    let typo = cli.fails(&["status"]);
    assert!(typo.contains("unknown field `time_limt_secs`"), "{typo}");

    fs::write(&config, original.replace("data/public/test", "data/public/gone")).unwrap();
    let test_set = cli.fails(&["status"]);
    assert!(test_set.contains("[stages.public] test_set") && test_set.contains("gone"), "{test_set}");

    fs::write(&config, original.replace("host_memory_mib = 4096", "host_memory_mib = 0")).unwrap();
    let zero = cli.fails(&["status"]);
    assert!(
        zero.contains("[policy]: profile \"g4\" has host_memory_mib = 0: give it the memory a job may use"),
        "{zero}"
    );
    assert_eq!(zero.matches("host_memory_mib = 0").count(), 1, "said once: {zero}");

    let nowhere = Cli::new(dir.path().join("nowhere")).fails(&["status"]);
    assert!(nowhere.contains("no evalflow.toml in") && nowhere.contains("evalflow init"), "{nowhere}");
}

#[test]
fn a_data_directory_held_by_a_silent_engine_is_named_with_its_process() {
    let dir = tempfile::tempdir().unwrap();
    let cli = competition(&dir.path().join("c"));
    let state = cli.data_dir.join("state");
    fs::create_dir_all(&state).unwrap();
    let lock = fs::File::create(state.join("engine.lock")).unwrap();
    lock.try_lock().unwrap();
    // This test process plays an engine that does not answer.
    let pid = std::process::id();
    let info = EngineInfo { pid, api: "http://127.0.0.1:9".into() };
    fs::write(state.join("engine.json"), serde_json::to_vec(&info).unwrap()).unwrap();
    let err = cli.fails(&["status"]);
    let expected = format!("is locked by an evalflow engine (pid {pid}) that does not answer at http://127.0.0.1:9");
    assert!(err.contains(&expected), "{err}");
    assert!(err.contains(&format!("stop it (kill {pid})")), "{err}");
}

#[test]
fn a_stage_whose_labels_and_test_set_disagree_is_refused_before_any_job_runs() {
    let dir = tempfile::tempdir().unwrap();
    let cli = competition(&dir.path().join("c"));
    let good = submission(&dir.path().join("good"), "command = [\"python3\", \"main.py\"]\n");
    let labels = cli.data_dir.join("data/public/labels.csv");
    let test = cli.data_dir.join("data/public/test");
    let cases = [
        ("filename,label\na.txt,1\n", Some("b.txt"), "1 of the 2 test files have no label, for example \"b.txt\""),
        ("filename,label\na.txt,1\nz.txt,0\n", None, "1 labelled files are not in the test set"),
        ("filename,label\na.txt,2\n", None, "label \"2\" is not 0 or 1"),
        ("file,label\na.txt,1\n", None, "the header must be filename,label"),
        ("filename,label\na.txt,1\na.txt,0\n", None, "\"a.txt\" is labelled twice"),
    ];
    for (text, extra, problem) in cases {
        fs::write(&labels, text).unwrap();
        if let Some(extra) = extra {
            fs::write(test.join(extra), "2\n").unwrap();
        }
        let err = cli.fails(&["submit", "--id", "s1", "--team", "t", &good]);
        assert!(err.contains("stage public is not ready, so nothing was submitted") && err.contains(problem), "{err}");
        assert!(err.contains("not the team's"), "{err}");
        if let Some(extra) = extra {
            fs::remove_file(test.join(extra)).unwrap();
        }
    }
    fs::remove_file(test.join("a.txt")).unwrap();
    fs::write(&labels, "filename,label\na.txt,1\n").unwrap();
    assert!(cli.fails(&["submit", "--id", "s1", "--team", "t", &good]).contains("has no files"));
    let runs: Vec<RunView> = cli.json(&["runs", "--json"]);
    assert!(runs.is_empty(), "nothing was submitted: {runs:?}");
}

#[test]
fn small_mistakes_get_words_that_name_the_problem_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let cli = competition(&dir.path().join("c"));
    let config = cli.data_dir.join("evalflow.toml");
    let good = fs::read_to_string(&config).unwrap();

    fs::write(&config, good.replace("max_concurrent_jobs = 2", "max_concurrent_jobs = 0")).unwrap();
    let idle = cli.fails(&["status"]);
    assert!(idle.contains("[local]: max_concurrent_jobs = 0 would launch nothing, ever: use 1 or more"), "{idle}");
    fs::write(&config, good.replace("max_concurrent_jobs = 2", "max_concurrent_jobs = \"two\"")).unwrap();
    let typo = cli.fails(&["status"]);
    let line = good.lines().position(|l| l.starts_with("max_concurrent_jobs")).unwrap() + 1;
    let first = typo.lines().next().unwrap();
    assert!(first.contains(&format!("evalflow.toml: line {line}, column 23: invalid type")), "one line: {typo}");
    fs::write(&config, &good).unwrap();

    let empty = dir.path().join("empty.jsonl");
    fs::write(&empty, "\n\n").unwrap();
    let said = cli.fails(&["submit", "--manifest", empty.to_str().unwrap()]);
    assert!(said.contains("has no submissions: write one JSON object per line"), "{said}");
    let missing = dir.path().join("no-such-dir");
    let said = cli.fails(&["submit", "--id", "m", "--team", "t", missing.to_str().unwrap()]);
    assert!(said.contains("no-such-dir cannot be read (") && said.contains("check the path"), "{said}");
    assert!(!said.contains("submission.toml"), "not blamed on a missing submission.toml: {said}");

    let said = cli.fails(&["retry", "--state", "queued"]);
    assert!(said.contains("only failed or cancelled runs are retried"), "{said}");
    assert!(cli.ok(&["retry", "--state", "failed"]).contains("no run matched: nothing to retry"));
    let said = cli.fails(&["cancel", "--state", "published"]);
    assert!(said.contains("has ended already, there is nothing to stop"), "{said}");
}

#[test]
fn bulk_requests_select_by_filter_preview_and_want_confirmation() {
    let dir = tempfile::tempdir().unwrap();
    let cli = competition(&dir.path().join("c"));
    let path = submission(&dir.path().join("sub"), "command = [\"true\"]\n");
    for n in 0..12 {
        let team = if n < 3 { "alpha" } else { "beta" };
        cli.ok(&["submit", "--id", &format!("s{n}"), "--team", team, &path]);
    }
    let queued = || cli.json::<Vec<RunView>>(&["runs", "--state", "queued", "--json"]).len();

    let preview = cli.ok(&["cancel", "--team", "alpha", "--dry-run"]);
    assert!(preview.contains("s0-public: would be cancelled: then cancelled"), "{preview}");
    assert!(preview.contains("dry run: cancel would change 3 of the 3 runs matched; nothing was done"), "{preview}");
    assert_eq!(queued(), 12, "a dry run changes nothing");

    let refused = cli.fails(&["cancel", "--stage", "public"]);
    assert!(refused.contains("this would cancel 12 runs (12 matched): pass --yes to do it"), "{refused}");
    assert_eq!(queued(), 12, "not confirmed: nothing done");
    let views: Vec<ActionView> = cli.json(&["cancel", "--team", "alpha", "--json"]);
    assert_eq!(views.len(), 3, "at most the threshold: no confirmation wanted");
    assert_eq!(queued(), 9);
    let cancelled = cli.ok(&["cancel", "--stage", "public", "--state", "queued", "--yes"]);
    assert!(cancelled.contains("s11-public: cancelled: now cancelled"), "{cancelled}");
    assert_eq!(queued(), 0);

    let views: Vec<ActionView> = cli.json(&["retry", "--team", "beta", "--dry-run", "--json"]);
    assert_eq!(views.len(), 9);
    assert!(views.iter().all(|v| v.accepted && v.message == "would be requeued: then queued"), "{views:?}");
    assert!(cli.ok(&["retry", "--cause", "out_of_memory"]).contains("no run matched: nothing to retry"));
    let bogus = cli.fails(&["retry", "--cause", "bored"]);
    assert!(bogus.contains("possible values: out_of_memory, timed_out"), "{bogus}");
    assert!(cli.ok(&["retry", "--team", "alpha"]).contains("s2-public: requeued: now queued"));
    assert_eq!(queued(), 3);
}

#[test]
fn shells_complete_the_commands() {
    let cli = Cli::new("/nonexistent");
    let bash = cli.ok(&["completions", "bash"]);
    let script = tempfile::NamedTempFile::new().unwrap();
    fs::write(script.path(), &bash).unwrap();
    // bash itself loads it and completes a command and a flag.
    let check = format!(
        "source {}; COMP_WORDS=(evalflow can); COMP_CWORD=1; COMP_LINE='evalflow can'; COMP_POINT=12; \
         _evalflow evalflow can evalflow; echo \"${{COMPREPLY[@]}}\"; \
         COMP_WORDS=(evalflow cancel --dry); COMP_CWORD=2; _evalflow evalflow --dry cancel; echo \"${{COMPREPLY[@]}}\"",
        script.path().display()
    );
    let out = std::process::Command::new("bash").args(["-c", &check]).output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(said.lines().collect::<Vec<_>>(), ["cancel", "--dry-run"], "{}", String::from_utf8_lossy(&out.stderr));
    for shell in ["zsh", "fish"] {
        let script = cli.ok(&["completions", shell]);
        assert!(script.contains("reproduce") && script.contains("dry-run"), "{shell}: {script}");
    }
    assert!(cli.fails(&["completions", "tcsh"]).contains("possible values: bash"));
}

#[test]
fn a_manifest_goes_in_whole_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let cli = competition(&dir.path().join("c"));
    submission(&dir.path().join("subs/a"), "command = [\"true\"]\n");
    submission(&dir.path().join("subs/b"), "command = []\n");
    let manifest = dir.path().join("manifest.jsonl");
    let line = |id: &str, team: &str, path: &str| {
        format!("{{\"id\": \"{id}\", \"team\": \"{team}\", \"stage\": \"public\", \"path\": \"{path}\"}}\n")
    };
    let submit = |text: String| {
        fs::write(&manifest, text).unwrap();
        cli.run(&["submit", "--manifest", manifest.to_str().unwrap()])
    };
    let kept = cli.data_dir.join("submissions");
    let copies = || fs::read_dir(&kept).map_or(0, |d| d.count());

    // Line 2 is refused: line 1's copy is not kept, and the corrected manifest goes in.
    let refused = submit(format!("{}{}", line("a", "t", "subs/a"), line("b", "t", "subs/b")));
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("command must be a non-empty list"));
    assert_eq!(copies(), 0, "nothing of a refused manifest stays behind");
    // One id under two teams is refused before anything is copied.
    let two_teams = submit(format!("{}{}", line("a", "t", "subs/a"), line("a", "u", "subs/a")));
    let said = String::from_utf8_lossy(&two_teams.stderr).into_owned();
    assert!(said.contains("manifest entries 1 and 2") && said.contains("one id is one submission"), "{said}");
    assert_eq!(copies(), 0);
    // A byte-order mark, as Windows editors write, is fine.
    let accepted = submit(format!("\u{feff}{}", line("a", "t", "subs/a")));
    assert!(accepted.status.success(), "{}", String::from_utf8_lossy(&accepted.stderr));
    let runs: Vec<RunView> = cli.json(&["runs", "--json"]);
    assert_eq!(runs.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["a-public"]);
    // Then another team cannot take the id.
    let taken = submit(line("a", "u", "subs/a"));
    let said = String::from_utf8_lossy(&taken.stderr).into_owned();
    assert!(said.contains("submission a was already submitted by team t: give this one its own id"), "{said}");
}

#[test]
fn a_submit_killed_half_way_leaves_nothing_that_blocks_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let cli = competition(&dir.path().join("c"));
    let manifest = dir.path().join("manifest.jsonl");
    let mut lines = String::new();
    for i in 0..3000 {
        let sub = dir.path().join(format!("subs/s{i}"));
        submission(&sub, "command = [\"true\"]\n");
        fs::write(sub.join("weights.bin"), vec![i as u8; 32 * 1024]).unwrap();
        lines.push_str(&format!(
            "{{\"id\": \"s{i}\", \"team\": \"t\", \"stage\": \"public\", \"path\": \"{}\"}}\n",
            sub.display()
        ));
    }
    fs::write(&manifest, lines).unwrap();
    let kept = cli.data_dir.join("submissions");
    let copies = || fs::read_dir(&kept).map_or(0, |d| d.count());

    let mut submit = cli.spawn(&["submit", "--manifest", manifest.to_str().unwrap()]);
    wait_until("the submit has copied some", Duration::from_secs(60), || copies() >= 50);
    assert!(submit.try_wait().unwrap().is_none(), "the submit ended before it could be killed");
    submit.kill().unwrap();
    submit.wait().unwrap();
    let left = copies();
    assert!((50..3000).contains(&left), "{left} copies");

    // A corrected s0 (other contents) goes in: the copies of the killed submit are gone.
    fs::write(dir.path().join("subs/s0/weights.bin"), b"retrained").unwrap();
    let out = cli.run(&["submit", "--id", "s0", "--team", "t", dir.path().join("subs/s0").to_str().unwrap()]);
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{said}");
    assert!(said.contains(&format!("removed {left} copies left by a submit that did not finish")), "{said}");
    assert_eq!(copies(), 1, "only the submitted s0 is kept");
    // Kept copies of stored runs are never touched: the whole manifest now goes in.
    let views: Vec<ActionView> = cli.json(&["submit", "--manifest", manifest.to_str().unwrap(), "--json"]);
    assert!(views.iter().filter(|v| v.accepted).count() >= 2999, "{:?}", &views[..2]);
    assert_eq!(copies(), 3000);
    // A submit that died after the engine took its runs (its journal still
    // names them) leaves copies that are kept: their runs are stored.
    fs::write(cli.data_dir.join("state/submit.lock"), "s1\ns2\n").unwrap();
    let out = cli.run(&["submit", "--id", "extra", "--team", "t", dir.path().join("subs/s3").to_str().unwrap()]);
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success() && !said.contains("removed"), "{said}");
    assert_eq!(copies(), 3001);
}
