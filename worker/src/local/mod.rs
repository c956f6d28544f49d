//! The embedded deployment's own parts (`evalflow serve` and `evalflow
//! demo` on one machine): the in-process workers, and the watch on the free
//! disk space the local jobs write to. Its jobs run in the sandbox of
//! `evalflow_activities::local`.

pub mod space;
pub mod worker;
