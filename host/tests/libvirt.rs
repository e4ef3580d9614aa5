//! The libvirt backend against a real libvirtd, real QEMU (TCG) and the tiny Linux
//! guest of `common/` (shared with `qemu.rs`, with the checks both backends must
//! pass the same way).
//!
//! libvirtd must answer at `qemu:///system` (`deploy/libvirt/install.sh` installs
//! and starts it; `deploy/test.sh` runs it): if it does not, every test fails
//! saying so. Each test has its own state directory and its own domain prefix
//! (`vmctest-<pid>-`), so tests running at once, and anyone else's domains on the
//! same libvirtd, never meet; a guard destroys and undefines the test's own domain
//! whatever happens. A semaphore keeps at most two VMs of a process running at once.

mod common;

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use vmc_host::hypervisor::libvirt::{Libvirt, LibvirtSettings, DEFAULT_URI};
use vmc_host::hypervisor::{Hypervisor, HypervisorError, VmDefinition, VmSpec, VmState};
use vmc_host::protocol::agent_main::error_chain;

use common::{
    boots, fill_disk_start, last_line_value, last_tick, serial, timed, tiny_guest, tiny_guest_dir,
    tiny_guest_spec, wait_until, Slot,
};

fn virsh(args: &[&str]) -> std::process::Output {
    Command::new("virsh")
        .args(["-q", "-c", DEFAULT_URI])
        .args(args)
        .env("LC_ALL", "C")
        .output()
        .expect("virsh runs")
}

/// A test's backend over its own state directory and domain prefix.
struct Lab {
    libvirt: Libvirt,
    settings: LibvirtSettings,
    dir: tempfile::TempDir,
    _slot: Slot,
}

impl Lab {
    fn new(test: &str) -> Lab {
        Lab::with(test, |_| {})
    }

    fn with(test: &str, adjust: impl FnOnce(&mut LibvirtSettings)) -> Lab {
        tiny_guest();
        let slot = Slot::take();
        let dir = tempfile::tempdir().expect("tempdir");
        let prefix = format!("vmctest-{}-{test}-", std::process::id());
        let mut settings = LibvirtSettings::new(dir.path().join("state"), prefix);
        settings.broker_relay = env!("CARGO_BIN_EXE_vmc-host").into();
        adjust(&mut settings);
        let started = Instant::now();
        let libvirt = Libvirt::new(settings.clone()).unwrap_or_else(|e| {
            panic!(
                "the libvirt backend does not set up: {}\n(deploy/libvirt/install.sh \
                 installs and starts libvirtd; deploy/test.sh runs it)",
                error_chain(&e)
            )
        });
        println!(
            "backend ready in {} ms: {}",
            started.elapsed().as_millis(),
            libvirt.version()
        );
        Lab {
            libvirt,
            settings,
            dir,
            _slot: slot,
        }
    }

    /// A VM booting the tiny guest, with `image` as its disk's backing file.
    fn create(&self, name: &str, image: Option<PathBuf>, extra_args: &str) -> Guard<'_> {
        self.create_spec(tiny_guest_spec(name, image, extra_args))
    }

    fn create_spec(&self, spec: VmSpec) -> Guard<'_> {
        let domain = format!("{}{}", self.settings.domain_prefix, spec.name);
        // The guard first: a create that fails half-way is cleaned up too.
        let mut guard = Guard {
            lab: self,
            domain,
            vm: None,
        };
        guard.vm = Some(timed("createVM", || {
            self.libvirt.create(&spec).expect("createVM")
        }));
        guard
    }
}

/// Destroys and undefines the test's own domain however the test ends.
struct Guard<'a> {
    lab: &'a Lab,
    domain: String,
    vm: Option<VmDefinition>,
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        if let Some(vm) = &self.vm {
            let _ = self.lab.libvirt.remove(vm);
        }
        // Whatever remove left (it failed, or the test broke the VM): this prefix
        // is this test's alone.
        if virsh(&["domstate", "--domain", &self.domain])
            .status
            .success()
        {
            let _ = virsh(&["destroy", "--domain", &self.domain]);
            let _ = virsh(&[
                "undefine",
                "--domain",
                &self.domain,
                "--managed-save",
                "--snapshots-metadata",
            ]);
        }
    }
}

impl std::ops::Deref for Guard<'_> {
    type Target = VmDefinition;
    fn deref(&self) -> &VmDefinition {
        self.vm.as_ref().expect("created")
    }
}

