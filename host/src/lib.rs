//! The vmcontroller host agent as a library.
//!
//! [`hypervisor`] is the boundary to the VMs (the `Hypervisor` trait, the QEMU and
//! unmanaged backends); [`store`] keeps everything durable in SQLite. The actor
//! [`engine`] is built on these, and [`api`] puts the engine's operations on the
//! network (XML-RPC, JSON).

pub mod api;
pub mod engine;
pub mod hypervisor;
pub mod settings;
pub mod store;

pub use vmc_protocol as protocol;

/// The version of this build, as printed by `--version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
