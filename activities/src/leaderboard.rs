//! The leaderboard of a stage: derived from the published results, so
//! deriving it again from the same results gives the same bytes and
//! publishing twice changes nothing.
//!
//! [`Standings`] keeps the results team by team: a publish or a withdrawal
//! changes one team's row, and finding that row again reads that team's
//! results only. So a competition's publishes cost in all what they number,
//! not their number squared.

use std::collections::{BTreeMap, HashMap, HashSet};

use evalflow_workflow::{Attempt, RunId, RunSpec, Score, Stage, SubmissionId, TeamId, Timestamp};
use serde::{Deserialize, Serialize};

/// A score as published: what the leaderboard is built from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublishedResult {
    /// The run.
    pub run: RunId,
    /// The submission.
    pub submission: SubmissionId,
    /// Its team.
    pub team: TeamId,
    /// The stage.
    pub stage: Stage,
    /// The attempt whose predictions were scored.
    pub attempt: Attempt,
    /// The score.
    pub score: f64,
    /// When the submission was made.
    pub submitted_at: Timestamp,
    /// The run's version when the result was published: of an attempt
    /// scored twice (a rescore), the later score counts.
    #[serde(default)]
    pub version: u64,
}

/// What orders a board's rows: the lower score, then the earlier
/// submission, then the submission's id.
fn order(
    (score, at, submission): (f64, Timestamp, &SubmissionId),
    (other_score, other_at, other): (f64, Timestamp, &SubmissionId),
) -> std::cmp::Ordering {
    score.total_cmp(&other_score).then(at.cmp(&other_at)).then_with(|| submission.cmp(other))
}

impl PublishedResult {
    fn key(&self) -> (f64, Timestamp, &SubmissionId) {
        (self.score, self.submitted_at, &self.submission)
    }

    /// Whether this result shows as the same row as `other`.
    fn same_row(&self, other: &PublishedResult) -> bool {
        self.run == other.run
            && self.score.to_bits() == other.score.to_bits()
            && self.submitted_at == other.submitted_at
    }

    /// The result of `spec`'s attempt `attempt`, scored `score`, published
    /// at the run's `version`.
    pub fn new(spec: &RunSpec, attempt: Attempt, score: Score, version: u64) -> PublishedResult {
        PublishedResult {
            version,
            run: spec.run.clone(),
            submission: spec.submission.clone(),
            team: spec.team.clone(),
            stage: spec.stage,
            attempt,
            score: score.value(),
            submitted_at: spec.submitted_at,
        }
    }
}

/// One team's row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Its place, from 1.
    pub rank: usize,
    /// The team.
    pub team: TeamId,
    /// Its best submission.
    pub submission: SubmissionId,
    /// That submission's run.
    pub run: RunId,
    /// Its score (log loss: lower is better).
    pub score: f64,
    /// When it was submitted (breaks ties: earlier wins).
    pub submitted_at: Timestamp,
}

impl Entry {
    fn key(&self) -> (f64, Timestamp, &SubmissionId) {
        (self.score, self.submitted_at, &self.submission)
    }

    fn of(result: &PublishedResult) -> Entry {
        Entry {
            rank: 0,
            team: result.team.clone(),
            submission: result.submission.clone(),
            run: result.run.clone(),
            score: result.score,
            submitted_at: result.submitted_at,
        }
    }
}

/// A stage's leaderboard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Leaderboard {
    /// The stage.
    pub stage: Stage,
    /// One row per team, best first.
    pub entries: Vec<Entry>,
}

impl Leaderboard {
    /// The leaderboard of `stage` from its published results: each run's
    /// latest attempt counts, and each team's best score (lowest; on a tie,
    /// the earlier submission), ranked.
    pub fn build(stage: Stage, results: impl IntoIterator<Item = PublishedResult>) -> Leaderboard {
        let mut standings = Standings::default();
        for result in results.into_iter().filter(|r| r.stage == stage) {
            standings.publish(result);
        }
        standings.board(stage)
    }

    fn ranked(stage: Stage, mut entries: Vec<Entry>) -> Leaderboard {
        entries.sort_by(|a, b| order(a.key(), b.key()));
        for (rank, entry) in (1..).zip(&mut entries) {
            entry.rank = rank;
        }
        Leaderboard { stage, entries }
    }

    /// This board with `team`'s row replaced by `best` (or removed, for
    /// `None`), ranked again.
    pub fn with_row(self, team: &TeamId, best: Option<&PublishedResult>) -> Leaderboard {
        let mut entries: Vec<Entry> = self.entries.into_iter().filter(|e| &e.team != team).collect();
        entries.extend(best.map(Entry::of));
        Leaderboard::ranked(self.stage, entries)
    }

