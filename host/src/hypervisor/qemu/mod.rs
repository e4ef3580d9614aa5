//! The QEMU backend: each VM is a `qemu-system-x86_64` process driven over QMP.
//!
//! A VM lives in `<state_dir>/vms/<name>/` (layout in [`vmdir`]): a qcow2 overlay
//! of the caller's image, attached with `-blockdev` (node `disk0`, so internal
//! snapshots work) to virtio-blk; a virtio-net NIC with the VM's fixed MAC on user
//! networking with `restrict=on`, whose only way out is a `guestfwd` from
//! `10.0.2.100:<guest_broker_port>` to the broker on the host (each connection
//! runs `socat` to it), an address also handed to the guest as the fw_cfg string
//! `opt/vmc/broker` (with, when set, the destination prefix and beacon interval the
//! guest agent must use, `opt/vmc/prefix` and `opt/vmc/beacon_interval`); the serial
//! console appended to `serial.log`; a virtio-serial port `org.qemu.guest_agent.0`
//! whose host end is the unix socket `qga.sock`, for a qemu-guest-agent in the
//! guest (the guest image has one when built with it). The caller's image is a
//! disk image file, or a guest image directory ([`guest_image`], built by
//! `deploy/guest-image/build.sh`): then the VM boots that image's kernel directly, from its own copies of the
//! kernel and initramfs, and its overlay is made over the image's disk. QEMU runs
//! daemonized ([`process`]) with `-S -no-shutdown`: it survives a restart of the
//! host agent, and a guest that powers itself off leaves QEMU in the `shutdown`
//! state, which `state()` sees, reports as PoweredOff and ends. Every
//! operation opens a short QMP connection ([`qmp`]); state comes from the records
//! on disk plus QMP `query-status`, so a new `Qemu` object finds running VMs again.
//! A process that vanished without our `stopping` record is Aborted. Saving the
//! state migrates to `saved.state`; start restores from it with `-incoming defer`.
//! Snapshots are qcow2 internal snapshots: QMP jobs while QEMU runs (with the
//! VM's memory), `qemu-img` ([`image`]) while it does not (disk only).
//! The accelerator is chosen once per backend object ([`accel`]). What the
//! `libvirt` backend shares with this one lives here too: the VM directory
//! ([`vmdir`], [`provision`]), images ([`image`], [`guest_image`]), the guest's
//! network and fw_cfg ([`broker_link`]) and the QEMU process ([`process`]).
//!
//! What it does not do: ACPI S3 on request (QMP has no suspend command: `sleep` is
//! NotSupported, though a guest that suspends itself shows as Paused and resume
//! wakes it), bridged networking, more than one disk, or anything in the guest.
//! Restoring a snapshot while the VM is off brings back its disk only: the next
//! start boots, even if the snapshot holds memory.

pub mod accel;
pub mod broker_link;
pub mod guest_image;
pub mod image;
pub mod process;
pub mod provision;
pub mod qmp;
pub mod relay;
pub mod vmdir;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub use self::accel::{AccelMode, Accelerator};
pub use self::broker_link::{
    FW_CFG_BEACON_INTERVAL, FW_CFG_BROKER, FW_CFG_PREFIX, GUEST_BROKER_ADDRESS,
};

use self::accel::AccelChoice;
use self::broker_link::BrokerLink;
use self::image::{ImageSnapshot, QemuImg};
use self::process::ProcessId;
use self::provision::CheckedSpec;
use self::qmp::{QmpClient, QmpError};
use self::vmdir::{Liveness, VmDir};
use super::{
    failed, require_state, DiskCounters, Hypervisor, HypervisorError, PerformanceData,
    SnapshotInfo, VmDefinition, VmSpec, VmState,
};

/// The name stored in [`VmDefinition::backend`] for QEMU VMs.
pub const NAME: &str = "qemu";
/// The block node of the VM's disk (QMP snapshot jobs name it).
const DISK_NODE: &str = "disk0";
/// The longest path a unix socket address holds (`sun_path` less its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// How the backend runs QEMU.
#[derive(Clone, Debug, PartialEq)]
pub struct QemuSettings {
    /// VM directories live in `state_dir/vms/<name>/`.
    pub state_dir: PathBuf,
    pub qemu_binary: PathBuf,
    pub qemu_img_binary: PathBuf,
    pub accel: AccelMode,
    /// The broker as seen from the host (`host`, `port`), the target of the guest's
    /// only forward; `None`: the guest reaches nothing at all.
    pub broker_forward: Option<(String, u16)>,
    /// The program QEMU runs, as `<program> relay <host>:<port>`, for each connection
    /// a guest opens to the broker: this `vmc-host` (found on `PATH` by default).
    pub broker_relay: PathBuf,
    /// The port the guest connects to at [`GUEST_BROKER_ADDRESS`].
    pub guest_broker_port: u16,
    /// The destination prefix handed to the guest (fw_cfg [`FW_CFG_PREFIX`]): the
    /// host agent's own, so its guests and it talk on the same destinations.
    pub guest_prefix: Option<String>,
    /// The beacon interval handed to the guest (fw_cfg [`FW_CFG_BEACON_INTERVAL`]):
    /// the one the host agent's presence tracking expects.
    pub guest_beacon_interval: Option<Duration>,
    /// Size of the empty disk of a VM created without an image.
    pub blank_disk_bytes: u64,
    /// How long start may take: QEMU's setup plus a restore from saved state.
    pub start_timeout: Duration,
    /// How long QEMU may take to answer one QMP command.
    pub qmp_timeout: Duration,
    /// How long a save or a snapshot job may take.
    pub job_timeout: Duration,
    /// How long QEMU may take to exit after `quit` before it is killed.
    pub stop_timeout: Duration,
    /// How long the KVM probe may run before KVM counts as unusable.
    pub kvm_probe_timeout: Duration,
}

