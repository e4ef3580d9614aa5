//! The QEMU backend against real QEMU and a real (tiny) Linux guest.
//!
//! Once per test process, `deploy/qemu/install.sh` installs QEMU if missing and
//! `deploy/qemu/tiny-guest.sh` builds (or finds cached) the test guest in
//! `<target>/tmp/tiny-guest`; either failing fails every test, loudly. The guest
//! reports on its serial console (`serial.log`): a `VMC-GUEST BOOT` line per boot,
//! `MAC`, `BROKER`, `DISK <hex of the first 64 bytes of /dev/vda>`, `REACH` lines,
//! and `TICK <n> <uptime>` every 100 ms, which is how these tests see the guest
//! really run, stop, reboot or resume. Each test has its own state directory and
//! at most one VM; a semaphore keeps at most two VMs running at once, and a guard
//! kills a test's QEMU whatever happens. What it does not cover: KVM (this
//! machine's is unusable; the backend's choice is printed, not asserted).

use std::fs;
use std::io::{BufRead, BufReader, ErrorKind};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Condvar, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use vmc_host::hypervisor::qemu::{Qemu, QemuSettings};
use vmc_host::hypervisor::{Hypervisor, HypervisorError, VmDefinition, VmSpec, VmState};

/// How long a boot, a shutdown, or any other guest-visible change may take here.
const GUEST_TIMEOUT: Duration = Duration::from_secs(90);

struct TinyGuest {
    kernel: PathBuf,
    initrd: PathBuf,
    cmdline: String,
}

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host/ has a parent")
}

fn run_script(script: &str, args: &[&Path]) {
    let started = Instant::now();
    let output = Command::new("bash")
        .arg(repo_root().join(script))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run bash {script}: {e}"));
    assert!(
        output.status.success(),
        "{script} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    println!(
        "{script}: {:.1} s: {}",
        started.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&output.stdout).trim()
    );
}

/// QEMU installed and the tiny guest built, once per test process.
fn tiny_guest() -> &'static TinyGuest {
    static GUEST: OnceLock<TinyGuest> = OnceLock::new();
    GUEST.get_or_init(|| {
        run_script("deploy/qemu/install.sh", &[]);
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("tiny-guest");
        run_script("deploy/qemu/tiny-guest.sh", &[&out]);
        let cmdline = fs::read_to_string(out.join("cmdline")).expect("tiny-guest cmdline");
        TinyGuest {
            kernel: out.join("kernel"),
            initrd: out.join("initramfs.cpio.gz"),
            cmdline: cmdline.trim().to_owned(),
        }
    })
}

/// At most two VMs at once on this two-core machine: one slot per test.
struct Slot;

static SLOTS: (Mutex<usize>, Condvar) = (Mutex::new(0), Condvar::new());

impl Slot {
    fn take() -> Slot {
        let (count, freed) = &SLOTS;
        let mut used = count.lock().unwrap_or_else(|e| e.into_inner());
        while *used >= 2 {
            used = freed.wait(used).unwrap_or_else(|e| e.into_inner());
        }
        *used += 1;
        Slot
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let (count, freed) = &SLOTS;
        *count.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
        freed.notify_one();
    }
}

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
        let guest = tiny_guest();
        let mut spec = VmSpec::new(name);
        spec.kernel = Some(guest.kernel.clone());
        spec.initrd = Some(guest.initrd.clone());
        spec.kernel_args = Some(format!("{} {extra_args}", guest.cmdline));
        spec.memory_mib = 128;
        spec.image = image;
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

fn serial(vm: &VmDefinition) -> String {
    String::from_utf8_lossy(&fs::read(Qemu::serial_log(vm)).unwrap_or_default()).into_owned()
}

fn boots(log: &str) -> usize {
    log.lines()
        .filter(|l| l.starts_with("VMC-GUEST BOOT"))
        .count()
}

/// Every complete `TICK n uptime` line, in order.
fn ticks(log: &str) -> Vec<(u64, f64)> {
    log.lines()
        .filter_map(|line| {
            let mut fields = line.strip_prefix("TICK ")?.split(' ');
            let n = fields.next()?.parse().ok()?;
            let uptime = fields.next()?.parse().ok()?;
            fields.next().is_none().then_some((n, uptime))
        })
        .collect()
}

/// The ticks since the last boot marker.
fn ticks_of_this_boot(vm: &VmDefinition) -> usize {
    let log = serial(vm);
    let this_boot = log.rfind("VMC-GUEST BOOT").map_or("", |at| &log[at..]);
    ticks(this_boot).len()
}

