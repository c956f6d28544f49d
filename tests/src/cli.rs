//! Running the real `evalflow` binary from tests.

use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

/// The `evalflow` binary of this build (`target/<profile>/evalflow`).
pub fn evalflow_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("no current exe: {e}"));
    // Test binaries live in target/<profile>/deps.
    let profile_dir = exe.parent().and_then(Path::parent).unwrap_or_else(|| panic!("unexpected test path {exe:?}"));
    let bin = profile_dir.join("evalflow");
    assert!(
        bin.exists(),
        "{} is missing: build it first (`cargo build --bin evalflow`, as scripts/test does)",
        bin.display()
    );
    bin
}

/// The CLI on one data directory.
#[derive(Debug, Clone)]
pub struct Cli {
    /// The competition's directory.
    pub data_dir: PathBuf,
}

impl Cli {
    /// The CLI on `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Cli {
        Cli { data_dir: data_dir.into() }
    }

    /// `evalflow --data-dir DIR <args>`, not yet run.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(evalflow_bin());
        command.arg("--data-dir").arg(&self.data_dir).args(args).env("EVALFLOW_LOG", "warn");
        command
    }

    /// Runs it to its end.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap_or_else(|e| panic!("cannot run evalflow {args:?}: {e}"))
    }

    /// Runs it, expecting success; returns its standard output.
    pub fn ok(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert!(
            output.status.success(),
            "evalflow {args:?} failed ({}):\n{}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Runs it, expecting failure; returns its standard error.
    pub fn fails(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert!(!output.status.success(), "evalflow {args:?} succeeded:\n{}", String::from_utf8_lossy(&output.stdout));
        String::from_utf8_lossy(&output.stderr).into_owned()
    }

    /// Runs it with `--json` output expected, and parses it.
    pub fn json<T: DeserializeOwned>(&self, args: &[&str]) -> T {
        let stdout = self.ok(args);
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("evalflow {args:?} printed no JSON ({e}):\n{stdout}"))
    }

    /// Starts it in the background, its output discarded.
    pub fn spawn(&self, args: &[&str]) -> Process {
        let child = self.command(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn();
        Process(child.unwrap_or_else(|e| panic!("cannot start evalflow {args:?}: {e}")))
    }

    /// Starts it in the background, its standard error written to `log`.
    pub fn spawn_logged(&self, args: &[&str], log: &Path) -> Process {
        let file = std::fs::File::create(log).unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
        let child = self.command(args).stdout(Stdio::null()).stderr(file).spawn();
        Process(child.unwrap_or_else(|e| panic!("cannot start evalflow {args:?}: {e}")))
    }
}

/// A process a test started: killed when dropped, so that a failing test
/// leaves no engine or worker running behind it.
#[derive(Debug)]
pub struct Process(pub Child);

impl Deref for Process {
    type Target = Child;

    fn deref(&self) -> &Child {
        &self.0
    }
}

impl DerefMut for Process {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // Already ended, if the test stopped it: then both calls do nothing.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A competition made with `evalflow init` in `dir`, with a public stage of
/// ten files (`f0.txt`..`f9.txt`, labels alternating 0 and 1).
pub fn competition(dir: &Path) -> Cli {
    let cli = Cli::new(dir);
    cli.ok(&["init", &dir.to_string_lossy()]);
    let test = dir.join("data/public/test");
    let mut labels = String::from("filename,label\n");
    for i in 0..10 {
        let file = test.join(format!("f{i}.txt"));
        std::fs::write(&file, format!("{i}\n")).unwrap_or_else(|e| panic!("cannot write {}: {e}", file.display()));
        labels.push_str(&format!("f{i}.txt,{}\n", i % 2));
    }
    let labels_file = dir.join("data/public/labels.csv");
    std::fs::write(&labels_file, labels).unwrap_or_else(|e| panic!("cannot write {}: {e}", labels_file.display()));
    cli
}

/// Polls `check` every 100 ms until it holds, failing the test after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting until {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