/// The pid of the QEMU libvirt runs for the domain.
fn qemu_pid(domain: &str) -> Option<u32> {
    fs::read_to_string(format!("/run/libvirt/qemu/{domain}.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn state(lab: &Lab, vm: &VmDefinition) -> VmState {
    lab.libvirt.state(vm).expect("getState")
}

#[test]
fn lifecycle_operations_move_the_vm_through_the_right_states() {
    let lab = Lab::new("life");
    let vm = lab.create("life", None, "");
    assert_eq!(state(&lab, &vm), VmState::PoweredOff);
    let domain = lab.libvirt.domain_name(&vm);
    let xml = String::from_utf8(virsh(&["dumpxml", "--domain", &domain]).stdout).expect("xml");
    assert!(xml.contains("<domain type='qemu'"), "TCG: {xml}");

    timed("start", || lab.libvirt.start(&vm).expect("start"));
    assert_eq!(state(&lab, &vm), VmState::Running);
    let pid = qemu_pid(&domain).expect("QEMU's pid file");
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).expect("QEMU's command line");
    let args: Vec<String> = cmdline
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let accel = args.iter().skip_while(|a| *a != "-accel").nth(1);
    assert_eq!(accel.map(String::as_str), Some("tcg"));
    common::run_through_the_lifecycle(&lab.libvirt, &vm);
}

#[test]
fn snapshots_bring_back_the_disk_contents() {
    let lab = Lab::new("snap");
    let base = lab.dir.path().join("base.raw");
    let mut content = vec![0xAAu8; 64];
    content.resize(1 << 20, 0);
    fs::write(&base, &content).expect("base image");
    let vm = lab.create("snap", Some(base.clone()), "");

    let pristine = timed("takeSnapshot (off)", || {
        lab.libvirt
            .take_snapshot(&vm, "pristine", "as <created> & \"kept\"")
            .expect("snapshot off")
    });
    assert_eq!(pristine.description, "as <created> & \"kept\"");
    assert!(pristine.created_at > 1_600_000_000, "{pristine:?}");
    assert_eq!(
        pristine.vm_state_bytes, 0,
        "a snapshot of a powered-off VM is disk-only"
    );
    assert!(matches!(
        lab.libvirt.take_snapshot(&vm, "pristine", "again"),
        Err(HypervisorError::SnapshotExists { .. })
    ));

    // Change the overlay while the VM is off: the first 64 bytes become 0xbb.
    fill_disk_start(&Libvirt::disk_path(&vm), 0xbb);

    lab.libvirt.start(&vm).expect("start");
    wait_until(&vm, "the guest to show the changed disk", || {
        last_line_value(&serial(&vm), "DISK ") == Some("bb".repeat(64))
    });
    let running = timed("takeSnapshot (running)", || {
        lab.libvirt
            .take_snapshot(&vm, "changed", "0xbb, taken running")
            .expect("snapshot running")
    });
    assert!(
        running.vm_state_bytes > 0,
        "a running VM's snapshot holds its memory"
    );
    assert_eq!(state(&lab, &vm), VmState::Running);
    match lab.libvirt.restore_snapshot(&vm, "pristine") {
        Err(HypervisorError::InvalidState {
            state: VmState::Running,
            ..
        }) => {}
        other => panic!("restoring a disk-only snapshot into a running VM: {other:?}"),
    }
    assert_eq!(
        state(&lab, &vm),
        VmState::Running,
        "the refusal is harmless"
    );

    lab.libvirt.power_off(&vm).expect("powerOff");
    timed("restoreSnapshot (off, disk-only)", || {
        lab.libvirt
            .restore_snapshot(&vm, "pristine")
            .expect("restore")
    });
    assert_eq!(state(&lab, &vm), VmState::PoweredOff);
    lab.libvirt.start(&vm).expect("start");
    wait_until(&vm, "a second boot", || boots(&serial(&vm)) == 2);
    wait_until(&vm, "the guest to show the restored disk", || {
        last_line_value(&serial(&vm), "DISK ") == Some("aa".repeat(64))
    });

    timed("restoreSnapshot (running)", || {
        lab.libvirt
            .restore_snapshot(&vm, "changed")
            .expect("restore running")
    });
    assert_eq!(state(&lab, &vm), VmState::Running);
    lab.libvirt.reset(&vm).expect("reset");
    wait_until(&vm, "a third boot", || boots(&serial(&vm)) == 3);
    wait_until(&vm, "the disk of the running snapshot", || {
        last_line_value(&serial(&vm), "DISK ") == Some("bb".repeat(64))
    });

    // libvirt's rule: a snapshot with memory brings the VM back running.
    lab.libvirt.power_off(&vm).expect("powerOff");
    timed("restoreSnapshot (off, with memory)", || {
        lab.libvirt
            .restore_snapshot(&vm, "changed")
            .expect("restore a running snapshot while off")
    });
    assert_eq!(state(&lab, &vm), VmState::Running);
    let resumed_at = last_tick(&vm);
    wait_until(&vm, "ticks of the restored memory", || {
        last_tick(&vm) > resumed_at + 2
    });
    assert_eq!(boots(&serial(&vm)), 3, "restored memory does not boot");

    let listed = timed("listSnapshots", || {
        lab.libvirt.list_snapshots(&vm).expect("list")
    });
    let names: Vec<(&str, &str)> = listed
        .iter()
        .map(|s| (s.name.as_str(), s.description.as_str()))
        .collect();
    assert_eq!(
        names,
        [
            ("pristine", "as <created> & \"kept\""),
            ("changed", "0xbb, taken running")
        ]
    );
    timed("deleteSnapshot (running)", || {
        lab.libvirt
            .delete_snapshot(&vm, "pristine")
            .expect("delete")
    });
    assert!(matches!(
        lab.libvirt.restore_snapshot(&vm, "pristine"),
        Err(HypervisorError::NoSuchSnapshot { .. })
    ));
    lab.libvirt.power_off(&vm).expect("powerOff");
    lab.libvirt
        .delete_snapshot(&vm, "changed")
        .expect("delete off");
    assert_eq!(lab.libvirt.list_snapshots(&vm).expect("list"), []);
    assert_eq!(
        fs::read(&base).expect("base"),
        content,
        "the backing image is never written"
    );
}

#[test]
fn a_saved_vm_resumes_where_it_was() {
    let lab = Lab::new("saved");
    let vm = lab.create("saved", None, "");
    lab.libvirt.start(&vm).expect("start");
    wait_until(&vm, "ten ticks", || last_tick(&vm) >= 10);

    timed("saveState", || {
        lab.libvirt.save_state(&vm).expect("saveState")
    });
    assert_eq!(state(&lab, &vm), VmState::Saved);
    assert!(
        qemu_pid(&lab.libvirt.domain_name(&vm)).is_none(),
        "no QEMU runs for a saved VM"
    );
    common::start_where_it_was_saved(&lab.libvirt, &vm);

    lab.libvirt.pause(&vm).expect("pause");
    lab.libvirt.save_state(&vm).expect("save a paused VM");
    assert_eq!(state(&lab, &vm), VmState::Saved);
    timed("discardState", || {
        lab.libvirt.discard_state(&vm).expect("discardState")
    });
    assert_eq!(state(&lab, &vm), VmState::PoweredOff);
    lab.libvirt.start(&vm).expect("start afresh");
    wait_until(&vm, "a fresh boot", || boots(&serial(&vm)) == 2);
    lab.libvirt.power_off(&vm).expect("powerOff");
}

#[test]
fn a_restarted_agent_finds_its_vms_and_a_killed_qemu_is_aborted() {
    let lab = Lab::new("restart");
    let vm = lab.create("restart", None, "");
    lab.libvirt.start(&vm).expect("start");

    let restarted = Libvirt::new(lab.settings.clone()).expect("a second backend object");
    assert_eq!(restarted.state(&vm).expect("state"), VmState::Running);
    restarted
        .power_off(&vm)
        .expect("powerOff from the new backend");
    assert_eq!(state(&lab, &vm), VmState::PoweredOff);

    lab.libvirt.start(&vm).expect("start");
    wait_until(&vm, "the guest to run", || last_tick(&vm) >= 1);
    let domain = lab.libvirt.domain_name(&vm);
    let pid = qemu_pid(&domain).expect("QEMU's pid file");
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
    lab.libvirt
        .power_off(&vm)
        .expect("powerOff acknowledges the crash");
    assert_eq!(state(&lab, &vm), VmState::PoweredOff);

    lab.libvirt.start(&vm).expect("start after a crash");
    assert_eq!(state(&lab, &vm), VmState::Running);
    restarted.remove(&vm).expect("remove a running VM");
    assert!(!vm.dir.exists(), "remove deletes the VM's directory");
    assert!(
        !virsh(&["domstate", "--domain", &domain]).status.success(),
        "remove undefines the domain"
    );
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists() || qemu_pid(&domain).is_none(),
        "remove stops QEMU"
    );
}

