//! The libvirt backend: each VM is a persistent libvirt domain of type `qemu`
//! (TCG), driven through the `virsh` command line ([`virsh`]), so the host agent
//! links no libvirt C library.
//!
//! A VM lives in `<state_dir>/vms/<name>/` like a QEMU backend VM, made by the same
//! code (`qemu/provision.rs`: the same checks and image arguments, a disk image file
//! or a guest image directory whose kernel and initramfs are copied in and whose
//! disk is the overlay's backing file): `disk.qcow2`, `serial.log` (`qemu/vmdir.rs`
//! names those), `fw_cfg/` (the values of
//! the guest's fw_cfg strings `opt/vmc/broker`, `.../prefix`, `.../beacon_interval`,
//! rewritten at every start), `domain.xml` (what was defined) and, after a crash
//! the caller has acknowledged with powerOff, `crash-acknowledged`. The domain is
//! named `<domain_prefix><name>` and defined once at create ([`domain`]: the
//! network is QEMU user networking with `restrict=on` whose only way out is a
//! `guestfwd` running `socat` to the broker, `qemu/broker_link.rs`; libvirt's own
//! networks are never used). Its `<metadata>` records the VM's directory: `removeVM` undefines a domain
//! only when that record matches, so the backend never touches a domain it did not
//! make. libvirt keeps the state, so a new backend object finds its VMs again.
//!
//! Operations map onto virsh one to one: `start`, `shutdown --mode acpi`, `reset`,
//! `destroy`, `suspend`/`resume` (`dompmwakeup` for a guest that suspended itself),
//! `managedsave --running`/`managedsave-remove` (start restores a managed save),
//! and internal qcow2 snapshots (`snapshot-create-as`, `-revert`, `-delete`,
//! `-list`), whose sizes come from `qemu-img info -U` of the VM's disk. States
//! come from `domstats --state` and `dominfo` (managed save), mapped to the
//! original's names by [`state_of`]; a QEMU that died (libvirt's "shut off,
//! crashed") is Aborted until started again or acknowledged with powerOff.
//!
//! libvirtd must run QEMU with `seccomp_sandbox = 0` in `qemu.conf` (libvirt's
//! sandbox forbids the fork that guestfwd's `socat` needs):
//! `deploy/libvirt/install.sh` writes it. What it does not do: `sleep` (libvirt
//! can only ask a QEMU guest agent in the guest for S3), bridged or libvirt-managed
//! networks, more than one disk, or remote libvirt hosts (the VM's files and
//! `qemu-img` are local). Restoring a snapshot follows libvirt: one that holds
//! memory brings the VM back running at that moment, even from PoweredOff; a
//! disk-only snapshot is refused while the VM runs (as the QEMU backend does).

pub mod domain;
pub mod virsh;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use self::domain::{DomainConfig, NETDEV_ID};
use self::virsh::{Virsh, VirshError};
use super::qemu::broker_link::{self, BrokerLink};
use super::qemu::guest_image::GuestImage;
use super::qemu::image::{self, QemuImg};
use super::qemu::process::{self, ProcessId};
use super::qemu::provision;
use super::qemu::vmdir::VmDir;
use super::{
    failed, require_state, DiskCounters, Hypervisor, HypervisorError, PerformanceData,
    SnapshotInfo, VmDefinition, VmSpec, VmState,
};

/// The name stored in [`VmDefinition::backend`] for libvirt VMs.
pub const NAME: &str = "libvirt";
/// The connection used when none is configured.
pub const DEFAULT_URI: &str = "qemu:///system";

