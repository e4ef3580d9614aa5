//! Making and unmaking a VM's directory, the same way for both QEMU-based backends
//! (this one and `libvirt`): checking a [`VmSpec`], the VM's MAC, the state
//! directory, and a new VM's files in `<state_dir>/vms/<name>/` ([`VmDir`]).
//!
//! [`check_spec`] checks what both backends require of a spec (name, memory, CPUs,
//! boot files) and opens the guest image directory its image names, if any
//! ([`guest_image`](super::guest_image)). [`create`] makes the directory, records
//! the VM's own copies of a guest image's kernel and initramfs as its boot files,
//! and runs the backend's own part (which calls [`make_disk`] for the qcow2 overlay
//! over the image, or a blank disk); if anything fails the directory goes again,
//! so a failed create never blocks the next one.
//! What it does not do: anything a backend does with a VM once it exists, or
//! checks only one backend needs (QEMU's option syntax, socket path lengths).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use vmc_protocol::agent_main::error_chain;

use super::guest_image::{self, GuestImage};
use super::image::QemuImg;
use super::vmdir::VmDir;
use crate::hypervisor::{failed, HypervisorError, VmDefinition, VmSpec};

/// A spec that passed [`check_spec`].
#[derive(Debug)]
pub struct CheckedSpec {
    /// The NIC's MAC, upper-case: the given one or one made from the name.
    pub mac: String,
    /// The guest image directory the spec's image names, if it names one.
    pub guest_image: Option<GuestImage>,
}

/// Checks a spec: the name (it becomes a directory and part of a domain name),
/// memory and CPUs, the kernel and initrd, the image (a file, or a guest image
/// directory that brings its own kernel); makes the MAC.
pub fn check_spec(spec: &VmSpec) -> Result<CheckedSpec, HypervisorError> {
    let invalid = |message: String| Err(HypervisorError::InvalidSpec(message));
    let name_ok = !spec.name.is_empty()
        && spec.name.len() <= 64
        && !spec.name.starts_with('.')
        && spec
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if !name_ok {
        return invalid(format!(
            "VM name {:?} must be 1 to 64 letters, digits, '.', '_' or '-', not starting with '.'",
            spec.name
        ));
    }
    if !(16..=1 << 20).contains(&spec.memory_mib) {
        return invalid(format!(
            "memory of {} MiB is not within 16 MiB..1 TiB",
            spec.memory_mib
        ));
    }
    if !(1..=255).contains(&spec.cpus) {
        return invalid(format!("{} CPUs is not within 1..255", spec.cpus));
    }
    if spec.kernel.is_none() && (spec.initrd.is_some() || spec.kernel_args.is_some()) {
        return invalid("an initrd or kernel arguments need a kernel".into());
    }
    for (what, path) in [("kernel", &spec.kernel), ("initrd", &spec.initrd)] {
        if let Some(path) = path {
            if !path.is_file() {
                return invalid(format!("the {what} {} is not a file", path.display()));
            }
        }
    }
    let guest_image = match &spec.image {
        Some(dir) if GuestImage::is_image_dir(dir) => {
            if spec.kernel.is_some() || spec.initrd.is_some() || spec.kernel_args.is_some() {
                return invalid(format!(
                    "the guest image {} brings its own kernel, initramfs and command line: \
                     give no kernel, initrd or kernel arguments with it",
                    dir.display()
                ));
            }
            Some(GuestImage::open(dir).map_err(|e| {
                HypervisorError::InvalidSpec(format!(
                    "the guest image {}: {}",
                    dir.display(),
                    error_chain(&e)
                ))
            })?)
        }
        Some(path) if !path.is_file() => {
            return invalid(format!(
                "the image {} is not a file or a guest image directory (one with a {})",
                path.display(),
                guest_image::MANIFEST
            ));
        }
        _ => None,
    };
    let mac = match &spec.mac {
        Some(mac) => parse_mac(mac).map_err(HypervisorError::InvalidSpec)?,
        None => mac_for_name(&spec.name),
    };
    Ok(CheckedSpec { mac, guest_image })
}

/// The MAC of a VM named `name` that was given none: [`crate::hypervisor::default_mac`]
/// (the registry passes one, free among this host's VMs, in the spec).
pub fn mac_for_name(name: &str) -> String {
    crate::hypervisor::default_mac(name, 0)
}

/// Checks and upper-cases a unicast MAC address `XX:XX:XX:XX:XX:XX`.
pub fn parse_mac(mac: &str) -> Result<String, String> {
    let octets: Vec<&str> = mac.split(':').collect();
    let hex_ok = octets.len() == 6
        && octets
            .iter()
            .all(|o| o.len() == 2 && o.chars().all(|c| c.is_ascii_hexdigit()));
    if !hex_ok {
        return Err(format!(
            "MAC address {mac:?} is not six hex octets separated by ':'"
        ));
    }
    let first = u8::from_str_radix(octets[0], 16).map_err(|e| e.to_string())?;
    if first & 1 == 1 {
        return Err(format!("MAC address {mac:?} is a multicast address"));
    }
    Ok(mac.to_ascii_uppercase())
}

