//! What runs cost: each attempt's running time at its profile's price.

use serde::{Deserialize, Serialize};

use crate::ids::ProfileName;
use crate::machine::{AttemptRecord, RunStatus};
use crate::policy::Policy;

/// How running time becomes billed time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Billing {
    /// The time the job ran (AWS: what the instance was busy for).
    Actual,
    /// The local stand-in: the time divided by the profile's relative speed,
    /// what the job would have taken on the real machine (a T4 at 0.45 runs
    /// 2.2 times longer than this machine).
    ScaledBySpeed,
}

/// The billed hours and price of one attempt; `None` while it has no usage
/// or when its profile is no longer configured.
pub fn attempt_cost(record: &AttemptRecord, policy: &Policy, billing: Billing) -> Option<(f64, f64)> {
    let usage = record.usage.as_ref()?;
    let profile = policy.profile(&record.profile)?;
    let speed = match billing {
        Billing::Actual => 1.0,
        Billing::ScaledBySpeed => profile.relative_speed,
    };
    let hours = usage.running_secs() / speed / 3600.0;
    Some((hours, hours * profile.price_per_hour_usd))
}

/// What a run's attempts cost so far, in US dollars.
pub fn run_cost_usd(status: &RunStatus, policy: &Policy, billing: Billing) -> f64 {
    // A fold from 0.0, not `sum`: the sum of no f64 is -0.0.
    status.attempts.iter().filter_map(|r| attempt_cost(r, policy, billing)).fold(0.0, |total, (_, usd)| total + usd)
}

/// One profile's line of the cost report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CostLine {
    /// The profile.
    pub profile: ProfileName,
    /// Attempts that ran on it.
    pub attempts: u64,
    /// Billed hours.
    pub hours: f64,
    /// Price, in US dollars.
    pub usd: f64,
}

/// Cost per profile, in ladder order, and in total.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CostReport {
    /// One line per configured profile.
    pub lines: Vec<CostLine>,
    /// Billed hours in all.
    pub total_hours: f64,
    /// Price in all, in US dollars.
    pub total_usd: f64,
}

/// The cost of every attempt of `runs`, per profile.
pub fn cost_report<'a>(runs: impl IntoIterator<Item = &'a RunStatus>, policy: &Policy, billing: Billing) -> CostReport {
    let mut lines: Vec<CostLine> = policy
        .profiles()
        .iter()
        .map(|p| CostLine { profile: p.name.clone(), attempts: 0, hours: 0.0, usd: 0.0 })
        .collect();
    for record in runs.into_iter().flat_map(|s| &s.attempts) {
        let (Some((hours, usd)), Some(line)) =
            (attempt_cost(record, policy, billing), lines.iter_mut().find(|l| l.profile == record.profile))
        else {
            continue;
        };
        line.attempts += 1;
        line.hours += hours;
        line.usd += usd;
    }
    let total_hours = lines.iter().fold(0.0, |total, l| total + l.hours);
    let total_usd = lines.iter().fold(0.0, |total, l| total + l.usd);
    CostReport { lines, total_hours, total_usd }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Attempt;
    use crate::machine::JobUsage;
    use crate::time::Timestamp;

    fn record(profile: &str, secs: u64) -> AttemptRecord {
        AttemptRecord {
            attempt: Attempt(1),
            profile: ProfileName::new(profile).unwrap(),
            launched_at: Timestamp(0),
            job: None,
            usage: Some(JobUsage {
                started_at: Some(Timestamp(0)),
                ended_at: Timestamp(secs * 1000),
                peak_memory_mib: None,
            }),
            end: None,
            evidence: None,
            waiting: None,
        }
    }

    #[test]
    fn the_case_reproduces_its_figures() {
        let policy = crate::policy::tests::case_policy();
        // 9 hours on a P3 cost 9 x $3.06; on a G4 the same job runs 9 / 0.45 = 20 hours at $0.526.
        let (hours, usd) = attempt_cost(&record("p3", 9 * 3600), &policy, Billing::Actual).unwrap();
        assert!((hours - 9.0).abs() < 1e-9 && (usd - 27.54).abs() < 1e-9);
        let (hours, usd) = attempt_cost(&record("g4", 9 * 3600), &policy, Billing::ScaledBySpeed).unwrap();
        assert!((hours - 20.0).abs() < 1e-9 && (usd - 10.52).abs() < 1e-9);
        assert!(attempt_cost(&record("gone", 60), &policy, Billing::Actual).is_none());
        let none = RunStatus::submitted(Timestamp(0));
        assert!(run_cost_usd(&none, &policy, Billing::Actual).is_sign_positive(), "no cost is 0, not -0");
    }
}
