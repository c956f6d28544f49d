//! The machine's tests: every transition of the table, driven event by event.

use super::*;
use crate::ids::{Attempt, JobId, ProfileName, Stage, SubmissionId, TeamId};
use crate::policy::tests::case_policy;
use crate::policy::{Policy, Resource};
use crate::time::Timestamp;

fn pn(name: &str) -> ProfileName {
    ProfileName::new(name).unwrap()
}

fn job(name: &str) -> JobId {
    JobId::new(name).unwrap()
}

fn usage() -> JobUsage {
    JobUsage { started_at: Some(Timestamp(1_000)), ended_at: Timestamp(9_000), peak_memory_mib: Some(100) }
}

/// One run driven event by event, at a clock that ticks one second per event.
struct Harness {
    policy: Policy,
    run: Run,
    now: Timestamp,
}

impl Harness {
    fn new(cpu_only: bool) -> Harness {
        let spec = RunSpec::new(
            SubmissionId::new("sub").unwrap(),
            TeamId::new("team").unwrap(),
            Stage::Public,
            cpu_only,
            SubmissionSource::Image { uri: "registry/sub:1".into() },
            Timestamp(0),
        );
        Harness {
            policy: case_policy(),
            run: Run { spec, status: RunStatus::submitted(Timestamp(0)) },
            now: Timestamp(0),
        }
    }

    fn try_step(&mut self, envelope: Envelope) -> Result<Transition, TransitionError> {
        self.now = self.now.plus_secs(1);
        let transition = step(&self.policy, &self.run, &envelope, self.now)?;
        transition.status.validate().unwrap();
        self.run.status = transition.status.clone();
        Ok(transition)
    }

    /// An unfenced event that must be accepted.
    fn feed(&mut self, event: Event) -> Transition {
        self.try_step(Envelope::unfenced(event)).unwrap()
    }

    /// The answer to the command issued at the current version.
    fn answer(&mut self, event: Event) -> Transition {
        let version = self.run.status.version;
        self.try_step(Envelope::answering(event, version)).unwrap()
    }

    fn state(&self) -> &RunState {
        &self.run.status.state
    }

    fn attempt(&self) -> Attempt {
        self.run.status.attempts.last().unwrap().attempt
    }

    fn launch(&mut self, job_name: &str) {
        let attempt = self.attempt();
        self.answer(Event::JobLaunched { attempt, job: job(job_name) });
    }

    fn end(&mut self, outcome: JobOutcome) -> Transition {
        let RunState::Running { attempt, job, .. } = self.state().clone() else { panic!("not running") };
        self.feed(Event::JobEnded { attempt, job, outcome, usage: usage(), evidence: Evidence::default() })
    }

    fn running(cpu_only: bool) -> Harness {
        let mut h = Harness::new(cpu_only);
        h.feed(Event::Admitted { start: None });
        h.launch("j1");
        h
    }

    fn predicted() -> Harness {
        let mut h = Harness::running(false);
        h.end(JobOutcome::Succeeded);
        h
    }

    fn scored() -> Harness {
        let mut h = Harness::predicted();
        let attempt = h.attempt();
        h.answer(Event::PredictionsScored { attempt, score: Score::new(0.2).unwrap() });
        h
    }

    fn published() -> Harness {
        let mut h = Harness::scored();
        let attempt = h.attempt();
        h.answer(Event::Published { attempt });
        h
    }

    fn failed() -> Harness {
        let mut h = Harness::running(false);
        h.end(JobOutcome::Crashed { exit_code: Some(3) });
        h
    }

    fn cancelled() -> Harness {
        let mut h = Harness::running(false);
        h.feed(Event::CancelRequested);
        h
    }
}

fn oom(resource: Resource) -> JobOutcome {
    JobOutcome::OutOfMemory { resource }
}

#[test]
fn admission_launches_on_the_cheapest_profile_of_the_ladder() {
    let mut h = Harness::new(false);
    let t = h.feed(Event::Admitted { start: None });
    assert_eq!(t.disposition, Disposition::Applied);
    assert_eq!(*h.state(), RunState::Launching { profile: pn("g4"), attempt: Attempt(1), not_before: None });
    assert_eq!(t.commands, [Command::LaunchJob { attempt: Attempt(1), profile: pn("g4"), not_before: None }]);
    assert_eq!(t.status.version, 2);

    let mut cpu = Harness::new(true);
    cpu.feed(Event::Admitted { start: None });
    assert!(matches!(cpu.state(), RunState::Launching { profile, .. } if *profile == pn("cpu")));
}

