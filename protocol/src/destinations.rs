//! The names of the STOMP destinations the agents send to and subscribe to.
//!
//! Every name lives under a configurable prefix (default `vmc`) so that several
//! installations can share one broker, and uses only the `/queue/` and `/topic/`
//! forms that RabbitMQ's STOMP plugin and ActiveMQ both understand:
//!
//! | destination | who subscribes | what goes there |
//! |---|---|---|
//! | `/queue/<prefix>.guest.<guest-id>` | that guest only | unicast requests to it |
//! | `/topic/<prefix>.multicast` | every guest | requests whose `to` is a glob |
//! | `/topic/<prefix>.connections` | every host agent | HELLO, STILL_ALIVE, BYE |
//! | `/queue/<prefix>.host.<host-id>` | that host agent | replies sent to its `reply-to` |
//!
//! Ids are validated by [`crate::identity`] so that they never contain `.`, `*`,
//! `>`, `#` or `/`, which the brokers would read as separators or wildcards. The
//! prefix is one or more `.`-separated words of `[A-Za-z0-9_-]`. This module builds
//! and recognises names; subscribing and sending are the session's business.

use crate::identity::{GuestId, HostId, IdentityError};

/// The prefix used when none is configured.
pub const DEFAULT_PREFIX: &str = "vmc";

/// The longest prefix, in bytes: keeps every name well under AMQP's 255-byte limit.
pub const MAX_PREFIX_LEN: usize = 64;

/// Why a prefix or a destination name is not acceptable.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DestinationError {
    #[error("the destination prefix {prefix:?} is invalid: {reason}")]
    BadPrefix {
        prefix: String,
        reason: &'static str,
    },
    #[error("{destination:?} is not a vmcontroller destination under this prefix")]
    Foreign { destination: String },
    #[error("the destination {destination:?} names an invalid id")]
    BadId {
        destination: String,
        #[source]
        source: IdentityError,
    },
}

/// What a destination is for, with the id it names.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Destination {
    /// `/queue/<prefix>.guest.<id>`: one guest's own queue.
    Guest(GuestId),
    /// `/queue/<prefix>.host.<id>`: one host agent's reply queue.
    Host(HostId),
    /// `/topic/<prefix>.multicast`: requests to every guest whose id matches `to`.
    Multicast,
    /// `/topic/<prefix>.connections`: guest presence announcements.
    Connections,
}

impl Destination {
    /// Whether this is a queue (stored until consumed) rather than a topic.
    pub fn is_queue(&self) -> bool {
        matches!(self, Destination::Guest(_) | Destination::Host(_))
    }
}

/// Builds and parses destination names under one prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destinations {
    prefix: String,
}

impl Default for Destinations {
    fn default() -> Destinations {
        Destinations {
            prefix: DEFAULT_PREFIX.to_owned(),
        }
    }
}

