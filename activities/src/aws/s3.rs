//! Artifacts in S3.
//!
//! | key | what |
//! |---|---|
//! | `outputs/<run>/a<attempt>-<tag>/submission.csv` | a job's predictions (written by the job; the tag is secret, see [`super::outputs`]) |
//! | `results/<stage>/<team>/<run>.a<attempt>.v<version>.<submitted ms>.<score bits>.json` | a published result |
//! | `withdrawn/<stage>/<team>/<run>.a<attempt>` | a withdrawal: that attempt's result does not count |
//! | `leaderboard/<stage>.json`, `.csv` | the leaderboard |
//!
//! A result is created once (`If-None-Match: *`), so publishing again is a
//! no-op. Its key carries everything the leaderboard needs, and results and
//! withdrawals are kept by team, so a publish or a withdrawal settles its
//! team's row alone: it reads the board, lists that team's withdrawals and
//! results (not every result of the stage: publishing stays linear over a
//! competition), and writes the board with the row replaced, with
//! compare-and-swap (`If-Match` on the ETag read *before* listing): a
//! publisher that lost a race settles again from a listing that includes
//! the winner's result. After a successful write the team's withdrawals are
//! listed again, and a new one means settling again: a withdrawal that lands
//! while a row is settled is either seen by that settler afterwards, or its
//! withdrawer reads the board after it was written and settles it.
//! A board that is not a leaderboard is rebuilt from every result.
//!
//! Predictions are read with a ranged GET of one byte more than the limit,
//! and no more than that is taken from the body, whatever the object's
//! reported size: a job's oversized output costs the scorer a bounded read.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use async_trait::async_trait;
use aws_sdk_s3::primitives::{ByteStream, ByteStreamError};
use evalflow_workflow::{Attempt, RunId, Stage, TeamId, Timestamp};

use super::outputs::OutputKey;
use super::{activity_error, error_code, error_status};
use crate::ActivityError;
use crate::artifacts::{ArtifactStore, Labels, Predictions, parse_withdrawal_name, withdrawal_name};
use crate::leaderboard::{Leaderboard, PublishedResult, Standings};

/// Writes of a leaderboard a publisher tries before giving up (for now).
const PUBLISH_TRIES_MAX: usize = 8;
/// The wait after losing a compare-and-swap to another process, doubling.
const CAS_BACKOFF: std::time::Duration = std::time::Duration::from_millis(20);
/// The longest such wait.
const CAS_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_millis(640);
/// Pages of a listing read at most (1,000 keys each).
const PAGES_MAX: usize = 1000;

/// An object's place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Location {
    /// The bucket.
    pub bucket: String,
    /// The key.
    pub key: String,
}

impl S3Location {
    /// Parses `s3://bucket/key`.
    pub fn parse(uri: &str) -> Option<S3Location> {
        let (bucket, key) = uri.strip_prefix("s3://")?.split_once('/')?;
        (!bucket.is_empty() && !key.is_empty()).then(|| S3Location { bucket: bucket.to_owned(), key: key.to_owned() })
    }
}

/// Artifacts in S3.
#[derive(Debug, Clone)]
pub struct S3Artifacts {
    client: aws_sdk_s3::Client,
    inner: Arc<Buckets>,
}

#[derive(Debug)]
struct Buckets {
    bucket: String,
    labels: BTreeMap<Stage, S3Location>,
    output_key: OutputKey,
    /// Each stage's rows to settle, for publishes in this process.
    settling: BTreeMap<Stage, Settling>,
}

/// One stage's settling in this process: the teams whose row a change
/// awaits, taken all at once by the one settler at a time, so that the
/// publishes of one process arriving together share one board write
/// instead of racing each other's compare-and-swap.
#[derive(Debug, Default)]
struct Settling {
    /// The teams changed, and the ticket of the latest change.
    pending: std::sync::Mutex<(BTreeSet<TeamId>, u64)>,
    /// Held by the settler; the ticket it settled up to and its board.
    settler: tokio::sync::Mutex<(u64, Option<Arc<Leaderboard>>)>,
}