#[test]
fn a_start_learned_on_another_stage_is_where_the_run_starts() {
    let mut public = Harness::running(false);
    assert_eq!(learned_start(&public.run), None, "nothing learned while it runs");
    public.end(oom(Resource::GpuMemory));
    assert_eq!(learned_start(&public.run), None, "nor before it succeeded somewhere");
    public.launch("j2");
    public.end(JobOutcome::Succeeded);
    let learned = learned_start(&public.run).unwrap();
    assert_eq!(learned.profile, pn("p3"));
    assert_eq!(learned.reason.as_str(), "sub-public ran out of GPU memory on g4 and succeeded on p3");

    let mut private = Harness::new(false);
    private.feed(Event::Admitted { start: Some(learned.clone()) });
    assert_eq!(*private.state(), RunState::Launching { profile: pn("p3"), attempt: Attempt(1), not_before: None });

    // A profile of the other ladder, or one no longer configured, is not learned from.
    for profile in ["cpu", "gone"] {
        let mut h = Harness::new(false);
        h.feed(Event::Admitted { start: Some(LearnedStart { profile: pn(profile), ..learned.clone() }) });
        assert!(matches!(h.state(), RunState::Launching { profile, .. } if *profile == pn("g4")), "{profile}");
    }

    let mut crashed = Harness::running(false);
    crashed.end(JobOutcome::Crashed { exit_code: Some(1) });
    assert_eq!(learned_start(&crashed.run), None, "only an escalation that worked teaches");
}

#[test]
fn a_jobs_wait_is_noted_on_its_attempt_without_changing_the_state() {
    let mut h = Harness::running(false);
    let version = h.run.status.version;
    let waiting = |status: &str, reason: Option<&str>| Event::JobWaiting {
        attempt: Attempt(1),
        job: job("j1"),
        status: Detail::new(status),
        reason: reason.map(Detail::new),
    };
    let capacity = "CAPACITY:INSUFFICIENT_INSTANCE_CAPACITY - Service cannot fulfill the capacity requested";
    let t = h.feed(waiting("RUNNABLE", None));
    assert_eq!((t.disposition, t.commands.len(), t.status.version), (Disposition::Noted, 0, version));
    let since = h.run.status.attempts[0].waiting.as_ref().unwrap().since;
    h.feed(waiting("RUNNABLE", Some(capacity)));
    let noted = h.run.status.attempts[0].waiting.clone().unwrap();
    assert_eq!((noted.status.as_str(), noted.reason.unwrap().as_str()), ("RUNNABLE", capacity));
    assert_eq!(noted.since, since, "still RUNNABLE since it was first seen so");
    let t = h.feed(waiting("RUNNABLE", Some(capacity)));
    assert_eq!(t.disposition, Disposition::Ignored(IgnoreReason::Duplicate), "the same wait again");
    let stray =
        Event::JobWaiting { attempt: Attempt(1), job: job("other"), status: Detail::new("RUNNABLE"), reason: None };
    assert_eq!(h.feed(stray).disposition, Disposition::Ignored(IgnoreReason::NotAwaited));
    assert!(matches!(h.state(), RunState::Running { .. }));
}

#[test]
fn an_audit_run_is_scored_but_never_published() {
    let mut h = Harness::new(false);
    h.run.spec = h.run.spec.audit(2, Timestamp(5)).unwrap();
    assert_eq!(h.run.spec.run.as_str(), "sub-audit2-public");
    assert_eq!(h.run.spec.expected_run().unwrap(), h.run.spec.run);
    h.feed(Event::Admitted { start: None });
    h.launch("j1");
    h.end(JobOutcome::Succeeded);
    let score = Score::new(0.3).unwrap();
    let t = h.answer(Event::PredictionsScored { attempt: Attempt(1), score });
    assert_eq!(*h.state(), RunState::Published { attempt: Attempt(1), score });
    assert!(t.commands.is_empty(), "no Publish: {:?}", t.commands);
    assert!(is_audit_name("sub-audit2") && !is_audit_name("sub-audit"));
    assert!(!is_audit_name("auditor") && !is_audit_name("x-audit2b"));
}

