//! The leaderboard of a stage: derived from the published results, never
//! updated in place, so rebuilding it from the same results gives the same
//! bytes and publishing twice changes nothing.

use std::collections::BTreeMap;

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
}

impl PublishedResult {
    /// The result of `spec`'s attempt `attempt`, scored `score`.
    pub fn new(spec: &RunSpec, attempt: Attempt, score: Score) -> PublishedResult {
        PublishedResult {
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

/// A stage's leaderboard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Leaderboard {
    /// The stage.
    pub stage: Stage,
    /// One row per team, best first.
    pub entries: Vec<Entry>,
}

impl Leaderboard {
    /// The leaderboard of `stage` from its published results: each team's
    /// best score (lowest; on a tie, the earlier submission), ranked.
    pub fn build(stage: Stage, results: impl IntoIterator<Item = PublishedResult>) -> Leaderboard {
        let key = |r: &PublishedResult| (r.score, r.submitted_at, r.submission.clone());
        let mut best: BTreeMap<TeamId, PublishedResult> = BTreeMap::new();
        for result in results.into_iter().filter(|r| r.stage == stage) {
            match best.get(&result.team) {
                Some(current) if key(current) <= key(&result) => {}
                _ => _ = best.insert(result.team.clone(), result),
            }
        }
        let mut rows: Vec<PublishedResult> = best.into_values().collect();
        rows.sort_by(|a, b| key(a).partial_cmp(&key(b)).unwrap_or(std::cmp::Ordering::Equal));
        let entries = (1..)
            .zip(rows)
            .map(|(rank, r)| Entry {
                rank,
                team: r.team,
                submission: r.submission,
                run: r.run,
                score: r.score,
                submitted_at: r.submitted_at,
            })
            .collect();
        Leaderboard { stage, entries }
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

#[cfg(test)]
mod tests {
    use super::*;
    use evalflow_workflow::Attempt;

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
}
