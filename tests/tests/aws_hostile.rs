//! Hostile jobs on AWS (moto): every job may write under `outputs/` and every
//! run id is public, so the location a job is told must not be derivable
//! from its run and attempt; a rival's write where it used to be changes no
//! score; and an oversized `submission.csv` is refused after a bounded read.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::interceptors::context::{
    BeforeDeserializationInterceptorContextMut, BeforeTransmitInterceptorContextRef,
};
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;
use evalflow_activities::aws::s3::{S3Artifacts, S3Location};
use evalflow_activities::scoring::{self, Rejection};
use evalflow_activities::{ArtifactStore, LaunchRequest, Predictions};
use evalflow_tests::aws::{AwsCompetition, Tuning};
use evalflow_worker::aws::connect;
use evalflow_worker::config::Config;
use evalflow_workflow::{
    Attempt, ProfileName, RunId, RunSpec, Stage, SubmissionId, SubmissionSource, TeamId, Timestamp,
};

const TUNING: Tuning = Tuning { visibility_timeout_secs: 30, reconcile_after_secs: 3600, resend_after_secs: 900 };

fn run() -> RunId {
    RunId::parse("sub1-public").unwrap()
}

fn launch_request(config: &Config) -> LaunchRequest {
    let spec = RunSpec::new(
        SubmissionId::new("sub1").unwrap(),
        TeamId::new("team1").unwrap(),
        Stage::Public,
        false,
        SubmissionSource::Image { uri: "registry.example/team1:1".into() },
        Timestamp::now(),
    );
    let profile = config.policy.profile(&ProfileName::new("g4").unwrap()).unwrap().clone();
    LaunchRequest { spec, attempt: Attempt(1), profile, time_limit_secs: 600 }
}

/// The environment variable `name` the job `id` was given, as moto keeps it.
async fn job_env(competition: &AwsCompetition, id: &str, name: &str) -> String {
    let described = competition.moto.batch().await.describe_jobs().jobs(id).send().await.unwrap();
    let container = described.jobs()[0].container().unwrap();
    let env = container.environment().iter().find(|kv| kv.name() == Some(name));
    env.and_then(|kv| kv.value()).unwrap_or_else(|| panic!("job {id} has no {name}: {container:?}")).to_owned()
}

/// S3 artifacts of `competition` with the output key of its data directory,
/// on a client with `interceptor`.
async fn artifacts(competition: &AwsCompetition, interceptor: impl Intercept + 'static) -> S3Artifacts {
    let sdk = competition.moto.sdk().await;
    let config = aws_sdk_s3::config::Builder::from(&sdk).force_path_style(true).interceptor(interceptor).build();
    let labels = BTreeMap::from([(
        Stage::Public,
        S3Location { bucket: format!("{}-labels", competition.prefix), key: "public/labels.csv".into() },
    )]);
    let bucket = format!("{}-artifacts", competition.prefix);
    S3Artifacts::new(aws_sdk_s3::Client::from_conf(config), bucket, labels, competition.output_key())
}