/// Also the guest image directory path: the VM boots the image's kernel over an
/// overlay of its disk.
#[test]
fn the_guest_reaches_the_broker_and_nothing_else() {
    let broker = TcpListener::bind("127.0.0.1:0").expect("broker listener");
    let elsewhere = TcpListener::bind("127.0.0.1:0").expect("other listener");
    let broker_port = broker.local_addr().expect("addr").port();
    let other_port = elsewhere.local_addr().expect("addr").port();
    let lab = Lab::with("net", |s| {
        s.broker_forward = Some(("127.0.0.1".into(), broker_port));
        s.guest_prefix = Some("test,with&comma".into());
    });

    // A guest image directory (deploy/guest-image's layout) of the tiny guest.
    let guest = tiny_guest();
    let guest_dir = tiny_guest_dir();
    let image = lab.dir.path().join("image");
    fs::create_dir(&image).expect("mkdir");
    fs::write(image.join("disk.raw"), vec![0xCCu8; 1 << 20]).expect("disk");
    // 10.0.2.2 is user networking's gateway, i.e. the host's loopback without restrict.
    let reach = format!("vmc.reach=10.0.2.100:61613,10.0.2.2:{other_port}");
    fs::write(
        image.join("cmdline"),
        format!("{} {reach}\n", guest.cmdline),
    )
    .expect("cmdline");
    fs::write(
        image.join("manifest.json"),
        r#"{"format": "vmc-guest-image/1", "kernel": "vmlinux",
            "initramfs": "initramfs.cpio.gz", "cmdline": "cmdline", "disk": "disk.raw"}"#,
    )
    .expect("manifest");
    for file in ["vmlinux", "initramfs.cpio.gz"] {
        fs::hard_link(guest_dir.join(file), image.join(file))
            .or_else(|_| fs::copy(guest_dir.join(file), image.join(file)).map(drop))
            .expect("link the guest's files");
    }
    let mut spec = VmSpec::new("net");
    spec.image = Some(image.clone());
    spec.memory_mib = 128;
    let vm = lab.create_spec(spec);
    assert_eq!(vm.spec.image, Some(image), "the caller's image is kept");
    assert!(vm
        .spec
        .kernel
        .as_deref()
        .is_some_and(|k| k.starts_with(&vm.dir)));
    lab.libvirt.start(&vm).expect("start");

    common::reaches_only_the_broker(&vm, &broker, &elsewhere, other_port);
    let log = serial(&vm);
    assert_eq!(
        last_line_value(&log, "DISK "),
        Some("cc".repeat(64)),
        "the VM's disk is an overlay of the image's"
    );
    let domain = lab.libvirt.domain_name(&vm);
    let pid = qemu_pid(&domain).expect("QEMU's pid file");
    let cmdline =
        String::from_utf8_lossy(&fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline"))
            .replace('\0', " ");
    assert!(
        cmdline.contains("fw_cfg/prefix"),
        "the prefix reaches the guest through a file, commas and all: {cmdline}"
    );
    assert!(
        !cmdline.contains("-netdev tap") && !cmdline.contains("bridge"),
        "no libvirt network: {cmdline}"
    );
    lab.libvirt.power_off(&vm).expect("powerOff");
}

