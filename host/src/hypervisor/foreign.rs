//! The stand-in for VMs that another backend made: a state directory kept across a
//! change of `backend` setting (say from `qemu` to `libvirt`) still lists them, and
//! they must not be handed to a backend that does not know them. Every operation is
//! refused with [`HypervisorError::WrongBackend`], which names the backend to run;
//! their state is `Unknown`. Commands and transfers still work, through the broker.

use super::{
    Hypervisor, HypervisorError, PerformanceData, SnapshotInfo, VmDefinition, VmSpec, VmState,
};

/// The backend answering for VMs of the `backend` backend while `running` runs.
#[derive(Debug)]
pub struct Foreign {
    pub backend: String,
    pub running: &'static str,
}

impl Foreign {
    fn refuse<T>(&self, vm: &VmDefinition) -> Result<T, HypervisorError> {
        Err(HypervisorError::WrongBackend {
            vm: vm.spec.name.clone(),
            backend: self.backend.clone(),
            running: self.running,
        })
    }
}

impl Hypervisor for Foreign {
    fn name(&self) -> &'static str {
        "foreign"
    }
    fn create(&self, spec: &VmSpec) -> Result<VmDefinition, HypervisorError> {
        Err(HypervisorError::InvalidSpec(format!(
            "VM {:?} cannot be created by a stand-in backend",
            spec.name
        )))
    }
    fn remove(&self, vm: &VmDefinition) -> Result<(), HypervisorError> {
        self.refuse(vm)
    }
    fn start(&self, vm: &VmDefinition) -> Result<(), HypervisorError> {
        self.refuse(vm)
    }
    fn shutdown(&self, vm: &VmDefinition) -> Result<(), HypervisorError> {
        self.refuse(vm)
    }
    fn sleep(&self, vm: &VmDefinition) -> Result<(), HypervisorError> {
        self.refuse(vm)
    }
    fn reset(&self, vm: &VmDefinition) -> Result<(), HypervisorError> {
        self.refuse(vm)
    }
    fn power_off(&self, vm: &VmDefinition) -> Result<(), HypervisorError> {
        self.refuse(vm)
    }
    fn pause(&self, vm: &VmDefinition) -> Result<(), HypervisorError> {
        self.refuse(vm)
    }
    fn resume(&self, vm: &VmDefinition) -> Result<(), HypervisorError> {
        self.refuse(vm)
    }
    fn state(&self, _vm: &VmDefinition) -> Result<VmState, HypervisorError> {
        Ok(VmState::Unknown)
    }
    fn save_state(&self, vm: &VmDefinition) -> Result<(), HypervisorError> {
        self.refuse(vm)
    }
    fn discard_state(&self, vm: &VmDefinition) -> Result<(), HypervisorError> {
        self.refuse(vm)
    }
    fn take_snapshot(
        &self,
        vm: &VmDefinition,
        _name: &str,
        _description: &str,
    ) -> Result<SnapshotInfo, HypervisorError> {
        self.refuse(vm)
    }
    fn restore_snapshot(&self, vm: &VmDefinition, _name: &str) -> Result<(), HypervisorError> {
        self.refuse(vm)
    }
    fn delete_snapshot(&self, vm: &VmDefinition, _name: &str) -> Result<(), HypervisorError> {
        self.refuse(vm)
    }
    fn list_snapshots(&self, vm: &VmDefinition) -> Result<Vec<SnapshotInfo>, HypervisorError> {
        self.refuse(vm)
    }
    fn performance(&self, vm: &VmDefinition) -> Result<PerformanceData, HypervisorError> {
        self.refuse(vm)
    }
}