/// How the backend reaches libvirt and lays out its VMs.
#[derive(Clone, Debug, PartialEq)]
pub struct LibvirtSettings {
    /// The libvirt connection URI (`virsh -c`); a local one, since the VMs' files
    /// are local.
    pub uri: String,
    /// Every domain of this backend is named `<domain_prefix><VM name>`: one
    /// prefix per host agent, so agents and tests sharing a libvirtd never meet.
    pub domain_prefix: String,
    /// VM directories live in `state_dir/vms/<name>/`.
    pub state_dir: PathBuf,
    pub virsh_binary: PathBuf,
    pub qemu_img_binary: PathBuf,
    /// The broker as seen from the host (`host`, `port`), the target of the guest's
    /// only forward; `None`: the guest reaches nothing at all. Fixed in a VM's
    /// domain when it is created.
    pub broker_forward: Option<(String, u16)>,
    /// The program QEMU runs, as `<program> relay <host>:<port>`, for each connection
    /// a guest opens to the broker: this `vmc-host` (found on `PATH` by default).
    /// Fixed in a VM's domain when it is created.
    pub broker_relay: PathBuf,
    /// The port the guest connects to at
    /// [`GUEST_BROKER_ADDRESS`](broker_link::GUEST_BROKER_ADDRESS).
    pub guest_broker_port: u16,
    /// The destination prefix handed to the guest (fw_cfg
    /// [`FW_CFG_PREFIX`](broker_link::FW_CFG_PREFIX)).
    pub guest_prefix: Option<String>,
    /// The beacon interval handed to the guest (fw_cfg
    /// [`FW_CFG_BEACON_INTERVAL`](broker_link::FW_CFG_BEACON_INTERVAL)).
    pub guest_beacon_interval: Option<Duration>,
    /// Size of the empty disk of a VM created without an image.
    pub blank_disk_bytes: u64,
    /// How long one virsh call may take (a save or a snapshot included).
    pub command_timeout: Duration,
}

impl LibvirtSettings {
    /// The defaults, with VMs under `state_dir` and domains named `prefix<name>`.
    pub fn new(state_dir: impl Into<PathBuf>, domain_prefix: impl Into<String>) -> Self {
        LibvirtSettings {
            uri: DEFAULT_URI.into(),
            domain_prefix: domain_prefix.into(),
            state_dir: state_dir.into(),
            virsh_binary: "virsh".into(),
            qemu_img_binary: "qemu-img".into(),
            broker_forward: Some(("127.0.0.1".into(), 61613)),
            broker_relay: "vmc-host".into(),
            guest_broker_port: 61613,
            guest_prefix: None,
            guest_beacon_interval: None,
            blank_disk_bytes: 1 << 30,
            command_timeout: Duration::from_secs(300),
        }
    }
}

/// Why the libvirt backend cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtSetupError {
    #[error("invalid libvirt settings: {0}")]
    Invalid(String),
    #[error("cannot create the state directory {path}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("libvirt at {uri} does not answer (is libvirtd running? deploy/libvirt/install.sh starts it)")]
    Unreachable {
        uri: String,
        #[source]
        source: VirshError,
    },
    #[error("{binary} does not work: {message}")]
    Binary { binary: PathBuf, message: String },
}

/// The libvirt backend.
#[derive(Debug)]
pub struct Libvirt {
    settings: LibvirtSettings,
    virsh: Virsh,
    img: QemuImg,
    version: String,
}

/// What libvirt says of a VM now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Observed {
    state: VmState,
    /// libvirt's `pmsuspended`: the guest suspended itself (ACPI S3).
    pm_suspended: bool,
}

/// libvirt's `virDomainState` numbers (`domstats` `state.state`).
mod code {
    pub const RUNNING: u32 = 1;
    pub const BLOCKED: u32 = 2;
    pub const PAUSED: u32 = 3;
    pub const SHUTDOWN: u32 = 4;
    pub const SHUTOFF: u32 = 5;
    pub const CRASHED: u32 = 6;
    pub const PMSUSPENDED: u32 = 7;
    // Reasons of PAUSED.
    pub const PAUSED_MIGRATION: u32 = 2;
    pub const PAUSED_SAVE: u32 = 3;
    pub const PAUSED_DUMP: u32 = 4;
    pub const PAUSED_SHUTTING_DOWN: u32 = 8;
    pub const PAUSED_SNAPSHOT: u32 = 9;
    pub const PAUSED_CRASHED: u32 = 10;
    pub const PAUSED_STARTING_UP: u32 = 11;
    // Reasons of SHUTOFF.
    pub const SHUTOFF_CRASHED: u32 = 3;
}

/// The original API's state for a libvirt state and reason, given whether the
/// domain has a managed save and whether a crash was acknowledged.
fn state_of(state: u32, reason: u32, managed_save: bool, crash_acknowledged: bool) -> VmState {
    match state {
        code::RUNNING | code::BLOCKED => VmState::Running,
        code::PAUSED => match reason {
            code::PAUSED_MIGRATION | code::PAUSED_SAVE | code::PAUSED_DUMP => VmState::Saving,
            code::PAUSED_SNAPSHOT => VmState::Saving,
            code::PAUSED_SHUTTING_DOWN => VmState::Stopping,
            code::PAUSED_STARTING_UP => VmState::Starting,
            code::PAUSED_CRASHED => VmState::Stuck,
            _ => VmState::Paused,
        },
        code::SHUTDOWN => VmState::Stopping,
        code::SHUTOFF if managed_save => VmState::Saved,
        code::SHUTOFF if reason == code::SHUTOFF_CRASHED && !crash_acknowledged => VmState::Aborted,
        code::SHUTOFF => VmState::PoweredOff,
        code::CRASHED => VmState::Aborted,
        code::PMSUSPENDED => VmState::Paused,
        _ => VmState::Unknown,
    }
}