impl QemuSettings {
    /// The defaults, with VMs under `state_dir`.
    pub fn new(state_dir: impl Into<PathBuf>) -> QemuSettings {
        QemuSettings {
            state_dir: state_dir.into(),
            qemu_binary: "qemu-system-x86_64".into(),
            qemu_img_binary: "qemu-img".into(),
            accel: AccelMode::Auto,
            broker_forward: Some(("127.0.0.1".into(), 61613)),
            broker_relay: "vmc-host".into(),
            guest_broker_port: 61613,
            guest_prefix: None,
            guest_beacon_interval: None,
            blank_disk_bytes: 1 << 30,
            start_timeout: Duration::from_secs(60),
            qmp_timeout: Duration::from_secs(10),
            job_timeout: Duration::from_secs(300),
            stop_timeout: Duration::from_secs(10),
            kvm_probe_timeout: Duration::from_millis(1500),
        }
    }
}

/// Why the QEMU backend cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum QemuSetupError {
    #[error("invalid QEMU settings: {0}")]
    Invalid(String),
    #[error("cannot create the state directory {path}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{binary} does not work: {message}")]
    Binary { binary: PathBuf, message: String },
}

/// The QEMU backend.
#[derive(Debug)]
pub struct Qemu {
    settings: QemuSettings,
    img: QemuImg,
    accel: AccelChoice,
    version: String,
}

/// What the backend sees of a VM now.
#[derive(Debug)]
struct Observed {
    state: VmState,
    /// The QEMU process, when one runs.
    process: Option<ProcessId>,
    /// QMP's run state (`running`, `paused`, `suspended`, ...), when known.
    run_status: Option<String>,
}

