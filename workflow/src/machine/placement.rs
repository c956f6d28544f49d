//! Placement learned across stages: where a run starts, from how another
//! run of the same submission went.

use super::detail::Detail;
use super::events::LearnedStart;
use super::outcome::JobOutcome;
use super::status::{AttemptEnd, AttemptRecord, Run};

/// Where another run of `sibling`'s submission should start: the profile
/// `sibling` succeeded on after running out of memory on a smaller one (the
/// private re-run of a final pick need not pay for the failed G4 attempt
/// again). `None` when it never ran out, or has not succeeded since.
pub fn learned_start(sibling: &Run) -> Option<LearnedStart> {
    let attempts = &sibling.status.attempts;
    let ended = |a: &AttemptRecord| match &a.end {
        Some(AttemptEnd::Job(outcome)) => Some(outcome.clone()),
        _ => None,
    };
    let succeeded = attempts.iter().rev().find(|a| ended(a) == Some(JobOutcome::Succeeded))?;
    let mut before = attempts.iter().rev().filter(|a| a.attempt < succeeded.attempt);
    let (ran_out, resource) = before.find_map(|a| match ended(a) {
        Some(JobOutcome::OutOfMemory { resource }) => Some((a, resource)),
        _ => None,
    })?;
    let reason = format!(
        "{} ran out of {} on {} and succeeded on {}",
        sibling.spec.run,
        resource.words(),
        ran_out.profile,
        succeeded.profile
    );
    Some(LearnedStart { profile: succeeded.profile.clone(), reason: Detail::new(reason) })
}