fn last_tick(vm: &VmDefinition) -> u64 {
    ticks(&serial(vm)).last().map_or(0, |t| t.0)
}

/// The value of the last `<prefix> value` line.
fn last_line_value(log: &str, prefix: &str) -> Option<String> {
    log.lines()
        .rev()
        .find_map(|l| l.strip_prefix(prefix))
        .map(str::to_owned)
}

/// Polls `condition` until it holds; panics with `what` and the serial tail if not.
fn wait_until(vm: &VmDefinition, what: &str, mut condition: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !condition() {
        if started.elapsed() > GUEST_TIMEOUT {
            let log = serial(vm);
            let tail: String = log
                .chars()
                .skip(log.chars().count().saturating_sub(2000))
                .collect();
            panic!("timed out waiting for {what}; serial log ends with:\n{tail}");
        }
        thread::sleep(Duration::from_millis(50));
    }
    started.elapsed()
}

fn state(lab: &Lab, vm: &VmDefinition) -> VmState {
    lab.qemu.state(vm).expect("getState")
}

fn timed<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let value = f();
    println!("{what}: {:.1} ms", started.elapsed().as_secs_f64() * 1000.0);
    value
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
    let boot = wait_until(&vm, "the first boot", || boots(&serial(&vm)) == 1);
    println!("boot to /init: {:.1} s", boot.as_secs_f64());
    wait_until(&vm, "three ticks", || last_tick(&vm) >= 3);
    let log = serial(&vm);
    assert_eq!(
        last_line_value(&log, "MAC "),
        Some(vm.mac.to_ascii_lowercase())
    );
    assert_eq!(
        last_line_value(&log, "BROKER "),
        Some("10.0.2.100:61613".into())
    );
    let disk = last_line_value(&log, "DISK ").expect("the guest sees a disk");
    assert_eq!(
        disk,
        "00".repeat(64),
        "a new VM without an image has an empty disk"
    );

    let perf = timed("getPerformanceData", || {
        lab.qemu.performance(&vm).expect("performance")
    });
    println!("performance: {perf:?}");
    assert!(
        perf.cpu_secs > 0.0 && perf.rss_bytes > 16 << 20 && perf.uptime_secs > 0.0,
        "{perf:?}"
    );
    assert!(
        perf.disk_read_bytes >= 64 && perf.disk_read_ops > 0,
        "the guest read its disk: {perf:?}"
    );

    timed("pause", || lab.qemu.pause(&vm).expect("pause"));
    assert_eq!(state(&lab, &vm), VmState::Paused);
    let frozen = last_tick(&vm);
    thread::sleep(Duration::from_secs(1)); // ten ticks' worth: none may appear
    assert_eq!(
        last_tick(&vm),
        frozen,
        "a paused guest's clock must stand still"
    );
    timed("resume", || lab.qemu.resume(&vm).expect("resume"));
    assert_eq!(state(&lab, &vm), VmState::Running);
    wait_until(&vm, "ticks after resume", || last_tick(&vm) > frozen + 2);

    timed("reset", || lab.qemu.reset(&vm).expect("reset"));
    assert_eq!(state(&lab, &vm), VmState::Running);
    let reboot = wait_until(&vm, "a second boot after reset", || {
        boots(&serial(&vm)) == 2
    });
    println!("reset to /init: {:.1} s", reboot.as_secs_f64());
    // The guest listens to the power button once it ticks.
    wait_until(&vm, "ticks after the reboot", || {
        ticks_of_this_boot(&vm) >= 2
    });

    timed("shutdown (ACPI)", || {
        lab.qemu.shutdown(&vm).expect("shutdown")
    });
    let off = wait_until(&vm, "the guest to power itself off", || {
        state(&lab, &vm) == VmState::PoweredOff
    });
    println!(
        "ACPI power button to PoweredOff: {:.1} s",
        off.as_secs_f64()
    );
    assert!(
        serial(&vm).contains("POWERDOWN"),
        "the guest saw the power button"
    );

    lab.qemu.start(&vm).expect("start again");
    assert_eq!(state(&lab, &vm), VmState::Running);
    wait_until(&vm, "a third boot", || boots(&serial(&vm)) == 3);
    timed("powerOff", || lab.qemu.power_off(&vm).expect("powerOff"));
    assert_eq!(state(&lab, &vm), VmState::PoweredOff);
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
    let disk = Qemu::disk_path(&vm);
    let status = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -q -P 0xbb 0 64"])
        .arg(&disk)
        .status()
        .expect("qemu-io");
    assert!(status.success());

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
    let before = ticks(&serial(&vm));
    let &(saved_n, saved_uptime) = before.last().expect("ticks before saving");

    timed("start (restore)", || {
        lab.qemu.start(&vm).expect("start from saved state")
    });
    assert_eq!(state(&lab, &vm), VmState::Running);
    wait_until(&vm, "ticks after the restore", || {
        last_tick(&vm) > saved_n + 5
    });
    let log = serial(&vm);
    assert_eq!(boots(&log), 1, "a restored VM does not boot again");
    let after = ticks(&log);
    for pair in after.windows(2) {
        assert_eq!(pair[1].0, pair[0].0 + 1, "the counter continues: {pair:?}");
        assert!(
            pair[1].1 >= pair[0].1,
            "the uptime never goes back: {pair:?}"
        );
    }
    let &(first_n, first_uptime) = &after[before.len()];
    assert_eq!(first_n, saved_n + 1);
    assert!(
        first_uptime < saved_uptime + 2.0,
        "{first_uptime} vs {saved_uptime}"
    );

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

    broker.set_nonblocking(true).expect("nonblocking");
    let mut greeting = String::new();
    wait_until(
        &vm,
        "the guest's connection to the broker",
        || match broker.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).expect("blocking");
                stream
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .expect("timeout");
                BufReader::new(stream)
                    .read_line(&mut greeting)
                    .expect("read the probe");
                true
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => false,
            Err(e) => panic!("accept: {e}"),
        },
    );
    assert_eq!(
        greeting.trim(),
        format!("PROBE {}", vm.mac.to_ascii_lowercase())
    );
    let blocked = format!("REACH 10.0.2.2:{other_port} failed");
    wait_until(&vm, "the guest to give up on the other port", || {
        serial(&vm).contains(&blocked)
    });
    elsewhere.set_nonblocking(true).expect("nonblocking");
    assert!(
        matches!(elsewhere.accept(), Err(e) if e.kind() == ErrorKind::WouldBlock),
        "nothing but the broker is reachable from the guest"
    );
    lab.qemu.power_off(&vm).expect("powerOff");
}

