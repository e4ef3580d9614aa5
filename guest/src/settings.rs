//! The guest agent's configuration: a TOML file and `VMC_*` environment variables,
//! parsed into [`RawSettings`] and validated into [`Settings`] before anything runs.
//!
//! Every key is optional: in a VM the agent needs no configuration at all (the broker
//! is at the default gateway on port 61613 and the id is the NIC's MAC address, as in
//! the original). Unknown keys are an error, so a misspelt setting is never silently
//! ignored. Environment variables win over the file; each key `some_key` is
//! `VMC_SOME_KEY` (lists are comma-separated). [`HELP`] documents every key and is
//! what `vmc-guest --help` prints.

use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;
use vmc_protocol::destinations::Destinations;
use vmc_protocol::identity::GuestId;
use vmc_protocol::stomp::session::TlsSettings;
use vmc_protocol::stomp::{BrokerAddress, SessionConfig};

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read the configuration")]
    Load(#[from] config::ConfigError),
    #[error("setting `{key}` is invalid: {reason}")]
    Invalid { key: &'static str, reason: String },
    #[error("no broker is configured and no default gateway was found in /proc/net/route; set `broker` (VMC_BROKER)")]
    NoBroker,
    #[error("cannot find this guest's id: {0}; set `id` (VMC_ID) or `interface` (VMC_INTERFACE)")]
    NoIdentity(String),
}

/// Settings as written by the operator, before validation.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawSettings {
    pub broker: Option<String>,
    pub login: Option<String>,
    pub passcode: Option<String>,
    pub virtual_host: Option<String>,
    pub tls_ca_file: Option<PathBuf>,
    pub tls_server_name: Option<String>,
    pub id: Option<String>,
    pub interface: Option<String>,
    pub prefix: Option<String>,
    pub beacon_interval: Option<f64>,
    pub heart_beat: Option<f64>,
    pub max_concurrent_commands: Option<usize>,
    pub kill_grace: Option<f64>,
    pub state_dir: Option<PathBuf>,
    pub allowed_roots: Option<Vec<PathBuf>>,
    pub max_file_size: Option<u64>,
    pub max_frame_size: Option<usize>,
}

/// The keys [`RawSettings`] knows, as written in TOML (and, upper-cased, after `VMC_`).
pub const KEYS: [&str; 17] = [
    "broker",
    "login",
    "passcode",
    "virtual_host",
    "tls_ca_file",
    "tls_server_name",
    "id",
    "interface",
    "prefix",
    "beacon_interval",
    "heart_beat",
    "max_concurrent_commands",
    "kill_grace",
    "state_dir",
    "allowed_roots",
    "max_file_size",
    "max_frame_size",
];

/// Every setting, its default and meaning, as `--help` prints it.
pub const HELP: &str = "\
Settings (TOML file given with --config, or VMC_<KEY> environment variables, which win):
  broker                   stomp://HOST:PORT or stomp+ssl://HOST:PORT of the broker
                           (default: the default gateway, port 61613)
  login, passcode          broker credentials (default: none)
  virtual_host             STOMP `host` header; RabbitMQ's vhost (default: /)
  tls_ca_file              PEM CA file trusted for stomp+ssl brokers
  tls_server_name          name expected in the broker's certificate (default: its host)
  id                       this guest's id (default: the MAC address of `interface`)
  interface                NIC whose MAC is the id (default: the first non-loopback
                           Ethernet interface, physical ones first)
  prefix                   destination prefix shared with the host (default: vmc)
  beacon_interval          seconds between STILL_ALIVE beacons (default: 10)
  heart_beat               STOMP heart-beat seconds, 0 = off (default: 10)
  max_concurrent_commands  commands run at once; more wait in order (default: 16)
  kill_grace               seconds between SIGTERM and SIGKILL on cancel/timeout (default: 5)
  state_dir                result spool and kept outputs (default: /var/lib/vmc-guest)
  allowed_roots            comma-separated directories file transfers may touch
                           (default: /tmp,/var/tmp,<state_dir>/files)
  max_file_size            largest file accepted by a transfer, bytes (default: 64 GiB)
  max_frame_size           largest STOMP frame, bytes (default: 16 MiB)
";

/// Validated settings, ready to use.
#[derive(Clone, Debug)]
pub struct Settings {
    pub session: SessionConfig,
    pub id: GuestId,
    /// The MAC address the id comes from, when it does.
    pub mac: Option<String>,
    pub interface: Option<String>,
    pub destinations: Destinations,
    pub beacon_interval: Duration,
    pub max_concurrent_commands: usize,
    pub kill_grace: Duration,
    pub state_dir: PathBuf,
    pub allowed_roots: Vec<PathBuf>,
    pub max_file_size: u64,
}