impl Qemu {
    /// Checks the binaries, creates `state_dir/vms`, and picks the accelerator.
    pub fn new(settings: QemuSettings) -> Result<Qemu, QemuSetupError> {
        check_option_safe(&settings.state_dir)
            .map_err(|e| QemuSetupError::Invalid(format!("state_dir: {e}")))?;
        if settings.broker_forward.is_some() {
            broker_link::check_broker_forward(settings.broker_forward.as_ref())
                .map_err(QemuSetupError::Invalid)?;
            find_in_path("socat").ok_or_else(|| QemuSetupError::Binary {
                binary: "socat".into(),
                message: "not found in PATH (the guest's forward to the broker runs it)".into(),
            })?;
        }
        if let Some(prefix) = &settings.guest_prefix {
            if prefix.is_empty() || prefix.chars().any(char::is_control) {
                return Err(QemuSetupError::Invalid(format!(
                    "guest_prefix {prefix:?} must be non-empty, without control characters"
                )));
            }
        }
        if settings.guest_broker_port == 0 {
            return Err(QemuSetupError::Invalid(
                "guest_broker_port must not be 0".into(),
            ));
        }
        let mut settings = settings;
        // Absolute from here on: a daemonized QEMU runs in `/`.
        settings.state_dir = provision::make_state_dir(&settings.state_dir)
            .map_err(|(path, source)| QemuSetupError::StateDir { path, source })?;
        let output = std::process::Command::new(&settings.qemu_binary)
            .arg("--version")
            .output()
            .map_err(|e| QemuSetupError::Binary {
                binary: settings.qemu_binary.clone(),
                message: e.to_string(),
            })?;
        if !output.status.success() {
            return Err(QemuSetupError::Binary {
                binary: settings.qemu_binary.clone(),
                message: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            });
        }
        let version = String::from_utf8_lossy(&output.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .into();
        let img = QemuImg::new(&settings.qemu_img_binary);
        img.version().map_err(|e| QemuSetupError::Binary {
            binary: settings.qemu_img_binary.clone(),
            message: e.to_string(),
        })?;
        let accel = accel::detect(
            settings.accel,
            &settings.qemu_binary,
            &settings.state_dir,
            settings.kvm_probe_timeout,
        );
        log::info!(
            "qemu backend: {version}, accelerator {} ({})",
            accel.accelerator.as_str(),
            accel.reason
        );
        Ok(Qemu {
            settings,
            img,
            accel,
            version,
        })
    }

    /// The accelerator every VM of this backend runs with.
    pub fn accelerator(&self) -> Accelerator {
        self.accel.accelerator
    }

    /// Why that accelerator was chosen (e.g. the KVM probe's outcome).
    pub fn accelerator_reason(&self) -> &str {
        &self.accel.reason
    }

    /// `qemu-system-x86_64 --version`'s first line.
    pub fn qemu_version(&self) -> &str {
        &self.version
    }

    pub fn settings(&self) -> &QemuSettings {
        &self.settings
    }

    /// The file the VM's serial console is appended to.
    pub fn serial_log(vm: &VmDefinition) -> PathBuf {
        VmDir::new(&vm.dir).serial_log()
    }

    /// The qcow2 overlay the VM writes to.
    pub fn disk_path(vm: &VmDefinition) -> PathBuf {
        VmDir::new(&vm.dir).disk()
    }

    fn vms_dir(&self) -> PathBuf {
        self.settings.state_dir.join("vms")
    }

    fn qmp(
        &self,
        vm: &VmDefinition,
        operation: &'static str,
    ) -> Result<QmpClient, HypervisorError> {
        QmpClient::connect(&VmDir::new(&vm.dir).qmp_socket(), self.settings.qmp_timeout)
            .map_err(|e| qmp_failed(vm, operation, e))
    }

    /// The VM's state, from the records on disk and QMP.
    fn observe(&self, vm: &VmDefinition) -> Result<Observed, HypervisorError> {
        let dir = VmDir::new(&vm.dir);
        let off = |dir: &VmDir| Observed {
            state: if dir.has_saved_state() {
                VmState::Saved
            } else {
                VmState::PoweredOff
            },
            process: None,
            run_status: None,
        };
        match dir.liveness().map_err(|e| failed(vm, "getState", e))? {
            Liveness::Off => Ok(off(&dir)),
            Liveness::Gone {
                stopped_by_us: true,
            } => {
                dir.clear_process_records()
                    .map_err(|e| failed(vm, "getState", e))?;
                Ok(off(&dir))
            }
            Liveness::Gone {
                stopped_by_us: false,
            } => Ok(Observed {
                state: VmState::Aborted,
                process: None,
                run_status: None,
            }),
            Liveness::Alive(id) => {
                let status = QmpClient::connect(&dir.qmp_socket(), self.settings.qmp_timeout)
                    .and_then(|mut qmp| qmp.execute("query-status", None));
                match status {
                    Ok(answer) => {
                        let run_status = answer
                            .get("status")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_owned();
                        if run_status == "shutdown" {
                            // The guest powered itself off; QEMU waits (-no-shutdown).
                            self.stop_process(vm, &dir, id, "getState")?;
                            return Ok(off(&dir));
                        }
                        let state = state_of_run_status(&run_status);
                        Ok(Observed {
                            state,
                            process: Some(id),
                            run_status: Some(run_status),
                        })
                    }
                    Err(e) if !id.is_alive() => {
                        log::debug!(
                            "VM {:?}: QEMU exited while asked for its state: {e}",
                            vm.spec.name
                        );
                        self.observe(vm)
                    }
                    Err(e) => {
                        log::warn!(
                            "VM {:?}: QEMU runs but QMP does not answer: {e}",
                            vm.spec.name
                        );
                        Ok(Observed {
                            state: VmState::Stuck,
                            process: Some(id),
                            run_status: None,
                        })
                    }
                }
            }
        }
    }

    /// Observes the VM and checks that its state is one of `allowed`.
    fn require(
        &self,
        vm: &VmDefinition,
        operation: &'static str,
        allowed: &[VmState],
    ) -> Result<Observed, HypervisorError> {
        let observed = self.observe(vm)?;
        require_state(vm, operation, observed.state, allowed)?;
        Ok(observed)
    }

    /// Stops QEMU: records that we do, asks it to quit, kills it if it does not,
    /// then forgets it.
    fn stop_process(
        &self,
        vm: &VmDefinition,
        dir: &VmDir,
        id: ProcessId,
        operation: &'static str,
    ) -> Result<(), HypervisorError> {
        dir.record_stopping()
            .map_err(|e| failed(vm, operation, e))?;
        let quit = QmpClient::connect(&dir.qmp_socket(), self.settings.qmp_timeout)
            .and_then(QmpClient::quit);
        if let Err(e) = quit {
            log::warn!(
                "VM {:?}: quit over QMP failed ({e}); killing QEMU",
                vm.spec.name
            );
        }
        if !id.wait_gone(self.settings.stop_timeout) {
            log::warn!("VM {:?}: QEMU ignored quit; killing it", vm.spec.name);
            id.kill();
            if !id.wait_gone(self.settings.stop_timeout) {
                return Err(HypervisorError::Timeout {
                    vm: vm.spec.name.clone(),
                    operation,
                    secs: self.settings.stop_timeout.as_secs(),
                });
            }
        }
        dir.clear_process_records()
            .map_err(|e| failed(vm, operation, e))
    }

    /// Kills a QEMU of this VM that runs without our record: one launched by a
    /// start that was interrupted (host agent killed) before it recorded it.
    fn kill_orphan(&self, vm: &VmDefinition, dir: &VmDir) {
        let Ok(pid) = process::read_pid_file(&dir.pid_file()) else {
            return;
        };
        let Some(id) = ProcessId::of(pid) else { return };
        if id.is_alive() && process::command_line_mentions(pid, &dir.qmp_socket()) {
            log::warn!(
                "VM {:?}: killing an unrecorded QEMU (pid {pid})",
                vm.spec.name
            );
            id.kill();
            id.wait_gone(self.settings.stop_timeout);
        }
    }

    /// QEMU's command line for `vm` (without `-daemonize`).
    fn command_line(&self, vm: &VmDefinition, restore: bool) -> Vec<String> {
        let dir = VmDir::new(&vm.dir);
        let spec = &vm.spec;
        let p = |path: PathBuf| path.to_string_lossy().into_owned();
        let mut args: Vec<String> = vec![
            "-name".into(),
            format!("guest={},debug-threads=on", spec.name),
            "-no-user-config".into(),
            "-nodefaults".into(),
            "-machine".into(),
            "pc".into(),
            "-accel".into(),
            self.accel.accelerator.as_str().into(),
        ];
        if self.accel.accelerator == Accelerator::Kvm {
            args.extend(["-cpu".into(), "host".into()]);
        }
        args.extend([
            "-smp".into(),
            spec.cpus.to_string(),
            "-m".into(),
            format!("{}M", spec.memory_mib),
            "-display".into(),
            "none".into(),
            "-S".into(),
            "-no-shutdown".into(),
            "-msg".into(),
            "timestamp=on".into(),
            "-pidfile".into(),
            p(dir.pid_file()),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", p(dir.qmp_socket())),
            "-chardev".into(),
            format!("file,id=serial0,path={},append=on", p(dir.serial_log())),
            "-serial".into(),
            "chardev:serial0".into(),
            "-blockdev".into(),
            format!(
                "driver=file,filename={},node-name={DISK_NODE}-file",
                p(dir.disk())
            ),
            "-blockdev".into(),
            format!("driver=qcow2,file={DISK_NODE}-file,node-name={DISK_NODE}"),
            "-device".into(),
            format!("virtio-blk-pci,drive={DISK_NODE},id={DISK_NODE}-dev"),
            // Entropy from the host: without it a quiet guest under TCG may wait
            // minutes for its kernel's random pool, and every getrandom() with it.
            "-device".into(),
            "virtio-rng-pci".into(),
        ]);
        let link = self.broker_link();
        for (entry, value) in link.fw_cfg_values() {
            args.extend([
                "-fw_cfg".into(),
                // QEMU's option syntax: a comma in a value is written twice.
                format!("name={entry},string={}", value.replace(',', ",,")),
            ]);
        }
        args.extend([
            "-netdev".into(),
            link.netdev("net0"),
            "-device".into(),
            // romfile= : no iPXE option ROM, nothing boots from the network.
            format!(
                "virtio-net-pci,netdev=net0,mac={},romfile=",
                vm.mac.to_ascii_lowercase()
            ),
            // The port a qemu-guest-agent in the guest opens (an image built with
            // it starts it there); nobody else uses it.
            "-device".into(),
            "virtio-serial-pci,id=vserial0".into(),
            "-chardev".into(),
            format!(
                "socket,id=qga0,path={},server=on,wait=off",
                p(dir.guest_agent_socket())
            ),
            "-device".into(),
            "virtserialport,bus=vserial0.0,chardev=qga0,name=org.qemu.guest_agent.0".into(),
        ]);
        if let Some(kernel) = &spec.kernel {
            args.extend(["-kernel".into(), p(kernel.clone())]);
            if let Some(initrd) = &spec.initrd {
                args.extend(["-initrd".into(), p(initrd.clone())]);
            }
            let append = spec
                .kernel_args
                .clone()
                .unwrap_or_else(|| "console=ttyS0".into());
            args.extend(["-append".into(), append]);
        }
        if restore {
            args.extend(["-incoming".into(), "defer".into()]);
        }
        args
    }

    /// The guest's way to the broker, from the settings.
    fn broker_link(&self) -> BrokerLink<'_> {
        BrokerLink {
            broker_forward: self.settings.broker_forward.as_ref(),
            relay: &self.settings.broker_relay,
            guest_broker_port: self.settings.guest_broker_port,
            guest_prefix: self.settings.guest_prefix.as_deref(),
            guest_beacon_interval: self.settings.guest_beacon_interval,
        }
    }

