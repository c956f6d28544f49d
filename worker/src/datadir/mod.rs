//! The data directory: its lock (one engine or command at a time), the
//! submissions an organizer hands in, checked and kept in it, and its backup.

pub mod backup;
pub mod lock;
pub mod submit;
