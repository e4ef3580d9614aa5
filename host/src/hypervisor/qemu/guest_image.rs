//! Guest image directories: what `createVM(name, DIR)` boots when `DIR` is not a
//! disk image but the output of `deploy/guest-image/build.sh`.
//!
//! Such a directory holds a `manifest.json` ([`MANIFEST`]) naming, relative to the
//! directory, a kernel, an initramfs, a file with the kernel command line, and a
//! disk image; [`GuestImage::open`] reads and checks it. The backend boots the
//! kernel directly (`-kernel`/`-initrd`/`-append`) from its own copies of the two
//! files in the VM's directory (so a rebuild of the image never changes what an
//! existing VM boots) and makes the VM's overlay over the disk, as for a plain
//! image. Manifest:
//!
//! ```json
//! { "format": "vmc-guest-image/1", "kernel": "kernel", "initramfs": "initramfs",
//!   "cmdline": "cmdline", "disk": "disk.qcow2", "build": { "any": "text" } }
//! ```
//!
//! `build` is what the image was built from, for people; it is not read.
//! What it does not do: build images, or check that the kernel boots.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

/// The manifest's file name inside a guest image directory.
pub const MANIFEST: &str = "manifest.json";
/// The manifest format this backend reads.
pub const FORMAT: &str = "vmc-guest-image/1";

/// Why a guest image directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum GuestImageError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a guest image manifest: {message}")]
    Manifest { path: PathBuf, message: String },
    #[error("{path} has format {found:?}; this host agent reads {FORMAT:?}")]
    Format { path: PathBuf, found: String },
    #[error("the manifest's {field} {name:?} is not a file name inside the image directory")]
    OutsideDirectory { field: &'static str, name: String },
    #[error("the manifest's {field} {path} is not a file")]
    Missing { field: &'static str, path: PathBuf },
    #[error("the kernel command line in {path} is empty")]
    EmptyCmdline { path: PathBuf },
}

/// `manifest.json` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    format: String,
    kernel: String,
    initramfs: String,
    cmdline: String,
    disk: String,
    #[serde(default)]
    #[allow(dead_code)] // For people: what the image was built from.
    build: BTreeMap<String, String>,
}

/// A checked guest image: absolute paths of its files and its command line.
#[derive(Clone, Debug, PartialEq)]
pub struct GuestImage {
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// The kernel command line, one line, trimmed.
    pub cmdline: String,
    /// The disk the VM's overlay is made over.
    pub disk: PathBuf,
}

impl GuestImage {
    /// Whether `path` is a directory with a manifest (not whether it is valid).
    pub fn is_image_dir(path: &Path) -> bool {
        path.is_dir() && path.join(MANIFEST).is_file()
    }

    /// Reads `dir/manifest.json` and checks that every file it names is there.
    pub fn open(dir: &Path) -> Result<GuestImage, GuestImageError> {
        let read_error = |path: &Path| {
            let path = path.to_owned();
            move |source| GuestImageError::Read { path, source }
        };
        let dir = fs::canonicalize(dir).map_err(read_error(dir))?;
        let manifest_path = dir.join(MANIFEST);
        let text = fs::read(&manifest_path).map_err(read_error(&manifest_path))?;
        let manifest: Manifest =
            serde_json::from_slice(&text).map_err(|e| GuestImageError::Manifest {
                path: manifest_path.clone(),
                message: e.to_string(),
            })?;
        if manifest.format != FORMAT {
            return Err(GuestImageError::Format {
                path: manifest_path,
                found: manifest.format,
            });
        }
        let file = |field: &'static str, name: &str| -> Result<PathBuf, GuestImageError> {
            let relative = Path::new(name);
            let inside = !name.is_empty()
                && relative
                    .components()
                    .all(|c| matches!(c, Component::Normal(_)));
            if !inside {
                return Err(GuestImageError::OutsideDirectory {
                    field,
                    name: name.to_owned(),
                });
            }
            let path = dir.join(relative);
            if path.is_file() {
                Ok(path)
            } else {
                Err(GuestImageError::Missing { field, path })
            }
        };
        let kernel = file("kernel", &manifest.kernel)?;
        let initramfs = file("initramfs", &manifest.initramfs)?;
        let cmdline_path = file("cmdline", &manifest.cmdline)?;
        let disk = file("disk", &manifest.disk)?;
        let cmdline = fs::read_to_string(&cmdline_path)
            .map_err(read_error(&cmdline_path))?
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        if cmdline.is_empty() {
            return Err(GuestImageError::EmptyCmdline { path: cmdline_path });
        }
        Ok(GuestImage {
            dir,
            kernel,
            initramfs,
            cmdline,
            disk,
        })
    }
}