impl RawSettings {
    /// Reads the optional TOML file, then `VMC_*` variables over it.
    pub fn load(file: Option<&Path>) -> Result<RawSettings, SettingsError> {
        let mut builder = config::Config::builder();
        if let Some(file) = file {
            builder = builder.add_source(config::File::from(file).required(true));
        }
        // Only this agent's own keys are taken from the environment: other VMC_*
        // variables belong to the host agent or the deployment scripts.
        let ours = vmc_protocol::agent_main::own_vmc_variables(std::env::vars(), &KEYS);
        let env = config::Environment::with_prefix("VMC")
            .prefix_separator("_")
            .source(Some(ours))
            .try_parsing(true)
            .list_separator(",")
            .with_list_parse_key("allowed_roots");
        Ok(builder.add_source(env).build()?.try_deserialize()?)
    }

    /// Checks every value and fills in defaults (finding the gateway and the MAC
    /// through `system`).
    pub fn validate(self, system: &dyn SystemProbe) -> Result<Settings, SettingsError> {
        let address = match &self.broker {
            Some(url) => BrokerAddress::parse(url).map_err(|e| SettingsError::Invalid {
                key: "broker",
                reason: e.to_string(),
            })?,
            None => {
                let gateway = system.default_gateway().ok_or(SettingsError::NoBroker)?;
                BrokerAddress::tcp(gateway, 61613)
            }
        };
        let seconds = |key: &'static str, value: Option<f64>, default: f64, zero_ok: bool| {
            let v = value.unwrap_or(default);
            if !v.is_finite() || v < 0.0 || (!zero_ok && v == 0.0) || v > 86_400.0 {
                return Err(SettingsError::Invalid {
                    key,
                    reason: format!("{v} is not a number of seconds between 0 and 86400"),
                });
            }
            Ok(Duration::from_secs_f64(v))
        };
        let beacon_interval = seconds("beacon_interval", self.beacon_interval, 10.0, false)?;
        let heart_beat = seconds("heart_beat", self.heart_beat, 10.0, true)?;
        let kill_grace = seconds("kill_grace", self.kill_grace, 5.0, true)?;

        let (id, mac, interface) = match &self.id {
            Some(id) => {
                let id = GuestId::new(id).map_err(|e| SettingsError::Invalid {
                    key: "id",
                    reason: e.to_string(),
                })?;
                (id, None, self.interface.clone())
            }
            None => {
                let (interface, mac) = system
                    .interface_mac(self.interface.as_deref())
                    .map_err(SettingsError::NoIdentity)?;
                let id = GuestId::from_mac(&mac).map_err(|e| {
                    SettingsError::NoIdentity(format!("{interface} has no usable MAC: {e}"))
                })?;
                let mac = id.as_str().to_owned();
                (id, Some(mac), Some(interface))
            }
        };
        let prefix = self
            .prefix
            .as_deref()
            .unwrap_or(vmc_protocol::destinations::DEFAULT_PREFIX);
        let destinations = Destinations::new(prefix).map_err(|e| SettingsError::Invalid {
            key: "prefix",
            reason: e.to_string(),
        })?;

        let max_concurrent_commands = self.max_concurrent_commands.unwrap_or(16);
        if max_concurrent_commands == 0 || max_concurrent_commands > 4096 {
            return Err(SettingsError::Invalid {
                key: "max_concurrent_commands",
                reason: format!("{max_concurrent_commands} is not between 1 and 4096"),
            });
        }
        let state_dir = self
            .state_dir
            .unwrap_or_else(|| PathBuf::from("/var/lib/vmc-guest"));
        if !state_dir.is_absolute() {
            return Err(SettingsError::Invalid {
                key: "state_dir",
                reason: format!("{} is not an absolute path", state_dir.display()),
            });
        }
        let allowed_roots = self.allowed_roots.unwrap_or_else(|| {
            vec![
                PathBuf::from("/tmp"),
                PathBuf::from("/var/tmp"),
                state_dir.join("files"),
            ]
        });
        if let Some(bad) = allowed_roots.iter().find(|r| !r.is_absolute()) {
            return Err(SettingsError::Invalid {
                key: "allowed_roots",
                reason: format!("{} is not an absolute path", bad.display()),
            });
        }
        let max_frame_size = self
            .max_frame_size
            .unwrap_or(vmc_protocol::stomp::codec::DEFAULT_MAX_FRAME_SIZE);
        if max_frame_size < 64 * 1024 {
            return Err(SettingsError::Invalid {
                key: "max_frame_size",
                reason: format!("{max_frame_size} bytes is below the 64 KiB minimum"),
            });
        }

