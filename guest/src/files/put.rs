//! The receiving end of a PUT: one task per transfer, from `FILE_PUT` to `FILE_DONE`.
//!
//! The task checks the offer and the target, then opens the partial file
//! `.<name>.<transfer-id>.part` next to the target: if an earlier attempt left one
//! (and it is no longer than the offer), its bytes are hashed again and the
//! transfer resumes after them, else it starts at 0. It answers `FILE_READY`, then
//! appends each chunk that continues the written bytes (duplicates are ignored,
//! gaps dropped) and acknowledges every chunk with the bytes written so far; the
//! bytes are hashed by a [`StreamDigest`] beside the writing, so an
//! acknowledgement waits for the write only. On
//! `FILE_END` it checks size and SHA-256, flushes the file to disk, applies the
//! mode (the offer's, else that of the file it replaces), renames it over the
//! target and flushes the directory. Any failure, `FILE_ABORT` or `FILE_ERROR`
//! removes the partial file; an idle timeout or the agent stopping keeps it for a
//! resume. Disk work runs in `spawn_blocking`, one chunk at a time.

use std::fs::{self, File, Permissions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;
use vmc_protocol::words::{is_sha256_hex, FileOffer, Message};

use super::paths::{self, AllowedRoots, PutTarget};
use super::{
    blocking, check_pacing, wait_for, Inbox, Input, Next, StreamDigest, TransferContext,
    TransferError, STALE_PARTIAL_AGE,
};

/// Bytes read at a time when hashing a partial file again.
const REHASH_BUFFER: usize = 1024 * 1024;

/// What a PUT task starts from.
#[derive(Debug)]
pub(super) struct PutStart {
    pub(super) transfer_id: String,
    pub(super) offer: FileOffer,
    pub(super) reply_to: String,
}

/// Receives one PUT (see the module documentation). `previous` is the task of an
/// earlier attempt with the same id, which must finish first.
pub(super) async fn run(
    context: Arc<TransferContext>,
    start: PutStart,
    mut inbox: Inbox,
    previous: Option<JoinHandle<()>>,
) {
    let PutStart {
        transfer_id,
        offer,
        reply_to,
    } = start;
    wait_for(previous, &transfer_id).await;
    let mut receiver = match Receiver::open(&context, &transfer_id, offer).await {
        Ok(receiver) => receiver,
        Err(err) => return context.fail(&transfer_id, &reply_to, &err),
    };
    log::info!(
        "transfer {transfer_id}: receiving {} ({} bytes) from byte {}",
        receiver.target.path.display(),
        receiver.offer.size,
        receiver.written
    );
    context.send(
        &reply_to,
        Message::FileReady {
            transfer_id: transfer_id.clone(),
            offset: receiver.written,
            size: None,
            sha256: None,
        },
    );
    loop {
        let input = match inbox.next(context.idle_timeout).await {
            Next::Input(input) => input,
            Next::Idle => {
                log::info!(
                    "transfer {transfer_id}: nothing from the host for {:?}; keeping {} for a resume",
                    context.idle_timeout,
                    receiver.partial.display()
                );
                return receiver.remove_later();
            }
            Next::Closed => return,
        };
        match input {
            Input::Chunk { offset, data } => match receiver.write(offset, data).await {
                Ok(written) => context.send(
                    &reply_to,
                    Message::FileAck {
                        transfer_id: transfer_id.clone(),
                        offset: written,
                    },
                ),
                Err(err) => {
                    receiver.discard().await;
                    return context.fail(&transfer_id, &reply_to, &err);
                }
            },
            Input::End { size, sha256 } => {
                match receiver.finish(size, &sha256).await {
                    Ok(digest) => {
                        log::info!(
                            "transfer {transfer_id}: {} is in place",
                            receiver.target.path.display()
                        );
                        context.send(
                            &reply_to,
                            Message::FileDone {
                                transfer_id,
                                size: receiver.offer.size,
                                sha256: digest,
                            },
                        );
                    }
                    Err(err) => {
                        receiver.discard().await;
                        context.fail(&transfer_id, &reply_to, &err);
                    }
                }
                return;
            }
            Input::Abort { reason } => {
                log::info!(
                    "transfer {transfer_id}: aborted by the host ({})",
                    reason.as_deref().unwrap_or("no reason given")
                );
                return receiver.discard().await;
            }
            Input::Failed { code, message } => {
                log::warn!("transfer {transfer_id}: the host gave up: {code}: {message}");
                return receiver.discard().await;
            }
            Input::Stop { discard_partial } => {
                if discard_partial {
                    receiver.discard().await;
                }
                return;
            }
            other @ (Input::Ack { .. } | Input::Done { .. }) => log::debug!(
                "transfer {transfer_id}: {} ignored, the guest is the receiver",
                other.word()
            ),
        }
    }
}

/// The file being written and the digest of what it holds.
#[derive(Debug)]
struct PartialFile {
    file: File,
    hasher: Sha256,
}

/// Where a chunk's bytes go: written at its offset, hashed beside.
#[derive(Debug)]
struct Sink {
    file: Arc<File>,
    digest: StreamDigest,
}

/// A PUT in progress.
#[derive(Debug)]
struct Receiver {
    /// The offer, its digest in lowercase.
    offer: FileOffer,
    target: PutTarget,
    partial: PathBuf,
    /// Taken by `finish`.
    sink: Option<Sink>,
    /// Bytes written contiguously from the start.
    written: u64,
}

impl Receiver {
    /// Checks the offer and the target and opens the partial file (see the module
    /// documentation). On error no partial file is left behind.
    async fn open(
        context: &TransferContext,
        transfer_id: &str,
        mut offer: FileOffer,
    ) -> Result<Receiver, TransferError> {
        check_pacing(&offer.path, offer.chunk_size, offer.window)?;
        if let Some(sha256) = &mut offer.sha256 {
            sha256.make_ascii_lowercase();
            if !is_sha256_hex(sha256) {
                return Err(TransferError::Protocol {
                    path: offer.path,
                    reason: format!("{sha256:?} is not a SHA-256 digest in hex"),
                });
            }
        }
        if offer.size > context.max_file_size {
            return Err(TransferError::TooLarge {
                path: PathBuf::from(offer.path),
                size: offer.size,
                limit: context.max_file_size,
            });
        }
        let roots = context.roots.clone();
        let (requested, transfer_id, size) =
            (offer.path.clone(), transfer_id.to_owned(), offer.size);
        let prepared = blocking(&PathBuf::from(&offer.path), move || {
            prepare(&roots, &requested, &transfer_id, size)
        })
        .await?;
        Ok(Receiver {
            offer,
            target: prepared.target,
            partial: prepared.partial,
            sink: Some(Sink {
                file: Arc::new(prepared.file.file),
                digest: StreamDigest::start(prepared.file.hasher),
            }),
            written: prepared.written,
        })
    }

    /// Writes what a chunk adds to the file; returns the bytes written since the start.
    async fn write(&mut self, offset: u64, data: Bytes) -> Result<u64, TransferError> {
        let len = data.len() as u64;
        if len > u64::from(self.offer.chunk_size) {
            return Err(self.protocol(format!(
                "a chunk of {len} bytes exceeds the chunk size of {}",
                self.offer.chunk_size
            )));
        }
        let end = match offset.checked_add(len) {
            Some(end) if end <= self.offer.size => end,
            _ => {
                return Err(self.protocol(format!(
                    "a chunk of {len} bytes at {offset} ends past the {} bytes offered",
                    self.offer.size
                )))
            }
        };
        if offset > self.written {
            log::debug!(
                "{}: chunk at {offset} dropped, only {} bytes are written",
                self.partial.display(),
                self.written
            );
            return Ok(self.written);
        }
        if end <= self.written {
            return Ok(self.written);
        }
        // offset <= written < end: the new bytes start inside this chunk.
        let fresh = data.slice(usize::try_from(self.written - offset).unwrap_or(0)..);
        let Some(sink) = &self.sink else {
            return Err(self.protocol("a chunk after FILE_END".to_owned()));
        };
        let (file, partial, at) = (sink.file.clone(), self.partial.clone(), self.written);
        let bytes = fresh.clone();
        blocking(&self.partial, move || {
            file.write_all_at(&bytes, at)
                .map_err(|source| TransferError::Io {
                    path: partial,
                    action: "write the partial file",
                    source,
                })
        })
        .await?;
        sink.digest.update(fresh).await;
        self.written = end;
        Ok(end)
    }

    /// Checks size and digest (against `FILE_END`'s, and the offer's if it had one),
    /// then puts the file in place; returns the digest.
    async fn finish(&mut self, size: u64, sha256: &str) -> Result<String, TransferError> {
        if size != self.offer.size || self.written != size {
            return Err(self.protocol(format!(
                "FILE_END announces {size} bytes; {} of the {} offered were received",
                self.written, self.offer.size
            )));
        }
        let Some(Sink { file, digest }) = self.sink.take() else {
            return Err(self.protocol("a second FILE_END".to_owned()));
        };
        let actual = digest.finish(&self.partial).await?;
        let ended = sha256.to_ascii_lowercase();
        let offered = self.offer.sha256.clone().unwrap_or_else(|| ended.clone());
        let mode = self.offer.mode.or(self.target.existing_mode);
        let partial = self.partial.clone();
        let (target, dir) = (self.target.path.clone(), self.target.dir.clone());
        blocking(&self.partial, move || {
            for expected in [offered, ended] {
                if actual != expected {
                    return Err(TransferError::ChecksumMismatch {
                        path: target,
                        expected,
                        actual,
                    });
                }
            }
            let io_error = |action, source| TransferError::Io {
                path: target.clone(),
                action,
                source,
            };
            file.sync_all()
                .map_err(|source| io_error("flush the received file to disk", source))?;
            if let Some(mode) = mode {
                file.set_permissions(Permissions::from_mode(mode & 0o7777))
                    .map_err(|source| io_error("set the file's mode", source))?;
            }
            fs::rename(&partial, &target)
                .map_err(|source| io_error("move the received file into place", source))?;
            if let Err(err) = File::open(&dir).and_then(|dir| dir.sync_all()) {
                log::warn!("cannot flush the directory {}: {err}", dir.display());
            }
            Ok(actual)
        })
        .await
    }

    /// Removes the partial file.
    async fn discard(&self) {
        match tokio::fs::remove_file(&self.partial).await {
            Ok(()) => log::debug!("removed {}", self.partial.display()),
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => log::warn!(
                "cannot remove the partial file {}: {err}",
                self.partial.display()
            ),
        }
    }

    /// Keeps the partial file for a resume, but removes it once it is stale if
    /// nothing has written it by then.
    fn remove_later(self) {
        let partial = self.partial;
        tokio::spawn(async move {
            tokio::time::sleep(STALE_PARTIAL_AGE).await;
            let _ = tokio::task::spawn_blocking(move || {
                paths::remove_if_stale(&partial, STALE_PARTIAL_AGE)
            })
            .await;
        });
    }

    fn protocol(&self, reason: String) -> TransferError {
        TransferError::Protocol {
            path: self.offer.path.clone(),
            reason,
        }
    }
}

/// What [`prepare`] found and opened.
#[derive(Debug)]
struct Prepared {
    target: PutTarget,
    partial: PathBuf,
    file: PartialFile,
    written: u64,
}

/// Resolves the target, removes stale partial files of it, opens (or resumes) this
/// transfer's partial file and checks the free space. Blocking.
fn prepare(
    roots: &AllowedRoots,
    requested: &str,
    transfer_id: &str,
    size: u64,
) -> Result<Prepared, TransferError> {
    let target = paths::resolve_put(roots, requested)?;
    let partial = target.partial(transfer_id);
    paths::remove_stale_partials(&target, &partial, STALE_PARTIAL_AGE);
    let (file, new) = paths::open_partial(roots, &partial)?;
    let resumed = resume(file, new, &partial, size).and_then(|(file, written)| {
        let needed = size - written.min(size);
        match paths::available_space(&target.dir) {
            Ok(available) if available < needed => Err(TransferError::NoSpace {
                path: target.path.clone(),
                needed,
                available,
            }),
            Ok(_) => Ok((file, written)),
            Err(err) => {
                log::debug!(
                    "cannot tell the free space of {}: {err}",
                    target.dir.display()
                );
                Ok((file, written))
            }
        }
    });
    match resumed {
        Ok((file, written)) => Ok(Prepared {
            target,
            partial,
            file,
            written,
        }),
        Err(err) => {
            let _ = fs::remove_file(&partial);
            Err(err)
        }
    }
}

/// Hashes what an earlier attempt wrote (or empties it if it is longer than the
/// offer) and leaves the file positioned at its end.
fn resume(
    mut file: File,
    new: bool,
    partial: &std::path::Path,
    size: u64,
) -> Result<(PartialFile, u64), TransferError> {
    let io_error = |action, source| TransferError::Io {
        path: partial.to_owned(),
        action,
        source,
    };
    let mut hasher = Sha256::new();
    let mut written = 0;
    if !new {
        let len = file
            .metadata()
            .map_err(|source| io_error("inspect the partial file", source))?
            .len();
        if len > size {
            log::info!(
                "{} holds {len} bytes, more than the {size} offered; starting again",
                partial.display()
            );
            file.set_len(0)
                .map_err(|source| io_error("empty the partial file", source))?;
        } else {
            let mut buffer = vec![0; REHASH_BUFFER];
            loop {
                let n = match file.read(&mut buffer) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                    Err(source) => return Err(io_error("read the partial file", source)),
                };
                hasher.update(&buffer[..n]);
                written += n as u64;
            }
        }
    }
    file.seek(SeekFrom::Start(written))
        .map_err(|source| io_error("seek in the partial file", source))?;
    Ok((PartialFile { file, hasher }, written))
}

