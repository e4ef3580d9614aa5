//! The QEMU backend against real QEMU and a real (tiny) Linux guest.
//!
//! The guest, its serial console's reports and the checks this backend shares
//! with the libvirt one are in `common/`. Each test has its own state directory
//! and at most one VM; a semaphore keeps at most two VMs running at once, and a
//! guard kills a test's QEMU whatever happens. What it does not cover: KVM (this
//! machine's is unusable; the backend's choice is printed, not asserted).

mod common;

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use vmc_host::hypervisor::qemu::{Qemu, QemuSettings};
use vmc_host::hypervisor::{Hypervisor, HypervisorError, VmDefinition, VmState};

use common::{
    boots, fill_disk_start, last_line_value, last_tick, serial, timed, tiny_guest, tiny_guest_spec,
    wait_until, Slot,
};

/// A test's backend over its own state directory.
struct Lab {
    qemu: Qemu,
    settings: QemuSettings,
    dir: tempfile::TempDir,
    _slot: Slot,
}

impl Lab {
    fn new() -> Lab {
        Lab::with(|_| {})
    }

    fn with(adjust: impl FnOnce(&mut QemuSettings)) -> Lab {
        tiny_guest();
        let slot = Slot::take();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut settings = QemuSettings::new(dir.path().join("state"));
        settings.broker_relay = env!("CARGO_BIN_EXE_vmc-host").into();
        adjust(&mut settings);
        let started = Instant::now();
        let qemu = Qemu::new(settings.clone()).expect("the QEMU backend sets up");
        println!(
            "backend ready in {} ms: {}, accelerator {:?} ({})",
            started.elapsed().as_millis(),
            qemu.qemu_version(),
            qemu.accelerator(),
            qemu.accelerator_reason()
        );
        Lab {
            qemu,
            settings,
            dir,
            _slot: slot,
        }
    }

    /// A VM booting the tiny guest, with `image` as its disk's backing file.
    fn create(&self, name: &str, image: Option<PathBuf>, extra_args: &str) -> Guard<'_> {
        let spec = tiny_guest_spec(name, image, extra_args);
        let vm = self.qemu.create(&spec).expect("createVM");
        Guard { lab: self, vm }
    }
}

/// Kills the VM's QEMU however the test ends.
struct Guard<'a> {
    lab: &'a Lab,
    vm: VmDefinition,
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        let _ = self.lab.qemu.power_off(&self.vm);
        if let Some(pid) = qemu_pid(&self.vm) {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&*self.vm.dir.to_string_lossy()) {
                let _ = Command::new("kill")
                    .arg("-KILL")
                    .arg(pid.to_string())
                    .status();
            }
        }
    }
}

impl std::ops::Deref for Guard<'_> {
    type Target = VmDefinition;
    fn deref(&self) -> &VmDefinition {
        &self.vm
    }
}

