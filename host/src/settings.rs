//! The host agent's configuration: a TOML file and `VMC_*` environment variables,
//! parsed into [`RawSettings`] and validated into [`Settings`] before anything runs.
//!
//! Unknown keys in the file are an error, so a misspelt setting is never silently
//! ignored; from the environment only this agent's own keys are taken (other
//! `VMC_*` variables may belong to the guest agent or the scripts). Environment
//! variables win over the file; each key `some_key` is `VMC_SOME_KEY`. Every mistake
//! is reported naming its key. [`HELP`] documents every key and is what
//! `vmc-host --help` prints.

use crate::engine::EngineConfig;
use crate::hypervisor::libvirt::{Libvirt, LibvirtSettings};
use crate::hypervisor::qemu::{AccelMode, Qemu, QemuSettings};
use crate::hypervisor::unmanaged::Unmanaged;
use crate::hypervisor::Hypervisor;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use vmc_protocol::destinations::Destinations;
use vmc_protocol::identity::HostId;
use vmc_protocol::stomp::session::TlsSettings;
use vmc_protocol::stomp::{BrokerAddress, SessionConfig};

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read the configuration")]
    Load(#[from] config::ConfigError),
    #[error("setting `{key}` is invalid: {reason}")]
    Invalid { key: &'static str, reason: String },
    #[error("the QEMU backend cannot start")]
    Qemu(#[source] crate::hypervisor::qemu::QemuSetupError),
    #[error("the libvirt backend cannot start")]
    Libvirt(#[source] crate::hypervisor::libvirt::LibvirtSetupError),
}

/// The keys [`RawSettings`] knows.
pub const KEYS: [&str; 19] = [
    "broker",
    "login",
    "passcode",
    "virtual_host",
    "tls_ca_file",
    "host_id",
    "prefix",
    "state_dir",
    "backend",
    "qemu_binary",
    "qemu_img_binary",
    "accel",
    "libvirt_uri",
    "beacon_interval",
    "chunk_size",
    "window",
    "retention_days",
    "listen",
    "max_frame_size",
];

/// Every setting, its default and meaning, as `--help` prints it.
pub const HELP: &str = "\
Settings (TOML file given with --config, or VMC_<KEY> environment variables, which win):
  broker           stomp://HOST:PORT or stomp+ssl://HOST:PORT (default: stomp://127.0.0.1:61613)
  login, passcode  broker credentials (default: none)
  virtual_host     STOMP `host` header; RabbitMQ's vhost (default: /)
  tls_ca_file      PEM CA file trusted for stomp+ssl brokers
  host_id          this host agent's id; replies come to its own queue (default: the hostname)
  prefix           destination prefix shared with the guests (default: vmc); QEMU VMs
                   get it, and beacon_interval, as fw_cfg opt/vmc/prefix, .../beacon_interval
  state_dir        database, VM disks and sockets (default: /var/lib/vmc-host)
  backend          qemu, libvirt or unmanaged (default: qemu); libvirt VMs are domains
                   named vmc-<host_id>-<name>, of type qemu (TCG), driven with virsh
  qemu_binary      (default: qemu-system-x86_64)
  qemu_img_binary  (default: qemu-img; the libvirt backend uses it too)
  accel            auto, kvm or tcg: auto tries KVM and falls back to TCG (default: auto)
  libvirt_uri      the libvirt connection of the libvirt backend (default: qemu:///system)
  beacon_interval  the guests' beacon interval in seconds: presence turns suspect after
                   3 intervals of silence and lost after 4.5 (default: 10)
  chunk_size       file transfer chunk size in bytes (default: 1 MiB)
  window           file transfer chunks in flight (default: 16)
  retention_days   finished commands and transfers are deleted after this many days (default: 30)
  listen           address of the XML-RPC and JSON API (default: 127.0.0.1:50505)
  max_frame_size   largest STOMP frame, bytes (default: 16 MiB)
";

/// Settings as written by the operator, before validation.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawSettings {
    pub broker: Option<String>,
    pub login: Option<String>,
    pub passcode: Option<String>,
    pub virtual_host: Option<String>,
    pub tls_ca_file: Option<PathBuf>,
    pub host_id: Option<String>,
    pub prefix: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub backend: Option<String>,
    pub qemu_binary: Option<PathBuf>,
    pub qemu_img_binary: Option<PathBuf>,
    pub accel: Option<String>,
    pub libvirt_uri: Option<String>,
    pub beacon_interval: Option<f64>,
    pub chunk_size: Option<u32>,
    pub window: Option<u32>,
    pub retention_days: Option<f64>,
    pub listen: Option<String>,
    pub max_frame_size: Option<usize>,
}

/// Validated settings.
#[derive(Clone, Debug)]
pub struct Settings {
    pub engine: EngineConfig,
    pub retention: Duration,
    pub listen: std::net::SocketAddr,
}

impl RawSettings {
    /// Reads the optional TOML file, then this agent's `VMC_*` variables over it.
    pub fn load(file: Option<&Path>) -> Result<RawSettings, SettingsError> {
        let mut builder = config::Config::builder();
        if let Some(file) = file {
            builder = builder.add_source(config::File::from(file).required(true));
        }
        // Only this agent's own keys: other VMC_* variables belong to the guest
        // agent or the deployment scripts.
        let ours = vmc_protocol::agent_main::own_vmc_variables(std::env::vars(), &KEYS);
        let env = config::Environment::with_prefix("VMC")
            .prefix_separator("_")
            .source(Some(ours))
            .try_parsing(true);
        Ok(builder.add_source(env).build()?.try_deserialize()?)
    }

    /// Checks every value and builds the engine's configuration (starting the QEMU
    /// backend, which detects its accelerator).
    pub fn validate(self) -> Result<Settings, SettingsError> {
        let invalid = |key: &'static str, reason: String| SettingsError::Invalid { key, reason };
        let url = self.broker.as_deref().unwrap_or("stomp://127.0.0.1:61613");
        let address = BrokerAddress::parse(url).map_err(|e| invalid("broker", e.to_string()))?;
        let host_id = match self.host_id {
            Some(id) => id,
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "host".to_owned()),
        };
        let host_id = HostId::new(host_id).map_err(|e| invalid("host_id", e.to_string()))?;
        let prefix = self
            .prefix
            .as_deref()
            .unwrap_or(vmc_protocol::destinations::DEFAULT_PREFIX);
        let destinations =
            Destinations::new(prefix).map_err(|e| invalid("prefix", e.to_string()))?;
        let state_dir = self
            .state_dir
            .unwrap_or_else(|| PathBuf::from("/var/lib/vmc-host"));
        if !state_dir.is_absolute() {
            return Err(invalid(
                "state_dir",
                format!("{} is not an absolute path", state_dir.display()),
            ));
        }
        let beacon = self.beacon_interval.unwrap_or(10.0);
        if !beacon.is_finite() || !(0.05..=3600.0).contains(&beacon) {
            return Err(invalid(
                "beacon_interval",
                format!("{beacon} is not between 0.05 and 3600 seconds"),
            ));
        }
        let chunk_size = self.chunk_size.unwrap_or(1024 * 1024);
        if !(4096..=vmc_protocol::words::MAX_FILE_CHUNK_SIZE).contains(&chunk_size) {
            return Err(invalid(
                "chunk_size",
                format!("{chunk_size} is not between 4 KiB and 4 MiB"),
            ));
        }
        let window = self.window.unwrap_or(16);
        if !(1..=256).contains(&window) {
            return Err(invalid(
                "window",
                format!("{window} is not between 1 and 256"),
            ));
        }
        let retention_days = self.retention_days.unwrap_or(30.0);
        if !retention_days.is_finite() || retention_days <= 0.0 {
            return Err(invalid(
                "retention_days",
                format!("{retention_days} is not a positive number of days"),
            ));
        }
        let listen = self.listen.as_deref().unwrap_or("127.0.0.1:50505");
        let listen: std::net::SocketAddr = listen
            .parse()
            .map_err(|e| invalid("listen", format!("{listen:?} is not an address:port: {e}")))?;
        let max_frame_size = self
            .max_frame_size
            .unwrap_or(vmc_protocol::stomp::codec::DEFAULT_MAX_FRAME_SIZE);
        if max_frame_size < (chunk_size as usize) + 64 * 1024 {
            return Err(invalid(
                "max_frame_size",
                format!("{max_frame_size} bytes cannot carry a chunk of {chunk_size}"),
            ));
        }

        let hypervisor: Arc<dyn Hypervisor> = match self.backend.as_deref().unwrap_or("qemu") {
            "unmanaged" | "none" => Arc::new(Unmanaged),
            "qemu" => {
                let accel = match self.accel.as_deref().unwrap_or("auto") {
                    "auto" => AccelMode::Auto,
                    "kvm" => AccelMode::Kvm,
                    "tcg" => AccelMode::Tcg,
                    other => {
                        return Err(invalid(
                            "accel",
                            format!("{other:?} is not auto, kvm or tcg"),
                        ))
                    }
                };
                let mut qemu = QemuSettings::new(state_dir.join("qemu"));
                if let Some(binary) = self.qemu_binary {
                    qemu.qemu_binary = binary;
                }
                if let Some(binary) = self.qemu_img_binary {
                    qemu.qemu_img_binary = binary;
                }
                qemu.accel = accel;
                qemu.broker_forward = Some((address.host.clone(), address.port));
                qemu.broker_relay = this_program();
                // The guests must use this agent's destinations and beacon interval.
                qemu.guest_prefix = Some(prefix.to_owned());
                qemu.guest_beacon_interval = Some(Duration::from_secs_f64(beacon));
                Arc::new(Qemu::new(qemu).map_err(SettingsError::Qemu)?)
            }
            "libvirt" => {
                // One domain prefix per host agent; host ids may hold ':'.
                let domain_prefix = format!("vmc-{}-", host_id.as_str().replace(':', "_"));
                let mut libvirt = LibvirtSettings::new(state_dir.join("libvirt"), domain_prefix);
                if let Some(uri) = self.libvirt_uri {
                    libvirt.uri = uri;
                }
                if let Some(binary) = self.qemu_img_binary {
                    libvirt.qemu_img_binary = binary;
                }
                libvirt.broker_forward = Some((address.host.clone(), address.port));
                libvirt.broker_relay = this_program();
                libvirt.guest_prefix = Some(prefix.to_owned());
                libvirt.guest_beacon_interval = Some(Duration::from_secs_f64(beacon));
                Arc::new(Libvirt::new(libvirt).map_err(SettingsError::Libvirt)?)
            }
            other => {
                return Err(invalid(
                    "backend",
                    format!("{other:?} is not qemu, libvirt or unmanaged"),
                ))
            }
        };

        let mut session = SessionConfig::new(address.clone());
        session.login = self.login;
        session.passcode = self.passcode;
        session.virtual_host = self.virtual_host.unwrap_or_else(|| "/".to_owned());
        session.max_frame_size = max_frame_size;
        if address.tls {
            let ca_file = self.tls_ca_file.ok_or_else(|| {
                invalid(
                    "tls_ca_file",
                    "a stomp+ssl broker needs the CA file that signed its certificate".into(),
                )
            })?;
            session.tls = Some(TlsSettings {
                ca_file,
                server_name: None,
            });
        }
        let mut engine = EngineConfig::new(host_id, session, state_dir, hypervisor);
        engine.destinations = destinations;
        engine.beacon_interval = Duration::from_secs_f64(beacon);
        engine.chunk_size = chunk_size;
        engine.window = window;
        Ok(Settings {
            engine,
            retention: Duration::from_secs_f64(retention_days * 86_400.0),
            listen,
        })
    }
}

/// This program's path, which QEMU runs as the relay of each guest connection to the
/// broker (`vmc-host relay`); `vmc-host` on `PATH` when the system cannot tell. A
/// binary replaced on disk since it started (an upgrade) reads as `<path> (deleted)`
/// on Linux: the path is what counts, and it holds the new version.
fn this_program() -> PathBuf {
    match std::env::current_exe() {
        Ok(path) => match path.to_str().and_then(|p| p.strip_suffix(" (deleted)")) {
            Some(replaced) => PathBuf::from(replaced),
            None => path,
        },
        Err(_) => PathBuf::from("vmc-host"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unmanaged() -> RawSettings {
        RawSettings {
            backend: Some("unmanaged".into()),
            state_dir: Some("/tmp/vmc-host-test".into()),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_are_the_originals() {
        let settings = unmanaged().validate().unwrap();
        assert_eq!(settings.listen.to_string(), "127.0.0.1:50505");
        assert_eq!(
            settings.engine.session.addresses[0],
            BrokerAddress::tcp("127.0.0.1", 61613)
        );
        assert_eq!(settings.engine.beacon_interval, Duration::from_secs(10));
    }

    #[test]
    fn mistakes_are_named() {
        let cases: Vec<(RawSettings, &str)> = vec![
            (
                RawSettings {
                    broker: Some("amqp://x:1".into()),
                    ..unmanaged()
                },
                "broker",
            ),
            (
                RawSettings {
                    host_id: Some("a b".into()),
                    ..unmanaged()
                },
                "host_id",
            ),
            (
                RawSettings {
                    state_dir: Some("rel".into()),
                    ..unmanaged()
                },
                "state_dir",
            ),
            (
                RawSettings {
                    backend: Some("vbox".into()),
                    ..unmanaged()
                },
                "backend",
            ),
            (
                RawSettings {
                    window: Some(0),
                    ..unmanaged()
                },
                "window",
            ),
            (
                RawSettings {
                    chunk_size: Some(10),
                    ..unmanaged()
                },
                "chunk_size",
            ),
            (
                RawSettings {
                    listen: Some("nowhere".into()),
                    ..unmanaged()
                },
                "listen",
            ),
            (
                RawSettings {
                    retention_days: Some(-1.0),
                    ..unmanaged()
                },
                "retention_days",
            ),
            (
                RawSettings {
                    beacon_interval: Some(0.0),
                    ..unmanaged()
                },
                "beacon_interval",
            ),
        ];
        for (raw, key) in cases {
            let err = raw.validate().unwrap_err();
            assert!(err.to_string().contains(key), "{err} should name {key}");
        }
    }

    #[test]
    fn help_explains_every_key() {
        for key in KEYS {
            assert!(HELP.contains(key), "HELP does not explain {key}");
        }
    }

    #[test]
    fn toml_unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("host.toml");
        std::fs::write(&file, "host_id = \"h1\"\nbacknd = \"qemu\"\n").unwrap();
        let err = RawSettings::load(Some(&file)).unwrap_err();
        assert!(format!("{err:?}").contains("backnd"), "{err:?}");
    }
}
