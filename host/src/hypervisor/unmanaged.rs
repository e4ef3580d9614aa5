//! The backend of guests that are not VMs this host runs: containers, bare machines,
//! or VMs of another tool, which appear when their guest agent says HELLO.
//!
//! Commands and file transfers work with them as with any guest (those go through
//! the broker, not the hypervisor); every lifecycle operation is answered with
//! [`HypervisorError::NotSupported`]. Their state is `Unknown`: whether they run is
//! told by presence, not by a hypervisor.

use super::{
    Hypervisor, HypervisorError, PerformanceData, SnapshotInfo, VmDefinition, VmSpec, VmState,
};

/// The name stored in [`VmDefinition::backend`] for unmanaged guests.
pub const NAME: &str = "unmanaged";

/// The backend with no hypervisor behind it.
#[derive(Debug, Default)]
pub struct Unmanaged;

fn unsupported<T>(operation: &'static str) -> Result<T, HypervisorError> {
    Err(HypervisorError::NotSupported {
        backend: NAME,
        operation,
    })
}

impl Hypervisor for Unmanaged {
    fn name(&self) -> &'static str {
        NAME
    }
    fn create(&self, _spec: &VmSpec) -> Result<VmDefinition, HypervisorError> {
        unsupported("createVM (unmanaged guests appear by saying HELLO)")
    }
    fn remove(&self, _vm: &VmDefinition) -> Result<(), HypervisorError> {
        Ok(()) // nothing of ours to delete: the registry forgets the guest
    }
    fn start(&self, _vm: &VmDefinition) -> Result<(), HypervisorError> {
        unsupported("start")
    }
    fn shutdown(&self, _vm: &VmDefinition) -> Result<(), HypervisorError> {
        unsupported("shutdown")
    }
    fn sleep(&self, _vm: &VmDefinition) -> Result<(), HypervisorError> {
        unsupported("sleep")
    }
    fn reset(&self, _vm: &VmDefinition) -> Result<(), HypervisorError> {
        unsupported("reset")
    }
    fn power_off(&self, _vm: &VmDefinition) -> Result<(), HypervisorError> {
        unsupported("powerOff")
    }
    fn pause(&self, _vm: &VmDefinition) -> Result<(), HypervisorError> {
        unsupported("pause")
    }
    fn resume(&self, _vm: &VmDefinition) -> Result<(), HypervisorError> {
        unsupported("resume")
    }
    fn state(&self, _vm: &VmDefinition) -> Result<VmState, HypervisorError> {
        Ok(VmState::Unknown)
    }
    fn save_state(&self, _vm: &VmDefinition) -> Result<(), HypervisorError> {
        unsupported("saveState")
    }
    fn discard_state(&self, _vm: &VmDefinition) -> Result<(), HypervisorError> {
        unsupported("discardState")
    }
    fn take_snapshot(
        &self,
        _vm: &VmDefinition,
        _name: &str,
        _description: &str,
    ) -> Result<SnapshotInfo, HypervisorError> {
        unsupported("takeSnapshot")
    }
    fn restore_snapshot(&self, _vm: &VmDefinition, _name: &str) -> Result<(), HypervisorError> {
        unsupported("restoreSnapshot")
    }
    fn delete_snapshot(&self, _vm: &VmDefinition, _name: &str) -> Result<(), HypervisorError> {
        unsupported("deleteSnapshot")
    }
    fn list_snapshots(&self, _vm: &VmDefinition) -> Result<Vec<SnapshotInfo>, HypervisorError> {
        Ok(Vec::new())
    }
    fn performance(&self, _vm: &VmDefinition) -> Result<PerformanceData, HypervisorError> {
        unsupported("getPerformanceData")
    }
}
