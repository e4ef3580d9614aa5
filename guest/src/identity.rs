//! Who this guest is and where its broker is, read from the running system.
//!
//! The id is the MAC address of a NIC, upper-cased as in the original: the
//! configured interface, or else the first Ethernet interface that is not loopback
//! and has a non-zero address, preferring physical devices (those with a `device`
//! link in `/sys/class/net/*/`) over virtual ones, by name. The broker's default
//! host is the IPv4 default gateway from `/proc/net/route`, which is where QEMU's
//! and VirtualBox's NAT put the host. Also here: [`guest_info`] and [`load_summary`],
//! the payloads of HELLO and STILL_ALIVE, from `sysinfo`.

use crate::settings::{Settings, SystemProbe};
use std::ffi::CStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use vmc_protocol::words::{GuestInfo, LoadSummary};

/// The machine the agent runs on, read from `/sys` and `/proc`.
#[derive(Debug, Default)]
pub struct LocalSystem;

impl SystemProbe for LocalSystem {
    fn default_gateway(&self) -> Option<String> {
        let table = std::fs::read_to_string("/proc/net/route").ok()?;
        default_gateway_in(&table).map(|ip| ip.to_string())
    }

    fn interface_mac(&self, wanted: Option<&str>) -> Result<(String, String), String> {
        pick_interface(Path::new("/sys/class/net"), wanted)
    }
}

/// The default IPv4 gateway in the text of `/proc/net/route`.
pub fn default_gateway_in(table: &str) -> Option<Ipv4Addr> {
    const RTF_UP: u32 = 0x1;
    const RTF_GATEWAY: u32 = 0x2;
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (destination, gateway, flags) = (fields.get(1)?, fields.get(2)?, fields.get(3)?);
        let flags = u32::from_str_radix(flags, 16).ok()?;
        if *destination != "00000000" || flags & (RTF_UP | RTF_GATEWAY) != RTF_UP | RTF_GATEWAY {
            return None;
        }
        // The kernel prints the network-order address as a native integer.
        let raw = u32::from_str_radix(gateway, 16).ok()?;
        Some(Ipv4Addr::from(raw.to_ne_bytes()))
    })
}

/// Chooses the interface whose MAC is the id, under `sys_class_net`.
pub fn pick_interface(
    sys_class_net: &Path,
    wanted: Option<&str>,
) -> Result<(String, String), String> {
    let read = |name: &str, file: &str| {
        std::fs::read_to_string(sys_class_net.join(name).join(file))
            .map(|s| s.trim().to_owned())
            .ok()
    };
    if let Some(name) = wanted {
        let mac = read(name, "address").ok_or_else(|| {
            format!(
                "interface {name} does not exist in {}",
                sys_class_net.display()
            )
        })?;
        return usable_mac(&mac)
            .then(|| (name.to_owned(), mac.clone()))
            .ok_or_else(|| format!("interface {name} has no usable MAC address ({mac:?})"));
    }
    let entries = std::fs::read_dir(sys_class_net)
        .map_err(|e| format!("cannot list {}: {e}", sys_class_net.display()))?;
    let mut candidates: Vec<(bool, String, String)> = entries
        .filter_map(|entry| {
            let name = entry.ok()?.file_name().into_string().ok()?;
            // ARPHRD_ETHER = 1: Ethernet-like devices only (not loopback, tunnels, ...).
            if name == "lo" || read(&name, "type")? != "1" {
                return None;
            }
            let mac = read(&name, "address")?;
            let physical = sys_class_net.join(&name).join("device").exists();
            usable_mac(&mac).then_some((!physical, name, mac))
        })
        .collect();
    candidates.sort();
    candidates
        .into_iter()
        .next()
        .map(|(_, name, mac)| (name, mac))
        .ok_or_else(|| "no Ethernet interface with a MAC address (only loopback?)".to_owned())
}

fn usable_mac(mac: &str) -> bool {
    mac.len() == 17 && mac != "00:00:00:00:00:00"
}