impl S3Artifacts {
    /// Artifacts in `bucket`; each stage's labels where `labels` says; jobs'
    /// predictions where `output_key` says they were told to write them.
    pub fn new(
        client: aws_sdk_s3::Client,
        bucket: String,
        labels: BTreeMap<Stage, S3Location>,
        output_key: OutputKey,
    ) -> S3Artifacts {
        let settling = [Stage::Public, Stage::Private].into_iter().map(|s| (s, Settling::default())).collect();
        S3Artifacts { client, inner: Arc::new(Buckets { bucket, labels, output_key, settling }) }
    }

    async fn get(&self, bucket: &str, key: &str) -> Result<Option<(Vec<u8>, Option<String>)>, ActivityError> {
        match self.client.get_object().bucket(bucket).key(key).send().await {
            Ok(object) => {
                let etag = object.e_tag().map(str::to_owned);
                let bytes = object
                    .body
                    .collect()
                    .await
                    .map_err(|e| ActivityError::Transient(format!("s3://{bucket}/{key}: {e}")))?;
                Ok(Some((bytes.to_vec(), etag)))
            }
            Err(e) if error_code(&e) == Some("NoSuchKey") || error_status(&e) == Some(404) => Ok(None),
            Err(e) => Err(activity_error(&format!("GetObject s3://{bucket}/{key}"), e)),
        }
    }