fn qemu_pid(vm: &VmDefinition) -> Option<u32> {
    fs::read_to_string(vm.dir.join("qemu.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn state(lab: &Lab, vm: &VmDefinition) -> VmState {
    lab.qemu.state(vm).expect("getState")
}

#[test]
fn lifecycle_operations_move_the_vm_through_the_right_states() {
    let lab = Lab::new();
    let vm = lab.create("life", None, "");
    assert_eq!(state(&lab, &vm), VmState::PoweredOff);

    timed("start", || lab.qemu.start(&vm).expect("start"));
    assert_eq!(state(&lab, &vm), VmState::Running);
    let pid = qemu_pid(&vm).expect("QEMU's pid file");
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).expect("QEMU's command line");
    let args: Vec<String> = cmdline
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let accel = args.iter().skip_while(|a| *a != "-accel").nth(1);
    assert_eq!(
        accel.map(String::as_str),
        Some(lab.qemu.accelerator().as_str())
    );
    assert!(
        vm.dir.join("qga.sock").exists(),
        "QEMU listens for a guest agent's host end in the VM's directory"
    );
    common::run_through_the_lifecycle(&lab.qemu, &vm);
}

#[test]
fn snapshots_bring_back_the_disk_contents() {
    let lab = Lab::new();
    let base = lab.dir.path().join("base.raw");
    let mut content = vec![0xAAu8; 64];
    content.resize(1 << 20, 0);
    fs::write(&base, &content).expect("base image");
    let vm = lab.create("snap", Some(base.clone()), "");

    let pristine = lab
        .qemu
        .take_snapshot(&vm, "pristine", "as created")
        .expect("snapshot off");
    assert_eq!(pristine.description, "as created");
    assert_eq!(
        pristine.vm_state_bytes, 0,
        "a snapshot of a powered-off VM is disk-only"
    );
    assert!(matches!(
        lab.qemu.take_snapshot(&vm, "pristine", "again"),
        Err(HypervisorError::SnapshotExists { .. })
    ));

    // Change the overlay while the VM is off: the first 64 bytes become 0xbb.
    fill_disk_start(&Qemu::disk_path(&vm), 0xbb);

    lab.qemu.start(&vm).expect("start");
    wait_until(&vm, "the guest to show the changed disk", || {
        last_line_value(&serial(&vm), "DISK ") == Some("bb".repeat(64))
    });
    let running = timed("takeSnapshot (running)", || {
        lab.qemu
            .take_snapshot(&vm, "changed", "0xbb, taken running")
            .expect("snapshot running")
    });
    assert!(
        running.vm_state_bytes > 0,
        "a running VM's snapshot holds its memory"
    );
    assert_eq!(state(&lab, &vm), VmState::Running);
    match lab.qemu.restore_snapshot(&vm, "pristine") {
        Err(HypervisorError::InvalidState {
            state: VmState::Running,
            ..
        }) => {}
        other => panic!("restoring a disk-only snapshot into a running VM: {other:?}"),
    }

    lab.qemu.power_off(&vm).expect("powerOff");
    timed("restoreSnapshot (off)", || {
        lab.qemu.restore_snapshot(&vm, "pristine").expect("restore")
    });
    lab.qemu.start(&vm).expect("start");
    wait_until(&vm, "a second boot", || boots(&serial(&vm)) == 2);
    wait_until(&vm, "the guest to show the restored disk", || {
        last_line_value(&serial(&vm), "DISK ") == Some("aa".repeat(64))
    });

    timed("restoreSnapshot (running)", || {
        lab.qemu
            .restore_snapshot(&vm, "changed")
            .expect("restore running")
    });
    assert_eq!(state(&lab, &vm), VmState::Running);
    lab.qemu.reset(&vm).expect("reset");
    wait_until(&vm, "a third boot", || boots(&serial(&vm)) == 3);
    wait_until(&vm, "the disk of the running snapshot", || {
        last_line_value(&serial(&vm), "DISK ") == Some("bb".repeat(64))
    });

    let listed = lab.qemu.list_snapshots(&vm).expect("list");
    let names: Vec<(&str, &str)> = listed
        .iter()
        .map(|s| (s.name.as_str(), s.description.as_str()))
        .collect();
    assert_eq!(
        names,
        [
            ("pristine", "as created"),
            ("changed", "0xbb, taken running")
        ]
    );
    timed("deleteSnapshot (running)", || {
        lab.qemu.delete_snapshot(&vm, "pristine").expect("delete")
    });
    assert!(matches!(
        lab.qemu.restore_snapshot(&vm, "pristine"),
        Err(HypervisorError::NoSuchSnapshot { .. })
    ));
    lab.qemu.power_off(&vm).expect("powerOff");
    lab.qemu
        .delete_snapshot(&vm, "changed")
        .expect("delete off");
    assert_eq!(lab.qemu.list_snapshots(&vm).expect("list"), []);
    assert_eq!(
        fs::read(&base).expect("base"),
        content,
        "the backing image is never written"
    );
}

#[test]
fn a_saved_vm_resumes_where_it_was() {
    let lab = Lab::new();
    let vm = lab.create("saved", None, "");
    lab.qemu.start(&vm).expect("start");
    wait_until(&vm, "ten ticks", || last_tick(&vm) >= 10);

    timed("saveState", || lab.qemu.save_state(&vm).expect("saveState"));
    assert_eq!(state(&lab, &vm), VmState::Saved);
    assert!(qemu_pid(&vm).is_none(), "no QEMU runs for a saved VM");
    common::start_where_it_was_saved(&lab.qemu, &vm);

    lab.qemu.save_state(&vm).expect("save again");
    timed("discardState", || {
        lab.qemu.discard_state(&vm).expect("discardState")
    });
    assert_eq!(state(&lab, &vm), VmState::PoweredOff);
    lab.qemu.start(&vm).expect("start afresh");
    wait_until(&vm, "a fresh boot", || boots(&serial(&vm)) == 2);
    lab.qemu.power_off(&vm).expect("powerOff");
}

#[test]
fn a_restarted_agent_finds_its_vms_and_a_killed_qemu_is_aborted() {
    let lab = Lab::new();
    let vm = lab.create("restart", None, "");
    lab.qemu.start(&vm).expect("start");

    let restarted = Qemu::new(lab.settings.clone()).expect("a second backend object");
    assert_eq!(restarted.state(&vm).expect("state"), VmState::Running);
    restarted
        .power_off(&vm)
        .expect("powerOff from the new backend");
    assert_eq!(state(&lab, &vm), VmState::PoweredOff);

    lab.qemu.start(&vm).expect("start");
    wait_until(&vm, "the guest to run", || last_tick(&vm) >= 1);
    let pid = qemu_pid(&vm).expect("QEMU's pid file");
    let killed = Command::new("kill")
        .arg("-KILL")
        .arg(pid.to_string())
        .status()
        .expect("kill");
    assert!(killed.success());
    wait_until(&vm, "the killed VM to show as Aborted", || {
        state(&lab, &vm) == VmState::Aborted
    });
    assert_eq!(restarted.state(&vm).expect("state"), VmState::Aborted);

    lab.qemu.start(&vm).expect("start an aborted VM");
    assert_eq!(state(&lab, &vm), VmState::Running);
    restarted.remove(&vm).expect("remove a running VM");
    assert!(!vm.dir.exists(), "remove deletes the VM's directory");
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists() || qemu_pid(&vm).is_none(),
        "remove stops QEMU"
    );
}