/// The HELLO payload for this agent.
pub fn guest_info(settings: &Settings) -> GuestInfo {
    let mut system = sysinfo::System::new().ok();
    if let Some(system) = system.as_mut() {
        system.refresh_memory();
    }
    GuestInfo {
        id: settings.id.clone(),
        ips: ip_addresses(settings.interface.as_deref()),
        mac: settings.mac.clone(),
        hostname: sysinfo::System::host_name().unwrap_or_default(),
        os: sysinfo::System::long_os_version()
            .or_else(|_| sysinfo::System::name())
            .unwrap_or_default(),
        kernel: sysinfo::System::kernel_version().unwrap_or_default(),
        agent_version: crate::VERSION.to_owned(),
        protocol: vmc_protocol::PROTOCOL_VERSION,
        cpus: std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1),
        memory_bytes: system.as_ref().map(|s| s.total_memory()).unwrap_or(0),
        boot_time: sysinfo::System::boot_time().unwrap_or(0),
        capabilities: [
            "exec",
            "exec-stream",
            "cancel",
            "file-put",
            "file-get",
            "resume",
            vmc_protocol::words::DIGEST_AT_END,
        ]
        .map(str::to_owned)
        .to_vec(),
    }
}

/// The STILL_ALIVE payload: load, memory and running commands now.
pub fn load_summary(settings: &Settings, running_cmds: usize) -> LoadSummary {
    let load = sysinfo::System::load_average().ok();
    let mut system = sysinfo::System::new().ok();
    if let Some(system) = system.as_mut() {
        system.refresh_memory();
    }
    LoadSummary {
        ip: ip_addresses(settings.interface.as_deref())
            .into_iter()
            .next(),
        load1: load.as_ref().map(|l| l.one).unwrap_or(0.0),
        load5: load.as_ref().map(|l| l.five).unwrap_or(0.0),
        load15: load.as_ref().map(|l| l.fifteen).unwrap_or(0.0),
        mem_used_bytes: system.as_ref().map(|s| s.used_memory()).unwrap_or(0),
        mem_total_bytes: system.as_ref().map(|s| s.total_memory()).unwrap_or(0),
        running_cmds: running_cmds.min(u32::MAX as usize) as u32,
        uptime_secs: sysinfo::System::uptime().unwrap_or(0),
    }
}

/// IP addresses of the machine: the id interface's first, then the others; no loopback.
fn ip_addresses(preferred: Option<&str>) -> Vec<String> {
    // Sorted by (other interface, IPv6, address): the id interface's IPv4 first.
    let mut found: Vec<(bool, bool, String)> = interface_addresses()
        .into_iter()
        .filter(|(_, addr)| !addr.is_loopback())
        .map(|(name, addr)| {
            (
                Some(name.as_str()) != preferred,
                addr.is_ipv6(),
                addr.to_string(),
            )
        })
        .collect();
    found.sort();
    found.dedup();
    found.into_iter().map(|(_, _, addr)| addr).collect()
}