#[test]
fn a_cpu_submission_without_a_cpu_ladder_fails_with_its_reason() {
    let mut h = Harness::new(true);
    h.policy = Policy::from_toml(
        "time_limit_secs = 60\n[[profile]]\nname = \"g4\"\nhost_memory_mib = 1\ngpu_memory_mib = 1\nvcpus = 1\n\
         price_per_hour_usd = 1.0\n",
    )
    .unwrap();
    h.feed(Event::Admitted { start: None });
    assert!(matches!(h.state(), RunState::Failed { reason: FailureReason::NoEligibleProfile { cpu_only: true }, .. }));
}

#[test]
fn admitting_a_run_that_is_not_queued_is_an_error() {
    let mut h = Harness::running(false);
    let err = h.try_step(Envelope::unfenced(Event::Admitted { start: None })).unwrap_err();
    assert!(matches!(err, TransitionError::NotQueued { state: StateTag::Running, .. }));
}

#[test]
fn a_launched_job_runs() {
    let h = Harness::running(false);
    assert_eq!(*h.state(), RunState::Running { profile: pn("g4"), attempt: Attempt(1), job: job("j1") });
    assert_eq!(h.run.status.attempts[0].job, Some(job("j1")));
    assert!(h.run.status.outbox().is_empty(), "a running job owes nothing: the watcher follows it");
}

#[test]
fn a_launch_failure_fails_the_run_as_cannot_start() {
    let mut h = Harness::new(false);
    h.feed(Event::Admitted { start: None });
    h.answer(Event::LaunchFailed { attempt: Attempt(1), error: Detail::new("no submission.toml") });
    let RunState::Failed { reason: FailureReason::CannotStart { detail }, resume: None } = h.state() else {
        panic!("{:?}", h.state())
    };
    assert_eq!(detail.as_str(), "no submission.toml");
    assert_eq!(h.run.status.attempts[0].end, Some(AttemptEnd::LaunchFailed));
}

#[test]
fn success_owes_scoring() {
    let mut h = Harness::running(false);
    let t = h.end(JobOutcome::Succeeded);
    assert_eq!(*h.state(), RunState::Predicted { profile: pn("g4"), attempt: Attempt(1), job: job("j1") });
    assert_eq!(t.commands, [Command::ScorePredictions { attempt: Attempt(1), job: job("j1") }]);
    assert_eq!(h.run.status.attempts[0].usage, Some(usage()));
}

#[test]
fn host_oom_on_g4_escalates_to_the_cheapest_profile_with_more_host_memory() {
    let mut h = Harness::running(false);
    let t = h.end(oom(Resource::HostMemory));
    assert_eq!(*h.state(), RunState::Launching { profile: pn("g4-2x"), attempt: Attempt(2), not_before: None });
    assert_eq!(t.commands, [Command::LaunchJob { attempt: Attempt(2), profile: pn("g4-2x"), not_before: None }]);
    assert_eq!(h.run.status.attempts[0].end, Some(AttemptEnd::Job(oom(Resource::HostMemory))));
}

#[test]
fn gpu_oom_on_g4_escalates_to_p3_then_fails_at_the_top() {
    let mut h = Harness::running(false);
    h.end(oom(Resource::GpuMemory));
    assert!(matches!(h.state(), RunState::Launching { profile, attempt: Attempt(2), .. } if *profile == pn("p3")));
    h.launch("j2");
    h.end(oom(Resource::GpuMemory));
    let expected = FailureReason::OutOfMemory { resource: Resource::GpuMemory, profile: pn("p3") };
    assert_eq!(*h.state(), RunState::Failed { reason: expected, resume: None });
}

#[test]
fn an_interruption_relaunches_on_the_same_profile_after_backoff() {
    let mut h = Harness::running(false);
    let interrupted = || JobOutcome::Interrupted { detail: Detail::new("Host EC2 (instance i-1) terminated.") };
    h.end(interrupted());
    let backoff_until = h.now.plus_secs(60);
    assert_eq!(
        *h.state(),
        RunState::Launching { profile: pn("g4"), attempt: Attempt(2), not_before: Some(backoff_until) }
    );
    assert_eq!(h.run.status.interruptions, 1);
    h.launch("j2");
    h.end(interrupted());
    assert!(matches!(h.state(), RunState::Launching { attempt: Attempt(3), .. }));
    h.launch("j3");
    h.end(interrupted());
    assert_eq!(
        *h.state(),
        RunState::Failed { reason: FailureReason::Interrupted { interruptions: 3 }, resume: None },
        "interruptions_max is 2"
    );
}

