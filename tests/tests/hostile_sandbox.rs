//! The hostile-submission battery for the local runner: each probe is a
//! submission that tries one way to win, to crash the engine or to read its
//! way out, and each test asserts that the boundary holds.
//!
//! | class | probes |
//! |---|---|
//! | the scoring boundary | a link to the labels (absolute, relative), to a rival's predictions, to the engine's environment; a FIFO; a hard link; a directory; predictions over the cap |
//! | what the sandbox inherits | the engine's environment (also at `/proc/1/environ`), its fds, its keyring, its refusal of huge pages; denied system calls; threads still work |
//! | limits | more files than allowed, paths deeper than a walk follows, a program that ignores `EFBIG`, the grace period of a stop, the size of a submission |
//! | tenants | a uid per job, the kept submission unchangeable from its job, a private data directory, a private parent refused up front |
//! | two competitions | the same run ids in two data directories at once |

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use evalflow_tests::cli::{Cli, Process, evalflow_bin, wait_until};
use evalflow_tests::local::{competition, run_view, submit, wait_ended};
use evalflow_workflow::StateTag;

/// A value only the engine's environment holds.
const SECRET: &str = "hunter2-only-the-engine-knows";

/// `serve`, started through a shell that leaves fd 7 open on a file of
/// the engine's (next to the data directory) and with the secret in its
/// environment.
fn serve(cli: &Cli) -> Process {
    let inherited = cli.data_dir.with_extension("inherited");
    fs::write(&inherited, "an fd of the engine's").unwrap();
    let child = Command::new("sh")
        .args(["-c", "exec 7<\"$0\"; exec \"$@\""])
        .arg(&inherited)
        .arg(evalflow_bin())
        .arg("--data-dir")
        .arg(&cli.data_dir)
        .arg("serve")
        .env("EVALFLOW_LOG", "warn")
        .env("HOSTILE_SECRET", SECRET)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let process = Process(child);
    let info = cli.data_dir.join("state/engine.json");
    wait_until("the engine announces its API", Duration::from_secs(30), || info.exists());
    process
}

/// Failed as invalid predictions, for a reason that says `why` and quotes
/// nothing the submission could not read.
fn assert_refused(cli: &Cli, id: &str, why: &str) {
    let run = run_view(cli, id);
    assert_eq!((run.state, run.failure.as_deref()), (StateTag::Failed, Some("invalid_predictions")), "{id}: {run:?}");
    let reason = run.reason.unwrap_or_default();
    assert!(reason.contains(why), "{id}: {reason}");
    for secret in [SECRET, "filename,label\nf0.txt,0", "f1.txt,1"] {
        assert!(!reason.contains(secret), "{id} quotes what it may not read: {reason}");
    }
}

#[test]
fn predictions_are_read_beneath_the_job_through_no_link_and_capped() {
    let dir = tempfile::tempdir().unwrap();
    let cli = competition(&dir.path().join("c"));
    let mut engine = serve(&cli);
    let labels = cli.data_dir.join("data/public/labels.csv");
    let subs = dir.path().join("subs");
    let probes: [(&str, String); 9] = [
        ("victim", "halves()".into()),
        ("link-abs", format!("os.symlink({:?}, CSV)", labels.display().to_string())),
        ("link-rel", "os.symlink('../../../data/public/labels.csv', CSV)".into()),
        ("link-rival", "os.symlink('../../ef-victim-public-a1/output/submission.csv', CSV)".into()),
        ("link-environ", "os.symlink('/proc/1/environ', CSV)".into()),
        ("fifo", "os.mkfifo(CSV)".into()),
        ("hardlink", "halves(os.path.join(OUT, 'real.csv'))\nos.link(os.path.join(OUT, 'real.csv'), CSV)".into()),
        ("directory", "os.mkdir(CSV)".into()),
        ("too-big", "halves()\nopen(CSV, 'a').write('x' * (17 << 20))".into()),
    ];
    for (id, program) in &probes {
        submit(&cli, &subs, id, program);
    }
    let ids: Vec<&str> = probes.iter().map(|(id, _)| *id).collect();
    wait_ended(&cli, &ids, Duration::from_secs(180));

    let victim = run_view(&cli, "victim");
    assert_eq!((victim.state, victim.score), (StateTag::Published, Some(std::f64::consts::LN_2)));
    for id in ["link-abs", "link-rel", "link-rival", "link-environ"] {
        assert_refused(&cli, id, "submission.csv is a symbolic link");
    }
    assert_refused(&cli, "fifo", "submission.csv is not a regular file");
    assert_refused(&cli, "directory", "submission.csv is not a regular file");
    assert_refused(&cli, "hardlink", "submission.csv has other hard links");
    assert_refused(&cli, "too-big", "submission.csv has more than 16777216 bytes");
    let board = cli.ok(&["leaderboard"]);
    assert!(board.contains("victim") && !board.contains("link-"), "only the victim is ranked:\n{board}");

    // No scorer thread is stuck on the FIFO: the engine stops on SIGTERM.
    assert!(Command::new("kill").args(["-TERM", &engine.id().to_string()]).status().unwrap().success());
    wait_until("serve stops on SIGTERM", Duration::from_secs(30), || engine.try_wait().unwrap().is_some());
    assert!(engine.wait().unwrap().success());
}

