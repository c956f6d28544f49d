//! The hostile-submission battery, the API's part: a local user without the
//! token, a web page reaching loopback through DNS rebinding, a forged submit
//! (a host path, a digest that lies, a date in the future) and slow clients
//! holding connections all get nothing from `evalflow serve`, while the CLI
//! goes on working through it.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use evalflow_activities::fsutil::dir_digest;
use evalflow_tests::cli::{Cli, Process, competition, wait_until};
use evalflow_worker::config::Config;
use evalflow_worker::datadir::lock::EngineInfo;
use evalflow_worker::datadir::submit::{SubmissionRequest, prepare};
use evalflow_worker::views::{RunView, StatusView};
use evalflow_workflow::{RunSpec, Stage, SubmissionId, SubmissionSource, TeamId, Timestamp};

/// Every route of the API (`worker/src/api.rs`), and paths it does not have.
const ROUTES: &[(&str, &str, &str)] = &[
    ("GET", "/v1/ping", ""),
    ("GET", "/v1/status", ""),
    ("GET", "/v1/runs", ""),
    ("GET", "/v1/runs?state=failed", ""),
    ("GET", "/v1/runs/x-public", ""),
    ("GET", "/v1/runs/x-public/stopping", ""),
    ("GET", "/v1/runs/x-public/history", ""),
    ("POST", "/v1/replay", "{}"),
    ("POST", "/v1/submit", "[]"),
    ("POST", "/v1/teams", r#"{"submissions": []}"#),
    ("POST", "/v1/cancel", r#"{"selection": {"matching": {"state": "running"}}}"#),
    ("POST", "/v1/retry", r#"{"selection": {"matching": {"state": "failed"}}, "dry_run": true}"#),
    ("POST", "/v1/reload", "{}"),
    ("GET", "/v1/leaderboard?stage=public", ""),
    ("GET", "/v1/cost", ""),
    ("GET", "/metrics", ""),
    ("GET", "/dashboard", ""),
    ("GET", "/dashboard/dashboard.js", ""),
    ("GET", "/v1/runs/x-public/log", ""),
    ("POST", "/v1/backup", r#"{"dest": "/nonexistent/backup"}"#),
    ("GET", "/", ""),
    ("GET", "/v1/no-such-route", ""),
    ("DELETE", "/v1/runs", ""),
];

/// `evalflow serve` on a competition, with what a client needs.
struct Engine {
    cli: Cli,
    port: u16,
    token: String,
    _serve: Process,
    _dir: tempfile::TempDir,
}

/// Serves a new competition whose `evalflow.toml` ends with `extra`.
fn serve(extra: &str) -> Engine {
    let dir = tempfile::tempdir().unwrap();
    let cli = competition(&dir.path().join("competition"));
    let config = cli.data_dir.join("evalflow.toml");
    fs::write(&config, format!("{}\n{extra}\n", fs::read_to_string(&config).unwrap())).unwrap();
    let serve = cli.spawn_logged(&["serve"], &dir.path().join("serve.log"));
    let info_path = cli.data_dir.join("state/engine.json");
    wait_until("the engine announces its API", Duration::from_secs(30), || info_path.exists());
    let info: EngineInfo = serde_json::from_slice(&fs::read(&info_path).unwrap()).unwrap();
    let port = info.api.rsplit(':').next().unwrap().parse().unwrap();
    let token = fs::read_to_string(cli.data_dir.join("state/api.token")).unwrap().trim().to_owned();
    Engine { cli, port, token, _serve: serve, _dir: dir }
}

/// An answer: its status code and body.
struct Answer {
    status: u16,
    body: String,
}

impl Engine {
    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn connect(&self) -> TcpStream {
        let stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        stream
    }

    /// Sends one request with exactly these headers (and a body's), on a
    /// connection of its own.
    fn raw(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Answer {
        let mut request = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        if !body.is_empty() {
            request.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
        }
        request.push_str("\r\n");
        request.push_str(body);
        let mut stream = self.connect();
        stream.write_all(request.as_bytes()).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let status = response.split(' ').nth(1).and_then(|code| code.parse().ok());
        let status = status.unwrap_or_else(|| panic!("{method} {path}: not an HTTP answer: {response:?}"));
        let body = response.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default();
        Answer { status, body }
    }

    /// Sends a request as the CLI does: this engine's host, the token.
    fn call(&self, method: &str, path: &str, body: &str) -> Answer {
        let bearer = format!("Bearer {}", self.token);
        self.raw(method, path, &[("Host", &self.host()), ("Authorization", &bearer)], body)
    }

    fn submit(&self, specs: &[RunSpec]) -> Answer {
        self.call("POST", "/v1/submit", &serde_json::to_string(specs).unwrap())
    }

    fn runs(&self) -> Vec<RunView> {
        let answer = self.call("GET", "/v1/runs", "");
        assert_eq!(answer.status, 200, "{}", answer.body);
        serde_json::from_str(&answer.body).unwrap()
    }
}

#[test]
fn every_route_wants_the_token_and_this_engines_host() {
    let engine = serve("");
    let host = engine.host();
    let mut wrong = engine.token.clone().into_bytes();
    wrong[63] = if wrong[63] == b'0' { b'1' } else { b'0' };
    let wrong = format!("Bearer {}", String::from_utf8(wrong).unwrap());
    let bare = engine.token.clone();
    let right = format!("Bearer {}", engine.token);
    let evil = format!("evil.example:{}", engine.port);
    for &(method, path, body) in ROUTES {
        let refused = [
            ("no token", vec![("Host", host.as_str())], 401),
            ("a wrong token", vec![("Host", &host), ("Authorization", &wrong)], 401),
            ("the token without `Bearer`", vec![("Host", &host), ("Authorization", &bare)], 401),
            ("another host", vec![("Host", &evil), ("Authorization", &right)], 421),
            ("no host", vec![("Authorization", right.as_str())], 421),
        ];
        for (what, headers, expected) in refused {
            let answer = engine.raw(method, path, &headers, body);
            assert_eq!(answer.status, expected, "{method} {path} with {what}: {}", answer.body);
            let error: serde_json::Value = serde_json::from_str(&answer.body).unwrap();
            let error = error["error"].as_str().unwrap_or_else(|| panic!("{method} {path}: {}", answer.body));
            if expected == 401 {
                assert!(
                    error.contains("state/api.token"),
                    "{method} {path}: the error says where the token is: {error}"
                );
            }
        }
    }
    let by_name = format!("localhost:{}", engine.port);
    let answer = engine.raw("GET", "/v1/ping", &[("Host", &by_name), ("Authorization", &right)], "");
    assert_eq!((answer.status, answer.body.as_str()), (200, "\"pong\""), "localhost names this engine too");
    assert_eq!(engine.call("GET", "/v1/no-such-route", "").status, 404);

    // The dashboard's cookie is the token for reads only: a page that got a
    // browser to post with it acts on nothing.
    let cookie = format!("evalflow_token={}", engine.token);
    let read = engine.raw("GET", "/v1/status", &[("Host", &host), ("Cookie", &cookie)], "");
    assert_eq!(read.status, 200, "{}", read.body);
    let body = r#"{"selection": {"matching": {"state": "queued"}}}"#;
    let act = engine.raw("POST", "/v1/cancel", &[("Host", &host), ("Cookie", &cookie)], body);
    assert_eq!(act.status, 401, "{}", act.body);
    let signed = engine.raw("GET", &format!("/dashboard?token={}", engine.token), &[("Host", &host)], "");
    assert_eq!(signed.status, 303, "the sign-in sends the browser on: {}", signed.body);
    let wrong = engine.raw("GET", "/dashboard?token=0123", &[("Host", &host)], "");
    assert_eq!(wrong.status, 401, "{}", wrong.body);

    // A bulk request that would select every run, or by a cause that does not exist, is refused.
    let everything = engine.call("POST", "/v1/cancel", r#"{"selection": {"matching": {}}}"#);
    assert_eq!(everything.status, 400, "{}", everything.body);
    assert!(everything.body.contains("an empty filter would select every run"), "{}", everything.body);
    let bogus = engine.call("POST", "/v1/retry", r#"{"selection": {"matching": {"cause": "../x"}}}"#);
    assert!(bogus.status == 400 && bogus.body.contains("use one of out_of_memory"), "{}", bogus.body);
    let unknown = engine.call("POST", "/v1/cancel", r#"{"selection": {"matching": {"owner": "me"}}}"#);
    assert_eq!(unknown.status, 422, "an unknown field is refused, not ignored: {}", unknown.body);
    assert!(unknown.body.contains("unknown field `owner`"), "{}", unknown.body);
}

/// A submission directory `root/id` that sleeps for no time.
fn submission(root: &Path, id: &str) -> std::path::PathBuf {
    let dir = root.join(id);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("submission.toml"), "command = [\"sleep\", \"0\"]\n").unwrap();
    dir
}

/// The spec `evalflow submit` would send for directory `path`.
fn prepared(cli: &Cli, id: &str, path: &Path) -> RunSpec {
    let request = SubmissionRequest {
        id: SubmissionId::new(id).unwrap(),
        team: TeamId::new("team").unwrap(),
        stage: Stage::Public,
        path: Some(path.to_owned()),
        image: None,
        cpu_only: false,
    };
    prepare(&Config::load(&cli.data_dir).unwrap(), &request, Timestamp::now()).unwrap()
}

#[test]
fn a_submit_takes_only_what_was_prepared_in_the_data_directory() {
    let engine = serve("");
    let subs = engine.cli.data_dir.parent().unwrap().join("subs");
    let genuine = prepared(&engine.cli, "genuine", &submission(&subs, "genuine"));
    let public = engine.cli.data_dir.join("data/public");
    let host_path = SubmissionSource::Directory {
        path: public.display().to_string(),
        digest: dir_digest(&public, u64::MAX).unwrap(),
    };
    let mut forgeries = Vec::new();
    forgeries.push(("a host directory", RunSpec { source: host_path, ..genuine.clone() }, "not"));
    let mut lying = genuine.clone();
    let SubmissionSource::Directory { digest, .. } = &mut lying.source else { panic!("a directory") };
    digest.replace_range(0..4, if digest.starts_with("0000") { "1111" } else { "0000" });
    forgeries.push(("an altered digest", lying, "is not that of the contents"));
    let future = RunSpec { submitted_at: Timestamp::now().plus_secs(3600), ..genuine.clone() };
    forgeries.push(("a date an hour ahead", future, "ahead of this engine's clock"));
    let other = prepared(&engine.cli, "other", &submission(&subs, "other"));
    forgeries.push(("another submission's directory", RunSpec { source: other.source, ..genuine.clone() }, "not"));
    let audit = genuine.audit(1, Timestamp::now()).unwrap();
    forgeries.push(("an audit of a run never published", audit, "it audits genuine-public, which does not exist"));
    for (what, forged, problem) in forgeries {
        // With a genuine spec in the batch: the whole batch is refused.
        let answer = engine.submit(&[genuine.clone(), forged]);
        assert_eq!(answer.status, 400, "{what}: {}", answer.body);
        assert!(answer.body.contains("genuine-public") && answer.body.contains(problem), "{what}: {}", answer.body);
    }
    assert!(engine.runs().is_empty(), "nothing was submitted");

    let answer = engine.submit(std::slice::from_ref(&genuine));
    assert_eq!(answer.status, 200, "the spec as prepared is taken: {}", answer.body);
    let path = submission(&subs, "through-cli");
    engine.cli.ok(&["submit", "--id", "through-cli", "--team", "t", path.to_str().unwrap()]);
    let status: StatusView = engine.cli.json(&["status", "--json"]);
    assert!(status.engine.is_some(), "the CLI went through the API");
    assert_eq!(status.progress.whole.total, 2, "{status:?}");
    // A submit checks its ids' teams, and only theirs, through the API.
    let teams = engine.call("POST", "/v1/teams", r#"{"submissions": ["through-cli", "nobody"]}"#);
    assert_eq!((teams.status, teams.body.as_str()), (200, r#"{"through-cli":"t"}"#));
    let taken = engine.cli.fails(&["submit", "--id", "through-cli", "--team", "u", path.to_str().unwrap()]);
    assert!(taken.contains("already submitted by team t"), "{taken}");
}

#[test]
fn slow_and_idle_connections_are_closed_and_bounded() {
    let limits = "header_read_timeout_secs = 2\nconnections_max = 2\nrequest_timeout_secs = 1\nbody_max_mib = 1";
    let engine = serve(&format!("[api]\n{limits}\n"));
    // Half a header, then nothing.
    let mut slow = engine.connect();
    let started = Instant::now();
    slow.write_all(format!("GET /v1/ping HTTP/1.1\r\nHost: {}\r\nAuthoriz", engine.host()).as_bytes()).unwrap();
    let mut idle = engine.connect();
    // Keeps both slots: a third connection waits for one of them to go.
    let answer = engine.call("GET", "/v1/ping", "");
    let waited = started.elapsed();
    assert_eq!(answer.status, 200);
    assert!(waited >= Duration::from_millis(1500), "served at once ({waited:?}): no cap on connections");
    for (what, stream) in [("half a header", &mut slow), ("an idle connection", &mut idle)] {
        let mut rest = Vec::new();
        let read = stream.read_to_end(&mut rest);
        let closed_after = started.elapsed();
        assert!(read.is_ok(), "{what}: still open after {closed_after:?}: {read:?}");
        assert!(closed_after < Duration::from_secs(6), "{what}: closed only after {closed_after:?}");
    }

    // A body larger than the limit is refused before it is read; one sent
    // too slowly runs out of time.
    let bearer = format!("Bearer {}", engine.token);
    let headers = [
        ("Host", engine.host()),
        ("Authorization", bearer),
        ("Content-Type", "application/json".into()),
        ("Content-Length", format!("{}", 2 << 20)),
    ];
    let headers: Vec<_> = headers.iter().map(|(name, value)| (*name, value.as_str())).collect();
    let answer = engine.raw("POST", "/v1/submit", &headers, "");
    assert_eq!(answer.status, 413, "{}", answer.body);
    let mut trickle = engine.connect();
    let started = Instant::now();
    let head = format!(
        "POST /v1/submit HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 10\r\n\r\n[",
        engine.host(),
        engine.token
    );
    trickle.write_all(head.as_bytes()).unwrap();
    let mut answer = String::new();
    trickle.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(5), "answered after {:?}", started.elapsed());

    // A kept-alive connection is closed once it idles that long after an answer.
    let mut kept = engine.connect();
    let request =
        format!("GET /v1/ping HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\r\n", engine.host(), engine.token);
    kept.write_all(request.as_bytes()).unwrap();
    let mut answer = [0; 512];
    let read = kept.read(&mut answer).unwrap();
    assert!(String::from_utf8_lossy(&answer[..read]).starts_with("HTTP/1.1 200"));
    let answered = Instant::now();
    let mut rest = Vec::new();
    kept.read_to_end(&mut rest).unwrap();
    assert!(answered.elapsed() < Duration::from_secs(5), "idle for {:?}", answered.elapsed());
}

#[test]
fn a_token_file_others_can_read_is_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let cli = competition(&dir.path().join("competition"));
    let token = cli.data_dir.join("state/api.token");
    fs::create_dir_all(token.parent().unwrap()).unwrap();
    fs::write(&token, format!("{}\n", "ab".repeat(32))).unwrap();
    fs::set_permissions(&token, fs::Permissions::from_mode(0o644)).unwrap();
    let log = dir.path().join("serve.log");
    let mut serve = cli.spawn_logged(&["serve"], &log);
    wait_until("serve refuses to start", Duration::from_secs(30), || serve.try_wait().unwrap().is_some());
    assert!(!serve.wait().unwrap().success());
    let err = fs::read_to_string(&log).unwrap();
    assert!(err.contains(&format!("run `chmod 600 {}`", token.display())), "{err}");
    assert!(!cli.data_dir.join("state/engine.json").exists(), "the engine did not announce itself");
}
