//! Where a transfer may touch the file system, and the names of its partial files.
//!
//! Every requested path goes through [`resolve_put`] or [`resolve_get`]: it must be
//! absolute, and after resolving `..` and symlinks (of the parent directory for a
//! PUT, of the file itself for a GET) it must lie inside one of the
//! [`AllowedRoots`], canonicalized once when the agent starts. A path that does not
//! exist is judged by its nearest existing ancestor plus the missing rest, so a
//! request outside the roots learns `outside-allowed-roots`, never whether the path
//! exists. Files are opened without following a final symlink and their real
//! location is checked again through `/proc/self/fd` once open, so swapping a
//! directory for a symlink between the check and the open does not lead outside.
//!
//! A PUT writes `.<name>.<transfer-id>.part` next to its target; names that would
//! not fit in a directory entry, and transfer ids that are not plain names, are
//! replaced by part of their SHA-256. These functions block: callers run them in
//! `spawn_blocking`. Nothing here knows about messages or tasks.

use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::mem::MaybeUninit;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use super::TransferError;

/// The longest file name most Unix file systems accept, in bytes.
const NAME_MAX: usize = 255;

/// The longest transfer id used as is in a partial file's name.
const MAX_PLAIN_ID: usize = 64;

const PARTIAL_SUFFIX: &str = ".part";

/// The directories transfers may use, canonical.
#[derive(Clone, Debug)]
pub(super) struct AllowedRoots(Vec<PathBuf>);

impl AllowedRoots {
    /// Canonicalizes `roots`, leaving out (with a warning) those that cannot be: a
    /// root that does not exist holds nothing to transfer.
    pub(super) fn canonicalize(roots: &[PathBuf]) -> AllowedRoots {
        let mut canonical = Vec::with_capacity(roots.len());
        for root in roots {
            match fs::canonicalize(root) {
                Ok(path) => canonical.push(path),
                Err(err) => log::warn!(
                    "file transfers cannot use the allowed root {}: {err}",
                    root.display()
                ),
            }
        }
        if canonical.is_empty() {
            log::warn!("no allowed roots: every file transfer will be refused");
        }
        AllowedRoots(canonical)
    }

    fn contains(&self, path: &Path) -> bool {
        self.0.iter().any(|root| path.starts_with(root))
    }