#[test]
fn operations_in_the_wrong_state_are_clear_errors() {
    let lab = Lab::new("errors");
    let vm = lab.create("errors", None, "");
    common::wrong_state_operations_fail(&lab.libvirt, &vm);
    let error = lab.libvirt.sleep(&vm).expect_err("sleep");
    assert!(
        matches!(
            error,
            HypervisorError::NotSupported {
                backend: "libvirt",
                ..
            }
        ),
        "{error}"
    );

    // A VM whose record does not match the domain's: the domain is left alone.
    let mut impostor = (*vm).clone();
    impostor.dir = vm.dir.with_file_name("impostor");
    let error = lab
        .libvirt
        .remove(&impostor)
        .expect_err("remove an impostor");
    assert!(error.to_string().contains("leaving it alone"), "{error}");
    assert_eq!(state(&lab, &vm), VmState::PoweredOff);

    // libvirt's own refusal reaches the caller with libvirt's words.
    let domain = lab.libvirt.domain_name(&vm);
    let undefined = virsh(&["undefine", "--domain", &domain]);
    assert!(undefined.status.success());
    let error = lab
        .libvirt
        .start(&vm)
        .expect_err("start an undefined domain");
    let text = error.to_string();
    assert!(
        text.starts_with("start of VM \"errors\" failed: libvirt at qemu:///system has no domain"),
        "{text}"
    );
    lab.libvirt.remove(&vm).expect("remove without a domain");
    assert!(!vm.dir.exists());
}

#[test]
fn an_unreachable_libvirtd_is_a_clear_setup_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut settings = LibvirtSettings::new(dir.path(), "vmctest-unreachable-");
    settings.uri = "qemu+unix:///system?socket=/nonexistent/libvirt-sock".into();
    let error = Libvirt::new(settings).expect_err("no libvirtd there");
    let text = error_chain(&error);
    assert!(
        text.starts_with(
            "libvirt at qemu+unix:///system?socket=/nonexistent/libvirt-sock does not answer"
        ) && text.contains("/nonexistent/libvirt-sock"),
        "{text}"
    );
}