#[test]
fn timeouts_crashes_unstartable_images_and_broken_limits_fail_with_their_reason() {
    let cases = [
        (JobOutcome::TimedOut, FailureReason::TimedOut { profile: pn("g4") }),
        (JobOutcome::Crashed { exit_code: Some(2) }, FailureReason::Crashed { exit_code: Some(2) }),
        (
            JobOutcome::CannotStart { detail: Detail::new("CannotPullContainerError: x") },
            FailureReason::CannotStart { detail: Detail::new("CannotPullContainerError: x") },
        ),
        (
            JobOutcome::LimitExceeded { limit: Limit::Processes },
            FailureReason::LimitExceeded { limit: Limit::Processes },
        ),
    ];
    for (outcome, reason) in cases {
        let mut h = Harness::running(false);
        let t = h.end(outcome);
        assert_eq!(*h.state(), RunState::Failed { reason, resume: None });
        assert!(t.commands.is_empty());
    }
}

#[test]
fn a_job_end_that_overtakes_the_launch_report_still_counts() {
    let mut h = Harness::new(false);
    h.feed(Event::Admitted { start: None });
    h.feed(Event::JobEnded {
        attempt: Attempt(1),
        job: job("j1"),
        outcome: JobOutcome::Succeeded,
        usage: usage(),
        evidence: Evidence::default(),
    });
    assert_eq!(*h.state(), RunState::Predicted { profile: pn("g4"), attempt: Attempt(1), job: job("j1") });
    let version = h.run.status.version;
    let late = h.try_step(Envelope::answering(Event::JobLaunched { attempt: Attempt(1), job: job("j1") }, 2)).unwrap();
    assert!(matches!(late.disposition, Disposition::Ignored(IgnoreReason::StaleVersion { .. })));
    assert!(late.commands.is_empty(), "the job is known and ended: nothing to terminate");
    assert_eq!(h.run.status.version, version);
}

#[test]
fn scoring_then_publishing_ends_published() {
    let mut h = Harness::predicted();
    let score = Score::new(0.25).unwrap();
    let t = h.answer(Event::PredictionsScored { attempt: Attempt(1), score });
    assert_eq!(t.commands, [Command::Publish { attempt: Attempt(1), score }]);
    h.answer(Event::Published { attempt: Attempt(1) });
    assert_eq!(*h.state(), RunState::Published { attempt: Attempt(1), score });
    assert!(h.run.status.outbox().is_empty());
}

#[test]
fn rejected_predictions_fail_the_run() {
    let mut h = Harness::predicted();
    h.answer(Event::PredictionsRejected { attempt: Attempt(1), reason: Detail::new("row 3: value 1.5 > 1") });
    assert!(matches!(h.state(), RunState::Failed { reason: FailureReason::InvalidPredictions { .. }, resume: None }));
}

#[test]
fn a_failed_activity_after_the_job_resumes_there_on_retry() {
    let mut h = Harness::predicted();
    h.answer(Event::ActivityFailed { attempt: Attempt(1), activity: Activity::Score, error: Detail::new("labels") });
    assert!(matches!(h.state(), RunState::Failed { resume: Some(Resume::Score { .. }), .. }));
    let t = h.feed(Event::RetryRequested);
    assert_eq!(t.commands, [Command::ScorePredictions { attempt: Attempt(1), job: job("j1") }]);

    let mut h = Harness::scored();
    h.answer(Event::ActivityFailed { attempt: Attempt(1), activity: Activity::Publish, error: Detail::new("s3") });
    let t = h.feed(Event::RetryRequested);
    assert!(matches!(t.commands.as_slice(), [Command::Publish { attempt: Attempt(1), .. }]));

    let mut h = Harness::new(false);
    h.feed(Event::Admitted { start: None });
    h.answer(Event::ActivityFailed { attempt: Attempt(1), activity: Activity::Launch, error: Detail::new("api") });
    h.feed(Event::RetryRequested);
    assert_eq!(*h.state(), RunState::Queued, "a failed launch starts over");
}

#[test]
fn cancelling_a_running_run_owes_the_termination_of_its_job() {
    let mut h = Harness::running(false);
    let t = h.feed(Event::CancelRequested);
    assert_eq!(*h.state(), RunState::Cancelled);
    assert_eq!(t.commands, [Command::TerminateJob { attempt: Attempt(1), job: Some(job("j1")) }]);
    assert!(h.run.status.is_live(), "a cancelled run owing a termination stays live");
    assert_eq!(h.run.status.attempts[0].end, Some(AttemptEnd::Cancelled));
    let version = h.run.status.version;
    let t = h.feed(Event::JobTerminated { attempt: Attempt(1), job: Some(job("j1")) });
    assert_eq!(t.disposition, Disposition::Acknowledged);
    assert_eq!(h.run.status.version, version, "an acknowledgement is not a state change");
    assert!(!h.run.status.is_live());
}