#[cfg(test)]
mod tests {
    use super::super::hex;
    use super::*;

    #[test]
    fn a_partial_file_longer_than_the_offer_starts_again() {
        let dir = tempfile::tempdir().unwrap();
        let roots = AllowedRoots::canonicalize(&[dir.path().to_owned()]);
        let requested = dir.path().join("f").display().to_string();
        fs::write(dir.path().join(".f.t-1.part"), b"0123456789").unwrap();
        let prepared = prepare(&roots, &requested, "t-1", 4).unwrap();
        assert_eq!(prepared.written, 0);
        assert_eq!(fs::metadata(&prepared.partial).unwrap().len(), 0);

        fs::write(dir.path().join(".f.t-2.part"), b"0123").unwrap();
        let prepared = prepare(&roots, &requested, "t-2", 10).unwrap();
        assert_eq!(prepared.written, 4);
        assert_eq!(
            hex(&prepared.file.hasher.finalize()),
            hex(&Sha256::digest(b"0123"))
        );
    }

    #[test]
    fn not_enough_space_is_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let roots = AllowedRoots::canonicalize(&[dir.path().to_owned()]);
        let requested = dir.path().join("f").display().to_string();
        let err = prepare(&roots, &requested, "t-1", u64::MAX).unwrap_err();
        assert_eq!(err.code().as_str(), "no-space");
        assert!(err.to_string().contains("more bytes are needed"), "{err}");
        assert!(!dir.path().join(".f.t-1.part").exists());
    }
}
