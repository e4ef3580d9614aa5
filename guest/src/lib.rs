//! The vmcontroller guest agent as a library.
//!
//! Presence, command execution, the result spool and file transfer arrive with later
//! work; for now this crate only re-exports the protocol.

pub use vmc_protocol as protocol;

/// The version of this build, as printed by `--version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
