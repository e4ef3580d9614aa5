//! Disk images through `qemu-img`: the qcow2 overlay each VM writes to, and the
//! internal snapshots of that overlay while its VM is off.
//!
//! [`QemuImg`] runs the `qemu-img` binary and parses its `--output=json` answers
//! ([`ImageInfo`], [`ImageSnapshot`]); a failure carries qemu-img's own stderr.
//! Reads use `-U` (force share), so they also work on an image a running QEMU
//! holds locked. [`check_snapshot_name`] is the rule for snapshot names of both
//! QEMU-based backends. What it does not do: snapshots of a running VM (QMP jobs do those,
//! see `mod.rs`), or any write to a backing image: overlays only ever name it.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;

/// Why a `qemu-img` call failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot run {binary}")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: io::Error,
    },
    /// qemu-img ran and refused; `stderr` is its own message.
    #[error("`qemu-img {command}` failed: {stderr}")]
    Failed { command: String, stderr: String },
    #[error("cannot read the answer of `qemu-img {command}`: {message}")]
    Parse { command: String, message: String },
}

/// What `qemu-img info` says about an image (the fields the backend uses).
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct ImageInfo {
    pub format: String,
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
    #[serde(default)]
    pub snapshots: Vec<ImageSnapshot>,
    /// The backing file of an overlay, as written in it.
    #[serde(rename = "backing-filename", default)]
    pub backing_filename: Option<String>,
}

/// One internal snapshot, as both `qemu-img info` and QMP `query-block` list it.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct ImageSnapshot {
    pub id: String,
    pub name: String,
    #[serde(rename = "vm-state-size", default)]
    pub vm_state_size: u64,
    #[serde(rename = "date-sec", default)]
    pub date_sec: i64,
}

/// The `qemu-img` binary.
#[derive(Clone, Debug)]
pub struct QemuImg {
    binary: PathBuf,
}

impl QemuImg {
    pub fn new(binary: impl Into<PathBuf>) -> QemuImg {
        QemuImg {
            binary: binary.into(),
        }
    }

    /// `qemu-img --version`'s first line.
    pub fn version(&self) -> Result<String, ImageError> {
        let out = self.run(&["--version".into()])?;
        Ok(out.lines().next().unwrap_or_default().to_owned())
    }

    /// Format, size and snapshots of `image` (works while a QEMU holds it).
    pub fn info(&self, image: &Path) -> Result<ImageInfo, ImageError> {
        let args = [
            "info".into(),
            "-U".into(),
            "--output=json".into(),
            image.into(),
        ];
        let out = self.run(&args)?;
        serde_json::from_str(&out).map_err(|e| ImageError::Parse {
            command: describe(&args),
            message: e.to_string(),
        })
    }

    /// Creates `overlay` as a qcow2 image whose backing file is `backing`
    /// (absolute, so the overlay works from any directory) of format `backing_format`.
    pub fn create_overlay(
        &self,
        overlay: &Path,
        backing: &Path,
        backing_format: &str,
    ) -> Result<(), ImageError> {
        self.run(&[
            "create".into(),
            "-q".into(),
            "-f".into(),
            "qcow2".into(),
            "-F".into(),
            backing_format.into(),
            "-b".into(),
            backing.into(),
            overlay.into(),
        ])
        .map(drop)
    }

    /// Creates an empty, sparse qcow2 image of `bytes` bytes.
    pub fn create_blank(&self, image: &Path, bytes: u64) -> Result<(), ImageError> {
        self.run(&[
            "create".into(),
            "-q".into(),
            "-f".into(),
            "qcow2".into(),
            image.into(),
            bytes.to_string().into(),
        ])
        .map(drop)
    }

    /// `qemu-img snapshot -c`: a disk-only internal snapshot (the image must be unused).
    pub fn snapshot_create(&self, image: &Path, tag: &str) -> Result<(), ImageError> {
        self.snapshot("-c", image, tag)
    }

