//! The directory of one QEMU VM, `<state_dir>/vms/<name>/`: its file layout and the
//! records that let a new backend object (a restarted host agent) tell what the VM
//! is doing from the files alone.
//!
//! Layout of both QEMU-based backends (this one and `libvirt`): `disk.qcow2` (the
//! overlay), `serial.log` (the guest's console, appended across boots, rotated by
//! [`VmDir::rotate_serial_log`]), `kernel` and `initramfs` (the VM's own copies of
//! a guest image's boot files, see `guest_image.rs`). The QEMU backend's own:
//! `qmp.sock`, `qga.sock` (the host end of a guest agent's port), `qemu.pid`
//! (written by QEMU), `qemu.log` (QEMU's stderr), `saved.state` (a saved VM),
//! `snapshots.json` (snapshot descriptions, which qcow2 cannot hold), and two
//! records of ours: `running` (pid and start time of the QEMU we launched, written
//! after launch and removed only once we have seen it stop) and `stopping`
//! (written before we stop it). So: `running` whose process is gone
//! without `stopping` means QEMU died behind our back (Aborted).
//! What it does not do: launch or talk to QEMU.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::process::ProcessId;

/// Why reading or writing a VM's records failed.
#[derive(Debug, thiserror::Error)]
pub enum VmDirError {
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is damaged: {message}")]
    Damaged { path: PathBuf, message: String },
}

/// The serial log is moved aside to `serial.log.old` at start when bigger than this.
const SERIAL_LOG_ROTATE_BYTES: u64 = 16 << 20;

/// What the records say about the VM's QEMU process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    /// We did not launch it, or saw it stop.
    Off,
    Alive(ProcessId),
    /// Launched and now gone; `stopped_by_us` if we had asked it to stop.
    Gone {
        stopped_by_us: bool,
    },
}

/// The files of one VM.
#[derive(Clone, Debug)]
pub struct VmDir {
    dir: PathBuf,
}

impl VmDir {
    pub fn new(dir: impl Into<PathBuf>) -> VmDir {
        VmDir { dir: dir.into() }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }
    pub fn disk(&self) -> PathBuf {
        self.dir.join("disk.qcow2")
    }
    /// The VM's copy of its guest image's kernel (direct boot).
    pub fn kernel(&self) -> PathBuf {
        self.dir.join("kernel")
    }
    /// The VM's copy of its guest image's initramfs.
    pub fn initramfs(&self) -> PathBuf {
        self.dir.join("initramfs")
    }
    pub fn qmp_socket(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
    /// The host's end of the guest's `org.qemu.guest_agent.0` virtio-serial port
    /// (for a qemu-guest-agent in the guest; as long as `qmp.sock`, whose length
    /// is checked at create).
    pub fn guest_agent_socket(&self) -> PathBuf {
        self.dir.join("qga.sock")
    }
    pub fn pid_file(&self) -> PathBuf {
        self.dir.join("qemu.pid")
    }
    pub fn qemu_log(&self) -> PathBuf {
        self.dir.join("qemu.log")
    }
    pub fn serial_log(&self) -> PathBuf {
        self.dir.join("serial.log")
    }
    pub fn saved_state(&self) -> PathBuf {
        self.dir.join("saved.state")
    }
    /// Where a save in progress writes; renamed to `saved.state` when complete.
    pub fn saved_state_partial(&self) -> PathBuf {
        self.dir.join("saved.state.partial")
    }
    fn running_record(&self) -> PathBuf {
        self.dir.join("running")
    }
    fn stopping_marker(&self) -> PathBuf {
        self.dir.join("stopping")
    }
    fn descriptions_file(&self) -> PathBuf {
        self.dir.join("snapshots.json")
    }

    pub fn has_saved_state(&self) -> bool {
        self.saved_state().is_file()
    }

    /// Reads the records and checks the process they name.
    pub fn liveness(&self) -> Result<Liveness, VmDirError> {
        let path = self.running_record();
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Liveness::Off),
            Err(source) => {
                return Err(VmDirError::Io {
                    action: "read",
                    path,
                    source,
                })
            }
        };
        let mut fields = text.split_whitespace().map(str::parse::<u64>);
        let (Some(Ok(pid)), Some(Ok(start_ticks))) = (fields.next(), fields.next()) else {
            return Err(VmDirError::Damaged {
                path,
                message: format!("{text:?}"),
            });
        };
        let id = ProcessId {
            pid: u32::try_from(pid).map_err(|_| VmDirError::Damaged {
                path,
                message: format!("pid {pid}"),
            })?,
            start_ticks,
        };
        if id.is_alive() {
            Ok(Liveness::Alive(id))
        } else {
            Ok(Liveness::Gone {
                stopped_by_us: self.stopping_marker().exists(),
            })
        }
    }

    /// Records the QEMU we just launched (and forgets any earlier stop).
    pub fn record_launch(&self, id: ProcessId) -> Result<(), VmDirError> {
        remove_if_exists(&self.stopping_marker())?;
        write_atomically(
            &self.running_record(),
            format!("{} {}\n", id.pid, id.start_ticks),
        )
    }

    /// Records that we are about to stop the VM's QEMU.
    pub fn record_stopping(&self) -> Result<(), VmDirError> {
        write_atomically(&self.stopping_marker(), "stopping\n".to_owned())
    }

    /// Forgets the process: removes our records and QEMU's socket and pid file.
    pub fn clear_process_records(&self) -> Result<(), VmDirError> {
        remove_if_exists(&self.running_record())?;
        remove_if_exists(&self.stopping_marker())?;
        remove_if_exists(&self.qmp_socket())?;
        remove_if_exists(&self.pid_file())
    }

    /// Moves a big serial log aside, keeping one old generation.
    pub fn rotate_serial_log(&self) -> Result<(), VmDirError> {
        let log = self.serial_log();
        if fs::metadata(&log)
            .map(|m| m.len() > SERIAL_LOG_ROTATE_BYTES)
            .unwrap_or(false)
        {
            let old = self.dir.join("serial.log.old");
            fs::rename(&log, &old).map_err(|source| VmDirError::Io {
                action: "rotate",
                path: log,
                source,
            })?;
        }
        Ok(())
    }

    /// Snapshot name → description.
    pub fn descriptions(&self) -> Result<BTreeMap<String, String>, VmDirError> {
        let path = self.descriptions_file();
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| VmDirError::Damaged {
                path,
                message: e.to_string(),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(source) => Err(VmDirError::Io {
                action: "read",
                path,
                source,
            }),
        }
    }

    /// Sets (Some) or forgets (None) the description of snapshot `name`.
    pub fn set_description(&self, name: &str, description: Option<&str>) -> Result<(), VmDirError> {
        let mut all = self.descriptions()?;
        match description {
            Some(text) => all.insert(name.to_owned(), text.to_owned()),
            None => all.remove(name),
        };
        let path = self.descriptions_file();
        let json = serde_json::to_string_pretty(&all).map_err(|e| VmDirError::Damaged {
            path: path.clone(),
            message: e.to_string(),
        })?;
        write_atomically(&path, json)
    }
}

