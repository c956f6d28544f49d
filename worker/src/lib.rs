//! evalflow's long-running parts: the engine thread that owns the store,
//! the activity workers, the job watcher, the data directory's lock, and the
//! HTTP API, put together as a [`node::Node`].

#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod activity;
pub mod api;
pub mod aws;
pub mod bootstrap;
pub mod config;
pub mod engine_thread;
pub mod local_worker;
pub mod lock;
pub mod node;
pub mod sqs;
pub mod submit;
pub mod views;
pub mod watcher;
