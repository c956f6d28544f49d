//! evalflow's workflow core: every submission run is a durable state machine.
//!
//! - [`machine::step`] is the pure transition function: `(run, event, now)` in,
//!   the next status and the commands it owes out. No I/O, no clock.
//! - [`policy::Policy`] is the configuration it decides with: the placement
//!   ladder, retry limits, the time limit.
//! - [`store::WorkflowStore`] persists runs: one history entry per event,
//!   written with the indexes in one atomic batch; [`store::SledStore`] on
//!   disk, [`store::MemoryStore`] as its in-memory twin.
//! - [`engine::Engine`] applies events in groups with one flush per group,
//!   hands out commands only after the flush, and on open recovers the
//!   commands every live run is owed.
//! - [`dispatcher::Dispatcher`] decides when the engine's commands go out:
//!   held launches, resends, the launch pause.
//! - [`replay`] rebuilds a run from its history and compares.
//! - [`sim`] runs the engine and dispatcher on a virtual clock against a
//!   model of the fleet, with faults; [`plan`] uses it without faults to
//!   say how many instances, how long and how much.
//!
//! Nothing here is async and nothing talks to a cloud: the worker crate
//! drives the engine and carries out its commands.

#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod cost;
pub mod dispatcher;
pub mod engine;
pub mod ids;
pub mod machine;
pub mod plan;
pub mod policy;
pub mod progress;
pub mod replay;
pub mod sim;
pub mod store;
pub mod time;

pub use engine::{Dispatch, Engine, EngineError, Input, Outcome};
pub use ids::{Attempt, IdError, JobId, ProfileName, RunId, Stage, SubmissionId, TeamId, job_name, parse_job_name};
pub use machine::{
    AUDIT_SUFFIX, Activity, AttemptEnd, AttemptRecord, Audit, Command, Detail, Disposition, Envelope, Event, Evidence,
    FailureReason, HistoryEntry, IgnoreReason, JobOutcome, JobUsage, LearnedStart, Limit, Resume, Run, RunSpec,
    RunState, RunStatus, Score, StateTag, SubmissionSource, Termination, Transition, TransitionError, Waiting,
    is_audit_name, learned_start, step,
};
pub use policy::{Policy, PolicyConfig, PolicyError, Profile, Resource, RetryPolicy};
pub use replay::{ReplayError, replay};
pub use store::{MemoryStore, SledStore, StateCounts, StoreError, WorkflowStore};
pub use time::Timestamp;