#[test]
fn cancelling_a_launch_terminates_by_name_and_an_orphan_launch_is_terminated_too() {
    let mut h = Harness::new(false);
    h.feed(Event::Admitted { start: None });
    let launch_version = h.run.status.version;
    let t = h.feed(Event::CancelRequested);
    assert_eq!(t.commands, [Command::TerminateJob { attempt: Attempt(1), job: None }]);
    h.feed(Event::JobTerminated { attempt: Attempt(1), job: None });
    // The launch finishes after the terminator found nothing to stop.
    let late = Envelope::answering(Event::JobLaunched { attempt: Attempt(1), job: job("j1") }, launch_version);
    let t = h.try_step(late.clone()).unwrap();
    assert_eq!(t.disposition, Disposition::Ignored(IgnoreReason::OrphanJob));
    assert_eq!(t.commands, [Command::TerminateJob { attempt: Attempt(1), job: Some(job("j1")) }]);
    let again = h.try_step(late).unwrap();
    assert!(again.commands.is_empty(), "the termination is already owed");
}

#[test]
fn a_second_job_of_the_running_attempt_is_terminated_and_acknowledged_alone() {
    let mut h = Harness::new(false);
    h.feed(Event::Admitted { start: None });
    let launch_version = h.run.status.version;
    h.launch("j1");
    // A raced launch reports another job for the same attempt.
    let late = Envelope::answering(Event::JobLaunched { attempt: Attempt(1), job: job("j2") }, launch_version);
    let t = h.try_step(late).unwrap();
    assert_eq!(t.disposition, Disposition::Ignored(IgnoreReason::OrphanJob));
    assert_eq!(t.commands, [Command::TerminateJob { attempt: Attempt(1), job: Some(job("j2")) }]);
    assert!(matches!(h.state(), RunState::Running { job: j, .. } if *j == job("j1")), "the run keeps its job");
    h.feed(Event::CancelRequested);
    assert_eq!(h.run.status.terminations.len(), 2, "j1 (cancel) and j2 (orphan)");
    let t = h.feed(Event::JobTerminated { attempt: Attempt(1), job: Some(job("j2")) });
    assert_eq!(t.disposition, Disposition::Acknowledged);
    assert_eq!(h.run.status.terminations, [Termination { attempt: Attempt(1), job: Some(job("j1")) }]);
}

#[test]
fn a_launch_given_up_owes_the_termination_of_whatever_it_made() {
    let mut h = Harness::new(false);
    h.feed(Event::Admitted { start: None });
    let t = h.answer(Event::ActivityFailed {
        attempt: Attempt(1),
        activity: Activity::Launch,
        error: Detail::new("timeout"),
    });
    assert_eq!(t.commands, [Command::TerminateJob { attempt: Attempt(1), job: None }]);
    assert!(h.run.status.is_live(), "failed, but still owed a termination");
}

#[test]
fn cancel_from_each_live_state() {
    let starts = [
        Harness::new(false),
        {
            let mut h = Harness::new(false);
            h.feed(Event::Admitted { start: None });
            h
        },
        Harness::running(false),
        Harness::predicted(),
        Harness::scored(),
    ];
    for mut h in starts {
        let from = h.state().tag();
        h.feed(Event::CancelRequested);
        assert_eq!(*h.state(), RunState::Cancelled, "from {from}");
        let cleanup = |c: &Command| matches!(c, Command::TerminateJob { .. } | Command::Withdraw { .. });
        assert!(h.run.status.outbox().iter().all(cleanup), "from {from}");
    }
}

#[test]
fn cancelling_a_scored_run_withdraws_its_score_whatever_its_publish_does() {
    let mut h = Harness::scored();
    let publish_version = h.run.status.version;
    let t = h.feed(Event::CancelRequested);
    assert_eq!(t.commands, [Command::Withdraw { attempt: Attempt(1) }]);
    assert!(h.run.status.is_live(), "cancelled, but owed a withdrawal");
    // The publish that was under way lands afterwards: it changes nothing.
    let late = h.try_step(Envelope::answering(Event::Published { attempt: Attempt(1) }, publish_version)).unwrap();
    assert!(matches!(late.disposition, Disposition::Ignored(IgnoreReason::StaleVersion { .. })));
    assert_eq!(
        h.feed(Event::Withdrawn { attempt: Attempt(2) }).disposition,
        Disposition::Ignored(IgnoreReason::NotAwaited)
    );
    let version = h.run.status.version;
    let t = h.feed(Event::Withdrawn { attempt: Attempt(1) });
    assert_eq!(t.disposition, Disposition::Acknowledged);
    assert_eq!(h.run.status.version, version, "an acknowledgement is not a state change");
    assert!(!h.run.status.is_live());
}