    /// `team`'s row, if it has one.
    pub fn row(&self, team: &TeamId) -> Option<&Entry> {
        self.entries.iter().find(|e| &e.team == team)
    }

    /// Whether `team`'s row is `best` (no row, for `None`).
    pub fn shows(&self, team: &TeamId, best: Option<&PublishedResult>) -> bool {
        let row = self.row(team).map(|e| (&e.run, e.score.to_bits(), e.submitted_at));
        row == best.map(|b| (&b.run, b.score.to_bits(), b.submitted_at))
    }

    /// As pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// As CSV: `rank,team,submission,score,submitted_at_ms`.
    pub fn to_csv(&self) -> String {
        let mut writer = csv::Writer::from_writer(Vec::new());
        let _ = writer.write_record(["rank", "team", "submission", "score", "submitted_at_ms"]);
        for e in &self.entries {
            let row = [
                e.rank.to_string(),
                e.team.to_string(),
                e.submission.to_string(),
                format!("{:.6}", e.score),
                e.submitted_at.as_millis().to_string(),
            ];
            let _ = writer.write_record(&row);
        }
        String::from_utf8(writer.into_inner().unwrap_or_default()).unwrap_or_default()
    }
}

/// A stage's results, team by team. Of a run, its latest attempt counts,
/// unless withdrawn; of an attempt scored again, its latest score (the one
/// published at the higher version of the run). A team's row is its best.
#[derive(Debug, Clone, Default)]
pub struct Standings {
    teams: HashMap<TeamId, Team>,
    withdrawn: HashSet<(RunId, Attempt)>,
}

/// One team's results, by run, attempt and version, and its best.
#[derive(Debug, Clone, Default)]
struct Team {
    results: BTreeMap<(RunId, Attempt, u64), PublishedResult>,
    best: Option<PublishedResult>,
}

impl Team {
    /// Finds the best again: of each run, the result with the highest
    /// attempt and version. Returns whether it changed.
    fn settle(&mut self) -> bool {
        let mut best: Option<&PublishedResult> = None;
        let mut results = self.results.values().peekable();
        while let Some(result) = results.next() {
            let superseded = results.peek().is_some_and(|next| next.run == result.run);
            if !superseded && best.is_none_or(|b| order(result.key(), b.key()).is_lt()) {
                best = Some(result);
            }
        }
        let changed = match (&self.best, best) {
            (Some(was), Some(is)) => !was.same_row(is),
            (was, is) => was.is_some() != is.is_some(),
        };
        self.best = best.cloned();
        changed
    }
}

impl Standings {
    /// Standings that keep these attempts off the board.
    pub fn withdrawn(withdrawn: impl IntoIterator<Item = (RunId, Attempt)>) -> Standings {
        Standings { teams: HashMap::new(), withdrawn: withdrawn.into_iter().collect() }
    }

    /// Counts `result`, unless its attempt was withdrawn. Returns whether
    /// its team's row changed.
    pub fn publish(&mut self, result: PublishedResult) -> bool {
        if self.withdrawn.contains(&(result.run.clone(), result.attempt)) {
            return false;
        }
        let team = self.teams.entry(result.team.clone()).or_default();
        let key = (result.run.clone(), result.attempt, result.version);
        if team.results.get(&key) == Some(&result) {
            return false;
        }
        team.results.insert(key, result);
        team.settle()
    }

    /// Keeps the run's attempt off the board, now and if it is published
    /// later. Returns whether its team's row changed.
    pub fn withdraw(&mut self, team: &TeamId, run: &RunId, attempt: Attempt) -> bool {
        self.withdrawn.insert((run.clone(), attempt));
        let Some(team) = self.teams.get_mut(team) else { return false };
        let before = team.results.len();
        team.results.retain(|(r, a, _), _| !(r == run && *a == attempt));
        team.results.len() != before && team.settle()
    }

    /// Whether the result is counted already, or withdrawn: publishing it
    /// again changes nothing.
    pub fn holds(&self, result: &PublishedResult) -> bool {
        self.withdrawn.contains(&(result.run.clone(), result.attempt))
            || self.teams.get(&result.team).is_some_and(|team| {
                team.results.get(&(result.run.clone(), result.attempt, result.version)) == Some(result)
            })
    }

    /// Whether the attempt is withdrawn.
    pub fn is_withdrawn(&self, run: &RunId, attempt: Attempt) -> bool {
        self.withdrawn.contains(&(run.clone(), attempt))
    }

    /// `team`'s best result, if it has one.
    pub fn best(&self, team: &TeamId) -> Option<&PublishedResult> {
        self.teams.get(team)?.best.as_ref()
    }

