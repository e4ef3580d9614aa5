//! Who is who on the broker: guest ids, host ids, and the sender named in `vmc-from`.
//!
//! A guest is known by a [`GuestId`], usually its NIC's MAC address upper-cased as
//! in the original VMController ([`GuestId::from_mac`]); a host agent by a
//! [`HostId`]. Both are 1 to 64 characters from `[A-Za-z0-9_:-]`, a set chosen so
//! that an id can be pasted into a destination name on RabbitMQ and ActiveMQ
//! (Classic and Artemis) without meaning anything there: no `.` (ActiveMQ's path
//! separator), no `*`, `>` or `#` (wildcards), no `/` and no `::` (Artemis'
//! `address::queue` separator). A guest id may not start with `host:`, which is how
//! a host agent names itself in `vmc-from` ([`PeerId`]). Ids are case-sensitive.
//! This module only validates and formats; it does not discover MAC addresses.

use std::borrow::Borrow;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The longest id, in characters (all allowed characters are ASCII, so also bytes).
pub const MAX_ID_LEN: usize = 64;

/// How a host agent's id is prefixed in `vmc-from` (`host:<host-id>`).
pub const HOST_PREFIX: &str = "host:";

/// Why a string is not a valid id or MAC address.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("an id may not be empty")]
    Empty,
    #[error("the id is {len} bytes long, more than the {MAX_ID_LEN} allowed")]
    TooLong { len: usize },
    #[error("the id {id:?} contains {ch:?}; only A-Z, a-z, 0-9, '_', ':' and '-' are allowed")]
    BadChar { id: String, ch: char },
    #[error("the id {id:?} contains \"::\", which ActiveMQ Artemis reads as a separator")]
    DoubleColon { id: String },
    #[error("the guest id {id:?} starts with \"host:\", which is reserved for host agents")]
    ReservedPrefix { id: String },
    #[error("{mac:?} is not a MAC address (six two-digit hex octets separated by ':' or '-')")]
    BadMac { mac: String },
}

/// Keeps error messages short when the offending input is garbage of any length.
fn clip(text: &str) -> String {
    const MAX_CHARS: usize = 80;
    if text.chars().count() <= MAX_CHARS {
        text.to_owned()
    } else {
        let mut clipped: String = text.chars().take(MAX_CHARS).collect();
        clipped.push('…');
        clipped
    }
}

/// The character rule and length rule shared by guest and host ids.
fn validate_id(id: &str) -> Result<(), IdentityError> {
    if id.is_empty() {
        return Err(IdentityError::Empty);
    }
    if let Some(ch) = id
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '-')))
    {
        return Err(IdentityError::BadChar { id: clip(id), ch });
    }
    if id.len() > MAX_ID_LEN {
        return Err(IdentityError::TooLong { len: id.len() });
    }
    if id.contains("::") {
        return Err(IdentityError::DoubleColon { id: clip(id) });
    }
    Ok(())
}

/// A guest's identity: what it subscribes its queue under and matches `to` globs against.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct GuestId(String);

impl GuestId {
    /// Validates an id (see the module documentation for the rules).
    pub fn new(id: impl Into<String>) -> Result<GuestId, IdentityError> {
        let id = id.into();
        validate_id(&id)?;
        if id.starts_with(HOST_PREFIX) {
            return Err(IdentityError::ReservedPrefix { id: clip(&id) });
        }
        Ok(GuestId(id))
    }

