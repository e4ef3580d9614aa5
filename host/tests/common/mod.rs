//! What the tests of both QEMU-based backends (`qemu.rs`, `libvirt.rs`) share: the
//! tiny Linux guest, the limit on VMs running at once, reading the guest's serial
//! console, and the checks both backends must pass the same way.
//!
//! Once per test process `deploy/qemu/install.sh` installs QEMU if missing and
//! `deploy/qemu/tiny-guest.sh` builds (or finds cached) the test guest in
//! `<target>/tmp/tiny-guest`; either failing fails every test, loudly. The guest
//! reports on its serial console (`serial.log`, where both backends put it): a
//! `VMC-GUEST BOOT` line per boot, `MAC`, `BROKER`, `DISK <hex of the first 64
//! bytes of /dev/vda>`, `REACH` lines, and `TICK <n> <uptime>` every 100 ms, which
//! is how the tests see the guest really run, stop, reboot or resume.
//! What it does not do: make a backend, or clean up a test's VM (each test file's
//! guard does, its own way).

use std::fs;
use std::io::{BufRead, BufReader, ErrorKind};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Condvar, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use vmc_host::hypervisor::qemu::vmdir::VmDir;
use vmc_host::hypervisor::{Hypervisor, HypervisorError, VmDefinition, VmSpec, VmState};

/// How long a boot, a shutdown, or any other guest-visible change may take here.
const GUEST_TIMEOUT: Duration = Duration::from_secs(90);

/// The tiny guest's boot files.
pub struct TinyGuest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
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

/// The directory `deploy/qemu/tiny-guest.sh` builds the guest in.
pub fn tiny_guest_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("tiny-guest")
}

/// QEMU installed and the tiny guest built, once per test process.
pub fn tiny_guest() -> &'static TinyGuest {
    static GUEST: OnceLock<TinyGuest> = OnceLock::new();
    GUEST.get_or_init(|| {
        run_script("deploy/qemu/install.sh", &[]);
        let out = tiny_guest_dir();
        run_script("deploy/qemu/tiny-guest.sh", &[&out]);
        let cmdline = fs::read_to_string(out.join("cmdline")).expect("tiny-guest cmdline");
        TinyGuest {
            kernel: out.join("kernel"),
            initrd: out.join("initramfs.cpio.gz"),
            cmdline: cmdline.trim().to_owned(),
        }
    })
}

/// A VM booting the tiny guest (with `extra_args` on its command line), with
/// `image` as its disk's backing file.
pub fn tiny_guest_spec(name: &str, image: Option<PathBuf>, extra_args: &str) -> VmSpec {
    let guest = tiny_guest();
    let mut spec = VmSpec::new(name);
    spec.kernel = Some(guest.kernel.clone());
    spec.initrd = Some(guest.initrd.clone());
    spec.kernel_args = Some(format!("{} {extra_args}", guest.cmdline));
    spec.memory_mib = 128;
    spec.image = image;
    spec
}

/// At most two VMs at once on this two-core machine: one slot per test.
pub struct Slot;

static SLOTS: (Mutex<usize>, Condvar) = (Mutex::new(0), Condvar::new());