#[test]
fn operations_in_the_wrong_state_are_clear_errors() {
    let lab = Lab::new();
    let vm = lab.create("errors", None, "");
    let invalid = |result: Result<(), HypervisorError>, operation: &str| match result {
        Err(HypervisorError::InvalidState {
            state: VmState::PoweredOff,
            ..
        }) => {}
        other => panic!("{operation} of a powered-off VM: {other:?}"),
    };
    invalid(lab.qemu.pause(&vm), "pause");
    invalid(lab.qemu.resume(&vm), "resume");
    invalid(lab.qemu.reset(&vm), "reset");
    invalid(lab.qemu.shutdown(&vm), "shutdown");
    invalid(lab.qemu.power_off(&vm), "powerOff");
    invalid(lab.qemu.save_state(&vm), "saveState");
    invalid(lab.qemu.discard_state(&vm), "discardState");
    let error = lab.qemu.pause(&vm).expect_err("pause");
    assert_eq!(
        error.to_string(),
        "VM \"errors\" cannot pause while it is PoweredOff"
    );
    assert!(matches!(
        lab.qemu.performance(&vm),
        Err(HypervisorError::InvalidState { .. })
    ));
    match lab.qemu.restore_snapshot(&vm, "nope") {
        Err(e @ HypervisorError::NoSuchSnapshot { .. }) => {
            assert_eq!(
                e.to_string(),
                "VM \"errors\" has no snapshot named \"nope\""
            )
        }
        other => panic!("restore of a missing snapshot: {other:?}"),
    }
    assert!(matches!(
        lab.qemu.delete_snapshot(&vm, "nope"),
        Err(HypervisorError::NoSuchSnapshot { .. })
    ));
    assert!(matches!(
        lab.qemu.sleep(&vm),
        Err(HypervisorError::NotSupported { .. })
    ));
    assert!(matches!(
        lab.qemu.create(&vm.spec),
        Err(HypervisorError::InvalidSpec(message)) if message.contains("already exists")
    ));
    lab.qemu.remove(&vm).expect("remove");
    assert!(!vm.dir.exists());
}