        let mut session = SessionConfig::new(address.clone());
        session.login = self.login;
        session.passcode = self.passcode;
        session.virtual_host = self.virtual_host.unwrap_or_else(|| "/".to_owned());
        session.heart_beat_send = heart_beat;
        session.heart_beat_receive = heart_beat;
        session.max_frame_size = max_frame_size;
        match (address.tls, self.tls_ca_file) {
            (true, Some(ca_file)) => {
                session.tls = Some(TlsSettings {
                    ca_file,
                    server_name: self.tls_server_name,
                });
            }
            (true, None) => {
                return Err(SettingsError::Invalid {
                    key: "tls_ca_file",
                    reason: "a stomp+ssl broker needs the CA file that signed its certificate"
                        .into(),
                })
            }
            (false, _) => {}
        }
        Ok(Settings {
            session,
            id,
            mac,
            interface,
            destinations,
            beacon_interval,
            max_concurrent_commands,
            kill_grace,
            state_dir,
            allowed_roots,
            max_file_size: self.max_file_size.unwrap_or(64 << 30),
        })
    }
}

/// What validation needs to know about the machine (real: [`crate::identity::LocalSystem`]).
pub trait SystemProbe {
    /// The IPv4 default gateway, as text.
    fn default_gateway(&self) -> Option<String>;
    /// The chosen interface and its MAC address, or why none can serve.
    fn interface_mac(&self, wanted: Option<&str>) -> Result<(String, String), String>;
}

#[cfg(test)]
mod tests {
    use super::*;

    struct FixedSystem;

    impl SystemProbe for FixedSystem {
        fn default_gateway(&self) -> Option<String> {
            Some("10.0.2.2".into())
        }
        fn interface_mac(&self, wanted: Option<&str>) -> Result<(String, String), String> {
            match wanted {
                None | Some("eth0") => Ok(("eth0".into(), "52:54:00:ab:cd:ef".into())),
                Some(other) => Err(format!("no interface {other}")),
            }
        }
    }

    #[test]
    fn no_configuration_means_gateway_broker_and_mac_id() {
        let settings = RawSettings::default().validate(&FixedSystem).unwrap();
        assert_eq!(
            settings.session.addresses[0],
            BrokerAddress::tcp("10.0.2.2", 61613)
        );
        assert_eq!(settings.id.as_str(), "52:54:00:AB:CD:EF");
        assert_eq!(settings.mac.as_deref(), Some("52:54:00:AB:CD:EF"));
        assert_eq!(settings.beacon_interval, Duration::from_secs(10));
        assert!(settings.allowed_roots.contains(&PathBuf::from("/tmp")));
    }

    #[test]
    fn explicit_id_and_broker_win() {
        let raw = RawSettings {
            broker: Some("stomp://127.0.0.1:61613".into()),
            id: Some("worker-7".into()),
            ..RawSettings::default()
        };
        let settings = raw.validate(&FixedSystem).unwrap();
        assert_eq!(settings.id.as_str(), "worker-7");
        assert_eq!(settings.mac, None);
        assert_eq!(settings.session.addresses[0].host, "127.0.0.1");
    }

    #[test]
    fn mistakes_are_named() {
        let cases: Vec<(RawSettings, &str)> = vec![
            (
                RawSettings {
                    broker: Some("http://x:1".into()),
                    ..Default::default()
                },
                "broker",
            ),
            (
                RawSettings {
                    id: Some("a b".into()),
                    ..Default::default()
                },
                "id",
            ),
            (
                RawSettings {
                    beacon_interval: Some(0.0),
                    ..Default::default()
                },
                "beacon_interval",
            ),
            (
                RawSettings {
                    max_concurrent_commands: Some(0),
                    ..Default::default()
                },
                "max_concurrent_commands",
            ),
            (
                RawSettings {
                    state_dir: Some("relative".into()),
                    ..Default::default()
                },
                "state_dir",
            ),
            (
                RawSettings {
                    allowed_roots: Some(vec!["tmp".into()]),
                    ..Default::default()
                },
                "allowed_roots",
            ),
            (
                RawSettings {
                    broker: Some("stomp+ssl://h:1".into()),
                    ..Default::default()
                },
                "tls_ca_file",
            ),
        ];
        for (raw, key) in cases {
            let err = raw.validate(&FixedSystem).unwrap_err();
            assert!(err.to_string().contains(key), "{err} should name {key}");
        }
        let err = RawSettings {
            interface: Some("wlan9".into()),
            ..Default::default()
        }
        .validate(&FixedSystem)
        .unwrap_err();
        assert!(err.to_string().contains("wlan9"), "{err}");
    }

    #[test]
    fn toml_file_is_read_and_unknown_keys_refused() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.toml");
        std::fs::write(
            &good,
            "id = \"g1\"\nbeacon_interval = 2.5\nallowed_roots = [\"/srv\"]\n",
        )
        .unwrap();
        let raw = RawSettings::load(Some(&good)).unwrap();
        assert_eq!(raw.id.as_deref(), Some("g1"));
        assert_eq!(raw.beacon_interval, Some(2.5));
        assert_eq!(raw.allowed_roots, Some(vec![PathBuf::from("/srv")]));
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "beacon_intervall = 3\n").unwrap();
        let err = RawSettings::load(Some(&bad)).unwrap_err();
        assert!(
            err.to_string().contains("beacon_intervall")
                || format!("{err:?}").contains("beacon_intervall"),
            "{err:?}"
        );
    }
}
