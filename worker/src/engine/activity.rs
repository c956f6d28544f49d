//! Carrying out one command, once: the activity it names, and the events
//! that answer it. Both deployments' workers call this; retries are theirs
//! (in process: [`crate::local::worker::execute_with_retries`]; on AWS, the
//! tasks queue's receives).

use std::sync::Arc;

use evalflow_activities::scoring::{self, PREDICTIONS_MAX_BYTES};
use evalflow_activities::{ActivityError, ArtifactStore, JobRunner, LaunchRequest, PublishedResult};
use evalflow_workflow::{Activity, Command, Detail, Dispatch, Envelope, Event, Input, Policy};

/// What activities act on.
pub struct Activities {
    /// Where jobs run.
    pub runner: Arc<dyn JobRunner>,
    /// Predictions, labels, results, leaderboards.
    pub artifacts: Arc<dyn ArtifactStore>,
    /// The policy: profiles and the time limit.
    pub policy: Policy,
}

impl Activities {
    /// Carries out the command once and returns the events that answer it.
    pub async fn execute(&self, dispatch: &Dispatch) -> Result<Vec<Input>, ActivityError> {
        let spec = &dispatch.spec;
        let answer =
            |event| Input::Event { run: spec.run.clone(), envelope: Envelope::answering(event, dispatch.version) };
        let event = match &dispatch.command {
            Command::LaunchJob { attempt, profile, .. } => {
                let Some(profile) = self.policy.profile(profile) else {
                    let error = Detail::new(format!("profile {profile} is no longer in evalflow.toml"));
                    return Ok(vec![answer(Event::ActivityFailed {
                        attempt: *attempt,
                        activity: Activity::Launch,
                        error,
                    })]);
                };
                let request = LaunchRequest {
                    spec: spec.clone(),
                    attempt: *attempt,
                    profile: profile.clone(),
                    time_limit_secs: self.policy.time_limit_secs(),
                };
                match self.runner.launch(&request).await {
                    Ok(job) => Event::JobLaunched { attempt: *attempt, job },
                    Err(ActivityError::InvalidSubmission(error)) => {
                        Event::LaunchFailed { attempt: *attempt, error: Detail::new(error) }
                    }
                    Err(e) => return Err(e),
                }
            }
            Command::TerminateJob { attempt, job } => {
                self.runner.terminate(&spec.run, *attempt, job.as_ref()).await?;
                let event = Event::JobTerminated { attempt: *attempt, job: job.clone() };
                return Ok(vec![Input::Event { run: spec.run.clone(), envelope: Envelope::unfenced(event) }]);
            }
            Command::Withdraw { attempt } => {
                self.artifacts.withdraw(&spec.team, &spec.run, *attempt).await?;
                let event = Event::Withdrawn { attempt: *attempt };
                return Ok(vec![Input::Event { run: spec.run.clone(), envelope: Envelope::unfenced(event) }]);
            }
            Command::ScorePredictions { attempt, .. } => {
                let (predictions, labels) =
                    self.artifacts.scoring_inputs(&spec.run, *attempt, PREDICTIONS_MAX_BYTES).await?;
                match scoring::score(&predictions, &labels) {
                    Ok(score) => Event::PredictionsScored { attempt: *attempt, score },
                    Err(rejection) => {
                        Event::PredictionsRejected { attempt: *attempt, reason: Detail::new(rejection.to_string()) }
                    }
                }
            }
            Command::Publish { .. } if spec.audit.is_some() => {
                // The machine never asks it; a second lock behind it.
                return Err(ActivityError::Permanent(format!("{} is an audit run: it is never published", spec.run)));
            }
            Command::Publish { attempt, score } => {
                self.artifacts.publish(&PublishedResult::new(spec, *attempt, *score, dispatch.version)).await?;
                Event::Published { attempt: *attempt }
            }
        };
        Ok(vec![answer(event)])
    }
}

/// The event that reports giving up on a command, if it has one. A host
/// out of disk space gives up on nothing: the command stays owed, and the
/// engine sends it again.
pub fn gave_up(dispatch: &Dispatch, error: &ActivityError) -> Option<Input> {
    if let ActivityError::HostFull(_) = error {
        tracing::warn!(run = %dispatch.spec.run, command = dispatch.command.kind(), "{error}: it is carried out later");
        return None;
    }
    dispatch.given_up(error.to_string())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use evalflow_activities::artifacts::FsArtifacts;
    use evalflow_activities::leaderboard::Leaderboard;
    use evalflow_activities::local::job::Limits;
    use evalflow_activities::local::sandbox::Isolation;
    use evalflow_activities::local::{LocalRunner, LocalRunnerConfig};
    use evalflow_workflow::{Attempt, Score};

    use super::*;
    use crate::testing;

    #[test]
    fn a_full_disk_fails_no_run() {
        let full = ActivityError::from(std::io::Error::from(std::io::ErrorKind::StorageFull));
        assert!(matches!(full, ActivityError::HostFull(_)) && full.is_retryable());
        assert!(full.to_string().ends_with("free some, and the work goes on by itself"), "{full}");
        let spec = testing::spec("full");
        for command in [
            Command::LaunchJob {
                attempt: Attempt(1),
                profile: testing::policy().profiles()[0].name.clone(),
                not_before: None,
            },
            Command::ScorePredictions { attempt: Attempt(1), job: evalflow_workflow::JobId::new("j").unwrap() },
            Command::Publish { attempt: Attempt(1), score: Score::new(0.2).unwrap() },
        ] {
            let dispatch = Dispatch { spec: spec.clone(), version: 3, command };
            assert_eq!(gave_up(&dispatch, &full), None, "stays owed, is sent again: {:?}", dispatch.command);
            let other = ActivityError::Transient("throttled".into());
            assert!(gave_up(&dispatch, &other).is_some(), "other failures are given up on after retries");
        }
    }

    #[tokio::test]
    async fn a_withdrawal_takes_a_published_score_off_the_leaderboard() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits { pids_max: 64, disk_max_mib: 64, files_max: 1000, kill_grace_secs: 1 };
        let runner = LocalRunner::new(LocalRunnerConfig {
            jobs_dir: dir.path().join("jobs"),
            supervisor: Vec::new(),
            test_sets: BTreeMap::new(),
            isolation: Isolation::Sandbox,
            limits,
            signatures: Vec::new(),
        });
        let activities = Activities {
            runner: Arc::new(runner),
            artifacts: Arc::new(FsArtifacts::new(dir.path(), BTreeMap::new())),
            policy: testing::policy(),
        };
        let spec = testing::spec("late");
        let run = spec.run.clone();
        let board = || -> Leaderboard {
            serde_json::from_slice(&std::fs::read(dir.path().join("leaderboard/public.json")).unwrap()).unwrap()
        };

        let score = Score::new(0.2).unwrap();
        let publish =
            Dispatch { spec: spec.clone(), version: 6, command: Command::Publish { attempt: Attempt(1), score } };
        let answer = activities.execute(&publish).await.unwrap();
        let published = Envelope::answering(Event::Published { attempt: Attempt(1) }, 6);
        assert_eq!(answer, [Input::Event { run: run.clone(), envelope: published }]);
        assert_eq!(board().entries.len(), 1);

        let withdraw = Dispatch { spec, version: 7, command: Command::Withdraw { attempt: Attempt(1) } };
        let answer = activities.execute(&withdraw).await.unwrap();
        let withdrawn = Envelope::unfenced(Event::Withdrawn { attempt: Attempt(1) });
        assert_eq!(answer, [Input::Event { run, envelope: withdrawn }]);
        assert!(board().entries.is_empty(), "{:?}", board());
    }
}