/// The files of one VM that only this backend makes (the others: [`VmDir`]).
struct DomainFiles<'a>(&'a Path);

impl DomainFiles<'_> {
    fn domain_xml(&self) -> PathBuf {
        self.0.join("domain.xml")
    }
    fn fw_cfg(&self, entry: &str) -> PathBuf {
        self.0
            .join("fw_cfg")
            .join(entry.rsplit('/').next().unwrap_or(entry))
    }
    fn crash_acknowledged(&self) -> PathBuf {
        self.0.join("crash-acknowledged")
    }
}

impl Libvirt {
    /// Checks the settings and the binaries, creates `state_dir/vms`, and asks
    /// libvirt for its version (failing when libvirtd does not answer).
    pub fn new(settings: LibvirtSettings) -> Result<Libvirt, LibvirtSetupError> {
        let invalid = |message: String| Err(LibvirtSetupError::Invalid(message));
        let prefix = &settings.domain_prefix;
        let prefix_ok = prefix.len() <= 100
            && prefix.starts_with(|c: char| c.is_ascii_alphabetic())
            && prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
        if !prefix_ok {
            return invalid(format!(
                "domain_prefix {prefix:?} must start with a letter and hold only letters, \
                 digits, '.', '_' or '-' (at most 100)"
            ));
        }
        if settings.state_dir.to_string_lossy().contains(',') {
            return invalid(format!(
                "state_dir {} contains a comma, which QEMU's options cannot take",
                settings.state_dir.display()
            ));
        }
        broker_link::check_broker_forward(settings.broker_forward.as_ref())
            .map_err(LibvirtSetupError::Invalid)?;
        if settings.guest_broker_port == 0 {
            return invalid("guest_broker_port must not be 0".into());
        }
        if settings.uri.is_empty() || settings.uri.chars().any(char::is_control) {
            return invalid(format!("uri {:?} is not a libvirt URI", settings.uri));
        }
        let mut settings = settings;
        // Absolute from here on: libvirtd resolves nothing against our directory.
        settings.state_dir = provision::make_state_dir(&settings.state_dir)
            .map_err(|(path, source)| LibvirtSetupError::StateDir { path, source })?;
        let img = QemuImg::new(&settings.qemu_img_binary);
        img.version().map_err(|e| LibvirtSetupError::Binary {
            binary: settings.qemu_img_binary.clone(),
            message: e.to_string(),
        })?;
        let virsh = Virsh::new(
            &settings.virsh_binary,
            &settings.uri,
            settings.command_timeout,
        );
        let version = virsh
            .run(&["version"])
            .map_err(|source| match source {
                VirshError::Spawn { binary, source } => LibvirtSetupError::Binary {
                    binary,
                    message: source.to_string(),
                },
                source => LibvirtSetupError::Unreachable {
                    uri: settings.uri.clone(),
                    source,
                },
            })?
            .lines()
            .filter(|l| l.contains(':'))
            .map(|l| l.trim().to_owned())
            .collect::<Vec<_>>()
            .join("; ");
        log::info!("libvirt backend on {}: {version}", settings.uri);
        Ok(Libvirt {
            settings,
            virsh,
            img,
            version,
        })
    }

    /// `virsh version`'s lines (library, API, hypervisor), joined.
    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn settings(&self) -> &LibvirtSettings {
        &self.settings
    }