    fn outside(&self, path: &Path) -> TransferError {
        let roots = if self.0.is_empty() {
            "none are configured".to_owned()
        } else {
            self.0
                .iter()
                .map(|root| root.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        TransferError::OutsideRoots {
            path: path.to_owned(),
            roots,
        }
    }
}

/// Where a PUT writes, checked.
#[derive(Debug)]
pub(super) struct PutTarget {
    /// The file to create or replace: the canonical directory and the name.
    pub(super) path: PathBuf,
    /// Its directory, canonical.
    pub(super) dir: PathBuf,
    /// Its name.
    pub(super) name: OsString,
    /// Permission bits of the file being replaced, if there is one.
    pub(super) existing_mode: Option<u32>,
}

impl PutTarget {
    /// The partial file of transfer `transfer_id` for this target.
    pub(super) fn partial(&self, transfer_id: &str) -> PathBuf {
        let mut name = partial_prefix(&self.name);
        name.push(transfer_token(transfer_id));
        name.push(PARTIAL_SUFFIX);
        self.dir.join(name)
    }
}

/// Checks that `requested` may be written by a PUT.
pub(super) fn resolve_put(
    roots: &AllowedRoots,
    requested: &str,
) -> Result<PutTarget, TransferError> {
    let path = absolute(requested)?;
    let (Some(name), Some(parent)) = (path.file_name(), path.parent()) else {
        return Err(TransferError::IsADirectory {
            path: path.to_owned(),
        });
    };
    let dir = match locate(parent).map_err(|source| lookup_error(path, source))? {
        Located::Missing { resolved } if roots.contains(&resolved) => {
            return Err(TransferError::NoDirectory {
                path: path.to_owned(),
                dir: parent.to_owned(),
            })
        }
        Located::Missing { .. } => return Err(roots.outside(path)),
        Located::Exists(dir) if !roots.contains(&dir) => return Err(roots.outside(path)),
        Located::Exists(dir) => dir,
    };
    if !dir.is_dir() {
        return Err(TransferError::NoDirectory {
            path: path.to_owned(),
            dir: parent.to_owned(),
        });
    }
    let target = dir.join(name);
    let existing_mode = match fs::metadata(&target) {
        Ok(meta) if meta.is_dir() => return Err(TransferError::IsADirectory { path: target }),
        Ok(meta) => Some(meta.permissions().mode() & 0o7777),
        Err(err) if err.kind() == io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(TransferError::Io {
                path: target,
                action: "inspect the existing file",
                source,
            })
        }
    };
    Ok(PutTarget {
        path: target,
        dir,
        name: name.to_owned(),
        existing_mode,
    })
}

/// Checks that `requested` may be read by a GET; returns its canonical path.
pub(super) fn resolve_get(roots: &AllowedRoots, requested: &str) -> Result<PathBuf, TransferError> {
    let path = absolute(requested)?;
    let canonical = match locate(path).map_err(|source| lookup_error(path, source))? {
        Located::Missing { resolved } if roots.contains(&resolved) => {
            return Err(TransferError::NotFound {
                path: path.to_owned(),
            })
        }
        Located::Missing { .. } => return Err(roots.outside(path)),
        Located::Exists(canonical) if !roots.contains(&canonical) => {
            return Err(roots.outside(path))
        }
        Located::Exists(canonical) => canonical,
    };
    let meta = fs::metadata(&canonical).map_err(|source| TransferError::Io {
        path: path.to_owned(),
        action: "inspect the file",
        source,
    })?;
    if meta.is_dir() {
        return Err(TransferError::IsADirectory {
            path: path.to_owned(),
        });
    }
    if !meta.is_file() {
        return Err(TransferError::NotAFile {
            path: path.to_owned(),
        });
    }
    Ok(canonical)
}

/// Opens the file a GET sends, checking that it is still the checked one.
pub(super) fn open_for_get(roots: &AllowedRoots, canonical: &Path) -> Result<File, TransferError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(canonical)
        .map_err(|source| TransferError::Io {
            path: canonical.to_owned(),
            action: "open the file",
            source,
        })?;
    let meta = file.metadata().map_err(|source| TransferError::Io {
        path: canonical.to_owned(),
        action: "inspect the file",
        source,
    })?;
    if !meta.is_file() {
        return Err(TransferError::NotAFile {
            path: canonical.to_owned(),
        });
    }
    check_opened_location(roots, &file, canonical)?;
    Ok(file)
}

/// Opens the partial file of a PUT: the one an earlier attempt left, if it is a
/// regular file this agent owns, or a new one. Returns the file and whether it is new.
pub(super) fn open_partial(
    roots: &AllowedRoots,
    partial: &Path,
) -> Result<(File, bool), TransferError> {
    let io_error = |action, source| TransferError::Io {
        path: partial.to_owned(),
        action,
        source,
    };
    match OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(partial)
    {
        Ok(file) => {
            let meta = file
                .metadata()
                .map_err(|source| io_error("inspect the partial file", source))?;
            if meta.is_file() && meta.uid() == effective_uid() {
                check_opened_location(roots, &file, partial)?;
                return Ok((file, false));
            }
            log::warn!(
                "{} is not a partial file this agent wrote; replacing it",
                partial.display()
            );
            fs::remove_file(partial)
                .map_err(|source| io_error("remove the foreign partial file", source))?;
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) if err.raw_os_error() == Some(libc::ELOOP) => {
            log::warn!("{} is a symlink; replacing it", partial.display());
            fs::remove_file(partial).map_err(|source| {
                io_error("remove the symlink in place of the partial file", source)
            })?;
        }
        Err(source) => return Err(io_error("open the partial file", source)),
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(partial)
        .map_err(|source| io_error("create the partial file", source))?;
    if let Err(err) = check_opened_location(roots, &file, partial) {
        let _ = fs::remove_file(partial);
        return Err(err);
    }
    Ok((file, true))
}

/// Removes the partial files `.<name>.*.part` next to `target` that were last
/// written more than `age` ago, except `keep`. Failures are logged: clean-up never
/// fails a transfer.
pub(super) fn remove_stale_partials(target: &PutTarget, keep: &Path, age: Duration) {
    let prefix = partial_prefix(&target.name);
    let entries = match fs::read_dir(&target.dir) {
        Ok(entries) => entries,
        Err(err) => {
            log::warn!(
                "cannot list {} to remove stale partial files: {err}",
                target.dir.display()
            );
            return;
        }
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let bytes = name.as_bytes();
        if !bytes.starts_with(prefix.as_bytes()) || !bytes.ends_with(PARTIAL_SUFFIX.as_bytes()) {
            continue;
        }
        let path = entry.path();
        if path != keep {
            remove_if_stale(&path, age);
        }
    }
}

/// Removes `path` if it is a regular file last written more than `age` ago.
pub(super) fn remove_if_stale(path: &Path, age: Duration) {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return;
    };
    let stale = meta.is_file()
        && meta
            .modified()
            .ok()
            .and_then(|modified| SystemTime::now().duration_since(modified).ok())
            .is_some_and(|idle| idle > age);
    if stale {
        match fs::remove_file(path) {
            Ok(()) => log::info!("removed the stale partial file {}", path.display()),
            Err(err) => log::warn!(
                "cannot remove the stale partial file {}: {err}",
                path.display()
            ),
        }
    }
}

