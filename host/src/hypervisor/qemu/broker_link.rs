//! How a guest of either QEMU-based backend (this one and `libvirt`) reaches the
//! broker and nothing else, and how it learns where the broker is.
//!
//! The NIC is on QEMU user networking with `restrict=on`, so the guest reaches
//! nothing at all, except a `guestfwd` from [`GUEST_BROKER_ADDRESS`]`:<port>` that
//! runs `vmc-host relay <broker>` ([`super::relay`]) for each connection. The guest agent
//! reads that address, and the destination prefix and beacon interval it must use,
//! from fw_cfg strings ([`FW_CFG_BROKER`], [`FW_CFG_PREFIX`],
//! [`FW_CFG_BEACON_INTERVAL`]). [`BrokerLink`] renders both from a backend's
//! settings; each backend passes them to QEMU its own way (command line, or domain
//! XML and files). What it does not do: bridged networking, or check the prefix
//! (only the QEMU backend, which puts it on a command line, has to).

use std::path::Path;
use std::time::Duration;

/// The address a guest reaches the broker at (user networking's guestfwd).
pub const GUEST_BROKER_ADDRESS: &str = "10.0.2.100";
/// The fw_cfg entry holding `<address>:<port>` of the broker, read in the guest at
/// `/sys/firmware/qemu_fw_cfg/by_name/opt/vmc/broker/raw`.
pub const FW_CFG_BROKER: &str = "opt/vmc/broker";
/// The fw_cfg entry holding the destination prefix the guest agent must use.
pub const FW_CFG_PREFIX: &str = "opt/vmc/prefix";
/// The fw_cfg entry holding the guest agent's beacon interval, in seconds.
pub const FW_CFG_BEACON_INTERVAL: &str = "opt/vmc/beacon_interval";

/// The guest's side of a backend's settings.
#[derive(Clone, Copy, Debug)]
pub struct BrokerLink<'a> {
    /// The broker as seen from the host (`host`, `port`); `None`: the guest
    /// reaches nothing at all.
    pub broker_forward: Option<&'a (String, u16)>,
    /// The `vmc-host` binary QEMU runs as the relay of each guest connection.
    pub relay: &'a Path,
    /// The port the guest connects to at [`GUEST_BROKER_ADDRESS`].
    pub guest_broker_port: u16,
    pub guest_prefix: Option<&'a str>,
    pub guest_beacon_interval: Option<Duration>,
}

impl BrokerLink<'_> {
    /// QEMU's `-netdev` value of the NIC `id`: restricted user networking whose
    /// only way out is the forward to the broker.
    pub fn netdev(&self, id: &str) -> String {
        let mut netdev = format!("user,id={id},restrict=on");
        if let Some((host, port)) = self.broker_forward {
            // QEMU splits its options at commas (`,,` is a literal one); the command
            // is then split like a shell would (GLib's g_shell_parse_argv).
            let relay = shell_quoted(&self.relay.to_string_lossy()).replace(',', ",,");
            netdev.push_str(&format!(
                ",guestfwd=tcp:{GUEST_BROKER_ADDRESS}:{}-cmd:{relay} relay {host}:{port}",
                self.guest_broker_port
            ));
        }
        netdev
    }

    /// The fw_cfg entries the guest gets and their values, raw: only entries with
    /// a value.
    pub fn fw_cfg_values(&self) -> Vec<(&'static str, String)> {
        let mut values = Vec::new();
        if self.broker_forward.is_some() {
            values.push((
                FW_CFG_BROKER,
                format!("{GUEST_BROKER_ADDRESS}:{}", self.guest_broker_port),
            ));
        }
        if let Some(prefix) = self.guest_prefix {
            values.push((FW_CFG_PREFIX, prefix.to_owned()));
        }
        if let Some(interval) = self.guest_beacon_interval {
            values.push((FW_CFG_BEACON_INTERVAL, interval.as_secs_f64().to_string()));
        }
        values
    }
}

/// `word` as one shell word: as it is when it holds only characters no shell treats
/// specially, otherwise in single quotes.
fn shell_quoted(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-+=:@%,".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Checks a `broker_forward` setting: a host name or address and a port.
pub fn check_broker_forward(broker_forward: Option<&(String, u16)>) -> Result<(), String> {
    let Some((host, port)) = broker_forward else {
        return Ok(());
    };
    let valid = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c));
    if valid && *port != 0 {
        Ok(())
    } else {
        Err(format!(
            "broker_forward {host:?}:{port} is not a host name or address and a port"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_learns_only_what_is_set() {
        let forward = ("127.0.0.1".to_owned(), 5000);
        let mut link = BrokerLink {
            broker_forward: Some(&forward),
            relay: Path::new("/usr/bin/vmc-host"),
            guest_broker_port: 61613,
            guest_prefix: Some("a,b"),
            guest_beacon_interval: Some(Duration::from_millis(1500)),
        };
        assert_eq!(
            link.netdev("n0"),
            "user,id=n0,restrict=on,guestfwd=tcp:10.0.2.100:61613-cmd:/usr/bin/vmc-host relay 127.0.0.1:5000"
        );
        assert_eq!(
            link.fw_cfg_values(),
            [
                (FW_CFG_BROKER, "10.0.2.100:61613".to_owned()),
                (FW_CFG_PREFIX, "a,b".to_owned()),
                (FW_CFG_BEACON_INTERVAL, "1.5".to_owned()),
            ]
        );
        link.relay = Path::new("/opt/my vmc,1/vmc-host");
        assert_eq!(
            link.netdev("n0"),
            "user,id=n0,restrict=on,guestfwd=tcp:10.0.2.100:61613-cmd:'/opt/my vmc,,1/vmc-host' relay 127.0.0.1:5000"
        );
        link.relay = Path::new("/opt/it's/vmc-host");
        assert!(link
            .netdev("n0")
            .ends_with(r"-cmd:'/opt/it'\''s/vmc-host' relay 127.0.0.1:5000"));
        link = BrokerLink {
            broker_forward: None,
            relay: Path::new("vmc-host"),
            guest_broker_port: 61613,
            guest_prefix: None,
            guest_beacon_interval: None,
        };
        assert_eq!(link.netdev("n0"), "user,id=n0,restrict=on");
        assert!(link.fw_cfg_values().is_empty());
    }

    #[test]
    fn a_bad_broker_forward_is_refused() {
        assert!(check_broker_forward(None).is_ok());
        assert!(check_broker_forward(Some(&("[::1]".into(), 1))).is_ok());
        assert!(check_broker_forward(Some(&("bad host".into(), 1))).is_err());
        assert!(check_broker_forward(Some(&("h".into(), 0))).is_err());
        assert!(check_broker_forward(Some(&(String::new(), 1))).is_err());
    }
}
