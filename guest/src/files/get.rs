//! The sending end of a GET: one task per transfer, from `FILE_GET` to `FILE_DONE`.
//!
//! The task checks the path and opens the file, noting its size and modification
//! time; it does not read the file ahead. It answers `FILE_READY` with the size
//! and no digest, from the requested offset (0 if that is beyond the end; the
//! bytes before a non-zero offset are hashed first, on the blocking pool). Then it
//! sends chunks in order, each read with one positioned read on the blocking pool,
//! as long as each starts below `acked + window × chunk_size`; every `FILE_ACK`
//! that advances `acked` opens the window again. Each chunk read is handed to a
//! [`StreamDigest`] that hashes on a blocking thread while the chunk travels, so
//! the file is read once and hashing overlaps the transfer. Once `acked` reaches
//! the size it checks that the file's size and modification time are still those
//! it opened (a file written to while sent fails with `io` rather than arriving
//! torn under a digest of its torn bytes), and sends `FILE_END` with the SHA-256 of
//! exactly the bytes sent. It then waits for the host's `FILE_DONE`, `FILE_ERROR`
//! or `FILE_ABORT`, any of which ends the transfer. It keeps no timer for
//! re-sending: a host that misses chunks repeats `FILE_GET`, which replaces this
//! task.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;
use vmc_protocol::words::{FileRequest, Message};

use super::paths::{self, AllowedRoots};
use super::{
    blocking, check_pacing, wait_for, Inbox, Input, Next, StreamDigest, TransferContext,
    TransferError,
};

/// Bytes read at a time when hashing the part of the file before a resume offset.
const HASH_BUFFER: usize = 1024 * 1024;

/// What a GET task starts from.
#[derive(Debug)]
pub(super) struct GetStart {
    pub(super) transfer_id: String,
    pub(super) request: FileRequest,
    pub(super) reply_to: String,
}

/// Sends one GET (see the module documentation). `previous` is the task of an
/// earlier attempt with the same id, which must finish first.
pub(super) async fn run(
    context: Arc<TransferContext>,
    start: GetStart,
    mut inbox: Inbox,
    previous: Option<JoinHandle<()>>,
) {
    let GetStart {
        transfer_id,
        request,
        reply_to,
    } = start;
    wait_for(previous, &transfer_id).await;
    let mut sender = match Sender::open(&context, &request).await {
        Ok(sender) => sender,
        Err(err) => return context.fail(&transfer_id, &reply_to, &err),
    };
    log::info!(
        "transfer {transfer_id}: sending {} ({} bytes) from byte {}",
        sender.path.display(),
        sender.size,
        sender.acked
    );
    context.send(
        &reply_to,
        Message::FileReady {
            transfer_id: transfer_id.clone(),
            offset: sender.acked,
            size: Some(sender.size),
            sha256: None,
        },
    );
    if let Err(err) = sender.fill(&context, &transfer_id, &reply_to).await {
        return context.fail(&transfer_id, &reply_to, &err);
    }
    loop {
        let input = match inbox.next(context.idle_timeout).await {
            Next::Input(input) => input,
            Next::Idle => {
                log::info!(
                    "transfer {transfer_id}: nothing from the host for {:?}; forgetting it",
                    context.idle_timeout
                );
                return;
            }
            Next::Closed => return,
        };
        match input {
            Input::Ack { offset } => {
                let sent = match sender.acknowledged(offset) {
                    Ok(()) => sender.fill(&context, &transfer_id, &reply_to).await,
                    Err(err) => Err(err),
                };
                if let Err(err) = sent {
                    return context.fail(&transfer_id, &reply_to, &err);
                }
            }
            Input::Done { size, sha256 } => {
                let sent = sender.sha256.as_deref().unwrap_or("");
                if size == sender.size && sha256.eq_ignore_ascii_case(sent) {
                    log::info!(
                        "transfer {transfer_id}: the host has {}",
                        sender.path.display()
                    );
                } else {
                    log::warn!(
                        "transfer {transfer_id}: the host took {size} bytes with SHA-256 {sha256}, \
                         but {} bytes with {sent} were sent",
                        sender.size,
                    );
                }
                return;
            }
            Input::Failed { code, message } => {
                log::warn!("transfer {transfer_id}: the host gave up: {code}: {message}");
                return;
            }
            Input::Abort { reason } => {
                log::info!(
                    "transfer {transfer_id}: aborted by the host ({})",
                    reason.as_deref().unwrap_or("no reason given")
                );
                return;
            }
            Input::Stop { .. } => return,
            other @ (Input::Chunk { .. } | Input::End { .. }) => log::debug!(
                "transfer {transfer_id}: {} ignored, the guest is the sender",
                other.word()
            ),
        }
    }
}