    /// The libvirt domain of `vm`.
    pub fn domain_name(&self, vm: &VmDefinition) -> String {
        format!("{}{}", self.settings.domain_prefix, vm.spec.name)
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

    /// Runs virsh; a failure becomes the operation's error.
    fn virsh(
        &self,
        vm: &VmDefinition,
        operation: &'static str,
        args: &[&str],
    ) -> Result<String, HypervisorError> {
        self.virsh
            .run(args)
            .map_err(|e| virsh_failed(vm, operation, e))
    }

    /// Whether libvirt knows a domain named `domain` (running or not).
    fn exists(
        &self,
        vm: &VmDefinition,
        operation: &'static str,
        domain: &str,
    ) -> Result<bool, HypervisorError> {
        Ok(self
            .virsh(vm, operation, &["list", "--all", "--name"])?
            .lines()
            .any(|l| l.trim() == domain))
    }

    /// libvirt's view of the VM.
    fn observe(
        &self,
        vm: &VmDefinition,
        operation: &'static str,
    ) -> Result<Observed, HypervisorError> {
        let domain = self.domain_name(vm);
        let stats = match self.virsh.run(&["domstats", "--state", &domain]) {
            Ok(stats) => virsh::key_values(&stats),
            Err(e) => {
                if matches!(e, VirshError::Failed { .. }) && !self.exists(vm, operation, &domain)? {
                    return Err(HypervisorError::Failed {
                        vm: vm.spec.name.clone(),
                        operation,
                        message: format!(
                            "libvirt at {} has no domain {domain:?} (undefined by someone else?)",
                            self.settings.uri
                        ),
                    });
                }
                return Err(virsh_failed(vm, operation, e));
            }
        };
        let number = |key: &str| -> Result<u32, HypervisorError> {
            stats
                .get(key)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| HypervisorError::Failed {
                    vm: vm.spec.name.clone(),
                    operation,
                    message: format!("virsh domstats gave no number {key}: {stats:?}"),
                })
        };
        let state = number("state.state")?;
        let reason = number("state.reason")?;
        let managed_save = state == code::SHUTOFF
            && virsh::colon_fields(&self.virsh(
                vm,
                operation,
                &["dominfo", "--domain", &domain],
            )?)
            .get("Managed save")
            .is_some_and(|v| v == "yes");
        let acknowledged = DomainFiles(&vm.dir).crash_acknowledged().exists();
        Ok(Observed {
            state: state_of(state, reason, managed_save, acknowledged),
            pm_suspended: state == code::PMSUSPENDED,
        })
    }

    /// Observes the VM and checks that its state is one of `allowed`.
    fn require(
        &self,
        vm: &VmDefinition,
        operation: &'static str,
        allowed: &[VmState],
    ) -> Result<Observed, HypervisorError> {
        let observed = self.observe(vm, operation)?;
        require_state(vm, operation, observed.state, allowed)?;
        Ok(observed)
    }

    /// A domain operation that only needs the VM in one of `allowed`.
    fn simple(
        &self,
        vm: &VmDefinition,
        operation: &'static str,
        allowed: &[VmState],
        args: &[&str],
    ) -> Result<(), HypervisorError> {
        self.require(vm, operation, allowed)?;
        let domain = self.domain_name(vm);
        let mut args = args.to_vec();
        args.extend(["--domain", &domain]);
        self.virsh(vm, operation, &args).map(drop)
    }

    /// Writes the fw_cfg values the guest reads at boot, from the current settings.
    fn write_fw_cfg(
        &self,
        vm: &VmDefinition,
        operation: &'static str,
    ) -> Result<(), HypervisorError> {
        let files = DomainFiles(&vm.dir);
        let io_error = |source| HypervisorError::Io {
            vm: vm.spec.name.clone(),
            operation,
            source,
        };
        fs::create_dir_all(vm.dir.join("fw_cfg")).map_err(io_error)?;
        for (entry, value) in self.broker_link().fw_cfg_values() {
            fs::write(files.fw_cfg(entry), value).map_err(io_error)?;
        }
        Ok(())
    }