/// Bytes an unprivileged user may still write on the file system of `dir`.
#[allow(unsafe_code)]
pub(super) fn available_space(dir: &Path) -> io::Result<u64> {
    let c_path = CString::new(dir.as_os_str().as_bytes())
        .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err))?;
    let mut stats = MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c_path` is a NUL-terminated string that outlives the call, and
    // `stats` points to writable memory of the size of a `statvfs`.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), stats.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled `stats` (which was zeroed anyway,
    // a valid value for this struct of integers).
    let stats = unsafe { stats.assume_init() };
    #[allow(clippy::useless_conversion)] // the field types differ between platforms
    let (blocks, block_size) = (u64::from(stats.f_bavail), u64::from(stats.f_frsize));
    Ok(blocks.saturating_mul(block_size))
}

/// The user this agent writes files as.
#[allow(unsafe_code)]
fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Maps a failure to look up `path` (or its parent) to the error for the peer.
fn lookup_error(path: &Path, source: io::Error) -> TransferError {
    TransferError::Io {
        path: path.to_owned(),
        action: "look up the path",
        source,
    }
}

fn absolute(requested: &str) -> Result<&Path, TransferError> {
    let path = Path::new(requested);
    if path.is_absolute() {
        Ok(path)
    } else {
        Err(TransferError::NotAbsolute {
            path: requested.to_owned(),
        })
    }
}

/// What exists of a path.
enum Located {
    /// It exists; this is its canonical form.
    Exists(PathBuf),
    /// It does not; this is the canonical form of its nearest existing ancestor
    /// followed by the rest, with `.` and `..` resolved lexically.
    Missing { resolved: PathBuf },
}

fn locate(path: &Path) -> io::Result<Located> {
    match fs::canonicalize(path) {
        Ok(canonical) => return Ok(Located::Exists(canonical)),
        Err(err) if is_missing(&err) => {}
        Err(err) => return Err(err),
    }
    let components: Vec<Component<'_>> = path.components().collect();
    for existing in (1..components.len()).rev() {
        let ancestor: PathBuf = components[..existing].iter().collect();
        match fs::canonicalize(&ancestor) {
            Ok(mut resolved) => {
                for component in &components[existing..] {
                    match component {
                        Component::ParentDir => {
                            resolved.pop();
                        }
                        Component::Normal(name) => resolved.push(name),
                        Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
                    }
                }
                return Ok(Located::Missing { resolved });
            }
            Err(err) if is_missing(&err) => {}
            Err(err) => return Err(err),
        }
    }
    // Not even the root exists: only possible for a path that is not absolute.
    Err(io::Error::from(io::ErrorKind::NotFound))
}

fn is_missing(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    )
}

/// Checks, where `/proc` tells, that the open `file` really lies inside the roots.
fn check_opened_location(
    roots: &AllowedRoots,
    file: &File,
    path: &Path,
) -> Result<(), TransferError> {
    let link = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    match fs::read_link(&link) {
        Ok(real) if roots.contains(&real) => Ok(()),
        Ok(real) => {
            log::warn!(
                "{} was opened as {}, outside the allowed roots",
                path.display(),
                real.display()
            );
            Err(roots.outside(path))
        }
        // Without /proc the checks made before opening have to do.
        Err(_) => Ok(()),
    }
}

/// `.<name>.`, or `.~<digest of name>.` when the name is too long to be kept.
fn partial_prefix(name: &OsStr) -> OsString {
    let budget = NAME_MAX - 2 - MAX_PLAIN_ID - PARTIAL_SUFFIX.len();
    let mut prefix = OsString::from(".");
    if name.len() <= budget {
        prefix.push(name);
    } else {
        prefix.push("~");
        prefix.push(short_digest(name.as_bytes()));
    }
    prefix.push(".");
    prefix
}

/// The transfer id if it is a plain name, else `~` and a digest of it.
fn transfer_token(transfer_id: &str) -> String {
    let plain = (1..=MAX_PLAIN_ID).contains(&transfer_id.len())
        && transfer_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if plain {
        transfer_id.to_owned()
    } else {
        format!("~{}", short_digest(transfer_id.as_bytes()))
    }
}

/// The first 128 bits of the SHA-256 of `bytes`, in hex.
fn short_digest(bytes: &[u8]) -> String {
    Sha256::digest(bytes)[..16]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn roots(dir: &Path) -> AllowedRoots {
        AllowedRoots::canonicalize(&[dir.to_owned()])
    }

    fn code(err: TransferError) -> &'static str {
        err.code().as_str()
    }

    #[test]
    fn partial_names_stay_one_short_directory_entry() {
        let dir = tempfile::tempdir().unwrap();
        let target = resolve_put(
            &roots(dir.path()),
            &format!("{}/data.bin", dir.path().display()),
        )
        .unwrap();
        assert_eq!(
            target.partial("t-1").file_name().unwrap(),
            OsStr::new(".data.bin.t-1.part")
        );
        for hostile in ["../../etc/passwd", "a/b", "", &"x".repeat(300)] {
            let partial = target.partial(hostile);
            assert_eq!(partial.parent().unwrap(), target.dir, "{hostile:?}");
            let name = partial.file_name().unwrap().to_str().unwrap().to_owned();
            assert!(
                name.starts_with(".data.bin.~") && name.ends_with(".part"),
                "{name}"
            );
        }
        let long = "n".repeat(250);
        let target = resolve_put(
            &roots(dir.path()),
            &format!("{}/{long}", dir.path().display()),
        )
        .unwrap();
        let partial = target.partial(&"i".repeat(64));
        assert!(partial.file_name().unwrap().len() <= NAME_MAX);
    }

    #[test]
    fn missing_paths_inside_the_roots_are_not_found_and_outside_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir(&root).unwrap();
        let roots = roots(&root);
        let inside = format!("{}/no/such/dir/file", root.display());
        assert_eq!(code(resolve_put(&roots, &inside).unwrap_err()), "not-found");
        assert_eq!(code(resolve_get(&roots, &inside).unwrap_err()), "not-found");
        let escaping = format!("{}/no/../../elsewhere/file", root.display());
        assert_eq!(
            code(resolve_put(&roots, &escaping).unwrap_err()),
            "outside-allowed-roots"
        );
        assert_eq!(
            code(resolve_get(&roots, &escaping).unwrap_err()),
            "outside-allowed-roots"
        );
        assert_eq!(
            code(resolve_get(&roots, "/etc/no-such-file").unwrap_err()),
            "outside-allowed-roots"
        );
        assert_eq!(
            code(resolve_put(&roots, "relative/file").unwrap_err()),
            "outside-allowed-roots"
        );
        assert_eq!(
            code(resolve_put(&roots, "/").unwrap_err()),
            "is-a-directory"
        );
    }

    #[test]
    fn a_symlink_swapped_in_after_the_check_is_caught_once_open() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        fs::create_dir_all(root.join("sub")).unwrap();
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("secret"), b"secret").unwrap();
        let roots = roots(&root);
        let checked = root.join("sub").join("secret");
        fs::rename(root.join("sub"), dir.path().join("old-sub")).unwrap();
        symlink(&outside, root.join("sub")).unwrap();
        assert_eq!(
            code(open_for_get(&roots, &checked).unwrap_err()),
            "outside-allowed-roots"
        );
        let partial = root.join("sub").join(".x.t.part");
        assert_eq!(
            code(open_partial(&roots, &partial).unwrap_err()),
            "outside-allowed-roots"
        );
        assert!(
            !outside.join(".x.t.part").exists(),
            "the partial file was removed"
        );
    }

    #[test]
    fn a_planted_symlink_is_never_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        let partial = dir.path().join(".f.t.part");
        symlink(&victim, &partial).unwrap();
        let (_file, new) = open_partial(&roots(dir.path()), &partial).unwrap();
        assert!(new, "the symlink was replaced by a new file");
        assert!(!fs::symlink_metadata(&partial)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
    }

    #[test]
    fn free_space_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        assert!(available_space(dir.path()).unwrap() > 0);
    }
}