/// Creates `state_dir/vms` and answers `state_dir` made absolute (QEMU and libvirtd
/// resolve nothing against our working directory); the error names the path.
pub fn make_state_dir(state_dir: &Path) -> Result<PathBuf, (PathBuf, io::Error)> {
    let vms = state_dir.join("vms");
    fs::create_dir_all(&vms).map_err(|source| (vms, source))?;
    fs::canonicalize(state_dir).map_err(|source| (state_dir.to_owned(), source))
}

/// Creates the VM `spec` checked as `checked`, in `vms_dir/<name>`, for the backend
/// `backend`, whose own part is `make` (given the new VM and its guest image).
/// A VM from a guest image boots directly from its own copies of the image's
/// kernel and initramfs, which `make` must make (see [`make_disk`]).
pub fn create(
    spec: &VmSpec,
    backend: &str,
    vms_dir: &Path,
    checked: CheckedSpec,
    make: impl FnOnce(&VmDefinition, Option<&GuestImage>) -> Result<(), HypervisorError>,
) -> Result<VmDefinition, HypervisorError> {
    let dir = vms_dir.join(&spec.name);
    let vm_dir = VmDir::new(&dir);
    let mut stored = spec.clone();
    if let Some(image) = &checked.guest_image {
        stored.kernel = Some(vm_dir.kernel());
        stored.initrd = Some(vm_dir.initramfs());
        stored.kernel_args = Some(image.cmdline.clone());
    }
    let vm = VmDefinition {
        spec: stored,
        backend: backend.into(),
        mac: checked.mac,
        dir: dir.clone(),
    };
    match fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(HypervisorError::InvalidSpec(format!(
                "a VM named {:?} already exists ({})",
                spec.name,
                dir.display()
            )))
        }
        Err(source) => {
            return Err(HypervisorError::Io {
                vm: spec.name.clone(),
                operation: "createVM",
                source,
            })
        }
    }
    if let Err(e) = make(&vm, checked.guest_image.as_ref()) {
        // Best effort: a half-made VM directory would block the next create.
        let _ = fs::remove_dir_all(&dir);
        return Err(e);
    }
    Ok(vm)
}

/// Makes the VM's disk: with a guest image, the VM's copies of its kernel and
/// initramfs and an overlay over its disk; else an overlay over the spec's image,
/// or a blank disk of `blank_disk_bytes`.
pub fn make_disk(
    img: &QemuImg,
    vm: &VmDefinition,
    guest_image: Option<&GuestImage>,
    blank_disk_bytes: u64,
) -> Result<(), HypervisorError> {
    const OP: &str = "createVM";
    let vm_dir = VmDir::new(&vm.dir);
    let io_error = |source| HypervisorError::Io {
        vm: vm.spec.name.clone(),
        operation: OP,
        source,
    };
    let backing = match guest_image {
        Some(image) => {
            guest_image::link_or_copy(&image.kernel, &vm_dir.kernel()).map_err(io_error)?;
            guest_image::link_or_copy(&image.initramfs, &vm_dir.initramfs()).map_err(io_error)?;
            Some(image.disk.as_path())
        }
        None => vm.spec.image.as_deref(),
    };
    let disk = vm_dir.disk();
    match backing {
        Some(backing) => {
            // Absolute, so the overlay works from any directory; its format probed.
            let backing = fs::canonicalize(backing).map_err(io_error)?;
            let info = img.info(&backing).map_err(|e| failed(vm, OP, e))?;
            img.create_overlay(&disk, &backing, &info.format)
                .map_err(|e| failed(vm, OP, e))
        }
        None => img
            .create_blank(&disk, blank_disk_bytes)
            .map_err(|e| failed(vm, OP, e)),
    }
}

/// Refuses a VM whose files are not in this backend's `vms_dir`: removing it
/// would delete someone else's files.
pub fn check_inside(vm: &VmDefinition, vms_dir: &Path) -> Result<(), HypervisorError> {
    if vm.dir.starts_with(vms_dir) {
        Ok(())
    } else {
        Err(HypervisorError::InvalidSpec(format!(
            "VM {:?} has its files in {}, outside this backend's {}",
            vm.spec.name,
            vm.dir.display(),
            vms_dir.display()
        )))
    }
}

/// getState's answer for a VM whose directory someone removed.
pub fn check_present(vm: &VmDefinition) -> Result<(), HypervisorError> {
    if vm.dir.is_dir() {
        Ok(())
    } else {
        Err(HypervisorError::Failed {
            vm: vm.spec.name.clone(),
            operation: "getState",
            message: format!("its directory {} is gone", vm.dir.display()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_mac_is_stable_local_qemu_and_upper_case() {
        let mac = mac_for_name("web-1");
        assert_eq!(mac, mac_for_name("web-1"));
        assert_ne!(mac, mac_for_name("web-2"));
        assert!(mac.starts_with("52:54:00:"), "{mac}");
        assert_eq!(mac, mac.to_ascii_uppercase());
        assert_eq!(parse_mac(&mac), Ok(mac.clone()));
    }

    #[test]
    fn a_given_mac_is_checked_and_upper_cased() {
        assert_eq!(
            parse_mac("52:54:00:ab:cd:ef"),
            Ok("52:54:00:AB:CD:EF".into())
        );
        assert!(parse_mac("52:54:00:ab:cd").is_err());
        assert!(parse_mac("52-54-00-ab-cd-ef").is_err());
        assert!(parse_mac("01:00:5e:00:00:01")
            .unwrap_err()
            .contains("multicast"));
    }
}
