//! Publishing at scale: results published one after another to the real
//! artifact stores, on this machine's file system and on S3 (moto, when
//! `EVALFLOW_MOTO_URL` names one), timed by the thousand so that a cost
//! growing with the results already published shows.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use evalflow_activities::ArtifactStore;
use evalflow_activities::artifacts::FsArtifacts;
use evalflow_activities::aws::outputs::OutputKey;
use evalflow_activities::aws::requests::RequestCounter;
use evalflow_activities::aws::s3::{S3Artifacts, result_key};
use evalflow_activities::leaderboard::PublishedResult;
use evalflow_workflow::{Attempt, RunId, Stage, SubmissionId, TeamId, Timestamp};

use crate::Error;

/// Publishes at once, as the engine node's activity slots carry them out.
const IN_FLIGHT: usize = 16;
/// Teams the results belong to (the DFDC's 2,265, rounded).
const TEAMS: usize = 2_300;
/// Publishes timed at each end.
const SAMPLE: usize = 1_000;

fn result(index: usize) -> PublishedResult {
    let submission = SubmissionId::new(format!("s{index:07}")).unwrap_or_else(|e| panic!("{e}"));
    PublishedResult {
        run: RunId::new(&submission, Stage::Public),
        team: TeamId::new(format!("team{}", index % TEAMS)).unwrap_or_else(|e| panic!("{e}")),
        submission,
        stage: Stage::Public,
        attempt: Attempt(1),
        // Scores spread so that rows keep changing.
        score: ((index * 7_919) % 10_007) as f64 / 10_007.0,
        submitted_at: Timestamp(1_700_000_000_000 + index as u64),
        version: 5,
    }
}

/// What publishing `count` results took.
pub struct Publishing {
    /// Results published.
    pub count: usize,
    /// Seconds in all.
    pub secs: f64,
    /// Microseconds a publish, over the first and the last [`SAMPLE`].
    pub first_us: f64,
    /// See `first_us`.
    pub last_us: f64,
    /// S3 requests a publish (on S3).
    pub requests_per_publish: Option<f64>,
}

/// Publishes results `first..first + count` into `store`, [`IN_FLIGHT`]
/// at a time, timing the first and the last [`SAMPLE`].
async fn publish_all(store: Arc<dyn ArtifactStore>, first: usize, count: usize) -> Result<Publishing, Error> {
    let start = Instant::now();
    let (mut first_us, mut last_us) = (0.0, 0.0);
    let mut index = first;
    while index < first + count {
        let chunk = (first + count - index).min(SAMPLE);
        let began = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for worker in 0..IN_FLIGHT {
            let store = store.clone();
            tasks.spawn(async move {
                for i in (index + worker..index + chunk).step_by(IN_FLIGHT) {
                    store.publish(&result(i)).await?;
                }
                Ok::<(), evalflow_activities::ActivityError>(())
            });
        }
        while let Some(done) = tasks.join_next().await {
            done??;
        }
        let us = began.elapsed().as_secs_f64() * 1e6 / chunk as f64;
        if index == first {
            first_us = us;
        }
        last_us = us;
        index += chunk;
    }
    Ok(Publishing { count, secs: start.elapsed().as_secs_f64(), first_us, last_us, requests_per_publish: None })
}

/// `count` results published to a fresh data directory.
pub fn local(count: usize) -> Result<Publishing, Error> {
    let dir = crate::scratch()?;
    let store: Arc<dyn ArtifactStore> = Arc::new(FsArtifacts::new(dir.path(), BTreeMap::new()));
    tokio::runtime::Runtime::new()?.block_on(publish_all(store, 0, count))
}

/// On moto: `stored` results put in a fresh bucket directly (as publishes
/// would have left them), then `count` more published, counting requests.
pub fn s3(moto_url: &str, stored: usize, count: usize) -> Result<Publishing, Error> {
    tokio::runtime::Runtime::new()?.block_on(async {
        let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new("us-east-1"))
            .endpoint_url(moto_url)
            .load()
            .await;
        let counter = RequestCounter::default();
        let config = aws_sdk_s3::config::Builder::from(&sdk).force_path_style(true);
        let plain = aws_sdk_s3::Client::from_conf(config.clone().build());
        let counted = aws_sdk_s3::Client::from_conf(config.interceptor(counter.clone()).build());
        let bucket = format!("evalflow-bench-{}-{}", std::process::id(), Timestamp::now().as_millis());
        plain.create_bucket().bucket(&bucket).send().await?;
        let mut puts = tokio::task::JoinSet::new();
        for worker in 0..IN_FLIGHT {
            let (plain, bucket) = (plain.clone(), bucket.clone());
            puts.spawn(async move {
                for i in (worker..stored).step_by(IN_FLIGHT) {
                    let body = serde_json::to_vec_pretty(&result(i)).unwrap_or_default();
                    plain.put_object().bucket(&bucket).key(result_key(&result(i))).body(body.into()).send().await?;
                }
                Ok::<(), Error>(())
            });
        }
        while let Some(done) = puts.join_next().await {
            done??;
        }
        let keys = crate::scratch()?;
        let key = OutputKey::load_or_create(&keys.path().join("output.key"))?.0;
        let store: Arc<dyn ArtifactStore> = Arc::new(S3Artifacts::new(counted, bucket, BTreeMap::new(), key));
        // The first publish on a bucket without a board builds it from every result.
        store.publish(&result(stored)).await?;
        let before: u64 = counter.snapshot().values().sum();
        let mut publishing = publish_all(store, stored + 1, count).await?;
        let requests = counter.snapshot().values().sum::<u64>() - before;
        publishing.requests_per_publish = Some(requests as f64 / count as f64);
        Ok(publishing)
    })
}