    /// `qemu-img snapshot -a`: reverts the disk to the snapshot.
    pub fn snapshot_apply(&self, image: &Path, tag: &str) -> Result<(), ImageError> {
        self.snapshot("-a", image, tag)
    }

    /// `qemu-img snapshot -d`.
    pub fn snapshot_delete(&self, image: &Path, tag: &str) -> Result<(), ImageError> {
        self.snapshot("-d", image, tag)
    }

    fn snapshot(&self, flag: &str, image: &Path, tag: &str) -> Result<(), ImageError> {
        self.run(&["snapshot".into(), flag.into(), tag.into(), image.into()])
            .map(drop)
    }

    fn run(&self, args: &[std::ffi::OsString]) -> Result<String, ImageError> {
        let out = Command::new(&self.binary)
            .args(args)
            .output()
            .map_err(|source| ImageError::Spawn {
                binary: self.binary.clone(),
                source,
            })?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            let stderr = if stderr.is_empty() {
                format!("exit status {}", out.status)
            } else {
                stderr
            };
            return Err(ImageError::Failed {
                command: describe(args),
                stderr,
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// Checks the name of a new internal snapshot: 1 to 128 characters without control
/// characters (nor '/' when `forbid_slash`: libvirt names a file after it), and not
/// all digits, which QEMU would take for a snapshot id.
pub fn check_snapshot_name(name: &str, forbid_slash: bool) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 128
        || name.chars().any(char::is_control)
        || (forbid_slash && name.contains('/'))
    {
        let without = if forbid_slash {
            "'/' or control characters"
        } else {
            "control characters"
        };
        return Err(format!(
            "snapshot name {name:?} must be 1 to 128 characters without {without}"
        ));
    }
    if name.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!(
            "snapshot name {name:?} is all digits, which QEMU would take for a snapshot id"
        ));
    }
    Ok(())
}

fn describe(args: &[std::ffi::OsString]) -> String {
    args.iter()
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_img_info_with_snapshots() {
        let json = r#"{
            "snapshots": [{"icount": 0, "vm-clock-nsec": 0, "name": "before-upgrade",
                "date-sec": 1795319746, "date-nsec": 220678000, "vm-clock-sec": 5, "id": "1",
                "vm-state-size": 63921820}],
            "virtual-size": 1073741824, "filename": "disk.qcow2", "cluster-size": 65536,
            "format": "qcow2", "actual-size": 200704, "dirty-flag": false
        }"#;
        let info: ImageInfo = serde_json::from_str(json).expect("parse");
        assert_eq!(info.format, "qcow2");
        assert_eq!(info.virtual_size, 1 << 30);
        assert_eq!(
            info.snapshots,
            vec![ImageSnapshot {
                id: "1".into(),
                name: "before-upgrade".into(),
                vm_state_size: 63921820,
                date_sec: 1795319746,
            }]
        );
        assert_eq!(info.backing_filename, None);
    }

    #[test]
    fn an_image_without_snapshots_lists_none() {
        let json = r#"{"virtual-size": 512, "filename": "base.raw", "format": "raw"}"#;
        let info: ImageInfo = serde_json::from_str(json).expect("parse");
        assert!(info.snapshots.is_empty());
    }

    #[test]
    fn snapshot_names_are_checked() {
        assert!(check_snapshot_name("before-upgrade", true).is_ok());
        assert!(check_snapshot_name("a/b", false).is_ok());
        let slash = check_snapshot_name("a/b", true).unwrap_err();
        assert!(slash.contains("without '/' or control"), "{slash}");
        assert!(check_snapshot_name("", false).is_err());
        assert!(check_snapshot_name("a\nb", false).is_err());
        let digits = check_snapshot_name("42", false).unwrap_err();
        assert!(digits.contains("all digits"), "{digits}");
    }

    #[test]
    fn a_missing_binary_is_named_in_the_error() {
        let img = QemuImg::new("/nonexistent/qemu-img");
        let error = img.version().expect_err("no binary");
        assert_eq!(error.to_string(), "cannot run /nonexistent/qemu-img");
    }
}