/// What identifies the contents of a file cheaply: changes when it is written to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Version {
    len: u64,
    modified: Option<SystemTime>,
}

impl Version {
    fn of(file: &File, path: &std::path::Path) -> Result<Version, TransferError> {
        let meta = file.metadata().map_err(|source| TransferError::Io {
            path: path.to_owned(),
            action: "inspect the file",
            source,
        })?;
        Ok(Version {
            len: meta.len(),
            modified: meta.modified().ok(),
        })
    }
}

/// A GET in progress.
#[derive(Debug)]
struct Sender {
    /// The path as requested, for messages.
    path: PathBuf,
    file: Arc<File>,
    /// The file as opened; it must still be so when `FILE_END` goes out.
    version: Version,
    size: u64,
    /// Hashes the bytes before the first offset and every chunk sent; taken at the end.
    digest: Option<StreamDigest>,
    /// The digest sent in `FILE_END`, once it is known.
    sha256: Option<String>,
    chunk_size: u64,
    window: u64,
    /// The highest offset the host acknowledged (at first, where sending starts).
    acked: u64,
    /// The offset of the next chunk to send.
    next: u64,
    end_sent: bool,
}

impl Sender {
    async fn open(
        context: &TransferContext,
        request: &FileRequest,
    ) -> Result<Sender, TransferError> {
        check_pacing(&request.path, request.chunk_size, request.window)?;
        let path = PathBuf::from(&request.path);
        let roots = context.roots.clone();
        let (requested, wanted) = (request.path.clone(), request.offset);
        let opened = blocking(&path, move || open_from(&roots, &requested, wanted)).await?;
        Ok(Sender {
            path,
            file: Arc::new(opened.file),
            version: opened.version,
            size: opened.version.len,
            digest: Some(StreamDigest::start(opened.prefix)),
            sha256: None,
            chunk_size: u64::from(request.chunk_size),
            window: u64::from(request.window),
            acked: opened.offset,
            next: opened.offset,
            end_sent: false,
        })
    }

    /// Takes the host's cumulative `FILE_ACK`.
    fn acknowledged(&mut self, offset: u64) -> Result<(), TransferError> {
        if offset > self.next {
            return Err(TransferError::Protocol {
                path: self.path.display().to_string(),
                reason: format!(
                    "FILE_ACK acknowledges {offset} bytes, but only {} were sent",
                    self.next
                ),
            });
        }
        self.acked = self.acked.max(offset);
        Ok(())
    }

    /// Reads the chunk at `self.next`, of `len` bytes, on the blocking pool.
    async fn read_chunk(&self, len: u64) -> Result<Bytes, TransferError> {
        let (file, path, at, size) = (self.file.clone(), self.path.clone(), self.next, self.size);
        blocking(&self.path, move || {
            // A chunk is at most MAX_FILE_CHUNK_SIZE (checked on open), so it fits.
            let mut data = vec![0; usize::try_from(len).unwrap_or(usize::MAX)];
            match file.read_exact_at(&mut data, at) {
                Ok(()) => Ok(Bytes::from(data)),
                Err(source) if source.kind() == io::ErrorKind::UnexpectedEof => {
                    Err(TransferError::Shrunk { path, size })
                }
                Err(source) => Err(TransferError::Io {
                    path,
                    action: "read the file",
                    source,
                }),
            }
        })
        .await
    }

