//! The libvirt domain XML of one VM: what `virsh define` is given at create.
//!
//! The domain is `type='qemu'` (TCG), machine `pc`, with ACPI (the power button),
//! one virtio-blk disk (the VM's qcow2 overlay), the serial console appended to a
//! file, virtio-rng, and no USB, balloon, graphics or default devices. Direct
//! kernel boot when the VM has a kernel. The fw_cfg strings the guest reads
//! (`opt/vmc/...`) are `<sysinfo type='fwcfg'>` entries read from files in the
//! VM's directory, so any character survives and a new value applies at the next
//! start. libvirt has no user-mode NIC with `restrict=on` and `guestfwd`, so the
//! NIC is passed through as QEMU arguments (`<qemu:commandline>`), on a fixed PCI
//! slot libvirt never hands out: user networking with `restrict=on` whose only way
//! out is the guestfwd to the broker. A `<metadata>` element records the VM's
//! directory, which is how the backend recognises a domain as its own. Every
//! value is XML-escaped.
//! What it does not do: talk to libvirt, or check the values (the backend has).

use std::path::PathBuf;

use super::virsh::escape;

/// The XML namespace of the backend's `<metadata>` element.
pub const METADATA_NAMESPACE: &str = "urn:x-vmcontroller:libvirt:1";
/// The PCI slot of the passed-through NIC on bus `pci.0` (libvirt fills slots
/// upwards from 2; the VM has four devices).
pub const NIC_PCI_SLOT: u8 = 0x1e;

/// Everything the domain XML says.
#[derive(Clone, Debug, PartialEq)]
pub struct DomainConfig {
    /// The libvirt domain name.
    pub name: String,
    /// The VM's directory, recorded in the metadata.
    pub dir: PathBuf,
    pub memory_mib: u32,
    pub cpus: u32,
    pub disk: PathBuf,
    pub serial_log: PathBuf,
    /// `(kernel, initrd, command line)` for direct kernel boot.
    pub kernel: Option<(PathBuf, Option<PathBuf>, String)>,
    /// fw_cfg entries: name and the file holding the value.
    pub fw_cfg: Vec<(String, PathBuf)>,
    /// The `-netdev` value (`user,id=...,restrict=on,...`).
    pub netdev: String,
    /// The NIC's MAC, as QEMU takes it.
    pub mac: String,
}

/// The netdev id the NIC device refers to.
pub const NETDEV_ID: &str = "vmcnet0";

