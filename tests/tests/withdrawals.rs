//! A withdrawn score (a run cancelled while its score was being published)
//! stays off the leaderboard whatever the order in which the publish and the
//! withdrawal land, on the file system and on S3 (moto); on S3, a publisher
//! paused at the worst moment (an SDK interceptor holds its write) loses
//! nothing and brings nothing back.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};

use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::interceptors::context::BeforeTransmitInterceptorContextRef;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;

use evalflow_activities::artifacts::FsArtifacts;
use evalflow_activities::aws::outputs::OutputKey;
use evalflow_activities::aws::s3::S3Artifacts;
use evalflow_activities::leaderboard::Leaderboard;
use evalflow_activities::{ArtifactStore, PublishedResult};
use evalflow_tests::moto::{Moto, unique_prefix};
use evalflow_workflow::{Attempt, RunId, Stage, SubmissionId, TeamId, Timestamp};

fn result(submission: &str, attempt: u32, score: f64) -> PublishedResult {
    let submission = SubmissionId::new(submission).unwrap();
    PublishedResult {
        run: RunId::new(&submission, Stage::Public),
        team: TeamId::new(format!("team-{submission}")).unwrap(),
        submission,
        stage: Stage::Public,
        attempt: Attempt(attempt),
        score,
        submitted_at: Timestamp(1_000),
        version: 0,
    }
}

fn submissions(board: &Leaderboard) -> Vec<String> {
    board.entries.iter().map(|e| e.submission.to_string()).collect()
}

/// Publishes and withdrawals one after the other, in every order that matters.
async fn in_turn(store: &dyn ArtifactStore) {
    let (alpha, beta) = (result("alpha", 1, 0.30), result("beta", 1, 0.20));
    store.publish(&alpha).await.unwrap();
    assert_eq!(submissions(&store.publish(&beta).await.unwrap()), ["beta", "alpha"]);

    let board = store.withdraw(&beta.team, &beta.run, Attempt(1)).await.unwrap();
    assert_eq!(submissions(&board), ["alpha"], "withdrawn after its publish");
    let again = store.withdraw(&beta.team, &beta.run, Attempt(1)).await.unwrap();
    assert_eq!(again, board, "withdrawing again changes nothing");
    let late = store.publish(&beta).await.unwrap();
    assert_eq!(submissions(&late), ["alpha"], "a publish landing after its withdrawal");

    let gamma = result("gamma", 2, 0.10);
    store.withdraw(&gamma.team, &gamma.run, Attempt(2)).await.unwrap();
    let board = store.publish(&gamma).await.unwrap();
    assert_eq!(submissions(&board), ["alpha"], "withdrawn before its publish landed");

    let retried = result("beta", 3, 0.25);
    let board = store.publish(&retried).await.unwrap();
    assert_eq!(submissions(&board), ["beta", "alpha"], "a later attempt of a withdrawn run counts");

    // Rescored: the same attempt published again at a later version.
    let rescored = PublishedResult { score: 0.40, version: 7, ..retried.clone() };
    let board = store.publish(&rescored).await.unwrap();
    assert_eq!(submissions(&board), ["alpha", "beta"], "the later score of an attempt counts");
    let stale = store.publish(&retried).await.unwrap();
    assert_eq!(stale, board, "an earlier version published again changes nothing");
}

/// Holds the first leaderboard write of its client until the test lets it
/// go: a publisher paused between building a board and writing it.
#[derive(Debug, Clone)]
struct Gate {
    armed: Arc<AtomicBool>,
    /// Met twice: when the write is reached, and to let it go.
    meeting: Arc<Barrier>,
}

impl Gate {
    fn new() -> Gate {
        Gate { armed: Arc::new(AtomicBool::new(true)), meeting: Arc::new(Barrier::new(2)) }
    }

    /// Waits (off the async threads) for the gated client to meet the test.
    async fn meet(&self) {
        let meeting = self.meeting.clone();
        tokio::task::spawn_blocking(move || _ = meeting.wait()).await.unwrap();
    }
}

impl Intercept for Gate {
    fn name(&self) -> &'static str {
        "test-gate"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let request = context.request();
        let board_write = request.method() == "PUT" && request.uri().contains("/leaderboard/");
        if board_write && self.armed.swap(false, Ordering::SeqCst) {
            // Hands this worker's other tasks to another thread while it waits.
            tokio::task::block_in_place(|| {
                self.meeting.wait();
                self.meeting.wait();
            });
        }
        Ok(())
    }
}

/// A bucket on moto, a store on it, and a store whose first leaderboard write waits at a gate.
async fn stores(test: &str) -> (S3Artifacts, S3Artifacts, Gate, aws_sdk_s3::Client, String) {
    let moto = Moto::shared().await;
    let s3 = moto.s3().await;
    let bucket = format!("{}-artifacts", unique_prefix(test));
    s3.create_bucket().bucket(&bucket).send().await.unwrap();
    let gate = Gate::new();
    let config = aws_sdk_s3::config::Builder::from(&moto.sdk().await).force_path_style(true).interceptor(gate.clone());
    let keys = tempfile::tempdir().unwrap();
    let key = OutputKey::load_or_create(&keys.path().join("output.key")).unwrap().0;
    let client = aws_sdk_s3::Client::from_conf(config.build());
    let gated = S3Artifacts::new(client, bucket.clone(), BTreeMap::new(), key.clone());
    let store = S3Artifacts::new(s3.clone(), bucket.clone(), BTreeMap::new(), key);
    (store, gated, gate, s3, bucket)
}