impl Slot {
    pub fn take() -> Slot {
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

/// The guest's serial console so far.
pub fn serial(vm: &VmDefinition) -> String {
    let log = VmDir::new(&vm.dir).serial_log();
    String::from_utf8_lossy(&fs::read(log).unwrap_or_default()).into_owned()
}

pub fn boots(log: &str) -> usize {
    log.lines()
        .filter(|l| l.starts_with("VMC-GUEST BOOT"))
        .count()
}

/// Every complete `TICK n uptime` line, in order.
pub fn ticks(log: &str) -> Vec<(u64, f64)> {
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
pub fn ticks_of_this_boot(vm: &VmDefinition) -> usize {
    let log = serial(vm);
    let this_boot = log.rfind("VMC-GUEST BOOT").map_or("", |at| &log[at..]);
    ticks(this_boot).len()
}

pub fn last_tick(vm: &VmDefinition) -> u64 {
    ticks(&serial(vm)).last().map_or(0, |t| t.0)
}

/// The value of the last `<prefix> value` line.
pub fn last_line_value(log: &str, prefix: &str) -> Option<String> {
    log.lines()
        .rev()
        .find_map(|l| l.strip_prefix(prefix))
        .map(str::to_owned)
}

/// Polls `condition` until it holds; panics with `what` and the serial tail if not.
pub fn wait_until(vm: &VmDefinition, what: &str, mut condition: impl FnMut() -> bool) -> Duration {
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

pub fn timed<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let value = f();
    println!("{what}: {:.1} ms", started.elapsed().as_secs_f64() * 1000.0);
    value
}

/// The first 64 bytes of the powered-off VM's overlay `disk` become `byte`.
pub fn fill_disk_start(disk: &Path, byte: u8) {
    let status = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", &format!("write -q -P {byte:#x} 0 64")])
        .arg(disk)
        .status()
        .expect("qemu-io");
    assert!(status.success());
}

/// The lifecycle of a VM just started (booting the tiny guest without an image):
/// it boots and sees its MAC, the broker's address and an empty disk; then
/// performance, pause, resume, reset, ACPI shutdown, start again and powerOff.
pub fn run_through_the_lifecycle(hv: &dyn Hypervisor, vm: &VmDefinition) {
    let state = || hv.state(vm).expect("getState");
    let boot = wait_until(vm, "the first boot", || boots(&serial(vm)) == 1);
    println!("boot to /init: {:.1} s", boot.as_secs_f64());
    wait_until(vm, "three ticks", || last_tick(vm) >= 3);
    let log = serial(vm);
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
        hv.performance(vm).expect("performance")
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

    timed("pause", || hv.pause(vm).expect("pause"));
    assert_eq!(state(), VmState::Paused);
    let frozen = last_tick(vm);
    thread::sleep(Duration::from_secs(1)); // ten ticks' worth: none may appear
    assert_eq!(
        last_tick(vm),
        frozen,
        "a paused guest's clock must stand still"
    );
    timed("resume", || hv.resume(vm).expect("resume"));
    assert_eq!(state(), VmState::Running);
    wait_until(vm, "ticks after resume", || last_tick(vm) > frozen + 2);

    timed("reset", || hv.reset(vm).expect("reset"));
    assert_eq!(state(), VmState::Running);
    let reboot = wait_until(vm, "a second boot after reset", || boots(&serial(vm)) == 2);
    println!("reset to /init: {:.1} s", reboot.as_secs_f64());
    // The guest listens to the power button once it ticks.
    wait_until(vm, "ticks after the reboot", || ticks_of_this_boot(vm) >= 2);

    timed("shutdown (ACPI)", || hv.shutdown(vm).expect("shutdown"));
    let off = wait_until(vm, "the guest to power itself off", || {
        state() == VmState::PoweredOff
    });
    println!(
        "ACPI power button to PoweredOff: {:.1} s",
        off.as_secs_f64()
    );
    assert!(
        serial(vm).contains("POWERDOWN"),
        "the guest saw the power button"
    );

    hv.start(vm).expect("start again");
    assert_eq!(state(), VmState::Running);
    wait_until(vm, "a third boot", || boots(&serial(vm)) == 3);
    timed("powerOff", || hv.power_off(vm).expect("powerOff"));
    assert_eq!(state(), VmState::PoweredOff);
}

/// Starts a VM saved after its first boot and checks that it goes on where it
/// was: no new boot, the tick counter continuing, the uptime never going back.
pub fn start_where_it_was_saved(hv: &dyn Hypervisor, vm: &VmDefinition) {
    let before = ticks(&serial(vm));
    let &(saved_n, saved_uptime) = before.last().expect("ticks before saving");

    timed("start (restore)", || {
        hv.start(vm).expect("start from saved state")
    });
    assert_eq!(hv.state(vm).expect("getState"), VmState::Running);
    wait_until(vm, "ticks after the restore", || {
        last_tick(vm) > saved_n + 5
    });
    let log = serial(vm);
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
}

/// For a started VM whose guest was told to reach the broker's address and
/// `10.0.2.2:<other_port>` (`vmc.reach=`): `broker` gets the guest's probe, and
/// `elsewhere` (listening on `other_port`) nothing.
pub fn reaches_only_the_broker(
    vm: &VmDefinition,
    broker: &TcpListener,
    elsewhere: &TcpListener,
    other_port: u16,
) {
    broker.set_nonblocking(true).expect("nonblocking");
    let mut greeting = String::new();
    wait_until(
        vm,
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
    wait_until(vm, "the guest to give up on the other port", || {
        serial(vm).contains(&blocked)
    });
    elsewhere.set_nonblocking(true).expect("nonblocking");
    assert!(
        matches!(elsewhere.accept(), Err(e) if e.kind() == ErrorKind::WouldBlock),
        "nothing but the broker is reachable from the guest"
    );
}

/// Every operation a powered-off VM named `errors` cannot do is refused with a
/// clear error, and so is creating it again.
pub fn wrong_state_operations_fail(hv: &dyn Hypervisor, vm: &VmDefinition) {
    let invalid = |result: Result<(), HypervisorError>, operation: &str| match result {
        Err(HypervisorError::InvalidState {
            state: VmState::PoweredOff,
            ..
        }) => {}
        other => panic!("{operation} of a powered-off VM: {other:?}"),
    };
    invalid(hv.pause(vm), "pause");
    invalid(hv.resume(vm), "resume");
    invalid(hv.reset(vm), "reset");
    invalid(hv.shutdown(vm), "shutdown");
    invalid(hv.power_off(vm), "powerOff");
    invalid(hv.save_state(vm), "saveState");
    invalid(hv.discard_state(vm), "discardState");
    let error = hv.pause(vm).expect_err("pause");
    assert_eq!(
        error.to_string(),
        "VM \"errors\" cannot pause while it is PoweredOff"
    );
    assert!(matches!(
        hv.performance(vm),
        Err(HypervisorError::InvalidState { .. })
    ));
    match hv.restore_snapshot(vm, "nope") {
        Err(e @ HypervisorError::NoSuchSnapshot { .. }) => {
            assert_eq!(
                e.to_string(),
                "VM \"errors\" has no snapshot named \"nope\""
            )
        }
        other => panic!("restore of a missing snapshot: {other:?}"),
    }
    assert!(matches!(
        hv.delete_snapshot(vm, "nope"),
        Err(HypervisorError::NoSuchSnapshot { .. })
    ));
    assert!(matches!(
        hv.create(&vm.spec),
        Err(HypervisorError::InvalidSpec(message)) if message.contains("already exists")
    ));
}