impl DomainConfig {
    /// The domain XML.
    pub fn to_xml(&self) -> String {
        let p = |path: &PathBuf| escape(&path.to_string_lossy());
        let mut xml = String::new();
        let mut line = |text: String| {
            xml.push_str(&text);
            xml.push('\n');
        };
        line("<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>".into());
        line(format!("  <name>{}</name>", escape(&self.name)));
        line("  <metadata>".into());
        line(format!(
            "    <vmc:vm xmlns:vmc='{METADATA_NAMESPACE}'><dir>{}</dir></vmc:vm>",
            p(&self.dir)
        ));
        line("  </metadata>".into());
        line(format!("  <memory unit='MiB'>{}</memory>", self.memory_mib));
        line(format!("  <vcpu>{}</vcpu>", self.cpus));
        if !self.fw_cfg.is_empty() {
            line("  <sysinfo type='fwcfg'>".into());
            for (name, file) in &self.fw_cfg {
                line(format!(
                    "    <entry name='{}' file='{}'/>",
                    escape(name),
                    p(file)
                ));
            }
            line("  </sysinfo>".into());
        }
        line("  <os>".into());
        line("    <type arch='x86_64' machine='pc'>hvm</type>".into());
        if let Some((kernel, initrd, cmdline)) = &self.kernel {
            line(format!("    <kernel>{}</kernel>", p(kernel)));
            if let Some(initrd) = initrd {
                line(format!("    <initrd>{}</initrd>", p(initrd)));
            }
            line(format!("    <cmdline>{}</cmdline>", escape(cmdline)));
        } else {
            line("    <boot dev='hd'/>".into());
        }
        line("  </os>".into());
        line("  <features><acpi/></features>".into());
        line("  <on_poweroff>destroy</on_poweroff>".into());
        line("  <on_reboot>restart</on_reboot>".into());
        line("  <on_crash>destroy</on_crash>".into());
        line("  <devices>".into());
        line("    <disk type='file' device='disk'>".into());
        line("      <driver name='qemu' type='qcow2'/>".into());
        line(format!("      <source file='{}'/>", p(&self.disk)));
        line("      <target dev='vda' bus='virtio'/>".into());
        line("    </disk>".into());
        line("    <controller type='usb' model='none'/>".into());
        line("    <serial type='file'>".into());
        line(format!(
            "      <source path='{}' append='on'/>",
            p(&self.serial_log)
        ));
        line("      <target port='0'/>".into());
        line("    </serial>".into());
        // Entropy from the host: a quiet guest under TCG may otherwise wait minutes.
        line("    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>".into());
        line("    <memballoon model='none'/>".into());
        line("  </devices>".into());
        line("  <qemu:commandline>".into());
        for arg in [
            "-netdev".to_owned(),
            self.netdev.clone(),
            "-device".to_owned(),
            // romfile= : no iPXE option ROM, nothing boots from the network.
            format!(
                "virtio-net-pci,netdev={NETDEV_ID},mac={},romfile=,bus=pci.0,addr={NIC_PCI_SLOT:#x}",
                self.mac
            ),
        ] {
            line(format!("    <qemu:arg value='{}'/>", escape(&arg)));
        }
        line("  </qemu:commandline>".into());
        line("</domain>".into());
        xml
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> DomainConfig {
        DomainConfig {
            name: "vmc-h1-web<1>".into(),
            dir: "/var/lib/vmc/libvirt/vms/web&1".into(),
            memory_mib: 128,
            cpus: 2,
            disk: "/var/lib/vmc/libvirt/vms/web&1/disk.qcow2".into(),
            serial_log: "/var/lib/vmc/libvirt/vms/web&1/serial.log".into(),
            kernel: Some((
                "/k'ernel".into(),
                Some("/initrd".into()),
                "console=ttyS0 a=\"b\"".into(),
            )),
            fw_cfg: vec![("opt/vmc/broker".into(), "/d/fw_cfg/broker".into())],
            netdev: format!("user,id={NETDEV_ID},restrict=on,guestfwd=tcp:10.0.2.100:61613-cmd:/usr/bin/vmc-host relay 127.0.0.1:61613"),
            mac: "52:54:00:ab:cd:ef".into(),
        }
    }

    #[test]
    fn every_value_is_escaped() {
        let xml = config().to_xml();
        assert!(xml.contains("<name>vmc-h1-web&lt;1&gt;</name>"), "{xml}");
        assert!(xml.contains("<dir>/var/lib/vmc/libvirt/vms/web&amp;1</dir>"));
        assert!(xml.contains("<kernel>/k&apos;ernel</kernel>"));
        assert!(xml.contains("<cmdline>console=ttyS0 a=&quot;b&quot;</cmdline>"));
        assert!(!xml.contains("web&1"), "a raw & is not XML: {xml}");
    }

    #[test]
    fn the_nic_is_confined_to_the_broker_forward() {
        let xml = config().to_xml();
        assert!(xml.contains("<domain type='qemu'"));
        assert!(xml.contains(
            "<qemu:arg value='user,id=vmcnet0,restrict=on,guestfwd=tcp:10.0.2.100:61613-cmd:/usr/bin/vmc-host relay 127.0.0.1:61613'/>"
        ));
        assert!(xml.contains(
            "<qemu:arg value='virtio-net-pci,netdev=vmcnet0,mac=52:54:00:ab:cd:ef,romfile=,bus=pci.0,addr=0x1e'/>"
        ));
        assert!(!xml.contains("<interface"), "no libvirt network: {xml}");
        assert!(xml.contains("<entry name='opt/vmc/broker' file='/d/fw_cfg/broker'/>"));
    }

    #[test]
    fn without_a_kernel_the_vm_boots_its_disk() {
        let mut config = config();
        config.kernel = None;
        config.fw_cfg.clear();
        let xml = config.to_xml();
        assert!(xml.contains("<boot dev='hd'/>"));
        assert!(!xml.contains("<kernel>"));
        assert!(!xml.contains("sysinfo"));
    }
}