/// The inheritance probe: what it can see of the engine, line by line.
const INHERIT: &str = r#"
found = []
for pid in ("1", "self"):
    try:
        if b"hunter2" in open("/proc/%s/environ" % pid, "rb").read():
            found.append("secret in /proc/%s/environ" % pid)
    except OSError:
        pass
for fd in range(3, 1024):
    try:
        os.fstat(fd)
        found.append("fd %d open: %s" % (fd, os.readlink("/proc/self/fd/%d" % fd)))
    except OSError:
        pass
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def denied(name, *args):
    result = libc.syscall(*[ctypes.c_long(a) for a in args])
    errno = ctypes.get_errno()
    print("%s: %s" % (name, "denied" if result == -1 and errno == 1 else "ALLOWED (%d, errno %d)" % (result, errno)))
denied("keyctl", 250, 0, -3, 0)          # KEYCTL_GET_KEYRING_ID of the session keyring
denied("add_key", 248, 0, 0, 0, 0, 0)
denied("request_key", 249, 0, 0, 0, 0)
denied("unshare-user", 272, 0x10000000)  # CLONE_NEWUSER
denied("unshare-net", 272, 0x40000000)
denied("clone-newuser", 56, 0x10000000 | 17, 0, 0, 0, 0)
denied("io_uring_setup", 425, 1, 0)
denied("bpf", 321, 0, 0, 0)
denied("perf_event_open", 298, 0, 0, -1, -1, 0)
denied("ptrace", 101, 0, 0, 0, 0)       # PTRACE_TRACEME
denied("mount", 165, 0, 0, 0, 0, 0)
denied("setns", 308, 0, 0)
result = []
t = threading.Thread(target=lambda: result.append("thread ran"))
t.start(); t.join()
print(result[0] if result else "THREAD FAILED")
print("pid %d in a fork: %s" % (os.getpid(), "ok" if os.fork() or os._exit(0) else ""))
print("\n".join(found) if found else "nothing inherited")
# The engine runs without transparent huge pages; the job gets the machine's default.
thp = [line.split()[1] for line in open("/proc/self/status") if line.startswith("THP_enabled:")]
print("huge pages allowed" if thp == ["1"] else "huge pages: %s" % thp)
halves()
"#;