impl Destinations {
    /// Names under `prefix`, which must be `.`-separated words of `[A-Za-z0-9_-]`.
    pub fn new(prefix: &str) -> Result<Destinations, DestinationError> {
        let bad = |reason| {
            Err(DestinationError::BadPrefix {
                prefix: clip(prefix),
                reason,
            })
        };
        if prefix.is_empty() {
            return bad("it is empty");
        }
        if prefix.len() > MAX_PREFIX_LEN {
            return bad("it is longer than 64 bytes");
        }
        if !prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        {
            return bad("only A-Z, a-z, 0-9, '_', '-' and '.' are allowed");
        }
        if prefix.split('.').any(str::is_empty) {
            return bad("it has an empty '.'-separated word");
        }
        Ok(Destinations {
            prefix: prefix.to_owned(),
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `/queue/<prefix>.guest.<id>`.
    pub fn guest_queue(&self, guest: &GuestId) -> String {
        format!("/queue/{}.guest.{guest}", self.prefix)
    }

    /// `/queue/<prefix>.host.<id>`.
    pub fn host_queue(&self, host: &HostId) -> String {
        format!("/queue/{}.host.{host}", self.prefix)
    }

    /// `/topic/<prefix>.multicast`.
    pub fn multicast_topic(&self) -> String {
        format!("/topic/{}.multicast", self.prefix)
    }

    /// `/topic/<prefix>.connections`.
    pub fn connections_topic(&self) -> String {
        format!("/topic/{}.connections", self.prefix)
    }

    /// The name of a destination.
    pub fn name(&self, destination: &Destination) -> String {
        match destination {
            Destination::Guest(id) => self.guest_queue(id),
            Destination::Host(id) => self.host_queue(id),
            Destination::Multicast => self.multicast_topic(),
            Destination::Connections => self.connections_topic(),
        }
    }

    /// Which destination a name is, for example the `destination` or `reply-to` header
    /// of a received frame.
    pub fn parse(&self, name: &str) -> Result<Destination, DestinationError> {
        let foreign = || DestinationError::Foreign {
            destination: clip(name),
        };
        let under_prefix = |kind: &str| {
            name.strip_prefix(kind)
                .and_then(|rest| rest.strip_prefix(self.prefix.as_str()))
                .and_then(|rest| rest.strip_prefix('.'))
        };
        let bad_id = |source| DestinationError::BadId {
            destination: clip(name),
            source,
        };
        if let Some(rest) = under_prefix("/queue/") {
            if let Some(id) = rest.strip_prefix("guest.") {
                return GuestId::new(id).map(Destination::Guest).map_err(bad_id);
            }
            if let Some(id) = rest.strip_prefix("host.") {
                return HostId::new(id).map(Destination::Host).map_err(bad_id);
            }
        } else if let Some(rest) = under_prefix("/topic/") {
            match rest {
                "multicast" => return Ok(Destination::Multicast),
                "connections" => return Ok(Destination::Connections),
                _ => {}
            }
        }
        Err(foreign())
    }
}

/// Keeps error messages short when the offending input is garbage of any length.
fn clip(text: &str) -> String {
    const MAX_CHARS: usize = 160;
    text.chars().take(MAX_CHARS).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn guest() -> GuestId {
        GuestId::from_mac("52:54:00:ab:cd:ef").unwrap()
    }

    fn host() -> HostId {
        HostId::new("lab-1").unwrap()
    }

    #[test]
    fn default_names() {
        let d = Destinations::default();
        assert_eq!(d.prefix(), "vmc");
        assert_eq!(
            d.guest_queue(&guest()),
            "/queue/vmc.guest.52:54:00:AB:CD:EF"
        );
        assert_eq!(d.host_queue(&host()), "/queue/vmc.host.lab-1");
        assert_eq!(d.multicast_topic(), "/topic/vmc.multicast");
        assert_eq!(d.connections_topic(), "/topic/vmc.connections");
    }

    #[test]
    fn names_parse_back_to_what_they_name() {
        let d = Destinations::new("org.example.vmc").unwrap();
        for destination in [
            Destination::Guest(guest()),
            Destination::Host(host()),
            Destination::Multicast,
            Destination::Connections,
        ] {
            let name = d.name(&destination);
            assert!(name.starts_with("/queue/org.example.vmc.") || name.starts_with("/topic/"));
            assert_eq!(d.parse(&name), Ok(destination));
        }
    }

    #[test]
    fn other_names_are_foreign() {
        let d = Destinations::default();
        for name in [
            "",
            "/queue/vmc",
            "/queue/vmc.",
            "/queue/vmcx.guest.a",
            "/queue/other.guest.a",
            "/topic/vmc.guest.a",
            "/queue/vmc.multicast",
            "/topic/vmc.multicast.x",
            "/exchange/vmc.guest.a",
            "/temp-queue/vmc.host.a",
            "/topic/vmcontroller_requests",
        ] {
            assert!(
                matches!(d.parse(name), Err(DestinationError::Foreign { .. })),
                "{name:?}"
            );
        }
    }

    #[test]
    fn names_with_invalid_ids_are_refused() {
        let d = Destinations::default();
        for name in [
            "/queue/vmc.guest.",
            "/queue/vmc.guest.a.b",
            "/queue/vmc.host.*",
        ] {
            assert!(
                matches!(d.parse(name), Err(DestinationError::BadId { .. })),
                "{name:?}"
            );
        }
    }

    #[test]
    fn prefixes_are_validated() {
        assert!(Destinations::new("vmc-test_1").is_ok());
        assert!(Destinations::new("a.b").is_ok());
        for bad in [
            "",
            ".vmc",
            "vmc.",
            "a..b",
            "a/b",
            "a*",
            "a>",
            "a#",
            "a b",
            &"a".repeat(65),
        ] {
            assert!(
                matches!(
                    Destinations::new(bad),
                    Err(DestinationError::BadPrefix { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn only_queues_are_queues() {
        assert!(Destination::Guest(guest()).is_queue());
        assert!(Destination::Host(host()).is_queue());
        assert!(!Destination::Multicast.is_queue());
        assert!(!Destination::Connections.is_queue());
    }

    proptest! {
        #[test]
        fn parsing_any_string_never_panics(name in any::<String>()) {
            let _ = Destinations::default().parse(&name);
            let _ = Destinations::new(&name);
        }
    }
}