async fn buckets(competition: &AwsCompetition) {
    let s3 = competition.moto.s3().await;
    for bucket in ["artifacts", "labels"] {
        s3.create_bucket().bucket(format!("{}-{bucket}", competition.prefix)).send().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jobs_output_location_is_secret_per_data_directory_and_stable_within_one() {
    let dir = tempfile::tempdir().unwrap();
    let ours = AwsCompetition::create(&dir.path().join("ours"), "secret", TUNING).await;
    let cli = ours.cli.clone();
    tokio::task::spawn_blocking(move || cli.ok(&["aws", "bootstrap"])).await.unwrap();
    let config = Config::load(&ours.cli.data_dir).unwrap();
    let parts = connect(&config, None).await.unwrap();
    let job = parts.runner.launch(&launch_request(&config)).await.unwrap();

    let told = job_env(&ours, job.as_str(), "EVALFLOW_OUTPUT_URI").await;
    let bucket = format!("s3://{}-artifacts/", ours.prefix);
    let prefix = told.strip_prefix(&bucket).unwrap_or_else(|| panic!("{told}"));
    let tag = prefix.strip_prefix("outputs/sub1-public/a1-").and_then(|t| t.strip_suffix('/'));
    assert!(tag.is_some_and(|t| t.len() == 32), "the location carries a 128-bit tag: {told}");

    // Another data directory (another secret) derives another location for
    // the same run and attempt: run and attempt alone do not give it.
    let theirs = AwsCompetition::create(&dir.path().join("theirs"), "secret2", TUNING).await;
    assert_ne!(theirs.output_key().prefix(&run(), Attempt(1)), prefix);

    // A worker started later (the key read again from the data directory)
    // scores what the job wrote where it was told, and a relaunch adopts the job.
    let written = b"filename,label\nv00.mp4,0.7\n".to_vec();
    ours.put(&format!("{prefix}submission.csv"), written.clone()).await;
    let later = connect(&config, None).await.unwrap();
    let read = later.artifacts.predictions(&run(), Attempt(1), 1 << 20).await.unwrap();
    assert_eq!(read, Predictions::Found(written));
    assert_eq!(later.runner.launch(&launch_request(&config)).await.unwrap(), job, "adopted");
    assert_eq!(ours.predictions_key("sub1-public", 1), format!("{prefix}submission.csv"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_needs_the_engines_key_and_refuses_one_others_can_read() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let competition = AwsCompetition::create(&dir.path().join("c"), "keyless", TUNING).await;
    let config = Config::load(&competition.cli.data_dir).unwrap();
    let key_file = config.output_key_file();
    let cli = competition.cli.clone();
    let missing = tokio::task::spawn_blocking(move || cli.fails(&["worker"])).await.unwrap();
    assert!(missing.contains(&format!("the output key {} is missing", key_file.display())), "{missing}");
    assert!(!key_file.exists(), "a worker makes no key of its own");

    competition.output_key();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cli = competition.cli.clone();
    let exposed = tokio::task::spawn_blocking(move || cli.fails(&["worker"])).await.unwrap();
    assert!(exposed.contains(&format!("run `chmod 600 {}`", key_file.display())), "{exposed}");
}

#[tokio::test]
async fn a_rivals_write_to_the_guessable_location_changes_no_score() {
    let dir = tempfile::tempdir().unwrap();
    let competition = AwsCompetition::create(&dir.path().join("c"), "rival", TUNING).await;
    buckets(&competition).await;
    competition.upload_labels().await;
    let honest = competition.stage_predictions("sub1-public", 1, 0.4).await;
    // A rival's job overwrites where the predictions would be, were the
    // location derived from the run and attempt alone.
    let sabotage = b"filename,label\nv00.mp4,0.5\n".to_vec();
    competition.put("outputs/sub1-public/a1/submission.csv", sabotage).await;

    let store = artifacts(&competition, NoOp).await;
    let labels = store.labels(Stage::Public).await.unwrap();
    let predictions = store.predictions(&run(), Attempt(1), scoring::PREDICTIONS_MAX_BYTES).await.unwrap();
    let score = scoring::score(&predictions, &labels).unwrap_or_else(|e| panic!("rejected: {e}"));
    assert!((score.value() - honest).abs() < 1e-12, "{} != {honest}", score.value());
}

#[tokio::test]
async fn oversized_predictions_are_refused_after_reading_one_byte_more_than_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let competition = AwsCompetition::create(&dir.path().join("c"), "oversized", TUNING).await;
    buckets(&competition).await;
    let (limit, size) = (1_000_u64, 50_000_usize);
    let key = competition.predictions_key("sub1-public", 1);
    competition.put(&key, vec![b'x'; size]).await;

    // S3 reports a small size for a HEAD (as if the object were replaced
    // after it): a reader trusting a reported size would read it all.
    let spy = Spy::default();
    let store = artifacts(&competition, spy.clone()).await;
    let predictions = store.predictions(&run(), Attempt(1), limit).await.unwrap();
    assert_eq!(shown(&predictions), format!("too large: {size} bytes"));
    let rejection = scoring::score(&predictions, &store_labels()).unwrap_err();
    assert!(matches!(rejection, Rejection::TooLarge { .. }), "{rejection}");
    assert!(rejection.to_string().contains("write a smaller file"), "{rejection}");
    let seen = spy.seen.lock().unwrap().clone();
    assert_eq!(seen, [("GET".to_owned(), Some(format!("bytes=0-{limit}")))], "one ranged GET");
    let received = *spy.largest_response.lock().unwrap();
    assert!(received <= limit + 1, "received {received} bytes for a limit of {limit}");

    // At the limit it is read whole; an empty file is empty, not an error.
    competition.put(&key, vec![b'x'; limit as usize]).await;
    let at_limit = store.predictions(&run(), Attempt(1), limit).await.unwrap();
    assert_eq!(shown(&at_limit), format!("found: {limit} bytes"));
    competition.put(&key, Vec::new()).await;
    assert_eq!(shown(&store.predictions(&run(), Attempt(1), limit).await.unwrap()), "found: 0 bytes");
    assert_eq!(shown(&store.predictions(&run(), Attempt(2), limit).await.unwrap()), "missing");
}

/// Predictions in a line, without their bytes.
fn shown(predictions: &Predictions) -> String {
    match predictions {
        Predictions::Missing => "missing".into(),
        Predictions::Refused(why) => format!("refused: {why}"),
        Predictions::TooLarge { bytes } => format!("too large: {bytes} bytes"),
        Predictions::Found(bytes) => format!("found: {} bytes", bytes.len()),
    }
}

fn store_labels() -> evalflow_activities::Labels {
    evalflow_activities::Labels::parse(b"filename,label\nv00.mp4,1\n", "test").unwrap()
}

#[derive(Debug)]
struct NoOp;

impl Intercept for NoOp {
    fn name(&self) -> &'static str {
        "no-op"
    }
}

/// An S3 request's method and `Range` header.
type Seen = (String, Option<String>);

/// Records each S3 request's method and `Range`, and the largest response
/// body announced; makes every HEAD answer say the object has 10 bytes.
#[derive(Debug, Clone, Default)]
struct Spy {
    seen: Arc<Mutex<Vec<Seen>>>,
    largest_response: Arc<Mutex<u64>>,
}

impl Intercept for Spy {
    fn name(&self) -> &'static str {
        "test-spy"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let request = context.request();
        let range = request.headers().get("range").map(str::to_owned);
        self.seen.lock().unwrap().push((request.method().to_owned(), range));
        Ok(())
    }

    fn modify_before_deserialization(
        &self,
        context: &mut BeforeDeserializationInterceptorContextMut<'_>,
        _components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let response = context.response_mut();
        let announced = response.headers().get("content-length").and_then(|l| l.parse().ok()).unwrap_or(0);
        let mut largest = self.largest_response.lock().unwrap();
        *largest = (*largest).max(announced);
        if self.seen.lock().unwrap().last().is_some_and(|(method, _)| method == "HEAD") {
            response.headers_mut().insert("content-length", "10");
        }
        Ok(())
    }
}
