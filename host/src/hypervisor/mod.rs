//! The hypervisor boundary: one trait covering every lifecycle operation of the
//! original VMController API, and the plain types it speaks.
//!
//! The trait is synchronous and object-safe (`Arc<dyn Hypervisor>`): backends drive
//! processes and sockets with blocking calls, and the VM actors call them on
//! tokio's blocking pool, so a slow hypervisor never stalls an actor's mailbox.
//! A backend that cannot do something answers [`HypervisorError::NotSupported`]
//! with a sentence naming the backend and the operation. Backends: [`qemu`] (real,
//! QMP), [`libvirt`] (domains through `virsh`), [`unmanaged`] (guests that say HELLO
//! without a VM: every lifecycle call is "not supported"); VirtualBox would fit
//! behind the same trait.
//! What a backend does not own: presence (the guest agent's business) and the store
//! (the registry persists what [`Hypervisor::create`] returns). The few helpers at
//! the end ([`failed`], [`require_state`], [`DiskCounters`]) keep the backends'
//! errors and figures alike.

pub mod foreign;
pub mod libvirt;
pub mod qemu;
pub mod unmanaged;

use std::fmt;
use std::path::PathBuf;

/// A VM's state, with the original VMController's names (`getState` returns these).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VmState {
    Unknown,
    PoweredOff,
    Saved,
    /// The VM process died unexpectedly (crash, kill): never shown as Running.
    Aborted,
    Running,
    Paused,
    Stuck,
    Starting,
    Stopping,
    Saving,
    Restoring,
    Discarding,
}

impl VmState {
    /// Every state, in the original's order.
    pub const ALL: [VmState; 12] = [
        VmState::Unknown,
        VmState::PoweredOff,
        VmState::Saved,
        VmState::Aborted,
        VmState::Running,
        VmState::Paused,
        VmState::Stuck,
        VmState::Starting,
        VmState::Stopping,
        VmState::Saving,
        VmState::Restoring,
        VmState::Discarding,
    ];