#[test]
fn the_sandbox_inherits_nothing_and_its_system_calls_are_filtered() {
    let dir = tempfile::tempdir().unwrap();
    let cli = competition(&dir.path().join("c"));
    let _engine = serve(&cli);
    submit(&cli, &dir.path().join("subs"), "inherit", INHERIT);
    wait_ended(&cli, &["inherit"], Duration::from_secs(60));
    let run = run_view(&cli, "inherit");
    let logs = cli.ok(&["logs", "inherit-public"]);
    assert_eq!(run.state, StateTag::Published, "{run:?}\n{logs}");
    assert!(logs.contains("nothing inherited"), "{logs}");
    assert!(!logs.contains("hunter2") && !logs.contains("ALLOWED"), "{logs}");
    for call in ["keyctl", "add_key", "request_key", "unshare-user", "clone-newuser", "io_uring_setup", "bpf"] {
        assert!(logs.contains(&format!("{call}: denied")), "{call}: {logs}");
    }
    for call in ["perf_event_open", "ptrace", "mount", "setns", "unshare-net"] {
        assert!(logs.contains(&format!("{call}: denied")), "{call}: {logs}");
    }
    assert!(logs.contains("thread ran") && logs.contains("in a fork: ok"), "{logs}");
    // Where this kernel has them and this test may get them (THP_enabled: 1).
    let status = fs::read_to_string("/proc/self/status").unwrap();
    if status.lines().any(|line| line.split_whitespace().eq(["THP_enabled:", "1"])) {
        assert!(logs.contains("huge pages allowed"), "{logs}");
    }
}