async fn stored_board(s3: &aws_sdk_s3::Client, bucket: &str) -> Leaderboard {
    let object = s3.get_object().bucket(bucket).key("leaderboard/public.json").send().await.unwrap();
    serde_json::from_slice(&object.body.collect().await.unwrap().to_vec()).unwrap()
}

#[tokio::test]
async fn in_turn_on_the_file_system() {
    let dir = tempfile::tempdir().unwrap();
    in_turn(&FsArtifacts::new(dir.path(), BTreeMap::new())).await;
}

/// Two stores on one data directory (two processes, in turn): each finds
/// the other's results, and a new store reads every result there is.
#[tokio::test]
async fn stores_on_one_directory_see_each_others_results() {
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (FsArtifacts::new(dir.path(), BTreeMap::new()), FsArtifacts::new(dir.path(), BTreeMap::new()));
    one.publish(&result("alpha", 1, 0.3)).await.unwrap();
    assert_eq!(submissions(&two.publish(&result("beta", 1, 0.2)).await.unwrap()), ["beta", "alpha"]);
    let gamma = result("gamma", 1, 0.1);
    assert_eq!(submissions(&one.publish(&gamma).await.unwrap()), ["gamma", "beta", "alpha"]);
    assert_eq!(submissions(&two.withdraw(&gamma.team, &gamma.run, Attempt(1)).await.unwrap()), ["beta", "alpha"]);
    let rescored = PublishedResult { score: 0.9, version: 3, ..result("beta", 1, 0.2) };
    assert_eq!(submissions(&one.publish(&rescored).await.unwrap()), ["alpha", "beta"]);
    let fresh = FsArtifacts::new(dir.path(), BTreeMap::new());
    let board = fresh.publish(&result("delta", 1, 0.5)).await.unwrap();
    assert_eq!(submissions(&board), ["alpha", "delta", "beta"]);
    let written: Leaderboard =
        serde_json::from_slice(&std::fs::read(dir.path().join("leaderboard/public.json")).unwrap()).unwrap();
    assert_eq!(written, *board, "the board's file is the last board");
}

/// Publishes of one process arriving together on S3 (they share board
/// writes): every one counts, and each one's board holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn publishes_at_once_on_s3_all_count() {
    let (store, _, _, s3, bucket) = stores("atonce").await;
    let tasks: Vec<_> = (0..32)
        .map(|n| {
            let store = store.clone();
            tokio::spawn(async move {
                let published = result(&format!("s{n}"), 1, f64::from(n) / 100.0);
                (published.submission.clone(), store.publish(&published).await.unwrap())
            })
        })
        .collect();
    for task in tasks {
        let (submission, board) = task.await.unwrap();
        assert!(board.entries.iter().any(|e| e.submission == submission), "{submission}'s board holds it");
    }
    let expected: Vec<String> = (0..32).map(|n| format!("s{n}")).collect();
    assert_eq!(submissions(&stored_board(&s3, &bucket).await), expected);
}

#[tokio::test]
async fn in_turn_on_s3() {
    let (store, ..) = stores("withdraw").await;
    in_turn(&store).await;
}

/// The publisher builds a board with its score, then pauses; the withdrawal
/// finds nothing to change (the stored board lacks the score) and returns;
/// the publisher's write lands. It must see the withdrawal and rebuild.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_paused_across_its_withdrawal_does_not_bring_the_score_back() {
    let (store, gated, gate, s3, bucket) = stores("pausedw").await;
    store.publish(&result("alpha", 1, 0.3)).await.unwrap();
    let late = result("late", 1, 0.1);
    let publish = tokio::spawn({
        let late = late.clone();
        async move { gated.publish(&late).await }
    });
    gate.meet().await;
    let board = store.withdraw(&late.team, &late.run, Attempt(1)).await.unwrap();
    assert_eq!(submissions(&board), ["alpha"]);
    gate.meet().await;
    publish.await.unwrap().unwrap();
    assert_eq!(submissions(&stored_board(&s3, &bucket).await), ["alpha"]);
}

/// The publisher builds a board, then pauses while another publish lands:
/// its write must lose the compare-and-swap and rebuild with both scores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_paused_across_another_loses_nothing() {
    let (store, gated, gate, s3, bucket) = stores("pausedp").await;
    store.publish(&result("alpha", 1, 0.3)).await.unwrap();
    let publish = tokio::spawn(async move { gated.publish(&result("first", 1, 0.2)).await });
    gate.meet().await;
    store.publish(&result("second", 1, 0.1)).await.unwrap();
    gate.meet().await;
    publish.await.unwrap().unwrap();
    assert_eq!(submissions(&stored_board(&s3, &bucket).await), ["second", "first", "alpha"]);
}