/// Puts a copy of `from` at `to`: a hard link when both are on one file system
/// (the image builder replaces its files by renaming, so the link keeps this
/// version), a copy otherwise.
pub fn link_or_copy(from: &Path, to: &Path) -> io::Result<()> {
    match fs::hard_link(from, to) {
        Ok(()) => Ok(()),
        Err(_) => fs::copy(from, to).map(drop),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Writes a guest image directory with dummy files into `dir`; answers the
    /// manifest's path.
    pub(crate) fn write_image(dir: &Path, manifest: &str) -> PathBuf {
        fs::write(dir.join("kernel"), b"kernel").expect("write kernel");
        fs::write(dir.join("initramfs"), b"initramfs").expect("write initramfs");
        fs::write(dir.join("cmdline"), "console=ttyS0  quiet\n").expect("write cmdline");
        fs::write(dir.join("disk.raw"), vec![0u8; 65536]).expect("write disk");
        let path = dir.join(MANIFEST);
        fs::write(&path, manifest).expect("write manifest");
        path
    }

    pub(crate) const VALID: &str = r#"{"format": "vmc-guest-image/1", "kernel": "kernel",
        "initramfs": "initramfs", "cmdline": "cmdline", "disk": "disk.raw",
        "build": {"kernel": "linux-image-6.1.0-56-cloud-amd64 6.1.192-2"}}"#;

    #[test]
    fn a_valid_image_names_its_files_and_command_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_image(dir.path(), VALID);
        assert!(GuestImage::is_image_dir(dir.path()));
        let image = GuestImage::open(dir.path()).expect("open");
        let root = fs::canonicalize(dir.path()).expect("canonical");
        assert_eq!(image.kernel, root.join("kernel"));
        assert_eq!(image.initramfs, root.join("initramfs"));
        assert_eq!(image.disk, root.join("disk.raw"));
        assert_eq!(image.cmdline, "console=ttyS0 quiet");
    }

    #[test]
    fn a_directory_without_a_manifest_is_not_an_image() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(!GuestImage::is_image_dir(dir.path()));
        let error = GuestImage::open(dir.path()).expect_err("no manifest");
        assert!(error.to_string().contains("cannot read"), "{error}");
    }

    #[test]
    fn bad_manifests_are_refused_with_the_reason() {
        let cases = [
            (
                VALID.replace("vmc-guest-image/1", "vmc-guest-image/9"),
                "has format",
            ),
            (
                VALID.replace(r#""disk.raw""#, r#""../disk.raw""#),
                "not a file name inside the image directory",
            ),
            (
                VALID.replace(r#""disk.raw""#, r#""/etc/passwd""#),
                "not a file name inside the image directory",
            ),
            (
                VALID.replace(r#""disk.raw""#, r#""disk.qcow2""#),
                "disk.qcow2 is not a file",
            ),
            (
                VALID.replace(r#""cmdline": "cmdline","#, ""),
                "missing field `cmdline`",
            ),
            (
                VALID.replace(r#""build""#, r#""memory": 1, "build""#),
                "unknown field `memory`",
            ),
        ];
        for (manifest, expected) in cases {
            let dir = tempfile::tempdir().expect("tempdir");
            write_image(dir.path(), &manifest);
            let error = GuestImage::open(dir.path()).expect_err(expected);
            assert!(error.to_string().contains(expected), "{error}");
        }
    }

    #[test]
    fn an_empty_command_line_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_image(dir.path(), VALID);
        fs::write(dir.path().join("cmdline"), "\n").expect("write");
        let error = GuestImage::open(dir.path()).expect_err("empty");
        assert!(error.to_string().contains("is empty"), "{error}");
    }
}