/// Every interface's IPv4 and IPv6 addresses, from one `getifaddrs` (a netlink
/// query: unlike listing networks with their counters, it opens no file, which
/// matters at every beacon of a thousand guests on one machine).
#[allow(unsafe_code)]
fn interface_addresses() -> Vec<(String, IpAddr)> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: `list` is a valid place for the pointer getifaddrs allocates.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Vec::new();
    }
    let mut found = Vec::new();
    let mut node = list;
    while !node.is_null() {
        // SAFETY: `node` is an entry of the list getifaddrs returned, freed below only.
        let entry = unsafe { &*node };
        node = entry.ifa_next;
        if entry.ifa_addr.is_null() || entry.ifa_name.is_null() {
            continue;
        }
        // SAFETY: a non-null `ifa_name` is a NUL-terminated string owned by the list.
        let name = unsafe { CStr::from_ptr(entry.ifa_name) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: a non-null `ifa_addr` points at a sockaddr whose family tells its
        // real type; only those of AF_INET and AF_INET6 are read as such.
        let addr = unsafe {
            match i32::from((*entry.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sin = &*entry.ifa_addr.cast::<libc::sockaddr_in>();
                    IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
                }
                libc::AF_INET6 => {
                    let sin6 = &*entry.ifa_addr.cast::<libc::sockaddr_in6>();
                    IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))
                }
                _ => continue,
            }
        };
        found.push((name, addr));
    }
    // SAFETY: `list` came from a successful getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_come_from_every_interface_but_loopback_is_left_out() {
        let all = interface_addresses();
        assert!(
            all.contains(&("lo".to_owned(), IpAddr::V4(Ipv4Addr::LOCALHOST))),
            "{all:?}"
        );
        let shown = ip_addresses(None);
        assert!(
            !shown.iter().any(|a| a == "127.0.0.1" || a == "::1"),
            "{shown:?}"
        );
        let others: Vec<String> = all
            .iter()
            .filter(|(_, addr)| !addr.is_loopback())
            .map(|(_, addr)| addr.to_string())
            .collect();
        for addr in &others {
            assert!(shown.contains(addr), "{addr} missing from {shown:?}");
        }
        // The preferred interface's IPv4 address comes first.
        if let Some((name, _)) = all.iter().find(|(_, a)| a.is_ipv4() && !a.is_loopback()) {
            let first = ip_addresses(Some(name)).first().cloned().unwrap();
            assert!(
                all.iter()
                    .any(|(n, a)| n == name && a.is_ipv4() && a.to_string() == first),
                "{first} is not an IPv4 address of {name}: {all:?}"
            );
        }
    }

    #[test]
    fn gateway_is_read_from_the_route_table() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\n\
                     eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\n\
                     eth0\t00000000\t0202000A\t0003\t0\t0\t0\t00000000\n";
        assert_eq!(default_gateway_in(table), Some(Ipv4Addr::new(10, 0, 2, 2)));
        assert_eq!(default_gateway_in("Iface\tDestination\n"), None);
    }

    #[test]
    fn physical_ethernet_is_preferred_and_loopback_never_serves() {
        let dir = tempfile::tempdir().unwrap();
        let make = |name: &str, mac: &str, kind: &str, physical: bool| {
            let path = dir.path().join(name);
            std::fs::create_dir(&path).unwrap();
            std::fs::write(path.join("address"), format!("{mac}\n")).unwrap();
            std::fs::write(path.join("type"), format!("{kind}\n")).unwrap();
            if physical {
                std::fs::create_dir(path.join("device")).unwrap();
            }
        };
        make("lo", "00:00:00:00:00:00", "772", false);
        assert!(
            pick_interface(dir.path(), None).is_err(),
            "loopback alone cannot serve"
        );
        make("aaa-virtual", "b6:16:3f:4e:5f:bc", "1", false);
        make("eth1", "52:54:00:00:00:02", "1", true);
        make("eth0", "52:54:00:00:00:01", "1", true);
        assert_eq!(
            pick_interface(dir.path(), None).unwrap(),
            ("eth0".to_owned(), "52:54:00:00:00:01".to_owned())
        );
        assert_eq!(
            pick_interface(dir.path(), Some("eth1")).unwrap().1,
            "52:54:00:00:00:02"
        );
        assert!(pick_interface(dir.path(), Some("lo")).is_err());
        assert!(pick_interface(dir.path(), Some("nope")).is_err());
    }

    #[test]
    fn this_machine_has_a_usable_interface() {
        // Every machine this agent runs on has a NIC; CI machines and VMs included.
        let (name, mac) = LocalSystem.interface_mac(None).unwrap();
        assert_ne!(name, "lo");
        assert!(
            vmc_protocol::identity::GuestId::from_mac(&mac).is_ok(),
            "{mac}"
        );
    }
}