#[test]
fn cancel_of_an_ended_run_is_refused_and_a_second_cancel_is_a_duplicate() {
    let mut h = Harness::published();
    let err = h.try_step(Envelope::unfenced(Event::CancelRequested)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "run sub-public is already published: only queued, launching, running, predicted or scored runs can be cancelled"
    );
    let mut h = Harness::cancelled();
    let t = h.feed(Event::CancelRequested);
    assert_eq!(t.disposition, Disposition::Ignored(IgnoreReason::Duplicate));
}

#[test]
fn retry_requeues_failed_and_cancelled_runs_keeping_the_attempt_count() {
    for mut h in [Harness::failed(), Harness::cancelled()] {
        h.feed(Event::RetryRequested);
        assert_eq!(*h.state(), RunState::Queued);
        h.feed(Event::Admitted { start: None });
        assert!(matches!(h.state(), RunState::Launching { attempt: Attempt(2), .. }), "a new job name");
    }
    let mut h = Harness::running(false);
    let err = h.try_step(Envelope::unfenced(Event::RetryRequested)).unwrap_err();
    assert!(matches!(err, TransitionError::NotRetryable { state: StateTag::Running, .. }));
}

#[test]
fn the_launch_bound_ends_endless_escalation_and_retries() {
    let mut h = Harness::new(false);
    for _ in 0..8 {
        h.feed(Event::Admitted { start: None });
        h.launch("j");
        h.end(JobOutcome::Crashed { exit_code: Some(1) });
        h.feed(Event::RetryRequested);
    }
    h.feed(Event::Admitted { start: None });
    assert_eq!(*h.state(), RunState::Failed { reason: FailureReason::AttemptsExhausted { attempts: 8 }, resume: None });
}

#[test]
fn stale_and_unawaited_events_are_ignored() {
    let mut h = Harness::running(false);
    let stale =
        Envelope::answering(Event::PredictionsScored { attempt: Attempt(1), score: Score::new(0.1).unwrap() }, 1);
    let t = h.try_step(stale).unwrap();
    assert_eq!(t.disposition, Disposition::Ignored(IgnoreReason::StaleVersion { expected: 1, actual: 3 }));
    let other_job = Event::JobEnded {
        attempt: Attempt(1),
        job: job("other"),
        outcome: JobOutcome::Succeeded,
        usage: usage(),
        evidence: Evidence::default(),
    };
    assert_eq!(h.feed(other_job).disposition, Disposition::Ignored(IgnoreReason::NotAwaited));
    let other_attempt = Event::JobEnded {
        attempt: Attempt(7),
        job: job("j1"),
        outcome: JobOutcome::Succeeded,
        usage: usage(),
        evidence: Evidence::default(),
    };
    assert_eq!(h.feed(other_attempt).disposition, Disposition::Ignored(IgnoreReason::NotAwaited));
    assert!(matches!(h.state(), RunState::Running { .. }));
}

#[test]
fn resubmitting_is_a_no_op_and_a_conflicting_submission_is_refused() {
    let mut h = Harness::running(false);
    let same = RunSpec { submitted_at: Timestamp(99), ..h.run.spec.clone() };
    assert_eq!(h.feed(Event::Submitted(same)).disposition, Disposition::Ignored(IgnoreReason::Duplicate));
    let other = RunSpec { cpu_only: true, ..h.run.spec.clone() };
    let err = h.try_step(Envelope::unfenced(Event::Submitted(other))).unwrap_err();
    assert!(matches!(err, TransitionError::SubmissionConflict { .. }));
}