    /// The id of the guest whose NIC has this MAC address: `52:54:00:ab:cd:ef` and
    /// `52-54-00-AB-CD-EF` both give `52:54:00:AB:CD:EF`.
    pub fn from_mac(mac: &str) -> Result<GuestId, IdentityError> {
        let bad = || IdentityError::BadMac { mac: clip(mac) };
        let separator = if mac.contains('-') { '-' } else { ':' };
        let octets: Vec<&str> = mac.split(separator).collect();
        let well_formed = octets.len() == 6
            && octets
                .iter()
                .all(|o| o.len() == 2 && o.bytes().all(|b| b.is_ascii_hexdigit()));
        if !well_formed {
            return Err(bad());
        }
        GuestId::new(octets.join(":").to_ascii_uppercase())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A host agent's identity: names its reply queue and, prefixed, its `vmc-from`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HostId(String);

impl HostId {
    /// Validates an id (same rules as a guest id, without the reserved prefix).
    pub fn new(id: impl Into<String>) -> Result<HostId, IdentityError> {
        let id = id.into();
        validate_id(&id)?;
        Ok(HostId(id))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Implements the conversions both id types share.
macro_rules! id_conversions {
    ($ty:ident) => {
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $ty {
            type Err = IdentityError;
            fn from_str(s: &str) -> Result<$ty, IdentityError> {
                $ty::new(s)
            }
        }

        impl TryFrom<String> for $ty {
            type Error = IdentityError;
            fn try_from(s: String) -> Result<$ty, IdentityError> {
                $ty::new(s)
            }
        }

        impl From<$ty> for String {
            fn from(id: $ty) -> String {
                id.0
            }
        }

        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $ty {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
    };
}

id_conversions!(GuestId);
id_conversions!(HostId);

/// The sender of a message as written in `vmc-from`: a guest id, or `host:<host-id>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PeerId {
    Guest(GuestId),
    Host(HostId),
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerId::Guest(id) => write!(f, "{id}"),
            PeerId::Host(id) => write!(f, "{HOST_PREFIX}{id}"),
        }
    }
}

impl FromStr for PeerId {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<PeerId, IdentityError> {
        match s.strip_prefix(HOST_PREFIX) {
            Some(host) => HostId::new(host).map(PeerId::Host),
            None => GuestId::new(s).map(PeerId::Guest),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_addresses_become_upper_case_colon_separated_ids() {
        let expected = "52:54:00:AB:CD:EF";
        assert_eq!(
            GuestId::from_mac("52:54:00:ab:cd:ef").unwrap().as_str(),
            expected
        );
        assert_eq!(
            GuestId::from_mac("52-54-00-AB-cd-EF").unwrap().as_str(),
            expected
        );
        assert_eq!(GuestId::from_mac(expected).unwrap().as_str(), expected);
    }

    #[test]
    fn malformed_macs_are_refused() {
        for mac in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:ef:01",
            "52:54:00:ab:cd:eg",
            "5:54:00:ab:cd:ef",
            "525:4:00:ab:cd:ef",
            "52:54-00:ab:cd:ef",
            "52.54.00.ab.cd.ef",
            "+2:54:00:ab:cd:ef",
        ] {
            assert!(
                matches!(GuestId::from_mac(mac), Err(IdentityError::BadMac { .. })),
                "{mac:?} was accepted"
            );
        }
    }

    #[test]
    fn ids_keep_to_their_character_set_and_length() {
        assert!(GuestId::new("vm-01_a:b").is_ok());
        assert!(GuestId::new("a".repeat(MAX_ID_LEN)).is_ok());
        assert_eq!(GuestId::new(""), Err(IdentityError::Empty));
        assert_eq!(
            GuestId::new("a".repeat(MAX_ID_LEN + 1)),
            Err(IdentityError::TooLong {
                len: MAX_ID_LEN + 1
            })
        );
        for bad in ["a.b", "a*", "a>", "a#", "a/b", "a b", "é", "a\n"] {
            assert!(
                matches!(GuestId::new(bad), Err(IdentityError::BadChar { .. })),
                "{bad:?}"
            );
            assert!(
                matches!(HostId::new(bad), Err(IdentityError::BadChar { .. })),
                "{bad:?}"
            );
        }
        assert!(matches!(
            GuestId::new("a::b"),
            Err(IdentityError::DoubleColon { .. })
        ));
    }

    #[test]
    fn guest_ids_may_not_pose_as_hosts() {
        assert!(matches!(
            GuestId::new("host:h1"),
            Err(IdentityError::ReservedPrefix { .. })
        ));
        assert!(GuestId::new("hostname").is_ok());
        assert!(HostId::new("host:h1").is_ok());
    }

    #[test]
    fn peer_ids_tell_hosts_from_guests() {
        let host: PeerId = "host:lab-1".parse().unwrap();
        assert_eq!(host, PeerId::Host(HostId::new("lab-1").unwrap()));
        assert_eq!(host.to_string(), "host:lab-1");
        let guest: PeerId = "52:54:00:AB:CD:EF".parse().unwrap();
        assert_eq!(
            guest,
            PeerId::Guest(GuestId::new("52:54:00:AB:CD:EF").unwrap())
        );
        assert_eq!(guest.to_string(), "52:54:00:AB:CD:EF");
        assert!("host:".parse::<PeerId>().is_err());
    }

    #[test]
    fn ids_serialize_as_plain_strings_and_are_validated_when_read() {
        let id = GuestId::new("vm1").unwrap();
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"vm1\"");
        assert_eq!(serde_json::from_str::<GuestId>("\"vm1\"").unwrap(), id);
        assert!(serde_json::from_str::<GuestId>("\"a.b\"").is_err());
    }

    #[test]
    fn errors_about_huge_inputs_stay_short() {
        let err = GuestId::new(format!("{}.", "a".repeat(10_000))).unwrap_err();
        assert!(err.to_string().len() < 200);
    }
}
