//! The vmcontroller host agent as a library.
//!
//! The engine (registry, VM, command and transfer actors, the store, the hypervisor
//! backends) and the API arrive with later work; for now this crate only re-exports
//! the protocol so that its binaries link against the shared wire types.

pub use vmc_protocol as protocol;

/// The version of this build, as printed by `--version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