    /// The name as the original API spelled it.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Unknown => "Unknown",
            VmState::PoweredOff => "PoweredOff",
            VmState::Saved => "Saved",
            VmState::Aborted => "Aborted",
            VmState::Running => "Running",
            VmState::Paused => "Paused",
            VmState::Stuck => "Stuck",
            VmState::Starting => "Starting",
            VmState::Stopping => "Stopping",
            VmState::Saving => "Saving",
            VmState::Restoring => "Restoring",
            VmState::Discarding => "Discarding",
        }
    }

    /// Parses a name written by [`as_str`](Self::as_str).
    pub fn parse(name: &str) -> Option<VmState> {
        VmState::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// The states in which the VM's hypervisor process runs (or, for Unknown, may).
    pub const WITH_PROCESS: [VmState; 8] = [
        VmState::Running,
        VmState::Paused,
        VmState::Starting,
        VmState::Stopping,
        VmState::Saving,
        VmState::Restoring,
        VmState::Stuck,
        VmState::Unknown,
    ];

    /// Whether a guest agent can be running in this state.
    pub fn is_on(self) -> bool {
        matches!(
            self,
            VmState::Running | VmState::Paused | VmState::Starting | VmState::Stopping
        )
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a caller asks for when creating a VM (`createVM(name, hddImagePath)` plus
/// the settings the original left to VirtualBox).
#[derive(Clone, Debug, PartialEq)]
pub struct VmSpec {
    pub name: String,
    /// The disk image the VM boots from or mounts. The backend never writes to it:
    /// it makes its own copy-on-write overlay.
    pub image: Option<PathBuf>,
    /// Direct kernel boot (QEMU `-kernel`), e.g. for a guest with no bootloader.
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub kernel_args: Option<String>,
    pub memory_mib: u32,
    pub cpus: u32,
    /// The NIC's MAC address, upper-case; the backend picks a stable one when absent.
    pub mac: Option<String>,
}

/// The `n`th candidate MAC for a VM named `name` that was given none: `52:54:00`
/// (QEMU's prefix) and three bytes of the SHA-256 of the name (of `name#n` for
/// `n` > 0), upper-case. Stable for a name; the registry takes the first one no
/// other VM of this host has, since three bytes collide among a few thousand names.
pub fn default_mac(name: &str, n: u32) -> String {
    use sha2::{Digest, Sha256};
    let hash = if n == 0 {
        Sha256::digest(name.as_bytes())
    } else {
        Sha256::digest(format!("{name}#{n}").as_bytes())
    };
    format!("52:54:00:{:02X}:{:02X}:{:02X}", hash[0], hash[1], hash[2])
}

impl VmSpec {
    /// A spec with the defaults: 256 MiB, 1 CPU, no kernel.
    pub fn new(name: impl Into<String>) -> VmSpec {
        VmSpec {
            name: name.into(),
            image: None,
            kernel: None,
            initrd: None,
            kernel_args: None,
            memory_mib: 256,
            cpus: 1,
            mac: None,
        }
    }
}

/// A VM as a backend created it; the registry stores it and hands it back on
/// every call.
#[derive(Clone, Debug, PartialEq)]
pub struct VmDefinition {
    pub spec: VmSpec,
    /// The backend that owns the VM (`qemu`, `unmanaged`, ...).
    pub backend: String,
    /// The NIC's MAC address, upper-case: the guest agent's id.
    pub mac: String,
    /// The directory holding the VM's own files (overlay disk, sockets, saved state).
    pub dir: PathBuf,
}

/// One snapshot of a VM.
#[derive(Clone, Debug, PartialEq)]
pub struct SnapshotInfo {
    pub name: String,
    pub description: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Size of the saved VM state, if the snapshot holds one (0 for disk-only).
    pub vm_state_bytes: u64,
}

/// Performance figures of a running VM (`getPerformanceData`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PerformanceData {
    /// CPU time used by the VM process, user + system, seconds.
    pub cpu_secs: f64,
    /// Resident memory of the VM process, bytes.
    pub rss_bytes: u64,
    pub disk_read_bytes: u64,
    pub disk_write_bytes: u64,
    pub disk_read_ops: u64,
    pub disk_write_ops: u64,
    /// Seconds since the VM process started.
    pub uptime_secs: f64,
    /// Backend-specific extra figures (name, value).
    pub extra: Vec<(String, f64)>,
}

/// Why a hypervisor operation failed.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("the {backend} backend does not support {operation}")]
    NotSupported {
        backend: &'static str,
        operation: &'static str,
    },
    #[error("VM {vm:?} cannot {operation} while it is {state}")]
    InvalidState {
        vm: String,
        operation: &'static str,
        state: VmState,
    },
    #[error("VM {vm:?} has no snapshot named {snapshot:?}")]
    NoSuchSnapshot { vm: String, snapshot: String },
    #[error("VM {vm:?} already has a snapshot named {snapshot:?}")]
    SnapshotExists { vm: String, snapshot: String },
    #[error("invalid VM settings: {0}")]
    InvalidSpec(String),
    #[error(
        "VM {vm:?} was made by the {backend} backend, but this host agent runs {running}: \
         start vmc-host with VMC_BACKEND={backend} to manage it"
    )]
    WrongBackend {
        vm: String,
        backend: String,
        running: &'static str,
    },
    #[error("{operation} of VM {vm:?} failed: {message}")]
    Failed {
        vm: String,
        operation: &'static str,
        message: String,
    },
    #[error("{operation} of VM {vm:?} did not finish within {secs} s")]
    Timeout {
        vm: String,
        operation: &'static str,
        secs: u64,
    },
    #[error("I/O error during {operation} of VM {vm:?}")]
    Io {
        vm: String,
        operation: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Every lifecycle operation of the original API, for one backend.
///
/// Calls block (run them on a blocking thread) and must be safe to make from
/// several threads for different VMs; calls for one VM come from its actor, one at
/// a time. Every method gets the definition the backend returned from `create`.
pub trait Hypervisor: Send + Sync + fmt::Debug {
    /// The backend's name, as stored in [`VmDefinition::backend`].
    fn name(&self) -> &'static str;
    /// Creates the VM's files (an overlay of `spec.image`, its MAC); does not start it.
    fn create(&self, spec: &VmSpec) -> Result<VmDefinition, HypervisorError>;
    /// Powers the VM off if needed and removes every file the backend made for it.
    fn remove(&self, vm: &VmDefinition) -> Result<(), HypervisorError>;
    /// Starts the VM, from its saved state when it has one.
    fn start(&self, vm: &VmDefinition) -> Result<(), HypervisorError>;
    /// Presses the ACPI power button; returns at once (the guest decides).
    fn shutdown(&self, vm: &VmDefinition) -> Result<(), HypervisorError>;
    /// Puts the VM to sleep (ACPI S3) where the backend can.
    fn sleep(&self, vm: &VmDefinition) -> Result<(), HypervisorError>;
    fn reset(&self, vm: &VmDefinition) -> Result<(), HypervisorError>;
    /// Cuts the power at once.
    fn power_off(&self, vm: &VmDefinition) -> Result<(), HypervisorError>;
    fn pause(&self, vm: &VmDefinition) -> Result<(), HypervisorError>;
    fn resume(&self, vm: &VmDefinition) -> Result<(), HypervisorError>;
    /// The VM's state as the backend sees it now (a dead process is `Aborted`).
    fn state(&self, vm: &VmDefinition) -> Result<VmState, HypervisorError>;
    /// Saves the running VM's memory and device state to a file and stops it.
    fn save_state(&self, vm: &VmDefinition) -> Result<(), HypervisorError>;
    /// Forgets a saved state; the next start boots afresh.
    fn discard_state(&self, vm: &VmDefinition) -> Result<(), HypervisorError>;
    fn take_snapshot(
        &self,
        vm: &VmDefinition,
        name: &str,
        description: &str,
    ) -> Result<SnapshotInfo, HypervisorError>;
    fn restore_snapshot(&self, vm: &VmDefinition, name: &str) -> Result<(), HypervisorError>;
    fn delete_snapshot(&self, vm: &VmDefinition, name: &str) -> Result<(), HypervisorError>;
    fn list_snapshots(&self, vm: &VmDefinition) -> Result<Vec<SnapshotInfo>, HypervisorError>;
    /// The NIC's MAC address, upper-case (the guest agent's id).
    fn mac_address(&self, vm: &VmDefinition) -> Result<String, HypervisorError> {
        Ok(vm.mac.clone())
    }
    fn performance(&self, vm: &VmDefinition) -> Result<PerformanceData, HypervisorError>;
}

/// `Failed`, with `error` and its causes as the message.
pub(crate) fn failed(
    vm: &VmDefinition,
    operation: &'static str,
    error: impl std::error::Error,
) -> HypervisorError {
    HypervisorError::Failed {
        vm: vm.spec.name.clone(),
        operation,
        message: vmc_protocol::agent_main::error_chain(&error),
    }
}

/// `InvalidState` unless `state` is one of `allowed`.
pub(crate) fn require_state(
    vm: &VmDefinition,
    operation: &'static str,
    state: VmState,
    allowed: &[VmState],
) -> Result<(), HypervisorError> {
    if allowed.contains(&state) {
        Ok(())
    } else {
        Err(HypervisorError::InvalidState {
            vm: vm.spec.name.clone(),
            operation,
            state,
        })
    }
}

/// A running VM's disk counters, summed over its disks, as its hypervisor counts
/// them.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct DiskCounters {
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub read_ops: u64,
    pub write_ops: u64,
    pub flush_ops: u64,
    pub read_time_ns: u64,
    pub write_time_ns: u64,
}