    /// Drops the acknowledgement of a past crash: the VM runs again, and a new
    /// crash must show as Aborted.
    fn forget_crash(
        &self,
        vm: &VmDefinition,
        operation: &'static str,
    ) -> Result<(), HypervisorError> {
        match fs::remove_file(DomainFiles(&vm.dir).crash_acknowledged()) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(HypervisorError::Io {
                vm: vm.spec.name.clone(),
                operation,
                source: e,
            }),
            _ => Ok(()),
        }
    }

    /// The guest's way to the broker, from the settings. The domain names a file
    /// for each of its fw_cfg entries, so only entries with a value appear.
    fn broker_link(&self) -> BrokerLink<'_> {
        BrokerLink {
            broker_forward: self.settings.broker_forward.as_ref(),
            relay: &self.settings.broker_relay,
            guest_broker_port: self.settings.guest_broker_port,
            guest_prefix: self.settings.guest_prefix.as_deref(),
            guest_beacon_interval: self.settings.guest_beacon_interval,
        }
    }

    /// The domain of `vm` as configured now.
    fn domain_config(&self, vm: &VmDefinition) -> DomainConfig {
        let files = DomainFiles(&vm.dir);
        let vm_dir = VmDir::new(&vm.dir);
        let spec = &vm.spec;
        let link = self.broker_link();
        DomainConfig {
            name: self.domain_name(vm),
            dir: vm.dir.clone(),
            memory_mib: spec.memory_mib,
            cpus: spec.cpus,
            disk: vm_dir.disk(),
            serial_log: vm_dir.serial_log(),
            kernel: spec.kernel.clone().map(|kernel| {
                (
                    kernel,
                    spec.initrd.clone(),
                    spec.kernel_args
                        .clone()
                        .unwrap_or_else(|| "console=ttyS0".into()),
                )
            }),
            fw_cfg: link
                .fw_cfg_values()
                .into_iter()
                .map(|(entry, _)| (entry.to_owned(), files.fw_cfg(entry)))
                .collect(),
            netdev: link.netdev(NETDEV_ID),
            mac: vm.mac.to_ascii_lowercase(),
        }
    }

    /// Makes the VM's files and defines its domain; the caller removes the
    /// directory if this fails.
    fn make_vm(
        &self,
        vm: &VmDefinition,
        guest_image: Option<&GuestImage>,
    ) -> Result<(), HypervisorError> {
        const OP: &str = "createVM";
        provision::make_disk(&self.img, vm, guest_image, self.settings.blank_disk_bytes)?;
        self.write_fw_cfg(vm, OP)?;
        let files = DomainFiles(&vm.dir);
        let xml = self.domain_config(vm).to_xml();
        fs::write(files.domain_xml(), xml).map_err(|source| HypervisorError::Io {
            vm: vm.spec.name.clone(),
            operation: OP,
            source,
        })?;
        let xml_path = files.domain_xml().to_string_lossy().into_owned();
        self.virsh(vm, OP, &["define", "--file", &xml_path])
            .map(drop)
    }

    /// Checks that the domain of `vm` records `vm`'s directory (that we made it).
    fn check_owned(
        &self,
        vm: &VmDefinition,
        operation: &'static str,
        domain: &str,
    ) -> Result<(), HypervisorError> {
        let recorded = self
            .virsh
            .run(&[
                "metadata",
                "--domain",
                domain,
                "--uri",
                domain::METADATA_NAMESPACE,
                "--config",
            ])
            .ok()
            .and_then(|xml| virsh::element_text(&xml, "dir"));
        if recorded.as_deref() == Some(&*vm.dir.to_string_lossy()) {
            Ok(())
        } else {
            Err(HypervisorError::Failed {
                vm: vm.spec.name.clone(),
                operation,
                message: format!(
                    "the libvirt domain {domain:?} was not made for {} (its record: {recorded:?}); \
                     leaving it alone",
                    vm.dir.display()
                ),
            })
        }
    }

    /// The snapshot names libvirt knows for the VM.
    fn snapshot_names(
        &self,
        vm: &VmDefinition,
        operation: &'static str,
    ) -> Result<Vec<String>, HypervisorError> {
        let domain = self.domain_name(vm);
        Ok(self
            .virsh(
                vm,
                operation,
                &["snapshot-list", "--domain", &domain, "--name"],
            )?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect())
    }

    fn require_snapshot(
        &self,
        vm: &VmDefinition,
        operation: &'static str,
        name: &str,
    ) -> Result<(), HypervisorError> {
        if self
            .snapshot_names(vm, operation)?
            .iter()
            .any(|n| n == name)
        {
            Ok(())
        } else {
            Err(HypervisorError::NoSuchSnapshot {
                vm: vm.spec.name.clone(),
                snapshot: name.to_owned(),
            })
        }
    }

    /// One snapshot's record: libvirt's description and time, the disk's state size.
    fn snapshot_info(
        &self,
        vm: &VmDefinition,
        operation: &'static str,
        name: &str,
        state_sizes: &[(String, u64)],
    ) -> Result<SnapshotRecord, HypervisorError> {
        let domain = self.domain_name(vm);
        let xml = self.virsh(
            vm,
            operation,
            &[
                "snapshot-dumpxml",
                "--domain",
                &domain,
                "--snapshotname",
                name,
                "--xpath",
                "/domainsnapshot/*[self::description or self::state or self::creationTime]",
                "--wrap",
            ],
        )?;
        let in_memory = virsh::element_text(&xml, "state").is_some_and(|s| s != "shutoff");
        Ok(SnapshotRecord {
            info: SnapshotInfo {
                name: name.to_owned(),
                description: virsh::element_text(&xml, "description").unwrap_or_default(),
                created_at: virsh::element_text(&xml, "creationTime")
                    .and_then(|t| t.trim().parse().ok())
                    .unwrap_or(0),
                vm_state_bytes: state_sizes
                    .iter()
                    .find(|(n, _)| n == name)
                    .map_or(0, |&(_, size)| size),
            },
            in_memory,
            order: state_sizes
                .iter()
                .position(|(n, _)| n == name)
                .unwrap_or(usize::MAX),
        })
    }

    /// The disk's internal snapshots in creation order, with their VM state sizes.
    fn disk_snapshots(
        &self,
        vm: &VmDefinition,
        operation: &'static str,
    ) -> Result<Vec<(String, u64)>, HypervisorError> {
        Ok(self
            .img
            .info(&VmDir::new(&vm.dir).disk())
            .map_err(|e| failed(vm, operation, e))?
            .snapshots
            .into_iter()
            .map(|s| (s.name, s.vm_state_size))
            .collect())
    }

    /// The QEMU process libvirt runs for the domain, when it is local and alive.
    fn qemu_process(&self, vm: &VmDefinition) -> Option<ProcessId> {
        let pid_file = Path::new("/run/libvirt/qemu").join(format!("{}.pid", self.domain_name(vm)));
        let pid = process::read_pid_file(&pid_file).ok()?;
        ProcessId::of(pid).filter(|id| id.is_alive())
    }
}