    /// The keys under `prefix`, without it.
    async fn list(&self, prefix: &str) -> Result<Vec<String>, ActivityError> {
        let mut keys = Vec::new();
        let mut token = None;
        for _ in 0..PAGES_MAX {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.inner.bucket)
                .prefix(prefix)
                .set_continuation_token(token)
                .send()
                .await
                .map_err(|e| activity_error(&format!("ListObjectsV2 {prefix}"), e))?;
            keys.extend(page.contents().iter().filter_map(|o| o.key()?.strip_prefix(prefix).map(str::to_owned)));
            token = page.next_continuation_token().map(str::to_owned);
            if token.is_none() {
                break;
            }
        }
        Ok(keys)
    }

    /// The withdrawals under `prefix` (a stage's or a team's), as
    /// (run, attempt); what is not a withdrawal's name is skipped.
    async fn withdrawals(&self, prefix: &str) -> Result<BTreeSet<(RunId, Attempt)>, ActivityError> {
        let names = self.list(prefix).await?;
        Ok(names.iter().filter_map(|name| parse_withdrawal_name(name.rsplit('/').next()?)).collect())
    }

    /// The standings of `team` on `stage` (of every team, for `None`), from
    /// the listings of its withdrawals, then its results; and the withdrawals.
    async fn standings(
        &self,
        stage: Stage,
        team: Option<&TeamId>,
    ) -> Result<(Standings, BTreeSet<(RunId, Attempt)>), ActivityError> {
        let under = team.map(|t| format!("{t}/")).unwrap_or_default();
        let withdrawn = self.withdrawals(&format!("withdrawn/{stage}/{under}")).await?;
        let mut standings = Standings::withdrawn(withdrawn.iter().cloned());
        let prefix = format!("results/{stage}/{under}");
        for name in self.list(&prefix).await? {
            let result = parse_result_key(stage, &format!("{prefix}{name}"));
            if let Some(result) = result.filter(|r| team.is_none_or(|t| &r.team == t)) {
                standings.publish(result);
            }
        }
        Ok((standings, withdrawn))
    }

    /// Brings `team`'s row of `stage`'s leaderboard up to date, with the
    /// rows of every other change of this process waiting meanwhile.
    async fn settle(&self, stage: Stage, team: &TeamId) -> Result<Arc<Leaderboard>, ActivityError> {
        let Some(settling) = self.inner.settling.get(&stage) else {
            return Err(ActivityError::Permanent(format!("no settling for stage {stage}")));
        };
        let ticket = {
            let mut pending = settling.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            pending.0.insert(team.clone());
            pending.1 += 1;
            pending.1
        };
        let mut settler = settling.settler.lock().await;
        if let (settled, Some(board)) = &*settler
            && *settled >= ticket
        {
            return Ok(board.clone());
        }
        let (teams, upto) = {
            let mut pending = settling.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            (std::mem::take(&mut pending.0), pending.1)
        };
        let settled = self.settle_rows(stage, &teams).await;
        if settled.is_err() {
            // Left for the next settler (or this change's retry).
            let mut pending = settling.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            pending.0.extend(teams);
        }
        let board = Arc::new(settled?);
        *settler = (upto, Some(board.clone()));
        Ok(board)
    }

    /// Brings the rows of `teams` on `stage`'s leaderboard up to date (see
    /// the module's doc for why it is safe).
    async fn settle_rows(&self, stage: Stage, teams: &BTreeSet<TeamId>) -> Result<Leaderboard, ActivityError> {
        let json_key = format!("leaderboard/{stage}.json");
        let mut backoff = crate::backoff::Backoff::new(CAS_BACKOFF, CAS_BACKOFF_MAX);
        for _ in 0..PUBLISH_TRIES_MAX {
            let current = self.get(&self.inner.bucket, &json_key).await?;
            let stored = current.as_ref().and_then(|(bytes, _)| serde_json::from_slice::<Leaderboard>(bytes).ok());
            let mut withdrawn = BTreeMap::new();
            let board = match stored.filter(|board| board.stage == stage) {
                Some(mut board) => {
                    let mut changed = false;
                    for team in teams {
                        let (standings, team_withdrawn) = self.standings(stage, Some(team)).await?;
                        let best = standings.best(team);
                        if !board.shows(team, best) {
                            board = board.with_row(team, best);
                            changed = true;
                        }
                        withdrawn.insert(team, team_withdrawn);
                    }
                    if !changed {
                        return Ok(board);
                    }
                    board
                }
                // None yet, or not a leaderboard: from every result.
                None => {
                    for team in teams {
                        withdrawn.insert(team, self.withdrawals(&format!("withdrawn/{stage}/{team}/")).await?);
                    }
                    self.standings(stage, None).await?.0.board(stage)
                }
            };
            let etag = current.map(|(_, etag)| etag.unwrap_or_default());
            if self.put_if(&json_key, board.to_json().into_bytes(), etag.as_deref()).await? {
                let mut unchanged = true;
                for (team, before) in &withdrawn {
                    unchanged &= self.withdrawals(&format!("withdrawn/{stage}/{team}/")).await? == *before;
                }
                if unchanged {
                    self.sync_csv(stage).await?;
                    return Ok(board);
                }
            } else {
                // Another process won: let it finish before reading again.
                tokio::time::sleep(backoff.delay()).await;
            }
        }
        Err(ActivityError::Transient(format!("{json_key}: other publishers kept winning; will try again")))
    }

    /// Writes `bytes` at `key` if the object's ETag is still `etag` (or, for
    /// `None`, if there is no object). `Ok(false)` when another writer won.
    async fn put_if(&self, key: &str, bytes: Vec<u8>, etag: Option<&str>) -> Result<bool, ActivityError> {
        let put = self.client.put_object().bucket(&self.inner.bucket).key(key).body(ByteStream::from(bytes));
        let put = match etag {
            Some(etag) => put.if_match(etag),
            None => put.if_none_match("*"),
        };
        match put.send().await {
            Ok(_) => Ok(true),
            Err(e) if matches!(error_status(&e), Some(412 | 409)) => Ok(false),
            Err(e) => Err(activity_error(&format!("PutObject {key}"), e)),
        }
    }
}