impl DiskCounters {
    /// The VM's figures: these counters, the process's, and the same extras
    /// (`disk_flush_ops`, `disk_read_time_ms`, `disk_write_time_ms`, `vcpus`) from
    /// every backend.
    pub(crate) fn into_performance(
        self,
        vm: &VmDefinition,
        cpu_secs: f64,
        rss_bytes: u64,
        uptime_secs: f64,
    ) -> PerformanceData {
        PerformanceData {
            cpu_secs,
            rss_bytes,
            disk_read_bytes: self.read_bytes,
            disk_write_bytes: self.write_bytes,
            disk_read_ops: self.read_ops,
            disk_write_ops: self.write_ops,
            uptime_secs,
            extra: vec![
                ("disk_flush_ops".into(), self.flush_ops as f64),
                ("disk_read_time_ms".into(), self.read_time_ns as f64 / 1e6),
                ("disk_write_time_ms".into(), self.write_time_ns as f64 / 1e6),
                ("vcpus".into(), f64::from(vm.spec.cpus)),
            ],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_macs_are_stable_distinct_and_in_qemus_range() {
        let first = default_mac("web-1", 0);
        assert_eq!(first, default_mac("web-1", 0), "stable for a name");
        // `printf web-1 | sha256sum` starts c4719a.
        assert_eq!(first, "52:54:00:C4:71:9A");
        let candidates: std::collections::BTreeSet<String> =
            (0..64).map(|n| default_mac("web-1", n)).collect();
        assert_eq!(candidates.len(), 64, "each candidate differs");
        assert_ne!(default_mac("web-1", 1), default_mac("web-2", 1));
    }

    #[test]
    fn state_names_are_the_originals() {
        let names: Vec<&str> = VmState::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            names,
            [
                "Unknown",
                "PoweredOff",
                "Saved",
                "Aborted",
                "Running",
                "Paused",
                "Stuck",
                "Starting",
                "Stopping",
                "Saving",
                "Restoring",
                "Discarding"
            ]
        );
        for state in VmState::ALL {
            assert_eq!(VmState::parse(state.as_str()), Some(state));
        }
    }
}