pub fn remove_if_exists(path: &Path) -> Result<(), VmDirError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(VmDirError::Io {
            action: "remove",
            path: path.to_owned(),
            source,
        }),
    }
}

/// Writes `content` to a temporary file beside `path`, then renames it over `path`.
fn write_atomically(path: &Path, content: String) -> Result<(), VmDirError> {
    let mut temp = path.as_os_str().to_owned();
    temp.push(".tmp");
    let temp = PathBuf::from(temp);
    fs::write(&temp, content).map_err(|source| VmDirError::Io {
        action: "write",
        path: temp.clone(),
        source,
    })?;
    fs::rename(&temp, path).map_err(|source| VmDirError::Io {
        action: "write",
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_record_means_off() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            VmDir::new(dir.path()).liveness().expect("liveness"),
            Liveness::Off
        );
    }

    #[test]
    fn a_launched_process_that_vanished_without_our_stop_is_gone_unexpectedly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vm = VmDir::new(dir.path());
        let me = ProcessId::of(std::process::id()).expect("our /proc entry");
        vm.record_launch(me).expect("record");
        assert_eq!(vm.liveness().expect("liveness"), Liveness::Alive(me));

        let dead = ProcessId {
            start_ticks: me.start_ticks + 1,
            ..me
        };
        vm.record_launch(dead).expect("record");
        assert_eq!(
            vm.liveness().expect("liveness"),
            Liveness::Gone {
                stopped_by_us: false
            }
        );
        vm.record_stopping().expect("stopping");
        assert_eq!(
            vm.liveness().expect("liveness"),
            Liveness::Gone {
                stopped_by_us: true
            }
        );
        vm.clear_process_records().expect("clear");
        assert_eq!(vm.liveness().expect("liveness"), Liveness::Off);
    }

    #[test]
    fn a_damaged_record_is_reported_not_guessed() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join("running"), "garbage").expect("write");
        let error = VmDir::new(dir.path()).liveness().expect_err("damaged");
        assert!(error.to_string().contains("is damaged"), "{error}");
    }

    #[test]
    fn descriptions_are_kept_per_snapshot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vm = VmDir::new(dir.path());
        vm.set_description("a", Some("before the upgrade"))
            .expect("set");
        vm.set_description("b", Some("after")).expect("set");
        vm.set_description("a", None).expect("forget");
        let all = vm.descriptions().expect("read");
        assert_eq!(all.get("b").map(String::as_str), Some("after"));
        assert!(!all.contains_key("a"));
    }
}