    /// Sends the chunks the window allows, then `FILE_END` once all are acknowledged.
    async fn fill(
        &mut self,
        context: &TransferContext,
        transfer_id: &str,
        reply_to: &str,
    ) -> Result<(), TransferError> {
        let limit = self
            .acked
            .saturating_add(self.window.saturating_mul(self.chunk_size));
        while self.next < self.size && self.next < limit {
            let len = self.chunk_size.min(self.size - self.next);
            let data = self.read_chunk(len).await?;
            if let Some(digest) = &self.digest {
                digest.update(data.clone()).await;
            }
            context.send(
                reply_to,
                Message::FileChunk {
                    transfer_id: transfer_id.to_owned(),
                    offset: self.next,
                    data,
                },
            );
            self.next += len;
        }
        if self.acked == self.size && !self.end_sent {
            let sha256 = self.finish_digest().await?;
            self.end_sent = true;
            context.send(
                reply_to,
                Message::FileEnd {
                    transfer_id: transfer_id.to_owned(),
                    size: self.size,
                    sha256,
                },
            );
        }
        Ok(())
    }

    /// The digest of the whole file as sent, once the file is known not to have
    /// changed since it was opened.
    async fn finish_digest(&mut self) -> Result<String, TransferError> {
        if let Some(sha256) = &self.sha256 {
            return Ok(sha256.clone());
        }
        let (file, path) = (self.file.clone(), self.path.clone());
        let now = blocking(&self.path, move || Version::of(&file, &path)).await?;
        if now != self.version {
            return Err(TransferError::Changed {
                path: self.path.clone(),
            });
        }
        let sha256 = match self.digest.take() {
            Some(digest) => digest.finish(&self.path).await?,
            None => String::new(),
        };
        self.sha256 = Some(sha256.clone());
        Ok(sha256)
    }
}

/// What [`open_from`] opened.
#[derive(Debug)]
struct Opened {
    file: File,
    version: Version,
    /// Where sending starts: the requested offset, or 0 beyond the end.
    offset: u64,
    /// The digest of the bytes before `offset`.
    prefix: Sha256,
}

/// Checks and opens the requested file, and hashes what lies before the offset
/// sending starts from. Blocking.
fn open_from(roots: &AllowedRoots, requested: &str, offset: u64) -> Result<Opened, TransferError> {
    let canonical = paths::resolve_get(roots, requested)?;
    let mut file = paths::open_for_get(roots, &canonical)?;
    let version = Version::of(&file, &canonical)?;
    let offset = if offset > version.len { 0 } else { offset };
    let mut prefix = Sha256::new();
    let mut left = offset;
    let mut buffer = vec![0; HASH_BUFFER.min(usize::try_from(offset).unwrap_or(HASH_BUFFER))];
    while left > 0 {
        let want = usize::try_from(left).map_or(buffer.len(), |left| left.min(buffer.len()));
        let n = match file.read(&mut buffer[..want]) {
            Ok(0) => {
                return Err(TransferError::Shrunk {
                    path: PathBuf::from(requested),
                    size: version.len,
                })
            }
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(TransferError::Io {
                    path: PathBuf::from(requested),
                    action: "read the file",
                    source,
                })
            }
        };
        prefix.update(&buffer[..n]);
        left -= n as u64;
    }
    Ok(Opened {
        file,
        version,
        offset,
        prefix,
    })
}

#[cfg(test)]
mod tests {
    use super::super::hex;
    use super::*;
    use std::fs;

    #[test]
    fn the_bytes_before_a_resume_offset_are_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let roots = AllowedRoots::canonicalize(&[dir.path().to_owned()]);
        let path = dir.path().join("big");
        let data: Vec<u8> = (0..3 * HASH_BUFFER + 17).map(|i| (i % 251) as u8).collect();
        fs::write(&path, &data).unwrap();
        let requested = path.display().to_string();
        let offset = 2 * HASH_BUFFER + 5;
        let opened = open_from(&roots, &requested, offset as u64).unwrap();
        assert_eq!(opened.version.len, data.len() as u64);
        assert_eq!(opened.offset, offset as u64);
        assert_eq!(
            hex(&opened.prefix.finalize()),
            hex(&Sha256::digest(&data[..offset]))
        );
        let beyond = open_from(&roots, &requested, data.len() as u64 + 1).unwrap();
        assert_eq!(beyond.offset, 0, "beyond the end: from 0");
    }

    #[test]
    fn a_fifo_is_refused_rather_than_read_forever() {
        let dir = tempfile::tempdir().unwrap();
        let roots = AllowedRoots::canonicalize(&[dir.path().to_owned()]);
        let fifo = dir.path().join("fifo");
        let status = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(status.success(), "mkfifo works");
        let err = open_from(&roots, &fifo.display().to_string(), 0).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("{} is not a regular file", fifo.display())
        );
    }
}