    /// The board: each team's best, ranked.
    pub fn board(&self, stage: Stage) -> Leaderboard {
        Leaderboard::ranked(stage, self.teams.values().filter_map(|t| t.best.as_ref()).map(Entry::of).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn result(submission: &str, team: &str, score: f64, at: u64) -> PublishedResult {
        let submission = SubmissionId::new(submission).unwrap();
        PublishedResult {
            run: RunId::new(&submission, Stage::Public),
            submission,
            team: TeamId::new(team).unwrap(),
            stage: Stage::Public,
            attempt: Attempt(1),
            score,
            submitted_at: Timestamp(at),
            version: 0,
        }
    }

    #[test]
    fn best_score_per_team_ties_broken_by_submission_time() {
        let board = Leaderboard::build(
            Stage::Public,
            [
                result("a1", "alpha", 0.40, 1),
                result("a2", "alpha", 0.30, 2),
                result("b1", "beta", 0.30, 1),
                result("c1", "gamma", 0.69, 3),
            ],
        );
        let rows: Vec<(usize, &str, &str)> =
            board.entries.iter().map(|e| (e.rank, e.team.as_str(), e.submission.as_str())).collect();
        assert_eq!(rows, [(1, "beta", "b1"), (2, "alpha", "a2"), (3, "gamma", "c1")]);
        assert_eq!(
            board.to_csv(),
            "rank,team,submission,score,submitted_at_ms\n1,beta,b1,0.300000,1\n2,alpha,a2,0.300000,2\n3,gamma,c1,0.690000,3\n"
        );
    }

    #[test]
    fn the_same_results_in_any_order_give_the_same_board() {
        let results = [result("a", "t1", 0.5, 1), result("b", "t2", 0.2, 2), result("c", "t1", 0.1, 3)];
        let mut reversed = results.clone();
        reversed.reverse();
        assert_eq!(
            Leaderboard::build(Stage::Public, results).to_json(),
            Leaderboard::build(Stage::Public, reversed).to_json()
        );
    }

    /// One publish or withdrawal, by index into a small set of runs.
    #[derive(Debug, Clone)]
    enum Change {
        Publish { run: usize, attempt: u32, score: u8 },
        Withdraw { run: usize, attempt: u32 },
    }

    fn change() -> impl Strategy<Value = Change> {
        prop_oneof![
            (0..8usize, 1..4u32, 0..5u8).prop_map(|(run, attempt, score)| Change::Publish { run, attempt, score }),
            (0..8usize, 1..4u32).prop_map(|(run, attempt)| Change::Withdraw { run, attempt }),
        ]
    }

    fn published(run: usize, attempt: u32, score: u8) -> PublishedResult {
        let mut r = result(&format!("s{run}"), &format!("t{}", run % 3), f64::from(score) / 4.0, run as u64 % 2);
        r.attempt = Attempt(attempt);
        r
    }

    proptest! {
        /// Kept up change by change, the standings give the board built from
        /// scratch from what was published and not withdrawn, and say truly
        /// whether the changed team's row changed.
        #[test]
        fn standings_kept_up_match_a_board_built_from_scratch(changes in prop::collection::vec(change(), 0..40)) {
            let mut standings = Standings::default();
            let (mut results, mut withdrawn) = (Vec::<PublishedResult>::new(), HashSet::new());
            for change in changes {
                let before = standings.board(Stage::Public);
                let (team, changed) = match change {
                    Change::Publish { run, attempt, score } => {
                        let mut r = published(run, attempt, score);
                        r.version = results.len() as u64;
                        results.push(r.clone());
                        (r.team.clone(), standings.publish(r))
                    }
                    Change::Withdraw { run, attempt } => {
                        let r = published(run, attempt, 0);
                        withdrawn.insert((r.run.clone(), r.attempt));
                        (r.team.clone(), standings.withdraw(&r.team, &r.run, r.attempt))
                    }
                };
                let after = standings.board(Stage::Public);
                let row = |board: &Leaderboard| board.row(&team).map(|e| (e.run.clone(), e.score.to_bits()));
                prop_assert_eq!(changed, row(&before) != row(&after));
                // From scratch: of each run, the latest (attempt, version) not withdrawn.
                let mut latest: BTreeMap<RunId, &PublishedResult> = BTreeMap::new();
                for r in results.iter().filter(|r| !withdrawn.contains(&(r.run.clone(), r.attempt))) {
                    if latest.get(&r.run).is_none_or(|k| (k.attempt, k.version) < (r.attempt, r.version)) {
                        latest.insert(r.run.clone(), r);
                    }
                }
                let mut best: BTreeMap<TeamId, Entry> = BTreeMap::new();
                for r in latest.values() {
                    if best.get(&r.team).is_none_or(|b| order(r.key(), b.key()).is_lt()) {
                        best.insert(r.team.clone(), Entry::of(r));
                    }
                }
                prop_assert_eq!(after, Leaderboard::ranked(Stage::Public, best.into_values().collect()));
            }
        }
    }
}