#[test]
fn limits_have_no_blind_spots_and_a_stop_gives_its_grace() {
    let dir = tempfile::tempdir().unwrap();
    let cli = competition(&dir.path().join("c"));
    let _engine = serve(&cli);
    let subs = dir.path().join("subs");
    let many = "for i in range(3000):\n    open(os.path.join(OUT, 'f%d' % i), 'w').close()\nhalves()\ntime.sleep(5)";
    let deep = "halves()\nos.chdir(OUT)\nfor i in range(80):\n    os.mkdir('d' * 200)\n    os.chdir('d' * 200)\n\
                open('big', 'wb').write(b'x' * (8 << 20))\ntime.sleep(5)";
    let efbig = "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\nf = open(os.path.join(OUT, 'big'), 'wb')\n\
                 for i in range(80):\n    try:\n        f.write(b'x' * (1 << 20)); f.flush()\n    except OSError:\n        pass\n\
                 halves()";
    let graceful = "def stop(*_):\n    print('graceful stop', flush=True)\n    sys.exit(0)\n\
                    signal.signal(signal.SIGTERM, stop)\nprint('running', flush=True)\ntime.sleep(600)";
    for (id, program) in [("many", many), ("deep", deep), ("efbig", efbig), ("graceful", graceful)] {
        submit(&cli, &subs, id, program);
    }
    wait_ended(&cli, &["many", "deep", "efbig"], Duration::from_secs(120));
    for id in ["many", "deep", "efbig"] {
        let run = run_view(&cli, id);
        assert_eq!(run.failure.as_deref(), Some("limit_exceeded"), "{id}: {run:?}\n{}", logs(&cli, id));
    }
    assert!(logs(&cli, "many").contains("it made more than 2000 files and directories"));
    assert!(logs(&cli, "deep").contains("counts as over the limit"), "{}", logs(&cli, "deep"));

    wait_until("the graceful probe runs", Duration::from_secs(60), || logs(&cli, "graceful").contains("running"));
    cli.ok(&["cancel", "graceful-public"]);
    assert!(
        logs(&cli, "graceful").contains("graceful stop"),
        "SIGTERM reached the program: {}",
        logs(&cli, "graceful")
    );

    // A submission over the size cap is refused at submit time, and leaves nothing behind.
    let big = subs.join("big");
    fs::create_dir_all(&big).unwrap();
    fs::write(big.join("submission.toml"), "command = [\"true\"]\n").unwrap();
    fs::write(big.join("weights.bin"), vec![0_u8; 2 << 20]).unwrap();
    let err = cli.fails(&["submit", "--id", "big", "--team", "big", big.to_str().unwrap()]);
    assert!(err.contains("more than the 1 MiB a submission may take"), "{err}");
    let kept: Vec<_> =
        fs::read_dir(cli.data_dir.join("submissions")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(!kept.iter().any(|n| n == "big" || n.to_string_lossy().starts_with(".new-big-")), "{kept:?}");
}

fn logs(cli: &Cli, id: &str) -> String {
    cli.ok(&["logs", &format!("{id}-public")])
}

/// Tries to change the submission's own files in its scratch directory, then replaces one.
const TAMPER: &str = r#"
tries = [
    ("append", lambda: open("main.py", "a").write("x")),
    ("chmod", lambda: os.chmod("main.py", 0o777)),
    ("truncate", lambda: os.truncate("main.py", 0)),
    ("utime", lambda: os.utime("main.py", (0, 0))),
    ("chown", lambda: os.chown("main.py", os.getuid(), os.getgid())),
]
for how, act in tries:
    try:
        act()
        print("%s: CHANGED" % how)
    except OSError:
        print("%s: refused" % how)
os.remove("main.py")
open("main.py", "w").write("replaced")
print("replaced: " + open("main.py").read())
halves()
"#;

#[test]
fn tenants_are_apart_on_the_host_and_a_private_parent_is_refused_up_front() {
    let dir = tempfile::tempdir().unwrap();
    let cli = competition(&dir.path().join("c"));
    let engine = serve(&cli);
    let subs = dir.path().join("subs");
    for id in ["one", "two", "three"] {
        submit(&cli, &subs, id, "halves()\ntime.sleep(2)");
    }
    submit(&cli, &subs, "tamper", TAMPER);
    wait_ended(&cli, &["one", "two", "three", "tamper"], Duration::from_secs(60));
    drop(engine);
    // The scratch directory's files are the kept copy's, linked: the job
    // may replace them, never change them.
    let logs = logs(&cli, "tamper");
    for how in ["append", "chmod", "truncate", "utime", "chown"] {
        assert!(logs.contains(&format!("{how}: refused")), "{how}: {logs}");
    }
    assert!(!logs.contains("CHANGED") && logs.contains("replaced: replaced"), "{logs}");
    let kept = fs::read_to_string(cli.data_dir.join("submissions/tamper/main.py")).unwrap();
    assert_eq!(kept, fs::read_to_string(subs.join("tamper/main.py")).unwrap(), "the kept copy is unchanged");
    let mode = |path: &Path| fs::metadata(path).unwrap().permissions().mode() & 0o777;
    let data = &cli.data_dir;
    assert_eq!(mode(data), 0o711, "nobody else lists the data directory");
    assert_eq!(mode(&data.join("data/public/labels.csv")), 0o600);
    for private in ["state", "submissions", "results", "leaderboard"] {
        assert_eq!(mode(&data.join(private)), 0o700, "{private}");
    }
    let mut uids = std::collections::BTreeSet::new();
    for id in ["one", "two", "three"] {
        let job = data.join(format!("jobs/ef-{id}-public-a1"));
        assert_eq!(mode(&job.join("output")), 0o700, "{id}");
        assert_eq!(mode(&job.join("stdout.log")), 0o600, "{id}");
        uids.insert(fs::metadata(job.join("output")).unwrap().uid());
    }
    assert_eq!(uids.len(), 3, "each job ran as a uid of its own: {uids:?}");
    assert!(!uids.contains(&0) && !uids.contains(&65534), "{uids:?}");

    let parent = dir.path().join("private-parent");
    fs::create_dir_all(&parent).unwrap();
    let hidden = competition(&parent.join("c"));
    fs::set_permissions(&parent, fs::Permissions::from_mode(0o700)).unwrap();
    let err = hidden.fails(&["serve"]);
    let shown = parent.display().to_string();
    assert!(err.contains(&format!("{shown} is mode 700")) && err.contains(&format!("chmod o+x {shown}")), "{err}");
}

#[test]
fn two_competitions_with_the_same_run_ids_do_not_touch_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (competition(&dir.path().join("a")), competition(&dir.path().join("b")));
    let (_serve_a, _serve_b) = (serve(&a), serve(&b));
    for cli in [&a, &b] {
        submit(cli, &dir.path().join("subs"), "twin", "time.sleep(4)\nhalves()");
    }
    for cli in [&a, &b] {
        wait_ended(cli, &["twin"], Duration::from_secs(60));
        let run = run_view(cli, "twin");
        assert_eq!((run.state, run.attempts), (StateTag::Published, 1), "{run:?}");
    }
    let find =
        Command::new("find").args(["/sys/fs/cgroup", "-maxdepth", "6", "-name", "*-ef-twin-*"]).output().unwrap();
    let leftovers = String::from_utf8_lossy(&find.stdout);
    assert!(leftovers.trim().is_empty(), "job cgroups left behind:\n{leftovers}");
}
