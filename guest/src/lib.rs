//! The vmcontroller guest agent as a library.
//!
//! The agent is one tokio process: [`agent`] owns the STOMP session and dispatches
//! protocol words to [`exec`] (commands), [`files`] (transfers) and [`spool`]
//! (results kept until the host acknowledges them); [`presence`] builds HELLO and
//! STILL_ALIVE; [`identity`] finds the guest's id (its NIC's MAC) and the broker (its
//! default gateway); [`settings`] reads the TOML file and `VMC_*` variables. Every
//! part sends through the [`outbox`] channel, never through the session directly.

pub mod agent;
pub mod exec;
pub mod files;
pub mod identity;
pub mod outbox;
pub mod settings;
pub mod spool;

pub use vmc_protocol as protocol;

/// The version of this build, as printed by `--version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