    /// Polls `query-migrate` until the migration (either way) completes.
    fn wait_migration(
        &self,
        vm: &VmDefinition,
        qmp: &mut QmpClient,
        operation: &'static str,
        timeout: Duration,
    ) -> Result<(), HypervisorError> {
        let deadline = Instant::now() + timeout;
        loop {
            let answer = qmp
                .execute("query-migrate", None)
                .map_err(|e| qmp_failed(vm, operation, e))?;
            match answer
                .get("status")
                .and_then(Value::as_str)
                .unwrap_or("none")
            {
                "completed" => return Ok(()),
                "failed" | "cancelled" => {
                    let why = answer
                        .get("error-desc")
                        .and_then(Value::as_str)
                        .unwrap_or("QEMU gave no reason");
                    return Err(HypervisorError::Failed {
                        vm: vm.spec.name.clone(),
                        operation,
                        message: format!("migration failed: {why}"),
                    });
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(HypervisorError::Timeout {
                    vm: vm.spec.name.clone(),
                    operation,
                    secs: timeout.as_secs(),
                });
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs a QMP job command (`snapshot-save`, ...) and waits for it to conclude.
    fn run_job(
        &self,
        vm: &VmDefinition,
        operation: &'static str,
        command: &str,
        mut arguments: Value,
    ) -> Result<(), HypervisorError> {
        let mut qmp = self.qmp(vm, operation)?;
        let job_id = format!(
            "vmc-{command}-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        );
        arguments["job-id"] = json!(job_id);
        qmp.execute(command, Some(arguments))
            .map_err(|e| qmp_failed(vm, operation, e))?;
        let deadline = Instant::now() + self.settings.job_timeout;
        loop {
            let jobs = qmp
                .execute("query-jobs", None)
                .map_err(|e| qmp_failed(vm, operation, e))?;
            let job = jobs.as_array().and_then(|all| {
                all.iter()
                    .find(|j| j.get("id").and_then(Value::as_str) == Some(&job_id))
            });
            let Some(job) = job else {
                return Err(HypervisorError::Failed {
                    vm: vm.spec.name.clone(),
                    operation,
                    message: format!("QEMU forgot the job {job_id} before it concluded"),
                });
            };
            if job.get("status").and_then(Value::as_str) == Some("concluded") {
                let error = job.get("error").and_then(Value::as_str).map(str::to_owned);
                // The job stays listed until dismissed; a failed dismiss changes nothing.
                if let Err(e) = qmp.execute("job-dismiss", Some(json!({ "id": job_id }))) {
                    log::warn!("VM {:?}: cannot dismiss job {job_id}: {e}", vm.spec.name);
                }
                return match error {
                    None => Ok(()),
                    Some(message) => Err(HypervisorError::Failed {
                        vm: vm.spec.name.clone(),
                        operation,
                        message,
                    }),
                };
            }
            if Instant::now() >= deadline {
                return Err(HypervisorError::Timeout {
                    vm: vm.spec.name.clone(),
                    operation,
                    secs: self.settings.job_timeout.as_secs(),
                });
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The disk's snapshots: from QMP while QEMU runs, from qemu-img otherwise.
    fn raw_snapshots(
        &self,
        vm: &VmDefinition,
        observed: &Observed,
        operation: &'static str,
    ) -> Result<Vec<ImageSnapshot>, HypervisorError> {
        if observed.process.is_none() {
            let info = self
                .img
                .info(&VmDir::new(&vm.dir).disk())
                .map_err(|e| failed(vm, operation, e))?;
            return Ok(info.snapshots);
        }
        let mut qmp = self.qmp(vm, operation)?;
        let devices = qmp
            .execute("query-block", None)
            .map_err(|e| qmp_failed(vm, operation, e))?;
        let snapshots = devices
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| d.get("inserted"))
            .find(|inserted| inserted.get("node-name").and_then(Value::as_str) == Some(DISK_NODE))
            .and_then(|inserted| inserted.get("image"))
            .and_then(|image| image.get("snapshots"))
            .cloned()
            .unwrap_or(Value::Array(Vec::new()));
        serde_json::from_value(snapshots).map_err(|e| HypervisorError::Failed {
            vm: vm.spec.name.clone(),
            operation,
            message: format!("cannot read QEMU's snapshot list: {e}"),
        })
    }

    fn find_snapshot(
        &self,
        vm: &VmDefinition,
        observed: &Observed,
        operation: &'static str,
        name: &str,
    ) -> Result<ImageSnapshot, HypervisorError> {
        self.raw_snapshots(vm, observed, operation)?
            .into_iter()
            .find(|s| s.name == name)
            .ok_or_else(|| HypervisorError::NoSuchSnapshot {
                vm: vm.spec.name.clone(),
                snapshot: name.to_owned(),
            })
    }

    /// Both backends' checks ([`provision::check_spec`]), then QEMU's own: the QMP
    /// socket's path length, and paths its option syntax can take.
    fn validate_spec(&self, spec: &VmSpec) -> Result<CheckedSpec, HypervisorError> {
        let checked = provision::check_spec(spec)?;
        let socket = VmDir::new(self.vms_dir().join(&spec.name)).qmp_socket();
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(HypervisorError::InvalidSpec(format!(
                "the QMP socket path {} would be longer than the {MAX_SOCKET_PATH} bytes a unix \
                 socket allows: use a shorter state_dir or VM name",
                socket.display()
            )));
        }
        if let Some(image) = &checked.guest_image {
            check_option_safe(&image.disk)
                .map_err(|e| HypervisorError::InvalidSpec(format!("the image's disk: {e}")))?;
        }
        for (what, path) in [
            ("image", &spec.image),
            ("kernel", &spec.kernel),
            ("initrd", &spec.initrd),
        ] {
            if let Some(path) = path {
                check_option_safe(path)
                    .map_err(|e| HypervisorError::InvalidSpec(format!("the {what}: {e}")))?;
            }
        }
        Ok(checked)
    }
}

/// QEMU's option syntax splits at commas, and `file:` migration URIs cannot quote.
fn check_option_safe(path: &Path) -> Result<(), String> {
    if path.to_string_lossy().contains(',') {
        Err(format!(
            "{} contains a comma, which QEMU's options cannot take",
            path.display()
        ))
    } else {
        Ok(())
    }
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(program))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
        .into_iter()
        .find(|candidate| candidate.is_file())
}

/// The original API's state for a QMP run state.
fn state_of_run_status(status: &str) -> VmState {
    match status {
        "running" | "colo" => VmState::Running,
        // suspended: ACPI S3, woken by resume; the others stop the vCPUs too.
        "paused" | "suspended" | "io-error" | "debug" | "watchdog" => VmState::Paused,
        "prelaunch" => VmState::Starting,
        "inmigrate" | "restore-vm" => VmState::Restoring,
        "finish-migrate" | "postmigrate" | "save-vm" => VmState::Saving,
        "shutdown" => VmState::Stopping,
        "internal-error" | "guest-panicked" => VmState::Stuck,
        _ => VmState::Unknown,
    }
}

fn qmp_failed(vm: &VmDefinition, operation: &'static str, error: QmpError) -> HypervisorError {
    match error {
        QmpError::Timeout { millis, .. } => HypervisorError::Timeout {
            vm: vm.spec.name.clone(),
            operation,
            secs: u64::try_from(millis / 1000).unwrap_or(u64::MAX),
        },
        // QEMU's own text says it best.
        QmpError::Command { desc, .. } => HypervisorError::Failed {
            vm: vm.spec.name.clone(),
            operation,
            message: desc,
        },
        other => failed(vm, operation, other),
    }
}

impl Hypervisor for Qemu {
    fn name(&self) -> &'static str {
        NAME
    }

    fn create(&self, spec: &VmSpec) -> Result<VmDefinition, HypervisorError> {
        let checked = self.validate_spec(spec)?;
        provision::create(spec, NAME, &self.vms_dir(), checked, |vm, guest_image| {
            provision::make_disk(&self.img, vm, guest_image, self.settings.blank_disk_bytes)
        })
    }

    fn remove(&self, vm: &VmDefinition) -> Result<(), HypervisorError> {
        provision::check_inside(vm, &self.vms_dir())?;
        if !vm.dir.exists() {
            return Ok(());
        }
        let observed = self.observe(vm)?;
        if let Some(id) = observed.process {
            self.stop_process(vm, &VmDir::new(&vm.dir), id, "removeVM")?;
        }
        fs::remove_dir_all(&vm.dir).map_err(|source| HypervisorError::Io {
            vm: vm.spec.name.clone(),
            operation: "removeVM",
            source,
        })
    }

    fn start(&self, vm: &VmDefinition) -> Result<(), HypervisorError> {
        const OP: &str = "start";
        self.require(
            vm,
            OP,
            &[VmState::PoweredOff, VmState::Aborted, VmState::Saved],
        )?;
        let dir = VmDir::new(&vm.dir);
        self.kill_orphan(vm, &dir);
        dir.clear_process_records().map_err(|e| failed(vm, OP, e))?;
        dir.rotate_serial_log().map_err(|e| failed(vm, OP, e))?;
        let restore = dir.has_saved_state();
        let args = self.command_line(vm, restore);
        log::debug!(
            "VM {:?}: {} {}",
            vm.spec.name,
            self.settings.qemu_binary.display(),
            args.join(" ")
        );
        process::launch(
            &self.settings.qemu_binary,
            &args,
            &dir.qemu_log(),
            self.settings.start_timeout,
        )
        .map_err(|e| failed(vm, OP, e))?;
        let pid = process::read_pid_file(&dir.pid_file()).map_err(|e| failed(vm, OP, e))?;
        let id = ProcessId::of(pid).ok_or_else(|| HypervisorError::Failed {
            vm: vm.spec.name.clone(),
            operation: OP,
            message: format!(
                "QEMU exited right after its setup (see {})",
                dir.qemu_log().display()
            ),
        })?;
        dir.record_launch(id).map_err(|e| failed(vm, OP, e))?;

        let run = || -> Result<(), HypervisorError> {
            let mut qmp = self.qmp(vm, OP)?;
            if restore {
                let uri = format!("file:{}", dir.saved_state().display());
                qmp.execute("migrate-incoming", Some(json!({ "uri": uri })))
                    .map_err(|e| qmp_failed(vm, OP, e))?;
                self.wait_migration(vm, &mut qmp, OP, self.settings.start_timeout)?;
                // The run state leaves `inmigrate` just after the migration completes.
                let deadline = Instant::now() + self.settings.qmp_timeout;
                loop {
                    let status = qmp
                        .execute("query-status", None)
                        .map_err(|e| qmp_failed(vm, OP, e))?;
                    if status.get("status").and_then(Value::as_str) != Some("inmigrate")
                        || Instant::now() >= deadline
                    {
                        break;
                    }
                    thread::sleep(Duration::from_millis(5));
                }
            }
            qmp.execute("cont", None)
                .map_err(|e| qmp_failed(vm, OP, e))?;
            Ok(())
        };
        if let Err(e) = run() {
            if let Err(stop) = self.stop_process(vm, &dir, id, OP) {
                log::warn!(
                    "VM {:?}: cannot stop the QEMU of a failed start: {stop}",
                    vm.spec.name
                );
            }
            return Err(e);
        }
        if restore {
            vmdir::remove_if_exists(&dir.saved_state()).map_err(|e| failed(vm, OP, e))?;
        }
        Ok(())
    }

    fn shutdown(&self, vm: &VmDefinition) -> Result<(), HypervisorError> {
        self.require(vm, "shutdown", &[VmState::Running])?;
        self.qmp(vm, "shutdown")?
            .execute("system_powerdown", None)
            .map(drop)
            .map_err(|e| qmp_failed(vm, "shutdown", e))
    }

    fn sleep(&self, _vm: &VmDefinition) -> Result<(), HypervisorError> {
        Err(HypervisorError::NotSupported {
            backend: NAME,
            operation: "sleep (QMP cannot put a guest into ACPI S3; the guest must suspend itself)",
        })
    }

    fn reset(&self, vm: &VmDefinition) -> Result<(), HypervisorError> {
        self.require(vm, "reset", &[VmState::Running, VmState::Paused])?;
        self.qmp(vm, "reset")?
            .execute("system_reset", None)
            .map(drop)
            .map_err(|e| qmp_failed(vm, "reset", e))
    }

    fn power_off(&self, vm: &VmDefinition) -> Result<(), HypervisorError> {
        const OP: &str = "powerOff";
        let mut allowed = VmState::WITH_PROCESS.to_vec();
        allowed.push(VmState::Aborted);
        let observed = self.require(vm, OP, &allowed)?;
        let dir = VmDir::new(&vm.dir);
        match observed.process {
            Some(id) => self.stop_process(vm, &dir, id, OP),
            // Aborted: nothing runs; acknowledging it makes the VM PoweredOff.
            None => dir.clear_process_records().map_err(|e| failed(vm, OP, e)),
        }
    }

    fn pause(&self, vm: &VmDefinition) -> Result<(), HypervisorError> {
        self.require(vm, "pause", &[VmState::Running])?;
        self.qmp(vm, "pause")?
            .execute("stop", None)
            .map(drop)
            .map_err(|e| qmp_failed(vm, "pause", e))
    }

    fn resume(&self, vm: &VmDefinition) -> Result<(), HypervisorError> {
        let observed = self.require(vm, "resume", &[VmState::Paused])?;
        let command = if observed.run_status.as_deref() == Some("suspended") {
            "system_wakeup"
        } else {
            "cont"
        };
        self.qmp(vm, "resume")?
            .execute(command, None)
            .map(drop)
            .map_err(|e| qmp_failed(vm, "resume", e))
    }

    fn state(&self, vm: &VmDefinition) -> Result<VmState, HypervisorError> {
        provision::check_present(vm)?;
        Ok(self.observe(vm)?.state)
    }

    fn save_state(&self, vm: &VmDefinition) -> Result<(), HypervisorError> {
        const OP: &str = "saveState";
        let observed = self.require(vm, OP, &[VmState::Running, VmState::Paused])?;
        let Some(id) = observed.process else {
            return Err(HypervisorError::InvalidState {
                vm: vm.spec.name.clone(),
                operation: OP,
                state: observed.state,
            });
        };
        let dir = VmDir::new(&vm.dir);
        let partial = dir.saved_state_partial();
        vmdir::remove_if_exists(&partial).map_err(|e| failed(vm, OP, e))?;
        let mut qmp = self.qmp(vm, OP)?;
        let uri = format!("file:{}", partial.display());
        qmp.execute("migrate", Some(json!({ "uri": uri })))
            .map_err(|e| qmp_failed(vm, OP, e))?;
        if let Err(e) = self.wait_migration(vm, &mut qmp, OP, self.settings.job_timeout) {
            // A failed migration leaves the VM as it was; drop the partial file.
            let _ = qmp.execute("migrate_cancel", None);
            let _ = fs::remove_file(&partial);
            return Err(e);
        }
        drop(qmp);
        self.stop_process(vm, &dir, id, OP)?;
        fs::rename(&partial, dir.saved_state()).map_err(|source| HypervisorError::Io {
            vm: vm.spec.name.clone(),
            operation: OP,
            source,
        })
    }

    fn discard_state(&self, vm: &VmDefinition) -> Result<(), HypervisorError> {
        self.require(vm, "discardState", &[VmState::Saved])?;
        vmdir::remove_if_exists(&VmDir::new(&vm.dir).saved_state())
            .map_err(|e| failed(vm, "discardState", e))
    }

    fn take_snapshot(
        &self,
        vm: &VmDefinition,
        name: &str,
        description: &str,
    ) -> Result<SnapshotInfo, HypervisorError> {
        const OP: &str = "takeSnapshot";
        image::check_snapshot_name(name, false).map_err(HypervisorError::InvalidSpec)?;
        let observed = self.require(
            vm,
            OP,
            &[
                VmState::Running,
                VmState::Paused,
                VmState::PoweredOff,
                VmState::Aborted,
                VmState::Saved,
            ],
        )?;
        if self
            .raw_snapshots(vm, &observed, OP)?
            .iter()
            .any(|s| s.name == name)
        {
            return Err(HypervisorError::SnapshotExists {
                vm: vm.spec.name.clone(),
                snapshot: name.into(),
            });
        }
        let dir = VmDir::new(&vm.dir);
        // The description first: a snapshot never appears without it.
        dir.set_description(name, Some(description))
            .map_err(|e| failed(vm, OP, e))?;
        let taken = if observed.process.is_some() {
            self.run_job(
                vm,
                OP,
                "snapshot-save",
                json!({ "tag": name, "vmstate": DISK_NODE, "devices": [DISK_NODE] }),
            )
        } else {
            self.img
                .snapshot_create(&dir.disk(), name)
                .map_err(|e| failed(vm, OP, e))
        };
        if let Err(e) = taken {
            let _ = dir.set_description(name, None);
            return Err(e);
        }
        let snapshot = self.find_snapshot(vm, &observed, OP, name)?;
        Ok(SnapshotInfo {
            name: snapshot.name,
            description: description.to_owned(),
            created_at: snapshot.date_sec,
            vm_state_bytes: snapshot.vm_state_size,
        })
    }

    fn restore_snapshot(&self, vm: &VmDefinition, name: &str) -> Result<(), HypervisorError> {
        const OP: &str = "restoreSnapshot";
        let observed = self.require(
            vm,
            OP,
            &[
                VmState::Running,
                VmState::Paused,
                VmState::PoweredOff,
                VmState::Aborted,
            ],
        )?;
        let snapshot = self.find_snapshot(vm, &observed, OP, name)?;
        if observed.process.is_none() {
            return self
                .img
                .snapshot_apply(&VmDir::new(&vm.dir).disk(), name)
                .map_err(|e| failed(vm, OP, e));
        }
        if snapshot.vm_state_size == 0 {
            return Err(HypervisorError::InvalidState {
                vm: vm.spec.name.clone(),
                operation: "restore a disk-only snapshot",
                state: observed.state,
            });
        }
        self.run_job(
            vm,
            OP,
            "snapshot-load",
            json!({ "tag": name, "vmstate": DISK_NODE, "devices": [DISK_NODE] }),
        )
    }

    fn delete_snapshot(&self, vm: &VmDefinition, name: &str) -> Result<(), HypervisorError> {
        const OP: &str = "deleteSnapshot";
        let observed = self.require(
            vm,
            OP,
            &[
                VmState::Running,
                VmState::Paused,
                VmState::PoweredOff,
                VmState::Aborted,
                VmState::Saved,
            ],
        )?;
        self.find_snapshot(vm, &observed, OP, name)?;
        if observed.process.is_some() {
            self.run_job(
                vm,
                OP,
                "snapshot-delete",
                json!({ "tag": name, "devices": [DISK_NODE] }),
            )?;
        } else {
            self.img
                .snapshot_delete(&VmDir::new(&vm.dir).disk(), name)
                .map_err(|e| failed(vm, OP, e))?;
        }
        VmDir::new(&vm.dir)
            .set_description(name, None)
            .map_err(|e| failed(vm, OP, e))
    }

    fn list_snapshots(&self, vm: &VmDefinition) -> Result<Vec<SnapshotInfo>, HypervisorError> {
        const OP: &str = "listSnapshots";
        let observed = self.observe(vm)?;
        let descriptions = VmDir::new(&vm.dir)
            .descriptions()
            .map_err(|e| failed(vm, OP, e))?;
        Ok(self
            .raw_snapshots(vm, &observed, OP)?
            .into_iter()
            .map(|s| SnapshotInfo {
                description: descriptions.get(&s.name).cloned().unwrap_or_default(),
                name: s.name,
                created_at: s.date_sec,
                vm_state_bytes: s.vm_state_size,
            })
            .collect())
    }

    fn performance(&self, vm: &VmDefinition) -> Result<PerformanceData, HypervisorError> {
        const OP: &str = "getPerformanceData";
        let observed = self.require(vm, OP, &VmState::WITH_PROCESS)?;
        let Some(id) = observed.process else {
            return Err(HypervisorError::InvalidState {
                vm: vm.spec.name.clone(),
                operation: OP,
                state: observed.state,
            });
        };
        let stats = id.stats().ok_or_else(|| HypervisorError::Failed {
            vm: vm.spec.name.clone(),
            operation: OP,
            message: "QEMU exited while being measured".into(),
        })?;
        let blockstats = self
            .qmp(vm, OP)?
            .execute("query-blockstats", None)
            .map_err(|e| qmp_failed(vm, OP, e))?;
        let sum = |key: &str| -> u64 {
            blockstats
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|device| device.get("stats")?.get(key)?.as_u64())
                .sum()
        };
        let disk = DiskCounters {
            read_bytes: sum("rd_bytes"),
            write_bytes: sum("wr_bytes"),
            read_ops: sum("rd_operations"),
            write_ops: sum("wr_operations"),
            flush_ops: sum("flush_operations"),
            read_time_ns: sum("rd_total_time_ns"),
            write_time_ns: sum("wr_total_time_ns"),
        };
        Ok(disk.into_performance(vm, stats.cpu_secs, stats.rss_bytes, stats.uptime_secs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_states_map_to_the_original_names() {
        assert_eq!(state_of_run_status("running"), VmState::Running);
        assert_eq!(state_of_run_status("paused"), VmState::Paused);
        assert_eq!(state_of_run_status("suspended"), VmState::Paused);
        assert_eq!(state_of_run_status("prelaunch"), VmState::Starting);
        assert_eq!(state_of_run_status("inmigrate"), VmState::Restoring);
        assert_eq!(state_of_run_status("postmigrate"), VmState::Saving);
        assert_eq!(state_of_run_status("guest-panicked"), VmState::Stuck);
        assert_eq!(state_of_run_status("something-new"), VmState::Unknown);
    }

    #[test]
    fn paths_with_commas_are_refused() {
        assert!(check_option_safe(Path::new("/var/lib/vmc")).is_ok());
        assert!(check_option_safe(Path::new("/tmp/a,b")).is_err());
    }

    fn backend(dir: &Path) -> Qemu {
        Qemu {
            settings: QemuSettings::new(dir),
            img: QemuImg::new("qemu-img"),
            accel: AccelChoice {
                accelerator: Accelerator::Tcg,
                reason: "test".into(),
            },
            version: "test".into(),
        }
    }

    #[test]
    fn the_command_line_confines_the_network_to_the_broker() {
        let dir = tempfile::tempdir().expect("tempdir");
        let qemu = backend(dir.path());
        let mut spec = VmSpec::new("web-1");
        spec.kernel = Some("/boot/vmlinux".into());
        let vm = VmDefinition {
            spec,
            backend: NAME.into(),
            mac: "52:54:00:AB:CD:EF".into(),
            dir: dir.path().join("vms/web-1"),
        };
        let args = qemu.command_line(&vm, false);
        let netdev = args
            .iter()
            .skip_while(|a| *a != "-netdev")
            .nth(1)
            .expect("a -netdev");
        assert_eq!(
            netdev,
            "user,id=net0,restrict=on,guestfwd=tcp:10.0.2.100:61613-cmd:vmc-host relay 127.0.0.1:61613"
        );
        assert!(
            args.contains(&"virtio-net-pci,netdev=net0,mac=52:54:00:ab:cd:ef,romfile=".to_owned())
        );
        assert!(args.contains(&"name=opt/vmc/broker,string=10.0.2.100:61613".to_owned()));
        assert!(args.contains(&"-no-shutdown".to_owned()));
        assert!(
            !args.contains(&"-no-reboot".to_owned()),
            "reset must reboot"
        );
        assert!(!args.contains(&"-incoming".to_owned()));
        assert!(qemu
            .command_line(&vm, true)
            .ends_with(&["-incoming".into(), "defer".into()]));
    }

    #[test]
    fn without_a_broker_the_guest_has_no_way_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut qemu = backend(dir.path());
        qemu.settings.broker_forward = None;
        let vm = VmDefinition {
            spec: VmSpec::new("isolated"),
            backend: NAME.into(),
            mac: provision::mac_for_name("isolated"),
            dir: dir.path().join("vms/isolated"),
        };
        let args = qemu.command_line(&vm, false);
        assert!(args.contains(&"user,id=net0,restrict=on".to_owned()));
        assert!(!args.contains(&"-fw_cfg".to_owned()));
    }

    #[test]
    fn bad_specs_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().expect("tempdir");
        let qemu = backend(dir.path());
        let mut spec = VmSpec::new("../escape");
        assert!(qemu
            .validate_spec(&spec)
            .unwrap_err()
            .to_string()
            .contains("VM name"));
        spec.name = "ok".into();
        spec.memory_mib = 1;
        assert!(qemu
            .validate_spec(&spec)
            .unwrap_err()
            .to_string()
            .contains("memory"));
        spec.memory_mib = 128;
        spec.initrd = Some("/nonexistent".into());
        assert!(qemu
            .validate_spec(&spec)
            .unwrap_err()
            .to_string()
            .contains("need a kernel"));
        spec.initrd = None;
        spec.image = Some("/nonexistent/disk.img".into());
        assert!(qemu
            .validate_spec(&spec)
            .unwrap_err()
            .to_string()
            .contains("is not a file or a guest image directory"));
        spec.image = Some(dir.path().into());
        assert!(qemu
            .validate_spec(&spec)
            .unwrap_err()
            .to_string()
            .contains("is not a file or a guest image directory"));
    }

    #[test]
    fn the_guest_learns_the_hosts_prefix_and_beacon_interval() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut qemu = backend(dir.path());
        qemu.settings.guest_prefix = Some("test,1".into());
        qemu.settings.guest_beacon_interval = Some(Duration::from_millis(1500));
        let vm = VmDefinition {
            spec: VmSpec::new("web-1"),
            backend: NAME.into(),
            mac: provision::mac_for_name("web-1"),
            dir: dir.path().join("vms/web-1"),
        };
        let args = qemu.command_line(&vm, false);
        assert!(args.contains(&"name=opt/vmc/prefix,string=test,,1".to_owned()));
        assert!(args.contains(&"name=opt/vmc/beacon_interval,string=1.5".to_owned()));
    }

    /// `qemu-img` of the QEMU install (deploy/qemu/install.sh) makes the overlay.
    #[test]
    fn a_guest_image_directory_boots_its_kernel_over_its_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("image");
        fs::create_dir(&image).expect("mkdir");
        guest_image::tests::write_image(&image, guest_image::tests::VALID);
        let qemu = backend(&dir.path().join("state"));
        fs::create_dir_all(qemu.vms_dir()).expect("mkdir vms");

        let mut spec = VmSpec::new("from-image");
        spec.image = Some(image.clone());
        let vm = qemu
            .create(&spec)
            .expect("create from a guest image directory");

        let vm_dir = VmDir::new(&vm.dir);
        assert_eq!(
            vm.spec.image,
            Some(image.clone()),
            "the caller's image is kept"
        );
        assert_eq!(vm.spec.kernel, Some(vm_dir.kernel()));
        assert_eq!(vm.spec.initrd, Some(vm_dir.initramfs()));
        assert_eq!(vm.spec.kernel_args.as_deref(), Some("console=ttyS0 quiet"));
        assert_eq!(fs::read(vm_dir.kernel()).expect("kernel copy"), b"kernel");
        assert_eq!(
            fs::read(vm_dir.initramfs()).expect("initramfs"),
            b"initramfs"
        );
        let overlay = qemu.img.info(&vm_dir.disk()).expect("qemu-img info");
        assert_eq!(overlay.format, "qcow2");
        let backing = fs::canonicalize(image.join("disk.raw")).expect("canonical");
        assert_eq!(
            overlay.backing_filename.as_deref(),
            Some(backing.to_str().expect("utf-8"))
        );
        let args = qemu.command_line(&vm, false);
        let kernel = vm_dir.kernel().to_string_lossy().into_owned();
        assert!(
            args.windows(2).any(|w| w == ["-kernel", kernel.as_str()]),
            "{args:?}"
        );
        assert!(args
            .windows(2)
            .any(|w| w == ["-append", "console=ttyS0 quiet"]));

        // A rebuilt image does not change what the VM boots.
        fs::remove_file(image.join("kernel")).expect("rm");
        fs::write(image.join("kernel"), b"kernel 2").expect("rebuild");
        assert_eq!(fs::read(vm_dir.kernel()).expect("kernel copy"), b"kernel");

        qemu.remove(&vm).expect("remove");
        assert!(!vm.dir.exists());
    }

    #[test]
    fn a_guest_image_brings_its_own_kernel() {
        let dir = tempfile::tempdir().expect("tempdir");
        guest_image::tests::write_image(dir.path(), guest_image::tests::VALID);
        let qemu = backend(dir.path());
        let mut spec = VmSpec::new("both");
        spec.image = Some(dir.path().into());
        spec.kernel = Some(dir.path().join("kernel"));
        let error = qemu.validate_spec(&spec).expect_err("kernel and image dir");
        assert!(
            error.to_string().contains("brings its own kernel"),
            "{error}"
        );

        spec.kernel = None;
        fs::write(dir.path().join(guest_image::MANIFEST), "{}").expect("write");
        let error = qemu.validate_spec(&spec).expect_err("bad manifest");
        assert!(
            error.to_string().contains("is not a guest image manifest"),
            "{error}"
        );
    }
}
