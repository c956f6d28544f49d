//! A local competition for end-to-end tests: a public stage of ten files,
//! Python submissions, and what their runs became.

use std::fs;
use std::path::Path;
use std::time::Duration;

use evalflow_worker::views::RunView;

use crate::cli::{Cli, Process, wait_until};

/// A competition in `dir` with a public stage of ten files and tight local
/// limits: 4 jobs at once, 64 MiB and 2,000 files a job, 1 MiB submissions.
pub fn competition(dir: &Path) -> Cli {
    let cli = crate::cli::competition(dir);
    let config = fs::read_to_string(dir.join("evalflow.toml")).unwrap();
    let config = config
        .replace("max_concurrent_jobs = 2", "max_concurrent_jobs = 4")
        .replace("disk_max_mib = 256", "disk_max_mib = 64\nfiles_max = 2000\nsubmission_max_mib = 1");
    fs::write(dir.join("evalflow.toml"), config).unwrap();
    cli
}

/// `serve` on `cli`'s competition, once it has announced its API.
pub fn serve(cli: &Cli) -> Process {
    let engine = cli.spawn(&["serve"]);
    let info = cli.data_dir.join("state/engine.json");
    wait_until("the engine announces its API", Duration::from_secs(30), || info.exists());
    engine
}

/// Submits `program` (after [`PRELUDE`]) as `main.py` of submission `id`.
pub fn submit(cli: &Cli, root: &Path, id: &str, program: &str) {
    let dir = root.join(id);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("submission.toml"), "command = [\"python3\", \"main.py\"]\n").unwrap();
    fs::write(dir.join("main.py"), format!("{PRELUDE}\n{program}")).unwrap();
    cli.ok(&["submit", "--id", id, "--team", id, dir.to_str().unwrap()]);
}

/// What every test submission starts with: `OUT`, `CSV` and `halves()`,
/// which writes 0.5 for every test file.
pub const PRELUDE: &str = r#"
import ctypes, os, signal, sys, threading, time
OUT = os.environ["EVALFLOW_OUTPUT_DIR"]
CSV = os.path.join(OUT, "submission.csv")
def halves(path=CSV):
    with open(path, "w") as f:
        f.write("filename,label\n")
        for n in sorted(os.listdir(os.environ["EVALFLOW_INPUT_DIR"])):
            f.write("%s,0.5\n" % n)
"#;

/// Every run, as `runs --json` shows it.
pub fn runs(cli: &Cli) -> Vec<RunView> {
    cli.json(&["runs", "--json"])
}

/// The public run of submission `id`.
pub fn run_view(cli: &Cli, id: &str) -> RunView {
    let run = format!("{id}-public");
    runs(cli).into_iter().find(|r| r.id.as_str() == run).unwrap_or_else(|| panic!("no run {run}"))
}

/// Waits until the public runs of `ids` have ended.
pub fn wait_ended(cli: &Cli, ids: &[&str], timeout: Duration) {
    wait_until("the probes end", timeout, || {
        let runs = runs(cli);
        ids.iter().all(|id| runs.iter().any(|r| r.id.as_str() == format!("{id}-public") && r.state.is_terminal()))
    });
}
