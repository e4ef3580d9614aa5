//! The vmcontroller host agent as a library.
//!
//! [`hypervisor`] is the boundary to the VMs (the `Hypervisor` trait, the QEMU and
//! unmanaged backends); [`store`] keeps everything durable in SQLite. The actor
//! engine and the API are built on these.

pub mod engine;
pub mod hypervisor;
pub mod store;

pub use vmc_protocol as protocol;

/// The version of this build, as printed by `--version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