/// Every event a run could be sent, for the attempt and job it last had.
fn every_event(h: &Harness) -> Vec<Event> {
    let attempt = h.run.status.attempts.last().map_or(Attempt(1), |r| r.attempt);
    let j = h.run.status.attempts.last().and_then(|r| r.job.clone()).unwrap_or_else(|| job("j1"));
    let ended =
        |outcome| Event::JobEnded { attempt, job: j.clone(), outcome, usage: usage(), evidence: Evidence::default() };
    vec![
        Event::Submitted(h.run.spec.clone()),
        Event::Admitted { start: None },
        Event::JobLaunched { attempt, job: j.clone() },
        Event::JobLaunched { attempt, job: job("stray") },
        Event::LaunchFailed { attempt, error: Detail::new("x") },
        ended(JobOutcome::Succeeded),
        ended(oom(Resource::HostMemory)),
        ended(oom(Resource::GpuMemory)),
        ended(JobOutcome::Interrupted { detail: Detail::new("spot") }),
        ended(JobOutcome::TimedOut),
        ended(JobOutcome::Crashed { exit_code: None }),
        ended(JobOutcome::CannotStart { detail: Detail::new("pull") }),
        ended(JobOutcome::LimitExceeded { limit: Limit::Disk }),
        Event::JobWaiting { attempt, job: j.clone(), status: Detail::new("RUNNABLE"), reason: None },
        Event::PredictionsScored { attempt, score: Score::new(0.5).unwrap() },
        Event::PredictionsRejected { attempt, reason: Detail::new("x") },
        Event::Published { attempt },
        Event::JobTerminated { attempt, job: Some(j.clone()) },
        Event::JobTerminated { attempt, job: None },
        Event::Withdrawn { attempt },
        Event::ActivityFailed { attempt, activity: Activity::Launch, error: Detail::new("x") },
        Event::ActivityFailed { attempt, activity: Activity::Score, error: Detail::new("x") },
        Event::ActivityFailed { attempt, activity: Activity::Publish, error: Detail::new("x") },
        Event::CancelRequested,
    ]
}

#[test]
fn terminal_states_absorb_every_event_but_retry() {
    for make in [Harness::published, Harness::failed, Harness::cancelled] {
        let base = make();
        for event in every_event(&base) {
            for fenced in [false, true] {
                let mut h = make();
                let envelope = if fenced {
                    Envelope::answering(event.clone(), h.run.status.version)
                } else {
                    Envelope::unfenced(event.clone())
                };
                let before = h.run.status.clone();
                if let Ok(t) = h.try_step(envelope) {
                    assert_eq!(t.status.state, before.state, "{} absorbed {event:?}", before.state.tag());
                    assert_eq!(t.status.version, before.version);
                    assert!(
                        t.commands.iter().all(|c| matches!(c, Command::TerminateJob { .. })),
                        "a terminal state only ever owes terminations (withdrawals come with a cancel)"
                    );
                }
            }
        }
    }
}

#[test]
fn a_rescore_scores_the_same_attempt_again_and_withdraws_it_if_it_fails() {
    for make in [Harness::published, Harness::scored] {
        let mut h = make();
        let (attempt, job_before) = (h.attempt(), h.run.status.attempts.last().unwrap().job.clone().unwrap());
        let t = h.feed(Event::RescoreRequested);
        assert_eq!(
            *h.state(),
            RunState::Predicted { profile: ProfileName::new("g4").unwrap(), attempt, job: job_before }
        );
        assert_eq!(t.commands.len(), 1, "{:?}", t.commands);
        assert!(matches!(t.commands[0], Command::ScorePredictions { .. }), "scored again: {:?}", t.commands);
        assert_eq!(h.run.status.attempts.len(), 1, "no job is run again");
        h.answer(Event::PredictionsScored { attempt, score: Score::new(0.9).unwrap() });
        h.answer(Event::Published { attempt });
        assert_eq!(*h.state(), RunState::Published { attempt, score: Score::new(0.9).unwrap() });
    }
    // With the corrected labels its predictions no longer score: its old score comes off the leaderboard.
    let mut h = Harness::published();
    let attempt = h.attempt();
    h.feed(Event::RescoreRequested);
    let t = h.answer(Event::PredictionsRejected { attempt, reason: Detail::new("no label for clip 7") });
    assert!(matches!(h.state(), RunState::Failed { reason: FailureReason::InvalidPredictions { .. }, .. }));
    assert_eq!(t.commands, [Command::Withdraw { attempt }]);
    let mut h = Harness::published();
    h.feed(Event::RescoreRequested);
    assert_eq!(h.feed(Event::CancelRequested).commands, [Command::Withdraw { attempt }], "cancelled while rescored");
    for make in [Harness::predicted, Harness::failed, Harness::cancelled, || Harness::running(false)] {
        let mut h = make();
        let err = h.try_step(Envelope::unfenced(Event::RescoreRequested)).unwrap_err();
        assert!(matches!(err, TransitionError::NotRescorable { .. }), "{err}");
        assert!(err.to_string().contains("only scored or published runs can be scored again"), "{err}");
    }
}