impl S3Artifacts {
    /// Writes the CSV of the leaderboard's latest JSON, with compare-and-swap:
    /// publishers finishing in any order leave the CSV of the newest board.
    async fn sync_csv(&self, stage: Stage) -> Result<(), ActivityError> {
        let (json_key, csv_key) = (format!("leaderboard/{stage}.json"), format!("leaderboard/{stage}.csv"));
        for _ in 0..PUBLISH_TRIES_MAX {
            let csv_etag = self.get(&self.inner.bucket, &csv_key).await?.map(|(_, etag)| etag.unwrap_or_default());
            let Some((json, _)) = self.get(&self.inner.bucket, &json_key).await? else { return Ok(()) };
            let board: Leaderboard = serde_json::from_slice(&json)
                .map_err(|e| ActivityError::Permanent(format!("{json_key} is not a leaderboard: {e}")))?;
            if self.put_if(&csv_key, board.to_csv().into_bytes(), csv_etag.as_deref()).await? {
                return Ok(());
            }
        }
        Err(ActivityError::Transient(format!("{csv_key}: other publishers kept writing it; will try again")))
    }
}

/// The first `limit` bytes of `body` (all of it, if shorter); the rest is
/// never read.
async fn read_at_most(mut body: ByteStream, limit: u64) -> Result<Vec<u8>, ByteStreamError> {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let mut bytes = Vec::new();
    while bytes.len() < limit {
        let Some(chunk) = body.try_next().await? else { break };
        let room = limit - bytes.len();
        bytes.extend_from_slice(&chunk[..chunk.len().min(room)]);
    }
    Ok(bytes)
}

/// The object's whole size from a `Content-Range` (`bytes 0-99/1234`).
fn range_total(content_range: &str) -> Option<u64> {
    content_range.rsplit_once('/')?.1.parse().ok()
}

/// The key of a published result: everything the leaderboard needs.
pub fn result_key(result: &PublishedResult) -> String {
    format!(
        "results/{}/{}/{}.a{}.v{}.{}.{:016x}.json",
        result.stage,
        result.team,
        result.run,
        result.attempt,
        result.version,
        result.submitted_at.as_millis(),
        result.score.to_bits()
    )
}

/// Reads a result back from its key.
pub fn parse_result_key(stage: Stage, key: &str) -> Option<PublishedResult> {
    let (team, name) = key.strip_prefix(&format!("results/{stage}/"))?.strip_suffix(".json")?.split_once('/')?;
    let [run, attempt, version, submitted, score] = name.split('.').collect::<Vec<_>>()[..] else { return None };
    let run = RunId::parse(run).ok()?;
    let (submission, run_stage) = run.parts();
    (run_stage == stage).then_some(())?;
    Some(PublishedResult {
        submission,
        team: TeamId::new(team).ok()?,
        stage,
        attempt: Attempt(attempt.strip_prefix('a')?.parse().ok()?),
        version: version.strip_prefix('v')?.parse().ok()?,
        score: f64::from_bits(u64::from_str_radix(score, 16).ok()?),
        submitted_at: Timestamp(submitted.parse().ok()?),
        run,
    })
}

/// The key of a withdrawal.
pub fn withdrawal_key(stage: Stage, team: &TeamId, run: &RunId, attempt: Attempt) -> String {
    format!("withdrawn/{stage}/{team}/{}", withdrawal_name(run, attempt))
}

#[async_trait]
impl ArtifactStore for S3Artifacts {
    async fn predictions(&self, run: &RunId, attempt: Attempt, max_bytes: u64) -> Result<Predictions, ActivityError> {
        let key = format!("{}submission.csv", self.inner.output_key.prefix(run, attempt));
        let bucket = &self.inner.bucket;
        let ranged = self.client.get_object().bucket(bucket).key(&key).range(format!("bytes=0-{max_bytes}"));
        let object = match ranged.send().await {
            Ok(object) => object,
            Err(e) if error_code(&e) == Some("NoSuchKey") || error_status(&e) == Some(404) => {
                return Ok(Predictions::Missing);
            }
            // A range from byte 0 is unsatisfiable only for an empty object.
            Err(e) if error_status(&e) == Some(416) => return Ok(Predictions::Found(Vec::new())),
            Err(e) => return Err(activity_error(&format!("GetObject s3://{bucket}/{key}"), e)),
        };
        let size = object.content_range().and_then(range_total);
        let limit = max_bytes.saturating_add(1);
        let bytes = read_at_most(object.body, limit)
            .await
            .map_err(|e| ActivityError::Transient(format!("s3://{bucket}/{key}: {e}")))?;
        let read = bytes.len() as u64;
        if read > max_bytes || size.is_some_and(|size| size > max_bytes) {
            return Ok(Predictions::TooLarge { bytes: size.unwrap_or(read).max(read) });
        }
        Ok(Predictions::Found(bytes))
    }

