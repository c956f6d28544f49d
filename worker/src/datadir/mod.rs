//! The data directory: its lock (one engine or command at a time), and the
//! submissions an organizer hands in, checked and kept in it.

pub mod lock;
pub mod submit;