#[test]
fn the_transition_table_names_every_state_and_event() {
    let doc = include_str!("mod.rs").split("\nmod ").next().unwrap();
    for tag in StateTag::ALL {
        let name = format!("{tag:?}");
        assert!(doc.contains(&name), "state {name} is missing from the table");
    }
    let h = Harness::running(false);
    for event in every_event(&h).iter().chain([&Event::RetryRequested, &Event::RescoreRequested]) {
        let name = format!("{event:?}");
        let variant = name.split([' ', '(', '{']).next().unwrap();
        assert!(doc.contains(variant), "event {variant} is missing from the table");
    }
}

/// The table's rows, from the module doc: the states a row leaves, the
/// events that move them, and where they go (with its continuation lines).
fn table_rows() -> Vec<(Vec<String>, Vec<String>, String)> {
    let doc = include_str!("mod.rs");
    let table = doc.split("```text").nth(1).and_then(|t| t.split("```").next()).unwrap();
    // Qualifiers in braces ({start}, {TimedOut|Crashed}) are not names of events.
    let unbraced = |text: &str| {
        let mut depth = 0;
        text.chars()
            .filter(|c| {
                depth += i32::from(*c == '{') - i32::from(*c == '}');
                depth == 0 && *c != '}'
            })
            .collect::<String>()
    };
    let mut rows: Vec<(Vec<String>, Vec<String>, String)> = Vec::new();
    for line in table.lines().map(|l| l.trim_start_matches("//!").trim()).filter(|l| !l.is_empty()) {
        match line.split_once("--(") {
            Some((from, rest)) => {
                let (events, to) = rest.split_once(")-").unwrap();
                let sources = from.split('|').map(|s| s.trim().to_owned()).collect();
                let events = unbraced(events).split('|').map(|e| e.trim().to_owned()).collect();
                rows.push((sources, events, to.to_owned()));
            }
            None => rows.last_mut().unwrap().2.push_str(line),
        }
    }
    rows
}

/// Whether the table has a row that takes `from` by `event` to `to`.
fn table_allows(rows: &[(Vec<String>, Vec<String>, String)], from: &str, event: &str, to: &str) -> bool {
    rows.iter().any(|(sources, events, targets)| {
        let leaves = sources.iter().any(|s| s == "any" || s == from) && events.iter().any(|e| e == event);
        let named = |text: &str| text.split(|c: char| !c.is_alphanumeric()).any(|word| word == to);
        leaves
            && match targets.trim_start_matches(['-', '>', ' ']).strip_prefix("as from ") {
                Some(other) => table_allows(rows, other.split_whitespace().next().unwrap(), event, to),
                None => named(targets),
            }
    })
}

#[test]
fn every_move_the_code_makes_is_a_row_of_the_table() {
    let rows = table_rows();
    let launching = || {
        let mut h = Harness::new(false);
        h.feed(Event::Admitted { start: None });
        h
    };
    let states: [&dyn Fn() -> Harness; 8] = [
        &|| Harness::new(false),
        &launching,
        &|| Harness::running(false),
        &Harness::predicted,
        &Harness::scored,
        &Harness::published,
        &Harness::failed,
        &Harness::cancelled,
    ];
    let mut moves = 0;
    for make in states {
        let base = make();
        for event in every_event(&base).into_iter().chain([Event::RetryRequested, Event::RescoreRequested]) {
            for fenced in [false, true] {
                let mut h = make();
                let from = format!("{:?}", h.state().tag());
                let envelope = match fenced {
                    true => Envelope::answering(event.clone(), h.run.status.version),
                    false => Envelope::unfenced(event.clone()),
                };
                let Ok(transition) = h.try_step(envelope) else { continue };
                let to = format!("{:?}", transition.status.state.tag());
                let name = format!("{event:?}");
                let name = name.split([' ', '(', '{']).next().unwrap();
                if to != from {
                    moves += 1;
                    assert!(
                        table_allows(&rows, &from, name, &to),
                        "the code moves {from} --({name})--> {to}: not in the table"
                    );
                }
            }
        }
    }
    assert!(moves > 20, "the exploration moved {moves} times");
}