#[test]
fn the_guest_reaches_the_broker_and_nothing_else() {
    let broker = TcpListener::bind("127.0.0.1:0").expect("broker listener");
    let elsewhere = TcpListener::bind("127.0.0.1:0").expect("other listener");
    let broker_port = broker.local_addr().expect("addr").port();
    let other_port = elsewhere.local_addr().expect("addr").port();
    let lab = Lab::with(|s| s.broker_forward = Some(("127.0.0.1".into(), broker_port)));
    // 10.0.2.2 is user networking's gateway, i.e. the host's loopback without restrict.
    let reach = format!("vmc.reach=10.0.2.100:61613,10.0.2.2:{other_port}");
    let vm = lab.create("net", None, &reach);
    lab.qemu.start(&vm).expect("start");

    common::reaches_only_the_broker(&vm, &broker, &elsewhere, other_port);
    lab.qemu.power_off(&vm).expect("powerOff");
}

#[test]
fn operations_in_the_wrong_state_are_clear_errors() {
    let lab = Lab::new();
    let vm = lab.create("errors", None, "");
    common::wrong_state_operations_fail(&lab.qemu, &vm);
    assert!(matches!(
        lab.qemu.sleep(&vm),
        Err(HypervisorError::NotSupported { .. })
    ));
    lab.qemu.remove(&vm).expect("remove");
    assert!(!vm.dir.exists());
}