    async fn labels(&self, stage: Stage) -> Result<Arc<Labels>, ActivityError> {
        let place = self.inner.labels.get(&stage).ok_or_else(|| {
            ActivityError::Permanent(format!("no [aws.stages.{stage}] labels are configured in evalflow.toml"))
        })?;
        let uri = format!("s3://{}/{}", place.bucket, place.key);
        let (bytes, _) = self
            .get(&place.bucket, &place.key)
            .await?
            .ok_or_else(|| ActivityError::Permanent(format!("the labels of stage {stage} are missing at {uri}")))?;
        Labels::parse(&bytes, &uri).map(Arc::new)
    }

    async fn publish(&self, result: &PublishedResult) -> Result<Arc<Leaderboard>, ActivityError> {
        let body = serde_json::to_vec_pretty(result).map_err(|e| ActivityError::Permanent(e.to_string()))?;
        // Created once; an existing one (a repeated publish) is left alone.
        self.put_if(&result_key(result), body, None).await?;
        self.settle(result.stage, &result.team).await
    }

    async fn withdraw(&self, team: &TeamId, run: &RunId, attempt: Attempt) -> Result<Arc<Leaderboard>, ActivityError> {
        let stage = run.parts().1;
        // Empty and created once; an existing one (a repeated withdrawal) is left alone.
        self.put_if(&withdrawal_key(stage, team, run, attempt), Vec::new(), None).await?;
        self.settle(stage, team).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use evalflow_workflow::SubmissionId;

    #[test]
    fn result_keys_round_trip() {
        let submission = SubmissionId::new("a-b-public").unwrap();
        let result = PublishedResult {
            run: RunId::new(&submission, Stage::Private),
            submission,
            team: TeamId::new("team_9").unwrap(),
            stage: Stage::Private,
            attempt: Attempt(3),
            version: 41,
            score: 0.123_456_789_012_345_67,
            submitted_at: Timestamp(1_795_000_000_123),
        };
        let key = result_key(&result);
        assert_eq!(parse_result_key(Stage::Private, &key), Some(result));
        assert_eq!(parse_result_key(Stage::Public, &key), None);
        assert_eq!(parse_result_key(Stage::Private, "results/private/junk.json"), None);
        assert_eq!(parse_result_key(Stage::Private, "results/private/t/junk.json"), None);
        let run = RunId::new(&SubmissionId::new("a-b").unwrap(), Stage::Public);
        let key = withdrawal_key(Stage::Public, &TeamId::new("t").unwrap(), &run, Attempt(2));
        assert_eq!(key, "withdrawn/public/t/a-b-public.a2");
        assert_eq!(parse_withdrawal_name(key.rsplit('/').next().unwrap()), Some((run, Attempt(2))));
    }

    #[test]
    fn content_ranges_give_the_whole_size() {
        assert_eq!(range_total("bytes 0-99/1234"), Some(1234));
        assert_eq!(range_total("bytes 0-99/*"), None);
        assert_eq!(range_total("junk"), None);
    }

    #[tokio::test]
    async fn a_body_is_read_up_to_the_limit_only() {
        let body = || ByteStream::from(vec![b'x'; 10]);
        assert_eq!(read_at_most(body(), 4).await.unwrap(), b"xxxx");
        assert_eq!(read_at_most(body(), 10).await.unwrap().len(), 10);
        assert_eq!(read_at_most(body(), 99).await.unwrap().len(), 10);
    }

    #[test]
    fn s3_uris_parse() {
        let place = S3Location::parse("s3://labels/public/labels.csv").unwrap();
        assert_eq!((place.bucket.as_str(), place.key.as_str()), ("labels", "public/labels.csv"));
        assert_eq!(S3Location::parse("s3://bucket"), None);
        assert_eq!(S3Location::parse("/tmp/x"), None);
    }
}