/// A snapshot as listed, with what restore and ordering need.
struct SnapshotRecord {
    info: SnapshotInfo,
    /// The snapshot holds the VM's memory (taken while it ran).
    in_memory: bool,
    /// Its position on the disk (creation order).
    order: usize,
}

fn virsh_failed(vm: &VmDefinition, operation: &'static str, error: VirshError) -> HypervisorError {
    match error {
        VirshError::Timeout { secs, .. } => HypervisorError::Timeout {
            vm: vm.spec.name.clone(),
            operation,
            secs,
        },
        // libvirt's own text says it best.
        VirshError::Failed { message, .. } => HypervisorError::Failed {
            vm: vm.spec.name.clone(),
            operation,
            message: format!("libvirt: {message}"),
        },
        other => failed(vm, operation, other),
    }
}

impl Hypervisor for Libvirt {
    fn name(&self) -> &'static str {
        NAME
    }

    fn create(&self, spec: &VmSpec) -> Result<VmDefinition, HypervisorError> {
        let checked = provision::check_spec(spec)?;
        provision::create(spec, NAME, &self.vms_dir(), checked, |vm, guest_image| {
            self.make_vm(vm, guest_image)
        })
    }

    fn remove(&self, vm: &VmDefinition) -> Result<(), HypervisorError> {
        const OP: &str = "removeVM";
        provision::check_inside(vm, &self.vms_dir())?;
        let domain = self.domain_name(vm);
        if self.exists(vm, OP, &domain)? {
            self.check_owned(vm, OP, &domain)?;
            if VmState::WITH_PROCESS.contains(&self.observe(vm, OP)?.state) {
                self.virsh(vm, OP, &["destroy", "--domain", &domain])?;
            }
            self.virsh(
                vm,
                OP,
                &[
                    "undefine",
                    "--domain",
                    &domain,
                    "--managed-save",
                    "--snapshots-metadata",
                ],
            )?;
        }
        match fs::remove_dir_all(&vm.dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(HypervisorError::Io {
                vm: vm.spec.name.clone(),
                operation: OP,
                source: e,
            }),
            _ => Ok(()),
        }
    }

    fn start(&self, vm: &VmDefinition) -> Result<(), HypervisorError> {
        const OP: &str = "start";
        self.require(
            vm,
            OP,
            &[VmState::PoweredOff, VmState::Aborted, VmState::Saved],
        )?;
        self.write_fw_cfg(vm, OP)?;
        VmDir::new(&vm.dir)
            .rotate_serial_log()
            .map_err(|e| failed(vm, OP, e))?;
        self.forget_crash(vm, OP)?;
        let domain = self.domain_name(vm);
        self.virsh(vm, OP, &["start", "--domain", &domain])
            .map(drop)
    }

    fn shutdown(&self, vm: &VmDefinition) -> Result<(), HypervisorError> {
        self.simple(
            vm,
            "shutdown",
            &[VmState::Running],
            &["shutdown", "--mode", "acpi"],
        )
    }

    fn sleep(&self, _vm: &VmDefinition) -> Result<(), HypervisorError> {
        Err(HypervisorError::NotSupported {
            backend: NAME,
            operation: "sleep (libvirt suspends a guest to RAM only through a QEMU guest \
                        agent in it; the guest must suspend itself)",
        })
    }

    fn reset(&self, vm: &VmDefinition) -> Result<(), HypervisorError> {
        self.simple(
            vm,
            "reset",
            &[VmState::Running, VmState::Paused],
            &["reset"],
        )
    }

    fn power_off(&self, vm: &VmDefinition) -> Result<(), HypervisorError> {
        const OP: &str = "powerOff";
        let mut allowed = VmState::WITH_PROCESS.to_vec();
        allowed.push(VmState::Aborted);
        let observed = self.require(vm, OP, &allowed)?;
        if observed.state == VmState::Aborted {
            // Nothing runs; acknowledging the crash makes the VM PoweredOff.
            return fs::write(DomainFiles(&vm.dir).crash_acknowledged(), b"").map_err(|source| {
                HypervisorError::Io {
                    vm: vm.spec.name.clone(),
                    operation: OP,
                    source,
                }
            });
        }
        let domain = self.domain_name(vm);
        self.virsh(vm, OP, &["destroy", "--domain", &domain])
            .map(drop)
    }

    fn pause(&self, vm: &VmDefinition) -> Result<(), HypervisorError> {
        self.simple(vm, "pause", &[VmState::Running], &["suspend"])
    }

    fn resume(&self, vm: &VmDefinition) -> Result<(), HypervisorError> {
        let observed = self.require(vm, "resume", &[VmState::Paused])?;
        let command = if observed.pm_suspended {
            "dompmwakeup"
        } else {
            "resume"
        };
        let domain = self.domain_name(vm);
        self.virsh(vm, "resume", &[command, "--domain", &domain])
            .map(drop)
    }

    fn state(&self, vm: &VmDefinition) -> Result<VmState, HypervisorError> {
        provision::check_present(vm)?;
        Ok(self.observe(vm, "getState")?.state)
    }

    fn save_state(&self, vm: &VmDefinition) -> Result<(), HypervisorError> {
        // --running: start resumes the VM, as the QEMU backend does.
        self.simple(
            vm,
            "saveState",
            &[VmState::Running, VmState::Paused],
            &["managedsave", "--running"],
        )
    }

    fn discard_state(&self, vm: &VmDefinition) -> Result<(), HypervisorError> {
        self.simple(
            vm,
            "discardState",
            &[VmState::Saved],
            &["managedsave-remove"],
        )
    }

    fn take_snapshot(
        &self,
        vm: &VmDefinition,
        name: &str,
        description: &str,
    ) -> Result<SnapshotInfo, HypervisorError> {
        const OP: &str = "takeSnapshot";
        // libvirt keeps a file named after each snapshot.
        image::check_snapshot_name(name, true).map_err(HypervisorError::InvalidSpec)?;
        self.require(
            vm,
            OP,
            &[
                VmState::Running,
                VmState::Paused,
                VmState::PoweredOff,
                VmState::Aborted,
            ],
        )?;
        if self.snapshot_names(vm, OP)?.iter().any(|n| n == name) {
            return Err(HypervisorError::SnapshotExists {
                vm: vm.spec.name.clone(),
                snapshot: name.into(),
            });
        }
        let domain = self.domain_name(vm);
        self.virsh(
            vm,
            OP,
            &[
                "snapshot-create-as",
                "--domain",
                &domain,
                "--name",
                name,
                "--description",
                description,
                "--atomic",
            ],
        )?;
        let sizes = self.disk_snapshots(vm, OP)?;
        Ok(self.snapshot_info(vm, OP, name, &sizes)?.info)
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
        self.require_snapshot(vm, OP, name)?;
        let snapshot = self.snapshot_info(vm, OP, name, &[])?;
        if !snapshot.in_memory && matches!(observed.state, VmState::Running | VmState::Paused) {
            return Err(HypervisorError::InvalidState {
                vm: vm.spec.name.clone(),
                operation: "restore a disk-only snapshot",
                state: observed.state,
            });
        }
        if snapshot.in_memory {
            self.forget_crash(vm, OP)?;
        }
        let domain = self.domain_name(vm);
        self.virsh(
            vm,
            OP,
            &[
                "snapshot-revert",
                "--domain",
                &domain,
                "--snapshotname",
                name,
            ],
        )
        .map(drop)
    }

    fn delete_snapshot(&self, vm: &VmDefinition, name: &str) -> Result<(), HypervisorError> {
        const OP: &str = "deleteSnapshot";
        self.require(
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
        self.require_snapshot(vm, OP, name)?;
        let domain = self.domain_name(vm);
        self.virsh(
            vm,
            OP,
            &[
                "snapshot-delete",
                "--domain",
                &domain,
                "--snapshotname",
                name,
            ],
        )
        .map(drop)
    }

    fn list_snapshots(&self, vm: &VmDefinition) -> Result<Vec<SnapshotInfo>, HypervisorError> {
        const OP: &str = "listSnapshots";
        let names = self.snapshot_names(vm, OP)?;
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let sizes = self.disk_snapshots(vm, OP)?;
        let mut records = names
            .iter()
            .map(|name| self.snapshot_info(vm, OP, name, &sizes))
            .collect::<Result<Vec<_>, _>>()?;
        records.sort_by_key(|r| (r.order, r.info.created_at));
        Ok(records.into_iter().map(|r| r.info).collect())
    }

    fn performance(&self, vm: &VmDefinition) -> Result<PerformanceData, HypervisorError> {
        const OP: &str = "getPerformanceData";
        self.require(vm, OP, &VmState::WITH_PROCESS)?;
        let domain = self.domain_name(vm);
        let stats = virsh::key_values(&self.virsh(
            vm,
            OP,
            &["domstats", "--cpu-total", "--balloon", "--block", &domain],
        )?);
        let number =
            |key: &str| -> u64 { stats.get(key).and_then(|v| v.parse().ok()).unwrap_or(0) };
        let count = number("block.count");
        let sum = |field: &str| -> u64 {
            (0..count)
                .map(|i| number(&format!("block.{i}.{field}")))
                .sum()
        };
        let process = self.qemu_process(vm).and_then(ProcessId::stats);
        let disk = DiskCounters {
            read_bytes: sum("rd.bytes"),
            write_bytes: sum("wr.bytes"),
            read_ops: sum("rd.reqs"),
            write_ops: sum("wr.reqs"),
            flush_ops: sum("fl.reqs"),
            read_time_ns: sum("rd.times"),
            write_time_ns: sum("wr.times"),
        };
        let rss_bytes = match number("balloon.rss") {
            0 => process.map_or(0, |p| p.rss_bytes),
            kib => kib * 1024,
        };
        Ok(disk.into_performance(
            vm,
            number("cpu.time") as f64 / 1e9,
            rss_bytes,
            process.map_or(0.0, |p| p.uptime_secs),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libvirt_states_map_to_the_original_names() {
        assert_eq!(state_of(1, 1, false, false), VmState::Running);
        assert_eq!(state_of(3, 1, false, false), VmState::Paused);
        assert_eq!(state_of(3, 3, false, false), VmState::Saving);
        assert_eq!(state_of(3, 11, false, false), VmState::Starting);
        assert_eq!(state_of(4, 1, false, false), VmState::Stopping);
        assert_eq!(state_of(5, 1, false, false), VmState::PoweredOff);
        assert_eq!(state_of(5, 2, false, false), VmState::PoweredOff);
        assert_eq!(state_of(5, 5, true, false), VmState::Saved);
        assert_eq!(state_of(5, 3, false, false), VmState::Aborted);
        assert_eq!(state_of(5, 3, false, true), VmState::PoweredOff);
        assert_eq!(state_of(6, 0, false, false), VmState::Aborted);
        assert_eq!(state_of(7, 0, false, false), VmState::Paused);
        assert_eq!(state_of(0, 0, false, false), VmState::Unknown);
    }

    #[test]
    fn bad_settings_are_refused_before_libvirt_is_asked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let refused = |adjust: fn(&mut LibvirtSettings), what: &str| {
            let mut settings = LibvirtSettings::new(dir.path(), "vmc-h1-");
            adjust(&mut settings);
            match Libvirt::new(settings) {
                Err(LibvirtSetupError::Invalid(message)) => {
                    assert!(message.contains(what), "{message} should name {what}")
                }
                other => panic!("{what}: {other:?}"),
            }
        };
        refused(|s| s.domain_prefix = "-x".into(), "domain_prefix");
        refused(|s| s.domain_prefix = "a b".into(), "domain_prefix");
        refused(|s| s.state_dir = "/tmp/a,b".into(), "state_dir");
        refused(
            |s| s.broker_forward = Some(("bad host".into(), 1)),
            "broker_forward",
        );
        refused(|s| s.uri = String::new(), "uri");
    }
}
