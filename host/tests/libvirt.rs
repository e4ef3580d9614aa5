//! The libvirt backend against a real libvirtd, real QEMU (TCG) and the tiny Linux
//! guest of `host/tests/qemu.rs`.
//!
//! libvirtd must answer at `qemu:///system` (`deploy/libvirt/install.sh` installs
//! and starts it; `deploy/test.sh` runs it): if it does not, every test fails
//! saying so. Once per test process `deploy/qemu/install.sh` and
//! `deploy/qemu/tiny-guest.sh` make sure of QEMU and the guest, whose serial console
//! (`serial.log`) tells what it does: `VMC-GUEST BOOT` per boot, `MAC`, `BROKER`,
//! `DISK <hex>`, `REACH` lines and a `TICK <n> <uptime>` every 100 ms. Each test has
//! its own state directory and its own domain prefix (`vmctest-<pid>-`), so tests
//! running at once, and anyone else's domains on the same libvirtd, never meet; a
//! guard destroys and undefines the test's own domain whatever happens. A semaphore
//! keeps at most two VMs of a process running at once.

use std::fs;
use std::io::{BufRead, BufReader, ErrorKind};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Condvar, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use vmc_host::hypervisor::libvirt::{Libvirt, LibvirtSettings, DEFAULT_URI};
use vmc_host::hypervisor::{Hypervisor, HypervisorError, VmDefinition, VmSpec, VmState};

/// How long a boot, a shutdown, or any other guest-visible change may take here.
const GUEST_TIMEOUT: Duration = Duration::from_secs(90);

struct TinyGuest {
    dir: PathBuf,
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
            dir: out,
        }
    })
}

fn virsh(args: &[&str]) -> std::process::Output {
    Command::new("virsh")
        .args(["-q", "-c", DEFAULT_URI])
        .args(args)
        .env("LC_ALL", "C")
        .output()
        .expect("virsh runs")
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

    fn spec(&self, name: &str, image: Option<PathBuf>, extra_args: &str) -> VmSpec {
        let guest = tiny_guest();
        let mut spec = VmSpec::new(name);
        spec.kernel = Some(guest.kernel.clone());
        spec.initrd = Some(guest.initrd.clone());
        spec.kernel_args = Some(format!("{} {extra_args}", guest.cmdline));
        spec.memory_mib = 128;
        spec.image = image;
        spec
    }

    /// A VM booting the tiny guest, with `image` as its disk's backing file.
    fn create(&self, name: &str, image: Option<PathBuf>, extra_args: &str) -> Guard<'_> {
        self.create_spec(self.spec(name, image, extra_args))
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

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The pid of the QEMU libvirt runs for the domain.
fn qemu_pid(domain: &str) -> Option<u32> {
    fs::read_to_string(format!("/run/libvirt/qemu/{domain}.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn serial(vm: &VmDefinition) -> String {
    String::from_utf8_lossy(&fs::read(Libvirt::serial_log(vm)).unwrap_or_default()).into_owned()
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
    lab.libvirt.state(vm).expect("getState")
}

fn timed<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let value = f();
    println!("{what}: {:.1} ms", started.elapsed().as_secs_f64() * 1000.0);
    value
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
        lab.libvirt.performance(&vm).expect("performance")
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

    timed("pause", || lab.libvirt.pause(&vm).expect("pause"));
    assert_eq!(state(&lab, &vm), VmState::Paused);
    let frozen = last_tick(&vm);
    thread::sleep(Duration::from_secs(1)); // ten ticks' worth: none may appear
    assert_eq!(
        last_tick(&vm),
        frozen,
        "a paused guest's clock must stand still"
    );
    timed("resume", || lab.libvirt.resume(&vm).expect("resume"));
    assert_eq!(state(&lab, &vm), VmState::Running);
    wait_until(&vm, "ticks after resume", || last_tick(&vm) > frozen + 2);

    timed("reset", || lab.libvirt.reset(&vm).expect("reset"));
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
        lab.libvirt.shutdown(&vm).expect("shutdown")
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

    lab.libvirt.start(&vm).expect("start again");
    assert_eq!(state(&lab, &vm), VmState::Running);
    wait_until(&vm, "a third boot", || boots(&serial(&vm)) == 3);
    timed("powerOff", || lab.libvirt.power_off(&vm).expect("powerOff"));
    assert_eq!(state(&lab, &vm), VmState::PoweredOff);
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
    let disk = Libvirt::disk_path(&vm);
    let status = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -q -P 0xbb 0 64"])
        .arg(&disk)
        .status()
        .expect("qemu-io");
    assert!(status.success());

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
    let before = ticks(&serial(&vm));
    let &(saved_n, saved_uptime) = before.last().expect("ticks before saving");

    timed("start (restore)", || {
        lab.libvirt.start(&vm).expect("start from saved state")
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
        fs::hard_link(guest.dir.join(file), image.join(file))
            .or_else(|_| fs::copy(guest.dir.join(file), image.join(file)).map(drop))
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
    let invalid = |result: Result<(), HypervisorError>, operation: &str| match result {
        Err(HypervisorError::InvalidState {
            state: VmState::PoweredOff,
            ..
        }) => {}
        other => panic!("{operation} of a powered-off VM: {other:?}"),
    };
    invalid(lab.libvirt.pause(&vm), "pause");
    invalid(lab.libvirt.resume(&vm), "resume");
    invalid(lab.libvirt.reset(&vm), "reset");
    invalid(lab.libvirt.shutdown(&vm), "shutdown");
    invalid(lab.libvirt.power_off(&vm), "powerOff");
    invalid(lab.libvirt.save_state(&vm), "saveState");
    invalid(lab.libvirt.discard_state(&vm), "discardState");
    let error = lab.libvirt.pause(&vm).expect_err("pause");
    assert_eq!(
        error.to_string(),
        "VM \"errors\" cannot pause while it is PoweredOff"
    );
    assert!(matches!(
        lab.libvirt.performance(&vm),
        Err(HypervisorError::InvalidState { .. })
    ));
    match lab.libvirt.restore_snapshot(&vm, "nope") {
        Err(e @ HypervisorError::NoSuchSnapshot { .. }) => {
            assert_eq!(
                e.to_string(),
                "VM \"errors\" has no snapshot named \"nope\""
            )
        }
        other => panic!("restore of a missing snapshot: {other:?}"),
    }
    assert!(matches!(
        lab.libvirt.delete_snapshot(&vm, "nope"),
        Err(HypervisorError::NoSuchSnapshot { .. })
    ));
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
    assert!(matches!(
        lab.libvirt.create(&vm.spec),
        Err(HypervisorError::InvalidSpec(message)) if message.contains("already exists")
    ));

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
